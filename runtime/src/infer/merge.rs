//! Sharded-KV decode attention: the new token's query attends to one rank's shard of the KV
//! cache (a partial result with its log-sum-exp), and the partials of all ranks are merged by
//! log-sum-exp through one all-gather. Merging (out_i, lse_i) over disjoint key sets is exact:
//! lse = log sum_i exp(lse_i) and out = sum_i exp(lse_i - lse) out_i (the blockwise softmax of
//! Milakov & Gimelshein 2018, as FlashAttention and ring attention use it).
use crate::comm::Communicator;
use crate::error::{Result, RuntimeError};
use crate::kernel::{attention_fwd, Backend};
use tch::{Kind, Tensor};

/// float64 stays float64, anything else merges in float32.
pub fn acc_kind(k: Kind) -> Kind {
    if k == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Attention of `q` (B, Hq, Sq, D) over all of `k`, `v` (B, Hkv, n, D), no mask (every cached
/// key precedes the query): returns (out (B, Hq, Sq, D), lse (B, Hq, Sq)) in the accumulation
/// dtype. An empty shard (n = 0) gives out = 0 and lse = -inf, which the merge ignores.
pub fn partial_attention(
    backend: Backend,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let ak = acc_kind(q.kind());
    let s = q.size();
    if s.len() != 4 {
        return Err(RuntimeError::Shape(format!(
            "decode query must be (B, H, S, D), got {s:?}"
        )));
    }
    if k.size().get(2) == Some(&0) {
        return Ok((
            Tensor::zeros(s.as_slice(), (ak, q.device())),
            Tensor::full([s[0], s[1], s[2]], f64::NEG_INFINITY, (ak, q.device())),
        ));
    }
    let (o, l) = attention_fwd(backend, q, k, v, false, scale)?;
    Ok((o.to_kind(ak), l.to_kind(ak)))
}

/// Merges stacked partials: `outs` (n, B, H, S, D), `lses` (n, B, H, S) -> (out, lse).
pub fn merge_partials(outs: &Tensor, lses: &Tensor) -> (Tensor, Tensor) {
    let lse = lses.logsumexp([0i64].as_slice(), false);
    // A row where every shard is empty has lse = -inf; weights are then 0 (no NaN).
    let safe = lse.where_scalarother(&lse.isfinite(), 0.0);
    let w = (lses - safe.unsqueeze(0)).exp().unsqueeze(-1);
    let out = (outs * w).sum_dim_intlist([0i64].as_slice(), false, outs.kind());
    (out, lse)
}

/// Merges the partial results of key chunks along dim 0: `o` (n, ..., D) and their finite
/// (or -inf) `lse` (n, ...) -> (out (1, ..., D) in `ak`, the max m and the sum of
/// exp(lse - m), both (1, ...)), so that the merged lse is m + log(sum). Max, subtract, exp,
/// sum, then one weighted sum and a divide: the decode attention's chunk merge, eager and in
/// the CUDA-graph step (the planner counts these kernels).
pub fn merge_chunks(o: &Tensor, lse: &Tensor, ak: Kind) -> Result<(Tensor, Tensor, Tensor)> {
    let dims = [0i64];
    let m = lse.amax(dims.as_slice(), true);
    let w = (lse - &m).exp();
    let sum = w.sum_dim_intlist(dims.as_slice(), true, ak);
    let out = (o * w.unsqueeze(-1))
        .sum_dim_intlist(dims.as_slice(), true, ak)
        .f_div(&sum.unsqueeze(-1))?;
    Ok((out, m, sum))
}

/// Every rank's partial (out, lse) gathered over `comm` in one all-gather (lse packed as an
/// extra last column) and merged; every rank gets the same merged output, in rank order.
pub fn merge_over(comm: &dyn Communicator, out: &Tensor, lse: &Tensor) -> Result<Tensor> {
    let n = comm.size();
    if n == 1 {
        return Ok(out.shallow_clone());
    }
    let packed = Tensor::cat(&[out, &lse.unsqueeze(-1).to_kind(out.kind())], -1).unsqueeze(0);
    let mut shape = packed.size();
    shape[0] = n as i64;
    let all = Tensor::empty(shape.as_slice(), (packed.kind(), packed.device()));
    comm.all_gather(&packed.contiguous(), &all)?;
    let d = out.size()[3];
    let (o, _) = merge_partials(&all.narrow(-1, 0, d), &all.narrow(-1, d, 1).squeeze_dim(-1));
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::local::LocalComm;
    use crate::kernel::reference_attention;
    use tch::Device;

    /// Partial attention over any split of the keys, merged, equals attention over all keys.
    #[test]
    fn shards_merged_equal_full_attention() {
        let opt = (Kind::Double, Device::Cpu);
        let (hq, hkv, n, d) = (4, 2, 23, 16);
        let (q, k, v) = crate::rng::seeded(7, || {
            (
                Tensor::randn([1, hq, 1, d], opt),
                Tensor::randn([1, hkv, n, d], opt),
                Tensor::randn([1, hkv, n, d], opt),
            )
        });
        let scale = 1.0 / (d as f64).sqrt();
        let dout = Tensor::zeros([1, hq, 1, d], opt);
        let (full, ..) = reference_attention(&q, &k, &v, &dout, false, scale).unwrap();
        // Uneven shards, one of them empty.
        let cuts = [0i64, 5, 5, 17, 23];
        let (mut outs, mut lses) = (Vec::new(), Vec::new());
        for w in cuts.windows(2) {
            let (o, l) = partial_attention(
                Backend::CpuMath,
                &q,
                &k.narrow(2, w[0], w[1] - w[0]),
                &v.narrow(2, w[0], w[1] - w[0]),
                scale,
            )
            .unwrap();
            outs.push(o);
            lses.push(l);
        }
        let (stacked_o, stacked_l) = (Tensor::stack(&outs, 0), Tensor::stack(&lses, 0));
        let (merged, lse) = merge_partials(&stacked_o, &stacked_l);
        let err = (&merged - &full).abs().max().double_value(&[]);
        assert!(err < 1e-12, "{err}");
        // The decode attention's chunk merge over the non-empty shards: the same output, and
        // m + log(sum) the same log-sum-exp.
        let keep = Tensor::from_slice(&[0i64, 2, 3]);
        let (o, m, sum) = merge_chunks(
            &stacked_o.index_select(0, &keep),
            &stacked_l.index_select(0, &keep),
            Kind::Double,
        )
        .unwrap();
        let err = (o.squeeze_dim(0) - &full).abs().max().double_value(&[]);
        let lerr = ((m + sum.log()).squeeze_dim(0) - &lse)
            .abs()
            .max()
            .double_value(&[]);
        assert!(err < 1e-12 && lerr < 1e-12, "{err} {lerr}");
        // The same through the in-process all-gather, 4 thread ranks.
        let comms = LocalComm::group(4);
        let results: Vec<Tensor> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .zip(outs.iter().zip(&lses))
                .map(|(c, (o, l))| {
                    let (o, l) = (o.shallow_clone(), l.shallow_clone());
                    s.spawn(move || merge_over(&c, &o, &l).unwrap())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            let err = (&r - &full).abs().max().double_value(&[]);
            assert!(err < 1e-12, "{err}");
        }
    }
}

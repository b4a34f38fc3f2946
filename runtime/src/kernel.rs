//! Single-device attention kernels on (B, H, S, D) tensors through the C++ shim: cuDNN or
//! flash SDPA on CUDA, the ATen CPU flash kernel on the CPU; each returns the log-sum-exp
//! that blockwise (ring) attention needs to merge partial results. GQA is handled by
//! repeating kv heads before the kernel and summing their gradients after.
use crate::error::{Result, RuntimeError};
use crate::ffi;
use tch::{Device, Kind, Tensor};

/// Which attention kernel to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The ATen CPU kernel (`_scaled_dot_product_flash_attention_for_cpu`).
    CpuMath,
    /// FlashAttention-2 as shipped in ATen (CUDA).
    Flash,
    /// cuDNN SDPA (CUDA).
    Cudnn,
}

impl Backend {
    /// cuDNN on CUDA (the fastest measured on H100), the CPU kernel otherwise.
    pub fn default_for(device: Device) -> Backend {
        match device {
            Device::Cuda(_) => Backend::Cudnn,
            _ => Backend::CpuMath,
        }
    }

    fn code(self) -> i32 {
        match self {
            Backend::CpuMath => 0,
            Backend::Flash => 1,
            Backend::Cudnn => 2,
        }
    }

    /// Parses "cudnn", "flash" or "cpu".
    pub fn parse(s: &str) -> Result<Backend> {
        match s {
            "cudnn" => Ok(Backend::Cudnn),
            "flash" => Ok(Backend::Flash),
            "cpu" | "math" => Ok(Backend::CpuMath),
            _ => Err(RuntimeError::Shape(format!(
                "unknown attention backend {s:?}"
            ))),
        }
    }

    fn check(self, q: &Tensor) -> Result<()> {
        let cuda = matches!(q.device(), Device::Cuda(_));
        match (self, cuda) {
            (Backend::CpuMath, false) | (Backend::Flash | Backend::Cudnn, true) => Ok(()),
            _ => Err(RuntimeError::Shape(format!(
                "backend {self:?} cannot run on {:?}",
                q.device()
            ))),
        }
    }
}

/// Checks q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D) and returns the kv repeat factor.
fn gqa_factor(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<i64> {
    let (qs, ks, vs) = (q.size(), k.size(), v.size());
    if qs.len() != 4 || ks.len() != 4 || ks != vs || qs[0] != ks[0] || qs[3] != ks[3] {
        return Err(RuntimeError::Shape(format!(
            "attention wants q (B,Hq,Sq,D), k = v (B,Hkv,Sk,D); got q {qs:?} k {ks:?} v {vs:?}"
        )));
    }
    if ks[1] == 0 || qs[1] % ks[1] != 0 {
        return Err(RuntimeError::Shape(format!(
            "{} q heads not a multiple of {} kv heads",
            qs[1], ks[1]
        )));
    }
    Ok(qs[1] / ks[1])
}

/// A dense copy of `t` for a CUDA kernel when its layout needs one, else `None` (the tensor
/// is used as it is, with no new handle). See [`kernel_layout_ok`].
fn dense(backend: Backend, t: &Tensor) -> Option<Tensor> {
    (backend != Backend::CpuMath && !kernel_layout_ok(t)).then(|| t.contiguous())
}

/// Whether a CUDA kernel takes `t` as it is: dense, or a 4-dim (B, H, S, D) view whose last
/// dim is dense and whose other strides and start are 16-byte aligned, such as a row range
/// (along S) of a dense (B, H, S, D) tensor. ATen builds its cuDNN graphs from the tensors'
/// own strides (`aten/src/ATen/native/cudnn/MHA.cpp`, `build_graph_backward`: `set_stride(
/// q.strides().vec())` for q, k, v, o, dO) and FlashAttention wants only a dense last dim,
/// so a ring step's K/V columns and a block's q rows need no copy; `mmsp-runtime check`
/// compares such calls with float64 on the GPU. The 3-dim log-sum-exp is always passed dense.
fn kernel_layout_ok(t: &Tensor) -> bool {
    if t.is_contiguous() {
        return true;
    }
    let st = t.stride();
    let elt = t.kind().elt_size_in_bytes() as i64;
    st.len() == 4
        && st[3] == 1
        && st[..3].iter().all(|s| (s * elt) % 16 == 0)
        && (t.data_ptr() as usize).is_multiple_of(16)
}

/// The kv heads repeated `g` times, or `None` when `g == 1` (no copy).
fn expand_kv(t: &Tensor, g: i64) -> Option<Tensor> {
    (g != 1).then(|| t.repeat_interleave_self_int(g, 1, None))
}

/// `t` made ready for a kernel: kv heads expanded, then made dense if needed. Borrows `t`
/// when neither applies, so the common case (MHA, dense inputs) adds no work per call.
struct Prepared(Option<Tensor>);

impl Prepared {
    fn new(backend: Backend, t: &Tensor, g: i64) -> Prepared {
        match expand_kv(t, g) {
            Some(x) => Prepared(Some(dense(backend, &x).unwrap_or(x))),
            None => Prepared(dense(backend, t)),
        }
    }

    fn get<'t>(&'t self, orig: &'t Tensor) -> &'t Tensor {
        self.0.as_ref().unwrap_or(orig)
    }
}

fn reduce_kv(t: Tensor, g: i64) -> Tensor {
    if g == 1 {
        return t;
    }
    let s = t.size();
    t.reshape([s[0], s[1] / g, g, s[2], s[3]])
        .sum_dim_intlist(2, false, t.kind())
}

/// Forward: returns (out in q's dtype, lse (B, Hq, Sq) in float32 or float64). With dense
/// (B, H, S, D) inputs and as many kv heads as q heads this is one shim call and nothing else:
/// no copy, no cast, no extra allocation beyond the kernel's own outputs.
pub fn attention_fwd(
    backend: Backend,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    backend.check(q)?;
    let g = gqa_factor(q, k, v)?;
    let (qp, kp, vp) = (
        Prepared::new(backend, q, 1),
        Prepared::new(backend, k, g),
        Prepared::new(backend, v, g),
    );
    ffi::attn_fwd(
        backend.code(),
        qp.get(q),
        kp.get(k),
        vp.get(v),
        causal,
        scale,
    )
}

/// Forward of FlashAttention (CUDA) with the kv heads as they are, no mask: q (B, Hq, Sq, D)
/// against k, v (B, Hkv, Sk, D) with Hq a multiple of Hkv, which FlashAttention handles
/// itself (ATen's `flash_api.cpp`, `mha_fwd`: the q heads of one kv head share its K/V), so
/// no kv head is repeated. Returns (out in q's dtype, lse (B, Hq, Sq) float32). For decode.
pub fn attention_fwd_gqa_flash(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    Backend::Flash.check(q)?;
    gqa_factor(q, k, v)?;
    let p = |t: &Tensor| Prepared::new(Backend::Flash, t, 1);
    let (qp, kp, vp) = (p(q), p(k), p(v));
    ffi::attn_fwd(
        Backend::Flash.code(),
        qp.get(q),
        kp.get(k),
        vp.get(v),
        false,
        scale,
    )
}

/// Backward given the output and log-sum-exp of all of q's rows (global ones when the kv are
/// split in blocks): returns (dq, dk, dv) in the input dtype.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    backend: Backend,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    causal: bool,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    backend.check(q)?;
    let g = gqa_factor(q, k, v)?;
    let p = |t: &Tensor, g: i64| Prepared::new(backend, t, g);
    // cuDNN's backward assumes dout has out's strides (pytorch/pytorch#138354): two views
    // of one layout pass as they are, anything else is made dense.
    let same = dout.stride() == out.stride() || backend == Backend::CpuMath;
    let p_out = |t: &Tensor| {
        if same {
            p(t, 1)
        } else {
            Prepared(Some(t.contiguous()))
        }
    };
    let (dop, qp, kp, vp, op, lp) = (
        p_out(dout),
        p(q, 1),
        p(k, g),
        p(v, g),
        p_out(out),
        p(lse, 1),
    );
    let (dq, dk, dv) = ffi::attn_bwd(
        backend.code(),
        dop.get(dout),
        qp.get(q),
        kp.get(k),
        vp.get(v),
        op.get(out),
        lp.get(lse),
        causal,
        scale,
    )?;
    Ok((dq, reduce_kv(dk, g), reduce_kv(dv, g)))
}

/// Plain matmul/softmax attention (float64 recommended) with autograd, for references in
/// tests and benches: returns (out, dq, dk, dv) for the given output gradient.
pub fn reference_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    causal: bool,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let g = gqa_factor(q, k, v)?;
    let q = q.detach().set_requires_grad(true);
    let k = k.detach().set_requires_grad(true);
    let v = v.detach().set_requires_grad(true);
    let (sq, sk) = (q.size()[2], k.size()[2]);
    let kx = expand_kv(&k, g).unwrap_or_else(|| k.shallow_clone());
    let vx = expand_kv(&v, g).unwrap_or_else(|| v.shallow_clone());
    let mut s = q.matmul(&kx.transpose(-2, -1)) * scale;
    if causal {
        let mask = Tensor::ones([sq, sk], (Kind::Bool, q.device())).triu(1);
        s = s.masked_fill(&mask, f64::NEG_INFINITY);
    }
    let p = s.softmax(-1, s.kind());
    let o = p.matmul(&vx);
    let loss = (&o * dout).sum(o.kind());
    let g = Tensor::f_run_backward(&[&loss], &[&q, &k, &v], false, false)?;
    Ok((o.detach(), g[0].detach(), g[1].detach(), g[2].detach()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row and column ranges of a dense (B, H, S, D) tensor go to the CUDA kernels as they
    /// are; a view whose last dim is strided, whose other strides are not 16-byte multiples,
    /// or that is not 4-dim (the log-sum-exp) gets a dense copy.
    #[test]
    fn kernels_take_row_views_and_copy_the_rest() {
        let t = Tensor::zeros([1, 4, 64, 16], (Kind::BFloat16, Device::Cpu));
        assert!(kernel_layout_ok(&t));
        let rows = t.narrow(2, 32, 16);
        assert!(!rows.is_contiguous() && kernel_layout_ok(&rows));
        assert!(kernel_layout_ok(&t.narrow(2, 0, 24)));
        assert!(!kernel_layout_ok(&t.transpose(2, 3)));
        // One element of bf16 is 2 bytes: a head dim of 3 makes strides that are not 16-byte
        // multiples, and a start 2 bytes in is misaligned.
        let odd = Tensor::zeros([1, 4, 64, 3], (Kind::BFloat16, Device::Cpu));
        assert!(!kernel_layout_ok(&odd.narrow(2, 1, 8)));
        let lse = Tensor::zeros([1, 4, 64], (Kind::Float, Device::Cpu));
        assert!(kernel_layout_ok(&lse) && !kernel_layout_ok(&lse.narrow(2, 0, 8)));
        // Only the CUDA backends copy.
        assert!(dense(Backend::CpuMath, &t.transpose(2, 3)).is_none());
        assert!(dense(Backend::Cudnn, &t.transpose(2, 3)).is_some());
        assert!(dense(Backend::Cudnn, &rows).is_none());
    }
}

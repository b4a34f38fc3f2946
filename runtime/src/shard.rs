//! Zigzag token sharding of tensors. The shards are the plan contract's
//! ([`mmsp_plan::zigzag`]: 2 x ring chunks, ring rank r holds chunks r and 2R-1-r, each chunk cut
//! into `ulysses` sub-chunks), the same ranges the planner writes into a plan's
//! `tokens.ranges_per_rank`, for every length; this module cuts and reassembles tensors by them.
//! Packed samples, each sharded this way on its own: [`crate::packed`].
use crate::error::{Result, RuntimeError};
use tch::Tensor;

pub use mmsp_plan::Zigzag;

/// Start offsets of parts with the given lengths.
pub fn offsets(lens: &[usize]) -> Vec<usize> {
    let mut acc = 0;
    lens.iter()
        .map(|l| {
            let o = acc;
            acc += l;
            o
        })
        .collect()
}

/// Rank (r, u)'s shard of a full tensor whose dimension `dim` is the sequence.
pub fn shard(zz: &Zigzag, full: &Tensor, dim: i64, r: usize, u: usize) -> Result<Tensor> {
    shard_ranges(full, dim, zz.seq_len, &zz.local_ranges(r, u))
}

/// Reassembles the full tensor from every rank's shard (`shards[r][u]`).
pub fn unshard(zz: &Zigzag, shards: &[Vec<Tensor>], dim: i64) -> Result<Tensor> {
    unshard_ranges(shards, dim, |r, u| zz.local_ranges(r, u).to_vec())
}

/// The rows `ranges` (in order) of a full tensor whose dimension `dim` holds `seq_len` tokens:
/// one rank's shard, for any layout that gives a rank a list of token ranges.
pub(crate) fn shard_ranges(
    full: &Tensor,
    dim: i64,
    seq_len: usize,
    ranges: &[(usize, usize)],
) -> Result<Tensor> {
    let n = full.size().get(dim as usize).copied().unwrap_or(-1);
    if n != seq_len as i64 {
        return Err(RuntimeError::Shape(format!(
            "tensor has {n} tokens in dim {dim}, sharding is for {seq_len}"
        )));
    }
    let parts: Vec<Tensor> = ranges
        .iter()
        .map(|&(s, e)| full.narrow(dim, s as i64, (e - s) as i64))
        .collect();
    Ok(Tensor::cat(&parts, dim))
}

/// The full tensor from every rank's shard (`shards[r][u]`, holding the rows `ranges_of(r, u)`
/// in order along `dim`); the ranges of all ranks must partition the sequence.
pub(crate) fn unshard_ranges(
    shards: &[Vec<Tensor>],
    dim: i64,
    ranges_of: impl Fn(usize, usize) -> Vec<(usize, usize)>,
) -> Result<Tensor> {
    let mut pieces: Vec<(usize, Tensor)> = Vec::new();
    for (r, row) in shards.iter().enumerate() {
        for (u, t) in row.iter().enumerate() {
            let ranges = ranges_of(r, u);
            let want: usize = ranges.iter().map(|(a, b)| b - a).sum();
            if t.size().get(dim as usize).copied() != Some(want as i64) {
                return Err(RuntimeError::Shape(format!(
                    "shard ({r}, {u}) has {:?} tokens, expected {want}",
                    t.size().get(dim as usize)
                )));
            }
            let mut at = 0i64;
            for (a, b) in ranges {
                let n = (b - a) as i64;
                pieces.push((a, t.narrow(dim, at, n)));
                at += n;
            }
        }
    }
    pieces.sort_by_key(|p| p.0);
    let ts: Vec<Tensor> = pieces.into_iter().map(|p| p.1).collect();
    Ok(Tensor::cat(&ts, dim))
}

//! Zigzag token sharding fixed with the planner: the sequence is cut into 2*ring chunks, ring
//! rank r holds chunks r and 2*ring-1-r, and each chunk is cut into `ulysses` contiguous
//! sub-chunks of which Ulysses rank u holds sub-chunk u. Lengths need not divide: parts
//! differ by at most one token (the first ones are longer; the planner places the extra
//! tokens otherwise, so its ranges and these agree for lengths that divide by
//! 2 x ring x ulysses). Packed samples, each sharded this way on its own:
//! [`crate::packed`].
use crate::error::{Result, RuntimeError};
use tch::Tensor;

/// Lengths of `n` near-equal parts of `len`.
pub fn split_lengths(len: usize, n: usize) -> Vec<usize> {
    (0..n).map(|i| len / n + usize::from(i < len % n)).collect()
}

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

/// Sharding of one sequence over a ulysses x ring SP group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zigzag {
    pub seq_len: usize,
    pub ulysses: usize,
    pub ring: usize,
    /// Length of each of the 2*ring chunks.
    pub chunk: Vec<usize>,
}

impl Zigzag {
    /// Checks that every sub-chunk gets at least one token.
    pub fn new(seq_len: usize, ulysses: usize, ring: usize) -> Result<Zigzag> {
        if ulysses == 0 || ring == 0 {
            return Err(RuntimeError::Layout(
                "ulysses and ring degrees must be >= 1".into(),
            ));
        }
        let parts = 2 * ring * ulysses;
        if seq_len < parts {
            return Err(RuntimeError::Shape(format!(
                "sequence of {seq_len} tokens cannot be cut into 2 x ring {ring} x ulysses {ulysses} = {parts} non-empty shards"
            )));
        }
        Ok(Zigzag {
            seq_len,
            ulysses,
            ring,
            chunk: split_lengths(seq_len, 2 * ring),
        })
    }

    /// The two chunks of ring rank r.
    pub fn ring_chunks(&self, r: usize) -> [usize; 2] {
        [r, 2 * self.ring - 1 - r]
    }

    /// Lengths (a, b) of ring rank r's two chunks.
    pub fn ring_lens(&self, r: usize) -> (usize, usize) {
        let [a, b] = self.ring_chunks(r);
        (self.chunk[a], self.chunk[b])
    }

    /// Lengths of the sub-chunks of chunk c.
    pub fn sub_lens(&self, c: usize) -> Vec<usize> {
        split_lengths(self.chunk[c], self.ulysses)
    }

    /// (a, b) lengths held by rank (r, u) before the Ulysses all-to-all.
    pub fn local_lens(&self, r: usize, u: usize) -> (usize, usize) {
        let [a, b] = self.ring_chunks(r);
        (self.sub_lens(a)[u], self.sub_lens(b)[u])
    }

    /// Token ranges [start, end) of the sequence held by rank (r, u), in local order.
    pub fn local_ranges(&self, r: usize, u: usize) -> [(usize, usize); 2] {
        let starts = offsets(&self.chunk);
        let mut out = [(0, 0); 2];
        for (i, c) in self.ring_chunks(r).into_iter().enumerate() {
            let subs = self.sub_lens(c);
            let s = starts[c] + offsets(&subs)[u];
            out[i] = (s, s + subs[u]);
        }
        out
    }

    /// Rank (r, u)'s shard of a full tensor whose dimension `dim` is the sequence.
    pub fn shard(&self, full: &Tensor, dim: i64, r: usize, u: usize) -> Result<Tensor> {
        shard_ranges(full, dim, self.seq_len, &self.local_ranges(r, u))
    }

    /// Reassembles the full tensor from every rank's shard (`shards[r][u]`).
    pub fn unshard(&self, shards: &[Vec<Tensor>], dim: i64) -> Result<Tensor> {
        unshard_ranges(shards, dim, |r, u| self.local_ranges(r, u).to_vec())
    }
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

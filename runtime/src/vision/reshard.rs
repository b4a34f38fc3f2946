//! One rank's part of the MM-SP re-shard: its encoded vision tokens go to the ranks whose
//! stage-2 (zigzag) ranges hold them, in one all-to-all with uneven splits; its own local
//! shard is then its received vision rows merged with its text rows. The backward is the
//! reverse all-to-all of the received rows' gradients. Tokens between a pair of ranks travel
//! in ascending global position, which both sides derive from the same [`ReshardMap`]
//! without talking. Nothing is gathered: each rank sends and receives only its own tokens.
use super::layout::ReshardMap;
use crate::comm::Communicator;
use crate::error::{Result, RuntimeError};
use tch::{Device, Kind, Tensor};

/// Index lists and split sizes of one rank's exchange.
pub struct Reshard {
    /// This rank's SP rank.
    pub sp_rank: usize,
    hidden: i64,
    comm_size: usize,
    /// Rows of the encoder output in send order (grouped by destination's communicator rank).
    send_index: Tensor,
    /// Inverse of `send_index` (a permutation of the encoder-output rows).
    send_inverse: Tensor,
    send_counts: Vec<i64>,
    recv_counts: Vec<i64>,
    /// For each received vision row in local order, its row in the receive buffer.
    recv_perm: Tensor,
    recv_inverse: Tensor,
    /// Local rows of the vision tokens (ascending) and of the text tokens (ascending).
    vision_rows: Vec<usize>,
    text_rows: Vec<usize>,
    /// Local row -> row of cat([vision, text]).
    merge_perm: Tensor,
    /// `vision_rows` and `text_rows` as index tensors.
    vision_index: Tensor,
    text_index: Tensor,
    encoded_rows: usize,
    local_len: usize,
}

fn index_tensor(v: &[usize], device: Device) -> Tensor {
    let v: Vec<i64> = v.iter().map(|&x| x as i64).collect();
    Tensor::from_slice(&v).to_device(device)
}

fn inverse(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

impl Reshard {
    /// Rank `sp_rank`'s exchange. `comm_rank_of_sp[r]` = the communicator rank of SP rank r
    /// (the identity for a communicator over exactly the SP group; a larger communicator,
    /// e.g. the world of several DP replicas, gets empty splits for the other ranks);
    /// `hidden` = the width of the rows exchanged (the LLM hidden size).
    pub fn new(
        map: &ReshardMap,
        sp_rank: usize,
        comm_rank_of_sp: &[usize],
        comm_size: usize,
        hidden: usize,
        device: Device,
    ) -> Result<Reshard> {
        if sp_rank >= map.ranks || comm_rank_of_sp.len() != map.ranks {
            return Err(RuntimeError::Layout(format!(
                "SP rank {sp_rank} and {} communicator ranks for an SP group of {}",
                comm_rank_of_sp.len(),
                map.ranks
            )));
        }
        let mut seen = vec![false; comm_size];
        for &c in comm_rank_of_sp {
            if c >= comm_size || std::mem::replace(&mut seen[c], true) {
                return Err(RuntimeError::Layout(format!(
                    "communicator ranks {comm_rank_of_sp:?} are not distinct ranks of a group of {comm_size}"
                )));
            }
        }
        let mut send: Vec<_> = map.segments.iter().filter(|s| s.src == sp_rank).collect();
        send.sort_by_key(|s| (comm_rank_of_sp[s.dst], s.pos));
        let mut recv: Vec<_> = map.segments.iter().filter(|s| s.dst == sp_rank).collect();
        recv.sort_by_key(|s| (comm_rank_of_sp[s.src], s.pos));

        let mut send_counts = vec![0i64; comm_size];
        let mut send_index = Vec::with_capacity(map.encoded_rows[sp_rank]);
        for s in &send {
            send_counts[comm_rank_of_sp[s.dst]] += s.len as i64;
            send_index.extend(s.src_row..s.src_row + s.len);
        }
        let encoded_rows = map.encoded_rows[sp_rank];
        if send_index.len() != encoded_rows {
            return Err(RuntimeError::Layout(format!(
                "rank {sp_rank} encodes {encoded_rows} tokens but sends {}",
                send_index.len()
            )));
        }
        let mut recv_counts = vec![0i64; comm_size];
        // (local row, buffer row) of every received token.
        let mut rows: Vec<(usize, usize)> = Vec::new();
        for s in &recv {
            recv_counts[comm_rank_of_sp[s.src]] += s.len as i64;
            let b0 = rows.len();
            rows.extend((0..s.len).map(|i| (s.dst_row + i, b0 + i)));
        }
        rows.sort_unstable();
        let vision_rows: Vec<usize> = rows.iter().map(|r| r.0).collect();
        let recv_perm: Vec<usize> = rows.iter().map(|r| r.1).collect();
        let text_rows = map.text_rows[sp_rank].clone();
        let local_len = map.local_len[sp_rank];
        let nv = vision_rows.len();
        let mut merge = vec![usize::MAX; local_len];
        for (k, &r) in vision_rows.iter().enumerate() {
            merge[r] = k;
        }
        for (j, &r) in text_rows.iter().enumerate() {
            merge[r] = nv + j;
        }
        if merge.contains(&usize::MAX) {
            return Err(RuntimeError::Layout(format!(
                "rank {sp_rank}'s shard has rows that are neither text nor vision"
            )));
        }
        Ok(Reshard {
            sp_rank,
            hidden: hidden as i64,
            comm_size,
            send_inverse: index_tensor(&inverse(&send_index), device),
            send_index: index_tensor(&send_index, device),
            send_counts,
            recv_counts,
            recv_inverse: index_tensor(&inverse(&recv_perm), device),
            recv_perm: index_tensor(&recv_perm, device),
            merge_perm: index_tensor(&merge, device),
            vision_index: index_tensor(&vision_rows, device),
            text_index: index_tensor(&text_rows, device),
            vision_rows,
            text_rows,
            encoded_rows,
            local_len,
        })
    }

    /// Tokens of this rank's local shard.
    pub fn local_len(&self) -> usize {
        self.local_len
    }

    /// Rows of this rank's encoder output.
    pub fn encoded_rows(&self) -> usize {
        self.encoded_rows
    }

    /// Local rows of the vision tokens this rank receives, ascending.
    pub fn vision_rows(&self) -> &[usize] {
        &self.vision_rows
    }

    /// Local rows of this rank's text tokens, ascending.
    pub fn text_rows(&self) -> &[usize] {
        &self.text_rows
    }

    /// Rows this rank sends to each communicator rank (itself included).
    pub fn send_counts(&self) -> &[i64] {
        &self.send_counts
    }

    /// Rows this rank receives from each communicator rank.
    pub fn recv_counts(&self) -> &[i64] {
        &self.recv_counts
    }

    fn check_rows(&self, t: &Tensor, rows: usize, what: &str) -> Result<()> {
        let s = t.size();
        if s.len() != 2 || s[0] != rows as i64 || s[1] != self.hidden {
            return Err(RuntimeError::Shape(format!(
                "{what} must be ({rows}, {}) on SP rank {}, got {s:?}",
                self.hidden, self.sp_rank
            )));
        }
        Ok(())
    }

    fn exchange(
        &self,
        comm: &dyn Communicator,
        data: &Tensor,
        send: &[i64],
        recv: &[i64],
    ) -> Result<Tensor> {
        if comm.size() != self.comm_size {
            return Err(RuntimeError::Layout(format!(
                "re-shard built for a group of {}, the communicator has {}",
                self.comm_size,
                comm.size()
            )));
        }
        let data = data.contiguous();
        let mut at = 0;
        let sends: Vec<Tensor> = send
            .iter()
            .map(|&n| {
                let t = data.narrow(0, at, n);
                at += n;
                t
            })
            .collect();
        let total: i64 = recv.iter().sum();
        let buf = Tensor::empty([total, self.hidden], (data.kind(), data.device()));
        let mut at = 0;
        let recvs: Vec<Tensor> = recv
            .iter()
            .map(|&n| {
                let t = buf.narrow(0, at, n);
                at += n;
                t
            })
            .collect();
        comm.all_to_all(&sends, &recvs)?.wait()?;
        Ok(buf)
    }

    /// Forward: this rank's encoder output rows (encoded_rows, hidden) -> the vision rows of
    /// its local shard (vision_rows().len(), hidden), in ascending local order. No autograd
    /// graph: see [`Reshard::backward`].
    pub fn forward(&self, comm: &dyn Communicator, encoded: &Tensor) -> Result<Tensor> {
        self.check_rows(encoded, self.encoded_rows, "the encoder output")?;
        let _g = tch::no_grad_guard();
        let out = encoded.detach().index_select(0, &self.send_index);
        let buf = self.exchange(comm, &out, &self.send_counts, &self.recv_counts)?;
        Ok(buf.index_select(0, &self.recv_perm))
    }

    /// Backward: the gradient of the local vision rows (as returned by `forward`) -> the
    /// gradient of this rank's encoder output rows (the reverse all-to-all).
    pub fn backward(&self, comm: &dyn Communicator, grad: &Tensor) -> Result<Tensor> {
        self.check_rows(grad, self.vision_rows.len(), "the vision-row gradient")?;
        let _g = tch::no_grad_guard();
        let buf = grad.detach().index_select(0, &self.recv_inverse);
        let back = self.exchange(comm, &buf, &self.recv_counts, &self.send_counts)?;
        Ok(back.index_select(0, &self.send_inverse))
    }

    /// The local shard (local_len, hidden): `vision` rows (as from `forward`) and `text` rows
    /// (in `text_rows()` order) put in place; differentiable in both.
    pub fn merge(&self, vision: &Tensor, text: &Tensor) -> Result<Tensor> {
        self.check_rows(vision, self.vision_rows.len(), "the vision rows")?;
        self.check_rows(text, self.text_rows.len(), "the text rows")?;
        let kind = vision.kind();
        let text = if text.kind() == kind {
            text.shallow_clone()
        } else {
            text.to_kind(kind)
        };
        Ok(Tensor::cat(&[vision, &text], 0).index_select(0, &self.merge_perm))
    }

    /// The inverse of [`Reshard::merge`]: a local-shard tensor (local_len, hidden), e.g. its
    /// gradient, split into its vision rows and its text rows.
    pub fn split(&self, local: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check_rows(local, self.local_len, "the local shard")?;
        Ok((
            local.index_select(0, &self.vision_index),
            local.index_select(0, &self.text_index),
        ))
    }

    /// Zeros shaped like this rank's vision rows.
    pub fn zeros_vision(&self, kind: Kind, device: Device) -> Tensor {
        Tensor::zeros([self.vision_rows.len() as i64, self.hidden], (kind, device))
    }
}

//! Training data: a stream of token ids (with a loss mask) cut into sequences of the plan's
//! context, deterministic by (seed, step, DP rank) so that a resumed run reads exactly what
//! a straight run would have.
//!
//! Sources, all read and checked before the first step (a bad file is one error naming the
//! file and line or position):
//! - `.jsonl` text: `{"text": ...}` documents, or `{"prompt": ..., "completion": ...}` for
//!   SFT (prompt tokens carry no loss), tokenized with the model's `tokenizer.json` (the
//!   `tokenizers` crate: the same Rust library Transformers' fast tokenizers run), the end of
//!   sequence token appended to each document;
//! - `.jsonl` of token ids: one document per line, `[...]` or `{"input_ids": [...]}`;
//! - `.npy` of integer token ids (any shape, read flat);
//! - Megatron-LM's indexed dataset, `PREFIX.bin` + `PREFIX.idx` (`--data PREFIX.bin`): the
//!   documents of `megatron/core/datasets/indexed_dataset.py`, concatenated in index order;
//!   read by byte range (the `.bin` is not loaded).
//!
//! Packing: documents are concatenated; sequence k of an epoch is tokens [kC, kC + C) with
//! labels shifted by one (the last label is the next sequence's first token), and
//! [`pack_documents`] makes each of its documents a sample of the packed trainer
//! (document-masked attention) unless the run asks for attention across them (Megatron's
//! GPT dataset without `--reset-attention-mask`). Sample j of a run is
//! sequence j of the epoch's permutation (seeded shuffle of the sequence order, one per
//! epoch); step s on DP rank d takes sample s * dp + d.
use crate::error::{Result, RuntimeError};
use serde_json::Value;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

fn bad(path: &Path, what: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Data(format!("{}: {what}", path.display()))
}

/// A token stream: in memory, or a Megatron `.bin` read by range.
enum Tokens {
    Memory {
        ids: Vec<u32>,
        /// Whether position i carries loss (false: an SFT prompt token).
        loss: Vec<bool>,
        /// First token of each document (empty: one document, a `.npy`).
        doc_starts: Vec<u64>,
    },
    Megatron(Megatron),
}

/// Megatron-LM's `MMIDIDX` index and its data file.
struct Megatron {
    bin: PathBuf,
    file: File,
    elt: usize,
    /// Element type code (1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 8 u16).
    code: u8,
    /// (byte pointer, length in tokens, first token's index in the stream) per sequence.
    seqs: Vec<(u64, u64, u64)>,
    total: u64,
}

/// Training data cut into sequences of one length.
pub struct Dataset {
    pub path: PathBuf,
    tokens: Tokens,
    context: usize,
    seed: u64,
    pub num_tokens: u64,
    /// Sequences in one epoch.
    pub num_sequences: u64,
}

/// One sequence: ids and labels (-100 where no loss), both of the context's length.
pub struct Sample {
    pub ids: Vec<i64>,
    pub labels: Vec<i64>,
    /// Lengths of the documents (or pieces of them) the sequence holds, in order; their sum
    /// is the context.
    pub doc_lens: Vec<usize>,
}

/// What turns text into ids: the model's tokenizer and its end-of-sequence id.
pub struct TextTokenizer {
    pub tok: tokenizers::Tokenizer,
    pub eos: Option<u32>,
}

impl TextTokenizer {
    /// `tokenizer.json` of a model directory; the end-of-sequence id from `config.json`'s
    /// `eos_token_id` (the first, when a list).
    pub fn from_model_dir(dir: &Path, config: &Value) -> Result<TextTokenizer> {
        let p = dir.join("tokenizer.json");
        let tok = tokenizers::Tokenizer::from_file(&p).map_err(|e| bad(&p, e))?;
        let eos = match config.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|v| v as u32),
            Some(Value::Array(a)) => a.first().and_then(Value::as_u64).map(|v| v as u32),
            _ => None,
        };
        Ok(TextTokenizer { tok, eos })
    }

    /// Token ids of `text` (with the special tokens the tokenizer's post-processor adds).
    pub fn encode(&self, text: &str, specials: bool) -> std::result::Result<Vec<u32>, String> {
        self.tok
            .encode(text, specials)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    }

    /// Text of token ids (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> std::result::Result<String, String> {
        self.tok.decode(ids, true).map_err(|e| e.to_string())
    }
}

/// splitmix64 (Steele et al. 2014): the generator of the epoch permutations (and of
/// inference's sampler).
pub(crate) fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Dataset {
    /// Opens `path` for sequences of `context` tokens, checking every id is below `vocab`.
    /// Text needs `tok`. `seed` 0: the sequences in file order, every epoch.
    pub fn open(
        path: &Path,
        context: usize,
        vocab: usize,
        seed: u64,
        tok: Option<&TextTokenizer>,
    ) -> Result<Dataset> {
        let name = path.to_string_lossy();
        let tokens = if name.ends_with(".bin") {
            Tokens::Megatron(Megatron::open(path, vocab)?)
        } else if name.ends_with(".npy") {
            let ids = read_npy(path)?;
            let loss = vec![true; ids.len()];
            Tokens::Memory {
                ids,
                loss,
                doc_starts: Vec::new(),
            }
        } else if name.ends_with(".jsonl") {
            let (ids, loss, doc_starts) = read_jsonl(path, tok)?;
            Tokens::Memory {
                ids,
                loss,
                doc_starts,
            }
        } else {
            return Err(bad(
                path,
                "unknown data format (expected .jsonl, .npy or a Megatron .bin with its .idx)",
            ));
        };
        if let Tokens::Memory { ids, .. } = &tokens {
            if let Some(i) = ids.iter().position(|&t| t as usize >= vocab) {
                return Err(bad(
                    path,
                    format!(
                        "token {i} is id {}, the model's vocabulary has {vocab}",
                        ids[i]
                    ),
                ));
            }
        }
        let num_tokens = match &tokens {
            Tokens::Memory { ids, .. } => ids.len() as u64,
            Tokens::Megatron(m) => m.total,
        };
        if num_tokens < context as u64 + 1 {
            return Err(bad(
                path,
                format!(
                    "{num_tokens} tokens; one sequence of the plan's context needs {}",
                    context + 1
                ),
            ));
        }
        Ok(Dataset {
            path: path.to_path_buf(),
            tokens,
            context,
            seed,
            num_tokens,
            num_sequences: (num_tokens - 1) / context as u64,
        })
    }

    /// Index in the stream of sample `j`'s sequence.
    fn sequence_of(&self, j: u64) -> u64 {
        let n = self.num_sequences;
        let (epoch, k) = (j / n, j % n);
        if self.seed == 0 {
            return k;
        }
        // Fisher-Yates of 0..n under (seed, epoch); n is the stream over the context.
        let mut st = self.seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407);
        let mut perm: Vec<u64> = (0..n).collect();
        for i in (1..n as usize).rev() {
            let r = (splitmix(&mut st) % (i as u64 + 1)) as usize;
            perm.swap(i, r);
        }
        perm[k as usize]
    }

    /// The sample DP rank `dp_rank` of `dp` trains on at `step`.
    pub fn sample(&self, step: usize, dp_rank: usize, dp: usize) -> Result<Sample> {
        let j = step as u64 * dp as u64 + dp_rank as u64;
        let start = self.sequence_of(j) * self.context as u64;
        let c = self.context;
        let (ids, loss) = self.read(start, c + 1)?;
        let labels = (0..c)
            .map(|i| if loss[i + 1] { ids[i + 1] } else { -100 })
            .collect();
        let mut ids = ids;
        ids.truncate(c);
        let doc_lens = self.doc_lens(start, c);
        Ok(Sample {
            ids,
            labels,
            doc_lens,
        })
    }

    /// Lengths of the documents' pieces in tokens [start, start + n).
    fn doc_lens(&self, start: u64, n: usize) -> Vec<usize> {
        let end = start + n as u64;
        // Document starts strictly inside the window, found by binary search (both lists are
        // in stream order): no per-step copy of every document's start.
        let inside = |firsts: &mut dyn Iterator<Item = u64>| -> Vec<u64> {
            firsts
                .take_while(|&f| f < end)
                .filter(|&f| f > start)
                .collect()
        };
        let mut cuts = match &self.tokens {
            Tokens::Memory { doc_starts, .. } => {
                let i = doc_starts.partition_point(|&f| f <= start);
                inside(&mut doc_starts[i..].iter().copied())
            }
            Tokens::Megatron(m) => {
                let i = m.seqs.partition_point(|s| s.2 <= start);
                inside(&mut m.seqs[i..].iter().map(|s| s.2))
            }
        };
        cuts.push(end);
        let mut at = start;
        cuts.into_iter()
            .map(|c| {
                let l = (c - at) as usize;
                at = c;
                l
            })
            .collect()
    }

    fn read(&self, start: u64, n: usize) -> Result<(Vec<i64>, Vec<bool>)> {
        match &self.tokens {
            Tokens::Memory { ids, loss, .. } => {
                let r = start as usize..start as usize + n;
                Ok((
                    ids[r.clone()].iter().map(|&t| t as i64).collect(),
                    loss[r].to_vec(),
                ))
            }
            Tokens::Megatron(m) => Ok((m.read(start, n)?, vec![true; n])),
        }
    }
}

/// Reads a JSONL of documents: text (tokenized) or token ids.
fn read_jsonl(path: &Path, tok: Option<&TextTokenizer>) -> Result<(Vec<u32>, Vec<bool>, Vec<u64>)> {
    let text = std::fs::read_to_string(path).map_err(|e| bad(path, e))?;
    let (mut ids, mut loss, mut starts) = (Vec::new(), Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        if !line.trim().is_empty() {
            starts.push(ids.len() as u64);
        }
        if line.trim().is_empty() {
            continue;
        }
        let at = |what: String| bad(path, format!("line {}: {what}", i + 1));
        let v: Value = serde_json::from_str(line).map_err(|e| at(format!("not JSON: {e}")))?;
        let ids_of = |a: &Value| -> Option<Vec<u32>> {
            a.as_array()?
                .iter()
                .map(|x| {
                    x.as_u64()
                        .filter(|&t| t <= u32::MAX as u64)
                        .map(|t| t as u32)
                })
                .collect()
        };
        if let Some(a) = ids_of(&v).or_else(|| v.get("input_ids").and_then(ids_of)) {
            loss.extend(std::iter::repeat_n(true, a.len()));
            ids.extend(a);
            continue;
        }
        let need_tok = || {
            tok.ok_or_else(|| {
                at("a text document needs the model's tokenizer.json (--model DIR)".into())
            })
        };
        let enc = |t: &TextTokenizer, s: &str, specials| {
            t.encode(s, specials)
                .map_err(|e| at(format!("tokenizer: {e}")))
        };
        let field = |k: &str| v.get(k).and_then(Value::as_str);
        let (prompt, body) =
            match (field("text"), field("prompt"), field("completion")) {
                (Some(t), _, _) => (Vec::new(), enc(need_tok()?, t, true)?),
                (None, Some(p), Some(c)) => {
                    let t = need_tok()?;
                    (enc(t, p, true)?, enc(t, c, false)?)
                }
                _ => return Err(at(
                    "expected {\"text\": ...}, {\"prompt\": ..., \"completion\": ...}, a list of \
                     token ids or {\"input_ids\": [...]}"
                        .into(),
                )),
            };
        loss.extend(std::iter::repeat_n(false, prompt.len()));
        loss.extend(std::iter::repeat_n(true, body.len()));
        ids.extend(prompt);
        ids.extend(body);
        if let Some(e) = tok.and_then(|t| t.eos) {
            ids.push(e);
            loss.push(true);
        }
    }
    Ok((ids, loss, starts))
}

/// Reads a `.npy` array of integers (NumPy format 1.0-3.0, C order), flattened.
fn read_npy(path: &Path) -> Result<Vec<u32>> {
    let b = std::fs::read(path).map_err(|e| bad(path, e))?;
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err(bad(path, "not a .npy file (no \\x93NUMPY magic)"));
    }
    let (hl, h0) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => {
            return Err(bad(
                path,
                format!(".npy format version {v} (expected 1, 2 or 3)"),
            ))
        }
    };
    let hdr = b
        .get(h0..h0 + hl)
        .map(String::from_utf8_lossy)
        .ok_or_else(|| bad(path, "truncated .npy header"))?;
    if hdr.contains("'fortran_order': True") {
        return Err(bad(path, "Fortran-ordered .npy (expected C order)"));
    }
    let descr = hdr
        .split("'descr':")
        .nth(1)
        .and_then(|r| r.split('\'').nth(1))
        .ok_or_else(|| bad(path, "no descr in the .npy header"))?;
    let data = &b[h0 + hl..];
    let (elt, signed) = match descr {
        "|u1" | "<u1" => (1, false),
        "<u2" => (2, false),
        "<i2" => (2, true),
        "<u4" => (4, false),
        "<i4" => (4, true),
        "<i8" => (8, true),
        "<u8" => (8, false),
        d => {
            return Err(bad(
                path,
                format!("dtype {d} (expected a little-endian integer type)"),
            ))
        }
    };
    if !data.len().is_multiple_of(elt) {
        return Err(bad(path, "data is not a whole number of elements"));
    }
    data.chunks_exact(elt)
        .enumerate()
        .map(|(i, c)| {
            let mut w = [0u8; 8];
            w[..elt].copy_from_slice(c);
            let v = if signed {
                let shift = 64 - 8 * elt as u32;
                ((i64::from_le_bytes(w) << shift) >> shift) as i128
            } else {
                u64::from_le_bytes(w) as i128
            };
            u32::try_from(v).map_err(|_| bad(path, format!("element {i} = {v} is not a token id")))
        })
        .collect()
}

impl Megatron {
    /// Opens `PREFIX.bin` and its `PREFIX.idx` (header `MMIDIDX\0\0`, version 1, dtype code,
    /// sequence and document counts, int32 lengths, int64 byte pointers, int64 document
    /// indices).
    fn open(bin: &Path, vocab: usize) -> Result<Megatron> {
        let idx = bin.with_extension("idx");
        let b = std::fs::read(&idx).map_err(|e| bad(&idx, e))?;
        let u64_at = |o: usize| {
            b.get(o..o + 8)
                .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        };
        if b.len() < 34 || &b[..9] != b"MMIDIDX\x00\x00" || u64_at(9) != Some(1) {
            return Err(bad(
                &idx,
                "not a Megatron indexed dataset index (MMIDIDX, version 1)",
            ));
        }
        let code = b[17];
        let elt = match code {
            1 | 2 => 1,
            3 | 8 => 2,
            4 => 4,
            5 => 8,
            c => {
                return Err(bad(
                    &idx,
                    format!("dtype code {c} (expected an integer type: 1-5 or 8)"),
                ))
            }
        };
        let n = u64_at(18).unwrap_or(0) as usize;
        let lens_at = 34;
        let ptrs_at = lens_at + 4 * n;
        if b.len() < ptrs_at + 8 * n {
            return Err(bad(
                &idx,
                format!("index of {} bytes is too short for {n} sequences", b.len()),
            ));
        }
        let file = File::open(bin).map_err(|e| bad(bin, e))?;
        let size = file.metadata().map_err(|e| bad(bin, e))?.len();
        let mut seqs = Vec::with_capacity(n);
        let mut total = 0u64;
        for i in 0..n {
            let len = u32::from_le_bytes(
                b[lens_at + 4 * i..lens_at + 4 * i + 4]
                    .try_into()
                    .expect("4"),
            ) as u64;
            let ptr = u64_at(ptrs_at + 8 * i).unwrap_or(0);
            if ptr + len * elt as u64 > size {
                return Err(bad(
                    bin,
                    format!("sequence {i} ends past the file's {size} bytes"),
                ));
            }
            seqs.push((ptr, len, total));
            total += len;
        }
        let m = Megatron {
            bin: bin.to_path_buf(),
            file,
            elt,
            code,
            seqs,
            total,
        };
        // Every id checked once, a sequence at a time.
        for (i, &(_, len, first)) in m.seqs.iter().enumerate() {
            if let Some(t) = m
                .read(first, len as usize)?
                .into_iter()
                .find(|&t| t < 0 || t as usize >= vocab)
            {
                return Err(bad(
                    bin,
                    format!("sequence {i} holds id {t}, the model's vocabulary has {vocab}"),
                ));
            }
        }
        Ok(m)
    }

    /// Tokens [start, start + n) of the concatenated sequences.
    fn read(&self, start: u64, n: usize) -> Result<Vec<i64>> {
        let mut out = Vec::with_capacity(n);
        let mut s = self
            .seqs
            .partition_point(|&(_, len, first)| first + len <= start);
        let mut pos = start;
        while out.len() < n && s < self.seqs.len() {
            let (ptr, len, first) = self.seqs[s];
            let take = ((first + len - pos) as usize).min(n - out.len());
            let mut buf = vec![0u8; take * self.elt];
            self.file
                .read_exact_at(&mut buf, ptr + (pos - first) * self.elt as u64)
                .map_err(|e| bad(&self.bin, e))?;
            out.extend(buf.chunks_exact(self.elt).map(|c| match self.code {
                1 => c[0] as i64,
                2 => c[0] as i8 as i64,
                3 => i16::from_le_bytes([c[0], c[1]]) as i64,
                8 => u16::from_le_bytes([c[0], c[1]]) as i64,
                4 => i32::from_le_bytes(c.try_into().expect("4")) as i64,
                _ => i64::from_le_bytes(c.try_into().expect("8")),
            }));
            pos += take as u64;
            s += 1;
        }
        if out.len() < n {
            return Err(bad(
                &self.bin,
                format!(
                    "tokens [{start}, {}) past its {}",
                    start + n as u64,
                    self.total
                ),
            ));
        }
        Ok(out)
    }
}

/// A sequence packed with one sample per document piece, for document-masked attention.
pub struct Packed {
    pub ids: Vec<i64>,
    pub labels: Vec<i64>,
    /// The trainer's samples ([`crate::train::Trainer::repack`]), each a multiple of `multiple`.
    pub sample_lens: Vec<usize>,
}

/// Packs a sample's documents as samples of the packed trainer (attention within each only,
/// RoPE positions restarting in each): every piece padded at its end (id `pad`, no loss) to a
/// multiple of `multiple` (2 x SP: each sample is zigzag-sharded on its own), pieces taken in
/// order while they fit the context, the one that does not truncated to the room left (a
/// multiple too) and the rest of the sequence dropped, as packers that never split a
/// sample's shard do. A document's last label (the next document's first token) is dropped;
/// a piece cut by the sequence's end keeps it (the same document goes on) unless it is the
/// last row of one of several samples, which the packed trainer never labels. None when the context is not a multiple of `multiple`.
pub fn pack_documents(s: &Sample, multiple: usize, pad: i64) -> Option<Packed> {
    let c = s.ids.len();
    if multiple == 0 || !c.is_multiple_of(multiple) {
        return None;
    }
    let (mut ids, mut labels, mut lens) =
        (Vec::with_capacity(c), Vec::with_capacity(c), Vec::new());
    let mut at = 0;
    let last = s.doc_lens.len().saturating_sub(1);
    for (j, &len) in s.doc_lens.iter().enumerate() {
        let room = c - ids.len();
        if room == 0 {
            break;
        }
        let take = len.min(room);
        let padded = take.div_ceil(multiple) * multiple;
        let (take, padded) = if padded > room {
            (room, room)
        } else {
            (take, padded)
        };
        ids.extend_from_slice(&s.ids[at..at + take]);
        labels.extend_from_slice(&s.labels[at..at + take]);
        if take == len && j < last {
            // The document ends here: its last label would be the next document's token.
            if let Some(l) = labels.last_mut() {
                *l = -100;
            }
        }
        ids.resize(ids.len() + padded - take, pad);
        labels.resize(labels.len() + padded - take, -100);
        lens.push(padded);
        at += len;
    }
    if lens.len() > 1 {
        // The packed trainer gives no sample's last row a label (it would cross samples).
        let mut end = 0;
        for &l in &lens {
            end += l;
            labels[end - 1] = -100;
        }
    }
    Some(Packed {
        ids,
        labels,
        sample_lens: lens,
    })
}

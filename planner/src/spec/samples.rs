//! Sample manifests: the packed training samples of one step (video frames + text tokens each),
//! read from JSON lines so that the balancer sees the real mix of video lengths and resolutions.
//!
//! One sample per line: `{"frames": 64, "text_tokens": 512, "resolution": [384, 384]}`;
//! `resolution` (height, width in pixels) is optional (default: the encoder's native size).
//! Blank lines are skipped; unknown fields are rejected (the format is ours).

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};

/// One training sample: a video of `frames` frames followed by `text_tokens` text tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Sample {
    pub frames: u64,
    pub text_tokens: u64,
    /// (height, width) in pixels; `None` = the vision encoder's native resolution.
    pub resolution: Option<(u32, u32)>,
}

impl Sample {
    /// A sample of `frames` native-resolution frames and `text_tokens` text tokens.
    pub fn uniform(frames: u64, text_tokens: u64) -> Self {
        Sample {
            frames,
            text_tokens,
            resolution: None,
        }
    }

    /// `count` identical samples of `frames` frames and `text_tokens` text tokens each
    /// (the uniform case of a request without a manifest). Errors if a sample would be empty.
    pub fn uniform_batch(count: usize, frames: u64, text_tokens: u64) -> Result<Vec<Sample>> {
        if count == 0 {
            return Err(Error::invalid("samples", "the batch has no samples"));
        }
        if frames == 0 && text_tokens == 0 {
            return Err(Error::invalid(
                "samples",
                "a sample needs at least one frame or one text token",
            ));
        }
        Ok(vec![Sample::uniform(frames, text_tokens); count])
    }

    /// LLM sequence length of this sample with `tokens_per_frame` tokens per frame.
    pub fn seq_len(&self, tokens_per_frame: u64) -> u64 {
        self.frames
            .saturating_mul(tokens_per_frame)
            .saturating_add(self.text_tokens)
    }
}

/// Read a JSON-lines manifest. Every bad line is reported as [`Error::Line`] with the 1-based
/// line number and the offending field (`"json"` when the line is not a JSON object).
pub fn load_manifest(path: impl AsRef<Path>) -> Result<Vec<Sample>> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: name.clone(),
        msg: e.to_string(),
    })?;
    parse_manifest(&text, &name)
}

/// Parse manifest text (see [`load_manifest`]); `path` names the source in errors.
pub fn parse_manifest(text: &str, path: &str) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(parse_line(line, path, i + 1)?);
    }
    if out.is_empty() {
        return Err(Error::Parse {
            path: path.to_string(),
            msg: "the manifest has no samples".into(),
        });
    }
    Ok(out)
}

fn parse_line(line: &str, path: &str, lineno: usize) -> Result<Sample> {
    let err = |field: &str, msg: String| Error::Line {
        path: path.to_string(),
        line: lineno,
        field: field.to_string(),
        msg,
    };
    let value: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| err("json", format!("not valid JSON: {e}").replace('\n', " ")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| err("json", "expected a JSON object".into()))?;
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "frames" | "text_tokens" | "resolution"))
    {
        return Err(err(
            k,
            "unknown field (expected frames, text_tokens, resolution)".into(),
        ));
    }
    let count = |key: &str| -> Result<u64> {
        let v = obj
            .get(key)
            .ok_or_else(|| err(key, "missing (a non-negative integer is required)".into()))?;
        v.as_u64()
            .ok_or_else(|| err(key, format!("must be a non-negative integer, got {v}")))
    };
    let frames = count("frames")?;
    let text_tokens = count("text_tokens")?;
    if frames == 0 && text_tokens == 0 {
        return Err(err(
            "frames",
            "the sample is empty (frames and text_tokens are both 0)".into(),
        ));
    }
    let resolution = match obj.get("resolution") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => {
            let bad = || {
                err(
                    "resolution",
                    format!("must be [height, width] in positive integer pixels, got {v}"),
                )
            };
            let arr = v.as_array().filter(|a| a.len() == 2).ok_or_else(bad)?;
            let side = |x: &serde_json::Value| {
                x.as_u64()
                    .filter(|&n| n > 0)
                    .and_then(|n| u32::try_from(n).ok())
            };
            match (side(&arr[0]), side(&arr[1])) {
                (Some(h), Some(w)) => Some((h, w)),
                _ => return Err(bad()),
            }
        }
    };
    Ok(Sample {
        frames,
        text_tokens,
        resolution,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_err(text: &str) -> (usize, String, String) {
        match parse_manifest(text, "m.jsonl").unwrap_err() {
            Error::Line {
                line, field, msg, ..
            } => (line, field, msg),
            e => panic!("expected a line error, got {e}"),
        }
    }

    #[test]
    fn parses_good_manifest() {
        let text = "{\"frames\": 64, \"text_tokens\": 512, \"resolution\": [384, 384]}\n\n\
                    {\"frames\": 0, \"text_tokens\": 10}\n{\"frames\": 3, \"text_tokens\": 0, \"resolution\": [224, 448]}\n";
        let s = parse_manifest(text, "m.jsonl").unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].resolution, Some((384, 384)));
        assert_eq!(s[1], Sample::uniform(0, 10));
        assert_eq!(s[2].resolution, Some((224, 448)));
        assert_eq!(s[0].seq_len(196), 64 * 196 + 512);
    }

    #[test]
    fn bad_lines_name_line_and_field() {
        let ok = "{\"frames\": 1, \"text_tokens\": 1}\n";
        let cases: &[(&str, &str)] = &[
            ("{\"text_tokens\": 5}", "frames"),
            ("{\"frames\": 5}", "text_tokens"),
            ("{\"frames\": 0, \"text_tokens\": 0}", "frames"),
            ("{\"frames\": -3, \"text_tokens\": 5}", "frames"),
            ("{\"frames\": 2.5, \"text_tokens\": 5}", "frames"),
            ("{\"frames\": 2, \"text_tokens\": \"5\"}", "text_tokens"),
            (
                "{\"frames\": 2, \"text_tokens\": 5, \"resolution\": [0, 3]}",
                "resolution",
            ),
            (
                "{\"frames\": 2, \"text_tokens\": 5, \"resolution\": [3]}",
                "resolution",
            ),
            ("{\"frames\": 2, \"text_tokens\": 5, \"fps\": 2}", "fps"),
            ("{\"frames\": 2,", "json"),
            ("[1, 2]", "json"),
        ];
        for (bad, field) in cases {
            let text = format!("{ok}{ok}{bad}\n{ok}");
            let (line, f, msg) = line_err(&text);
            assert_eq!(line, 3, "{bad}");
            assert_eq!(&f, field, "{bad}: {msg}");
            let rendered = parse_manifest(&text, "m.jsonl").unwrap_err().to_string();
            assert!(rendered.starts_with("m.jsonl:3:") && !rendered.contains('\n'));
        }
    }

    #[test]
    fn empty_manifest_and_uniform_batch_errors() {
        assert!(parse_manifest("\n  \n", "m.jsonl").is_err());
        assert!(Sample::uniform_batch(0, 1, 1).is_err());
        assert!(Sample::uniform_batch(2, 0, 0).is_err());
        assert_eq!(Sample::uniform_batch(3, 8, 16).unwrap().len(), 3);
        assert!(matches!(
            load_manifest("/nonexistent/m.jsonl"),
            Err(Error::Io { .. })
        ));
    }
}

//! Units used on the command line and in reports: token counts written as `131072`, `128K`,
//! `2M` or `1.5M`, where K = 1024 and M = 1024 x 1024 (as the long-context literature writes
//! 1M = 1048576), and human-readable renderings of bytes, tokens and seconds.

use crate::error::{Error, Result};

pub const KI: u64 = 1024;
pub const MI: u64 = 1024 * 1024;
pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Parses a token count: a whole number, or a number with suffix K (x1024) or M (x1024^2).
/// Fractions are allowed with a suffix when the result is a whole number of tokens.
pub fn parse_tokens(s: &str) -> Result<u64> {
    let t = s.trim();
    let bad = |msg: &str| Error::invalid("context", format!("'{s}' {msg}"));
    if t.is_empty() {
        return Err(bad(
            "is empty (expected a size such as 131072, 128K, 2M or 1.5M)",
        ));
    }
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], KI),
        Some('M') => (&t[..t.len() - 1], MI),
        _ => (t, 1),
    };
    let v: f64 = num
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite())
        .ok_or_else(|| {
            bad("is not a size (expected e.g. 131072, 128K, 2M or 1.5M; K = 1024, M = 1048576)")
        })?;
    if v <= 0.0 {
        return Err(bad("must be positive"));
    }
    let tokens = v * mult as f64;
    if tokens > 1e15 {
        return Err(bad("is too large"));
    }
    if (tokens - tokens.round()).abs() > 1e-6 {
        return Err(bad("is not a whole number of tokens"));
    }
    if tokens.round() < 1.0 {
        // "1e-308K" is positive but rounds to no token at all.
        return Err(bad("must be at least one token"));
    }
    Ok(tokens.round() as u64)
}

/// Renders a token count compactly: 2097152 -> "2M", 1572864 -> "1.5M", 131072 -> "128K".
pub fn fmt_tokens(n: u64) -> String {
    if n >= MI {
        trim_float(n as f64 / MI as f64) + "M"
    } else if n >= KI {
        trim_float(n as f64 / KI as f64) + "K"
    } else {
        n.to_string()
    }
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Bytes as GiB with one decimal.
pub fn fmt_gib(bytes: f64) -> String {
    format!("{:.1} GiB", bytes / GIB)
}

/// Seconds with a unit that keeps three significant figures.
pub fn fmt_secs(s: f64) -> String {
    if s == 0.0 {
        "0 s".to_string()
    } else if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{:.1} us", s * 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_tokens("131072").unwrap(), 131072);
        assert_eq!(parse_tokens("128K").unwrap(), 131072);
        assert_eq!(parse_tokens("128k").unwrap(), 131072);
        assert_eq!(parse_tokens("2M").unwrap(), 2 * 1048576);
        assert_eq!(parse_tokens("1.5M").unwrap(), 1572864);
        // Positive but no whole token (the fuzz test found it: a campaign divided by zero).
        assert!(parse_tokens("1e-308K").is_err());
    }

    #[test]
    fn rejects_non_sizes() {
        for bad in ["", "abc", "-1M", "0", "1.3", "2G", "nanK", "1e30"] {
            assert!(parse_tokens(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn formats_round_trip() {
        for s in ["2M", "1.5M", "128K", "1000"] {
            assert_eq!(fmt_tokens(parse_tokens(s).unwrap()), s);
        }
    }
}

//! Files replaced whole or not at all: written under a temporary name beside the target,
//! synced, renamed over it, and the rename synced through the directory. A crash or an error
//! leaves the old file (or none) in place, never a torn one, so a checkpoint, an exported
//! Hugging Face file or a calibration that was already written is never lost to a failed
//! rewrite. The one place the runtime does this; callers map the `io::Error` into their own.
use std::io;
use std::path::{Path, PathBuf};

/// The temporary name of `path`'s replacement: `<name>.tmp` in the same directory (so the
/// rename stays on one file system).
pub fn temp_name(path: &Path) -> PathBuf {
    let mut t = path.as_os_str().to_owned();
    t.push(".tmp");
    PathBuf::from(t)
}

/// Replaces `path` by what `write` puts at the temporary path it is given. On an error the
/// temporary file is removed and `path` is left as it was.
pub fn replace_with<E: From<io::Error>>(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let tmp = temp_name(path);
    let done = write(&tmp).and_then(|()| commit(&tmp, path).map_err(E::from));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

/// Replaces `path` by `bytes` ([`replace_with`]).
pub fn replace_bytes(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_with(path, |tmp| std::fs::write(tmp, bytes))
}

/// Puts the finished temporary file `tmp` (written by the caller, in `path`'s directory) in
/// place of `path`: synced, renamed, the rename synced.
pub fn commit(tmp: &Path, path: &Path) -> io::Result<()> {
    std::fs::File::open(tmp)?.sync_all()?;
    std::fs::rename(tmp, path)?;
    match path.parent() {
        // The rename itself, durable.
        Some(d) if !d.as_os_str().is_empty() => std::fs::File::open(d)?.sync_all(),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("mmsp-durable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("cal.json");
        replace_bytes(&f, b"old").unwrap();
        let r: io::Result<()> = replace_with(&f, |tmp| {
            std::fs::write(tmp, b"half")?;
            Err(io::Error::other("disk full"))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&f).unwrap(), b"old");
        assert!(!temp_name(&f).exists());
        replace_bytes(&f, b"new").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"new");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

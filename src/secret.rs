//! Secrets mounted as files (Kubernetes Secrets): client tokens, TLS keys,
//! database passwords and URLs. One reader for all of them, so every secret is
//! read, trimmed and reported the same way, and no error ever holds its content.

use std::path::{Path, PathBuf};

/// A secret file that cannot be used. Names the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read {what} from {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} file {} is empty", path.display())]
    Empty { what: &'static str, path: PathBuf },
}

/// The file's bytes, as they are (certificates and keys).
pub fn read_bytes(path: &Path, what: &'static str) -> Result<Vec<u8>, SecretError> {
    std::fs::read(path).map_err(|source| SecretError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The file's text without surrounding whitespace (a trailing newline is the
/// usual accident of `echo … > file`); an empty secret is an error.
pub fn read_text(path: &Path, what: &'static str) -> Result<String, SecretError> {
    let bytes = read_bytes(path, what)?;
    let text = String::from_utf8_lossy(&bytes);
    let text = text.trim();
    if text.is_empty() {
        return Err(SecretError::Empty {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_and_refuses_empty_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "  hunter2\r\n").unwrap();
        assert_eq!(read_text(&path, "a password").unwrap(), "hunter2");
        std::fs::write(&path, "\n").unwrap();
        let err = read_text(&path, "a password").unwrap_err().to_string();
        assert!(err.contains("is empty"), "{err}");
        let err = read_text(&dir.path().join("missing"), "a password")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read a password"), "{err}");
    }
}

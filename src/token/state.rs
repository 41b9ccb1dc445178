//! Where a credential's tokens persist between runs.
//!
//! The `StateStore` seam is small on purpose (load, save) so that a shared store (Redis, for
//! replicas sharing one refresh token) can slot in later. The file store writes atomically:
//! temp file in the same directory, fsync, rename, fsync the directory, mode 0600. A rotated
//! refresh token is saved *before* it is used, so a crash never loses it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::response::TokenSet;

pub trait StateStore: Send + Sync + 'static {
    /// The saved tokens, `None` when nothing was saved yet.
    fn load(&self) -> Result<Option<TokenSet>, StateError>;
    /// Durably replace the saved tokens.
    fn save(&self, tokens: &TokenSet) -> Result<(), StateError>;
    /// Forget the saved tokens (sign-out).
    fn clear(&self) -> Result<(), StateError>;
}

#[derive(Debug, thiserror::Error)]
#[error("state file {path}: {message}")]
pub struct StateError {
    pub path: String,
    pub message: String,
}

/// On-disk shape. Times are Unix milliseconds.
#[derive(Serialize, Deserialize)]
struct Persisted {
    version: u32,
    access_token: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    refresh_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    expires_at_ms: Option<u64>,
    received_at_ms: u64,
}

pub struct FileStateStore {
    path: PathBuf,
}

impl FileStateStore {
    pub fn new(path: PathBuf) -> Self {
        FileStateStore { path }
    }

    fn error(&self, message: impl std::fmt::Display) -> StateError {
        StateError {
            path: self.path.display().to_string(),
            message: message.to_string(),
        }
    }
}

fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl StateStore for FileStateStore {
    fn load(&self) -> Result<Option<TokenSet>, StateError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.error(e)),
        };
        let p: Persisted = serde_json::from_slice(&bytes).map_err(|e| {
            self.error(format!(
                "is not a token-proxy state file ({:?} error at line {})",
                e.classify(),
                e.line()
            ))
        })?;
        if p.version != 1 {
            return Err(self.error(format!("unsupported version {}", p.version)));
        }
        Ok(Some(TokenSet {
            access_token: SecretString::from(p.access_token),
            refresh_token: p.refresh_token.map(SecretString::from),
            expires_at: p.expires_at_ms.map(from_ms),
            received_at: from_ms(p.received_at_ms),
        }))
    }

    fn clear(&self) -> Result<(), StateError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.error(e)),
        }
    }

    fn save(&self, t: &TokenSet) -> Result<(), StateError> {
        let p = Persisted {
            version: 1,
            access_token: t.access_token.expose_secret().to_string(),
            refresh_token: t
                .refresh_token
                .as_ref()
                .map(|s| s.expose_secret().to_string()),
            expires_at_ms: t.expires_at.map(to_ms),
            received_at_ms: to_ms(t.received_at),
        };
        let json = serde_json::to_vec_pretty(&p).map_err(|e| self.error(e))?;
        write_atomic(&self.path, &json).map_err(|e| self.error(e))
    }
}

/// Write `bytes` to `path` so that a crash leaves either the old or the new file, never a mix.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.exists() {
        // Only we need to read it: other users cannot even list a new state directory.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trip_is_private_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        let store = FileStateStore::new(path.clone());
        assert!(store.load().unwrap().is_none());
        let now = from_ms(to_ms(SystemTime::now()));
        let t = TokenSet {
            access_token: SecretString::from("at".to_string()),
            refresh_token: Some(SecretString::from("rt".to_string())),
            expires_at: Some(now + Duration::from_secs(60)),
            received_at: now,
        };
        store.save(&t).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = store.load().unwrap().unwrap();
        assert_eq!(back.refresh_token.unwrap().expose_secret(), "rt");
        assert_eq!(back.expires_at, t.expires_at);
        // No temp files left behind.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn corrupt_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "{not json").unwrap();
        let e = FileStateStore::new(path).load().unwrap_err().to_string();
        assert!(e.contains("state file"), "{e}");
    }
}

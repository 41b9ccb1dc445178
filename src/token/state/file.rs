//! The file store: one holder (this process), tokens in `state_file`.
//!
//! Writes are atomic: a private temp file in the same directory, fsync, rename, fsync the
//! directory, mode 0600. A rotated refresh token is committed here *before* it is used, so
//! a crash never loses it. The lease is trivial (the credential's refresher is the only
//! writer) and nobody else commits, so `watch` never fires.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{
    Acquire, BoxFuture, Commit, Lease, Loaded, LocalHolder, StateError, StateStore, Stored,
};
use crate::token::response::TokenSet;

/// On-disk shape. Times are Unix milliseconds. `generation` is absent in files written
/// before it existed (read as 1).
#[derive(Serialize, Deserialize)]
struct Persisted {
    version: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    generation: Option<u64>,
    access_token: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    refresh_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    expires_at_ms: Option<u64>,
    received_at_ms: u64,
    /// The DPoP key the access token is bound to (RFC 7638 thumbprint).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    dpop_jkt: Option<String>,
}

pub struct FileStateStore {
    path: PathBuf,
    holder: LocalHolder,
}

impl FileStateStore {
    pub fn new(path: PathBuf) -> Self {
        FileStateStore {
            path,
            holder: LocalHolder::default(),
        }
    }

    fn error(&self, message: impl std::fmt::Display) -> StateError {
        file_error(&self.path, message)
    }

    /// Write `set` whatever the file held (the write-ahead copy under a shared store).
    pub async fn save(&self, set: Stored) -> Result<(), StateError> {
        let path = self.path.clone();
        let generation = set.generation;
        tokio::task::spawn_blocking(move || save_file(&path, &set))
            .await
            .map_err(|e| self.error(e))??;
        self.holder.committed(generation);
        Ok(())
    }
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> StateError {
    StateError(format!("state file {}: {message}", path.display()))
}

fn read_no_follow(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok(bytes)
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
    fn kind(&self) -> &'static str {
        "file"
    }

    fn load(&self) -> BoxFuture<'_, Result<Loaded, StateError>> {
        Box::pin(async move {
            let path = self.path.clone();
            let loaded = tokio::task::spawn_blocking(move || load_file(&path))
                .await
                .map_err(|e| self.error(e))??;
            self.holder
                .loaded(loaded.as_ref().map_or(0, |s| s.generation));
            Ok(loaded.map_or(Loaded::Empty, Loaded::Tokens))
        })
    }

    fn try_acquire(&self, generation: u64) -> BoxFuture<'_, Result<Acquire, StateError>> {
        Box::pin(async move { Ok(self.holder.acquire(generation)) })
    }

    fn renew(&self, _lease: &Lease) -> BoxFuture<'_, Result<bool, StateError>> {
        Box::pin(async { Ok(true) })
    }

    fn release(&self, _lease: Lease) -> BoxFuture<'_, Result<(), StateError>> {
        Box::pin(async { Ok(()) })
    }

    fn commit(&self, expected: u64, set: Stored) -> BoxFuture<'_, Result<Commit, StateError>> {
        Box::pin(async move {
            if let Some(conflict) = self.holder.conflict(expected) {
                return Ok(conflict);
            }
            let path = self.path.clone();
            let generation = set.generation;
            tokio::task::spawn_blocking(move || save_file(&path, &set))
                .await
                .map_err(|e| self.error(e))??;
            self.holder.committed(generation);
            Ok(Commit::Committed)
        })
    }

    fn clear(&self, _generation: u64) -> BoxFuture<'_, Result<u64, StateError>> {
        Box::pin(async move {
            let path = self.path.clone();
            tokio::task::spawn_blocking(move || clear_file(&path))
                .await
                .map_err(|e| self.error(e))??;
            self.holder.committed(0);
            Ok(0)
        })
    }

    fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.holder.watch()
    }
}

/// The saved tokens, `None` when nothing was saved yet; an unreadable file is an error
/// (never silently replaced: it may hold the only valid refresh token).
fn load_file(path: &Path) -> Result<Option<Stored>, StateError> {
    let bytes = match read_no_follow(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(file_error(
                path,
                "is a symbolic link; token-proxy never follows one",
            ))
        }
        Err(e) => return Err(file_error(path, e)),
    };
    let p: Persisted = serde_json::from_slice(&bytes).map_err(|e| {
        file_error(
            path,
            format!(
                "is not a token-proxy state file ({:?} error at line {})",
                e.classify(),
                e.line()
            ),
        )
    })?;
    if p.version != 1 {
        return Err(file_error(
            path,
            format!("unsupported version {}", p.version),
        ));
    }
    Ok(Some(Stored {
        generation: p.generation.unwrap_or(1),
        tokens: TokenSet {
            access_token: SecretString::from(p.access_token).into(),
            refresh_token: p.refresh_token.map(SecretString::from),
            expires_at: p.expires_at_ms.map(from_ms),
            received_at: from_ms(p.received_at_ms),
            dpop_jkt: p.dpop_jkt,
        },
    }))
}

/// Forget the saved tokens (sign-out).
fn clear_file(path: &Path) -> Result<(), StateError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(file_error(path, e)),
    }
}

/// Durably replace the saved tokens.
fn save_file(path: &Path, stored: &Stored) -> Result<(), StateError> {
    let t = &stored.tokens;
    let p = Persisted {
        version: 1,
        generation: Some(stored.generation),
        access_token: t.access_token.expose_secret().to_string(),
        refresh_token: t
            .refresh_token
            .as_ref()
            .map(|s| s.expose_secret().to_string()),
        expires_at_ms: t.expires_at.map(to_ms),
        received_at_ms: to_ms(t.received_at),
        dpop_jkt: t.dpop_jkt.clone(),
    };
    let json = serde_json::to_vec_pretty(&p).map_err(|e| file_error(path, e))?;
    write_atomic(path, &json).map_err(|e| file_error(path, e))
}

use crate::files::dir_of;

/// Check, at start and in `check`, that the state file's directory is safe and writable:
/// created (0700) when missing; refused when other users could write it (they could plant
/// or swap our files) unless it is sticky and ours; and proven writable by creating and
/// removing a probe file, so an unwritable directory is found before a rotation is lost.
///
/// With `create = false` (`token-proxy check`, which changes nothing) a missing directory
/// is not created; the nearest existing ancestor is checked instead, since that is where
/// the start will create it.
pub fn check_state_dir(path: &Path, create: bool) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let mut dir = dir_of(path);
    if !dir.exists() {
        if create {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| format!("cannot create state directory {}: {e}", dir.display()))?;
        } else {
            while !dir.exists() {
                match dir.parent() {
                    Some(p) if !p.as_os_str().is_empty() => dir = p.to_path_buf(),
                    _ => dir = PathBuf::from("."),
                }
            }
        }
    }
    let shown = dir.display();
    let meta = std::fs::metadata(&dir).map_err(|e| format!("state directory {shown}: {e}"))?;
    if !meta.is_dir() {
        return Err(format!("state directory {shown} is not a directory"));
    }
    let probe = dir.join(format!(".token-proxy-probe.{}", random_suffix()));
    let probe_file = create_private(&probe)
        .map_err(|e| format!("state directory {shown} is not writable: {e}"))?;
    let ours = probe_file.metadata().map(|m| m.uid()).ok();
    drop(probe_file);
    let _ = std::fs::remove_file(&probe);
    let mode = meta.permissions().mode();
    let others_write = mode & 0o022 != 0;
    let sticky_and_ours = mode & 0o1000 != 0 && ours == Some(meta.uid());
    if others_write && !sticky_and_ours {
        return Err(format!(
            "state directory {shown} is writable by other users (mode {:o}): they could replace the tokens; use a directory only this user can write (chmod 700)",
            mode & 0o7777
        ));
    }
    if let Ok(link) = std::fs::symlink_metadata(path) {
        if link.file_type().is_symlink() {
            return Err(format!(
                "state file {} is a symbolic link; token-proxy never follows one",
                path.display()
            ));
        }
    }
    Ok(())
}

fn random_suffix() -> String {
    use rand::Rng;
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

/// A new private file (0600, `O_EXCL`, `O_NOFOLLOW`).
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    crate::files::open_new(path, 0o600)
}

/// Write `bytes` to `path` so that a crash leaves either the old or the new file, never a
/// mix: a private temp file with an unpredictable name, fsync, rename over the target
/// (which replaces a symlink rather than following it), fsync the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = dir_of(path);
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
    let tmp = dir.join(format!(".{file_name}.tmp.{}", random_suffix()));
    let mut f = create_private(&tmp)?;
    let result = (|| {
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
        assert!(load_file(&path).unwrap().is_none());
        let now = from_ms(to_ms(SystemTime::now()));
        let t = TokenSet {
            access_token: SecretString::from("at".to_string()).into(),
            refresh_token: Some(SecretString::from("rt".to_string())),
            expires_at: Some(now + Duration::from_secs(60)),
            received_at: now,
            dpop_jkt: None,
        };
        save_file(
            &path,
            &Stored {
                generation: 3,
                tokens: t.clone(),
            },
        )
        .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = load_file(&path).unwrap().unwrap();
        assert_eq!(back.generation, 3);
        let back = back.tokens;
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
        let e = load_file(&path).unwrap_err().to_string();
        assert!(e.contains("state file"), "{e}");
    }
}

#[cfg(test)]
mod hijack_tests {
    use super::*;

    #[test]
    fn planted_temp_files_and_symlinks_are_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let path = dir.path().join("state.json");
        // What another local user could plant: the old predictable temp name, as a symlink.
        let predictable = dir
            .path()
            .join(format!(".state.json.tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &predictable).unwrap();
        // And the target itself as a symlink to the victim.
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let now = SystemTime::now();
        let t = TokenSet {
            access_token: SecretString::from("at".to_string()).into(),
            refresh_token: Some(SecretString::from("rt".to_string())),
            expires_at: None,
            received_at: now,
            dpop_jkt: None,
        };
        save_file(
            &path,
            &Stored {
                generation: 1,
                tokens: t,
            },
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(!std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        // Loading never follows a symlink either.
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let e = load_file(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
    }
}

//! Files we create that must never be written through someone else's: keys, CA material,
//! token state. `O_EXCL` (a planted file or symlink makes the open fail instead) and
//! `O_NOFOLLOW`, with the mode set at creation, so there is no moment of wider access.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A new file at `path` with `mode`, that did not exist before and is not a symlink.
pub fn open_new(path: &Path, mode: u32) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// The directory `path` lives in (`.` for a bare file name).
pub fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Create `path` (its directory too, 0700, when missing) holding `bytes` with `mode`,
/// durably (file and directory fsynced); never over an existing file.
pub fn create_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = dir_of(path);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let mut f = open_new(path, mode)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::File::open(&dir)?.sync_all()
}

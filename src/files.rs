//! Writing secrets and state to disk so that a crash never leaves a half-written file and a
//! private key is never readable by others, whatever the umask.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A file operation that failed, with the path and what was being done.
#[derive(Debug, thiserror::Error)]
#[error("could not {action} {path}")]
pub struct FileError {
    /// What was being done.
    pub action: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// The OS error.
    pub source: std::io::Error,
}

/// A closure that wraps an I/O error with `action` and `path`.
pub fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FileError {
    let path = path.to_owned();
    move |source| FileError {
        action,
        path,
        source,
    }
}

/// Creates `dir` (and its parents) and sets its mode to `mode` explicitly.
///
/// # Errors
/// [`FileError`] when the directory cannot be created or its mode set.
pub fn create_dir(dir: &Path, mode: u32) -> Result<(), FileError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(io_error("create directory", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .map_err(io_error("set the mode of", dir))
}

/// Creates `dir` with `mode` if it does not exist; an existing directory keeps its mode (it is
/// the user's, as with `--write DIR`).
///
/// # Errors
/// [`FileError`] when the directory cannot be created.
pub fn create_dir_if_missing(dir: &Path, mode: u32) -> Result<(), FileError> {
    if dir.is_dir() {
        return Ok(());
    }
    create_dir(dir, mode)
}

/// Writes `dir/name` through a temporary file in the same directory, created with `mode` (and
/// set to it explicitly, whatever the umask), synced, renamed over the target, and the
/// directory synced: after a crash the file is either the old one or the new one, whole.
///
/// # Errors
/// [`FileError`] for the step that failed; the temporary file is removed.
pub fn write_atomically(
    dir: &Path,
    name: &str,
    contents: &[u8],
    mode: u32,
) -> Result<(), FileError> {
    let target = dir.join(name);
    let mut suffix = [0u8; 8];
    aws_lc_rs::rand::fill(&mut suffix).map_err(|_| FileError {
        action: "pick a temporary name in",
        path: dir.to_owned(),
        source: std::io::Error::other("the system random generator failed"),
    })?;
    let tmp = dir.join(format!(".{name}.{}.tmp", hex::encode(suffix)));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_error("create", &tmp))?;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_error("set the mode of", &tmp))?;
        file.write_all(contents).map_err(io_error("write", &tmp))?;
        file.sync_all().map_err(io_error("sync", &tmp))?;
        fs::rename(&tmp, &target).map_err(io_error("replace", &target))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync directory", dir))
}

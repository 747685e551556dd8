//! Reading a TOML settings file, shared by `server run`, `agent run` and `proxy`: each takes
//! the same keys in its file as its flags, and unknown keys are refused.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a settings file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("could not read the config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for these settings.
    #[error("the config file {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said.
        message: String,
    },
}

/// Reads and parses `path`.
///
/// # Errors
/// [`ConfigFileError::Read`] or [`ConfigFileError::Parse`].
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigFileError::Parse {
        path: path.to_owned(),
        message: e.message().to_owned(),
    })
}

//! One way for `server run`, `agent run` and `proxy` to gather their settings: each component
//! has a *layer* type whose fields are all optional, read from a TOML file and from the command
//! line (flags, and the environment where a flag names a variable). The layers are merged once,
//! flags over environment over file, and the component's `resolve` turns the result into its
//! validated configuration, filling defaults for what no layer set.
//!
//! A layer type is declared with [`settings_layer!`], which derives `serde::Deserialize` (unknown
//! file keys are refused) and `clap::Args` on it and writes its [`Layer::or`] field by field, so
//! no component keeps a hand-written merge.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a settings file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("could not read the config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for these settings (an unknown key, a wrong type, bad syntax).
    #[error("the config file {path} is invalid{at}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where in the file, as ` at line N`, or empty when the parser did not say.
        at: String,
        /// What the TOML parser said, which names the key for an unknown or mistyped one.
        message: String,
    },
}

/// One source of a component's settings, every field optional.
pub trait Layer: DeserializeOwned + Sized {
    /// `self`, with every setting `self` leaves unset taken from `under`.
    #[must_use]
    fn or(self, under: Self) -> Self;

    /// The command line's settings (`self`: flags, and environment variables clap read for
    /// flags not given) over those of the config file at `file`, when there is one.
    ///
    /// # Errors
    /// [`ConfigFileError`] when the file cannot be read or holds an unknown key or a bad value.
    fn over_file(self, file: Option<&Path>) -> Result<Self, ConfigFileError> {
        match file {
            Some(path) => Ok(self.or(read(path)?)),
            None => Ok(self),
        }
    }
}

/// A field of a [`Layer`]: how a set value is told from an unset one.
pub trait Field: Sized {
    /// `self` when it is set, else `under`.
    #[must_use]
    fn or(self, under: Self) -> Self;
}

impl<T> Field for Option<T> {
    fn or(self, under: Self) -> Self {
        self.or(under)
    }
}

/// A list is set when it is not empty; a list on the command line replaces the file's.
impl<T> Field for Vec<T> {
    fn or(self, under: Self) -> Self {
        if self.is_empty() { under } else { self }
    }
}

/// Declares a settings layer: a struct of optional fields (`Option` or `Vec`) that derives
/// `Debug`, `Clone`, `Default`, `serde::Deserialize` with unknown keys refused, and
/// `clap::Args`, with its [`Layer`] implementation. Field attributes (`#[arg(...)]`,
/// `#[serde(...)]`, doc comments that become the flag's help) pass through.
#[macro_export]
macro_rules! settings_layer {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[$field_meta:meta])*
                pub $field:ident : $ty:ty,
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, serde::Deserialize, clap::Args)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $(
                $(#[$field_meta])*
                pub $field: $ty,
            )*
        }

        impl $crate::config_file::Layer for $name {
            fn or(self, under: Self) -> Self {
                Self {
                    $( $field: $crate::config_file::Field::or(self.$field, under.$field), )*
                }
            }
        }
    };
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
        at: e
            .span()
            .map(|span| {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!(" at line {line}")
            })
            .unwrap_or_default(),
        message: e.message().trim_end().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    settings_layer! {
        /// A layer for these tests.
        pub struct TestLayer {
            /// A scalar.
            #[arg(long)]
            pub name: Option<String>,
            /// A list.
            #[arg(long = "item")]
            #[serde(default)]
            pub items: Vec<String>,
        }
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
        file
    }

    #[test]
    fn the_command_line_wins_and_the_file_fills_the_rest() {
        let file = write("name = \"file\"\nitems = [\"a\"]\n");
        let flags = TestLayer {
            name: Some("flag".into()),
            items: vec![],
        };
        let merged = flags.over_file(Some(file.path())).unwrap();
        assert_eq!(merged.name.as_deref(), Some("flag"));
        assert_eq!(merged.items, ["a"]);
        let merged = TestLayer::default().over_file(Some(file.path())).unwrap();
        assert_eq!(merged.name.as_deref(), Some("file"));
    }

    #[test]
    fn an_unknown_key_is_refused_naming_the_key_the_line_and_the_file() {
        let file = write("name = \"x\"\n\nnmae = \"typo\"\n");
        let err = TestLayer::default()
            .over_file(Some(file.path()))
            .unwrap_err();
        let ConfigFileError::Parse { at, message, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(at, " at line 3");
        assert!(message.contains("nmae"), "{message}");
        let text = err.to_string();
        assert!(text.contains(&file.path().display().to_string()), "{text}");
        assert_eq!(text.lines().count(), 1, "{text}");
        // Positive control: the same file with the key spelled right is read.
        let file = write("name = \"x\"\n\nitems = []\n");
        assert!(TestLayer::default().over_file(Some(file.path())).is_ok());
    }
}

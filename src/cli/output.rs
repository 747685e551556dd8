//! The one way the command prints to stdout: text or JSON, each write flushed, and a closed
//! stdout (`mayfly entry list | head -1`) reported as [`Closed`] so that `main` exits quietly
//! instead of panicking the way `println!` does on a broken pipe.

use std::fmt::Display;
use std::io::{ErrorKind, Write};

use clap::ValueEnum;
use serde::Serialize;

use super::table::Table;

/// How to print records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people: aligned tables, RFC 3339 times, untrusted text escaped.
    Text,
    /// For programs: JSON, times in Unix seconds (milliseconds for audit records).
    Json,
}

/// The reader of stdout went away; there is no one left to print for.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
pub struct Closed;

/// Prints to stdout in the format the user chose.
#[derive(Clone, Copy, Debug)]
pub struct Printer {
    format: Format,
}

impl Printer {
    /// A printer for `format`.
    pub fn new(format: Format) -> Self {
        Self { format }
    }

    /// Whether the user asked for JSON.
    pub fn json_wanted(self) -> bool {
        self.format == Format::Json
    }

    /// Writes `text` as it is (the caller escaped what is untrusted), then a newline.
    pub fn line(self, text: impl Display) -> anyhow::Result<()> {
        write_out(format!("{text}\n").as_bytes())
    }

    /// Writes `text` as it is, with no newline added (PEM blocks end with their own).
    pub fn raw(self, text: &str) -> anyhow::Result<()> {
        write_out(text.as_bytes())
    }

    /// Writes `value` as pretty JSON.
    pub fn json(self, value: &impl Serialize) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(value)?;
        self.line(text)
    }

    /// Writes `value` as JSON on one line (one record of a stream).
    pub fn json_line(self, value: &impl Serialize) -> anyhow::Result<()> {
        let text = serde_json::to_string(value)?;
        self.line(text)
    }

    /// Writes `table` (its cells are escaped as it renders).
    pub fn table(self, table: &Table) -> anyhow::Result<()> {
        write_out(table.render().as_bytes())
    }
}

fn write_out(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| {
            if e.kind() == ErrorKind::BrokenPipe {
                anyhow::Error::new(Closed)
            } else {
                anyhow::Error::new(e).context("could not write to stdout")
            }
        })
}

/// Whether `error` is stdout closing under us, which is the reader's choice, not a failure.
pub fn is_closed(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.is::<Closed>()
            || cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == ErrorKind::BrokenPipe)
    })
}

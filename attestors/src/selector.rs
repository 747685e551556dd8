//! Selectors: the facts an attestor establishes about a workload or node, such as
//! `unix:uid:1001`. A registration entry lists selectors; a workload matches the entry when it
//! has every one of them.

use std::fmt;
use std::str::FromStr;

/// The longest selector value, in bytes.
pub const MAX_VALUE_LEN: usize = 1024;

/// Why a selector was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// The text had no `TYPE:KIND:VALUE` shape.
    #[error("'{0}' is not a selector: write TYPE:KIND:VALUE, e.g. unix:uid:1001")]
    Shape(String),
    /// The selector type is not one Mayfly knows.
    #[error("'{0}' has an unknown selector type; known: unix")]
    UnknownType(String),
    /// The kind is not one the type knows.
    #[error(
        "'{0}' has an unknown unix selector; known: uid, gid, user, group, supplementary_gid, path, sha256"
    )]
    UnknownKind(String),
    /// The value does not fit its kind.
    #[error("'{selector}' has a bad value: {expected}")]
    BadValue {
        /// The selector as given.
        selector: String,
        /// What the value must look like.
        expected: &'static str,
    },
}

/// A validated selector, `TYPE:KIND:VALUE`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    text: String,
}

/// The unix workload selector kinds.
const UNIX_KINDS: &[&str] = &[
    "uid",
    "gid",
    "user",
    "group",
    "supplementary_gid",
    "path",
    "sha256",
];

impl Selector {
    /// Parses and validates `TYPE:KIND:VALUE`.
    ///
    /// # Errors
    /// The [`SelectorError`] for the first problem found.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut parts = s.splitn(3, ':');
        let (Some(ty), Some(kind), Some(value)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(SelectorError::Shape(s.to_owned()));
        };
        if ty != "unix" {
            return Err(SelectorError::UnknownType(s.to_owned()));
        }
        if !UNIX_KINDS.contains(&kind) {
            return Err(SelectorError::UnknownKind(s.to_owned()));
        }
        let bad = |expected| SelectorError::BadValue {
            selector: s.to_owned(),
            expected,
        };
        if value.is_empty() || value.len() > MAX_VALUE_LEN {
            return Err(bad("a value of 1 to 1024 bytes"));
        }
        match kind {
            "uid" | "gid" | "supplementary_gid" => {
                if !value.bytes().all(|b| b.is_ascii_digit())
                    || value.parse::<u32>().is_err()
                    || (value.len() > 1 && value.starts_with('0'))
                {
                    return Err(bad(
                        "a decimal number from 0 to 4294967295, no leading zeros",
                    ));
                }
            }
            "user" | "group" => {
                if value
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b':')
                {
                    return Err(bad("a name without spaces, control characters or ':'"));
                }
            }
            "path" => {
                if !value.starts_with('/') || value.bytes().any(|b| b.is_ascii_control()) {
                    return Err(bad("an absolute path such as /usr/bin/python3"));
                }
            }
            "sha256" => {
                if value.len() != 64
                    || !value
                        .bytes()
                        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                {
                    return Err(bad("64 lowercase hexadecimal digits"));
                }
            }
            _ => unreachable!("kind checked against UNIX_KINDS above"),
        }
        Ok(Self { text: s.to_owned() })
    }

    /// Builds a unix selector from a kind and a value, validating both.
    ///
    /// # Errors
    /// As [`Selector::parse`].
    pub fn unix(kind: &str, value: &str) -> Result<Self, SelectorError> {
        Self::parse(&format!("unix:{kind}:{value}"))
    }

    /// The selector as text.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, SelectorError> {
        Self::parse(s)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({})", self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_known_unix_kind() {
        let hash = "a".repeat(64);
        for s in [
            "unix:uid:0".to_owned(),
            "unix:uid:1001".into(),
            "unix:gid:4294967295".into(),
            "unix:user:billing".into(),
            "unix:group:staff".into(),
            "unix:supplementary_gid:27".into(),
            "unix:path:/usr/bin/python3".into(),
            format!("unix:sha256:{hash}"),
        ] {
            assert_eq!(Selector::parse(&s).unwrap().as_str(), s);
        }
    }

    /// An input and a test of the error it must give.
    type Case = (&'static str, fn(&SelectorError) -> bool);

    #[test]
    fn refuses_malformed_selectors() {
        let cases: &[Case] = &[
            ("unix", |e| matches!(e, SelectorError::Shape(_))),
            ("unix:uid", |e| matches!(e, SelectorError::Shape(_))),
            ("k8s:ns:default", |e| {
                matches!(e, SelectorError::UnknownType(_))
            }),
            ("unix:pid:1", |e| matches!(e, SelectorError::UnknownKind(_))),
            ("unix:uid:", |e| matches!(e, SelectorError::BadValue { .. })),
            ("unix:uid:abc", |e| {
                matches!(e, SelectorError::BadValue { .. })
            }),
            ("unix:uid:-1", |e| {
                matches!(e, SelectorError::BadValue { .. })
            }),
            ("unix:uid:01", |e| {
                matches!(e, SelectorError::BadValue { .. })
            }),
            ("unix:uid:4294967296", |e| {
                matches!(e, SelectorError::BadValue { .. })
            }),
            ("unix:user:a b", |e| {
                matches!(e, SelectorError::BadValue { .. })
            }),
            ("unix:path:relative/bin", |e| {
                matches!(e, SelectorError::BadValue { .. })
            }),
            ("unix:sha256:ABC", |e| {
                matches!(e, SelectorError::BadValue { .. })
            }),
        ];
        for (input, is_expected) in cases {
            let err = Selector::parse(input).unwrap_err();
            assert!(is_expected(&err), "{input}: {err:?}");
        }
    }
}

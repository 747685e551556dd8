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
    #[error("'{0}' has an unknown selector type; known: unix, x509pop, sshpop, k8s_psat, aws_iid")]
    UnknownType(String),
    /// The kind is not one the type knows.
    #[error("'{selector}' has an unknown {ty} selector; known: {known}")]
    UnknownKind {
        /// The selector as given.
        selector: String,
        /// Its type.
        ty: &'static str,
        /// The kinds the type knows, comma-separated.
        known: String,
    },
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

/// Whether a selector describes a workload (what the agent reads from the kernel) or a node
/// (what a node attestor proved to the server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectorClass {
    /// Established by a workload attestor on the agent (`unix`).
    Workload,
    /// Established by a node attestor on the server (`x509pop`, `sshpop`, `k8s_psat`,
    /// `aws_iid`); only node entries (node groups) may list these.
    Node,
}

/// A selector type: its name, its class and the kinds it knows.
struct SelectorType {
    name: &'static str,
    class: SelectorClass,
    kinds: &'static [&'static str],
}

/// Every selector type Mayfly knows. The node types' kinds follow SPIRE's node attestors, so
/// an operator's node groups read the same; a value holding ':' (`x509pop:subject:cn:web-1`)
/// is part of the VALUE (`cn:web-1`), as SPIRE writes it.
const TYPES: &[SelectorType] = &[
    SelectorType {
        name: "unix",
        class: SelectorClass::Workload,
        kinds: &[
            "uid",
            "gid",
            "user",
            "group",
            "supplementary_gid",
            "path",
            "sha256",
        ],
    },
    SelectorType {
        name: "x509pop",
        class: SelectorClass::Node,
        kinds: &["subject", "ca", "serialnumber", "san"],
    },
    SelectorType {
        name: "sshpop",
        class: SelectorClass::Node,
        kinds: &["principal"],
    },
    SelectorType {
        name: "k8s_psat",
        class: SelectorClass::Node,
        kinds: &[
            "cluster",
            "agent_ns",
            "agent_sa",
            "agent_pod_name",
            "agent_pod_uid",
            "agent_node_name",
            "agent_node_uid",
        ],
    },
    SelectorType {
        name: "aws_iid",
        class: SelectorClass::Node,
        kinds: &["account_id", "region", "az", "instance", "image"],
    },
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
        let Some(known) = TYPES.iter().find(|t| t.name == ty) else {
            return Err(SelectorError::UnknownType(s.to_owned()));
        };
        if !known.kinds.contains(&kind) {
            return Err(SelectorError::UnknownKind {
                selector: s.to_owned(),
                ty: known.name,
                known: known.kinds.join(", "),
            });
        }
        let bad = |expected| SelectorError::BadValue {
            selector: s.to_owned(),
            expected,
        };
        if value.is_empty() || value.len() > MAX_VALUE_LEN {
            return Err(bad("a value of 1 to 1024 bytes"));
        }
        if known.class == SelectorClass::Node {
            // Node selectors are read from certificates and tokens: any printable text, so
            // that what an attestor proved can be written in an entry as it reads.
            if value.chars().any(char::is_control) {
                return Err(bad("text without control characters"));
            }
            return Ok(Self { text: s.to_owned() });
        }
        check_unix_value(kind, value).map_err(bad)?;
        Ok(Self { text: s.to_owned() })
    }

    /// Builds a node selector `TYPE:KIND:VALUE` from what a node attestor proved.
    ///
    /// # Errors
    /// As [`Selector::parse`]; also [`SelectorError::UnknownType`] for a workload type.
    pub fn node(ty: &str, kind: &str, value: &str) -> Result<Self, SelectorError> {
        let selector = Self::parse(&format!("{ty}:{kind}:{value}"))?;
        if selector.class() != SelectorClass::Node {
            return Err(SelectorError::UnknownType(selector.text));
        }
        Ok(selector)
    }

    /// Whether this selector describes a workload or a node.
    pub fn class(&self) -> SelectorClass {
        let ty = self.text.split(':').next().unwrap_or_default();
        TYPES
            .iter()
            .find(|t| t.name == ty)
            .map_or(SelectorClass::Workload, |t| t.class)
    }

    /// The selector's type, e.g. `unix` or `x509pop`.
    pub fn selector_type(&self) -> &str {
        self.text.split(':').next().unwrap_or_default()
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

/// Checks a unix selector's value for its kind; `Err` says what the value must look like.
fn check_unix_value(kind: &str, value: &str) -> Result<(), &'static str> {
    let ok = match kind {
        "uid" | "gid" | "supplementary_gid" => {
            value.bytes().all(|b| b.is_ascii_digit())
                && value.parse::<u32>().is_ok()
                && !(value.len() > 1 && value.starts_with('0'))
        }
        "user" | "group" => !value
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b':'),
        "path" => value.starts_with('/') && !value.bytes().any(|b| b.is_ascii_control()),
        "sha256" => {
            value.len() == 64
                && value
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        }
        _ => true,
    };
    if ok {
        return Ok(());
    }
    Err(match kind {
        "uid" | "gid" | "supplementary_gid" => {
            "a decimal number from 0 to 4294967295, no leading zeros"
        }
        "user" | "group" => "a name without spaces, control characters or ':'",
        "path" => "an absolute path such as /usr/bin/python3",
        _ => "64 lowercase hexadecimal digits",
    })
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

    #[test]
    fn accepts_node_selectors_as_spire_writes_them() {
        for s in [
            "x509pop:subject:cn:web-1",
            "x509pop:ca:fingerprint:0a1b",
            "x509pop:serialnumber:01ff",
            "x509pop:san:dns:web-1.example.com",
            "sshpop:principal:web-1.example.com",
            "k8s_psat:cluster:prod",
            "k8s_psat:agent_ns:mayfly-system",
            "k8s_psat:agent_sa:mayfly agent",
            "k8s_psat:agent_node_uid:5f2c",
            "aws_iid:account_id:123456789012",
            "aws_iid:instance:id:i-0abc",
            "aws_iid:image:id:ami-0abc",
        ] {
            let selector = Selector::parse(s).unwrap();
            assert_eq!(selector.as_str(), s);
            assert_eq!(selector.class(), SelectorClass::Node, "{s}");
        }
        assert_eq!(
            Selector::parse("unix:uid:1").unwrap().class(),
            SelectorClass::Workload
        );
        assert_eq!(
            Selector::node("x509pop", "subject", "cn:a:b")
                .unwrap()
                .as_str(),
            "x509pop:subject:cn:a:b"
        );
        assert!(Selector::node("unix", "uid", "1").is_err());
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
            ("unix:pid:1", |e| {
                matches!(e, SelectorError::UnknownKind { .. })
            }),
            ("x509pop:issuer:cn:x", |e| {
                matches!(e, SelectorError::UnknownKind { .. })
            }),
            ("sshpop:principal:", |e| {
                matches!(e, SelectorError::BadValue { .. })
            }),
            ("k8s_psat:agent_ns:a\nb", |e| {
                matches!(e, SelectorError::BadValue { .. })
            }),
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

//! The one rule for a DNS name that Mayfly puts in a certificate as a DNS SAN.
//!
//! Entry validation (the admin API) and the SVID builder both call [`check`], so an entry that
//! is stored can always be signed: before they shared it, `127.0.0.1` passed the admin API's
//! rule and failed the builder's on every issuance, forever.
//!
//! The rule is canonical form only (nothing is normalised, so the name typed is the name
//! signed): 1 to 253 bytes of lowercase labels of `[a-z0-9-]`, each 1 to 63 bytes, not starting
//! or ending with `-`, separated by single dots, no trailing dot, no wildcard; not an IP
//! address (v4, v6 or bracketed v6); and a last label that is not a number (all digits, or
//! `0x` hex), which clients would read as an IPv4 address (the WHATWG URL "ends in a number"
//! rule that rustls applies too).

use std::net::IpAddr;

use crate::text::escape_bounded;

/// The longest DNS name, in bytes (RFC 1035, without the trailing dot).
pub const MAX_DNS_NAME_LEN: usize = 253;
/// The longest label, in bytes (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;
/// How much of a refused name an error message repeats (it is escaped: it may hold anything).
const SHOWN_CHARS: usize = 80;

/// Why a DNS name cannot go in a certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsNameError {
    /// The name was empty.
    #[error("a DNS name is empty; give a host name such as api.example.com")]
    Empty,
    /// The name was longer than [`MAX_DNS_NAME_LEN`] bytes.
    #[error("a DNS name is {0} bytes long; the limit is 253")]
    TooLong(usize),
    /// The name is an IP address (or a bracketed IPv6 address).
    #[error(
        "'{0}' is an IP address, not a DNS name: Mayfly certificates carry DNS names only, so register a host name that resolves to it"
    )]
    IpAddress(String),
    /// The last label is a number, which clients read as an IPv4 address.
    #[error(
        "'{0}' ends in a number, which clients read as an IPv4 address; the last label must contain a letter"
    )]
    NumericLastLabel(String),
    /// A label was empty, too long, began or ended with `-`, or held a character outside
    /// `[a-z0-9-]` (uppercase, `_`, `*`, spaces, a trailing dot...).
    #[error(
        "'{0}' is not a DNS name: use lowercase labels of 1 to 63 letters, digits and '-' (not at either end), separated by '.'"
    )]
    BadLabel(String),
}

/// Checks that `name` can be a DNS SAN of an SVID.
///
/// # Errors
/// The [`DnsNameError`] for the first rule `name` breaks.
pub fn check(name: &str) -> Result<(), DnsNameError> {
    if name.is_empty() {
        return Err(DnsNameError::Empty);
    }
    if name.len() > MAX_DNS_NAME_LEN {
        return Err(DnsNameError::TooLong(name.len()));
    }
    let shown = || escape_bounded(name, SHOWN_CHARS).into_owned();
    let unbracketed = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    if unbracketed.parse::<IpAddr>().is_ok() {
        return Err(DnsNameError::IpAddress(shown()));
    }
    let labels_ok = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= MAX_LABEL_LEN
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    });
    if !labels_ok {
        return Err(DnsNameError::BadLabel(shown()));
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    let hex = last
        .strip_prefix("0x")
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    if last.bytes().all(|b| b.is_ascii_digit()) || hex {
        return Err(DnsNameError::NumericLastLabel(shown()));
    }
    // Whatever passes here, the TLS stack must accept as a server name too; the rule above is
    // stricter, so this only guards against the two drifting apart.
    if rustls_pki_types::DnsName::try_from(name).is_err() {
        return Err(DnsNameError::BadLabel(shown()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_pass() {
        for name in ["localhost", "api.example.com", "a-1.b2", "x", "1a.example"] {
            assert_eq!(check(name), Ok(()), "{name}");
        }
        let longest = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(61));
        assert_eq!(longest.len(), MAX_DNS_NAME_LEN);
        assert_eq!(check(&longest), Ok(()));
        assert_eq!(
            check(&format!("{longest}c")),
            Err(DnsNameError::TooLong(254))
        );
    }

    #[test]
    fn ip_literals_are_refused() {
        for name in [
            "127.0.0.1",
            "::1",
            "[::1]",
            "fe80::1",
            "[2001:db8::1]",
            "0.0.0.0",
        ] {
            assert!(
                matches!(check(name), Err(DnsNameError::IpAddress(_))),
                "{name}: {:?}",
                check(name)
            );
        }
    }

    #[test]
    fn numbers_in_the_last_label_are_refused() {
        for name in ["127.1", "example.123", "a.0x7f", "0x7f000001", "1"] {
            assert!(
                matches!(check(name), Err(DnsNameError::NumericLastLabel(_))),
                "{name}: {:?}",
                check(name)
            );
        }
    }

    #[test]
    fn non_canonical_names_are_refused() {
        for name in [
            "Example.com",
            "a..b",
            "a.",
            ".a",
            "-a.b",
            "a-.b",
            "*.example.com",
            "under_score.example",
            "not a name",
            "[::1",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(check(name), Err(DnsNameError::BadLabel(_))),
                "{name}: {:?}",
                check(name)
            );
        }
        assert_eq!(check(""), Err(DnsNameError::Empty));
    }

    #[test]
    fn refused_names_are_shown_escaped() {
        let err = check("a\nb\u{1b}[8m").unwrap_err();
        let text = err.to_string();
        assert!(!text.chars().any(char::is_control), "{text:?}");
        assert!(text.contains("a\\nb\\x1b[8m"), "{text}");
    }
}

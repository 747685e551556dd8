//! The OpenSSH certificate wire format (PROTOCOL.certkeys), read field by field.
//!
//! `ssh-key` 0.6 cannot represent a `valid_before` of 2^64-1, which is what `ssh-keygen -s`
//! writes for a certificate valid "forever" (its default), so sshpop reads the certificate
//! itself and uses `ssh-key` for the keys and signatures inside. Reading the bytes directly also
//! means the CA's signature is checked over exactly the bytes received, not a re-encoding.

use ssh_key::public::KeyData;
use ssh_key::{PublicKey, Signature};

/// The certificate type of a host certificate (a user certificate is 1).
pub const HOST_CERT: u32 = 2;

/// Why bytes are not an OpenSSH certificate sshpop can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The bytes end inside a field, or a length runs past them.
    #[error("it ends inside its {0} field")]
    Truncated(&'static str),
    /// Bytes follow the last field.
    #[error("bytes follow its signature")]
    Trailing,
    /// The certificate's key type is not one sshpop verifies.
    #[error("its type is not one sshpop reads (Ed25519, ECDSA P-256/P-384 or RSA certificates)")]
    UnsupportedType,
    /// A field holds what its kind cannot (a principal that is not UTF-8, a key that does not
    /// parse).
    #[error("its {field} field is invalid: {reason}")]
    Invalid {
        /// The field's name in PROTOCOL.certkeys.
        field: &'static str,
        /// What was wrong.
        reason: String,
    },
}

/// A certificate's fields, as sshpop uses them.
#[derive(Debug, Clone)]
pub struct SshCertificate {
    /// The certified public key.
    pub key: KeyData,
    /// 1 for a user certificate, 2 for a host certificate.
    pub cert_type: u32,
    /// The principals (host names, for a host certificate).
    pub principals: Vec<String>,
    /// Valid from this Unix time (inclusive).
    pub valid_after: u64,
    /// Valid until this Unix time (exclusive); `u64::MAX` for "forever".
    pub valid_before: u64,
    /// Whether any critical option is set.
    pub has_critical_options: bool,
    /// The CA's public key.
    pub signature_key: KeyData,
    /// The CA's signature over [`SshCertificate::signed`].
    pub signature: Signature,
    /// How many leading bytes of the encoding the CA signed: every field but the signature.
    signed_len: usize,
}

/// A reader of SSH wire fields over a byte slice.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        let end = self.at.checked_add(n).ok_or(WireError::Truncated(field))?;
        let taken = self
            .bytes
            .get(self.at..end)
            .ok_or(WireError::Truncated(field))?;
        self.at = end;
        Ok(taken)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        let b = self.take(8, field)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(b);
        Ok(u64::from_be_bytes(array))
    }

    /// A length-prefixed string, its content only.
    fn string(&mut self, field: &'static str) -> Result<&'a [u8], WireError> {
        let len = self.u32(field)?;
        self.take(
            usize::try_from(len).map_err(|_| WireError::Truncated(field))?,
            field,
        )
    }

    /// A length-prefixed string, with its length prefix.
    fn raw_string(&mut self, field: &'static str) -> Result<&'a [u8], WireError> {
        let start = self.at;
        self.string(field)?;
        Ok(&self.bytes[start..self.at])
    }
}

/// The plain key type of a certificate type, and how many strings its key takes.
fn key_type(cert_type: &[u8]) -> Option<(&'static str, usize)> {
    Some(match cert_type {
        b"ssh-ed25519-cert-v01@openssh.com" => ("ssh-ed25519", 1),
        b"ecdsa-sha2-nistp256-cert-v01@openssh.com" => ("ecdsa-sha2-nistp256", 2),
        b"ecdsa-sha2-nistp384-cert-v01@openssh.com" => ("ecdsa-sha2-nistp384", 2),
        b"ssh-rsa-cert-v01@openssh.com" => ("ssh-rsa", 2),
        _ => return None,
    })
}

/// An SSH string of `bytes`: its length, then its bytes.
fn ssh_string(bytes: &[u8]) -> Vec<u8> {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(4 + bytes.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

fn invalid(field: &'static str, reason: impl ToString) -> WireError {
    WireError::Invalid {
        field,
        reason: reason.to_string(),
    }
}

impl SshCertificate {
    /// Reads a certificate from its whole wire encoding.
    ///
    /// # Errors
    /// [`WireError`] for the first field that cannot be read.
    pub fn parse(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader { bytes, at: 0 };
        let (plain, fields) = key_type(r.string("type")?).ok_or(WireError::UnsupportedType)?;
        r.string("nonce")?;
        // The key's fields follow inline; with the plain type's name before them they are
        // the key's own wire encoding.
        let mut key_blob = ssh_string(plain.as_bytes());
        for _ in 0..fields {
            key_blob.extend_from_slice(r.raw_string("public key")?);
        }
        let key = PublicKey::from_bytes(&key_blob)
            .map_err(|e| invalid("public key", e))?
            .key_data()
            .clone();
        r.u64("serial")?;
        let cert_type = r.u32("type")?;
        r.string("key id")?;
        let mut list = Reader {
            bytes: r.string("valid principals")?,
            at: 0,
        };
        let mut principals = Vec::new();
        while list.at < list.bytes.len() {
            let name = list.string("valid principals")?;
            let name = std::str::from_utf8(name)
                .map_err(|_| invalid("valid principals", "a principal is not UTF-8"))?;
            principals.push(name.to_owned());
        }
        let valid_after = r.u64("valid after")?;
        let valid_before = r.u64("valid before")?;
        let has_critical_options = !r.string("critical options")?.is_empty();
        r.string("extensions")?;
        r.string("reserved")?;
        let signature_key = PublicKey::from_bytes(r.string("signature key")?)
            .map_err(|e| invalid("signature key", e))?
            .key_data()
            .clone();
        let signed_len = r.at;
        let signature = parse_signature(r.string("signature")?)
            .ok_or_else(|| invalid("signature", "not an SSH signature"))?;
        if r.at != bytes.len() {
            return Err(WireError::Trailing);
        }
        Ok(Self {
            key,
            cert_type,
            principals,
            valid_after,
            valid_before,
            has_critical_options,
            signature_key,
            signature,
            signed_len,
        })
    }

    /// The bytes the CA signed, out of the whole encoding `bytes` this was parsed from.
    pub fn signed<'a>(&self, bytes: &'a [u8]) -> &'a [u8] {
        &bytes[..self.signed_len.min(bytes.len())]
    }
}

/// Reads an SSH signature (`string algorithm, string blob`), refusing trailing bytes.
pub fn parse_signature(bytes: &[u8]) -> Option<Signature> {
    let signature = Signature::try_from(bytes).ok()?;
    // Re-encoding gives back exactly the input only when nothing trailed the blob.
    (Vec::<u8>::try_from(signature.clone()).ok()?.as_slice() == bytes).then_some(signature)
}

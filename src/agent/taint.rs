//! The agent's reaction to a tainted CA (issue 10, `mayfly ca taint ID`): every SVID it holds
//! whose chain leads to a tainted CA is re-issued in the same sync round, its own SVID included.
//!
//! The server names tainted CAs by the SHA-256 of their certificate
//! (`tainted_ca_fingerprints` of the node API's `ListEntriesResponse`). An SVID is chained to
//! one when its chain holds that certificate (an intermediate under an upstream CA), or when
//! its leaf names that CA's key as its issuer (authority key identifier = the CA's subject key
//! identifier) and the CA is in the bundle, where a tainted CA stays until it is revoked.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer as _;

use super::state::CachedSvid;

fn sha256(der: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)
        .as_ref()
        .to_vec()
}

/// A certificate's key identifier extension: its subject key identifier (`subject`) or the
/// key identifier of its authority key identifier.
fn key_id(der: &[u8], subject: bool) -> Option<Vec<u8>> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    cert.iter_extensions()
        .find_map(|e| match (e.parsed_extension(), subject) {
            (ParsedExtension::SubjectKeyIdentifier(k), true) => Some(k.0.to_vec()),
            (ParsedExtension::AuthorityKeyIdentifier(a), false) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
}

/// The tainted CAs as an agent can recognise them.
struct Tainted {
    fingerprints: Vec<Vec<u8>>,
    /// Subject key identifiers of the tainted CAs found in the bundle.
    key_ids: Vec<Vec<u8>>,
}

impl Tainted {
    fn new(fingerprints: &[Vec<u8>], bundle: &[Vec<u8>]) -> Self {
        let key_ids = bundle
            .iter()
            .filter(|ca| fingerprints.contains(&sha256(ca)))
            .filter_map(|ca| key_id(ca, true))
            .collect();
        Self {
            fingerprints: fingerprints.to_vec(),
            key_ids,
        }
    }

    /// Whether `chain` (leaf first) leads to a tainted CA.
    fn taints(&self, chain: &[Vec<u8>]) -> bool {
        chain.iter().any(|c| self.fingerprints.contains(&sha256(c)))
            || chain
                .first()
                .and_then(|leaf| key_id(leaf, false))
                .is_some_and(|aki| self.key_ids.contains(&aki))
    }
}

/// Marks every cached SVID chained to a CA of `fingerprints` as due for rotation now, and
/// returns whether the agent's own SVID (`agent_chain`) is chained to one too.
pub(crate) fn mark_due(
    fingerprints: &[Vec<u8>],
    bundle: &[Vec<u8>],
    svids: &HashMap<String, Arc<CachedSvid>>,
    rotate_at: &mut HashMap<String, SystemTime>,
    agent_chain: &[Vec<u8>],
) -> bool {
    if fingerprints.is_empty() {
        return false;
    }
    let tainted = Tainted::new(fingerprints, bundle);
    for (id, svid) in svids {
        if tainted.taints(&svid.chain) && rotate_at.get(id) != Some(&SystemTime::UNIX_EPOCH) {
            tracing::info!(entry = %id, serial = %svid.serial.to_hex(), "re-issuing an SVID signed by a tainted CA");
            rotate_at.insert(id.clone(), SystemTime::UNIX_EPOCH);
        }
    }
    tainted.taints(agent_chain)
}

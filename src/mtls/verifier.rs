//! The peer verifiers of both sides: the five steps listed in the [`super`] module's
//! documentation, then rustls' own check of the handshake signature.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DistinguishedName};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::VerifiedPeer;
use super::policy::{PeerPolicy, Refusal};
use super::source::{SvidSource, TrustSet};
use crate::id::ScopedId;
use crate::svid::{self, MAX_CHAIN_LEN, MAX_LEAF_LEN, Serial, SvidError, Usage};

/// The three signature methods of rustls' `ServerCertVerifier` and `ClientCertVerifier` for
/// Mayfly's configs, which are TLS 1.3 only: a TLS 1.2 signature never reaches a verifier and is
/// refused, a TLS 1.3 one is checked with the provider's algorithms. The argument is the path
/// below `self` of the verifier's `Arc<CryptoProvider>`, as in `tls13_only_signatures!(provider)`.
macro_rules! tls13_only_signatures {
    ($($provider:tt)+) => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &rustls_pki_types::CertificateDer<'_>,
            _dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls12NotOffered,
            ))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.$($provider)+.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.$($provider)+
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}
pub(crate) use tls13_only_signatures;

/// Why a peer failed the handshake.
///
/// Its `Debug` form is its message: rustls shows a verifier's error through `Debug`, so that is
/// what a log line of a refused handshake reads.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The chain broke an X509-SVID rule or did not validate (steps 1–4).
    #[error("the peer's X509-SVID was refused: {0}")]
    Svid(#[from] SvidError),
    /// The leaf's extendedKeyUsage did not allow its role in this handshake (step 4).
    #[error(
        "the peer's X509-SVID was refused: its extended key usage lacks {0}, which its role in this handshake requires"
    )]
    ExtendedKeyUsage(&'static str),
    /// The peer is authentic but its policy refused it (step 5).
    #[error("the peer was refused by policy: {0}")]
    Policy(#[from] Refusal),
}

impl fmt::Debug for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<PeerError> for rustls::Error {
    fn from(e: PeerError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
    }
}

/// What a leaf says, as far as it can be read without a trust anchor: its one SPIFFE ID and
/// scopes (step 1), and the outcome of the X509-SVID leaf rules with its serial and notAfter
/// (step 3). A pure function of the leaf's bytes, so it may be cached by them; the path and
/// time checks (step 4) and the policy (step 5) never are.
#[derive(Debug, Clone)]
pub(crate) struct LeafFacts {
    id: crate::id::SpiffeId,
    rules: Result<(ScopedId, Serial, SystemTime), SvidError>,
}

impl LeafFacts {
    /// Reads the leaf: step 1 fails here, step 3's outcome is kept for its turn.
    pub(crate) fn read(end_entity: &CertificateDer<'_>) -> Result<Self, SvidError> {
        let leaf = svid::parse_leaf(end_entity)?;
        let id = svid::leaf_spiffe_id(&leaf)?;
        let rules = svid::check_leaf_constraints(&leaf).and_then(|()| {
            let (serial, not_after) = svid::serial_and_not_after(&leaf)?;
            let scoped = ScopedId::from_spiffe_id(&id).map_err(SvidError::BadScopes)?;
            Ok((scoped, serial, not_after))
        });
        Ok(Self { id, rules })
    }
}

/// Leaf facts by leaf bytes. Clients present one SVID on many connections during its
/// lifetime, so most handshakes skip re-parsing the leaf.
///
/// Task SVIDs are the opposite case: one task, one connection, a new leaf every handshake. So a
/// leaf is remembered only when it comes back: its first sighting keeps 8 bytes (a keyed hash
/// of it), the second its facts. A stream of distinct leaves then never fills the map with
/// copies that are never read again and only push the crypto's working set out of the CPU's
/// caches (measured: 1.5–2 µs of server CPU per handshake). A hash collision only remembers a
/// leaf one sighting early: the map itself is keyed by the whole leaf. Both sets are bounded:
/// when full they start over.
#[derive(Default)]
pub(crate) struct LeafCache(std::sync::Mutex<Leaves>);

#[derive(Default)]
struct Leaves {
    facts: std::collections::HashMap<Box<[u8]>, Arc<LeafFacts>>,
    seen_once: std::collections::HashSet<u64>,
    hasher: std::hash::RandomState,
}

/// How many leaves a verifier remembers, and how many first sightings.
const LEAF_CACHE_ENTRIES: usize = 1024;
const LEAF_SIGHTINGS: usize = 4 * LEAF_CACHE_ENTRIES;

impl LeafCache {
    fn facts(&self, end_entity: &CertificateDer<'_>) -> Result<Arc<LeafFacts>, SvidError> {
        use std::hash::BuildHasher as _;
        if end_entity.len() > MAX_LEAF_LEN {
            return Err(SvidError::LeafTooLarge(end_entity.len()));
        }
        let leaves = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(facts) = leaves.facts.get(end_entity.as_ref()) {
            return Ok(facts.clone());
        }
        let sighting = leaves.hasher.hash_one(end_entity.as_ref());
        drop(leaves);
        // Leaves that do not parse are not remembered: they cost a parse each time, and
        // cannot push good entries out.
        let facts = Arc::new(LeafFacts::read(end_entity)?);
        let mut leaves = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if leaves.seen_once.remove(&sighting) {
            if leaves.facts.len() >= LEAF_CACHE_ENTRIES {
                leaves.facts.clear();
            }
            leaves
                .facts
                .insert(end_entity.as_ref().into(), facts.clone());
        } else {
            if leaves.seen_once.len() >= LEAF_SIGHTINGS {
                leaves.seen_once.clear();
            }
            leaves.seen_once.insert(sighting);
        }
        Ok(facts)
    }
}

/// Runs the five steps (see the module documentation) over one presented chain.
#[allow(clippy::too_many_arguments)]
pub(crate) fn verify_peer(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    trust: &TrustSet,
    policy: &PeerPolicy,
    usage: Usage,
    provider: &CryptoProvider,
    now: UnixTime,
    cache: Option<&LeafCache>,
) -> Result<VerifiedPeer, PeerError> {
    // 1. Parse the leaf, bounded.
    if intermediates.len() >= MAX_CHAIN_LEN {
        return Err(SvidError::ChainTooLong(intermediates.len() + 1).into());
    }
    let facts = match cache {
        Some(cache) => cache.facts(end_entity)?,
        None => Arc::new(LeafFacts::read(end_entity)?),
    };

    // 2. The one SPIFFE ID, and the roots of its trust domain only.
    let td = facts.id.trust_domain_name();
    let roots = trust
        .roots(td)
        .ok_or_else(|| SvidError::UnknownTrustDomain(td.to_owned()))?;
    if roots.anchors.is_empty() {
        return Err(SvidError::NoUsableRoot(td.to_owned()).into());
    }

    // 3. The X509-SVID leaf rules.
    let (id, serial, not_after) = facts.rules.clone()?;

    // 4. The path, with webpki, at the handshake's time.
    let end_entity =
        webpki::EndEntityCert::try_from(end_entity).map_err(|e| SvidError::Malformed {
            reason: "webpki cannot read it".to_owned(),
            source: Some(crate::svid::Cause::new(e)),
        })?;
    let (eku, eku_name) = match usage {
        Usage::Client => (webpki::KeyUsage::client_auth(), "clientAuth"),
        Usage::Server => (webpki::KeyUsage::server_auth(), "serverAuth"),
    };
    end_entity
        .verify_for_usage(
            provider.signature_verification_algorithms.all,
            &roots.anchors,
            intermediates,
            now,
            eku,
            None,
            None,
        )
        .map_err(|e| match e {
            #[allow(deprecated)]
            webpki::Error::RequiredEkuNotFound | webpki::Error::RequiredEkuNotFoundContext(_) => {
                PeerError::ExtendedKeyUsage(eku_name)
            }
            other => svid::map_webpki_error(&other).into(),
        })?;

    // 5. Authorize: identity, then scopes.
    policy.authorize(&id)?;
    Ok(VerifiedPeer {
        id,
        serial,
        not_after,
    })
}

/// Reads the identity of a leaf that already verified (see [`super::peer_of`]).
pub(crate) fn describe_leaf(der: &CertificateDer<'_>) -> Result<VerifiedPeer, SvidError> {
    let leaf = svid::parse_leaf(der)?;
    let id = svid::leaf_spiffe_id(&leaf)?;
    let id = ScopedId::from_spiffe_id(&id).map_err(SvidError::BadScopes)?;
    let (serial, not_after) = svid::serial_and_not_after(&leaf)?;
    Ok(VerifiedPeer {
        id,
        serial,
        not_after,
    })
}

/// The state both verifiers share.
struct PeerVerifier {
    source: SvidSource,
    policy: PeerPolicy,
    provider: Arc<CryptoProvider>,
    leaves: LeafCache,
}

impl PeerVerifier {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        usage: Usage,
        now: UnixTime,
    ) -> Result<VerifiedPeer, rustls::Error> {
        let trust = self.source.trust();
        verify_peer(
            end_entity,
            intermediates,
            &trust,
            &self.policy,
            usage,
            &self.provider,
            now,
            Some(&self.leaves),
        )
        .map_err(|e| {
            tracing::info!(error = %crate::wire::error_chain(&e), "mTLS peer refused");
            e.into()
        })
    }
}

/// Whether a server requires its clients to present an SVID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientAuth {
    /// A client without a certificate fails the handshake (services, the proxy).
    Required,
    /// A client may present no certificate; one it presents is verified all the same, and
    /// [`super::peer_of`] then answers `None` for it. Each request decides whether it needs a
    /// verified peer (the node API, where an agent attests before it has an SVID).
    Optional,
}

/// The server side: a client certificate is verified against the policy, and required or
/// optional as configured.
pub(crate) struct SpiffeClientVerifier {
    inner: PeerVerifier,
    auth: ClientAuth,
}

impl SpiffeClientVerifier {
    pub(crate) fn new(source: SvidSource, policy: PeerPolicy, auth: ClientAuth) -> Self {
        let provider = source.provider();
        Self {
            inner: PeerVerifier {
                source,
                policy,
                provider,
                leaves: LeafCache::default(),
            },
            auth,
        }
    }
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SpiffeClientVerifier({:?}, {:?})",
            self.auth, self.inner.policy
        )
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.auth == ClientAuth::Required
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify(end_entity, intermediates, Usage::Client, now)?;
        Ok(ClientCertVerified::assertion())
    }

    tls13_only_signatures!(inner.provider);
}

/// The client side: the server's SVID is verified against the expected policy; the server
/// name the connection was opened with is ignored (no DNS name matching).
pub(crate) struct SpiffeServerVerifier(PeerVerifier);

impl SpiffeServerVerifier {
    pub(crate) fn new(source: SvidSource, policy: PeerPolicy) -> Self {
        let provider = source.provider();
        Self(PeerVerifier {
            source,
            policy,
            provider,
            leaves: LeafCache::default(),
        })
    }
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeServerVerifier({:?})", self.0.policy)
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .verify(end_entity, intermediates, Usage::Server, now)?;
        Ok(ServerCertVerified::assertion())
    }

    tls13_only_signatures!(0.provider);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed leaf with the SPIFFE ID `spiffe://cache.test/<name>`: the cache only reads
    /// leaves, it never checks their chain.
    fn leaf(name: &str) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(format!("spiffe://cache.test/{name}")).unwrap(),
        )];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn remembered(cache: &LeafCache) -> usize {
        cache.0.lock().unwrap().facts.len()
    }

    #[test]
    fn a_leaf_is_remembered_when_it_comes_back_and_distinct_leaves_are_not_kept() {
        let cache = LeafCache::default();
        let reused = leaf("reused");
        let first = cache.facts(&reused).unwrap();
        assert_eq!(remembered(&cache), 0, "a first sighting keeps no facts");
        let second = cache.facts(&reused).unwrap();
        assert_eq!(remembered(&cache), 1, "the second sighting keeps them");
        assert!(!Arc::ptr_eq(&first, &second));
        let third = cache.facts(&reused).unwrap();
        assert!(
            Arc::ptr_eq(&second, &third),
            "the third is served from the cache"
        );
        assert_eq!(third.id, first.id);

        for i in 0..40 {
            cache.facts(&leaf(&format!("task-{i}"))).unwrap();
        }
        assert_eq!(remembered(&cache), 1, "leaves seen once are not kept");
        assert!(Arc::ptr_eq(&cache.facts(&reused).unwrap(), &second));
    }

    #[test]
    fn leaves_that_do_not_parse_are_neither_counted_nor_kept() {
        let cache = LeafCache::default();
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        for _ in 0..3 {
            assert!(cache.facts(&junk).is_err());
        }
        assert_eq!(remembered(&cache), 0);
        assert!(cache.0.lock().unwrap().seen_once.is_empty());
    }
}

//! The live source of a service's own SVID and of the trust bundles it checks peers against.
//!
//! [`SvidSource::spawn`] follows the agent's Workload API: one background task reads the
//! `FetchX509SVID` stream (the service's SVID, its trust domain's bundle and any federated
//! bundles) and the `FetchX509Bundles` stream, and swaps what it holds on every message, so
//! configs built from the source rotate certificates and trust without a restart. When the
//! agent goes away the task reconnects with capped, jittered exponential backoff and keeps
//! serving what it last received (an expired SVID then fails handshakes on its own); when the
//! agent says the workload lost its identity (PermissionDenied), the SVID is withdrawn at once.
//!
//! Bundles: every message carries the full current set, so each one replaces the whole set.
//! When the agent serves `FetchX509Bundles`, that stream alone sets the bundles; the bundles in
//! `FetchX509SVID` messages are used only when an agent does not implement it. One stream as the
//! authority keeps a message of the other stream from bringing back a CA just removed.
//!
//! [`SvidSource::from_parts`] builds a source from an SVID and bundles given in code (tests,
//! services that get their SVID another way); [`SvidSource::set_svid`] and
//! [`SvidSource::set_bundles`] update any source the same way a stream message does.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{SignatureScheme, client::ResolvesClientCert};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, TrustAnchor};
use tokio::sync::watch;
use tonic::Code;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use super::MtlsError;
use crate::id::{ScopedId, TrustDomain};
use crate::proto::workload::{
    X509BundlesRequest, X509BundlesResponse, X509svidRequest, X509svidResponse,
};
use crate::svid::{self, Bundles};
use crate::workload_client;

/// The first wait before reconnecting to the agent.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The roots of one trust domain, with their trust anchors extracted once per update rather
/// than once per handshake.
pub(crate) struct DomainRoots {
    certs: Vec<CertificateDer<'static>>,
    pub(crate) anchors: Vec<TrustAnchor<'static>>,
}

/// Every trust domain's roots at one moment, with their trust anchors extracted once; replaced
/// whole, never edited. A source holds one; [`super::verify_chain`] takes one directly.
#[derive(Default)]
pub struct TrustSet {
    domains: HashMap<String, DomainRoots>,
}

impl std::fmt::Debug for TrustSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.domains.keys()).finish()
    }
}

impl TrustSet {
    /// The roots of every trust domain in `bundles`.
    ///
    /// # Errors
    /// [`MtlsError::BadBundle`] when a certificate is not a usable root.
    pub fn new(bundles: Bundles) -> Result<Self, MtlsError> {
        Self::build(bundles, true)
    }

    /// Extracts the anchors of `bundles`. Strict: a certificate that is not a usable root is an
    /// error. Lenient (the stream): it is skipped and logged, so one bad certificate cannot
    /// block an update that removes a CA.
    fn build(bundles: Bundles, strict: bool) -> Result<Self, MtlsError> {
        let mut domains = HashMap::with_capacity(bundles.len());
        for (td, certs) in bundles {
            let mut anchors = Vec::with_capacity(certs.len());
            for cert in &certs {
                match webpki::anchor_from_trusted_cert(cert) {
                    Ok(anchor) => anchors.push(anchor.to_owned()),
                    Err(e) if strict => {
                        return Err(MtlsError::BadBundle {
                            trust_domain: td.to_string(),
                            source: e,
                        });
                    }
                    Err(e) => {
                        tracing::warn!(trust_domain = %td, error = %crate::wire::error_chain(&e), "skipping a bundle certificate that is not a usable root");
                    }
                }
            }
            domains.insert(td.as_str().to_owned(), DomainRoots { certs, anchors });
        }
        Ok(Self { domains })
    }

    /// The roots of trust domain `name`, if its bundle is known.
    pub(crate) fn roots(&self, name: &str) -> Option<&DomainRoots> {
        self.domains.get(name)
    }

    /// The certificates of trust domain `td`'s bundle, if it is known.
    fn certs(&self, td: &TrustDomain) -> Option<&[CertificateDer<'static>]> {
        self.domains
            .get(td.as_str())
            .map(|roots| roots.certs.as_slice())
    }

    fn to_bundles(&self) -> Bundles {
        self.domains
            .iter()
            .filter_map(|(name, roots)| Some((TrustDomain::new(name).ok()?, roots.certs.clone())))
            .collect()
    }
}

/// The service's own SVID, ready for rustls.
struct LocalSvid {
    certified: Arc<CertifiedKey>,
    id: ScopedId,
}

/// What a source holds; shared by the source's handles, its configs and its task.
struct State {
    provider: Arc<CryptoProvider>,
    svid: RwLock<Option<Arc<LocalSvid>>>,
    trust: RwLock<Arc<TrustSet>>,
    /// Counts updates; receivers wake on each.
    changes: watch::Sender<u64>,
    last_error: Mutex<Option<String>>,
    /// The SVID to use when the workload has several; `None` for the first (the default).
    wanted: Option<crate::id::SpiffeId>,
}

impl State {
    fn new(provider: Arc<CryptoProvider>) -> Self {
        Self {
            provider,
            svid: RwLock::new(None),
            trust: RwLock::new(Arc::new(TrustSet::default())),
            changes: watch::Sender::new(0),
            last_error: Mutex::new(None),
            wanted: None,
        }
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn local_svid(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key_pkcs8: &[u8],
    ) -> Result<LocalSvid, MtlsError> {
        fn bad<E: std::error::Error + Send + Sync + 'static>(
            reason: &'static str,
        ) -> impl FnOnce(E) -> MtlsError {
            move |e| MtlsError::BadSvid {
                reason,
                source: Some(Box::new(e)),
            }
        }
        let leaf = chain.first().ok_or(MtlsError::BadSvid {
            reason: "its chain is empty",
            source: None,
        })?;
        let (_, cert) = X509Certificate::from_der(leaf.as_ref())
            .map_err(bad("its leaf does not parse as a certificate"))?;
        let id =
            svid::leaf_spiffe_id(&cert).map_err(bad("its leaf carries no usable SPIFFE ID"))?;
        let id = ScopedId::from_spiffe_id(&id)
            .map_err(bad("its SPIFFE ID carries a malformed scope list"))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.to_vec()));
        let certified = CertifiedKey::from_der(chain, key, &self.provider)
            .map_err(bad("the key does not fit the leaf"))?;
        Ok(LocalSvid {
            certified: Arc::new(certified),
            id,
        })
    }

    fn set_svid(&self, svid: Option<LocalSvid>) {
        *self.svid.write().unwrap_or_else(|e| e.into_inner()) = svid.map(Arc::new);
        self.changed();
    }

    fn set_trust(&self, trust: TrustSet) {
        *self.trust.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(trust);
        self.changed();
    }

    fn record_error(&self, error: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    /// Applies a `FetchX509SVID` message: the first (default) SVID, and the bundles when the
    /// bundles stream is not the authority.
    fn apply_svid_message(&self, message: X509svidResponse, take_bundles: bool) {
        let wanted = self.wanted.as_ref().map(crate::id::SpiffeId::as_str);
        let Some(first) = message
            .svids
            .into_iter()
            .find(|svid| wanted.is_none_or(|w| svid.spiffe_id == w))
        else {
            tracing::warn!(wanted = ?wanted, "the agent's SVID update holds no SVID for this service; withdrawing ours");
            self.set_svid(None);
            return;
        };
        let chain = to_certs(&first.x509_svid);
        match self.local_svid(chain, &first.x509_svid_key) {
            Ok(local) => {
                tracing::info!(spiffe_id = %local.id, "SVID updated from the Workload API");
                self.set_svid(Some(local));
            }
            Err(e) => {
                tracing::warn!(error = %crate::wire::error_chain(&e), "ignoring an unusable SVID from the Workload API");
                self.record_error(e.to_string());
            }
        }
        if take_bundles {
            let mut bundles = wire_bundles(message.federated_bundles);
            match crate::id::SpiffeId::parse(&first.spiffe_id) {
                Ok(id) => {
                    bundles.insert(id.trust_domain(), to_certs(&first.bundle));
                }
                Err(e) => {
                    tracing::warn!(error = %crate::wire::error_chain(&e), "the agent's SVID has an unusable SPIFFE ID")
                }
            }
            self.apply_bundles(bundles);
        }
    }

    fn apply_bundles(&self, bundles: Bundles) {
        match TrustSet::build(bundles, false) {
            Ok(trust) => {
                tracing::debug!(
                    trust_domains = trust.domains.len(),
                    "trust bundles updated from the Workload API"
                );
                self.set_trust(trust);
            }
            Err(e) => self.record_error(crate::wire::error_chain(&e)),
        }
    }
}

fn to_certs(der: &[u8]) -> Vec<CertificateDer<'static>> {
    workload_client::split_der(der)
        .into_iter()
        .map(CertificateDer::from)
        .collect()
}

/// Bundles keyed `spiffe://<td>` (or a bare name) on the wire; unusable keys are skipped.
fn wire_bundles(map: HashMap<String, Vec<u8>>) -> Bundles {
    map.into_iter()
        .filter_map(|(key, der)| match key.parse::<TrustDomain>() {
            Ok(td) => Some((td, to_certs(&der))),
            Err(e) => {
                tracing::warn!(key = %key, error = %crate::wire::error_chain(&e), "skipping a bundle with an unusable trust domain");
                None
            }
        })
        .collect()
}

/// Aborts the background task when the last handle of its source is dropped.
struct TaskGuard(tokio::task::AbortHandle);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A service's SVID and trust bundles, kept current; cheap to clone (clones share one state).
///
/// Configs built from a source ([`super::server_config`], [`super::client_config`]) read it at
/// every handshake, and keep it — and its background task — alive.
#[derive(Clone)]
pub struct SvidSource {
    state: Arc<State>,
    _task: Option<Arc<TaskGuard>>,
}

impl std::fmt::Debug for SvidSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvidSource")
            .field("svid", &self.svid_id())
            .field("live", &self._task.is_some())
            .finish_non_exhaustive()
    }
}

impl SvidSource {
    /// A source holding `chain` (leaf first) with its PKCS#8 `key_pkcs8`, trusting `bundles`;
    /// it changes only through [`SvidSource::set_svid`] and [`SvidSource::set_bundles`].
    ///
    /// # Errors
    /// [`MtlsError::BadSvid`] when the leaf has no usable SPIFFE ID or the key does not fit it;
    /// [`MtlsError::BadBundle`] when a bundle certificate is not a usable root.
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key_pkcs8: &[u8],
        bundles: Bundles,
    ) -> Result<Self, MtlsError> {
        let state = State::new(super::provider());
        let svid = state.local_svid(chain, key_pkcs8)?;
        let trust = TrustSet::build(bundles, true)?;
        state.set_svid(Some(svid));
        state.set_trust(trust);
        Ok(Self {
            state: Arc::new(state),
            _task: None,
        })
    }

    /// A source trusting `bundles` and holding no SVID yet: configs built from it present no
    /// certificate until [`SvidSource::set_svid`] gives it one. For a client that must verify
    /// its server before it has an identity of its own (an agent attesting).
    ///
    /// # Errors
    /// [`MtlsError::BadBundle`] when a bundle certificate is not a usable root.
    pub fn trust_only(bundles: Bundles) -> Result<Self, MtlsError> {
        let state = State::new(super::provider());
        state.set_trust(TrustSet::build(bundles, true)?);
        Ok(Self {
            state: Arc::new(state),
            _task: None,
        })
    }

    /// Starts following the Workload API at `socket` (a path, as from
    /// [`workload_client::socket_path`]) in a background task; returns at once, with nothing
    /// held yet (see [`SvidSource::wait_ready`]). The task runs until every handle of the
    /// source, and every config built from it, is dropped.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn spawn(socket: impl Into<PathBuf>) -> Self {
        Self::spawn_for(socket, None)
    }

    /// [`SvidSource::spawn`], using the SVID whose SPIFFE ID is `wanted` when the workload
    /// has several identities (the first one when `None`).
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn spawn_for(socket: impl Into<PathBuf>, wanted: Option<crate::id::SpiffeId>) -> Self {
        let mut state = State::new(super::provider());
        state.wanted = wanted;
        let state = Arc::new(state);
        let task = tokio::spawn(follow(socket.into(), state.clone()));
        Self {
            state,
            _task: Some(Arc::new(TaskGuard(task.abort_handle()))),
        }
    }

    /// [`SvidSource::spawn`], then [`SvidSource::wait_ready`] for up to `timeout`.
    ///
    /// # Errors
    /// [`MtlsError::NotReady`] with the last failure when no SVID and bundle arrived in time.
    pub async fn connect(socket: impl Into<PathBuf>, timeout: Duration) -> Result<Self, MtlsError> {
        let source = Self::spawn(socket);
        source.wait_ready(timeout).await?;
        Ok(source)
    }

    /// Whether the source holds an SVID and at least one trust bundle.
    pub fn is_ready(&self) -> bool {
        self.state
            .svid
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
            && !self.trust().domains.is_empty()
    }

    /// Waits until [`SvidSource::is_ready`], for up to `timeout`.
    ///
    /// # Errors
    /// [`MtlsError::NotReady`] with the last failure (such as an unreachable agent).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), MtlsError> {
        let mut changes = self.state.changes.subscribe();
        let ready = async {
            while !self.is_ready() {
                // The sender lives in the state this handle holds, so it is never closed.
                let _ = changes.changed().await;
            }
        };
        tokio::time::timeout(timeout, ready)
            .await
            .map_err(|_| MtlsError::NotReady {
                waited: timeout,
                last_error: self
                    .last_error()
                    .unwrap_or_else(|| "no answer from the agent yet".to_owned()),
            })
    }

    /// Replaces the SVID (leaf first, PKCS#8 key) for new handshakes.
    ///
    /// # Errors
    /// [`MtlsError::BadSvid`] as in [`SvidSource::from_parts`]; the old SVID stays.
    pub fn set_svid(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key_pkcs8: &[u8],
    ) -> Result<(), MtlsError> {
        let svid = self.state.local_svid(chain, key_pkcs8)?;
        self.state.set_svid(Some(svid));
        Ok(())
    }

    /// Replaces every trust bundle for new handshakes (a trust domain left out is no longer
    /// trusted).
    ///
    /// # Errors
    /// [`MtlsError::BadBundle`] when a certificate is not a usable root; nothing changes.
    pub fn set_bundles(&self, bundles: Bundles) -> Result<(), MtlsError> {
        self.state.set_trust(TrustSet::build(bundles, true)?);
        Ok(())
    }

    /// The trust bundles held now.
    pub fn bundles(&self) -> Bundles {
        self.trust().to_bundles()
    }

    /// The certificates of trust domain `td`'s bundle held now (empty when it is not known).
    pub fn bundle(&self, td: &TrustDomain) -> Vec<CertificateDer<'static>> {
        self.trust()
            .certs(td)
            .map(<[_]>::to_vec)
            .unwrap_or_default()
    }

    /// The SPIFFE ID (with scopes) of the SVID held now.
    pub fn svid_id(&self) -> Option<ScopedId> {
        self.local().map(|s| s.id.clone())
    }

    /// A receiver that wakes on every update of the SVID or the bundles.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.state.changes.subscribe()
    }

    /// The last failure of the background task or of an update, for diagnostics.
    pub fn last_error(&self) -> Option<String> {
        self.state
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The trust set for one handshake.
    pub(crate) fn trust(&self) -> Arc<TrustSet> {
        self.state
            .trust
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn provider(&self) -> Arc<CryptoProvider> {
        self.state.provider.clone()
    }

    fn local(&self) -> Option<Arc<LocalSvid>> {
        self.state
            .svid
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        self.local().map(|s| s.certified.clone())
    }
}

/// Presents the source's current SVID, on both sides of a handshake.
#[derive(Debug)]
pub(crate) struct SvidResolver(pub(crate) SvidSource);

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.certified_key()
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.certified_key()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Follows the agent forever: one session at a time, backing off between them.
async fn follow(socket: PathBuf, state: Arc<State>) {
    let mut backoff = INITIAL_BACKOFF;
    loop {
        let mut delivered = false;
        let why = session(&socket, &state, &mut delivered).await;
        tracing::warn!(socket = %socket.display(), reason = %why, "lost the Workload API; reconnecting");
        state.record_error(why);
        if delivered {
            backoff = INITIAL_BACKOFF;
        }
        tokio::time::sleep(jittered(backoff)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// `backoff` plus up to half of it again, so many services restarted together do not
/// reconnect in lockstep.
fn jittered(backoff: Duration) -> Duration {
    let mut bytes = [0u8; 2];
    let fraction = match aws_lc_rs::rand::fill(&mut bytes) {
        Ok(()) => f64::from(u16::from_le_bytes(bytes)) / f64::from(u16::MAX),
        Err(_) => 0.5,
    };
    backoff + backoff.mul_f64(fraction / 2.0)
}

/// One connection to the agent: both streams, until either ends. Returns why it ended.
async fn session(socket: &std::path::Path, state: &State, delivered: &mut bool) -> String {
    let channel = match workload_client::connect(socket).await {
        Ok(channel) => channel,
        Err(e) => return e.to_string(),
    };
    let mut api = workload_client::workload_api(channel);
    let mut svids = match api.fetch_x509svid(X509svidRequest {}).await {
        Ok(response) => response.into_inner(),
        Err(status) => return refused(state, "FetchX509SVID", &status),
    };
    let mut bundles = match api.fetch_x509_bundles(X509BundlesRequest {}).await {
        Ok(response) => Some(response.into_inner()),
        Err(status) if status.code() == Code::Unimplemented => {
            tracing::debug!("the agent has no FetchX509Bundles; taking bundles from FetchX509SVID");
            None
        }
        Err(status) => return refused(state, "FetchX509Bundles", &status),
    };
    // With a bundles stream open, it alone sets the bundles for this whole session, even before
    // its first message: an SVID message read first cannot re-add a CA just removed.
    let take_bundles_from_svids = bundles.is_none();
    loop {
        tokio::select! {
            message = svids.message() => match message {
                Ok(Some(message)) => {
                    state.apply_svid_message(message, take_bundles_from_svids);
                    *delivered = true;
                }
                Ok(None) => return "the agent ended the FetchX509SVID stream".to_owned(),
                Err(status) => return refused(state, "FetchX509SVID", &status),
            },
            message = next_bundles(&mut bundles) => match message {
                Ok(Some(message)) => {
                    state.apply_bundles(wire_bundles(message.bundles));
                    *delivered = true;
                }
                Ok(None) => return "the agent ended the FetchX509Bundles stream".to_owned(),
                Err(status) => return refused(state, "FetchX509Bundles", &status),
            },
        }
    }
}

async fn next_bundles(
    stream: &mut Option<tonic::Streaming<X509BundlesResponse>>,
) -> Result<Option<X509BundlesResponse>, tonic::Status> {
    match stream {
        Some(stream) => stream.message().await,
        None => std::future::pending().await,
    }
}

/// Describes a refusal; PermissionDenied means the workload has no identity any more, so the
/// SVID is withdrawn rather than served until it expires.
fn refused(state: &State, rpc: &str, status: &tonic::Status) -> String {
    if status.code() == Code::PermissionDenied {
        tracing::warn!(reason = %status.message(), "the agent withdrew this workload's identity");
        state.set_svid(None);
    }
    format!("{rpc} failed: {:?}: {}", status.code(), status.message())
}

//! A follower of the Workload API's `FetchJWTBundles` stream: the JWT bundles a validator
//! trusts, kept current.
//!
//! [`JwtBundleSource::spawn`] reads the stream in a background task and replaces the whole set
//! on every message (each message carries every bundle, so a trust domain or key left out is no
//! longer trusted). When the agent goes away the task reconnects with capped, jittered
//! exponential backoff and keeps what it last received, as the X.509 follower
//! ([`crate::mtls::SvidSource`]) does: keys rotate slowly and a validator that forgot them on a
//! blip would refuse every token until the agent came back.
//!
//! [`JwtBundleSource::fixed`] holds bundles given in code (tests, the benchmark);
//! [`JwtBundleSource::set`] replaces them as a message would.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use super::WorkloadClientError;
use crate::id::TrustDomain;
use crate::jwt::{JwtBundle, JwtBundles};
use crate::proto::workload::JwtBundlesRequest;

/// The first wait before reconnecting to the agent.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

struct State {
    bundles: RwLock<Arc<JwtBundles>>,
    /// Bumped on every replacement, so a validator can tell that what it checked a token
    /// against is no longer what is trusted.
    generation: AtomicU64,
    /// Whether a set arrived (from the stream or in code).
    ready: watch::Sender<bool>,
    last_error: Mutex<Option<String>>,
}

/// Aborts the background task when the last handle of its source is dropped.
struct TaskGuard(tokio::task::AbortHandle);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// JWT bundles kept current; cheap to clone (clones share one state and one task).
#[derive(Clone)]
pub struct JwtBundleSource {
    state: Arc<State>,
    _task: Option<Arc<TaskGuard>>,
}

impl std::fmt::Debug for JwtBundleSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtBundleSource")
            .field("generation", &self.generation())
            .field("live", &self._task.is_some())
            .finish_non_exhaustive()
    }
}

impl JwtBundleSource {
    fn with_state(bundles: Option<JwtBundles>) -> Arc<State> {
        let ready = bundles.is_some();
        Arc::new(State {
            bundles: RwLock::new(Arc::new(bundles.unwrap_or_default())),
            generation: AtomicU64::new(0),
            ready: watch::Sender::new(ready),
            last_error: Mutex::new(None),
        })
    }

    /// A source holding `bundles`; it changes only through [`JwtBundleSource::set`].
    pub fn fixed(bundles: JwtBundles) -> Self {
        Self {
            state: Self::with_state(Some(bundles)),
            _task: None,
        }
    }

    /// Starts following `FetchJWTBundles` at `socket` (a path, as from
    /// [`super::socket_path`]); returns at once, holding nothing yet (see
    /// [`JwtBundleSource::wait_ready`]). The task runs until every handle is dropped.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn spawn(socket: impl Into<PathBuf>) -> Self {
        let state = Self::with_state(None);
        let task = tokio::spawn(follow(socket.into(), state.clone()));
        Self {
            state,
            _task: Some(Arc::new(TaskGuard(task.abort_handle()))),
        }
    }

    /// Waits until a first set of bundles arrived, for up to `timeout`.
    ///
    /// # Errors
    /// [`WorkloadClientError::NoJwtBundles`] with the last failure when none arrived in time.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), WorkloadClientError> {
        let mut ready = self.state.ready.subscribe();
        tokio::time::timeout(timeout, ready.wait_for(|r| *r))
            .await
            .map(|_| ())
            .map_err(|_| WorkloadClientError::NoJwtBundles {
                waited: timeout,
                last_error: self
                    .last_error()
                    .unwrap_or_else(|| "no answer from the agent yet".to_owned()),
            })
    }

    /// Replaces every bundle.
    pub fn set(&self, bundles: JwtBundles) {
        *self
            .state
            .bundles
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(bundles);
        self.state.generation.fetch_add(1, Ordering::Release);
        self.state.ready.send_replace(true);
    }

    /// The bundles held now.
    pub fn bundles(&self) -> Arc<JwtBundles> {
        self.state
            .bundles
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many times the bundles were replaced: equal numbers mean the same bundles.
    pub fn generation(&self) -> u64 {
        self.state.generation.load(Ordering::Acquire)
    }

    /// The last failure of the background task, for diagnostics.
    pub fn last_error(&self) -> Option<String> {
        self.state
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn record_error(&self, error: String) {
        *self
            .state
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(error);
    }
}

/// Reads a `FetchJWTBundles` message: each value a JWKS, each key a trust domain name or its
/// `spiffe://` ID. One unusable entry is skipped and logged rather than failing the update, so
/// it cannot hold back the removal of a key.
pub fn bundles_from_wire(map: std::collections::HashMap<String, Vec<u8>>) -> JwtBundles {
    map.into_iter()
        .filter_map(|(key, jwks)| {
            let td = match key.parse::<TrustDomain>() {
                Ok(td) => td,
                Err(e) => {
                    tracing::warn!(key = %crate::text::escape_bounded(&key, 80), error = %e, "skipping a JWT bundle with an unusable trust domain");
                    return None;
                }
            };
            match JwtBundle::from_jwks_json(td.clone(), &jwks) {
                Ok(bundle) => Some(bundle),
                Err(e) => {
                    tracing::warn!(trust_domain = %td, error = %e, "skipping an unusable JWT bundle");
                    None
                }
            }
        })
        .collect()
}

/// Follows the agent forever: one stream at a time, backing off between them.
async fn follow(socket: PathBuf, state: Arc<State>) {
    let source = JwtBundleSource { state, _task: None };
    let mut backoff = INITIAL_BACKOFF;
    loop {
        let mut delivered = false;
        let why = session(&socket, &source, &mut delivered).await;
        tracing::warn!(socket = %socket.display(), reason = %why, "lost the JWT bundles stream; reconnecting");
        source.record_error(why);
        if delivered {
            backoff = INITIAL_BACKOFF;
        }
        tokio::time::sleep(jittered(backoff)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// `backoff` plus up to half of it again, so proxies restarted together do not reconnect in
/// lockstep.
fn jittered(backoff: Duration) -> Duration {
    let mut bytes = [0u8; 2];
    let fraction = match aws_lc_rs::rand::fill(&mut bytes) {
        Ok(()) => f64::from(u16::from_le_bytes(bytes)) / f64::from(u16::MAX),
        Err(_) => 0.5,
    };
    backoff + backoff.mul_f64(fraction / 2.0)
}

/// One stream, until it ends. Returns why it ended.
async fn session(
    socket: &std::path::Path,
    source: &JwtBundleSource,
    delivered: &mut bool,
) -> String {
    let channel = match super::connect(socket).await {
        Ok(channel) => channel,
        Err(e) => return e.to_string(),
    };
    let mut stream = match super::workload_api(channel)
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return refused(&status),
    };
    loop {
        match stream.message().await {
            Ok(Some(message)) => {
                let bundles = bundles_from_wire(message.bundles);
                tracing::debug!(
                    trust_domains = bundles.iter().count(),
                    "JWT bundles updated from the Workload API"
                );
                source.set(bundles);
                *delivered = true;
            }
            Ok(None) => return "the agent ended the FetchJWTBundles stream".to_owned(),
            Err(status) => return refused(&status),
        }
    }
}

fn refused(status: &tonic::Status) -> String {
    format!(
        "FetchJWTBundles failed: {:?}: {}",
        status.code(),
        status.message()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::JwtSigner;

    #[test]
    fn wire_bundles_take_both_key_forms_and_skip_unusable_entries() {
        let (signer, _) = JwtSigner::generate().unwrap();
        let td = TrustDomain::new("a.test").unwrap();
        let jwks = JwtBundle::new(td.clone(), [signer.public().clone()]).to_jwks_json();
        let mut map = std::collections::HashMap::new();
        map.insert("a.test".to_owned(), jwks.clone());
        map.insert("spiffe://b.test".to_owned(), jwks.clone());
        map.insert("spiffe://c.test".to_owned(), b"not json".to_vec());
        map.insert("Not A Domain".to_owned(), jwks);
        let bundles = bundles_from_wire(map);
        let names: Vec<String> = bundles
            .iter()
            .map(|b| b.trust_domain().to_string())
            .collect();
        assert_eq!(names, ["a.test", "b.test"]);
        assert!(bundles.get(&td).unwrap().key(signer.kid()).is_some());
    }

    #[tokio::test]
    async fn a_fixed_source_is_ready_and_counts_replacements() {
        let source = JwtBundleSource::fixed(JwtBundles::default());
        source.wait_ready(Duration::from_millis(10)).await.unwrap();
        let before = source.generation();
        source.set(JwtBundles::default());
        assert_eq!(source.generation(), before + 1);
    }

    #[tokio::test]
    async fn a_source_with_no_agent_says_why_it_is_not_ready() {
        let source = JwtBundleSource::spawn("/nonexistent/mayfly-agent.sock");
        let e = source
            .wait_ready(Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("JWT bundles"), "{e}");
    }
}

//! The keys of the Kubernetes clusters the `k8s_psat` node attestor trusts: each cluster's
//! JWKS is a file or an `https://` URL (the API server's `/openid/v1/jwks`, or a copy an
//! operator publishes).
//!
//! Files and URLs are read at start and again every five minutes (a file a deployment tool
//! rewrites is picked up too), and at once when a token
//! names a key its cluster does not hold (the cluster may have rotated its signing key), at
//! most once per 30 s per cluster so that tokens naming made-up keys cannot make the server
//! fetch in a loop. A fetch goes over rustls, with the system's CA bundle or the cluster's
//! configured CA file, reads at most 1 MiB and gives up after 10 s. A failed read is logged
//! in one sentence and the keys held before are kept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use mayfly_attestors::k8s_psat::{K8sPsatAttestor, K8sPsatError, MAX_JWKS, PsatCluster};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

mod fetch;

pub use fetch::HttpsUrl;
use fetch::{client_config, fetch};

/// How often URL (and file) JWKS are read again.
pub const REFRESH_PERIOD: Duration = Duration::from_secs(5 * 60);
/// The shortest time between two reads of one cluster's JWKS prompted by an unknown `kid`.
pub const UNKNOWN_KID_GAP: Duration = Duration::from_secs(30);
/// How long one fetch may take, connection and body included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a cluster's JWKS could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The `jwks` setting is a URL, but not an `https://` one with a host.
    #[error("the JWKS URL {0} is not an https:// URL with a host; use https:// or a file path")]
    BadUrl(String),
    /// No CA bundle could be read for an `https://` JWKS.
    #[error("no CA certificate could be read from {path}: {reason}; set the cluster's ca_file")]
    NoRoots {
        /// The file tried, or the list of system locations.
        path: String,
        /// Why it gave nothing.
        reason: String,
    },
    /// rustls refused the client configuration.
    #[error("the TLS client for JWKS fetches could not be built: {0}")]
    Tls(rustls::Error),
    /// A JWKS file could not be read.
    #[error("the JWKS file {path} could not be read: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A fetch failed on the way: connection, TLS, HTTP.
    #[error("fetching {url} failed: {reason}")]
    Fetch {
        /// The URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The server answered with another status than 200.
    #[error("fetching {url} answered HTTP {status}, not 200")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
    },
    /// The document is over 1 MiB.
    #[error("the JWKS at {0} is over the 1 MiB limit")]
    TooLarge(String),
    /// The fetch took longer than its timeout.
    #[error("fetching {url} took over {secs}s and was abandoned")]
    Timeout {
        /// The URL.
        url: String,
        /// The timeout, seconds.
        secs: u64,
    },
    /// A JWKS document was read but holds no usable key (or is not a JWKS).
    #[error("the JWKS of cluster {cluster} at {from} is unusable: {reason}")]
    Document {
        /// The cluster.
        cluster: String,
        /// The file or URL.
        from: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The attestor refused a cluster's configuration.
    #[error(transparent)]
    Attestor(#[from] mayfly_attestors::k8s_psat::K8sPsatError),
}

/// Where one cluster's keys come from.
#[derive(Debug, Clone)]
pub enum JwksLocation {
    /// A file on the server.
    File(PathBuf),
    /// An `https://` URL, with the TLS client that trusts its server.
    Url {
        /// The URL.
        url: HttpsUrl,
        /// rustls with the system roots or the cluster's CA file.
        tls: Arc<rustls::ClientConfig>,
    },
}

/// One cluster's JWKS setting.
#[derive(Debug, Clone)]
pub struct ClusterJwks {
    /// The cluster's name, as the attestor knows it.
    pub cluster: String,
    /// Where its keys are.
    pub location: JwksLocation,
}

impl ClusterJwks {
    /// The setting `jwks` (a file path, or an `https://` URL whose server is trusted through
    /// `ca_file`, or else the system's CA bundle) for `cluster`.
    ///
    /// # Errors
    /// [`JwksError::BadUrl`] for a URL that is not `https://`; [`JwksError::NoRoots`] when
    /// no CA certificate can be read; [`JwksError::Tls`].
    pub fn new(cluster: &str, jwks: &str, ca_file: Option<&Path>) -> Result<Self, JwksError> {
        let location = if jwks.contains("://") {
            let url = HttpsUrl::parse(jwks)?;
            JwksLocation::Url {
                url,
                tls: Arc::new(client_config(ca_file)?),
            }
        } else {
            JwksLocation::File(PathBuf::from(jwks))
        };
        Ok(Self {
            cluster: cluster.to_owned(),
            location,
        })
    }

    /// Reads the document once.
    ///
    /// # Errors
    /// The [`JwksError`] of the read or fetch.
    pub async fn read(&self, timeout: Duration) -> Result<Vec<u8>, JwksError> {
        match &self.location {
            JwksLocation::File(path) => read_file(path).await,
            JwksLocation::Url { url, tls } => fetch(url, Arc::clone(tls), timeout).await,
        }
    }

    /// Reads the document and gives it to `attestor`; returns how many keys it holds.
    ///
    /// # Errors
    /// As [`Self::read`], and [`JwksError::Document`] when the attestor refuses it (its keys
    /// held before stay).
    pub async fn load_into(
        &self,
        attestor: &K8sPsatAttestor,
        timeout: Duration,
    ) -> Result<usize, JwksError> {
        let document = self.read(timeout).await?;
        self.set(attestor, &document)
    }

    /// Gives `document` to `attestor`, naming this cluster and source if it is refused.
    fn set(&self, attestor: &K8sPsatAttestor, document: &[u8]) -> Result<usize, JwksError> {
        attestor
            .set_jwks(&self.cluster, document)
            .map_err(|e| match e {
                K8sPsatError::BadJwks(reason) => JwksError::Document {
                    cluster: self.cluster.clone(),
                    from: self.describe(),
                    reason,
                },
                other => JwksError::Attestor(other),
            })
    }

    fn describe(&self) -> String {
        match &self.location {
            JwksLocation::File(path) => path.display().to_string(),
            JwksLocation::Url { url, .. } => url.as_str().to_owned(),
        }
    }
}

async fn read_file(path: &Path) -> Result<Vec<u8>, JwksError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || read_file_blocking(&owned))
        .await
        .map_err(|e| JwksError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })?
}

fn read_file_blocking(path: &Path) -> Result<Vec<u8>, JwksError> {
    use std::io::Read as _;
    let err = |reason: String| JwksError::File {
        path: path.to_owned(),
        reason,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_JWKS as u64 + 1).read_to_end(&mut bytes))
        .map_err(|e| err(e.to_string()))?;
    if bytes.len() > MAX_JWKS {
        return Err(err("it is over the 1 MiB limit".into()));
    }
    Ok(bytes)
}

/// The server's `[node_attestors.k8s_psat]` section: the clusters it trusts.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sPsatSettings {
    /// `[[node_attestors.k8s_psat.clusters]]`.
    pub clusters: Vec<K8sPsatClusterSettings>,
}

/// One `[[node_attestors.k8s_psat.clusters]]` table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sPsatClusterSettings {
    /// The cluster's name, which agents give with `--k8s-cluster`.
    pub name: String,
    /// The `iss` of its service account tokens.
    pub issuer: String,
    /// Its JWKS: a file, or an `https://` URL.
    pub jwks: String,
    /// The audience the agent's projected token is for.
    pub audience: String,
    /// `namespace:serviceaccount` allowed to attest.
    pub allowed_service_accounts: Vec<String>,
    /// The CA that signs the JWKS server's certificate (PEM), instead of the system's.
    pub ca_file: Option<PathBuf>,
}

impl K8sPsatSettings {
    /// The attestor and the JWKS sources these settings describe (no key read yet).
    ///
    /// # Errors
    /// [`JwksError::Attestor`] for a bad cluster; [`JwksError::BadUrl`] or
    /// [`JwksError::NoRoots`] for a bad `jwks` or `ca_file`.
    pub fn build(&self) -> Result<(Arc<K8sPsatAttestor>, Vec<ClusterJwks>), JwksError> {
        let attestor = K8sPsatAttestor::new(
            self.clusters
                .iter()
                .map(|c| PsatCluster {
                    name: c.name.clone(),
                    issuer: c.issuer.clone(),
                    audience: c.audience.clone(),
                    allowed_service_accounts: c.allowed_service_accounts.clone(),
                })
                .collect(),
        )?;
        let sources = self
            .clusters
            .iter()
            .map(|c| ClusterJwks::new(&c.name, &c.jwks, c.ca_file.as_deref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((Arc::new(attestor), sources))
    }

    /// Builds the attestor, reads every cluster's JWKS and starts the refresher ([`start`]).
    ///
    /// # Errors
    /// As [`Self::build`] and [`start`].
    pub async fn start(
        &self,
        times: RefreshTimes,
    ) -> Result<(Arc<K8sPsatAttestor>, JoinHandle<()>), JwksError> {
        let (attestor, sources) = self.build()?;
        let task = start(&attestor, sources, times).await?;
        Ok((attestor, task))
    }
}

/// When the refresher reads again; the defaults are [`REFRESH_PERIOD`], [`UNKNOWN_KID_GAP`]
/// and [`FETCH_TIMEOUT`] (tests shorten them).
#[derive(Debug, Clone, Copy)]
pub struct RefreshTimes {
    /// Between two periodic reads.
    pub period: Duration,
    /// The least time between two reads of a cluster prompted by unknown keys.
    pub unknown_kid_gap: Duration,
    /// The most one fetch may take.
    pub fetch_timeout: Duration,
}

impl Default for RefreshTimes {
    fn default() -> Self {
        Self {
            period: REFRESH_PERIOD,
            unknown_kid_gap: UNKNOWN_KID_GAP,
            fetch_timeout: FETCH_TIMEOUT,
        }
    }
}

/// Loads every cluster's JWKS into `attestor` and starts the task that keeps them fresh; the
/// task ends when the attestor is dropped.
///
/// A URL that cannot be fetched at start is logged and retried by the task (the cluster's API
/// server may be down while Mayfly starts); a file that cannot be read is an error, since it
/// is the operator's configuration.
///
/// # Errors
/// The [`JwksError`] of the first JWKS file that cannot be read or holds no usable key.
pub async fn start(
    attestor: &Arc<K8sPsatAttestor>,
    clusters: Vec<ClusterJwks>,
    times: RefreshTimes,
) -> Result<JoinHandle<()>, JwksError> {
    for cluster in &clusters {
        let result = cluster.load_into(attestor, times.fetch_timeout).await;
        match (result, &cluster.location) {
            (Ok(count), _) => log_loaded(cluster, count),
            (Err(e), JwksLocation::File(_)) => return Err(e),
            (Err(e), JwksLocation::Url { .. }) => log_failed(cluster, &e),
        }
    }
    Ok(spawn_loop(attestor, clusters, times, false))
}

/// Reads every cluster's JWKS file into `attestor` now, blocking: what the server does while
/// it reads its settings, so that a bad file stops it at start. URLs are left to
/// [`spawn_refresher`].
///
/// # Errors
/// The [`JwksError`] of the first file that cannot be read or holds no usable key.
pub fn load_files(attestor: &K8sPsatAttestor, clusters: &[ClusterJwks]) -> Result<(), JwksError> {
    for cluster in clusters {
        if let JwksLocation::File(path) = &cluster.location {
            let count = cluster.set(attestor, &read_file_blocking(path)?)?;
            log_loaded(cluster, count);
        }
    }
    Ok(())
}

/// Starts the task that fetches every URL JWKS at once and then keeps all of them fresh, for a
/// server whose files [`load_files`] read; the task ends when the attestor is dropped.
pub fn spawn_refresher(
    attestor: &Arc<K8sPsatAttestor>,
    clusters: Vec<ClusterJwks>,
    times: RefreshTimes,
) -> JoinHandle<()> {
    spawn_loop(attestor, clusters, times, true)
}

fn spawn_loop(
    attestor: &Arc<K8sPsatAttestor>,
    clusters: Vec<ClusterJwks>,
    times: RefreshTimes,
    fetch_urls_first: bool,
) -> JoinHandle<()> {
    // A full queue means a read is already due; the cluster's name is dropped, not waited on.
    let (wake, mut woken) = mpsc::channel::<String>(16);
    attestor.on_unknown_kid(Arc::new(move |cluster: &str| {
        let _ = wake.try_send(cluster.to_owned());
    }));
    let weak: Weak<K8sPsatAttestor> = Arc::downgrade(attestor);
    // Only the reads unknown keys prompt are spaced out; the periodic ones are fixed anyway.
    let mut last_prompted: HashMap<String, Instant> = HashMap::new();
    tokio::spawn(async move {
        if fetch_urls_first {
            let urls = clusters
                .iter()
                .filter(|c| matches!(c.location, JwksLocation::Url { .. }));
            for cluster in urls {
                let Some(attestor) = weak.upgrade() else {
                    return;
                };
                match cluster.load_into(&attestor, times.fetch_timeout).await {
                    Ok(count) => log_loaded(cluster, count),
                    Err(e) => log_failed(cluster, &e),
                }
            }
        }
        let mut tick = tokio::time::interval(times.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let due: Vec<&ClusterJwks> = tokio::select! {
                _ = tick.tick() => clusters.iter().collect(),
                woken = woken.recv() => {
                    let Some(name) = woken else { return };
                    let recent = last_prompted
                        .get(&name)
                        .is_some_and(|at| at.elapsed() < times.unknown_kid_gap);
                    if recent {
                        continue;
                    }
                    last_prompted.insert(name.clone(), Instant::now());
                    clusters.iter().filter(|c| c.cluster == name).collect()
                }
            };
            let Some(attestor) = weak.upgrade() else {
                return;
            };
            for cluster in due {
                match cluster.load_into(&attestor, times.fetch_timeout).await {
                    Ok(count) => log_loaded(cluster, count),
                    Err(e) => log_failed(cluster, &e),
                }
            }
        }
    })
}

fn log_loaded(cluster: &ClusterJwks, count: usize) {
    tracing::debug!(cluster = %cluster.cluster, from = %cluster.describe(), keys = count, "read the JWKS of a k8s_psat cluster");
}

fn log_failed(cluster: &ClusterJwks, error: &JwksError) {
    tracing::warn!(cluster = %cluster.cluster, error = %error, "could not read the JWKS of a k8s_psat cluster; its keys held before are kept");
}

#[cfg(test)]
mod tests;

//! The Mayfly server: the CA, the registration store, issuance policy and the audit log,
//! behind the node API (agents, TCP with TLS) and the admin API (operators, a Unix socket).

pub(crate) mod admin;
pub(crate) mod admin_lists;
pub mod attest_gate;
pub(crate) mod audit_log;
pub mod node_attestors;
// Several servers, one PostgreSQL (issue 10): re-read the bundle when a client is refused.
pub(crate) mod bundle_wake;
pub mod config;
pub(crate) mod conn;
pub mod entry_rules;
// Entry sync at scale (issue 10): paged, incremental, held `ListEntries`.
pub(crate) mod entry_kind;
pub(crate) mod entry_sync;
pub(crate) mod entry_watch;
pub(crate) mod jwt_keys;
pub(crate) mod node;
// Verifiers outside SPIFFE (issue 11): OIDC discovery of the JWT keys.
pub mod oidc;
pub(crate) mod policy;
// CA rotation (issue 10): the journal, the schedule and the operator's steps.
pub(crate) mod rotation;
pub(crate) mod status_layer;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::ca::{Authority, CaError, CaSet, UpstreamCa};
use crate::id::{ScopeSet, ScopedId, TrustDomain};
use crate::mtls::{self, IdPattern, MtlsError, PeerPolicy, SvidSource};
use crate::proto::{admin::admin_server::AdminServer, node::node_server::NodeServer};
use crate::store::{self, Store, StoreError};
use crate::svid::{self, Bundles, KeyAndCsr, LeafSpec, SvidError};
use crate::wire::{MAX_NODE_MESSAGE, server_id, unix_secs};
use audit_log::AuditLog;
use policy::IssuancePolicy;

/// The server's defaults, as the design's table gives them.
pub mod defaults {
    use std::time::Duration;

    /// The trust domain when none is configured.
    pub const TRUST_DOMAIN: &str = "mayfly.local";
    /// The data directory.
    pub const DATA_DIR: &str = ".mayfly/server";
    /// The node API's address.
    pub const BIND: &str = "127.0.0.1:8081";
    /// The CA's lifetime.
    pub const CA_TTL: Duration = Duration::from_secs(7 * 86_400);
    /// The agents' SVID lifetime (agents renew at half of it).
    pub const AGENT_TTL: Duration = Duration::from_secs(3600);
    /// The server's own SVID lifetime at most (renewed at half of it); also at most 1/6 of
    /// the CA's (see [`super::ServerConfig::server_svid_ttl`]).
    pub const SERVER_TTL: Duration = Duration::from_secs(3600);
}

/// A CA lives at least this many times the longest SVID it signs (SPIRE's rule): it is
/// activated with 1/6 of its life left, so what it signed last still expires before it does.
pub const CA_TTL_FACTOR: u32 = 6;

/// How often the bundle is re-read from the store (other replicas may publish CAs), and the
/// CA schedule checked.
const BUNDLE_REFRESH: Duration = Duration::from_secs(5);
/// The longest refresh hint the bundle carries.
const MAX_REFRESH_HINT: Duration = Duration::from_secs(300);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory could not be created.
    #[error("could not create the data directory {path}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The node API address could not be bound.
    #[error(
        "could not listen on {addr} for the node API (is another server running? choose another address with --bind)"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The admin socket could not be created.
    #[error("could not create the admin socket {path}")]
    AdminSocket {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("could not open the store: {0}")]
    Store(#[from] StoreError),
    /// The CA could not be loaded or created.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The server's own SVID could not be issued.
    #[error("could not issue the server's own SVID: {0}")]
    Svid(#[from] SvidError),
    /// TLS could not be configured.
    #[error(transparent)]
    Tls(#[from] MtlsError),
    /// The OIDC discovery endpoint could not start.
    #[error(transparent)]
    Oidc(#[from] oidc::OidcError),
    /// The CA journal could not be resumed.
    #[error(transparent)]
    Rotation(#[from] rotation::RotationError),
    /// The CA lifetime is too short for the SVID lifetimes (SPIRE's 6x rule).
    #[error(
        "the CA TTL ({ca_ttl}s) must be at least 6 times the agent SVID TTL ({agent_ttl}s), so that a CA is rotated well before what it signed expires; give --ca-ttl {needed}s or more, or a shorter --agent-ttl"
    )]
    CaTtlTooShort {
        /// The CA TTL, seconds.
        ca_ttl: u64,
        /// The agent TTL, seconds.
        agent_ttl: u64,
        /// The shortest CA TTL that would do, seconds.
        needed: u64,
    },
    /// The entry TTL floor is above the ceiling the CA TTL allows, so no entry could be made.
    #[error(
        "the shortest entry TTL ({min}s, --min-entry-ttl) is above the longest one the CA TTL allows ({max}s: at most 1h and a sixth of --ca-ttl), so no entry could be registered; give a shorter --min-entry-ttl or a longer --ca-ttl"
    )]
    EntryTtlFloorTooHigh {
        /// The floor, seconds.
        min: u64,
        /// The ceiling, seconds.
        max: u64,
    },
}

/// What a server runs with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the CA key, the SQLite file and the admin socket live.
    pub data_dir: PathBuf,
    /// The trust domain it issues for.
    pub trust_domain: TrustDomain,
    /// The node API's address (port 0 picks a free one).
    pub bind: SocketAddr,
    /// `postgres://…` to share a database between replicas; `None` for SQLite in the data dir.
    pub database: Option<String>,
    /// The CA's lifetime.
    pub ca_ttl: Duration,
    /// The agents' SVID lifetime.
    pub agent_ttl: Duration,
    /// The shortest TTL an entry may be registered with ([`entry_rules::MIN_TTL`] by default;
    /// lower only for tests that watch rotations).
    pub min_entry_ttl: Duration,
    /// Sign the CA with this upstream CA instead of self-signing.
    pub upstream_ca: Option<UpstreamCa>,
    /// Bounds on refused attestations per source address.
    pub attest_limits: attest_gate::AttestLimits,
    /// Serve OIDC discovery of the JWT keys; `None` to not.
    pub oidc: Option<oidc::OidcConfig>,
    /// The node attestors accepted (join tokens, and those configured).
    pub node_attestors: node_attestors::NodeAttestors,
}

impl ServerConfig {
    /// The embedded defaults, with the data dir given.
    ///
    /// # Panics
    /// Never: the defaults are valid constants.
    pub fn with_defaults(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            trust_domain: TrustDomain::new(defaults::TRUST_DOMAIN).expect("valid default"),
            bind: defaults::BIND.parse().expect("valid default"),
            database: None,
            ca_ttl: defaults::CA_TTL,
            agent_ttl: defaults::AGENT_TTL,
            min_entry_ttl: entry_rules::MIN_TTL,
            upstream_ca: None,
            attest_limits: attest_gate::AttestLimits::default(),
            oidc: None,
            node_attestors: node_attestors::NodeAttestors::default(),
        }
    }

    /// The longest SVID TTL this CA lifetime allows: 1/6 of it ([`CA_TTL_FACTOR`]).
    pub fn max_svid_ttl(&self) -> Duration {
        self.ca_ttl / CA_TTL_FACTOR
    }

    /// The server's own SVID lifetime: min(1 h, ca_ttl / 6).
    pub fn server_svid_ttl(&self) -> Duration {
        defaults::SERVER_TTL.min(self.max_svid_ttl())
    }

    /// The longest TTL an entry may be registered with: min(1 h, ca_ttl / 6).
    pub fn max_entry_ttl(&self) -> Duration {
        policy::MAX_TTL.min(self.max_svid_ttl())
    }

    /// Refuses a CA TTL under 6x the agent TTL ([`CA_TTL_FACTOR`]); entry and server SVID
    /// TTLs are capped at ca_ttl / 6 instead, so they always fit. Refuses an entry TTL floor
    /// above that cap.
    ///
    /// # Errors
    /// [`ServerError::CaTtlTooShort`], [`ServerError::EntryTtlFloorTooHigh`].
    pub fn check_ttls(&self) -> Result<(), ServerError> {
        let needed = self.agent_ttl * CA_TTL_FACTOR;
        if self.ca_ttl < needed {
            return Err(ServerError::CaTtlTooShort {
                ca_ttl: self.ca_ttl.as_secs(),
                agent_ttl: self.agent_ttl.as_secs(),
                needed: needed.as_secs(),
            });
        }
        if self.min_entry_ttl > self.max_entry_ttl() {
            return Err(ServerError::EntryTtlFloorTooHigh {
                min: self.min_entry_ttl.as_secs(),
                max: self.max_entry_ttl().as_secs(),
            });
        }
        Ok(())
    }

    /// The admin socket's path, `<data dir>/admin.sock`.
    pub fn admin_socket(&self) -> PathBuf {
        self.data_dir.join("admin.sock")
    }
}

/// What the APIs share.
pub(crate) struct ServerState {
    pub(crate) td: TrustDomain,
    pub(crate) policy: IssuancePolicy,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) cas: Arc<CaSet>,
    /// This server's CA journal and schedule.
    pub(crate) rotation: Arc<rotation::Rotation>,
    pub(crate) audit: AuditLog,
    /// The server's own SVID and the trust bundle, as the node API's TLS uses them.
    pub(crate) source: SvidSource,
    pub(crate) agent_ttl: Duration,
    pub(crate) min_entry_ttl: Duration,
    /// The entry revision held `ListEntries` calls wait on.
    pub(crate) entry_watch: Arc<entry_watch::EntryWatch>,
    /// The longest TTL an entry may have: min(1 h, ca_ttl / 6).
    pub(crate) max_entry_ttl: Duration,
    /// How often verifiers should re-read the bundle: min(ca_ttl / 12, 300 s).
    pub(crate) refresh_hint: Duration,
    /// The JWT-SVID keys of the trust domain, re-read with the bundle.
    pub(crate) jwt_keys: jwt_keys::PublishedJwtKeys,
    /// Refused attestations per source address.
    pub(crate) attest_gate: attest_gate::AttestGate,
    /// The node attestors accepted.
    pub(crate) node_attestors: node_attestors::NodeAttestors,
    /// The `iss` of JWT-SVIDs: the OIDC discovery endpoint's issuer, once it is bound.
    pub(crate) jwt_issuer: std::sync::OnceLock<String>,
}

impl ServerState {
    /// The trust domain's CA certificates, DER.
    pub(crate) fn bundle_der(&self) -> Vec<Vec<u8>> {
        self.source
            .bundle(&self.td)
            .iter()
            .map(|c| c.to_vec())
            .collect()
    }

    /// The trust domain's JWT keys, as uncompressed points (the node API's form).
    pub(crate) fn jwt_points(&self) -> Vec<Vec<u8>> {
        self.jwt_keys
            .get()
            .iter()
            .map(|k| k.point().to_vec())
            .collect()
    }
}

/// A started server.
pub struct RunningServer {
    /// Where the node API listens.
    pub node_addr: SocketAddr,
    /// Where the OIDC discovery endpoint listens, and its issuer; `None` when it is off.
    pub oidc: Option<(SocketAddr, String)>,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// The trust domain.
    pub trust_domain: TrustDomain,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningServer {
    /// Stops serving and waits for the listeners to close.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// The peers the node API admits once they present a certificate: agents of trust domain `td`
/// (`spiffe://<td>/mayfly/agent/...`), and no one else. A client without a certificate still
/// completes the handshake (see [`node_tls_config`]), so that it can attest.
///
/// # Panics
/// Never: the prefix is a valid constant path.
pub fn agent_policy(td: &TrustDomain) -> PeerPolicy {
    let agents = td.join("/mayfly/agent").expect("valid constant path");
    PeerPolicy::ids([IdPattern::below(agents).expect("no scope segment")]).expect("one pattern")
}

/// The node API's TLS server config: the server's SVID from `source`, a client certificate
/// optional (an agent attests before it has an SVID) and, when presented, verified by
/// [`mtls`] against `agents` (in production [`agent_policy`]), HTTP/2.
///
/// # Errors
/// [`MtlsError::Tls`] when rustls refuses the configuration.
pub fn node_tls_config(
    source: &SvidSource,
    agents: PeerPolicy,
) -> Result<rustls::ServerConfig, MtlsError> {
    let mut config = mtls::server_config_optional_client(source, agents)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn create_private_dir(path: &Path) -> Result<(), ServerError> {
    let err = |source| ServerError::DataDir {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)
}

/// The trust bundle as the store holds it now: every live CA certificate of `td`.
async fn load_bundle(store: &dyn Store, td: &TrustDomain) -> Result<Bundles, StoreError> {
    let records = store.list_ca_certs(unix_secs(SystemTime::now())).await?;
    let certs = records
        .into_iter()
        .map(|r| rustls_pki_types::CertificateDer::from(r.der))
        .collect::<Vec<_>>();
    Ok(Bundles::from([(td.clone(), certs)]))
}

/// Re-reads the bundle from the store into `source`, and the JWT keys into `jwt` (other
/// replicas may have published CAs); an unchanged bundle is left alone.
async fn refresh_bundle(
    store: &dyn Store,
    td: &TrustDomain,
    source: &SvidSource,
    jwt: &jwt_keys::PublishedJwtKeys,
) -> Result<(), ServerError> {
    let bundles = load_bundle(store, td).await?;
    if bundles.get(td).map(Vec::as_slice) != Some(source.bundle(td).as_slice()) {
        source.set_bundles(bundles)?;
    }
    jwt.refresh(store, unix_secs(SystemTime::now())).await?;
    Ok(())
}

fn issue_server_svid(
    authority: &Authority,
    td: &TrustDomain,
    ttl: Duration,
) -> Result<
    (
        Vec<rustls_pki_types::CertificateDer<'static>>,
        Vec<u8>,
        SystemTime,
    ),
    SvidError,
> {
    let request = KeyAndCsr::generate()?;
    let key = svid::parse_csr(&request.csr)?;
    let id = ScopedId::new(server_id(td), ScopeSet::new())
        .expect("the server's ID is a constant path without a scope segment");
    let issued = svid::issue(
        authority,
        &LeafSpec {
            id: &id,
            key: &key,
            ttl,
            dns_names: &[],
        },
        SystemTime::now(),
    )?;
    Ok((issued.chain, request.key_pkcs8, issued.not_after))
}

/// Starts the server: opens the store, loads or creates the CA, publishes it in the bundle,
/// and serves the node API and the admin API until [`RunningServer::shutdown`].
///
/// # Errors
/// [`ServerError`] naming what could not be set up.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    config.check_ttls()?;
    create_private_dir(&config.data_dir)?;
    let store: Arc<dyn Store> = match &config.database {
        Some(url) => store::open(url).await?,
        None => {
            let path = config.data_dir.join("mayfly.sqlite");
            store::open(&format!("sqlite://{}", path.display())).await?
        }
    };
    let rotation = Arc::new(
        rotation::Rotation::resume(
            store.clone(),
            &rotation::RotationConfig {
                data_dir: &config.data_dir,
                td: &config.trust_domain,
                ca_ttl: config.ca_ttl,
                max_svid_ttl: config.max_svid_ttl().max(config.agent_ttl),
                upstream: config.upstream_ca.as_ref(),
            },
        )
        .await?,
    );
    let cas = rotation.cas();
    let bundles = load_bundle(store.as_ref(), &config.trust_domain).await?;
    let server_ttl = config.server_svid_ttl();
    let (chain, key, _) = issue_server_svid(&cas.current(), &config.trust_domain, server_ttl)?;
    let source = SvidSource::from_parts(chain, &key, bundles)?;
    let tls_config = node_tls_config(&source, agent_policy(&config.trust_domain))?;
    let jwt_keys = jwt_keys::PublishedJwtKeys::default();
    jwt_keys
        .refresh(store.as_ref(), unix_secs(SystemTime::now()))
        .await?;

    let state = Arc::new(ServerState {
        td: config.trust_domain.clone(),
        policy: IssuancePolicy::new(config.trust_domain.clone()),
        store: store.clone(),
        cas: cas.clone(),
        rotation: rotation.clone(),
        audit: AuditLog::start(store.clone()),
        source: source.clone(),
        agent_ttl: config.agent_ttl,
        min_entry_ttl: config.min_entry_ttl,
        entry_watch: entry_watch::EntryWatch::new(store.clone()),
        max_entry_ttl: config.max_entry_ttl(),
        refresh_hint: (config.ca_ttl / 12).min(MAX_REFRESH_HINT),
        jwt_keys: jwt_keys.clone(),
        attest_gate: attest_gate::AttestGate::new(config.attest_limits),
        node_attestors: config.node_attestors.clone(),
        jwt_issuer: std::sync::OnceLock::new(),
    });

    let listener = TcpListener::bind(config.bind)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.bind,
            source,
        })?;
    let node_addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.bind,
        source,
    })?;
    let admin_socket = config.admin_socket();
    let admin_listener = bind_admin_socket(&admin_socket)?;

    let (shutdown, _) = watch::channel(false);
    let mut tasks = Vec::new();

    let mut oidc_renewed = None;
    let mut oidc_bound = None;
    if let Some(oidc_config) = &config.oidc {
        let (listener, issuer) = oidc::bind(oidc_config).await?;
        let addr = listener
            .local_addr()
            .map_err(|source| oidc::OidcError::Bind {
                addr: oidc_config.bind,
                source,
            })?;
        let cert = match &oidc_config.cert {
            Some(cert) => oidc::tls::ServingCert::new(cert.clone()),
            None => {
                let renewed = OidcRenewed {
                    cert: None,
                    host: issuer.host().clone(),
                    bind_ip: addr.ip(),
                };
                let (cert, _) = renewed.issue(&cas.current(), &config.trust_domain, server_ttl)?;
                let cert = oidc::tls::ServingCert::new(cert);
                oidc_renewed = Some(OidcRenewed {
                    cert: Some(cert.clone()),
                    ..renewed
                });
                cert
            }
        };
        oidc_bound = Some((addr, issuer.as_str().to_owned()));
        // Tokens name the issuer whose discovery document publishes their keys.
        let _ = state.jwt_issuer.set(issuer.as_str().to_owned());
        tasks.push(oidc::serve(
            config.trust_domain.clone(),
            listener,
            issuer,
            cert,
            jwt_keys.clone(),
            state.refresh_hint,
            shutdown.subscribe(),
        )?);
    }

    let node = NodeServer::new(node::NodeService::new(state.clone()))
        .max_decoding_message_size(MAX_NODE_MESSAGE);
    // Several servers, one PostgreSQL (issue 10): a refused client certificate may be signed
    // by a server that has just started, whose CA this one has not read yet: re-read at once.
    let refused = bundle_wake::BundleWake::default();
    tasks.push(tokio::spawn(bundle_wake::run(
        refused.clone(),
        store.clone(),
        config.trust_domain.clone(),
        (source.clone(), jwt_keys.clone()),
        shutdown.subscribe(),
    )));
    tasks.push(tokio::spawn(attest_gate::summarise(
        state.clone(),
        shutdown.subscribe(),
    )));
    tasks.push(tokio::spawn(entry_watch::run(
        state.entry_watch.clone(),
        shutdown.subscribe(),
    )));
    let (incoming, accept_loop) =
        conn::incoming(listener, TlsAcceptor::from(Arc::new(tls_config)), refused);
    let mut stop = shutdown.subscribe();
    tasks.push(tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .layer(crate::server::status_layer::InvalidArgumentForOversize)
            .add_service(node)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.changed().await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %crate::wire::error_chain(&e), "node API stopped");
        }
        // The stream is gone with the server: wait for the listener to close, so the address
        // is free when `shutdown` returns.
        let _ = accept_loop.await;
    }));

    let admin = AdminServer::new(admin::AdminService::new(state.clone()));
    let admin_incoming = tokio_stream::wrappers::UnixListenerStream::new(admin_listener);
    let mut stop = shutdown.subscribe();
    let socket_path = admin_socket.clone();
    tasks.push(tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(admin)
            .serve_with_incoming_shutdown(admin_incoming, async move {
                let _ = stop.changed().await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %crate::wire::error_chain(&e), "admin API stopped");
        }
        let _ = std::fs::remove_file(&socket_path);
    }));

    let mut stop = shutdown.subscribe();
    let td = config.trust_domain.clone();
    tasks.push(tokio::spawn(async move {
        let maintained = Maintained {
            store,
            td,
            source,
            jwt_keys,
            rotation,
            server_ttl,
            oidc: oidc_renewed,
        };
        maintained.run(&mut stop).await;
    }));

    Ok(RunningServer {
        node_addr,
        oidc: oidc_bound,
        admin_socket,
        trust_domain: config.trust_domain,
        shutdown,
        tasks,
    })
}

/// What the server's periodic loop keeps current.
struct Maintained {
    store: Arc<dyn Store>,
    td: TrustDomain,
    source: SvidSource,
    jwt_keys: jwt_keys::PublishedJwtKeys,
    rotation: Arc<rotation::Rotation>,
    server_ttl: Duration,
    /// The discovery endpoint's self-issued certificate, renewed with the server's SVID.
    oidc: Option<OidcRenewed>,
}

/// A discovery endpoint certificate the server issues itself, and what it is issued for.
struct OidcRenewed {
    cert: Option<oidc::tls::ServingCert>,
    host: oidc::IssuerHost,
    bind_ip: std::net::IpAddr,
}

impl OidcRenewed {
    fn issue(
        &self,
        ca: &Authority,
        td: &TrustDomain,
        ttl: Duration,
    ) -> Result<(Arc<rustls::sign::CertifiedKey>, SystemTime), oidc::OidcError> {
        oidc::tls::issue(ca, td, &self.host, self.bind_ip, ttl)
    }
}

impl Maintained {
    /// Every [`BUNDLE_REFRESH`], and at once after a CA step: runs the CA schedule, keeps the
    /// bundle current, and renews the server's own SVID at half its life or as soon as a new
    /// CA signs, all in place in `source`, so the listener picks them up at its next
    /// handshake.
    async fn run(self, stop: &mut watch::Receiver<bool>) {
        let cas = self.rotation.cas();
        let mut renew_at = SystemTime::now() + self.server_ttl / 2;
        let mut signer = cas.current();
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(BUNDLE_REFRESH) => {}
                () = self.rotation.changed.notified() => {}
            }
            if let Err(e) = self.rotation.tick(SystemTime::now()).await {
                self.rotation.warn_limited(
                    "rotation-step",
                    &format!(
                        "a CA rotation step failed; it is retried every {}s: {}",
                        BUNDLE_REFRESH.as_secs(),
                        crate::wire::error_chain(&e)
                    ),
                );
            }
            if let Err(e) =
                refresh_bundle(self.store.as_ref(), &self.td, &self.source, &self.jwt_keys).await
            {
                tracing::warn!(error = %crate::wire::error_chain(&e), "could not refresh the trust bundle; keeping the current one");
            }
            let current = cas.current();
            if SystemTime::now() >= renew_at || !Arc::ptr_eq(&current, &signer) {
                match self.renew(&current) {
                    Ok(next) => {
                        renew_at = next;
                        signer = current;
                    }
                    Err(e) => {
                        tracing::error!(error = %crate::wire::error_chain(&e), "could not renew the server SVID");
                    }
                }
            }
        }
    }

    /// Issues and installs a new server SVID from `ca`; returns when to renew it.
    fn renew(&self, ca: &Authority) -> Result<SystemTime, ServerError> {
        let (chain, key, not_after) = issue_server_svid(ca, &self.td, self.server_ttl)?;
        self.source.set_svid(chain, &key)?;
        // The discovery endpoint's certificate follows the same schedule and the same CA, so
        // it never outlives the CA that signed it.
        if let Some(oidc) = &self.oidc
            && let Some(cert) = &oidc.cert
        {
            match oidc.issue(ca, &self.td, self.server_ttl) {
                Ok((next, _)) => cert.set(next),
                Err(e) => {
                    tracing::error!(error = %e, "could not renew the OIDC discovery endpoint's certificate; the current one is served until it expires");
                }
            }
        }
        let life = not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        Ok(SystemTime::now() + life / 2)
    }
}

/// Binds the admin socket: a stale file from a previous run is removed first, and the socket
/// is made 0600 on purpose, since its file mode is the admin API's authentication. It lives in
/// the 0700 data dir, so it is never reachable by others even before its mode is set.
fn bind_admin_socket(path: &Path) -> Result<UnixListener, ServerError> {
    let err = |source| ServerError::AdminSocket {
        path: path.to_owned(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

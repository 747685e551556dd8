//! The mTLS handshake benchmark behind `mayfly bench handshake`: what the SPIFFE+scope client
//! verifier of [`mayfly::mtls::server_config`] costs a server, against plain rustls
//! `WebPkiClientVerifier` with the same CA as its root, in the same run.
//!
//! Everything is generated at run time and stays in memory: a CA for `spiffe://bench.test`
//! ([`Authority::generate`], ECDSA P-256, URI SAN `spiffe://bench.test`), a server SVID, and a
//! client SVID carrying the scope `bench:read` (`spiffe://bench.test/agents/bench-client/scope/
//! bench.read`), both issued with [`svid::issue`] like any Mayfly SVID.
//!
//! The two servers differ only in their client verifier:
//!
//! - **ours**: [`mayfly::mtls::server_config`] with the policy "ID under
//!   `spiffe://bench.test/agents/*`, scope `bench:read` required";
//! - **plain**: `WebPkiClientVerifier` (chain to the CA, clientAuth EKU), with its root hint
//!   subjects cleared as ours sends none, on a config built the same way: the same provider
//!   ([`mayfly::mtls::provider`]), TLS 1.3 only, the same server certificate and key, no session
//!   storage and no tickets.
//!
//! The client is the same for both ([`mayfly::mtls::client_config`] with the client SVID).
//! Handshakes run in memory — a `ClientConnection` and a `ServerConnection` pumping bytes
//! through a `Vec`, no sockets — so the figure is CPU only. Each handshake is a full one (no
//! resumption on either side) and must end with both sides done and the client's certificate
//! accepted. Two figures per variant:
//!
//! - **server CPU per handshake**: this thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`) spent in
//!   the server's calls (`ServerConnection::new`, `read_tls` + `process_new_packets`,
//!   `write_tls`), less the cost of reading the clock, which was calibrated first; the client's
//!   work is not in it. The whole handshake (client and server) is reported too;
//! - **CPU per verification**: `verify_client_cert` called directly on each verifier, in a loop,
//!   with the client's chain.
//!
//! Two cases, each measured as above:
//!
//! - **reused leaf**: one client SVID for every handshake, as a long-lived workload presents
//!   its identity SVID; ours keeps a cache of leaves it has verified, so it can skip work here;
//! - **distinct leaves**: a fresh client SVID (own key, own serial) for every handshake, as
//!   task SVIDs are used — one task, one connection — so no handshake finds its leaf in the
//!   cache. The leaves and their client configs are issued before any clock starts.
//!
//! The variants alternate in rounds (ours then plain, then plain then ours, …), so whatever
//! else the machine does hits both alike; after a warm-up round, each round's pair gives a
//! ratio, and the overhead is the median of those ratios (the overhead of the totals is given
//! too).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::time::{ClockId, clock_gettime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use serde::Serialize;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use mayfly::ca::{Authority, CaError};
use mayfly::id::{IdError, Scope, ScopedId, TrustDomain, parse_scopes};
use mayfly::mtls::{self, IdPattern, MtlsError, PeerPolicy, PolicyError, SvidSource};
use mayfly::proxy::ProxyError;
use mayfly::svid::{self, Bundles, KeyAndCsr, LeafSpec, SvidError};

/// The trust domain of every mTLS benchmark.
pub(crate) const TRUST_DOMAIN: &str = "bench.test";
/// The scope the benchmark client carries and the servers require.
pub(crate) const SCOPE: &str = "bench:read";
/// The client SVID's identity (its SPIFFE ID without the scope).
const CLIENT_PATH: &str = "/agents/bench-client";
/// The allowed-ID pattern of the servers' policy.
const ALLOWED: &str = "spiffe://bench.test/agents/*";
/// The server SVID's identity.
const SERVER_PATH: &str = "/bench/server";
/// The DNS SAN of the server SVID (what a plain TLS client such as nginx's peers checks).
pub(crate) const SERVER_DNS: &str = "localhost";
/// The goal: our verifier costs at most this much more server CPU per handshake, in percent.
pub const HANDSHAKE_GOAL_PCT: f64 = 3.0;

/// Why an mTLS benchmark could not run. Failed requests during a load are not errors of the
/// benchmark: they are counted in the reports.
#[derive(Debug, thiserror::Error)]
pub enum MtlsBenchError {
    /// An option was out of range.
    #[error("invalid benchmark option: {0}")]
    InvalidOption(String),
    /// The benchmark CA could not be created.
    #[error("could not create the benchmark CA: {0}")]
    Ca(#[from] CaError),
    /// A benchmark SVID could not be issued.
    #[error("could not issue a benchmark SVID: {0}")]
    Svid(#[from] SvidError),
    /// A benchmark ID or scope was refused.
    #[error("a benchmark SPIFFE ID or scope was refused: {0}")]
    Id(#[from] IdError),
    /// The benchmark policy was refused.
    #[error("the benchmark policy was refused: {0}")]
    Policy(#[from] PolicyError),
    /// An mTLS source or config could not be built.
    #[error(transparent)]
    Mtls(#[from] MtlsError),
    /// rustls refused a configuration.
    #[error("a benchmark TLS configuration was refused: {0}")]
    Tls(#[from] rustls::Error),
    /// A handshake or verification that must succeed failed.
    #[error("a benchmark handshake failed: {0}")]
    Handshake(String),
    /// The thread CPU clock could not be read.
    #[error("could not read this thread's CPU clock: {0}")]
    Clock(nix::Error),
    /// Our proxy did not start.
    #[error("the benchmark proxy did not start: {0}")]
    Proxy(#[from] ProxyError),
    /// A file, socket or process of the benchmark failed.
    #[error("could not {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// nginx could not be set up or died.
    #[error("{0}")]
    Nginx(String),
    /// A benchmark task panicked or was cancelled.
    #[error("a benchmark task failed: {0}")]
    Task(String),
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MtlsBenchError {
    let what = what.into();
    move |source| MtlsBenchError::Io { what, source }
}

/// One SVID of the benchmark PKI.
pub(crate) struct BenchSvid {
    /// Leaf first.
    pub(crate) chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 DER.
    pub(crate) key_pkcs8: Vec<u8>,
    /// Its SPIFFE ID.
    pub(crate) id: ScopedId,
}

impl BenchSvid {
    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }
}

/// The benchmark PKI: a CA and the SVIDs it issued, all in memory.
pub(crate) struct BenchPki {
    pub(crate) authority: Authority,
    /// `spiffe://bench.test/bench/server`, DNS SAN `localhost`, no scopes.
    pub(crate) server: BenchSvid,
    /// `spiffe://bench.test/agents/bench-client`, scope `bench:read`.
    pub(crate) client: BenchSvid,
}

impl BenchPki {
    /// A fresh CA (one day) and the two SVIDs (one hour each).
    pub(crate) fn generate() -> Result<Self, MtlsBenchError> {
        let td = TrustDomain::new(TRUST_DOMAIN)?;
        let authority = Authority::generate(&td, Duration::from_secs(24 * 3600))?;
        let server_id = ScopedId::new(td.join(SERVER_PATH)?, parse_scopes::<&str>(&[])?)?;
        let client_id = ScopedId::new(td.join(CLIENT_PATH)?, parse_scopes(&[SCOPE])?)?;
        let server = issue(&authority, server_id, &[SERVER_DNS.to_owned()])?;
        let client = issue(&authority, client_id, &[])?;
        Ok(Self {
            authority,
            server,
            client,
        })
    }

    /// The trust bundle: the CA, for `bench.test`.
    pub(crate) fn bundles(&self) -> Bundles {
        let mut bundles = Bundles::new();
        bundles.insert(
            self.authority.trust_domain().clone(),
            self.authority.bundle_roots().to_vec(),
        );
        bundles
    }

    /// A source holding `svid` and the bundle.
    pub(crate) fn source(&self, svid: &BenchSvid) -> Result<SvidSource, MtlsBenchError> {
        Ok(SvidSource::from_parts(
            svid.chain.clone(),
            &svid.key_pkcs8,
            self.bundles(),
        )?)
    }

    /// The CA as a rustls root store.
    pub(crate) fn root_store(&self) -> Result<RootCertStore, MtlsBenchError> {
        let mut roots = RootCertStore::empty();
        for cert in self.authority.bundle_roots() {
            roots.add(cert.clone())?;
        }
        Ok(roots)
    }

    /// The servers' policy: an ID under `spiffe://bench.test/agents/*`, with `bench:read`.
    pub(crate) fn server_policy() -> Result<PeerPolicy, MtlsBenchError> {
        Ok(PeerPolicy::ids([IdPattern::parse(ALLOWED)?])?.require_scope(Scope::parse(SCOPE)?))
    }
}

fn issue(
    authority: &Authority,
    id: ScopedId,
    dns_names: &[String],
) -> Result<BenchSvid, MtlsBenchError> {
    let key = KeyAndCsr::generate()?;
    let requested = svid::parse_csr(&key.csr)?;
    let issued = svid::issue(
        authority,
        &LeafSpec {
            id: &id,
            key: &requested,
            ttl: Duration::from_secs(3600),
            dns_names,
        },
        SystemTime::now(),
    )?;
    Ok(BenchSvid {
        chain: issued.chain,
        key_pkcs8: key.key_pkcs8,
        id,
    })
}

/// This thread's CPU time, in nanoseconds.
pub(crate) fn thread_cpu_ns() -> Result<u64, MtlsBenchError> {
    let t = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_err(MtlsBenchError::Clock)?;
    let secs = u64::try_from(t.tv_sec()).unwrap_or(0);
    let nanos = u64::try_from(t.tv_nsec()).unwrap_or(0);
    Ok(secs * 1_000_000_000 + nanos)
}

/// What `mayfly bench handshake` runs.
#[derive(Debug, Clone)]
pub struct HandshakeBenchOptions {
    /// Handshakes per variant, and as many direct verifications (default 5000).
    pub iterations: usize,
    /// Rounds the iterations are split into, variants alternating (default 50).
    pub rounds: usize,
}

impl Default for HandshakeBenchOptions {
    fn default() -> Self {
        Self {
            iterations: 5000,
            rounds: 50,
        }
    }
}

/// One variant's figures, medians over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct VerifierFigures {
    /// Which verifier.
    pub verifier: String,
    /// Server CPU per full handshake, µs (the server's calls only, clock cost removed).
    pub server_cpu_us_per_handshake: f64,
    /// Client and server CPU per full handshake, µs.
    pub total_cpu_us_per_handshake: f64,
    /// CPU per direct `verify_client_cert` call, µs.
    pub cpu_us_per_verification: f64,
}

/// One case's figures: both verifiers and how they compare.
#[derive(Debug, Clone, Serialize)]
pub struct CaseFigures {
    /// Ours: `mtls::server_config` with the SPIFFE ID + scope policy.
    pub ours: VerifierFigures,
    /// Plain rustls `WebPkiClientVerifier`.
    pub plain: VerifierFigures,
    /// Server-side timed regions per handshake.
    pub regions_per_handshake: f64,
    /// Server CPU per handshake, ours over plain − 1, in percent: median of the rounds' ratios.
    pub handshake_overhead_pct: f64,
    /// The same from the totals of all rounds.
    pub handshake_overhead_pct_of_totals: f64,
    /// Client + server CPU per handshake, ours over plain − 1, percent (median of rounds).
    pub total_overhead_pct: f64,
    /// CPU per verification, ours over plain − 1, percent (median of rounds).
    pub verification_overhead_pct: f64,
    /// CPU per verification, ours − plain, µs (medians).
    pub verification_extra_us: f64,
    /// Whether the goal (server CPU per handshake at most 3% more) was met.
    pub goal_met: bool,
}

/// What `mayfly bench handshake` measured.
#[derive(Debug, Clone, Serialize)]
pub struct HandshakeBenchReport {
    /// Handshakes (and verifications) per variant and case, warm-up excluded.
    pub iterations: usize,
    /// Rounds, each with both variants.
    pub rounds: usize,
    /// The negotiated suite, key exchange group and the client's SVID, as checked on the first
    /// handshake.
    pub negotiated: String,
    /// What reading the thread CPU clock costs, ns per timed region (removed from the server
    /// figures).
    pub clock_cost_ns: f64,
    /// One client SVID for every handshake, as a long-lived workload's identity SVID is used:
    /// ours can answer from its verified-leaf cache.
    pub reused_leaf: CaseFigures,
    /// A fresh client SVID for each handshake, as task SVIDs are used (one task, one
    /// connection): every handshake verifies a leaf neither verifier has seen, so the cache
    /// never helps. The leaves are issued before the clock starts.
    pub distinct_leaf: CaseFigures,
    /// Parts of ours' extra work, timed alone on the client's leaf: the x509-parser parse of
    /// the leaf (webpki parses it again for the path, as plain does), µs.
    pub leaf_parse_us: f64,
    /// Reading the SPIFFE ID from the parsed leaf and splitting its scopes, µs.
    pub id_parse_us: f64,
    /// Whether the goal was met in both cases.
    pub goal_met: bool,
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

impl fmt::Display for HandshakeBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "mTLS handshakes in memory (no sockets), TLS 1.3, full handshakes, one thread: {} per verifier and case in {} rounds alternating the verifiers, after a warm-up round; {}",
            self.iterations, self.rounds, self.negotiated
        )?;
        writeln!(
            f,
            "thread CPU time; clock read cost {:.0} ns x {:.1} server regions per handshake removed",
            self.clock_cost_ns, self.reused_leaf.regions_per_handshake
        )?;
        for (title, case) in [
            (
                "reused leaf (one client SVID for every handshake)",
                &self.reused_leaf,
            ),
            (
                "distinct leaves (a fresh client SVID per handshake, as task SVIDs)",
                &self.distinct_leaf,
            ),
        ] {
            writeln!(f, "{title}:")?;
            write_case(f, case)?;
        }
        writeln!(
            f,
            "parts of ours' extra work, timed alone: x509-parser parse of the leaf {:.2} µs, SPIFFE ID + scopes {:.2} µs",
            self.leaf_parse_us, self.id_parse_us
        )?;
        write!(
            f,
            "goal: server CPU per handshake at most {HANDSHAKE_GOAL_PCT:.0}% more than plain webpki: reused leaf {}, distinct leaves {} (a shared machine: rerun to see the spread)",
            met(self.reused_leaf.goal_met),
            met(self.distinct_leaf.goal_met)
        )
    }
}

fn write_case(f: &mut fmt::Formatter<'_>, case: &CaseFigures) -> fmt::Result {
    writeln!(
        f,
        "  {:<46} {:>16} {:>18} {:>14}",
        "client verifier (medians of rounds)", "server µs/hs", "client+server µs/hs", "µs/verify"
    )?;
    for v in [&case.ours, &case.plain] {
        writeln!(
            f,
            "  {:<46} {:>16.1} {:>18.1} {:>14.2}",
            v.verifier,
            v.server_cpu_us_per_handshake,
            v.total_cpu_us_per_handshake,
            v.cpu_us_per_verification
        )?;
    }
    writeln!(
        f,
        "  overhead of ours: server CPU per handshake {:+.2}% (median of round ratios; {:+.2}% from totals), whole handshake {:+.2}%, verification alone {:+.1}% ({:+.2} µs)",
        case.handshake_overhead_pct,
        case.handshake_overhead_pct_of_totals,
        case.total_overhead_pct,
        case.verification_overhead_pct,
        case.verification_extra_us
    )
}

/// Server-side CPU, accumulated over timed regions.
#[derive(Default)]
struct Meter {
    ns: u64,
    regions: u64,
}

impl Meter {
    fn time<T>(&mut self, f: impl FnOnce() -> T) -> Result<T, MtlsBenchError> {
        let start = thread_cpu_ns()?;
        let out = f();
        let end = thread_cpu_ns()?;
        self.ns += end.saturating_sub(start);
        self.regions += 1;
        Ok(out)
    }
}

fn hs_err(side: &str) -> impl Fn(rustls::Error) -> MtlsBenchError + '_ {
    move |e| MtlsBenchError::Handshake(format!("{side}: {e}"))
}

fn io_hs_err(side: &str) -> impl Fn(std::io::Error) -> MtlsBenchError + '_ {
    move |e| MtlsBenchError::Handshake(format!("{side}: {e}"))
}

/// One full handshake in memory; the server's calls are timed into `meter`. Returns the
/// finished connections.
fn handshake(
    client_config: &Arc<ClientConfig>,
    server_config: &Arc<ServerConfig>,
    name: &ServerName<'static>,
    meter: &mut Meter,
    buf: &mut Vec<u8>,
) -> Result<(ClientConnection, ServerConnection), MtlsBenchError> {
    let mut client =
        ClientConnection::new(client_config.clone(), name.clone()).map_err(hs_err("client"))?;
    let mut server = meter
        .time(|| ServerConnection::new(server_config.clone()))?
        .map_err(hs_err("server"))?;
    for _ in 0..8 {
        buf.clear();
        while client.wants_write() {
            client.write_tls(buf).map_err(io_hs_err("client"))?;
        }
        if !buf.is_empty() {
            meter.time(|| -> Result<(), MtlsBenchError> {
                let mut rd = &buf[..];
                while !rd.is_empty() {
                    server.read_tls(&mut rd).map_err(io_hs_err("server"))?;
                    server.process_new_packets().map_err(hs_err("server"))?;
                }
                Ok(())
            })??;
        }
        buf.clear();
        meter.time(|| -> Result<(), MtlsBenchError> {
            while server.wants_write() {
                server.write_tls(buf).map_err(io_hs_err("server"))?;
            }
            Ok(())
        })??;
        if !buf.is_empty() {
            let mut rd = &buf[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).map_err(io_hs_err("client"))?;
                client.process_new_packets().map_err(hs_err("client"))?;
            }
        }
        if !client.is_handshaking() && !server.is_handshaking() && !client.wants_write() {
            if server.peer_certificates().is_none_or(<[_]>::is_empty) {
                return Err(MtlsBenchError::Handshake(
                    "the server finished without the client's certificate".into(),
                ));
            }
            return Ok((client, server));
        }
    }
    Err(MtlsBenchError::Handshake(
        "the handshake did not complete in 8 flights".into(),
    ))
}

/// The two variants of the run.
struct Variant {
    server: Arc<ServerConfig>,
    verifier: Arc<dyn ClientCertVerifier>,
}

/// One batch of `count` handshakes, cycling through `clients`: (server ns, server regions,
/// client + server ns).
fn handshake_batch(
    variant: &Variant,
    clients: &[Arc<ClientConfig>],
    name: &ServerName<'static>,
    count: usize,
) -> Result<(u64, u64, u64), MtlsBenchError> {
    let mut meter = Meter::default();
    let mut buf = Vec::with_capacity(8192);
    let start = thread_cpu_ns()?;
    for client in clients.iter().cycle().take(count) {
        let done = handshake(client, &variant.server, name, &mut meter, &mut buf)?;
        drop(done);
    }
    let total = thread_cpu_ns()?.saturating_sub(start);
    Ok((meter.ns, meter.regions, total))
}

/// One batch of `count` direct verifications, cycling through `chains`: ns.
fn verify_batch(
    variant: &Variant,
    chains: &[Vec<CertificateDer<'static>>],
    count: usize,
) -> Result<u64, MtlsBenchError> {
    let now = UnixTime::now();
    let start = thread_cpu_ns()?;
    for chain in chains.iter().cycle().take(count) {
        variant
            .verifier
            .verify_client_cert(&chain[0], &chain[1..], now)
            .map_err(hs_err("verify_client_cert"))?;
    }
    Ok(thread_cpu_ns()?.saturating_sub(start))
}

/// The x509-parser parse of `leaf`, and the SPIFFE ID and scopes read from it, each timed
/// alone over `n` runs: µs per run.
fn components(leaf: &CertificateDer<'_>, n: usize) -> Result<(f64, f64), MtlsBenchError> {
    let parse = || {
        X509Certificate::from_der(leaf.as_ref())
            .map(|(_, cert)| cert)
            .map_err(|e| MtlsBenchError::Handshake(e.to_string()))
    };
    let start = thread_cpu_ns()?;
    for _ in 0..n {
        std::hint::black_box(parse()?);
    }
    let parse_ns = thread_cpu_ns()?.saturating_sub(start);
    let cert = parse()?;
    let start = thread_cpu_ns()?;
    for _ in 0..n {
        let id = svid::leaf_spiffe_id(&cert)?;
        std::hint::black_box(ScopedId::from_spiffe_id(&id)?);
    }
    let id_ns = thread_cpu_ns()?.saturating_sub(start);
    let per = |ns: u64| ns as f64 / n as f64 / 1000.0;
    Ok((per(parse_ns), per(id_ns)))
}

/// What a clock read costs inside a timed region, ns (the median of many empty regions).
fn clock_cost() -> Result<f64, MtlsBenchError> {
    let mut samples = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let a = thread_cpu_ns()?;
        let b = thread_cpu_ns()?;
        samples.push(b.saturating_sub(a));
    }
    samples.sort_unstable();
    Ok(samples[samples.len() / 2] as f64)
}

pub(crate) fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn pct(ours: f64, plain: f64) -> f64 {
    if plain > 0.0 {
        (ours / plain - 1.0) * 100.0
    } else {
        0.0
    }
}

/// Per-round samples of one variant, µs per operation.
#[derive(Default)]
struct Samples {
    server_us: Vec<f64>,
    total_us: Vec<f64>,
    verify_us: Vec<f64>,
    server_ns_sum: f64,
    regions: u64,
}

/// Runs `mayfly bench handshake` on a blocking thread.
///
/// # Errors
/// [`MtlsBenchError`] when the PKI or a config cannot be built, or a handshake fails.
pub async fn handshake_benchmark(
    opts: HandshakeBenchOptions,
) -> Result<HandshakeBenchReport, MtlsBenchError> {
    if opts.rounds == 0 || opts.iterations < opts.rounds {
        return Err(MtlsBenchError::InvalidOption(
            "rounds must be at least 1 and iterations at least the rounds".into(),
        ));
    }
    tokio::task::spawn_blocking(move || run(&opts))
        .await
        .map_err(|e| MtlsBenchError::Task(e.to_string()))?
}

fn run(opts: &HandshakeBenchOptions) -> Result<HandshakeBenchReport, MtlsBenchError> {
    let pki = BenchPki::generate()?;
    let provider = mayfly::mtls::provider();
    let server_source = pki.source(&pki.server)?;
    let client_source = pki.source(&pki.client)?;
    let policy = BenchPki::server_policy()?;

    let ours = Variant {
        server: Arc::new(mtls::server_config(&server_source, policy.clone())?),
        verifier: mtls::client_cert_verifier(&server_source, policy),
    };
    let plain_verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(pki.root_store()?), provider.clone())
            .clear_root_hint_subjects()
            .build()
            .map_err(|e| MtlsBenchError::Handshake(e.to_string()))?;
    let mut plain_config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(plain_verifier.clone())
        .with_single_cert(pki.server.chain.clone(), pki.server.key())?;
    plain_config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    plain_config.send_tls13_tickets = 0;
    plain_config.max_early_data_size = 0;
    let plain = Variant {
        server: Arc::new(plain_config),
        verifier: plain_verifier,
    };

    let client = Arc::new(mtls::client_config(
        &client_source,
        PeerPolicy::exact(pki.server.id.base().clone())?,
    )?);
    let name = ServerName::try_from(SERVER_DNS)
        .map_err(|e| MtlsBenchError::Handshake(e.to_string()))?
        .to_owned();

    // Check once what is negotiated, and that both servers see the client's SVID.
    let mut negotiated = String::new();
    for variant in [&ours, &plain] {
        let mut meter = Meter::default();
        let (c, s) = handshake(&client, &variant.server, &name, &mut meter, &mut Vec::new())?;
        let peer = mtls::peer_of(&s).ok_or_else(|| {
            MtlsBenchError::Handshake("the server holds no readable client SVID".into())
        })?;
        if peer.id != pki.client.id {
            return Err(MtlsBenchError::Handshake(format!(
                "the server saw {} instead of {}",
                peer.id, pki.client.id
            )));
        }
        negotiated = format!(
            "{:?}, {:?}, client {}",
            c.negotiated_cipher_suite().map(|s| s.suite()),
            c.negotiated_key_exchange_group().map(|g| g.name()),
            peer.id
        );
    }
    let clock_ns = clock_cost()?;
    let batch = opts.iterations / opts.rounds;
    let variants = [&ours, &plain];
    let measure = Measure {
        variants,
        name: &name,
        batch,
        rounds: opts.rounds,
        clock_ns,
    };
    let reused = ClientSide {
        configs: vec![client],
        chains: vec![pki.client.chain.clone()],
    };
    let reused_leaf = measure.case(&reused, false)?;
    // Issued before the clock starts: one leaf per handshake of every round, warm-up included.
    let distinct = ClientSide::fresh(&pki, batch * (opts.rounds + 1))?;
    let distinct_leaf = measure.case(&distinct, true)?;
    let (leaf_parse_us, id_parse_us) = components(&pki.client.chain[0], opts.iterations)?;
    Ok(HandshakeBenchReport {
        iterations: batch * opts.rounds,
        rounds: opts.rounds,
        negotiated,
        clock_cost_ns: clock_ns,
        goal_met: reused_leaf.goal_met && distinct_leaf.goal_met,
        reused_leaf,
        distinct_leaf,
        leaf_parse_us,
        id_parse_us,
    })
}

/// The client side of one case: the configs its handshakes use and the chains they present.
struct ClientSide {
    configs: Vec<Arc<ClientConfig>>,
    chains: Vec<Vec<CertificateDer<'static>>>,
}

impl ClientSide {
    /// `n` client SVIDs, each with a key and serial of its own (the same SPIFFE ID and scope),
    /// and a client config presenting each.
    fn fresh(pki: &BenchPki, n: usize) -> Result<Self, MtlsBenchError> {
        let expected = PeerPolicy::exact(pki.server.id.base().clone())?;
        let mut configs = Vec::with_capacity(n);
        let mut chains = Vec::with_capacity(n);
        for _ in 0..n {
            let svid = issue(&pki.authority, pki.client.id.clone(), &[])?;
            let source = pki.source(&svid)?;
            configs.push(Arc::new(mtls::client_config(&source, expected.clone())?));
            chains.push(svid.chain);
        }
        Ok(Self { configs, chains })
    }
}

/// How the cases are measured: both variants, alternating, in rounds after a warm-up round.
struct Measure<'a> {
    variants: [&'a Variant; 2],
    name: &'a ServerName<'static>,
    batch: usize,
    rounds: usize,
    clock_ns: f64,
}

impl Measure<'_> {
    /// Measures one case. `distinct`: each round uses the next `batch` clients, every one
    /// once per variant; otherwise every handshake uses the first.
    fn case(&self, clients: &ClientSide, distinct: bool) -> Result<CaseFigures, MtlsBenchError> {
        let batch = self.batch;
        let mut samples = [Samples::default(), Samples::default()];
        // Round 0 is the warm-up, not counted.
        for round in 0..=self.rounds {
            let range = if distinct {
                round * batch..(round + 1) * batch
            } else {
                0..1
            };
            let configs = &clients.configs[range.clone()];
            let chains = &clients.chains[range];
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for &v in &order {
                let (server_ns, regions, total_ns) =
                    handshake_batch(self.variants[v], configs, self.name, batch)?;
                let verify_ns = verify_batch(self.variants[v], chains, batch)?;
                if round == 0 {
                    continue;
                }
                let s = &mut samples[v];
                let server_ns = (server_ns as f64 - regions as f64 * self.clock_ns).max(0.0);
                s.server_us.push(server_ns / batch as f64 / 1000.0);
                s.total_us.push(total_ns as f64 / batch as f64 / 1000.0);
                s.verify_us.push(verify_ns as f64 / batch as f64 / 1000.0);
                s.server_ns_sum += server_ns;
                s.regions += regions;
            }
        }
        Ok(figures_of(&samples, batch * self.rounds))
    }
}

/// The figures of one case from both variants' samples (ours first).
fn figures_of(samples: &[Samples; 2], counted: usize) -> CaseFigures {
    let ratios = |f: fn(&Samples) -> &Vec<f64>| -> f64 {
        let mut r: Vec<f64> = f(&samples[0])
            .iter()
            .zip(f(&samples[1]))
            .map(|(o, p)| pct(*o, *p))
            .collect();
        median(&mut r)
    };
    let handshake_overhead_pct = ratios(|s| &s.server_us);
    let figures = |s: &Samples, name: &str| VerifierFigures {
        verifier: name.to_owned(),
        server_cpu_us_per_handshake: median(&mut s.server_us.clone()),
        total_cpu_us_per_handshake: median(&mut s.total_us.clone()),
        cpu_us_per_verification: median(&mut s.verify_us.clone()),
    };
    let ours = figures(&samples[0], "ours: mtls::server_config (SPIFFE ID + scope)");
    let plain = figures(&samples[1], "plain: rustls WebPkiClientVerifier");
    CaseFigures {
        regions_per_handshake: samples[0].regions as f64 / counted.max(1) as f64,
        verification_extra_us: ours.cpu_us_per_verification - plain.cpu_us_per_verification,
        ours,
        plain,
        goal_met: handshake_overhead_pct <= HANDSHAKE_GOAL_PCT,
        handshake_overhead_pct,
        handshake_overhead_pct_of_totals: pct(samples[0].server_ns_sum, samples[1].server_ns_sum),
        total_overhead_pct: ratios(|s| &s.total_us),
        verification_overhead_pct: ratios(|s| &s.verify_us),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny run, to check the benchmark works (its figures mean nothing in debug).
    #[tokio::test]
    async fn handshake_benchmark_runs() {
        let report = handshake_benchmark(HandshakeBenchOptions {
            iterations: 4,
            rounds: 2,
        })
        .await
        .unwrap();
        assert_eq!(report.iterations, 4);
        for case in [&report.reused_leaf, &report.distinct_leaf] {
            assert!(case.ours.server_cpu_us_per_handshake > 0.0);
            assert!(case.plain.cpu_us_per_verification > 0.0);
        }
        assert!(
            report.negotiated.contains("bench.read"),
            "{}",
            report.negotiated
        );
        assert!(!report.to_string().is_empty());
    }

    /// The distinct-leaf case presents a different leaf in every handshake.
    #[test]
    fn fresh_client_side_has_a_leaf_per_handshake() {
        let pki = BenchPki::generate().unwrap();
        let side = ClientSide::fresh(&pki, 3).unwrap();
        assert_eq!(side.configs.len(), 3);
        let leaves: std::collections::HashSet<_> = side.chains.iter().map(|c| &c[0]).collect();
        assert_eq!(leaves.len(), 3);
        assert!(!leaves.contains(&pki.client.chain[0]));
    }
}

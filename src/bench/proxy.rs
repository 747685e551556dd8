//! The proxy benchmark behind `mayfly bench proxy`: `mayfly proxy` against nginx, side by
//! side, enforcing mTLS in front of the same upstream; and, in the same run, our proxy with
//! `--accept jwt` (target `ours-jwt`: the load generator presents no certificate and sends
//! `Authorization: Bearer <task JWT-SVID>` on every request) against `--accept x509`, plus the
//! per-core rate of `jwt::validate` against raw ES256 verification ([`super::jwt`]).
//!
//! Setup, all on this machine, generated at run time:
//!
//! - the PKI of [`super::handshake`]: a CA for `spiffe://bench.test`, a server SVID (also
//!   carrying the DNS SAN `localhost`, so nginx's peers can check it as a plain TLS server) and
//!   a client SVID carrying the scope `bench:read`;
//! - the upstream: an in-process hyper HTTP/1.1 server answering `ok\n` to everything, on its
//!   own thread and single-threaded Tokio runtime;
//! - ours: [`mayfly::proxy::start`] in HTTP mode with the route `GET / bench:read` (as
//!   `mayfly proxy --route 'GET / bench:read'`), its SVID and bundle from
//!   [`mayfly::mtls::SvidSource::from_parts`], on **one thread**: its own thread running a
//!   current-thread Tokio runtime, so everything the proxy does (TLS, HTTP, the pooled upstream
//!   client) runs there;
//! - nginx (the Debian package; never installed by the benchmark): a generated config in a
//!   temporary directory with **`worker_processes 1`**, TLS 1.3 only, the server SVID as
//!   `ssl_certificate`, the CA as `ssl_client_certificate`, `ssl_verify_client on`,
//!   `ssl_verify_depth 2`, no session cache and no tickets (ours has neither), `access_log off`,
//!   `proxy_pass` to an `upstream` block with `keepalive 64`, `proxy_http_version 1.1` and
//!   `proxy_set_header Connection ""`, and `keepalive_requests` raised on both sides so that
//!   nginx does not close a client connection after its default 1000 requests (ours has no such
//!   limit). Our proxy's access log is off too: the benchmark installs no log subscriber.
//!
//! The load generator is the same for both: this process's runtime, `connections` tasks each
//! with its own TCP + TLS 1.3 connection (rustls, the client SVID, `X25519` only so both
//! servers do the same key exchange, no resumption, ALPN `http/1.1`) and hyper's HTTP/1.1
//! client. Two loads:
//!
//! - **keep-alive**: each connection sends `GET /` in a loop, one request in flight;
//! - **new connections**: each task opens a connection, does the full mTLS handshake, sends
//!   one `GET /`, reads the answer and closes, in a loop.
//!
//! A request counts when it is answered 200 with the upstream's body inside the timed window
//! (a warm-up before it is not counted). The targets alternate (ours, nginx, ours, nginx, …)
//! for each load and round; each figure is reported, with the ratio ours / nginx per round and
//! over the medians. The CPU time the server under test used in the window (our proxy's thread,
//! nginx's one worker process, from `/proc/…/schedstat`) gives its CPU per request or handshake
//! too: with server, upstream and load generator sharing the machine's cores, that is the
//! figure least bent by the load generator.

use std::fmt;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;

use super::TempDir;
use super::handshake::{BenchPki, MtlsBenchError, SCOPE, SERVER_DNS, io_err, median};
use super::jwt::{BenchJwt, JWT_PROXY_GOAL_RATIO, JwtLoadSummary, JwtVerifyFigures};
use mayfly::bundle::pem_block;
use mayfly::mtls::PeerPolicy;
use mayfly::proxy::routes::Routes;
use mayfly::proxy::{Accept, ProxyConfig, ProxyMode};
use mayfly::workload_client::JwtBundleSource;

/// The upstream's answer.
const BODY: &[u8] = b"ok\n";
/// How long one request (or connect + handshake + request) may take before it is an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long nginx may take to accept connections.
const NGINX_START_TIMEOUT: Duration = Duration::from_secs(10);
/// The goal: ours at least as fast as nginx on both loads.
pub const PROXY_GOAL_RATIO: f64 = 1.0;

/// What `mayfly bench proxy` runs.
#[derive(Debug, Clone)]
pub struct ProxyBenchOptions {
    /// The timed window of each measurement (default 10 s).
    pub duration: Duration,
    /// Load before each window, not counted (default 1 s).
    pub warmup: Duration,
    /// Concurrent client connections (tasks, for the new-connection load) (default 32).
    pub connections: usize,
    /// Rounds; each measures both loads on both targets (default 3).
    pub rounds: usize,
    /// The nginx executable (default `/usr/sbin/nginx`).
    pub nginx: PathBuf,
    /// Calls of `jwt::validate` (and raw verifications) per round of the per-core JWT
    /// validation figure (default 5000).
    pub jwt_verify_iterations: usize,
}

impl Default for ProxyBenchOptions {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            connections: 32,
            rounds: 3,
            nginx: PathBuf::from("/usr/sbin/nginx"),
            jwt_verify_iterations: 5000,
        }
    }
}

/// The two loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    KeepAlive,
    NewConnections,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::KeepAlive => "keep-alive",
            Load::NewConnections => "new-connections",
        }
    }
}

/// One measurement: one load on one target.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyRun {
    /// `ours` or `nginx`.
    pub target: String,
    /// `keep-alive` (requests/s) or `new-connections` (handshakes/s, one request each).
    pub load: String,
    /// The round, from 1.
    pub round: usize,
    /// Requests answered OK in the window (each one a new connection for `new-connections`).
    pub completed: u64,
    /// Per second.
    pub per_sec: f64,
    /// Request latency (connect + handshake + request for `new-connections`), median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// The server's CPU time in the window per completed request, µs (our proxy's thread;
    /// nginx's worker process); `None` when /proc could not tell.
    pub server_cpu_us_per_op: Option<f64>,
    /// The server's CPU time over the window (1.0: one core busy all along).
    pub server_busy: Option<f64>,
    /// Failed requests over the measurement, warm-up included.
    pub errors: u64,
    /// The first failure.
    pub first_error: Option<String>,
}

/// One load, both targets, over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct LoadSummary {
    /// `keep-alive` or `new-connections`.
    pub load: String,
    /// Ours, per second, median of the rounds.
    pub ours_per_sec: f64,
    /// nginx, per second, median of the rounds; `None` when nginx was not run.
    pub nginx_per_sec: Option<f64>,
    /// Ours / nginx: ratio of the medians.
    pub ratio: Option<f64>,
    /// Ours / nginx in each round.
    pub round_ratios: Vec<f64>,
    /// Our proxy's CPU per request, µs, median of the rounds.
    pub ours_cpu_us_per_op: Option<f64>,
    /// nginx's CPU per request, µs, median of the rounds.
    pub nginx_cpu_us_per_op: Option<f64>,
    /// nginx's CPU per request over ours (above 1: ours spends less).
    pub cpu_efficiency_ratio: Option<f64>,
    /// Whether ours / nginx is at least 1.0; `None` without nginx.
    pub goal_met: Option<bool>,
}

/// What `mayfly bench proxy` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyBenchReport {
    /// Client connections.
    pub connections: usize,
    /// Each window, seconds.
    pub duration_secs: f64,
    /// Rounds.
    pub rounds: usize,
    /// The machine's cores, shared by the server under test, the upstream and the load
    /// generator.
    pub cores: usize,
    /// `nginx -v`, when nginx was run.
    pub nginx_version: Option<String>,
    /// Why nginx was not run, and how to get it.
    pub nginx_missing: Option<String>,
    /// What each target negotiated with the load generator.
    pub negotiated: Vec<String>,
    /// Every measurement, in the order run.
    pub runs: Vec<ProxyRun>,
    /// Keep-alive requests/s.
    pub keep_alive: LoadSummary,
    /// New-connection handshakes/s.
    pub new_connections: LoadSummary,
    /// Keep-alive requests/s, `--accept jwt` (a bearer token on every request) against
    /// `--accept x509`, both ours.
    pub jwt_keep_alive: JwtLoadSummary,
    /// New connections (a handshake without a client certificate and one request with a
    /// token), against `--accept x509`.
    pub jwt_new_connections: JwtLoadSummary,
    /// `jwt::validate` against the raw ES256 verify rate, per core.
    pub jwt_verify: JwtVerifyFigures,
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

impl fmt::Display for ProxyBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "mTLS proxy, GET / through to an in-process HTTP/1.1 upstream: ours (mayfly proxy, one thread: a current-thread runtime) vs nginx (worker_processes 1); {} client connections; {:.0}s windows after a warm-up; {} rounds alternating the targets; {} cores shared by server, upstream and load generator",
            self.connections, self.duration_secs, self.rounds, self.cores
        )?;
        match (&self.nginx_version, &self.nginx_missing) {
            (Some(v), _) => writeln!(f, "nginx: {v}")?,
            (None, Some(why)) => writeln!(f, "nginx NOT measured: {why}")?,
            (None, None) => {}
        }
        for n in &self.negotiated {
            writeln!(f, "negotiated: {n}")?;
        }
        writeln!(
            f,
            "{:<16} {:>5} {:>6} {:>11} {:>9} {:>9} {:>12} {:>6} {:>6}",
            "load",
            "round",
            "target",
            "per sec",
            "p50 µs",
            "p99 µs",
            "server µs/op",
            "busy",
            "errors"
        )?;
        for r in &self.runs {
            writeln!(
                f,
                "{:<16} {:>5} {:>6} {:>11.0} {:>9.0} {:>9.0} {:>12} {:>6} {:>6}",
                r.load,
                r.round,
                r.target,
                r.per_sec,
                r.p50_us,
                r.p99_us,
                opt(r.server_cpu_us_per_op, 1),
                r.server_busy
                    .map_or_else(|| "-".to_owned(), |b| format!("{:.0}%", b * 100.0)),
                r.errors
            )?;
            if let Some(e) = &r.first_error {
                writeln!(f, "{:>24} first error: {e}", "")?;
            }
        }
        for (s, what) in [
            (&self.keep_alive, "requests/s over keep-alive connections"),
            (
                &self.new_connections,
                "new-connection handshakes/s (one request each)",
            ),
        ] {
            write!(f, "{what}: ours {:.0}", s.ours_per_sec)?;
            match (s.nginx_per_sec, s.ratio) {
                (Some(n), Some(ratio)) => {
                    let rounds: Vec<String> =
                        s.round_ratios.iter().map(|r| format!("{r:.2}")).collect();
                    writeln!(
                        f,
                        ", nginx {n:.0}: ours/nginx {ratio:.2}x (rounds: {}); server CPU per op: ours {} µs, nginx {} µs (nginx/ours {}); goal >= {PROXY_GOAL_RATIO:.1}x {}",
                        rounds.join(", "),
                        opt(s.ours_cpu_us_per_op, 1),
                        opt(s.nginx_cpu_us_per_op, 1),
                        opt(s.cpu_efficiency_ratio, 2),
                        met(s.goal_met == Some(true))
                    )?;
                }
                _ => writeln!(f, "; server CPU per op {} µs", opt(s.ours_cpu_us_per_op, 1))?,
            }
        }
        for s in [&self.jwt_keep_alive, &self.jwt_new_connections] {
            let rounds: Vec<String> = s.round_ratios.iter().map(|r| format!("{r:.2}")).collect();
            write!(
                f,
                "--accept jwt vs --accept x509 ({}): jwt {:.0}/s, x509 {:.0}/s: {} (rounds: {}); server CPU per op: jwt {} µs, x509 {} µs",
                s.load,
                s.jwt_per_sec,
                s.x509_per_sec,
                s.ratio
                    .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x")),
                rounds.join(", "),
                opt(s.jwt_cpu_us_per_op, 1),
                opt(s.x509_cpu_us_per_op, 1),
            )?;
            match s.goal_met {
                Some(ok) => writeln!(f, "; goal >= {JWT_PROXY_GOAL_RATIO:.1}x {}", met(ok))?,
                None => writeln!(f)?,
            }
        }
        writeln!(f, "{}", self.jwt_verify)?;
        write!(
            f,
            "(a shared machine, and server, upstream and load generator compete for its cores: compare within a round, and rerun to see the spread)"
        )
    }
}

/// A thread running a current-thread runtime until told to stop.
struct ServerThread {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The thread's id, for its CPU time.
    tid: i32,
    addr: SocketAddr,
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl ServerThread {
    /// Starts `serve` on its own thread and current-thread runtime; `serve` gets the stop
    /// signal and reports its address (or why it failed) once listening.
    async fn start<F, Fut>(name: &str, serve: F) -> Result<Self, MtlsBenchError>
    where
        F: FnOnce(
                oneshot::Receiver<()>,
                oneshot::Sender<Result<SocketAddr, MtlsBenchError>>,
            ) -> Fut
            + Send
            + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (tid_tx, tid_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let _ = tid_tx.send(nix::unistd::gettid().as_raw());
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(MtlsBenchError::Io {
                            what: "start a runtime".into(),
                            source: e,
                        }));
                        return;
                    }
                };
                runtime.block_on(serve(stop_rx, ready_tx));
            })
            .map_err(io_err(format!("start the {name} thread")))?;
        let tid = tid_rx
            .await
            .map_err(|e| MtlsBenchError::Task(e.to_string()))?;
        let mut this = Self {
            stop: Some(stop_tx),
            thread: Some(thread),
            tid,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        this.addr = ready_rx
            .await
            .map_err(|_| MtlsBenchError::Task(format!("the {name} thread ended early")))??;
        Ok(this)
    }

    fn cpu_ns(&self) -> Option<u64> {
        schedstat_ns(&format!("/proc/self/task/{}/schedstat", self.tid))
    }
}

/// The first field of a schedstat file: time spent running, ns.
fn schedstat_ns(path: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The upstream: `ok\n` to every request, HTTP/1.1 keep-alive.
async fn start_upstream() -> Result<ServerThread, MtlsBenchError> {
    ServerThread::start("bench-upstream", |mut stop, ready| async move {
        let listener = match tokio::net::TcpListener::bind(("127.0.0.1", 0)).await {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(MtlsBenchError::Io {
                    what: "bind the upstream".into(),
                    source: e,
                }));
                return;
            }
        };
        let _ = ready.send(listener.local_addr().map_err(io_err("bind the upstream")));
        loop {
            let tcp = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(_) => continue,
                },
                _ = &mut stop => return,
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(BODY),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    })
    .await
}

/// Our proxy, on its own thread: accepting `accept`, with `jwt` bundles for bearer tokens.
async fn start_ours(
    pki: &BenchPki,
    upstream: SocketAddr,
    accept: Accept,
    jwt: Option<JwtBundleSource>,
) -> Result<ServerThread, MtlsBenchError> {
    let source = pki.source(&pki.server)?;
    let routes = Routes::parse(&[format!("GET / {SCOPE}")])
        .map_err(|e| MtlsBenchError::InvalidOption(e.to_string()))?;
    let config = ProxyConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        upstream,
        mode: ProxyMode::Http(routes),
        policy: PeerPolicy::any_id(),
        own_id: None,
        accept,
    };
    ServerThread::start("bench-proxy", move |stop, ready| async move {
        let started = match jwt {
            Some(jwt) => mayfly::proxy::start_with_jwt(config, source, jwt).await,
            None => mayfly::proxy::start(config, source).await,
        };
        match started {
            Ok(running) => {
                let _ = ready.send(Ok(running.local_addr));
                let _ = stop.await;
                running.shutdown().await;
            }
            Err(e) => {
                let _ = ready.send(Err(e.into()));
            }
        }
    })
    .await
}

/// nginx as a child process: SIGQUIT (graceful) then SIGKILL when dropped.
struct Nginx {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
    worker: Option<i32>,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: nginx's graceful shutdown.
        super::deploy::stop_child(&mut self.child, nix::sys::signal::Signal::SIGQUIT);
    }
}

impl Nginx {
    fn cpu_ns(&self) -> Option<u64> {
        schedstat_ns(&format!("/proc/{}/schedstat", self.worker?))
    }

    fn error_log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }
}

/// `nginx -v`, or why it cannot run.
fn nginx_version(exe: &Path) -> Result<String, String> {
    match Command::new(exe).arg("-v").output() {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            Ok(text
                .strip_prefix("nginx version: ")
                .unwrap_or(&text)
                .to_owned())
        }
        Ok(out) => Err(format!(
            "{} -v failed ({}): {}",
            exe.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!(
            "there is no nginx at {} ({e}); install it with `apt-get install -y nginx` (Debian, Ubuntu) or give its path with --nginx",
            exe.display()
        )),
    }
}

/// A free local port, for nginx to bind.
fn free_port() -> Result<u16, MtlsBenchError> {
    let listener = StdListener::bind(("127.0.0.1", 0)).map_err(io_err("find a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(io_err("find a free port"))?
        .port())
}

fn nginx_config(dir: &Path, port: u16, upstream: SocketAddr) -> String {
    let d = dir.display();
    format!(
        r#"# Generated by mayfly bench proxy.
daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream bench_upstream {{
        server {upstream};
        keepalive 64;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        keepalive_requests 100000000;
        ssl_protocols TLSv1.3;
        ssl_certificate {d}/server.pem;
        ssl_certificate_key {d}/server.key;
        ssl_client_certificate {d}/ca.pem;
        ssl_verify_client on;
        ssl_verify_depth 2;
        ssl_session_cache off;
        ssl_session_tickets off;
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#
    )
}

/// Writes the certificates and the config into `dir` and starts nginx; returns once it
/// accepts connections and its worker is known.
async fn start_nginx(
    exe: &Path,
    dir: &Path,
    pki: &BenchPki,
    upstream: SocketAddr,
) -> Result<Nginx, MtlsBenchError> {
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(io_err(format!("write {}", path.display())))
    };
    write(
        "server.pem",
        pki.server
            .chain
            .iter()
            .map(|c| pem_block("CERTIFICATE", c))
            .collect(),
    )?;
    write(
        "server.key",
        pem_block("PRIVATE KEY", &pki.server.key_pkcs8),
    )?;
    write(
        "ca.pem",
        pki.authority
            .bundle_roots()
            .iter()
            .map(|c| pem_block("CERTIFICATE", c))
            .collect(),
    )?;
    let port = free_port()?;
    let conf = dir.join("nginx.conf");
    write("nginx.conf", nginx_config(dir, port, upstream))?;
    let child = Command::new(exe)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io_err(format!("start {}", exe.display())))?;
    let mut nginx = Nginx {
        child,
        dir: dir.to_owned(),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        worker: None,
    };
    let deadline = Instant::now() + NGINX_START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = nginx.child.try_wait() {
            return Err(MtlsBenchError::Nginx(format!(
                "nginx exited ({status}); its error log ends with:\n{}",
                nginx.error_log_tail()
            )));
        }
        if nginx.worker.is_none() {
            nginx.worker = child_of(nginx.child.id());
        }
        if nginx.worker.is_some() && TcpStream::connect(nginx.addr).await.is_ok() {
            return Ok(nginx);
        }
        if Instant::now() > deadline {
            return Err(MtlsBenchError::Nginx(format!(
                "nginx did not accept connections on {} within {NGINX_START_TIMEOUT:?}; its error log ends with:\n{}",
                nginx.addr,
                nginx.error_log_tail()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process of `parent` (nginx's one worker), from /proc.
fn child_of(parent: u32) -> Option<i32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command name's ')': state, then the parent's pid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            return Some(pid);
        }
    }
    None
}

/// The load generator's TLS config: the client SVID, the CA as the only root (the server is
/// checked as `localhost`, which both servers' certificate names), X25519 only, TLS 1.3, no
/// resumption, ALPN `http/1.1`.
fn client_config(pki: &BenchPki) -> Result<Arc<ClientConfig>, MtlsBenchError> {
    let base = mayfly::mtls::provider();
    let provider = CryptoProvider {
        kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
        ..(*base).clone()
    };
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(pki.root_store()?)
        .with_client_auth_cert(pki.client.chain.clone(), pki.client.key())?;
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// [`client_config`] without a client certificate: the bearer-token client.
fn token_client_config(pki: &BenchPki) -> Result<Arc<ClientConfig>, MtlsBenchError> {
    let base = mayfly::mtls::provider();
    let provider = CryptoProvider {
        kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
        ..(*base).clone()
    };
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(pki.root_store()?)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One connection of the load generator. Dropped, it closes in the background as a client
/// does (hyper shuts the connection down once its request side is gone: TLS close_notify,
/// then FIN).
struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    task: tokio::task::JoinHandle<()>,
}

impl Connection {
    /// Closes and waits until the connection has ended.
    async fn close(self) {
        drop(self.sender);
        let _ = self.task.await;
    }
}

async fn connect(addr: SocketAddr, tls: &TlsConnector) -> Result<(Connection, String), String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(SERVER_DNS).map_err(|e| e.to_string())?;
    let stream = tls
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let (_, conn) = stream.get_ref();
    let negotiated = format!(
        "{:?}, {:?}, ALPN {:?}",
        conn.negotiated_cipher_suite().map(|s| s.suite()),
        conn.negotiated_key_exchange_group().map(|g| g.name()),
        conn.alpn_protocol().map(String::from_utf8_lossy)
    );
    let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let task = tokio::spawn(async move {
        let _ = driver.await;
    });
    Ok((Connection { sender, task }, negotiated))
}

async fn request(
    connection: &mut Connection,
    bearer: Option<&http::HeaderValue>,
) -> Result<(), String> {
    connection
        .sender
        .ready()
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let mut request = hyper::Request::get("/")
        .header(http::header::HOST, SERVER_DNS)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    if let Some(bearer) = bearer {
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, bearer.clone());
    }
    let response = connection
        .sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("response body: {e}"))?
        .to_bytes();
    if status != http::StatusCode::OK || body.as_ref() != BODY {
        return Err(format!(
            "answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    Ok(())
}

/// One load task's tally.
#[derive(Default)]
struct Tally {
    completed: u64,
    errors: u64,
    first_error: Option<String>,
    latencies_us: Vec<u32>,
}

impl Tally {
    fn record(&mut self, outcome: Result<(), String>, sent: Instant, window: (Instant, Instant)) {
        let done = Instant::now();
        match outcome {
            Ok(()) if done >= window.0 && done < window.1 => {
                self.completed += 1;
                let us = done.duration_since(sent).as_micros();
                self.latencies_us
                    .push(u32::try_from(us).unwrap_or(u32::MAX));
            }
            Ok(()) => {}
            Err(e) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(e);
                }
            }
        }
    }
}

async fn timed<T>(f: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(REQUEST_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_TIMEOUT:?}")))
}

async fn load_task(
    load: Load,
    addr: SocketAddr,
    tls: TlsConnector,
    bearer: Option<http::HeaderValue>,
    window: (Instant, Instant),
    stop: Arc<AtomicBool>,
) -> Tally {
    let bearer = bearer.as_ref();
    let mut tally = Tally::default();
    let mut kept: Option<Connection> = None;
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let outcome = match load {
            Load::KeepAlive => {
                timed(async {
                    if kept.is_none() {
                        kept = Some(connect(addr, &tls).await?.0);
                    }
                    let connection = kept.as_mut().ok_or("no connection")?;
                    request(connection, bearer).await
                })
                .await
            }
            Load::NewConnections => {
                timed(async {
                    let (mut connection, _) = connect(addr, &tls).await?;
                    request(&mut connection, bearer).await?;
                    connection.close().await;
                    Ok(())
                })
                .await
            }
        };
        if outcome.is_err() && load == Load::KeepAlive {
            kept = None;
        }
        tally.record(outcome, sent, window);
    }
    if let Some(connection) = kept {
        connection.close().await;
    }
    tally
}

/// One target under load: where it listens and how to read its CPU time.
struct Target<'a> {
    name: &'static str,
    addr: SocketAddr,
    cpu_ns: Box<dyn Fn() -> Option<u64> + 'a>,
    /// The client's TLS config (with or without its certificate).
    tls: TlsConnector,
    /// `Bearer <token>` on every request, for the JWT proxy.
    bearer: Option<http::HeaderValue>,
}

async fn measure(
    target: &Target<'_>,
    load: Load,
    round: usize,
    opts: &ProxyBenchOptions,
) -> Result<ProxyRun, MtlsBenchError> {
    let start = Instant::now();
    let window = (start + opts.warmup, start + opts.warmup + opts.duration);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..opts.connections {
        tasks.spawn(load_task(
            load,
            target.addr,
            target.tls.clone(),
            target.bearer.clone(),
            window,
            stop.clone(),
        ));
    }
    tokio::time::sleep_until(window.0.into()).await;
    let cpu_start = (target.cpu_ns)();
    tokio::time::sleep_until(window.1.into()).await;
    let cpu_end = (target.cpu_ns)();
    stop.store(true, Ordering::Relaxed);
    let mut total = Tally::default();
    while let Some(joined) = tasks.join_next().await {
        let tally = joined.map_err(|e| MtlsBenchError::Task(e.to_string()))?;
        total.completed += tally.completed;
        total.errors += tally.errors;
        if total.first_error.is_none() {
            total.first_error = tally.first_error;
        }
        total.latencies_us.extend(tally.latencies_us);
    }
    // Let the server close what the load left before the next measurement.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let secs = opts.duration.as_secs_f64();
    let cpu = cpu_start
        .zip(cpu_end)
        .map(|(a, b)| b.saturating_sub(a) as f64);
    total.latencies_us.sort_unstable();
    let at = |q: f64| super::percentile_ms(&total.latencies_us, q) * 1000.0;
    Ok(ProxyRun {
        target: target.name.to_owned(),
        load: load.name().to_owned(),
        round,
        completed: total.completed,
        per_sec: total.completed as f64 / secs,
        p50_us: at(0.50),
        p99_us: at(0.99),
        server_cpu_us_per_op: cpu
            .filter(|_| total.completed > 0)
            .map(|ns| ns / 1000.0 / total.completed as f64),
        server_busy: cpu.map(|ns| ns / 1e9 / secs),
        errors: total.errors,
        first_error: total.first_error,
    })
}

fn summarize(runs: &[ProxyRun], load: Load, with_nginx: bool) -> LoadSummary {
    let of = |target: &str| -> Vec<&ProxyRun> {
        runs.iter()
            .filter(|r| r.load == load.name() && r.target == target)
            .collect()
    };
    let ours = of("ours");
    let nginx = of("nginx");
    let med = |v: &[&ProxyRun], f: fn(&ProxyRun) -> Option<f64>| -> Option<f64> {
        let mut values: Vec<f64> = v.iter().filter_map(|r| f(r)).collect();
        (!values.is_empty()).then(|| median(&mut values))
    };
    let ours_per_sec = med(&ours, |r| Some(r.per_sec)).unwrap_or(0.0);
    let nginx_per_sec = if with_nginx {
        med(&nginx, |r| Some(r.per_sec))
    } else {
        None
    };
    let ratio = nginx_per_sec.filter(|n| *n > 0.0).map(|n| ours_per_sec / n);
    let round_ratios = ours
        .iter()
        .zip(&nginx)
        .filter(|(_, n)| n.per_sec > 0.0)
        .map(|(o, n)| o.per_sec / n.per_sec)
        .collect();
    let ours_cpu = med(&ours, |r| r.server_cpu_us_per_op);
    let nginx_cpu = med(&nginx, |r| r.server_cpu_us_per_op);
    LoadSummary {
        load: load.name().to_owned(),
        ours_per_sec,
        nginx_per_sec,
        ratio,
        round_ratios,
        ours_cpu_us_per_op: ours_cpu,
        nginx_cpu_us_per_op: nginx_cpu,
        cpu_efficiency_ratio: ours_cpu
            .zip(nginx_cpu)
            .filter(|(o, _)| *o > 0.0)
            .map(|(o, n)| n / o),
        goal_met: ratio.map(|r| r >= PROXY_GOAL_RATIO),
    }
}

/// `--accept jwt` (target `ours-jwt`) against `--accept x509` (target `ours`) for `load`.
fn summarize_jwt(runs: &[ProxyRun], load: Load) -> JwtLoadSummary {
    let of = |target: &str| -> Vec<&ProxyRun> {
        runs.iter()
            .filter(|r| r.load == load.name() && r.target == target)
            .collect()
    };
    let (x509, jwt) = (of("ours"), of("ours-jwt"));
    let med = |v: &[&ProxyRun], f: fn(&ProxyRun) -> Option<f64>| -> Option<f64> {
        let mut values: Vec<f64> = v.iter().filter_map(|r| f(r)).collect();
        (!values.is_empty()).then(|| median(&mut values))
    };
    let x509_per_sec = med(&x509, |r| Some(r.per_sec)).unwrap_or(0.0);
    let jwt_per_sec = med(&jwt, |r| Some(r.per_sec)).unwrap_or(0.0);
    let ratio = (x509_per_sec > 0.0).then(|| jwt_per_sec / x509_per_sec);
    JwtLoadSummary {
        load: load.name().to_owned(),
        x509_per_sec,
        jwt_per_sec,
        ratio,
        round_ratios: jwt
            .iter()
            .zip(&x509)
            .filter(|(_, x)| x.per_sec > 0.0)
            .map(|(j, x)| j.per_sec / x.per_sec)
            .collect(),
        x509_cpu_us_per_op: med(&x509, |r| r.server_cpu_us_per_op),
        jwt_cpu_us_per_op: med(&jwt, |r| r.server_cpu_us_per_op),
        goal_met: (load == Load::KeepAlive)
            .then(|| ratio.is_some_and(|r| r >= JWT_PROXY_GOAL_RATIO)),
    }
}

/// Runs `mayfly bench proxy`.
///
/// Call it on a multi-threaded runtime: the load generator runs on it; the upstream and our
/// proxy get threads of their own, nginx one worker process.
///
/// # Errors
/// [`MtlsBenchError`] when a server cannot be set up; failing requests are counted instead.
pub async fn proxy_benchmark(opts: ProxyBenchOptions) -> Result<ProxyBenchReport, MtlsBenchError> {
    if opts.connections == 0 || opts.rounds == 0 || opts.duration.is_zero() {
        return Err(MtlsBenchError::InvalidOption(
            "connections, rounds and the duration must be above zero".into(),
        ));
    }
    let pki = BenchPki::generate()?;
    let tls = TlsConnector::from(client_config(&pki)?);
    let token_tls = TlsConnector::from(token_client_config(&pki)?);
    let bench_jwt = BenchJwt::generate(&pki.client)?;
    let bearer = http::HeaderValue::try_from(format!("Bearer {}", bench_jwt.token))
        .map_err(|e| MtlsBenchError::Handshake(e.to_string()))?;
    let upstream = start_upstream().await?;
    let ours = start_ours(&pki, upstream.addr, Accept::default(), None).await?;
    let ours_jwt = start_ours(
        &pki,
        upstream.addr,
        BenchJwt::accept(),
        Some(bench_jwt.source()),
    )
    .await?;

    let (nginx_version, nginx_missing) = match nginx_version(&opts.nginx) {
        Ok(v) => (Some(v), None),
        Err(why) => (None, Some(why)),
    };
    let temp = TempDir::create().map_err(|e| MtlsBenchError::Nginx(e.to_string()))?;
    let nginx = match &nginx_version {
        Some(_) => Some(start_nginx(&opts.nginx, &temp.0, &pki, upstream.addr).await?),
        None => None,
    };

    let mut targets = vec![
        Target {
            name: "ours",
            addr: ours.addr,
            cpu_ns: Box::new(|| ours.cpu_ns()),
            tls: tls.clone(),
            bearer: None,
        },
        Target {
            name: "ours-jwt",
            addr: ours_jwt.addr,
            cpu_ns: Box::new(|| ours_jwt.cpu_ns()),
            tls: token_tls.clone(),
            bearer: Some(bearer),
        },
    ];
    if let Some(nginx) = &nginx {
        targets.push(Target {
            name: "nginx",
            addr: nginx.addr,
            cpu_ns: Box::new(|| nginx.cpu_ns()),
            tls: tls.clone(),
            bearer: None,
        });
    }

    let mut negotiated = Vec::new();
    for target in &targets {
        let (mut connection, what) = timed(connect(target.addr, &target.tls))
            .await
            .map_err(|e| MtlsBenchError::Handshake(format!("{}: {e}", target.name)))?;
        timed(request(&mut connection, target.bearer.as_ref()))
            .await
            .map_err(|e| MtlsBenchError::Handshake(format!("{}: {e}", target.name)))?;
        negotiated.push(format!("{}: {what}", target.name));
    }

    let mut runs = Vec::new();
    for round in 1..=opts.rounds {
        for load in [Load::KeepAlive, Load::NewConnections] {
            for target in &targets {
                runs.push(measure(target, load, round, &opts).await?);
            }
        }
    }
    drop(targets);
    drop(nginx);
    drop(ours);
    drop(ours_jwt);
    drop(upstream);
    drop(temp);

    // With every server stopped, on a thread of its own: the per-core validation figure.
    let iterations = opts.jwt_verify_iterations.max(1);
    let rounds = opts.rounds.max(3);
    let jwt_verify = tokio::task::spawn_blocking(move || {
        super::jwt::verify_rate(&bench_jwt, iterations, rounds)
    })
    .await
    .map_err(|e| MtlsBenchError::Task(e.to_string()))??;

    let with_nginx = nginx_version.is_some();
    Ok(ProxyBenchReport {
        connections: opts.connections,
        duration_secs: opts.duration.as_secs_f64(),
        rounds: opts.rounds,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        nginx_version,
        nginx_missing,
        negotiated,
        keep_alive: summarize(&runs, Load::KeepAlive, with_nginx),
        new_connections: summarize(&runs, Load::NewConnections, with_nginx),
        jwt_keep_alive: summarize_jwt(&runs, Load::KeepAlive),
        jwt_new_connections: summarize_jwt(&runs, Load::NewConnections),
        jwt_verify,
        runs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short run against ours only (no nginx), to check the benchmark works.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proxy_benchmark_runs_without_nginx() {
        let report = proxy_benchmark(ProxyBenchOptions {
            duration: Duration::from_millis(300),
            warmup: Duration::from_millis(100),
            connections: 2,
            rounds: 1,
            nginx: PathBuf::from("/nonexistent/nginx"),
            jwt_verify_iterations: 20,
        })
        .await
        .unwrap();
        assert!(
            report
                .nginx_missing
                .as_deref()
                .unwrap()
                .contains("apt-get install")
        );
        // Both loads on ours with --accept x509 and with --accept jwt.
        assert_eq!(report.runs.len(), 4);
        for run in &report.runs {
            assert_eq!(run.errors, 0, "{:?}", run.first_error);
            assert!(run.completed > 0, "{run:?}");
        }
        assert!(report.keep_alive.ratio.is_none());
        assert!(report.jwt_keep_alive.ratio.is_some());
        assert!(report.jwt_keep_alive.goal_met.is_some());
        assert!(report.jwt_verify.validate_per_sec > 0.0);
        assert!(!report.to_string().is_empty());
    }
}

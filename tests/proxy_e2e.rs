//! `mayfly proxy` end to end, everything real: `mayfly server run`, `mayfly agent run` and
//! `mayfly proxy` as processes of the built binary, curl and `openssl s_client` as clients with
//! the files `mayfly svid mint|fetch --write` leaves, and an upstream started here that answers
//! `METHOD PATH` and every `x-mayfly-*` header it received, one per line.
//!
//! The test process, the proxy and the clients all run as uid 0, so every entry (selector
//! `unix:uid:0`) matches every process: the proxy picks its identity with `--spiffe-id`, and
//! mints pick theirs with `--spiffe-id`. Only the proxy's entry has the DNS name `localhost`,
//! which is what curl and openssl verify the proxy's certificate against, with the trust
//! bundle as the only CA.
//!
//! Every refusal comes after a positive control on the same fixture.

mod common;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::cluster::{BIN, Cluster, Proc, free_port};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mayfly::id::SpiffeId;
use mayfly::mtls::{self, PeerPolicy, SvidSource};
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const PROXY_ID: &str = "spiffe://mayfly.local/services/proxy";
const BOT_ID: &str = "spiffe://mayfly.local/agents/billing-bot";
const READ: &str = "stripe:read:customers";
const WRITE: &str = "stripe:write:refunds";
const ROUTE_READ: &str = "GET /customers stripe:read:customers";
const ROUTE_WRITE: &str = "POST /refunds stripe:write:refunds";

/// curl's exit code when the server refused its certificate. Under TLS 1.3 the client finishes
/// its side of the handshake before the server has judged its certificate, so curl learns of the
/// refusal from the server's alert on its first read: 56, "OpenSSL SSL_read: ... alert ...".
const CURL_REFUSED_BY_ALERT: i32 = 56;

// ---------------------------------------------------------------------------------------------
// The upstreams.

/// An HTTP/1.1 upstream that answers `METHOD PATH` and then each `x-mayfly-*` header it got,
/// `name: value`, one per line, sorted; it remembers the request lines it answered.
struct EchoUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl EchoUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let record = record.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: http::Request<Incoming>| {
                            let record = record.clone();
                            async move {
                                let line = format!("{} {}", req.method(), req.uri().path());
                                record.lock().unwrap().push(line.clone());
                                let mut headers: Vec<String> = req
                                    .headers()
                                    .iter()
                                    .filter(|(name, _)| name.as_str().starts_with("x-mayfly-"))
                                    .map(|(name, value)| {
                                        format!("{name}: {}", value.to_str().unwrap_or("<binary>"))
                                    })
                                    .collect();
                                headers.sort();
                                let mut body = line + "\n";
                                for header in headers {
                                    body.push_str(&header);
                                    body.push('\n');
                                }
                                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(
                                    body,
                                ))))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Self { addr, seen }
    }

    fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// How many requests it has answered.
    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// A TCP upstream that reads one line, answers `echo: <line>` and closes.
async fn line_echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (read, mut write) = tcp.into_split();
                let mut line = String::new();
                let mut reader = tokio::io::BufReader::new(read);
                if reader.read_line(&mut line).await.is_ok() {
                    let _ = write.write_all(format!("echo: {line}").as_bytes()).await;
                }
                let _ = write.shutdown().await;
            });
        }
    });
    addr
}

// ---------------------------------------------------------------------------------------------
// The cluster, the proxy process and the credentials.

/// A server and an agent, with the proxy's entry (`--dns localhost`, and `--ttl` when given)
/// and `entries` (SPIFFE ID, extra `entry create` flags), all for uid 0.
fn cluster_with(proxy_ttl: Option<&str>, entries: &[(&str, &[&str])]) -> Cluster {
    // 10 s SVIDs, below the entry TTL floor, so that rotations come within the test's time.
    let mut cluster = Cluster::start_with(&["--min-entry-ttl", "10s"]);
    cluster.start_agent();
    let mut proxy_args = vec!["--selector", "unix:uid:0", "--dns", "localhost"];
    if let Some(ttl) = proxy_ttl {
        proxy_args.extend_from_slice(&["--ttl", ttl]);
    }
    cluster.create_entry(PROXY_ID, &proxy_args);
    for (id, extra) in entries {
        let mut args = vec!["--selector", "unix:uid:0"];
        args.extend_from_slice(extra);
        cluster.create_entry(id, &args);
    }
    cluster
}

/// A running `mayfly proxy` and its log (stderr, without colours).
struct Proxy {
    _proc: Proc,
    port: u16,
    log: PathBuf,
}

impl Proxy {
    /// `mayfly proxy --listen 127.0.0.1:<free> --socket <agent> --spiffe-id <proxy> ARGS`.
    fn start(cluster: &Cluster, name: &str, args: &[&str]) -> Self {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let endpoint = cluster.endpoint();
        let mut all = vec![
            "--listen",
            &listen,
            "--socket",
            &endpoint,
            "--spiffe-id",
            PROXY_ID,
        ];
        all.extend_from_slice(args);
        Self::start_raw(cluster, name, port, &all)
    }

    /// `mayfly proxy ARGS`, which must listen on `port`; waits until it says it runs.
    fn start_raw(cluster: &Cluster, name: &str, port: u16, args: &[&str]) -> Self {
        let log = cluster.path(&format!("{name}.log"));
        let stderr = std::fs::File::create(&log).expect("proxy log");
        let child = Command::new(BIN)
            .arg("proxy")
            .args(args)
            .current_dir(cluster.dir.path())
            .env_remove("SPIFFE_ENDPOINT_SOCKET")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn mayfly proxy");
        let mut proxy = Self {
            _proc: Proc(child),
            port,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(40);
        while !proxy.log().contains("mayfly proxy running") {
            if let Ok(Some(status)) = proxy._proc.0.try_wait() {
                panic!("mayfly proxy exited ({status}):\n{}", proxy.log());
            }
            assert!(
                Instant::now() < deadline,
                "mayfly proxy did not start:\n{}",
                proxy.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        proxy
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to 5 s for a log line holding every one of `needles`; returns it.
    fn wait_log_line(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.log();
            if let Some(line) = log
                .lines()
                .find(|line| needles.iter().all(|n| line.contains(n)))
            {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no proxy log line with {needles:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How many log lines hold `needle`.
    fn count_log(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }
}

/// The files of one SVID, as `--write` leaves them, and what the command printed.
struct Creds {
    dir: PathBuf,
    spiffe_id: String,
    serial: String,
    not_after: i64,
}

impl Creds {
    fn cert(&self) -> PathBuf {
        self.dir.join("svid.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.join("svid.key")
    }

    fn bundle(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }

    fn from_output(dir: PathBuf, out: &Output) -> Self {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("svid json");
        Self {
            dir,
            spiffe_id: v["spiffe_id"].as_str().expect("spiffe_id").to_owned(),
            serial: v["serial"].as_str().expect("serial").to_owned(),
            not_after: v["not_after"].as_i64().expect("not_after"),
        }
    }
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `mayfly svid mint` for entry `id` with `scopes` into `<cluster>/<name>`, retried for up to
/// 10 s while the agent has not synced the entry yet.
fn mint(cluster: &Cluster, name: &str, id: &str, scopes: &[&str], ttl: Option<&str>) -> Creds {
    let dir = cluster.path(name);
    let dir_text = dir.display().to_string();
    let task = format!("task-{name}");
    let mut args = vec!["svid", "mint", "--task", &task, "--spiffe-id", id];
    for scope in scopes {
        args.extend_from_slice(&["--scope", scope]);
    }
    if let Some(ttl) = ttl {
        args.extend_from_slice(&["--ttl", ttl]);
    }
    args.extend_from_slice(&["--write", &dir_text, "--output", "json"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = cluster.mayfly(&args);
        if out.status.success() {
            return Creds::from_output(dir, &out);
        }
        assert!(
            Instant::now() < deadline,
            "mint {name} failed: {}",
            stderr_of(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `mayfly svid fetch --write <cluster>/<name> [--spiffe-id ID]`: an identity SVID of this
/// process (its default one when `id` is `None`).
fn fetch_as(cluster: &Cluster, name: &str, id: Option<&str>) -> Creds {
    let dir = cluster.path(name);
    let dir_text = dir.display().to_string();
    let mut args = vec!["svid", "fetch", "--write", &dir_text, "--output", "json"];
    if let Some(id) = id {
        args.extend(["--spiffe-id", id]);
    }
    let out = cluster.mayfly(&args);
    assert!(out.status.success(), "fetch failed: {}", stderr_of(&out));
    Creds::from_output(dir, &out)
}

/// Runs `cmd` with `input` on its stdin, killed after `limit`.
fn run_timed(mut cmd: Command, input: &[u8], limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn client");
    let mut stdin = child.stdin.take().expect("stdin");
    let _ = stdin.write_all(input);
    drop(stdin);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let waiter = std::thread::spawn(move || child.wait_with_output());
    let deadline = Instant::now() + limit;
    while !waiter.is_finished() {
        if Instant::now() > deadline {
            // Not reaped yet, so the pid is still this child's.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let out = waiter.join().expect("join").expect("output");
            panic!(
                "{cmd:?} did not finish in {limit:?}; stdout {:?}, stderr {:?}",
                String::from_utf8_lossy(&out.stdout),
                stderr_of(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    waiter.join().expect("join").expect("output")
}

/// What curl did.
#[derive(Debug)]
struct Curl {
    /// Its exit code.
    exit: i32,
    /// The HTTP status, `000` for none.
    status: String,
    /// The HTTP version used: `1.1` or `2` (`0` for none).
    version: String,
    body: String,
    stderr: String,
}

impl Curl {
    fn ok(&self, status: &str) -> &Self {
        assert_eq!(self.exit, 0, "curl failed: {self:?}");
        assert_eq!(self.status, status, "{self:?}");
        self
    }

    /// The handshake failed: the server's TLS alert, and no HTTP status at all.
    fn refused_in_handshake(&self) {
        assert_eq!(
            self.exit, CURL_REFUSED_BY_ALERT,
            "expected the server's alert: {self:?}"
        );
        assert!(
            self.stderr.contains("SSL_read") && self.stderr.contains("alert"),
            "curl shows the alert: {self:?}"
        );
        assert_eq!(self.status, "000", "no HTTP status: {self:?}");
        assert!(self.body.is_empty(), "{self:?}");
    }
}

const CURL_MARK: &str = "\n@@curl@@";

/// curl against the proxy at `https://localhost:<port><path>`, with `cert`/`key` as the client
/// SVID and `bundle` as the only CA.
fn curl_with(port: u16, cert: &Path, key: &Path, bundle: &Path, args: &[&str], path: &str) -> Curl {
    let mut cmd = Command::new("/usr/bin/curl");
    cmd.args(["-sS", "--max-time", "15", "--resolve"])
        .arg(format!("localhost:{port}:127.0.0.1"))
        .arg("--cacert")
        .arg(bundle)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args([
            "-w",
            &format!("{CURL_MARK}%{{http_code}} %{{http_version}}"),
        ])
        .args(args)
        .arg(format!("https://localhost:{port}{path}"));
    let out = run_timed(cmd, b"", Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = stdout
        .rsplit_once(CURL_MARK)
        .unwrap_or_else(|| panic!("no curl write-out in {stdout:?}"));
    let (status, version) = tail.trim().split_once(' ').expect("status and version");
    Curl {
        exit: out.status.code().unwrap_or(-1),
        status: status.to_owned(),
        version: version.to_owned(),
        body: body.to_owned(),
        stderr: stderr_of(&out),
    }
}

fn curl(proxy: &Proxy, creds: &Creds, args: &[&str], path: &str) -> Curl {
    curl_with(
        proxy.port,
        &creds.cert(),
        &creds.key(),
        &creds.bundle(),
        args,
        path,
    )
}

/// `openssl s_client` to the proxy with `creds`, verifying `localhost` against the bundle,
/// sending `line`; returns its output once the server closes.
fn s_client(port: u16, creds: &Creds, line: &str) -> Output {
    let mut cmd = Command::new("/usr/bin/openssl");
    cmd.args(["s_client", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .args([
            "-servername",
            "localhost",
            "-verify_hostname",
            "localhost",
            "-verify_return_error",
            "-quiet",
        ])
        .arg("-CAfile")
        .arg(creds.bundle())
        .arg("-cert")
        .arg(creds.cert())
        .arg("-key")
        .arg(creds.key());
    run_timed(cmd, line.as_bytes(), Duration::from_secs(20))
}

/// The expected body of the echo upstream for a forwarded request.
fn echoed(method_path: &str, id: &str, scopes: &str, serial: &str) -> String {
    format!(
        "{method_path}\nx-mayfly-scopes: {scopes}\nx-mayfly-serial: {serial}\nx-mayfly-spiffe-id: {id}\n"
    )
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// HTTP mode.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_routes_let_each_scope_do_exactly_its_route_over_http1_and_http2() {
    let cluster = cluster_with(None, &[(BOT_ID, &["--scope", READ, "--scope", WRITE])]);
    let upstream = EchoUpstream::start().await;
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        &[
            "--upstream",
            &upstream.addr(),
            "--route",
            ROUTE_READ,
            "--route",
            ROUTE_WRITE,
        ],
    );
    let read = mint(&cluster, "read", BOT_ID, &[READ], None);
    assert_eq!(
        read.spiffe_id,
        format!("{BOT_ID}/scope/stripe.read.customers")
    );

    // A read-scoped task SVID reads, over HTTP/1.1; the upstream sees the verified peer, not
    // the peer headers the client sent.
    let r = curl(
        &proxy,
        &read,
        &[
            "--http1.1",
            "-H",
            "x-mayfly-scopes: stripe:write:refunds",
            "-H",
            "x-mayfly-spiffe-id: spiffe://mayfly.local/agents/admin",
            "-H",
            "x-mayfly-serial: 00",
        ],
        "/customers/42",
    );
    r.ok("200");
    assert_eq!(r.version, "1.1");
    assert_eq!(
        r.body,
        echoed("GET /customers/42", BOT_ID, READ, &read.serial)
    );
    proxy.wait_log_line(&[
        "mayfly::access",
        "path=/customers/42",
        "decision=\"allow\"",
        "status=200",
        &read.serial,
    ]);

    // The same over HTTP/2.
    let r = curl(&proxy, &read, &["--http2"], "/customers");
    r.ok("200");
    assert_eq!(r.version, "2");
    assert_eq!(r.body, echoed("GET /customers", BOT_ID, READ, &read.serial));

    // It cannot write: 403 with one line naming the scope, and nothing reaches the upstream;
    // also when the refusal comes while the client is still sending its body.
    let before = upstream.count();
    let body = cluster.path("refund.json");
    std::fs::write(&body, vec![b'x'; 32 * 1024]).unwrap();
    let body = format!("@{}", body.display());
    for (version, data) in [
        ("--http1.1", "amount=100"),
        ("--http2", "amount=100"),
        ("--http1.1", body.as_str()),
        ("--http2", body.as_str()),
    ] {
        let r = curl(
            &proxy,
            &read,
            &[version, "-X", "POST", "--data-binary", data],
            "/refunds",
        );
        r.ok("403");
        assert_eq!(
            r.body,
            format!("POST /refunds needs scope {WRITE}, which {BOT_ID} does not carry\n")
        );
    }
    assert_eq!(upstream.count(), before, "a denied request was forwarded");
    proxy.wait_log_line(&["path=/refunds", "decision=\"deny\"", "status=403"]);

    // A write-scoped task SVID writes.
    let write = mint(&cluster, "write", BOT_ID, &[WRITE], None);
    let r = curl(
        &proxy,
        &write,
        &["-X", "POST", "--data", "amount=100"],
        "/refunds",
    );
    r.ok("200");
    assert_eq!(
        r.body,
        echoed("POST /refunds", BOT_ID, WRITE, &write.serial)
    );
    // ...and it cannot read: scopes are exact.
    curl(&proxy, &write, &[], "/customers").ok("403");

    // The identity SVID (no scopes) of the same entry can use no scoped route.
    // This process matches the proxy's entry too, created first (so its default identity):
    // the bot's is asked for by name.
    let identity = fetch_as(&cluster, "identity", Some(BOT_ID));
    assert_eq!(identity.spiffe_id, BOT_ID);
    let before = upstream.count();
    let r = curl(&proxy, &identity, &[], "/customers");
    r.ok("403");
    assert_eq!(
        r.body,
        format!("GET /customers needs scope {READ}, which {BOT_ID} does not carry\n")
    );
    // No route at all is a 403 too.
    let r = curl(&proxy, &read, &[], "/invoices");
    r.ok("403");
    assert_eq!(r.body, "no route allows GET /invoices\n");

    // A path not in normal form is refused before routing, even though it starts under a
    // route the SVID may use (positive control: /customers/42 above).
    for path in ["/customers/../refunds", "/customers/%2e%2e/refunds"] {
        let r = curl(&proxy, &read, &["--http1.1", "--path-as-is"], path);
        r.ok("400");
        assert!(r.body.contains("not in normal form"), "{r:?}");
        assert_eq!(r.body.lines().count(), 1);
    }
    assert_eq!(upstream.count(), before, "a refused request was forwarded");
    proxy.wait_log_line(&["decision=\"bad-path\"", "status=400"]);
}

/// A leaf with `id`, self-signed-CA-signed by a CA that claims trust domain `mayfly.local`:
/// written to `dir` as svid.pem (leaf, then the forged CA when `with_ca`) and svid.key.
fn forge(dir: &Path, id: &str, with_ca: bool) {
    let now = time::OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Mayfly");
    dn.push(DnType::CommonName, "Mayfly CA");
    ca.distinguished_name = dn;
    ca.subject_alt_names = vec![SanType::URI(
        Ia5String::try_from("spiffe://mayfly.local").unwrap(),
    )];
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = now - time::Duration::hours(1);
    ca.not_after = now + time::Duration::hours(24);
    ca.serial_number = Some(SerialNumber::from_slice(
        mayfly::svid::Serial::generate().as_bytes(),
    ));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let extra = if with_ca {
        ca_cert.pem()
    } else {
        String::new()
    };
    write_leaf(
        dir,
        id,
        &issuer,
        mayfly::svid::Serial::generate().as_bytes(),
        &extra,
    );
}

/// A profile leaf with `id` and the serial whose DER content octets are `serial`, signed by
/// `issuer`: written to `dir` as svid.pem (the leaf, then `extra_pem`) and svid.key.
fn write_leaf(dir: &Path, id: &str, issuer: &Issuer<'_, KeyPair>, serial: &[u8], extra_pem: &str) {
    let now = time::OffsetDateTime::now_utc();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Mayfly");
    leaf.distinguished_name = dn;
    leaf.subject_alt_names = vec![SanType::URI(Ia5String::try_from(id).unwrap())];
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.not_before = now - time::Duration::minutes(5);
    leaf.not_after = now + time::Duration::minutes(30);
    leaf.serial_number = Some(SerialNumber::from_slice(serial));
    let leaf_cert = leaf.signed_by(&key, issuer).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("svid.pem"), leaf_cert.pem() + extra_pem).unwrap();
    std::fs::write(dir.join("svid.key"), key.serialize_pem()).unwrap();
}

/// RFC 5280 §4.1.2.2 lets any CA use serials of up to 20 octets. A leaf signed by the trust
/// domain's own CA (read from the server's data dir, as another issuing tool would hold it)
/// with the 20-octet serial pyca's `random_serial_number()` makes passes the proxy; one with a
/// 21-octet serial is refused in the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_from_the_trust_domain_ca_with_a_20_octet_serial_is_accepted() {
    let cluster = cluster_with(None, &[(BOT_ID, &["--scope", READ])]);
    let upstream = EchoUpstream::start().await;
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        &["--upstream", &upstream.addr(), "--route", ROUTE_READ],
    );
    // Positive control: the read SVID the agent minted.
    let read = mint(&cluster, "read", BOT_ID, &[READ], None);
    curl(&proxy, &read, &[], "/customers").ok("200");

    // The signing CA's files, <CA ID>.key and .pem, as the CA journal names them.
    let cas: serde_json::Value =
        serde_json::from_str(&cluster.ok(&["ca", "list", "--output", "json"])).unwrap();
    let active = cas
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["state"] == "active")
        .expect("an active CA");
    let id = active["id"].as_str().unwrap();
    let ca_dir = cluster.path(".mayfly/server/ca");
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join(format!("{id}.key"))).unwrap())
            .unwrap();
    let ca_pem = std::fs::read_to_string(ca_dir.join(format!("{id}.pem"))).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    // pyca: a positive 159-bit integer, 20 octets of DER content.
    let mut pyca = [0u8; 20];
    aws_lc_rs::rand::fill(&mut pyca).unwrap();
    pyca[0] = (pyca[0] & 0x7f) | 0x40;
    let too_long = [&[0x01u8][..], &pyca].concat();

    for (name, serial, accepted) in [
        ("serial-20", &pyca[..], true),
        ("serial-21", &too_long, false),
    ] {
        let dir = cluster.path(name);
        write_leaf(&dir, &read.spiffe_id, &issuer, serial, "");
        let r = curl_with(
            proxy.port,
            &dir.join("svid.pem"),
            &dir.join("svid.key"),
            &cluster.path("bundle.pem"),
            &["--http1.1"],
            "/customers",
        );
        if accepted {
            r.ok("200");
        } else {
            r.refused_in_handshake();
        }
    }
    proxy.wait_log_line(&["handshake refused", "at most 20 octets"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_self_signed_svid_with_the_right_id_and_scope_is_refused_in_the_handshake() {
    let cluster = cluster_with(None, &[(BOT_ID, &["--scope", READ])]);
    let upstream = EchoUpstream::start().await;
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        &["--upstream", &upstream.addr(), "--route", ROUTE_READ],
    );
    // Positive control: the real read SVID.
    let read = mint(&cluster, "read", BOT_ID, &[READ], None);
    curl(&proxy, &read, &[], "/customers").ok("200");
    let before = upstream.count();

    // The same ID and scope from a self-signed CA that names the same trust domain, sent with
    // and without that CA in the chain.
    let forged_id = format!("{BOT_ID}/scope/stripe.read.customers");
    assert_eq!(forged_id, read.spiffe_id);
    for (name, with_ca) in [("forged-chain", true), ("forged-leaf", false)] {
        let dir = cluster.path(name);
        forge(&dir, &forged_id, with_ca);
        for version in ["--http1.1", "--http2"] {
            let r = curl_with(
                proxy.port,
                &dir.join("svid.pem"),
                &dir.join("svid.key"),
                &cluster.path("bundle.pem"),
                &[version],
                "/customers",
            );
            r.refused_in_handshake();
        }
    }
    assert_eq!(
        upstream.count(),
        before,
        "a forged SVID reached the upstream"
    );
    let line = proxy.wait_log_line(&[
        "mayfly::access",
        "handshake refused",
        "decision=\"deny\"",
        "does not lead to a root of its trust domain's bundle",
    ]);
    assert!(line.contains("remote=127.0.0.1:"), "{line}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.count_log("handshake refused") < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        proxy.count_log("handshake refused"),
        4,
        "one refusal per attempt:\n{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_svid_is_refused_in_the_handshake() {
    let cluster = cluster_with(None, &[(BOT_ID, &["--scope", READ])]);
    let upstream = EchoUpstream::start().await;
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        &["--upstream", &upstream.addr(), "--route", ROUTE_READ],
    );
    // The server accepts a 1 s task SVID. notAfter is whole seconds, so one minted just before
    // a second ends may already be over when curl runs: retry the positive control a few times
    // when (only when) that is what happened.
    let mut attempt = 0;
    let short = loop {
        attempt += 1;
        let short = mint(
            &cluster,
            &format!("short-{attempt}"),
            BOT_ID,
            &[READ],
            Some("1s"),
        );
        let life = short.not_after - now_secs();
        assert!(life <= 1, "asked for 1 s, got {life} s");
        let r = curl(&proxy, &short, &[], "/customers");
        if r.exit == 0 && r.status == "200" {
            break short;
        }
        assert!(
            now_secs() >= short.not_after && attempt < 5,
            "a fresh 1 s SVID was refused: {r:?}"
        );
    };
    // Wait until it has expired (webpki compares whole seconds: past notAfter by 1 s), then the
    // very same files are refused.
    while now_secs() <= short.not_after + 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = upstream.count();
    curl(&proxy, &short, &[], "/customers").refused_in_handshake();
    assert_eq!(upstream.count(), before);
    proxy.wait_log_line(&[
        "handshake refused",
        "a certificate of the chain has expired",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_id_admits_the_listed_identities_and_refuses_others_in_the_handshake() {
    let allowed = "spiffe://mayfly.local/agents/billing/bot-1";
    // Shares the string prefix, not the path segment.
    let other = "spiffe://mayfly.local/agents/billing-admin";
    let cluster = cluster_with(
        None,
        &[(allowed, &["--scope", READ]), (other, &["--scope", READ])],
    );
    let upstream = EchoUpstream::start().await;
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        &[
            "--upstream",
            &upstream.addr(),
            "--route",
            ROUTE_READ,
            "--allow-id",
            "spiffe://mayfly.local/agents/billing/*",
        ],
    );
    let ok = mint(&cluster, "allowed", allowed, &[READ], None);
    let r = curl(&proxy, &ok, &[], "/customers");
    r.ok("200");
    assert_eq!(r.body, echoed("GET /customers", allowed, READ, &ok.serial));

    let before = upstream.count();
    let refused = mint(&cluster, "other", other, &[READ], None);
    curl(&proxy, &refused, &[], "/customers").refused_in_handshake();
    assert_eq!(upstream.count(), before);
    proxy.wait_log_line(&[
        "handshake refused",
        "billing-admin",
        "matches none of spiffe://mayfly.local/agents/billing/*",
    ]);
}

// ---------------------------------------------------------------------------------------------
// TCP mode.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_mode_requires_the_scope_in_the_handshake_and_pipes_bytes_for_it() {
    let cluster = cluster_with(None, &[(BOT_ID, &["--scope", READ, "--scope", WRITE])]);
    let upstream = line_echo_upstream().await;
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        &[
            "--upstream",
            &upstream.to_string(),
            "--require-scope",
            WRITE,
        ],
    );
    assert!(proxy.log().contains("mode=\"tcp\""), "{}", proxy.log());

    // A write SVID gets through, bytes both ways.
    let write = mint(&cluster, "write", BOT_ID, &[WRITE], None);
    let out = s_client(proxy.port, &write, "refund 4711\n");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout, "echo: refund 4711\n", "{}", stderr_of(&out));
    proxy.wait_log_line(&["decision=\"allow\"", "12 bytes up, 18 down", &write.serial]);

    // A read SVID is refused in the handshake: under TLS 1.3 the client learns it from the
    // server's alert on its first read, after sending; nothing comes back.
    let read = mint(&cluster, "read", BOT_ID, &[READ], None);
    let out = s_client(proxy.port, &read, "refund 4711\n");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("echo"), "{stdout}");
    assert!(stderr_of(&out).contains("alert"), "{}", stderr_of(&out));
    proxy.wait_log_line(&[
        "handshake refused",
        "lacks the required scope 'stripe:write:refunds'",
    ]);
    // curl sees the same refusal.
    curl(&proxy, &read, &[], "/").refused_in_handshake();
}

// ---------------------------------------------------------------------------------------------
// Rotation under load.

/// Client side of the load: one TLS connection for `per_connection` requests of `GET /health`;
/// returns the proxy's serial seen in the handshake and the client serial the upstream was told.
async fn health_requests(
    connector: &TlsConnector,
    addr: SocketAddr,
    per_connection: usize,
) -> Result<(String, Vec<String>), String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let server = mtls::peer_of(tls.get_ref().1).ok_or("no verified server")?;
    assert_eq!(server.id.base().as_str(), PROXY_ID);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
            .await
            .map_err(|e| format!("http handshake: {e}"))?;
    tokio::spawn(connection);
    let mut client_serials = Vec::with_capacity(per_connection);
    for _ in 0..per_connection {
        sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let request = http::Request::get("/health")
            .header(http::header::HOST, "localhost")
            .body(Empty::new())
            .unwrap();
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        if status != http::StatusCode::OK {
            return Err(format!("status {status}: {body}"));
        }
        let serial = body
            .lines()
            .find_map(|l| l.strip_prefix("x-mayfly-serial: "))
            .ok_or_else(|| format!("no serial header upstream: {body}"))?;
        client_serials.push(serial.to_owned());
    }
    Ok((server.serial.to_hex(), client_serials))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_on_both_sides_under_load_fails_no_request() {
    const LOAD: Duration = Duration::from_secs(60);
    let client_id = "spiffe://mayfly.local/agents/load-bot";
    let cluster = cluster_with(Some("10s"), &[(client_id, &["--ttl", "10s"])]);
    let upstream = EchoUpstream::start().await;
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        &["--upstream", &upstream.addr(), "--route", "GET /health -"],
    );
    let source = SvidSource::spawn_for(cluster.socket(), Some(SpiffeId::parse(client_id).unwrap()));
    source
        .wait_ready(Duration::from_secs(15))
        .await
        .expect("the client's SVID");
    let mut config = mtls::client_config(&source, PeerPolicy::parse_ids(&[PROXY_ID]).unwrap())
        .expect("client config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = TlsConnector::from(Arc::new(config));
    let addr: SocketAddr = format!("127.0.0.1:{}", proxy.port).parse().unwrap();

    // Two clients for 60 s: one opens a connection per request, the other sends 5 requests
    // per connection.
    let start = Instant::now();
    let mut workers = Vec::new();
    for per_connection in [1usize, 5] {
        let connector = connector.clone();
        workers.push(tokio::spawn(async move {
            let mut server_serials = Vec::new();
            let mut client_serials = Vec::new();
            let mut failures = Vec::new();
            let mut requests = 0usize;
            while start.elapsed() < LOAD {
                let at = start.elapsed();
                requests += per_connection;
                match tokio::time::timeout(
                    Duration::from_secs(10),
                    health_requests(&connector, addr, per_connection),
                )
                .await
                {
                    Ok(Ok((server, clients))) => {
                        server_serials.push(server);
                        client_serials.extend(clients);
                    }
                    Ok(Err(e)) => failures.push(format!("at {at:?}: {e}")),
                    Err(_) => failures.push(format!("at {at:?}: timed out")),
                }
                // Continuous, yet leaving the two cores some room for the other tests.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (requests, server_serials, client_serials, failures)
        }));
    }
    let mut requests = 0;
    let mut failures = Vec::new();
    let mut server_serials: Vec<String> = Vec::new();
    let mut client_serials: Vec<String> = Vec::new();
    for worker in workers {
        let (n, servers, clients, failed) = worker.await.expect("worker");
        requests += n;
        server_serials.extend(servers);
        client_serials.extend(clients);
        failures.extend(failed);
    }
    assert!(
        failures.is_empty(),
        "{} of {requests} requests failed: {failures:#?}\nproxy log:\n{}",
        failures.len(),
        proxy.log()
    );
    let distinct_servers: BTreeSet<&String> = server_serials.iter().collect();
    let distinct_clients: BTreeSet<&String> = client_serials.iter().collect();
    println!(
        "{requests} requests in {:?}; {} proxy SVIDs, {} client SVIDs",
        start.elapsed(),
        distinct_servers.len(),
        distinct_clients.len()
    );
    assert!(requests >= 200, "only {requests} requests in 60 s");
    assert!(
        distinct_servers.len() >= 5,
        "the proxy's SVID changed only {} times",
        distinct_servers.len() - 1
    );
    assert!(
        distinct_clients.len() >= 5,
        "the client's SVID changed only {} times",
        distinct_clients.len() - 1
    );
    assert_eq!(upstream.count(), requests);
}

// ---------------------------------------------------------------------------------------------
// The live source against the real agent.

/// One handshake with `source` on both ends (an mTLS listener on 127.0.0.1 and a client);
/// returns the serial of the SVID the server presented.
async fn served_serial(source: &SvidSource, id: &str) -> Result<String, String> {
    let server = mtls::server_config(source, PeerPolicy::any_id()).map_err(|e| e.to_string())?;
    let client = mtls::client_config(source, PeerPolicy::parse_ids(&[id]).unwrap())
        .map_err(|e| e.to_string())?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let _ = tls.write_all(b"ok").await;
        let _ = tls.shutdown().await;
        Ok::<_, String>(())
    });
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let connected = TlsConnector::from(Arc::new(client))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await;
    let mut tls = match connected {
        Ok(tls) => tls,
        Err(e) => {
            accept.abort();
            return Err(format!("client: {e}"));
        }
    };
    // TLS 1.3: the server's verdict on the client arrives with the first read.
    let mut buf = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut buf).await;
    let server = accept.await.map_err(|e| e.to_string())?;
    server.map_err(|e| format!("server: {e}"))?;
    read.map_err(|e| format!("client read: {e}"))?;
    if buf != b"ok" {
        return Err(format!("unexpected {buf:?}"));
    }
    let peer = mtls::peer_of(tls.get_ref().1).ok_or("no verified server")?;
    Ok(peer.serial.to_hex())
}

/// Polls `check` every 100 ms until it returns `Some`, for up to `limit`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `SvidSource` against the real agent process: not ready while nothing answers; ready with
/// the wanted SVID and the trust bundle; picks up the agent's rotations; keeps serving while
/// the agent is down and follows the restarted agent; drops the SVID when its entry is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_source_follows_the_real_agent() {
    // 10 s SVIDs, below the entry TTL floor, so that rotations come within the test's time.
    let mut cluster = Cluster::start_with(&["--min-entry-ttl", "10s"]);
    cluster.start_agent();

    let lonely = SvidSource::spawn(cluster.path("nobody.sock"));
    let error = lonely
        .wait_ready(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("could not reach the agent"),
        "{error}"
    );

    // Two identities for this process; the source follows the one it asks for.
    let id = "spiffe://mayfly.local/services/follower";
    let entry = cluster.create_entry(id, &["--selector", "unix:uid:0", "--ttl", "10s"]);
    cluster.create_entry(
        "spiffe://mayfly.local/agents/another",
        &["--selector", "unix:uid:0"],
    );
    let source = SvidSource::spawn_for(cluster.socket(), Some(SpiffeId::parse(id).unwrap()));
    source
        .wait_ready(Duration::from_secs(15))
        .await
        .expect("ready");
    assert_eq!(source.svid_id().unwrap().to_string(), id);
    let bundle_pem = std::fs::read(cluster.path("bundle.pem")).unwrap();
    let expected: BTreeSet<Vec<u8>> = mayfly::bundle::from_pem(&bundle_pem)
        .unwrap()
        .into_iter()
        .collect();
    let bundles = source.bundles();
    assert_eq!(bundles.len(), 1);
    let held: BTreeSet<Vec<u8>> = bundles
        .values()
        .next()
        .unwrap()
        .iter()
        .map(|c| c.to_vec())
        .collect();
    assert_eq!(held, expected, "the server's trust bundle");
    let first = served_serial(&source, id).await.expect("first handshake");

    // The agent rotates a 10 s SVID at about half-life: the new one is served before the first
    // has expired.
    eventually(
        "the rotated SVID is served",
        Duration::from_secs(10),
        || {
            let source = source.clone();
            let first = first.clone();
            async move {
                served_serial(&source, id)
                    .await
                    .ok()
                    .filter(|s| *s != first)
            }
        },
    )
    .await;

    // The agent dies: the source notices and keeps serving what it holds.
    cluster.agent.take().expect("agent").kill();
    eventually("the source notices", Duration::from_secs(5), || {
        let source = source.clone();
        async move { source.last_error().map(|_| ()) }
    })
    .await;
    let held = served_serial(&source, id)
        .await
        .expect("served while the agent is down");
    assert!(source.is_ready());
    assert_ne!(held, first, "the rotated SVID (or a later one) is held");

    // A restarted agent (its stored identity; the join token is spent) is followed again: a
    // fresh SVID arrives.
    cluster.start_agent();
    eventually(
        "an SVID from the restarted agent is served",
        Duration::from_secs(15),
        || {
            let source = source.clone();
            let held = held.clone();
            async move { served_serial(&source, id).await.ok().filter(|s| *s != held) }
        },
    )
    .await;

    // The entry is deleted: the SVID is withdrawn and handshakes fail.
    cluster.ok(&["entry", "delete", &entry]);
    eventually("the SVID is withdrawn", Duration::from_secs(10), || {
        let source = source.clone();
        async move { (source.svid_id().is_none() && !source.is_ready()).then_some(()) }
    })
    .await;
    let refused = served_serial(&source, id).await;
    assert!(refused.is_err(), "{refused:?}");
}

// ---------------------------------------------------------------------------------------------
// Configuration.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_file_sets_every_key() {
    let other = "spiffe://mayfly.local/services/other";
    let cluster = cluster_with(
        None,
        &[
            (BOT_ID, &["--scope", READ, "--scope", WRITE]),
            (other, &["--scope", READ]),
        ],
    );
    let upstream = EchoUpstream::start().await;
    let port = free_port();
    let config = cluster.path("proxy.toml");
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:{port}"
upstream = "{upstream}"
routes = ["{ROUTE_READ}", "{ROUTE_WRITE}"]
require_scopes = ["{READ}"]
allow_ids = ["spiffe://mayfly.local/agents/*"]
socket = "{socket}"
spiffe_id = "{PROXY_ID}"
"#,
            upstream = upstream.addr(),
            socket = cluster.endpoint(),
        ),
    )
    .unwrap();
    let config_text = config.display().to_string();
    let proxy = Proxy::start_raw(&cluster, "proxy", port, &["--config", &config_text]);
    // Its own identity is the one the file names (and curl below verifies `localhost`, which
    // only that entry's SVID carries).
    proxy.wait_log_line(&["SVID updated from the Workload API", PROXY_ID]);

    // routes + require_scopes + allow_ids, positive: a read+write SVID of an allowed ID.
    let both = mint(&cluster, "both", BOT_ID, &[READ, WRITE], None);
    curl(&proxy, &both, &[], "/customers").ok("200");
    let r = curl(&proxy, &both, &["-X", "POST"], "/refunds");
    r.ok("200");
    assert_eq!(
        r.body,
        echoed(
            "POST /refunds",
            BOT_ID,
            &format!("{READ},{WRITE}"),
            &both.serial
        )
    );
    // routes: a read SVID cannot write.
    let read = mint(&cluster, "read", BOT_ID, &[READ], None);
    curl(&proxy, &read, &[], "/customers").ok("200");
    curl(&proxy, &read, &["-X", "POST"], "/refunds").ok("403");
    // require_scopes: a write-only SVID is refused in the handshake.
    let write = mint(&cluster, "write", BOT_ID, &[WRITE], None);
    curl(&proxy, &write, &["-X", "POST"], "/refunds").refused_in_handshake();
    proxy.wait_log_line(&["handshake refused", "lacks the required scope"]);
    // allow_ids: another identity with the read scope is refused in the handshake.
    let outsider = mint(&cluster, "outsider", other, &[READ], None);
    curl(&proxy, &outsider, &[], "/customers").refused_in_handshake();
    proxy.wait_log_line(&["handshake refused", "services/other", "matches none of"]);
}

/// `mayfly proxy ARGS` in `dir`, expected to exit at once.
fn proxy_fails(dir: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new(BIN);
    cmd.arg("proxy")
        .args(args)
        .current_dir(dir)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1");
    let out = run_timed(cmd, b"", Duration::from_secs(20));
    let stderr = stderr_of(&out);
    assert!(!out.status.success(), "{args:?} was accepted");
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one sentence for {args:?}: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_owned()
}

#[test]
fn bad_proxy_input_exits_non_zero_with_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let listen = ["--listen", "127.0.0.1:0"];
    let upstream = ["--upstream", "127.0.0.1:9"];

    let line = proxy_fails(
        dir.path(),
        &[
            &listen[..],
            &upstream[..],
            &["--route", "GET customers stripe:read:customers"],
        ]
        .concat(),
    );
    assert!(
        line.contains("route 'GET customers stripe:read:customers'")
            && line.contains("the prefix must be an absolute path"),
        "{line}"
    );
    let line = proxy_fails(
        dir.path(),
        &[&listen[..], &upstream[..], &["--route", "GET /customers"]].concat(),
    );
    assert!(line.contains("is not 'METHOD /prefix scope'"), "{line}");
    let line = proxy_fails(
        dir.path(),
        &[
            &listen[..],
            &upstream[..],
            &["--route", "GET /customers Stripe:Read"],
        ]
        .concat(),
    );
    assert!(
        line.contains("route 'GET /customers Stripe:Read'"),
        "{line}"
    );

    let line = proxy_fails(
        dir.path(),
        &[&listen[..], &["--route", ROUTE_READ]].concat(),
    );
    assert_eq!(line, "error: --upstream is required: give HOST:PORT");
    let line = proxy_fails(
        dir.path(),
        &[&upstream[..], &["--route", ROUTE_READ]].concat(),
    );
    assert_eq!(line, "error: --listen is required: give HOST:PORT");
    let line = proxy_fails(
        dir.path(),
        &[
            &listen[..],
            &["--upstream", "nowhere", "--route", ROUTE_READ],
        ]
        .concat(),
    );
    assert!(line.contains("'nowhere' is not an address"), "{line}");
    let line = proxy_fails(dir.path(), &[&listen[..], &upstream[..]].concat());
    assert!(line.contains("say what to enforce"), "{line}");
    let line = proxy_fails(
        dir.path(),
        &[&listen[..], &upstream[..], &["--require-scope", "Stripe"]].concat(),
    );
    assert!(line.contains("--require-scope"), "{line}");
    let line = proxy_fails(
        dir.path(),
        &[
            &listen[..],
            &upstream[..],
            &["--allow-id", "spiffe://mayfly.local/a/*/b"],
        ]
        .concat(),
    );
    assert!(line.contains("--allow-id"), "{line}");

    // The same mistakes in a config file, and a file that is not a config.
    let config = dir.path().join("proxy.toml");
    let config_text = config.display().to_string();
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\nroutes = [\"GET /customers stripe:read:customers\"]\n",
    )
    .unwrap();
    let line = proxy_fails(dir.path(), &["--config", &config_text]);
    assert_eq!(line, "error: --upstream is required: give HOST:PORT");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\nroutes = [\"GET customers x:y\"]\n",
    )
    .unwrap();
    let line = proxy_fails(dir.path(), &["--config", &config_text]);
    assert!(line.contains("route 'GET customers x:y'"), "{line}");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nroute = [\"GET / -\"]\n").unwrap();
    let line = proxy_fails(dir.path(), &["--config", &config_text]);
    assert!(
        line.contains("is invalid") && line.contains("route"),
        "{line}"
    );
    std::fs::write(&config, "listen = [\n").unwrap();
    let line = proxy_fails(dir.path(), &["--config", &config_text]);
    assert!(line.contains("is invalid"), "{line}");
    let missing = dir.path().join("missing.toml").display().to_string();
    let line = proxy_fails(dir.path(), &["--config", &missing]);
    assert!(line.contains("could not read the config file"), "{line}");
}

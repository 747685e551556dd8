//! `mayfly proxy --accept jwt` end to end, as deployed: a real server and agent (processes), a
//! real `mayfly proxy` process following its SVID and the JWT bundles from the agent's
//! Workload API, task JWT-SVIDs minted through the agent's task API (`MintJWTSVID`), and the
//! `curl` binary as the client (a third-party client, without a certificate). The upstream is
//! an in-process echo server that says which `x-mayfly-*` headers, and whether an
//! `Authorization` header, reached it.
//!
//! Every refusal has its positive control on the same proxy; the token refusals the agent
//! would never mint (alg none, HMAC, unknown kid, malformed, 64 KiB) are in
//! tests/proxy_jwt_http.rs.

mod common;
#[path = "common/echo.rs"]
mod echo;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{BIN, Cluster, Proc, free_port};
use mayfly::proto::task::MintJwtsvidRequest;

const PROXY_ID: &str = "spiffe://mayfly.local/services/proxy";
const BOT_ID: &str = "spiffe://mayfly.local/agents/billing-bot";
const READ: &str = "stripe:read:customers";
const WRITE: &str = "stripe:write:refunds";
const ROUTE_READ: &str = "GET /customers stripe:read:customers";
const ROUTE_WRITE: &str = "POST /refunds stripe:write:refunds";
const AUDIENCE: &str = "https://refunds.internal";

/// A server and an agent; the proxy's entry (`--dns localhost`, for curl) and the bot's, with
/// both scopes, all for uid 0.
fn cluster() -> Cluster {
    let mut cluster = Cluster::start_with(&["--min-entry-ttl", "10s"]);
    cluster.start_agent();
    cluster.create_entry(
        PROXY_ID,
        &["--selector", "unix:uid:0", "--dns", "localhost"],
    );
    cluster.create_entry(
        BOT_ID,
        &[
            "--selector",
            "unix:uid:0",
            "--scope",
            READ,
            "--scope",
            WRITE,
        ],
    );
    cluster
}

/// A running `mayfly proxy`.
struct Proxy {
    _proc: Proc,
    port: u16,
    log: std::path::PathBuf,
}

impl Proxy {
    fn start(cluster: &Cluster, name: &str, upstream: SocketAddr, args: &[&str]) -> Self {
        let port = free_port();
        let log = cluster.path(&format!("{name}.log"));
        let child = Command::new(BIN)
            .arg("proxy")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--socket", &cluster.endpoint(), "--spiffe-id", PROXY_ID])
            .args(["--upstream", &upstream.to_string()])
            .args(["--route", ROUTE_READ, "--route", ROUTE_WRITE])
            .args(args)
            .current_dir(cluster.dir.path())
            .env_remove("SPIFFE_ENDPOINT_SOCKET")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
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
            assert!(Instant::now() < deadline, "no start:\n{}", proxy.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        proxy
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A task JWT-SVID from the agent's task API (retried while the agent has not synced the bot's
/// entry yet): the token and its `jti`.
async fn mint_jwt(
    cluster: &Cluster,
    scopes: &[&str],
    audience: &str,
    ttl: u32,
) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let channel = mayfly::workload_client::connect(&cluster.socket())
            .await
            .unwrap();
        let minted = mayfly::workload_client::task_api(channel)
            .mint_jwtsvid(MintJwtsvidRequest {
                task_id: "refund-42".into(),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                ttl_seconds: ttl,
                spiffe_id: BOT_ID.into(),
                audience: audience.into(),
            })
            .await;
        match minted {
            Ok(answer) => {
                let answer = answer.into_inner();
                return (answer.token, answer.jti);
            }
            Err(status) => assert!(Instant::now() < deadline, "MintJWTSVID failed: {status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What curl got: the status, the body, and the WWW-Authenticate header if any.
#[derive(Debug)]
struct Curl {
    status: String,
    body: String,
    challenge: Option<String>,
}

const MARK: &str = "\n@@curl@@";

/// curl to the proxy at `https://localhost:<port><path>`, trusting the cluster's bundle, with
/// `extra` arguments (a token header, a client certificate, -X POST).
fn curl(cluster: &Cluster, port: u16, path: &str, extra: &[&str]) -> Curl {
    let out = Command::new("/usr/bin/curl")
        .args(["-sS", "--max-time", "15", "-D", "-", "--resolve"])
        .arg(format!("localhost:{port}:127.0.0.1"))
        .arg("--cacert")
        .arg(cluster.path("bundle.pem"))
        .args(["-w", &format!("{MARK}%{{http_code}}")])
        .args(extra)
        .arg(format!("https://localhost:{port}{path}"))
        .output()
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (all, status) = stdout
        .rsplit_once(MARK)
        .unwrap_or_else(|| panic!("no curl write-out: {stdout:?} {:?}", out.stderr));
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or(("", all));
    let challenge = head
        .lines()
        .find_map(|l| l.strip_prefix("www-authenticate: "))
        .map(|v| v.trim().to_owned());
    Curl {
        status: status.trim().to_owned(),
        body: body.to_owned(),
        challenge,
    }
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// The echo upstream's body for a forwarded request from the bot (`credential`: the
/// `x-mayfly-jti` or `x-mayfly-serial` line).
fn echoed(method_path: &str, scopes: &str, credential: &str) -> String {
    let mut lines = [
        credential.to_owned(),
        format!("x-mayfly-scopes: {scopes}"),
        format!("x-mayfly-spiffe-id: {BOT_ID}"),
    ];
    lines.sort();
    format!("{method_path}\n{}\n", lines.join("\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_minted_task_jwts_are_decided_by_the_routes_and_refused_with_reasons() {
    let cluster = cluster();
    let upstream = echo::echo_upstream().await;
    let proxy = Proxy::start(
        &cluster,
        "proxy",
        upstream,
        &["--accept", "x509,jwt", "--audience", AUDIENCE],
    );
    let port = proxy.port;

    // Allowed: 200, the bot's identity, scopes and jti upstream, and no Authorization.
    let (read, jti) = mint_jwt(&cluster, &[READ], AUDIENCE, 0).await;
    let ok = curl(&cluster, port, "/customers/42", &["-H", &bearer(&read)]);
    assert_eq!(ok.status, "200", "{ok:?}\n{}", proxy.log());
    assert_eq!(
        ok.body,
        echoed("GET /customers/42", READ, &format!("x-mayfly-jti: {jti}"))
    );
    // Missing scope: 403, no challenge.
    let denied = curl(
        &cluster,
        port,
        "/refunds",
        &["-X", "POST", "-H", &bearer(&read)],
    );
    assert_eq!(denied.status, "403", "{denied:?}");
    assert!(
        denied.body.contains("needs scope stripe:write:refunds"),
        "{denied:?}"
    );
    assert!(denied.challenge.is_none(), "{denied:?}");
    // No token: 401.
    let none = curl(&cluster, port, "/customers", &[]);
    assert_eq!(none.status, "401", "{none:?}");
    assert!(none.body.contains("no bearer token"), "{none:?}");
    assert_eq!(none.challenge.as_deref(), Some("Bearer realm=\"mayfly\""));
    // Wrong audience: 401 naming it.
    let (other, _) = mint_jwt(&cluster, &[READ], "https://elsewhere.internal", 0).await;
    let wrong = curl(&cluster, port, "/customers", &["-H", &bearer(&other)]);
    assert_eq!(wrong.status, "401", "{wrong:?}");
    assert!(
        wrong.body.contains(
            "is for the audience https://elsewhere.internal, not https://refunds.internal"
        ),
        "{wrong:?}"
    );
    assert!(
        wrong
            .challenge
            .as_deref()
            .is_some_and(|c| c.contains("error=\"invalid_token\"") && c.contains("elsewhere")),
        "{wrong:?}"
    );
    // Expired: a one-second token, after it ends.
    let (short, _) = mint_jwt(&cluster, &[READ], AUDIENCE, 1).await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let expired = curl(&cluster, port, "/customers", &["-H", &bearer(&short)]);
    assert_eq!(expired.status, "401", "{expired:?}");
    assert!(expired.body.contains("expired"), "{expired:?}");
    // The write token does the write route.
    let (write, write_jti) = mint_jwt(&cluster, &[WRITE], AUDIENCE, 0).await;
    let wrote = curl(
        &cluster,
        port,
        "/refunds",
        &["-X", "POST", "-H", &bearer(&write)],
    );
    assert_eq!(wrote.status, "200", "{wrote:?}");
    assert_eq!(
        wrote.body,
        echoed(
            "POST /refunds",
            WRITE,
            &format!("x-mayfly-jti: {write_jti}")
        )
    );

    // A client certificate still works with x509,jwt: an X.509 task SVID, no token.
    let dir = cluster.path("x509");
    let dir_text = dir.display().to_string();
    let minted = cluster.ok(&[
        "svid",
        "mint",
        "--task",
        "t-x509",
        "--spiffe-id",
        BOT_ID,
        "--scope",
        READ,
        "--write",
        &dir_text,
        "--output",
        "json",
    ]);
    let serial = serde_json::from_str::<serde_json::Value>(&minted).unwrap()["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    let cert = dir.join("svid.pem").display().to_string();
    let key = dir.join("svid.key").display().to_string();
    let with_cert = curl(
        &cluster,
        port,
        "/customers",
        &["--cert", &cert, "--key", &key],
    );
    assert_eq!(with_cert.status, "200", "{with_cert:?}");
    assert_eq!(
        with_cert.body,
        echoed(
            "GET /customers",
            READ,
            &format!("x-mayfly-serial: {serial}")
        )
    );
    let log = proxy.log();
    assert!(log.contains(&format!("jti={jti}")), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_use_refuses_a_replayed_agent_token_until_it_expires() {
    let cluster = cluster();
    let upstream = echo::echo_upstream().await;
    let proxy = Proxy::start(
        &cluster,
        "proxy-once",
        upstream,
        &["--accept", "jwt", "--audience", AUDIENCE, "--single-use"],
    );
    let (token, jti) = mint_jwt(&cluster, &[READ], AUDIENCE, 0).await;
    let first = curl(&cluster, proxy.port, "/customers", &["-H", &bearer(&token)]);
    assert_eq!(first.status, "200", "{first:?}\n{}", proxy.log());
    assert_eq!(
        first.body,
        echoed("GET /customers", READ, &format!("x-mayfly-jti: {jti}"))
    );
    let again = curl(&cluster, proxy.port, "/customers", &["-H", &bearer(&token)]);
    assert_eq!(again.status, "401", "{again:?}");
    assert!(again.body.contains("already used"), "{again:?}");
    // A fresh token is accepted: the refusal is of the replay, not of the bot.
    let (fresh, _) = mint_jwt(&cluster, &[READ], AUDIENCE, 0).await;
    let ok = curl(&cluster, proxy.port, "/customers", &["-H", &bearer(&fresh)]);
    assert_eq!(ok.status, "200", "{ok:?}");
}

#[test]
fn bearer_settings_that_cannot_work_are_refused_in_one_sentence() {
    let command = |args: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.arg("proxy")
            .args(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1"])
            .args(["--socket", "/nonexistent/agent.sock"])
            .args(args)
            .env_remove("SPIFFE_ENDPOINT_SOCKET");
        cmd
    };
    let refused = |args: &[&str]| {
        let out = command(args).output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let no_audience = refused(&["--route", ROUTE_READ, "--accept", "jwt"]);
    assert!(
        no_audience.contains("--accept jwt needs --audience"),
        "{no_audience}"
    );
    assert_eq!(no_audience.trim().lines().count(), 1, "{no_audience}");
    let tcp = refused(&[
        "--require-scope",
        READ,
        "--accept",
        "jwt",
        "--audience",
        AUDIENCE,
    ]);
    assert!(tcp.contains("--accept jwt needs HTTP mode"), "{tcp}");
    // The positive control: the same HTTP settings pass the configuration, so the proxy keeps
    // running, waiting for an agent that never comes.
    let mut ok = Proc(
        command(&[
            "--route",
            ROUTE_READ,
            "--accept",
            "jwt",
            "--audience",
            AUDIENCE,
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        ok.0.try_wait().unwrap().is_none(),
        "the proxy exited at once"
    );
    ok.kill();
}

/// The `kid` in a token's header.
fn kid_of(token: &str) -> String {
    use base64::Engine as _;
    let header = token.split('.').next().unwrap();
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    let header: serde_json::Value = serde_json::from_slice(&header).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_proxy_accepts_tokens_of_the_next_ca_key_after_a_rotation() {
    // 36 s CAs: the next one (with its JWT key) is published at 18 s and signs from 30 s.
    let mut cluster = Cluster::start_with(common::cluster::FAST_ROTATION);
    cluster.start_agent();
    cluster.create_entry(
        PROXY_ID,
        &[
            "--selector",
            "unix:uid:0",
            "--dns",
            "localhost",
            "--ttl",
            "6s",
        ],
    );
    cluster.create_entry(
        BOT_ID,
        &["--selector", "unix:uid:0", "--scope", READ, "--ttl", "6s"],
    );
    let upstream = echo::echo_upstream().await;
    let proxy = Proxy::start(
        &cluster,
        "proxy-rotation",
        upstream,
        &["--accept", "jwt", "--audience", AUDIENCE],
    );
    let (first, _) = mint_jwt(&cluster, &[READ], AUDIENCE, 0).await;
    let ok = curl(&cluster, proxy.port, "/customers", &["-H", &bearer(&first)]);
    assert_eq!(ok.status, "200", "{ok:?}\n{}", proxy.log());
    let old_kid = kid_of(&first);
    let deadline = Instant::now() + Duration::from_secs(75);
    let next = loop {
        let (token, _) = mint_jwt(&cluster, &[READ], AUDIENCE, 0).await;
        if kid_of(&token) != old_kid {
            break token;
        }
        assert!(
            Instant::now() < deadline,
            "no token signed by a new key within 75 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // The proxy, started before the rotation, holds the new key already: it was published
    // with the prepared CA, before that CA signed anything.
    let rotated = curl(&cluster, proxy.port, "/customers", &["-H", &bearer(&next)]);
    assert_eq!(rotated.status, "200", "{rotated:?}\n{}", proxy.log());
    // A token signed by nobody the bundle names is still refused by the same proxy.
    let mut forged = next.clone();
    forged.truncate(forged.rfind('.').unwrap());
    forged.push_str(".AAAA");
    let refused = curl(
        &cluster,
        proxy.port,
        "/customers",
        &["-H", &bearer(&forged)],
    );
    assert_eq!(refused.status, "401", "{refused:?}");
}

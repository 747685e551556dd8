//! `mayfly demo`: the whole story in one process on a throwaway data dir, narrated step by
//! step — a server and an agent start, an operator registers `billing-bot`, a task mints a
//! read-scoped SVID, reading customers through the proxy succeeds, writing a refund with it is
//! refused (the prompt-injection case), a write-scoped task SVID succeeds, an expired SVID is
//! refused, and the audit trail is shown and verified.
//!
//! Every part is the real one on real sockets: the server (SQLite), the agent and its Workload
//! API socket, the proxy, mTLS with the `mtls` verifiers. Only "Stripe" is a stand-in: a small
//! HTTP server behind the proxy.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use mayfly::agent::{self, AgentConfig, identity::Bootstrap};
use mayfly::id::SpiffeId;
use mayfly::mtls::{self, PeerPolicy, SvidSource};
use mayfly::proto::admin as pb;
use mayfly::proto::task::MintX509svidRequest;
use mayfly::proxy::{self, ProxyConfig, ProxyMode, routes::Routes};
use mayfly::server::{self, ServerConfig};
use mayfly::workload_client::{self, WorkloadSvid};

const BOT: &str = "spiffe://mayfly.local/agents/billing-bot";
const API: &str = "spiffe://mayfly.local/services/stripe-api";

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A part could not be started or called.
    #[error("{step}: {reason}")]
    Step {
        /// Which step.
        step: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// A step did not behave as the story says.
    #[error("{0} steps did not behave as stated")]
    Misbehaved(usize),
}

fn step_error(step: &'static str) -> impl Fn(String) -> DemoError {
    move |reason| DemoError::Step { step, reason }
}

/// Narrates to `say`, runs every step, and cleans up the data dir.
///
/// # Errors
/// [`DemoError::Step`] when a part cannot start, [`DemoError::Misbehaved`] when any check
/// failed (each is narrated as it happens).
pub async fn run(say: &mut (dyn FnMut(&str) + Send)) -> Result<(), DemoError> {
    let dir = scratch_dir().map_err(step_error("create the data dir"))?;
    let result = story(&dir, say).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn scratch_dir() -> Result<PathBuf, String> {
    let mut bytes = [0u8; 6];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| "no randomness".to_owned())?;
    let dir = std::env::temp_dir().join(format!("mayfly-demo-{}", hex::encode(bytes)));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    Ok(dir)
}

struct Checks<'a> {
    say: &'a mut (dyn FnMut(&str) + Send),
    failed: usize,
}

impl Checks<'_> {
    fn step(&mut self, text: &str) {
        (self.say)(&format!("\n▶ {text}"));
    }
    fn note(&mut self, text: &str) {
        (self.say)(&format!("  {text}"));
    }
    fn check(&mut self, ok: bool, text: &str) {
        if ok {
            (self.say)(&format!("  ✔ {text}"));
        } else {
            self.failed += 1;
            (self.say)(&format!("  ✘ NOT AS EXPECTED: {text}"));
        }
    }
}

async fn story(dir: &Path, say: &mut (dyn FnMut(&str) + Send)) -> Result<(), DemoError> {
    let mut c = Checks { say, failed: 0 };
    let uid = nix::unistd::getuid().as_raw();

    c.step(&format!(
        "Start a Mayfly server (trust domain mayfly.local) in {}",
        dir.display()
    ));
    let mut config = ServerConfig::with_defaults(dir.join("server"));
    config.bind = SocketAddr::from(([127, 0, 0, 1], 0));
    let server = server::start(config)
        .await
        .map_err(|e| step_error("start the server")(e.to_string()))?;
    c.note(&format!(
        "node API on {}, admin socket {}",
        server.node_addr,
        server.admin_socket.display()
    ));
    let mut admin = mayfly::client::connect_admin(&server.admin_socket)
        .await
        .map_err(|e| step_error("reach the admin socket")(e.to_string()))?;
    let admin_err =
        |step: &'static str| move |s: tonic::Status| step_error(step)(s.message().to_owned());

    c.step("Operator: issue a single-use join token, start an agent with it");
    let token = admin
        .create_join_token(pb::CreateJoinTokenRequest { ttl_seconds: 0 })
        .await
        .map_err(admin_err("create a join token"))?
        .into_inner();
    let bundle = admin
        .get_bundle(pb::GetBundleRequest {})
        .await
        .map_err(admin_err("read the bundle"))?
        .into_inner()
        .certificates;
    let mut agent_config = AgentConfig::with_defaults(server.node_addr);
    agent_config.join_token = Some(token.token.clone());
    agent_config.bootstrap = Some(Bootstrap::Bundle(bundle.clone()));
    agent_config.socket = dir.join("agent.sock");
    agent_config.data_dir = dir.join("agent");
    agent_config.sync_interval = Duration::from_millis(500);
    let agent = agent::start(agent_config)
        .await
        .map_err(|e| step_error("start the agent")(e.to_string()))?;
    c.check(
        agent.spiffe_id.as_str() == token.agent_id,
        &format!("the agent attested as {}", agent.spiffe_id),
    );

    c.step("Operator: register billing-bot (may read customers and write refunds) and the Stripe API's proxy");
    for (id, scopes, dns) in [
        (
            BOT,
            vec!["stripe:read:customers", "stripe:write:refunds"],
            vec![],
        ),
        (API, vec![], vec!["localhost"]),
    ] {
        admin
            .create_entry(pb::CreateEntryRequest {
                spiffe_id: id.into(),
                parent_id: token.agent_id.clone(),
                selectors: vec![format!("unix:uid:{uid}")],
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                ttl_seconds: 300,
                dns_names: dns.iter().map(|s| (*s).to_owned()).collect(),
                ..Default::default()
            })
            .await
            .map_err(admin_err("register an entry"))?;
        let scopes = if scopes.is_empty() {
            "no scopes".to_owned()
        } else {
            scopes.join(", ")
        };
        c.note(&format!("{id}  selector unix:uid:{uid}  {scopes}"));
    }

    c.step("Start \"Stripe\" behind `mayfly proxy`: GET /customers needs stripe:read:customers, POST /refunds needs stripe:write:refunds");
    let upstream = stand_in_stripe()
        .await
        .map_err(step_error("start the stand-in API"))?;
    let proxy_source = SvidSource::spawn_for(&agent.socket, SpiffeId::parse(API).ok());
    proxy_source
        .wait_ready(Duration::from_secs(15))
        .await
        .map_err(|e| step_error("get the proxy's SVID")(e.to_string()))?;
    let routes = Routes::parse(&[
        "GET /customers stripe:read:customers",
        "POST /refunds stripe:write:refunds",
    ])
    .map_err(|e| step_error("parse the routes")(e.to_string()))?;
    let proxy = proxy::start(
        ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            upstream,
            mode: ProxyMode::Http(routes),
            policy: PeerPolicy::any_id(),
            own_id: SpiffeId::parse(API).ok(),
            accept: proxy::Accept::default(),
        },
        proxy_source,
    )
    .await
    .map_err(|e| step_error("start the proxy")(e.to_string()))?;
    c.note(&format!(
        "proxy on {} as {API}, forwarding to {upstream}",
        proxy.local_addr
    ));

    let channel = || async {
        workload_client::connect(&agent.socket)
            .await
            .map_err(|e| step_error("reach the agent")(e.to_string()))
    };
    let mint = |task: &str, scope: &str, ttl: u32| MintX509svidRequest {
        task_id: task.into(),
        scopes: vec![scope.into()],
        ttl_seconds: ttl,
        spiffe_id: BOT.into(),
    };

    c.step("Task summarize-customers: billing-bot asks its agent for a READ-scoped SVID");
    let read = workload_client::mint_x509(
        channel().await?,
        mint("summarize-customers", "stripe:read:customers", 0),
    )
    .await
    .map_err(|e| step_error("mint the read SVID")(e.to_string()))?;
    c.check(
        read.spiffe_id == format!("{BOT}/scope/stripe.read.customers"),
        &format!("got {} (5 minutes, key made on this node)", read.spiffe_id),
    );

    c.step("It reads customers through the proxy");
    let answer = call(proxy.local_addr, &read, &bundle, "GET", "/customers").await;
    c.check(
        matches!(&answer, Ok((200, _))),
        &format!("GET /customers → {}", show(&answer)),
    );

    c.step("A prompt injection makes it try to WRITE a refund with the same credential");
    let answer = call(proxy.local_addr, &read, &bundle, "POST", "/refunds").await;
    c.check(
        matches!(&answer, Ok((403, _))),
        &format!("POST /refunds → {}", show(&answer)),
    );

    c.step("Task refund-4711: a WRITE-scoped SVID, asked for on purpose, does write");
    let write = workload_client::mint_x509(
        channel().await?,
        mint("refund-4711", "stripe:write:refunds", 0),
    )
    .await
    .map_err(|e| step_error("mint the write SVID")(e.to_string()))?;
    let answer = call(proxy.local_addr, &write, &bundle, "POST", "/refunds").await;
    c.check(
        matches!(&answer, Ok((200, _))),
        &format!("POST /refunds with {} → {}", write.spiffe_id, show(&answer)),
    );

    c.step("A stolen SVID is worthless once it expires: mint one for 1 second, wait, use it");
    let short = workload_client::mint_x509(
        channel().await?,
        mint("short-lived", "stripe:read:customers", 1),
    )
    .await
    .map_err(|e| step_error("mint the short SVID")(e.to_string()))?;
    let not_after = short.leaf_summary().map_or(0, |(_, not_after)| not_after);
    while mayfly::wire::unix_secs(SystemTime::now()) <= not_after + 1 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let answer = call(proxy.local_addr, &short, &bundle, "GET", "/customers").await;
    c.check(
        answer.is_err(),
        &format!("GET /customers with the expired SVID → {}", show(&answer)),
    );

    c.step("The audit trail: every issuance and refusal, hash-chained");
    let mut records = admin
        .list_audit(pb::ListAuditRequest::default())
        .await
        .map_err(admin_err("read the audit log"))?
        .into_inner();
    while let Ok(Some(r)) = records.message().await {
        let task = if r.task_id.is_empty() {
            String::new()
        } else {
            format!(" task={}", r.task_id)
        };
        let id = if r.spiffe_id.is_empty() {
            String::new()
        } else {
            format!(" {}", r.spiffe_id)
        };
        c.note(&format!(
            "#{:<3} {:<14} {:<5}{task}{id}",
            r.seq, r.action, r.decision
        ));
    }
    let verified = admin
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .map_err(admin_err("verify the audit log"))?
        .into_inner();
    c.check(
        verified.ok,
        &format!(
            "`mayfly audit verify`: {} records, chain intact{}",
            verified.records, verified.problem
        ),
    );

    proxy.shutdown().await;
    agent.shutdown().await;
    server.shutdown().await;
    if c.failed == 0 {
        (c.say)("\nEvery step behaved as stated.");
        Ok(())
    } else {
        Err(DemoError::Misbehaved(c.failed))
    }
}

fn show(answer: &Result<(u16, String), String>) -> String {
    match answer {
        Ok((status, body)) => format!("{status} {}", body.trim()),
        Err(e) => format!("refused in the TLS handshake ({e})"),
    }
}

/// One HTTPS request to the proxy presenting `svid`, checking the proxy is the Stripe API.
async fn call(
    addr: SocketAddr,
    svid: &WorkloadSvid,
    bundle: &[Vec<u8>],
    method: &str,
    path: &str,
) -> Result<(u16, String), String> {
    let chain = svid
        .chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let api = SpiffeId::parse(API).map_err(|e| e.to_string())?;
    let bundles = mayfly::client::bundle_map(&api.trust_domain(), bundle);
    let source =
        SvidSource::from_parts(chain, &svid.key_pkcs8, bundles).map_err(|e| e.to_string())?;
    let expected = PeerPolicy::exact(api).map_err(|e| e.to_string())?;
    let mut config = mtls::client_config(&source, expected).map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "localhost")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    // In TLS 1.3 the server judges the client certificate after the client's handshake ends,
    // so a refusal arrives here, as the first read fails.
    let response = match sender.send_request(request).await {
        Ok(response) => response,
        // The connection's own error carries the TLS alert; the request's only says it ended.
        Err(e) => {
            return Err(match conn.await {
                Ok(Err(conn_error)) => std::error::Error::source(&conn_error)
                    .map_or_else(|| conn_error.to_string(), ToString::to_string),
                _ => e.to_string(),
            });
        }
    };
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A stand-in for the Stripe API: answers what it was asked and who the proxy said asked.
async fn stand_in_stripe() -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let who = req
                            .headers()
                            .get("x-mayfly-spiffe-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("?")
                            .to_owned();
                        let body = match (req.method().as_str(), req.uri().path()) {
                            ("GET", "/customers") => format!("[3 customers] for {who}"),
                            ("POST", "/refunds") => format!("refund created for {who}"),
                            _ => "not found".to_owned(),
                        };
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

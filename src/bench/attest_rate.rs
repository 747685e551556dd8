//! `mayfly bench attest` (issue 12): node attestations per second for each node attestor,
//! against a server running as its own process (SQLite, durable audit), beside the raw cost
//! of the checks the attestor makes, measured in this process in the same run.
//!
//! Each worker holds one anonymous TLS connection to the node API (as a booting agent does)
//! and attests on the `AttestAgent` stream again and again: the evidence, the challenge and
//! its answer where the attestor asks one, the agent SVID signed, stored and audited. Join
//! tokens are made beforehand through the admin API (each attests once); an x509pop node
//! attests again with the same certificate, the path of an agent restarting.

use std::ffi::OsString;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mayfly::mtls::SvidSource;
use mayfly::proto::admin as admin_pb;
use mayfly_attestors::NodeEvidence;
use mayfly_attestors::join_token::{JoinTokenAttestor, JoinTokenEvidence};
use mayfly_attestors::x509pop::{self, X509PopEvidence, X509PopVerifier};
use serde::Serialize;

use super::agent::{AgentBenchError, Latency, invalid};
use super::deploy::{Deployment, Layout};
use super::{TempDir, admin_err};

/// What `mayfly bench attest` runs.
#[derive(Debug, Clone)]
pub struct AttestRateOptions {
    /// Attestations per attestor.
    pub count: usize,
    /// Concurrent attesting connections.
    pub concurrency: usize,
}

impl Default for AttestRateOptions {
    fn default() -> Self {
        Self {
            count: 400,
            concurrency: 4,
        }
    }
}

/// One attestor's figures.
#[derive(Debug, Clone, Serialize)]
pub struct AttestorRate {
    /// The attestor.
    pub attestor: &'static str,
    /// Attestations completed.
    pub attested: usize,
    /// Attestations per second against the server.
    pub per_sec: f64,
    /// Their latency, each from the stream's opening to the agent SVID.
    pub latency: Latency,
    /// The attestor's own checks in this process, per attestation, µs (for x509pop: the
    /// chain to the node CA and the proof-of-possession signature).
    pub checks_us: f64,
    /// Of which the signature verifications alone, µs.
    pub raw_signature_us: f64,
}

/// What the benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct AttestRateReport {
    /// Concurrent connections.
    pub concurrency: usize,
    /// One row per attestor.
    pub attestors: Vec<AttestorRate>,
}

impl fmt::Display for AttestRateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "node attestations on the AttestAgent stream, server as a process, SQLite, durable audit, {} connections",
            self.concurrency
        )?;
        for a in &self.attestors {
            writeln!(
                f,
                "  {:<11} {:>5} attested, {:>7.1}/s, {}; checks {:.1} µs, raw signatures {:.1} µs",
                a.attestor, a.attested, a.per_sec, a.latency, a.checks_us, a.raw_signature_us
            )?;
        }
        Ok(())
    }
}

/// Runs the benchmark.
///
/// # Errors
/// [`AgentBenchError`] when it cannot be set up or an attestation fails.
pub async fn attest_rate_benchmark(
    opts: AttestRateOptions,
) -> Result<AttestRateReport, AgentBenchError> {
    if opts.count == 0 || opts.concurrency == 0 {
        return Err(invalid("the count and the concurrency must be above zero"));
    }
    let pki_dir = TempDir::create()?;
    let pki = NodePki::write(&pki_dir.0)?;
    let server_args: Vec<OsString> = vec![
        "--x509pop-ca-bundle".into(),
        pki_dir.0.join("node-ca.pem").into(),
    ];
    let mut deployment = Deployment::start_with(Layout::Processes, None, server_args).await?;
    let result = measure(&mut deployment, &opts, &pki, &pki_dir).await;
    let alive = deployment.check_server();
    deployment.stop().await;
    alive?;
    result
}

async fn measure(
    deployment: &mut Deployment,
    opts: &AttestRateOptions,
    pki: &NodePki,
    pki_dir: &TempDir,
) -> Result<AttestRateReport, AgentBenchError> {
    let mut tokens = Vec::with_capacity(opts.count);
    for _ in 0..opts.count {
        let token = deployment
            .admin
            .create_join_token(admin_pb::CreateJoinTokenRequest { ttl_seconds: 0 })
            .await
            .map_err(admin_err("create a join token"))?
            .into_inner();
        let evidence: Arc<dyn NodeEvidence> = Arc::new(JoinTokenEvidence::new(token.token));
        tokens.push(evidence);
    }
    let join = run(deployment, opts, tokens).await?;
    let x509: Arc<dyn NodeEvidence> = Arc::new(X509PopEvidence::new(
        pki_dir.0.join("node.pem"),
        pki_dir.0.join("node.key"),
    ));
    let x509pop = run(deployment, opts, vec![x509; opts.count]).await?;
    let (x509_checks, x509_raw) = x509pop_checks(pki)?;
    Ok(AttestRateReport {
        concurrency: opts.concurrency,
        attestors: vec![
            row(
                mayfly_attestors::join_token::NAME,
                join,
                join_token_checks(),
                0.0,
            ),
            row(x509pop::NAME, x509pop, x509_checks, x509_raw),
        ],
    })
}

fn row(
    attestor: &'static str,
    (attested, elapsed, latencies): (usize, Duration, Vec<u32>),
    checks_us: f64,
    raw_signature_us: f64,
) -> AttestorRate {
    AttestorRate {
        attestor,
        attested,
        per_sec: attested as f64 / elapsed.as_secs_f64().max(1e-9),
        latency: Latency::of(latencies),
        checks_us,
        raw_signature_us,
    }
}

/// Attests with each of `evidence` over `opts.concurrency` connections; the count, the
/// wall time and each attestation's latency in µs.
async fn run(
    deployment: &Deployment,
    opts: &AttestRateOptions,
    evidence: Vec<Arc<dyn NodeEvidence>>,
) -> Result<(usize, Duration, Vec<u32>), AgentBenchError> {
    let bundles = mayfly::client::bundle_map(&deployment.td, &deployment.bundle);
    let server_id = mayfly::wire::server_id(&deployment.td);
    let queue = Arc::new(std::sync::Mutex::new(evidence));
    let mut workers: tokio::task::JoinSet<Result<Vec<u32>, AgentBenchError>> =
        tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..opts.concurrency {
        let source = SvidSource::trust_only(bundles.clone())
            .map_err(|e| invalid(&format!("the bundle is unusable: {e}")))?;
        let mut node = mayfly::client::connect_node(deployment.node_addr, &source, &server_id)
            .await
            .map_err(|e| invalid(&format!("could not connect to the node API: {e}")))?;
        let csr = mayfly::svid::KeyAndCsr::generate()
            .map_err(|e| invalid(&format!("no CSR could be made: {e}")))?
            .csr;
        let queue = queue.clone();
        workers.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let next = queue.lock().map(|mut q| q.pop()).unwrap_or(None);
                let Some(evidence) = next else {
                    return Ok(latencies);
                };
                let at = Instant::now();
                mayfly::node_attest::attest(&mut node, evidence, csr.clone())
                    .await
                    .map_err(|e| invalid(&format!("an attestation failed: {e}")))?;
                latencies.push(u32::try_from(at.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
        });
    }
    let mut all = Vec::new();
    while let Some(done) = workers.join_next().await {
        all.extend(done.map_err(|e| invalid(&format!("a worker stopped: {e}")))??);
    }
    Ok((all.len(), started.elapsed(), all))
}

/// Mean µs of `f` over enough runs to last about 200 ms.
fn per_call_us(mut f: impl FnMut()) -> f64 {
    let started = Instant::now();
    let mut n = 0u32;
    while started.elapsed() < Duration::from_millis(200) || n < 10 {
        f();
        n += 1;
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

/// A join token's check: its form and its SHA-256 (the store lookup is the server's).
fn join_token_checks() -> f64 {
    let token =
        mayfly_attestors::join_token::generate().map_or_else(|_| "0".repeat(64), |t| t.secret);
    per_call_us(|| {
        let _ = JoinTokenAttestor.verify(token.as_bytes());
    })
}

/// x509pop's checks (the chain and the proof) and, alone, the two ECDSA P-256 verifications
/// they contain (the node certificate's signature by the CA, the challenge's by the node).
fn x509pop_checks(pki: &NodePki) -> Result<(f64, f64), AgentBenchError> {
    let verifier = X509PopVerifier::new(vec![pki.ca_der.clone()])
        .map_err(|e| invalid(&format!("the bench's node CA is unusable: {e}")))?;
    let nonce = [7u8; 32];
    let message = x509pop::challenge_message(&nonce, &pki.node_der);
    let signature = pki.sign(&message)?;
    let chain = vec![pki.node_der.clone()];
    let now = SystemTime::now();
    verifier
        .verify(&chain, &nonce, &signature, now)
        .map_err(|e| invalid(&format!("the bench's own proof did not verify: {e}")))?;
    let checks = per_call_us(|| {
        let _ = verifier.verify(&chain, &nonce, &signature, now);
    });
    let public = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        pki.node_public.clone(),
    );
    let raw = per_call_us(|| {
        let _ = public.verify(&message, &signature);
    });
    Ok((checks, 2.0 * raw))
}

/// A node CA and one node certificate for client authentication, made with rcgen.
struct NodePki {
    ca_der: Vec<u8>,
    node_der: Vec<u8>,
    node_public: Vec<u8>,
    node_pkcs8: Vec<u8>,
}

impl NodePki {
    /// Makes them and writes `node-ca.pem`, `node.pem` and `node.key` into `dir`.
    fn write(dir: &std::path::Path) -> Result<Self, AgentBenchError> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair,
        };
        let failed = |e: rcgen::Error| invalid(&format!("the bench's node PKI failed: {e}"));
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, "bench node CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().map_err(failed)?;
        let ca_cert = ca.self_signed(&ca_key).map_err(failed)?;
        let issuer = Issuer::new(ca, ca_key);
        let mut node = CertificateParams::default();
        node.distinguished_name
            .push(DnType::CommonName, "bench-node");
        node.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let node_key = KeyPair::generate().map_err(failed)?;
        let node_cert = node.signed_by(&node_key, &issuer).map_err(failed)?;
        for (name, text) in [
            ("node-ca.pem", ca_cert.pem()),
            ("node.pem", node_cert.pem()),
            ("node.key", node_key.serialize_pem()),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .map_err(|source| AgentBenchError::Write { path, source })?;
        }
        Ok(Self {
            ca_der: ca_cert.der().to_vec(),
            node_der: node_cert.der().to_vec(),
            node_public: node_key.public_key_raw().to_vec(),
            node_pkcs8: node_key.serialize_der(),
        })
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, AgentBenchError> {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &self.node_pkcs8)
            .map_err(|_| invalid("the bench's node key is unusable"))?;
        let signature = pair
            .sign(&aws_lc_rs::rand::SystemRandom::new(), message)
            .map_err(|_| invalid("the bench's node key failed to sign"))?;
        Ok(signature.as_ref().to_vec())
    }
}

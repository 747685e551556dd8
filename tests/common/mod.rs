//! Shared helpers for the end-to-end tests: a real Mayfly server started in-process
//! ([`mayfly::server::start`]) on `127.0.0.1:0`, with its store in SQLite (a real file in a
//! temporary directory) or in PostgreSQL (a fresh schema of the database
//! `MAYFLY_TEST_POSTGRES_URL` names, dropped afterwards), plus clients for its two APIs.
//!
//! Operators go through the admin API on the admin socket; agents attest with a join token and
//! then use the node API over mTLS, exactly as `mayfly agent run` does. Include with
//! `mod common;`; not every test file uses every helper.
#![allow(dead_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mayfly::client::{self, AttestError, AttestedAgent, ClientError};
use mayfly::id::{SpiffeId, TrustDomain};
use mayfly::mtls::{self, PeerPolicy, SvidSource, TrustSet, Usage, VerifiedPeer};
use mayfly::proto::admin::{self as admin_pb, admin_client::AdminClient};
use mayfly::proto::node::{self as node_pb, node_client::NodeClient};
use mayfly::server::{self, RunningServer, ServerConfig};
use mayfly::svid::{Bundles, KeyAndCsr};
use rustls_pki_types::CertificateDer;
use tempfile::TempDir;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// The environment variable naming the PostgreSQL database for the PostgreSQL variants.
pub const POSTGRES_ENV: &str = "MAYFLY_TEST_POSTGRES_URL";

/// Which store engine a server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// SQLite in the data dir.
    Sqlite,
    /// PostgreSQL, a fresh schema of `MAYFLY_TEST_POSTGRES_URL`.
    Postgres,
}

/// The PostgreSQL URL, or `None` after printing the skip notice.
pub fn postgres_url() -> Option<String> {
    match std::env::var(POSTGRES_ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            println!("skipped: {POSTGRES_ENV} is not set");
            None
        }
    }
}

/// Unix seconds now.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// 32 random lowercase hex digits, for unique names.
pub fn random_hex() -> String {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).expect("random");
    hex::encode(bytes)
}

/// A schema created for one server and dropped when the server is stopped (or dropped).
struct PgSchema {
    /// The database URL as given.
    url: String,
    /// The schema's name, `mayfly_e2e_<hex>`.
    name: String,
    dropped: bool,
}

impl PgSchema {
    async fn create(url: &str) -> Self {
        let name = format!("mayfly_e2e_{}", random_hex());
        let pool = sqlx::PgPool::connect(url)
            .await
            .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&pool)
            .await
            .expect("create schema");
        pool.close().await;
        Self {
            url: url.to_owned(),
            name,
            dropped: false,
        }
    }

    /// The URL whose connections use only this schema: sqlx passes `options` to the server as
    /// the startup parameter, so every connection of the server's pool (and the migrations)
    /// lands here.
    fn scoped_url(&self) -> String {
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}options=-c%20search_path%3D{}", self.url, self.name)
    }

    async fn drop_now(&mut self) {
        if !self.dropped {
            self.dropped = true;
            drop_schema(&self.url, &self.name).await;
        }
    }
}

/// Drops schema `name` of the database `url`, ignoring failures (it is only clean-up).
async fn drop_schema(url: &str, name: &str) {
    if let Ok(pool) = sqlx::PgPool::connect(url).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {name} CASCADE"
        )))
        .execute(&pool)
        .await;
        pool.close().await;
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // A test that panicked never reached `stop`: drop the schema on a thread of its own,
        // since this may run inside (or outside) a runtime.
        self.dropped = true;
        let (url, name) = (self.url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(drop_schema(&url, &name));
            }
        })
        .join();
    }
}

/// A running server on its own data dir, with an admin client.
pub struct TestServer {
    dir: TempDir,
    /// The configuration it runs with (the data dir is the temp dir; `bind` is port 0).
    pub config: ServerConfig,
    running: Option<RunningServer>,
    admin: AdminClient<Channel>,
    pg: Option<PgSchema>,
}

impl TestServer {
    /// A server on SQLite with the defaults.
    pub async fn start() -> Self {
        Self::start_with(Engine::Sqlite, |_| {})
            .await
            .expect("SQLite needs no environment")
    }

    /// A server on `engine`, its config adjusted by `configure` before start. `None` (after
    /// printing the skip notice) for PostgreSQL when `MAYFLY_TEST_POSTGRES_URL` is unset.
    pub async fn start_with(
        engine: Engine,
        configure: impl FnOnce(&mut ServerConfig),
    ) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = ServerConfig::with_defaults(dir.path().join("server"));
        config.bind = "127.0.0.1:0".parse().expect("address");
        let pg = match engine {
            Engine::Sqlite => None,
            Engine::Postgres => {
                let url = postgres_url()?;
                let schema = PgSchema::create(&url).await;
                config.database = Some(schema.scoped_url());
                Some(schema)
            }
        };
        configure(&mut config);
        let running = server::start(config.clone()).await.expect("server starts");
        if let Some(schema) = &pg {
            assert_schema_used(schema).await;
        }
        let admin = client::connect_admin(&running.admin_socket)
            .await
            .expect("admin socket");
        Some(Self {
            dir,
            config,
            running: Some(running),
            admin,
            pg,
        })
    }

    /// A server on `engine` with the defaults; `None` as in [`TestServer::start_with`].
    pub async fn on(engine: Engine) -> Option<Self> {
        Self::start_with(engine, |_| {}).await
    }

    fn running(&self) -> &RunningServer {
        self.running.as_ref().expect("the server is running")
    }

    /// Where the node API listens.
    pub fn node_addr(&self) -> std::net::SocketAddr {
        self.running().node_addr
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        self.config.trust_domain.clone()
    }

    /// The SPIFFE ID the server presents.
    pub fn server_id(&self) -> SpiffeId {
        mayfly::wire::server_id(&self.config.trust_domain)
    }

    /// The data dir.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.config.data_dir
    }

    /// The SQLite file (for tampering in tests).
    pub fn sqlite_path(&self) -> std::path::PathBuf {
        self.config.data_dir.join("mayfly.sqlite")
    }

    /// The temporary directory holding everything of this server.
    pub fn temp_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// An admin API client (a clone of one connection).
    pub fn admin(&self) -> AdminClient<Channel> {
        self.admin.clone()
    }

    /// Stops the server, keeping its data dir (and database schema).
    pub async fn shutdown(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }

    /// Stops the server and starts it again on the same data dir, database and node API
    /// address (as an operator restarting `mayfly server run --bind ADDR` would).
    pub async fn restart(&mut self) {
        if let Some(running) = &self.running {
            self.config.bind = running.node_addr;
        }
        self.shutdown().await;
        let running = server::start(self.config.clone())
            .await
            .expect("server restarts");
        self.admin = client::connect_admin(&running.admin_socket)
            .await
            .expect("admin socket");
        self.running = Some(running);
    }

    /// Stops the server and drops its PostgreSQL schema, if any.
    pub async fn stop(mut self) {
        self.shutdown().await;
        if let Some(schema) = self.pg.as_mut() {
            schema.drop_now().await;
        }
    }

    // ---- admin API -------------------------------------------------------------------------

    /// The trust bundle (trust domain and DER certificates) from the admin API.
    pub async fn bundle_der(&self) -> (String, Vec<Vec<u8>>) {
        let b = self
            .admin()
            .get_bundle(admin_pb::GetBundleRequest {})
            .await
            .expect("GetBundle")
            .into_inner();
        (b.trust_domain, b.certificates)
    }

    /// The trust bundle, keyed by trust domain.
    pub async fn bundles(&self) -> Bundles {
        let (td, certs) = self.bundle_der().await;
        assert_eq!(td, self.config.trust_domain.as_str());
        client::bundle_map(&self.config.trust_domain, &certs)
    }

    /// A fresh join token.
    pub async fn join_token(&self) -> admin_pb::CreateJoinTokenResponse {
        self.admin()
            .create_join_token(admin_pb::CreateJoinTokenRequest { ttl_seconds: 0 })
            .await
            .expect("CreateJoinToken")
            .into_inner()
    }

    /// Attests with `token` over the node API (the bundle taken from the admin API).
    pub async fn attest_with(&self, token: &str) -> Result<AttestedAgent, AttestError> {
        client::attest_with_join_token(
            self.node_addr(),
            self.bundles().await,
            &self.server_id(),
            token,
        )
        .await
    }

    /// A new agent: a fresh token, attested.
    pub async fn attest(&self) -> AttestedAgent {
        let token = self.join_token().await;
        let agent = self.attest_with(&token.token).await.expect("attest");
        assert_eq!(agent.spiffe_id.as_str(), token.agent_id);
        agent
    }

    /// Creates an entry; the request is usually built with [`entry_request`].
    pub async fn create_entry(
        &self,
        request: admin_pb::CreateEntryRequest,
    ) -> Result<admin_pb::Entry, Status> {
        self.admin()
            .create_entry(request)
            .await
            .map(|r| r.into_inner())
    }

    /// Every entry, from the admin API, following its pages.
    pub async fn entries(&self) -> Vec<admin_pb::Entry> {
        let mut admin = self.admin();
        let mut request = admin_pb::ListEntriesRequest::default();
        let mut entries = Vec::new();
        loop {
            let page = admin
                .list_entries(request.clone())
                .await
                .expect("ListEntries")
                .into_inner();
            entries.extend(page.entries);
            if page.next_page_token.is_empty() {
                return entries;
            }
            request.page_token = page.next_page_token;
        }
    }

    /// Audit records after `after_seq` (0: all), oldest first.
    pub async fn audit_after(&self, after_seq: i64) -> Vec<admin_pb::AuditRecord> {
        self.list_audit(admin_pb::ListAuditRequest {
            after_seq,
            ..Default::default()
        })
        .await
    }

    /// Every audit record, oldest first.
    pub async fn audit(&self) -> Vec<admin_pb::AuditRecord> {
        self.audit_after(0).await
    }

    /// The audit records of one task.
    pub async fn audit_of_task(&self, task_id: &str) -> Vec<admin_pb::AuditRecord> {
        self.list_audit(admin_pb::ListAuditRequest {
            task_id: task_id.into(),
            ..Default::default()
        })
        .await
    }

    async fn list_audit(&self, request: admin_pb::ListAuditRequest) -> Vec<admin_pb::AuditRecord> {
        let mut stream = self
            .admin()
            .list_audit(request)
            .await
            .expect("ListAudit")
            .into_inner();
        let mut out = Vec::new();
        while let Some(record) = stream.message().await.expect("audit stream") {
            out.push(record);
        }
        out
    }

    /// The sequence number of the newest audit record: pass it to [`TestServer::audit_after`]
    /// to see what one call wrote.
    pub async fn audit_mark(&self) -> i64 {
        self.audit().await.last().map_or(0, |r| r.seq)
    }

    /// `VerifyAudit`.
    pub async fn verify_audit(&self) -> admin_pb::VerifyAuditResponse {
        self.admin()
            .verify_audit(admin_pb::VerifyAuditRequest {})
            .await
            .expect("VerifyAudit")
            .into_inner()
    }

    /// Asserts that since `mark` exactly one audit record was written, a denial of `action`
    /// whose reason contains `reason`, and that no certificate was issued (no allow record, no
    /// serial). Returns the record.
    pub async fn assert_one_denial(
        &self,
        mark: i64,
        action: &str,
        reason: &str,
    ) -> admin_pb::AuditRecord {
        let records = self.audit_after(mark).await;
        assert_eq!(
            records.len(),
            1,
            "expected one denial of {action} in the audit log, got {records:#?}"
        );
        let r = records.into_iter().next().expect("one record");
        assert_eq!(r.action, action, "{r:#?}");
        assert_eq!(r.decision, "deny", "{r:#?}");
        assert!(
            r.reason.contains(reason),
            "the audit reason {:?} should contain {reason:?}",
            r.reason
        );
        assert!(r.serial.is_empty(), "a denial has no serial: {r:#?}");
        assert_eq!(r.not_after, 0, "a denial has no notAfter: {r:#?}");
        r
    }

    // ---- node API --------------------------------------------------------------------------

    /// A node API client presenting the SVID of `source`, or no certificate when `None`, on a
    /// new connection.
    pub async fn node_client(&self, source: Option<&SvidSource>) -> NodeClient<Channel> {
        let anonymous;
        let source = match source {
            Some(source) => source,
            None => {
                anonymous = SvidSource::trust_only(self.bundles().await).expect("bundle");
                &anonymous
            }
        };
        client::connect_node(self.node_addr(), source, &self.server_id())
            .await
            .expect("connect to the node API")
    }

    /// A node API client presenting the SVID `chain` with its key, on a new connection.
    pub async fn connect_as(
        &self,
        chain: &[CertificateDer<'static>],
        key_pkcs8: &[u8],
    ) -> NodeClient<Channel> {
        self.try_connect_as(chain, key_pkcs8)
            .await
            .expect("connect to the node API")
    }

    /// Like [`TestServer::connect_as`], for connections that may be refused.
    pub async fn try_connect_as(
        &self,
        chain: &[CertificateDer<'static>],
        key_pkcs8: &[u8],
    ) -> Result<NodeClient<Channel>, ClientError> {
        let source = SvidSource::from_parts(chain.to_vec(), key_pkcs8, self.bundles().await)
            .expect("a usable SVID and bundle");
        client::connect_node(self.node_addr(), &source, &self.server_id()).await
    }

    /// Verifies an issued chain against the bundle from the admin API, as a client SVID, with
    /// the one verifier ([`mtls::verify_chain`]).
    pub async fn verify(&self, chain: &[Vec<u8>]) -> VerifiedPeer {
        let trust = TrustSet::new(self.bundles().await).expect("a usable bundle");
        let chain: Vec<CertificateDer<'static>> =
            chain.iter().cloned().map(CertificateDer::from).collect();
        mtls::verify_chain(
            &chain,
            &trust,
            Usage::Client,
            SystemTime::now(),
            &PeerPolicy::any_id(),
        )
        .expect("the issued SVID verifies against the bundle")
    }
}

/// Checks the server's tables were created in the schema, not elsewhere.
async fn assert_schema_used(schema: &PgSchema) {
    let pool = sqlx::PgPool::connect(&schema.url).await.expect("connect");
    let (tables,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1 AND table_name = 'audit'",
    )
    .bind(&schema.name)
    .fetch_one(&pool)
    .await
    .expect("query information_schema");
    pool.close().await;
    assert_eq!(
        tables, 1,
        "the server's tables are not in schema {}",
        schema.name
    );
}

/// A typical entry for `parent`: a unique SPIFFE ID under `/agents/`, selector
/// `unix:uid:1001`, scopes `stripe:read:customers` and `stripe:write:refunds`, TTL 300 s.
pub fn entry_request(parent: &str) -> admin_pb::CreateEntryRequest {
    admin_pb::CreateEntryRequest {
        spiffe_id: format!(
            "spiffe://mayfly.local/agents/billing-bot-{}",
            &random_hex()[..8]
        ),
        parent_id: parent.into(),
        selectors: vec!["unix:uid:1001".into()],
        scopes: vec![
            "stripe:read:customers".into(),
            "stripe:write:refunds".into(),
        ],
        ttl_seconds: 300,
        dns_names: Vec::new(),
        ..Default::default()
    }
}

/// A fresh P-256 key and CSR.
pub fn csr() -> KeyAndCsr {
    KeyAndCsr::generate().expect("key and CSR")
}

/// A task request.
pub fn task_request(
    entry_id: &str,
    csr: &[u8],
    task_id: &str,
    scopes: &[&str],
    ttl_seconds: u32,
) -> node_pb::IssueTaskRequest {
    node_pb::IssueTaskRequest {
        entry_id: entry_id.into(),
        csr: csr.to_vec(),
        task_id: task_id.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ttl_seconds,
    }
}

/// The status of a call that must fail with `code`; panics (showing the answer) otherwise.
pub fn expect_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code) -> Status {
    match result {
        Ok(answer) => panic!("expected {code:?}, but the call succeeded: {answer:?}"),
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "expected {code:?}, got {:?}: {}",
                status.code(),
                status.message()
            );
            status
        }
    }
}

/// Waits until `done` holds, polling, for at most `limit`.
pub async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
// The attestation stream driven by hand (issue 12).
pub mod attest_stream;
pub mod cluster;
// Several servers, one PostgreSQL (issue 10).
pub mod ha;
// Node PKI made with the openssl command line (issue 12).
pub mod openssl_pki;

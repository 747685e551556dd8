//! Several servers, one PostgreSQL (issue 10): `mayfly server run` processes sharing one fresh
//! schema of `MAYFLY_TEST_POSTGRES_URL`, each with its own data dir (so its own CA) and node
//! API port, and an agent process that may be given any of them.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::PgSchema;
use super::cluster::{BIN, Proc, free_port, wait_for_path};

/// A fresh schema that several stores (or server processes) share; dropped with the value.
pub struct SharedSchema(PgSchema);

impl SharedSchema {
    /// A new schema, or `None` (after the skip notice) when PostgreSQL is not configured.
    pub async fn create() -> Option<Self> {
        let url = super::postgres_url()?;
        Some(Self(PgSchema::create(&url).await))
    }

    /// The database URL as configured.
    pub fn url(&self) -> &str {
        &self.0.url
    }

    /// The schema's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// A URL whose connections use only this schema.
    pub fn scoped_url(&self) -> String {
        self.0.scoped_url()
    }
}

/// Server processes on one schema, and (once started) one agent process.
pub struct HaCluster {
    pub dir: TempDir,
    schema: SharedSchema,
    pub ports: Vec<u16>,
    pub servers: Vec<Option<Proc>>,
    pub agent: Option<Proc>,
    /// The agent's SPIFFE ID, from `token generate` on server 0.
    pub agent_id: String,
    /// The join token made for the agent on server 0.
    pub token: String,
    /// Extra `server run` flags for every server.
    server_args: Vec<String>,
}

impl HaCluster {
    /// Starts `n` servers on one fresh schema, one after the other, and waits until every
    /// server's bundle holds all `n` CAs (each server re-reads the store's CAs every 5 s);
    /// makes a join token on server 0. `None` when PostgreSQL is not configured.
    pub async fn start(n: usize) -> Option<Self> {
        Self::start_with(n, &[]).await
    }

    /// Like [`HaCluster::start`], every server with the extra `server run` flags `args`.
    pub async fn start_with(n: usize, args: &[&str]) -> Option<Self> {
        let schema = SharedSchema::create().await?;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cluster = Self {
            dir,
            schema,
            ports: (0..n).map(|_| free_port()).collect(),
            servers: (0..n).map(|_| None).collect(),
            agent: None,
            agent_id: String::new(),
            token: String::new(),
            server_args: args.iter().map(|a| (*a).to_owned()).collect(),
        };
        for i in 0..n {
            cluster.start_server(i);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in 0..n {
            while cluster.bundle_size(i) < n {
                assert!(
                    Instant::now() < deadline,
                    "server {i} never published the {n} CAs"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        std::fs::write(
            cluster.path("bundle.pem"),
            cluster.ok(0, &["bundle", "show"]),
        )
        .expect("write bundle");
        let (token, agent_id) = cluster.new_token(0);
        cluster.token = token;
        cluster.agent_id = agent_id;
        Some(cluster)
    }

    /// A path inside the cluster's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Server `i`'s node API, HOST:PORT.
    pub fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i])
    }

    fn admin_socket(&self, i: usize) -> PathBuf {
        self.path(&format!("server-{i}/admin.sock"))
    }

    /// Starts server `i` and waits for its admin socket.
    pub fn start_server(&mut self, i: usize) {
        let admin = self.admin_socket(i);
        let _ = std::fs::remove_file(&admin);
        let child = Command::new(BIN)
            .args(["server", "run", "--bind", &self.addr(i), "--data-dir"])
            .arg(self.path(&format!("server-{i}")))
            .arg("--database")
            .arg(self.schema.scoped_url())
            .args(&self.server_args)
            .current_dir(self.dir.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log_file(&self.path(&format!("server-{i}.log"))))
            .spawn()
            .expect("spawn mayfly server run");
        self.servers[i] = Some(Proc(child));
        wait_for_path(&admin, Duration::from_secs(30), "a server's admin socket");
    }

    /// Starts one more server on the schema (its CA published at its start); its index.
    pub fn add_server(&mut self) -> usize {
        let i = self.reserve_server();
        self.start_server(i);
        i
    }

    /// A port for one more server, not started (nothing listens there yet); its index.
    pub fn reserve_server(&mut self) -> usize {
        self.ports.push(free_port());
        self.servers.push(None);
        self.servers.len() - 1
    }

    /// Writes server `i`'s bundle where agents read it at their first start.
    pub fn save_bundle_of(&self, i: usize) {
        std::fs::write(self.path("bundle.pem"), self.ok(i, &["bundle", "show"]))
            .expect("write bundle");
    }

    /// SIGKILL of server `i`.
    pub fn kill_server(&mut self, i: usize) {
        if let Some(mut server) = self.servers[i].take() {
            server.kill();
        }
    }

    /// How many CA certificates server `i` serves in its bundle.
    pub fn bundle_size(&self, i: usize) -> usize {
        self.ok(i, &["bundle", "show"])
            .matches("BEGIN CERTIFICATE")
            .count()
    }

    /// Runs `mayfly` against server `i`'s admin socket (and the agent's Workload API socket).
    pub fn mayfly(&self, i: usize, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--admin-socket")
            .arg(self.admin_socket(i))
            .args(args)
            .current_dir(self.dir.path())
            .env(
                "SPIFFE_ENDPOINT_SOCKET",
                format!("unix://{}", self.socket().display()),
            )
            .output()
            .expect("run mayfly")
    }

    /// Like [`HaCluster::mayfly`], failing the test on a non-zero exit; stdout.
    pub fn ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.mayfly(i, args);
        assert!(
            out.status.success(),
            "mayfly {args:?} on server {i} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A fresh join token made on server `i`, and the agent ID it leads to.
    pub fn new_token(&self, i: usize) -> (String, String) {
        let out = self.ok(i, &["token", "generate", "--output", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("token json");
        (
            v["token"].as_str().expect("token").to_owned(),
            v["agent_id"].as_str().expect("agent_id").to_owned(),
        )
    }

    /// Registers an entry under the agent on server `i`; its ID.
    pub fn create_entry(&self, i: usize, spiffe_id: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            &self.agent_id,
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--output", "json"]);
        let v: serde_json::Value = serde_json::from_str(&self.ok(i, &args)).expect("entry json");
        v["id"].as_str().expect("entry id").to_owned()
    }

    /// The agent's Workload API socket.
    pub fn socket(&self) -> PathBuf {
        self.path("agent.sock")
    }

    /// The command of an agent named `tag` (its socket `<tag>.sock`, data dir `<tag>-data`,
    /// log `<tag>.log`) for `servers` (indices, in the order given) and `token`.
    pub fn agent_command(&self, tag: &str, servers: &[usize], token: &str) -> Command {
        let mut command = Command::new(BIN);
        command.args(["agent", "run"]);
        for &i in servers {
            command.args(["--server", &self.addr(i)]);
        }
        command
            .args(["--join-token", token, "--trust-bundle"])
            .arg(self.path("bundle.pem"))
            .arg("--socket")
            .arg(self.path(&format!("{tag}.sock")))
            .arg("--data-dir")
            .arg(self.path(&format!("{tag}-data")))
            .args(["--sync-interval", "500ms"])
            .current_dir(self.dir.path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file(&self.path(&format!("{tag}.log"))));
        command
    }

    /// Starts the agent given `servers` with the cluster's token; waits for its socket.
    pub fn start_agent(&mut self, servers: &[usize]) {
        let _ = std::fs::remove_file(self.socket());
        let child = self
            .agent_command("agent", servers, &self.token)
            .spawn()
            .expect("spawn mayfly agent run");
        self.agent = Some(Proc(child));
        wait_for_path(
            &self.socket(),
            Duration::from_secs(30),
            "the agent's socket",
        );
    }

    /// The agent's log so far.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }

    /// Stops every process, then drops the schema.
    pub async fn stop(mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
        for server in &mut self.servers {
            if let Some(mut s) = server.take() {
                s.kill();
            }
        }
        self.schema.0.drop_now().await;
    }
}

fn log_file(path: &std::path::Path) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

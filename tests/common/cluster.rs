//! A whole Mayfly deployment as real processes: `mayfly server run` and `mayfly agent run`
//! started from the built binary in a temporary directory, driven with the CLI as an operator
//! would, and workloads that reach the agent over its real Unix socket.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The `mayfly` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_mayfly");

/// `server run` lifetimes short enough to watch CA rotations within a minute, passing the 6x
/// rule: a CA lives 36 s, so the next one is prepared at 18 s left and activated at 6 s left.
pub const FAST_ROTATION: &[&str] = &[
    "--ca-ttl",
    "36s",
    "--agent-ttl",
    "6s",
    "--min-entry-ttl",
    "2s",
];

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Proc {
    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.0.wait().expect("wait")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A server and (once started) an agent, each a process, in one temporary directory that
/// other users may traverse (so a workload under another uid can reach the socket).
pub struct Cluster {
    pub dir: TempDir,
    pub port: u16,
    pub server: Option<Proc>,
    pub agent: Option<Proc>,
    /// The agent's SPIFFE ID, from `token generate`.
    pub agent_id: String,
    /// The join token the agent was started with.
    pub token: String,
    extra_server_args: Vec<String>,
}

impl Cluster {
    /// Starts a server and prepares a join token; no agent yet.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `server run` flags.
    pub fn start_with(server_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let mut cluster = Self {
            dir,
            port: free_port(),
            server: None,
            agent: None,
            agent_id: String::new(),
            token: String::new(),
            extra_server_args: server_args.iter().map(|s| s.to_string()).collect(),
        };
        cluster.start_server();
        let bundle = cluster.ok(&["bundle", "show"]);
        std::fs::write(cluster.path("bundle.pem"), bundle).expect("write bundle");
        let (token, agent_id) = cluster.new_token();
        cluster.token = token;
        cluster.agent_id = agent_id;
        cluster
    }

    /// A path inside the cluster's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The agent's Workload API socket.
    pub fn socket(&self) -> PathBuf {
        self.path("agent.sock")
    }

    /// The socket as a SPIFFE endpoint address.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// Starts (or restarts) the server process and waits for its admin socket.
    pub fn start_server(&mut self) {
        let admin = self.path(".mayfly/server/admin.sock");
        let _ = std::fs::remove_file(&admin);
        let child = Command::new(BIN)
            .args(["server", "run", "--bind"])
            .arg(format!("127.0.0.1:{}", self.port))
            .args(&self.extra_server_args)
            .current_dir(self.dir.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log_file(&self.path("server.log")))
            .spawn()
            .expect("spawn mayfly server run");
        self.server = Some(Proc(child));
        wait_for_path(&admin, Duration::from_secs(30), "the server's admin socket");
    }

    /// Stops the server process (SIGTERM).
    pub fn stop_server(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.stop();
        }
    }

    /// A fresh join token and the agent ID it leads to.
    pub fn new_token(&self) -> (String, String) {
        let out = self.ok(&["token", "generate", "--output", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("token json");
        (
            v["token"].as_str().expect("token").to_owned(),
            v["agent_id"].as_str().expect("agent_id").to_owned(),
        )
    }

    /// Starts the agent with the cluster's token and waits for its socket.
    pub fn start_agent(&mut self) {
        let token = self.token.clone();
        self.start_agent_with_token(&token);
    }

    /// Starts the agent with `token` and waits for its socket.
    pub fn start_agent_with_token(&mut self, token: &str) {
        self.agent = Some(self.spawn_agent("agent", token));
    }

    /// Starts an agent named `tag` (socket `<tag>.sock`, data dir `<tag>-data`, log
    /// `<tag>.log`; the cluster's own agent is `agent`) with `token`, and waits for its socket.
    pub fn spawn_agent(&self, tag: &str, token: &str) -> Proc {
        self.spawn_agent_with(tag, &["--join-token", token])
    }

    /// Starts an agent named `tag` (as [`Cluster::spawn_agent`]) that attests with
    /// `attest_args` (e.g. `--attestor x509pop --x509pop-cert F --x509pop-key F`), and waits
    /// for its socket.
    pub fn spawn_agent_with(&self, tag: &str, attest_args: &[&str]) -> Proc {
        let child = self
            .agent_command(tag, attest_args)
            .spawn()
            .expect("spawn mayfly agent run");
        wait_for_path(
            &self.path(&format!("{tag}.sock")),
            Duration::from_secs(30),
            "the agent's socket",
        );
        Proc(child)
    }

    /// The `mayfly agent run` command of an agent named `tag` attesting with `attest_args`,
    /// its old socket removed, not started.
    pub fn agent_command(&self, tag: &str, attest_args: &[&str]) -> Command {
        let socket = self.path(&format!("{tag}.sock"));
        let _ = std::fs::remove_file(&socket);
        let mut command = Command::new(BIN);
        command
            .args(["agent", "run", "--server"])
            .arg(format!("127.0.0.1:{}", self.port))
            .args(attest_args)
            .arg("--trust-bundle")
            .arg(self.path("bundle.pem"))
            .arg("--socket")
            .arg(&socket)
            .arg("--data-dir")
            .arg(self.path(&format!("{tag}-data")))
            .current_dir(self.dir.path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file(&self.path(&format!("{tag}.log"))));
        command
    }

    /// The agent's log so far.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }

    /// Runs `mayfly` with `args` in the cluster's directory.
    pub fn mayfly(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .current_dir(self.dir.path())
            .env("SPIFFE_ENDPOINT_SOCKET", self.endpoint())
            .output()
            .expect("run mayfly")
    }

    /// Runs `mayfly` and returns its stdout, failing the test on a non-zero exit.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.mayfly(args);
        assert!(
            out.status.success(),
            "mayfly {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Registers an entry under the agent and returns its ID.
    pub fn create_entry(&self, spiffe_id: &str, extra: &[&str]) -> String {
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
        let out = self.ok(&args);
        let v: serde_json::Value = serde_json::from_str(&out).expect("entry json");
        v["id"].as_str().expect("entry id").to_owned()
    }

    /// Registers an entry under the agent for this test process (its uid), with `extra` flags,
    /// and returns its ID.
    pub fn create_entry_for_this_process(&self, spiffe_id: &str, extra: &[&str]) -> String {
        let uid = format!("unix:uid:{}", nix::unistd::getuid().as_raw());
        let mut args = vec!["--selector", &uid];
        args.extend_from_slice(extra);
        self.create_entry(spiffe_id, &args)
    }

    /// Runs `mayfly` with `args` until it succeeds (the agent may not serve a new entry yet)
    /// and returns its stdout; fails the test with the last error after 15 s.
    pub fn ok_eventually(&self, args: &[&str]) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let out = self.mayfly(args);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "mayfly {args:?} never succeeded: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The audit records of `task`, as JSON values.
    pub fn audit_of_task(&self, task: &str) -> Vec<serde_json::Value> {
        let out = self.ok(&["audit", "list", "--task", task, "--output", "json"]);
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("audit json"))
            .collect()
    }
}

fn log_file(path: &Path) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// Waits until `path` exists.
pub fn wait_for_path(path: &Path, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{what} did not appear at {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

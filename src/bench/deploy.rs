//! Where the agent benchmarks run the server and the agent.
//!
//! Two layouts, one setup (a fresh temporary data dir, SQLite, real sockets, a join token and
//! one entry for this process's uid under the agent-to-be):
//!
//! - [`Layout::Processes`], as deployed: `mayfly server run` and `mayfly agent run` are child
//!   processes of the benchmark (the current executable, or the one given), each with its own
//!   runtime; the benchmark process is only the workload. The CPU of each process is read
//!   from /proc.
//! - [`Layout::InProcess`]: server and agent are started in this process and share its runtime
//!   with the workload. Cheaper to set up, but the three contend for one scheduler, which a
//!   deployment never does.
//!
//! A child process is stopped (SIGTERM, then SIGKILL after 5 s) when its handle is dropped, so
//! an error anywhere leaves nothing running.

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mayfly::agent::identity::Bootstrap;
use mayfly::agent::{self, AgentConfig, RunningAgent};
use mayfly::client;
use mayfly::id::{SpiffeId, TrustDomain};
use mayfly::proto::admin as admin_pb;
use mayfly::proto::admin::admin_client::AdminClient;
use mayfly::server::{self, ServerConfig};
use mayfly::workload_client as wc;
use serde::Serialize;
use tonic::transport::Channel;

use super::agent::{AgentBenchError, SCOPE, TTL_SECS};
use super::{TempDir, admin_err};

/// How long the server may take to answer its admin API, and the agent to attest and hold an
/// SVID for the benchmark entry.
pub(super) const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Where server and agent run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// Server, agent and workload are three processes, as deployed.
    Processes,
    /// Server and agent run in the benchmark process, on the workload's runtime.
    InProcess,
}

/// A child `mayfly` process, stopped (SIGTERM, then SIGKILL) when dropped.
pub(super) struct ChildProcess {
    child: Child,
    log: PathBuf,
    /// `server` or `agent`, for messages.
    what: &'static str,
}

impl ChildProcess {
    /// Starts `exe args…` with its stderr in `log` and `RUST_LOG=warn`.
    fn spawn(
        exe: &Path,
        args: Vec<OsString>,
        log: PathBuf,
        what: &'static str,
    ) -> Result<Self, AgentBenchError> {
        let log_file = std::fs::File::create(&log).map_err(|source| AgentBenchError::Write {
            path: log.clone(),
            source,
        })?;
        let child = Command::new(exe)
            .args(args)
            .env("RUST_LOG", "warn")
            .env_remove(wc::ENDPOINT_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .map_err(|source| AgentBenchError::Spawn {
                exe: exe.to_owned(),
                source,
            })?;
        Ok(Self { child, log, what })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The end of the process's log, for an error message.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// An error saying the process died, if it has.
    pub(super) fn check_alive(&mut self) -> Result<(), AgentBenchError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(AgentBenchError::Stalled(format!(
                "the {} process exited ({status}); its log ends with:\n{}",
                self.what,
                self.log_tail()
            ))),
            _ => Ok(()),
        }
    }

    /// An error saying the process did not become ready, with the end of its log.
    fn not_ready(&self, why: &str) -> AgentBenchError {
        AgentBenchError::Stalled(format!(
            "the {} process was not ready within {}s ({why}); its log ends with:\n{}",
            self.what,
            READY_TIMEOUT.as_secs(),
            self.log_tail()
        ))
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        stop_child(&mut self.child, nix::sys::signal::Signal::SIGTERM);
    }
}

/// Asks `child` to stop with `signal`, gives it 5 s to exit cleanly (so it can flush what it
/// measured or logged), then kills it; it is reaped either way.
pub(crate) fn stop_child(child: &mut std::process::Child, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
    if nix::sys::signal::kill(pid, signal).is_ok() {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The server of a deployment.
enum ServerRun {
    InProcess(server::RunningServer),
    Process(ChildProcess),
}

impl ServerRun {
    async fn stop(self) {
        match self {
            Self::InProcess(running) => running.shutdown().await,
            Self::Process(child) => drop(child),
        }
    }
}

/// The agent of a deployment, started by [`Deployment::start_agent`].
pub(super) enum AgentRun {
    InProcess(RunningAgent),
    Process(ChildProcess),
}

impl AgentRun {
    /// Its pid when it is a process of its own.
    pub(super) fn pid(&self) -> Option<u32> {
        match self {
            Self::InProcess(_) => None,
            Self::Process(child) => Some(child.pid()),
        }
    }

    pub(super) async fn stop(self) {
        match self {
            Self::InProcess(running) => running.shutdown().await,
            Self::Process(child) => drop(child),
        }
    }
}

/// A server (in this process or a child), its admin client, and the benchmark's first entry.
pub(super) struct Deployment {
    temp: TempDir,
    server: ServerRun,
    /// The executable child processes run; `None` in the in-process layout.
    exe: Option<PathBuf>,
    pub(super) node_addr: SocketAddr,
    pub(super) admin: AdminClient<Channel>,
    pub(super) td: TrustDomain,
    /// DER CA certificates.
    pub(super) bundle: Vec<Vec<u8>>,
    /// The join token for the agent, and the SPIFFE ID it will get.
    pub(super) token: String,
    pub(super) agent_id: String,
    /// The entry every workload of the benchmark matches, and its SPIFFE ID.
    pub(super) entry_id: String,
    pub(super) entry_spiffe_id: SpiffeId,
}

impl Deployment {
    /// Starts a server in `layout` on a fresh temporary data dir, takes a join token and
    /// registers one entry, under the agent-to-be, for this process's uid. `exe` is the
    /// `mayfly` executable for [`Layout::Processes`] (this one when `None`).
    pub(super) async fn start(layout: Layout, exe: Option<&Path>) -> Result<Self, AgentBenchError> {
        Self::start_with(layout, exe, Vec::new()).await
    }

    /// As [`Deployment::start`], with `server_args` added to `mayfly server run` (the
    /// processes layout only).
    pub(super) async fn start_with(
        layout: Layout,
        exe: Option<&Path>,
        server_args: Vec<OsString>,
    ) -> Result<Self, AgentBenchError> {
        let temp = TempDir::create()?;
        let data_dir = temp.0.join("server");
        let config = ServerConfig::with_defaults(data_dir.clone());
        let admin_socket = config.admin_socket();
        let td = config.trust_domain.clone();
        let (server, node_addr, exe) = match layout {
            Layout::InProcess => {
                let mut config = config;
                config.bind = SocketAddr::from(([127, 0, 0, 1], 0));
                let running = server::start(config).await?;
                let addr = running.node_addr;
                (ServerRun::InProcess(running), addr, None)
            }
            Layout::Processes => {
                let exe = match exe {
                    Some(exe) => exe.to_owned(),
                    None => this_executable()?,
                };
                let addr = free_local_port()?;
                let mut args: Vec<OsString> = vec![
                    "server".into(),
                    "run".into(),
                    "--data-dir".into(),
                    data_dir.into(),
                    "--bind".into(),
                    addr.to_string().into(),
                    "--trust-domain".into(),
                    td.to_string().into(),
                ];
                args.extend(server_args);
                let child = ChildProcess::spawn(&exe, args, temp.0.join("server.log"), "server")?;
                (ServerRun::Process(child), addr, Some(exe))
            }
        };
        match Self::prepare(temp, server, exe, node_addr, td, &admin_socket).await {
            Ok(deployment) => Ok(deployment),
            Err((server, e)) => {
                server.stop().await;
                Err(e)
            }
        }
    }

    async fn prepare(
        temp: TempDir,
        mut server: ServerRun,
        exe: Option<PathBuf>,
        node_addr: SocketAddr,
        td: TrustDomain,
        admin_socket: &Path,
    ) -> Result<Self, (ServerRun, AgentBenchError)> {
        let setup = async {
            let (mut admin, bundle) = connect_admin_when_ready(&mut server, admin_socket).await?;
            let token = admin
                .create_join_token(admin_pb::CreateJoinTokenRequest { ttl_seconds: 0 })
                .await
                .map_err(admin_err("create a join token"))?
                .into_inner();
            let (entry_id, entry_spiffe_id) =
                create_entry(&mut admin, &td, &token.agent_id, "/bench/workload").await?;
            Ok::<_, AgentBenchError>((admin, bundle, token, entry_id, entry_spiffe_id))
        };
        match setup.await {
            Ok((admin, bundle, token, entry_id, entry_spiffe_id)) => Ok(Self {
                temp,
                server,
                exe,
                node_addr,
                admin,
                td,
                bundle,
                token: token.token,
                agent_id: token.agent_id,
                entry_id,
                entry_spiffe_id,
            }),
            Err(e) => Err((server, e)),
        }
    }

    pub(super) fn dir(&self) -> &Path {
        &self.temp.0
    }

    pub(super) fn agent_socket(&self) -> PathBuf {
        self.dir().join("agent.sock")
    }

    /// The server's pid when it is a process of its own.
    pub(super) fn server_pid(&self) -> Option<u32> {
        match &self.server {
            ServerRun::InProcess(_) => None,
            ServerRun::Process(child) => Some(child.pid()),
        }
    }

    /// Starts the agent in the deployment's layout, and waits until it holds an SVID for the
    /// entry.
    pub(super) async fn start_agent(&mut self) -> Result<AgentRun, AgentBenchError> {
        match self.exe.clone() {
            None => self.start_agent_in_process().await.map(AgentRun::InProcess),
            Some(exe) => {
                let mut child = self.spawn_agent(&exe)?;
                self.check_server()?;
                wait_for_agent(&mut child, &self.agent_socket()).await?;
                Ok(AgentRun::Process(child))
            }
        }
    }

    /// An error when the server is a process and it died.
    pub(super) fn check_server(&mut self) -> Result<(), AgentBenchError> {
        match &mut self.server {
            ServerRun::InProcess(_) => Ok(()),
            ServerRun::Process(child) => child.check_alive(),
        }
    }

    async fn start_agent_in_process(&self) -> Result<RunningAgent, AgentBenchError> {
        let mut config = AgentConfig::with_defaults(self.node_addr);
        config.join_token = Some(self.token.clone());
        config.bootstrap = Some(Bootstrap::Bundle(self.bundle.clone()));
        config.socket = self.agent_socket();
        config.data_dir = self.dir().join("agent");
        let agent = agent::start(config).await?;
        let mut snapshot = agent.snapshot();
        let entry_id = self.entry_id.clone();
        let ready = tokio::time::timeout(
            READY_TIMEOUT,
            snapshot.wait_for(|s| s.ready && s.svids.contains_key(&entry_id)),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if !ready {
            agent.shutdown().await;
            return Err(AgentBenchError::Stalled(format!(
                "the agent did not hold an SVID for the benchmark entry within {}s",
                READY_TIMEOUT.as_secs()
            )));
        }
        Ok(agent)
    }

    /// Starts `exe agent run` against the deployment's server, with its own data dir and
    /// socket; it is not waited for (see [`wait_for_agent`]).
    pub(super) fn spawn_agent(&self, exe: &Path) -> Result<ChildProcess, AgentBenchError> {
        let dir = self.dir();
        let bundle_path = dir.join("bundle.pem");
        std::fs::write(&bundle_path, mayfly::bundle::to_pem(&self.bundle)).map_err(|source| {
            AgentBenchError::Write {
                path: bundle_path.clone(),
                source,
            }
        })?;
        let args: Vec<OsString> = vec![
            "agent".into(),
            "run".into(),
            "--server".into(),
            self.node_addr.to_string().into(),
            "--join-token".into(),
            self.token.clone().into(),
            "--trust-bundle".into(),
            bundle_path.into(),
            "--socket".into(),
            self.agent_socket().into(),
            "--data-dir".into(),
            dir.join("agent").into(),
        ];
        ChildProcess::spawn(exe, args, dir.join("agent.log"), "agent")
    }

    /// The audit log's record count and whether its hash chain verifies.
    pub(super) async fn verify_audit(&mut self) -> Result<(i64, bool), AgentBenchError> {
        let verdict = self
            .admin
            .verify_audit(admin_pb::VerifyAuditRequest {})
            .await
            .map_err(admin_err("verify the audit log"))?
            .into_inner();
        Ok((verdict.records, verdict.ok))
    }

    /// Stops the server and removes the data dir.
    pub(super) async fn stop(self) {
        drop(self.admin);
        self.server.stop().await;
        drop(self.temp);
    }
}

/// This process's executable, which is `mayfly` when the benchmark runs from the CLI.
pub(super) fn this_executable() -> Result<PathBuf, AgentBenchError> {
    std::env::current_exe().map_err(|source| AgentBenchError::Spawn {
        exe: PathBuf::from("(this executable)"),
        source,
    })
}

/// A loopback address with a port the OS just handed out and took back, for a child server to
/// bind. Another process could take it in between; the server then exits and the benchmark
/// reports its log.
fn free_local_port() -> Result<SocketAddr, AgentBenchError> {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map_err(|e| AgentBenchError::Stalled(format!("could not find a free local port: {e}")))
}

/// Connects to the admin API once the server answers it, and returns the trust bundle.
async fn connect_admin_when_ready(
    server: &mut ServerRun,
    socket: &Path,
) -> Result<(AdminClient<Channel>, Vec<Vec<u8>>), AgentBenchError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let attempt = async {
            let mut admin = client::connect_admin(socket).await?;
            let bundle = admin
                .get_bundle(admin_pb::GetBundleRequest {})
                .await
                .map_err(admin_err("return the trust bundle"))?
                .into_inner()
                .certificates;
            Ok::<_, AgentBenchError>((admin, bundle))
        };
        let failure = match attempt.await {
            Ok(ready) => return Ok(ready),
            Err(e) => e,
        };
        match server {
            // A server in this process is ready once `server::start` returned.
            ServerRun::InProcess(_) => return Err(failure),
            ServerRun::Process(child) => {
                child.check_alive()?;
                if Instant::now() >= deadline {
                    return Err(child.not_ready(&failure.to_string()));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Registers an entry `path` under `parent` for this process's uid, granting [`SCOPE`].
pub(super) async fn create_entry(
    admin: &mut AdminClient<Channel>,
    td: &TrustDomain,
    parent: &str,
    path: &str,
) -> Result<(String, SpiffeId), AgentBenchError> {
    let spiffe_id = td.join(path)?;
    let entry = admin
        .create_entry(admin_pb::CreateEntryRequest {
            spiffe_id: spiffe_id.to_string(),
            parent_id: parent.to_owned(),
            selectors: vec![format!("unix:uid:{}", nix::unistd::getuid())],
            scopes: vec![SCOPE.into()],
            ttl_seconds: TTL_SECS,
            dns_names: Vec::new(),
            ..Default::default()
        })
        .await
        .map_err(admin_err("create an entry"))?
        .into_inner();
    Ok((entry.id, spiffe_id))
}

/// Waits for the agent's socket, then until a workload gets its SVID from it.
pub(super) async fn wait_for_agent(
    agent: &mut ChildProcess,
    socket: &Path,
) -> Result<(), AgentBenchError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last_error = String::from("its socket did not appear");
    while Instant::now() < deadline {
        agent.check_alive()?;
        if socket.exists() {
            let attempt = async { wc::fetch_x509(wc::connect(socket).await?).await };
            match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => last_error = e.to_string(),
                Err(_) => last_error = "the first fetch took more than 10s".into(),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(agent.not_ready(&last_error))
}

//! Fixtures for the unix attestor's tests: a Unix listener in a temporary directory and a real
//! client process, optionally under another uid, that connects to it and stays alive until its
//! stdin is closed.

use std::io::{ErrorKind, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The uid and gid of `nobody`, an unprivileged identity other than ours.
pub(crate) const NOBODY: u32 = 65534;

/// A listener anyone on the host may connect to, in a directory removed with it.
pub(crate) struct Listener {
    _dir: tempfile::TempDir,
    pub(crate) path: PathBuf,
    pub(crate) listener: UnixListener,
}

impl Listener {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Open to everyone so that a client running as nobody can reach the socket.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        listener.set_nonblocking(true).unwrap();
        Self {
            _dir: dir,
            path,
            listener,
        }
    }

    /// Starts a client (as `uid`/`gid` when given) and accepts its connection.
    pub(crate) fn connect_client(&self, ids: Option<(u32, u32)>) -> (Client, UnixStream) {
        let mut child = spawn_client(&self.path, ids);
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match self.listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if let Some(status) = child.try_wait().unwrap() {
                        panic!("the client exited before connecting: {status}");
                    }
                    assert!(Instant::now() < deadline, "the client never connected");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        // The client writes one byte once connected; reading it shows it got that far.
        let mut byte = [0u8; 1];
        (&stream).read_exact(&mut byte).unwrap();
        (Client { child }, stream)
    }
}

/// A connected client process.
pub(crate) struct Client {
    pub(crate) child: Child,
}

impl Client {
    pub(crate) fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// Lets the client exit and reaps it, so that its pid is free again.
    pub(crate) fn exit_and_reap(mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "client failed: {status}");
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Tests that fail midway must not leave clients behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A python3 process that connects to `path`, writes a byte and waits for its stdin to close.
fn spawn_client(path: &Path, ids: Option<(u32, u32)>) -> Child {
    // The system's interpreter, when there is one, so that the client can run as nobody (a
    // python3 earlier on PATH may live in root's home, which nobody cannot enter).
    let system = Path::new("/usr/bin/python3");
    let mut cmd = Command::new(if system.exists() {
        system
    } else {
        Path::new("python3")
    });
    cmd.args([
        "-c",
        "import socket, sys\n\
         s = socket.socket(socket.AF_UNIX)\n\
         s.connect(sys.argv[1])\n\
         s.sendall(b'x')\n\
         sys.stdin.read()\n",
    ])
    .arg(path)
    .current_dir("/")
    .stdin(Stdio::piped());
    if let Some((uid, gid)) = ids {
        cmd.uid(uid).gid(gid);
    }
    cmd.spawn()
        .expect("python3 must be installed to run these tests")
}

/// The real path of a program found on PATH.
pub(crate) fn which(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .map(|found| std::fs::canonicalize(found).unwrap())
        .unwrap_or_else(|| panic!("{program} is not on PATH"))
}

/// The SHA-256 of a file as lowercase hex, computed in one piece, apart from the attestor's
/// streaming and cached code.
pub(crate) fn sha256_of_file(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &bytes,
    ))
}

/// The values of the selectors of one kind, e.g. every `unix:supplementary_gid:N`'s N.
pub(crate) fn values_of<'a>(selectors: &'a [crate::Selector], kind: &str) -> Vec<&'a str> {
    let prefix = format!("unix:{kind}:");
    selectors
        .iter()
        .filter_map(|s| s.as_str().strip_prefix(&prefix))
        .collect()
}

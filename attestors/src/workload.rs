//! The workload attestor interface: from the credentials the kernel reported for a socket peer
//! to the selectors that describe the workload process.

use crate::selector::Selector;

/// What the kernel reported about the process at the other end of a Unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// The peer's process ID, as seen in this process's pid namespace.
    pub pid: i32,
    /// The peer's effective user ID when it connected.
    pub uid: u32,
    /// The peer's effective group ID when it connected.
    pub gid: u32,
}

/// Why a workload process could not be attested.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadAttestError {
    /// The kernel reported a pid that cannot name a process.
    #[error("the peer pid {0} does not name a process")]
    InvalidPid(i32),
    /// The process has exited, so nothing true can be said about it any more.
    #[error("process {pid} has exited")]
    ProcessGone {
        /// The pid the process had.
        pid: i32,
    },
    /// A file under /proc exists but could not be read, for instance for lack of permission.
    #[error("cannot read {path}: {source}")]
    ProcUnreadable {
        /// The file that could not be read.
        path: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A file under /proc did not have the layout the kernel documents.
    #[error("{path} is malformed: {reason}")]
    ProcMalformed {
        /// The file that was read.
        path: String,
        /// What was wrong, in words.
        reason: &'static str,
    },
    /// The executable was opened but reading it for its hash failed.
    #[error("cannot read the executable of process {pid}: {source}")]
    ExecutableUnreadable {
        /// The pid of the process whose executable it is.
        pid: i32,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// Derives selectors for a workload process. Blocking (reads /proc, hashes files): callers run it
/// on a blocking thread.
///
/// The selectors describe the process at `peer.pid` when they were read. The caller must confirm
/// afterwards that this is still the process that connected (see
/// [`PeerProcess::confirm`](crate::unix::peer::PeerProcess::confirm)), since pids are reused.
pub trait WorkloadAttestor: Send + Sync {
    /// The attestor's name, also the type of the selectors it produces.
    fn name(&self) -> &'static str;

    /// Reads what can be established about the peer process and returns it as selectors.
    ///
    /// A fact that cannot be expressed as a selector (for instance a user name with a space in
    /// it) is left out rather than failing the whole attestation: a workload matches an entry
    /// only by having all of the entry's selectors, so a missing selector can only withhold an
    /// identity, never grant one.
    ///
    /// # Errors
    /// A [`WorkloadAttestError`] when the process has exited or /proc could not be read.
    fn attest(&self, peer: &PeerCredentials) -> Result<Vec<Selector>, WorkloadAttestError>;
}

//! The pid-reuse guard: ties the pid a socket reports to the one process that connected.
//!
//! SO_PEERCRED gives the pid of the process that connected, but only as a number, and the
//! attestor reads /proc by that number some time later. If the peer has exited in between, the
//! number may already belong to another process, whose selectors would then be attested in the
//! peer's name. So the agent records the process at accept ([`PeerProcess::from_socket`]),
//! attests, and before answering confirms ([`PeerProcess::confirm`]) that the pid still names
//! the same process:
//!
//! - where the kernel offers SO_PEERPIDFD, by a pidfd, a handle on the peer process itself
//!   rather than on its number, that reports -1 as its pid once the process has exited;
//! - in all cases, by the process's start time and effective uid in /proc, which a new process
//!   on the same pid would not share (the start time is in clock ticks, so this fallback cannot
//!   tell apart two processes started within the same tick).
//!
//! A process that has exited but not yet been reaped (a zombie) still holds its pid, so nothing
//! else can be at that pid yet; the guard does not refuse it, and the attestor finds no
//! executable for it.

#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::sys::socket::{getsockopt, sockopt};

use super::procfs::{self, ProcError};
use crate::workload::PeerCredentials;

/// Why a socket's peer could not be tied to a live process, or is no longer the same one.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The kernel would not report the socket's peer credentials (SO_PEERCRED).
    #[error("cannot read the peer credentials of the socket: {0}")]
    Credentials(#[source] io::Error),
    /// The socket has no peer process, for instance because it is not connected.
    #[error("the socket has no peer process (the kernel reports pid {0})")]
    NoPeer(i32),
    /// The kernel offers SO_PEERPIDFD but failed to give a pidfd for another reason than the
    /// peer having exited.
    #[error("cannot get a pidfd for the peer of the socket: {0}")]
    Pidfd(#[source] io::Error),
    /// The boot clock or the kernel's clock tick rate could not be read.
    #[error("cannot read the boot clock: {0}")]
    Clock(#[source] io::Error),
    /// The peer process has exited.
    #[error("peer process {pid} has exited")]
    Gone {
        /// The pid the peer had.
        pid: i32,
    },
    /// A file under /proc exists but could not be read.
    #[error("cannot read {path}: {source}")]
    ProcUnreadable {
        /// The file that could not be read.
        path: String,
        /// The operating system's error.
        source: io::Error,
    },
    /// A file under /proc did not have the layout the kernel documents.
    #[error("{path} is malformed: {reason}")]
    ProcMalformed {
        /// The file that was read.
        path: String,
        /// What was wrong, in words.
        reason: &'static str,
    },
    /// The pid now belongs to a process with another start time: the peer exited and its pid
    /// was reused.
    #[error(
        "pid {pid} now belongs to another process (started at tick {now}, the peer at {at_accept})"
    )]
    StartTimeChanged {
        /// The peer's pid.
        pid: i32,
        /// The start time recorded at accept, in clock ticks since boot.
        at_accept: u64,
        /// The start time of the process at the pid now.
        now: u64,
    },
    /// The process at the pid started after the connection was accepted, so it cannot be the
    /// process that connected.
    #[error(
        "process {pid} started at tick {start_ticks}, after the connection was accepted at tick {accept_ticks}"
    )]
    StartedAfterAccept {
        /// The pid.
        pid: i32,
        /// When the process at the pid started, in clock ticks since boot.
        start_ticks: u64,
        /// When the connection was accepted, in clock ticks since boot.
        accept_ticks: u64,
    },
    /// The process at the pid runs as another effective user than the one that connected.
    #[error("process {pid} runs as uid {found}, but uid {expected} connected")]
    UidChanged {
        /// The pid.
        pid: i32,
        /// The effective uid reported by the socket.
        expected: u32,
        /// The effective uid in `/proc/<pid>/status` now.
        found: u32,
    },
    /// The pidfd names a process at another pid, or one this process's pid namespace cannot see.
    #[error("the pidfd of peer {pid} names pid {found}")]
    PidfdMismatch {
        /// The peer's pid.
        pid: i32,
        /// The pid the pidfd's fdinfo reports (0 for a process in an unseen namespace).
        found: i64,
    },
}

impl From<ProcError> for PeerError {
    fn from(e: ProcError) -> Self {
        match e {
            ProcError::Gone { pid } => Self::Gone { pid },
            ProcError::Io { path, source } => Self::ProcUnreadable { path, source },
            ProcError::Malformed { path, reason } => Self::ProcMalformed { path, reason },
        }
    }
}

/// The process at the other end of an accepted Unix socket, recorded so that it can be told
/// apart from a later process on the same pid.
#[derive(Debug)]
pub struct PeerProcess {
    credentials: PeerCredentials,
    /// A handle on the peer process itself, where the kernel offers SO_PEERPIDFD.
    pidfd: Option<OwnedFd>,
    /// The peer's start time, in clock ticks since boot.
    start_ticks: u64,
    /// When the connection was accepted, in clock ticks since boot.
    accept_ticks: u64,
}

impl PeerProcess {
    /// Reads SO_PEERCRED and, where the kernel has it, SO_PEERPIDFD from an accepted socket,
    /// plus the peer's start time from `/proc/<pid>/stat` and the boot-relative time of the
    /// accept (taken first, so it is no later than the accept the caller just did), then
    /// confirms them as [`PeerProcess::confirm`] does.
    ///
    /// # Errors
    /// A [`PeerError`] when the credentials cannot be read, the socket has no peer, the peer has
    /// already exited, or it fails the checks of [`PeerProcess::confirm`].
    pub fn from_socket<F: AsFd>(socket: &F) -> Result<Self, PeerError> {
        let accept_ticks = procfs::boot_ticks_now().map_err(PeerError::Clock)?;
        let cred = getsockopt(socket, sockopt::PeerCredentials)
            .map_err(|e| PeerError::Credentials(e.into()))?;
        let credentials = PeerCredentials {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
        };
        let pid = credentials.pid;
        if pid <= 0 {
            return Err(PeerError::NoPeer(pid));
        }
        let pidfd = peer_pidfd(socket, pid)?;
        let start_ticks = procfs::start_ticks(pid)?;
        let peer = Self {
            credentials,
            pidfd,
            start_ticks,
            accept_ticks,
        };
        // Checked at once as well: the pidfd check shows that the start time just read was the
        // peer's own, and a peer that is already gone is refused before any attestation work.
        peer.confirm()?;
        Ok(peer)
    }

    /// The credentials the kernel reported for the peer when it connected.
    pub fn credentials(&self) -> PeerCredentials {
        self.credentials
    }

    /// Whether the kernel gave a pidfd for the peer (SO_PEERPIDFD, Linux 6.5 and later).
    pub fn has_pidfd(&self) -> bool {
        self.pidfd.is_some()
    }

    /// Confirms the process that connected is still the one at that pid, running with the
    /// peer's effective uid (2nd field of `Uid:` in `/proc/<pid>/status`), and did not start
    /// after the accept (a process started after the connection cannot be its peer). With a
    /// pidfd, `/proc/self/fdinfo/<pidfd>`'s "Pid:" line, read last, must equal the pid (it
    /// reads -1 once the process has exited); without one, `/proc/<pid>/stat`'s start time,
    /// read before and after the status, must equal the one read at accept.
    ///
    /// # Errors
    /// [`PeerError::Gone`] once the peer has exited, [`PeerError::StartTimeChanged`],
    /// [`PeerError::StartedAfterAccept`], [`PeerError::UidChanged`] or
    /// [`PeerError::PidfdMismatch`] when the pid is not the peer's, and the /proc read errors.
    pub fn confirm(&self) -> Result<(), PeerError> {
        let pid = self.credentials.pid;
        if self.start_ticks > self.accept_ticks {
            return Err(PeerError::StartedAfterAccept {
                pid,
                start_ticks: self.start_ticks,
                accept_ticks: self.accept_ticks,
            });
        }
        match &self.pidfd {
            // With a pidfd, the fdinfo read last proves the peer still holds its pid, hence held
            // it while its status was read: two reads, no walk of /proc/<pid>/stat (which visits
            // every thread of the peer and dominated the cost of a cached fetch).
            Some(pidfd) => {
                self.check_uid()?;
                let path = format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd());
                let fdinfo = procfs::read(&path, None)?;
                let found = procfs::parse_fdinfo_pid(&fdinfo).ok_or(PeerError::ProcMalformed {
                    path,
                    reason: "no well-formed Pid: line",
                })?;
                if found == -1 {
                    return Err(PeerError::Gone { pid });
                }
                if found != i64::from(pid) {
                    return Err(PeerError::PidfdMismatch { pid, found });
                }
                Ok(())
            }
            // Without one, the start time read before and after the status shows the status
            // was the same process's, and not one that took the pid in between.
            None => {
                self.check_start_time()?;
                self.check_uid()?;
                self.check_start_time()
            }
        }
    }

    /// Checks that the process at the pid runs with the peer's effective uid.
    fn check_uid(&self) -> Result<(), PeerError> {
        let pid = self.credentials.pid;
        let (path, status) = procfs::status(pid)?;
        let euid = procfs::parse_effective_uid(&status).ok_or(PeerError::ProcMalformed {
            path,
            reason: "no well-formed Uid: line",
        })?;
        if euid != self.credentials.uid {
            return Err(PeerError::UidChanged {
                pid,
                expected: self.credentials.uid,
                found: euid,
            });
        }
        Ok(())
    }

    /// Checks that the process at the pid started when the peer did.
    fn check_start_time(&self) -> Result<(), PeerError> {
        let pid = self.credentials.pid;
        let now = procfs::start_ticks(pid)?;
        if now != self.start_ticks {
            return Err(PeerError::StartTimeChanged {
                pid,
                at_accept: self.start_ticks,
                now,
            });
        }
        Ok(())
    }
}

/// The peer's pidfd, or `None` where the kernel does not offer SO_PEERPIDFD.
fn peer_pidfd<F: AsFd>(socket: &F, pid: i32) -> Result<Option<OwnedFd>, PeerError> {
    match getsockopt(socket, sockopt::PeerPidfd) {
        Ok(fd) => Ok(Some(fd)),
        // Kernels before 6.5 do not know the option.
        Err(Errno::ENOPROTOOPT) => Ok(None),
        // EINVAL is what a kernel that has the option returns when the peer has already exited,
        // and what some sandboxes return for options they do not know. Falling back in the
        // first case would let a pid reused since then pass, so a probe decides which it is.
        Err(Errno::EINVAL) => {
            if kernel_offers_peer_pidfd().map_err(PeerError::Pidfd)? {
                Err(PeerError::Gone { pid })
            } else {
                Ok(None)
            }
        }
        Err(e) => Err(PeerError::Pidfd(e.into())),
    }
}

/// Whether this kernel hands out pidfds for socket peers, found once by asking for the pidfd
/// of this very process over a socket pair.
fn kernel_offers_peer_pidfd() -> io::Result<bool> {
    static OFFERED: OnceLock<bool> = OnceLock::new();
    if let Some(&offered) = OFFERED.get() {
        return Ok(offered);
    }
    let (ours, _theirs) = UnixStream::pair()?;
    let offered = match getsockopt(&ours, sockopt::PeerPidfd) {
        Ok(_) => true,
        Err(Errno::ENOPROTOOPT | Errno::EINVAL) => false,
        Err(e) => return Err(e.into()),
    };
    Ok(*OFFERED.get_or_init(|| offered))
}

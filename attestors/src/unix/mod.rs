//! The `unix` workload attestor: selectors from the peer's credentials and from /proc.
//!
//! For a peer it produces `unix:uid:N` and `unix:gid:N` (from the socket's credentials),
//! `unix:user:NAME` and `unix:group:NAME` when the IDs have names on this host,
//! `unix:supplementary_gid:N` for each group on the `Groups:` line of `/proc/<pid>/status`,
//! `unix:path:/…` (the target of `/proc/<pid>/exe`) and `unix:sha256:…` (of the executable's
//! contents). Path and hash are left out for an executable that has been deleted, and the hash
//! for one bigger than [`UnixAttestorConfig::max_hash_bytes`].
//!
//! The selectors describe whatever process holds the pid while they are read; [`peer`] holds the
//! guard that confirms it is still the one that connected.

mod hash;
pub mod peer;
mod procfs;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;

use nix::unistd::{Gid, Group, Uid, User};

use crate::selector::Selector;
use crate::workload::{PeerCredentials, WorkloadAttestError, WorkloadAttestor};
use hash::HashCache;
use procfs::ProcError;

/// The attestor's name, which is also the type of its selectors.
pub const NAME: &str = "unix";
/// The default cap on the size of an executable that is hashed: 64 MiB.
pub const DEFAULT_MAX_HASH_BYTES: u64 = 64 * 1024 * 1024;
/// How many executable hashes are remembered.
pub const HASH_CACHE_ENTRIES: usize = 1024;

/// The suffix the kernel appends to the target of `/proc/<pid>/exe` once the file is unlinked.
const DELETED_SUFFIX: &[u8] = b" (deleted)";

/// Settings of the [`UnixAttestor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixAttestorConfig {
    /// Executables bigger than this many bytes get no `unix:sha256` selector, so that a huge
    /// binary does not stall attestation while it is read.
    pub max_hash_bytes: u64,
}

impl Default for UnixAttestorConfig {
    fn default() -> Self {
        Self {
            max_hash_bytes: DEFAULT_MAX_HASH_BYTES,
        }
    }
}

/// The `unix` workload attestor. Holds only a cache of executable hashes.
#[derive(Debug)]
pub struct UnixAttestor {
    config: UnixAttestorConfig,
    cache: HashCache,
}

impl UnixAttestor {
    /// An attestor with the given settings and an empty hash cache.
    pub fn new(config: UnixAttestorConfig) -> Self {
        Self {
            config,
            cache: HashCache::new(HASH_CACHE_ENTRIES),
        }
    }

    /// The attestor's settings.
    pub fn config(&self) -> UnixAttestorConfig {
        self.config
    }

    /// The path and hash selectors of the process's executable.
    fn executable_selectors(
        &self,
        pid: i32,
        selectors: &mut Vec<Selector>,
    ) -> Result<(), WorkloadAttestError> {
        let exe_link = procfs::pid_path(pid, "exe");
        let exe = File::open(&exe_link).map_err(|e| {
            if procfs::is_gone(&e) {
                WorkloadAttestError::ProcessGone { pid }
            } else {
                WorkloadAttestError::ProcUnreadable {
                    path: exe_link.clone(),
                    source: e,
                }
            }
        })?;
        // The path is read from the file just opened rather than from /proc/<pid>/exe a second
        // time: the kernel gives the same text for both, and this way the path and the hash
        // are of the same file even if the process executes another program meanwhile.
        let fd_link = format!("/proc/self/fd/{}", exe.as_raw_fd());
        let target =
            std::fs::read_link(&fd_link).map_err(|e| WorkloadAttestError::ProcUnreadable {
                path: fd_link,
                source: e,
            })?;
        if target.as_os_str().as_bytes().ends_with(DELETED_SUFFIX) {
            // The file the process runs has no name any more (an upgrade replaced it, or it
            // deleted itself); neither a path nor the contents of an unlinked file are evidence
            // anyone registered.
            return Ok(());
        }
        // A path that is not UTF-8 cannot be written as a selector, but the contents can still
        // be vouched for by their hash.
        if let Some(path) = target.to_str() {
            push_if_valid(selectors, "path", path);
        }
        self.push_hash(pid, &exe, selectors)
    }

    /// Adds the executable's `unix:sha256` selector unless it is too big or changed while read.
    fn push_hash(
        &self,
        pid: i32,
        exe: &File,
        selectors: &mut Vec<Selector>,
    ) -> Result<(), WorkloadAttestError> {
        let hash = self
            .cache
            .sha256_hex(exe, self.config.max_hash_bytes)
            .map_err(|source| WorkloadAttestError::ExecutableUnreadable { pid, source })?;
        if let Some(hash) = hash {
            push_if_valid(selectors, "sha256", &hash);
        }
        Ok(())
    }
}

impl Default for UnixAttestor {
    fn default() -> Self {
        Self::new(UnixAttestorConfig::default())
    }
}

impl WorkloadAttestor for UnixAttestor {
    fn name(&self) -> &'static str {
        NAME
    }

    fn attest(&self, peer: &PeerCredentials) -> Result<Vec<Selector>, WorkloadAttestError> {
        let pid = peer.pid;
        if pid <= 0 {
            return Err(WorkloadAttestError::InvalidPid(pid));
        }
        let mut selectors = Vec::new();

        push_if_valid(&mut selectors, "uid", &peer.uid.to_string());
        // A failed lookup (no such user, or the name service is down) only withholds the name
        // selector, which cannot grant anything by its absence.
        if let Ok(Some(user)) = User::from_uid(Uid::from_raw(peer.uid)) {
            push_if_valid(&mut selectors, "user", &user.name);
        }
        push_if_valid(&mut selectors, "gid", &peer.gid.to_string());
        if let Ok(Some(group)) = Group::from_gid(Gid::from_raw(peer.gid)) {
            push_if_valid(&mut selectors, "group", &group.name);
        }

        let (status_path, status) = procfs::status(pid).map_err(proc_error)?;
        let groups = procfs::parse_groups(&status).ok_or(WorkloadAttestError::ProcMalformed {
            path: status_path,
            reason: "no well-formed Groups: line",
        })?;
        for gid in groups {
            push_if_valid(&mut selectors, "supplementary_gid", &gid.to_string());
        }

        self.executable_selectors(pid, &mut selectors)?;
        Ok(selectors)
    }
}

/// Adds `unix:KIND:VALUE` if it is a valid selector. Values that cannot be written as selectors
/// (a user name with a space, a path with a control character) are left out, as
/// [`WorkloadAttestor::attest`] explains.
fn push_if_valid(selectors: &mut Vec<Selector>, kind: &str, value: &str) {
    if let Ok(selector) = Selector::unix(kind, value) {
        selectors.push(selector);
    }
}

fn proc_error(e: ProcError) -> WorkloadAttestError {
    match e {
        ProcError::Gone { pid } => WorkloadAttestError::ProcessGone { pid },
        ProcError::Io { path, source } => WorkloadAttestError::ProcUnreadable { path, source },
        ProcError::Malformed { path, reason } => {
            WorkloadAttestError::ProcMalformed { path, reason }
        }
    }
}

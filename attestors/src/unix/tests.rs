//! Tests of the unix attestor against the real kernel: this test process and child processes,
//! reached over real Unix sockets.

use std::collections::BTreeSet;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use nix::unistd::{getegid, geteuid, getgroups};

use super::peer::PeerProcess;
use super::test_support::{Listener, NOBODY, sha256_of_file, values_of, which};
use super::*;

/// A cap above any test binary, so the hash is always computed where a test expects one.
const NO_CAP: UnixAttestorConfig = UnixAttestorConfig {
    max_hash_bytes: u64::MAX,
};

fn attest_self(attestor: &UnixAttestor) -> Vec<Selector> {
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let peer = PeerProcess::from_socket(&ours).unwrap();
    let selectors = attestor.attest(&peer.credentials()).unwrap();
    peer.confirm().unwrap();
    selectors
}

#[test]
fn attests_this_process_over_a_socket_pair() {
    let selectors = attest_self(&UnixAttestor::new(NO_CAP));

    assert_eq!(
        values_of(&selectors, "uid"),
        [geteuid().as_raw().to_string()]
    );
    assert_eq!(
        values_of(&selectors, "gid"),
        [getegid().as_raw().to_string()]
    );
    if geteuid().is_root() {
        // Every host names uid 0 in /etc/passwd.
        assert_eq!(values_of(&selectors, "user"), ["root"]);
    }
    let expected_groups: BTreeSet<String> = getgroups()
        .unwrap()
        .iter()
        .map(|g| g.as_raw().to_string())
        .collect();
    let groups: BTreeSet<String> = values_of(&selectors, "supplementary_gid")
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(groups, expected_groups);

    let exe = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
    assert_eq!(values_of(&selectors, "path"), [exe.to_str().unwrap()]);
    assert_eq!(values_of(&selectors, "sha256"), [sha256_of_file(&exe)]);
}

#[test]
fn repeated_attestation_hashes_the_executable_once() {
    let attestor = UnixAttestor::new(NO_CAP);
    let first = attest_self(&attestor);
    assert_eq!(attestor.cache.computed(), 1);
    let second = attest_self(&attestor);
    assert_eq!(
        attestor.cache.computed(),
        1,
        "the second attestation re-read the executable"
    );
    assert_eq!(attestor.cache.len(), 1);
    assert_eq!(values_of(&first, "sha256").len(), 1);
    assert_eq!(values_of(&first, "sha256"), values_of(&second, "sha256"));
}

#[test]
fn executables_over_the_cap_get_no_hash() {
    let exe_len = std::fs::metadata(std::env::current_exe().unwrap())
        .unwrap()
        .len();

    let capped = UnixAttestor::new(UnixAttestorConfig {
        max_hash_bytes: exe_len - 1,
    });
    let selectors = attest_self(&capped);
    assert!(values_of(&selectors, "sha256").is_empty(), "{selectors:?}");
    assert_eq!(values_of(&selectors, "path").len(), 1, "{selectors:?}");
    assert_eq!(capped.cache.computed(), 0);

    // Positive control: a cap of exactly the executable's size hashes it.
    let exact = UnixAttestor::new(UnixAttestorConfig {
        max_hash_bytes: exe_len,
    });
    assert_eq!(values_of(&attest_self(&exact), "sha256").len(), 1);
}

#[test]
fn the_default_cap_is_64_mib() {
    let attestor = UnixAttestor::default();
    assert_eq!(attestor.config().max_hash_bytes, 64 * 1024 * 1024);
    assert_eq!(attestor.name(), "unix");
}

#[test]
fn a_client_running_as_nobody_gets_its_own_uid() {
    let listener = Listener::new();
    let attestor = UnixAttestor::default();

    let (client, stream) = listener.connect_client(Some((NOBODY, NOBODY)));
    let peer = PeerProcess::from_socket(&stream).unwrap();
    assert_eq!(peer.credentials().pid, client.pid());
    let selectors = attestor.attest(&peer.credentials()).unwrap();
    peer.confirm().unwrap();
    assert_eq!(values_of(&selectors, "uid"), ["65534"]);
    assert_eq!(values_of(&selectors, "gid"), ["65534"]);
    // Dropping to nobody clears root's supplementary groups.
    assert!(values_of(&selectors, "supplementary_gid").is_empty());
    let exe = std::fs::read_link(format!("/proc/{}/exe", client.pid())).unwrap();
    assert_eq!(values_of(&selectors, "path"), [exe.to_str().unwrap()]);
    assert_eq!(values_of(&selectors, "sha256"), [sha256_of_file(&exe)]);
    client.exit_and_reap();

    // Positive control: the same client as ourselves gets our uid.
    let (client, stream) = listener.connect_client(None);
    let peer = PeerProcess::from_socket(&stream).unwrap();
    let selectors = attestor.attest(&peer.credentials()).unwrap();
    assert_eq!(
        values_of(&selectors, "uid"),
        [geteuid().as_raw().to_string()]
    );
    client.exit_and_reap();
}

/// Starts a copy of `sleep` from a directory of our own, as nobody.
fn spawn_sleep_copy(dir: &std::path::Path) -> (std::path::PathBuf, Child) {
    let copy = dir.join("sleeper");
    std::fs::copy(which("sleep"), &copy).unwrap();
    for attempt in 0.. {
        // Another test forking at this moment may briefly hold the copy open for writing,
        // which makes exec fail with ETXTBSY; it passes once that child has exec'd.
        match Command::new(&copy)
            .arg("30")
            .uid(NOBODY)
            .gid(NOBODY)
            .spawn()
        {
            Ok(child) => return (copy, child),
            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) && attempt < 50 => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("spawn {}: {e}", copy.display()),
        }
    }
    unreachable!()
}

fn credentials_of(child: &Child) -> PeerCredentials {
    PeerCredentials {
        pid: i32::try_from(child.id()).unwrap(),
        uid: NOBODY,
        gid: NOBODY,
    }
}

#[test]
fn a_deleted_executable_gets_no_path_or_hash() {
    let dir = tempfile::tempdir().unwrap();
    let attestor = UnixAttestor::new(NO_CAP);

    // Positive control: while the file exists, both are there.
    let (copy, mut child) = spawn_sleep_copy(dir.path());
    let selectors = attestor.attest(&credentials_of(&child)).unwrap();
    let copy_path = std::fs::canonicalize(&copy).unwrap();
    assert_eq!(values_of(&selectors, "path"), [copy_path.to_str().unwrap()]);
    assert_eq!(values_of(&selectors, "sha256"), [sha256_of_file(&copy)]);

    std::fs::remove_file(&copy).unwrap();
    let selectors = attestor.attest(&credentials_of(&child)).unwrap();
    assert!(values_of(&selectors, "path").is_empty(), "{selectors:?}");
    assert!(values_of(&selectors, "sha256").is_empty(), "{selectors:?}");
    assert_eq!(values_of(&selectors, "uid"), ["65534"]);

    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_process_that_is_gone_cannot_be_attested() {
    let mut child = Command::new("true").spawn().unwrap();
    let credentials = PeerCredentials {
        pid: i32::try_from(child.id()).unwrap(),
        uid: 0,
        gid: 0,
    };
    child.wait().unwrap();
    let err = UnixAttestor::default().attest(&credentials).unwrap_err();
    assert!(
        matches!(err, WorkloadAttestError::ProcessGone { pid } if pid == credentials.pid),
        "{err:?}"
    );
}

#[test]
fn pids_that_name_no_process_are_refused() {
    for pid in [0, -1] {
        let credentials = PeerCredentials {
            pid,
            uid: 0,
            gid: 0,
        };
        let err = UnixAttestor::default().attest(&credentials).unwrap_err();
        assert!(matches!(err, WorkloadAttestError::InvalidPid(p) if p == pid));
    }
}

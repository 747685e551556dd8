//! Tests of the pid-reuse guard against the real kernel, with real client processes.

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::Duration;

use nix::unistd::{getegid, geteuid};

use super::*;
use crate::unix::test_support::{Listener, NOBODY};

/// The same recorded peer, but as on a kernel without SO_PEERPIDFD, to test the fallback.
fn without_pidfd(peer: &PeerProcess) -> PeerProcess {
    PeerProcess {
        credentials: peer.credentials,
        pidfd: None,
        start_ticks: peer.start_ticks,
        accept_ticks: peer.accept_ticks,
    }
}

#[test]
fn a_socket_pair_names_this_process() {
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let peer = PeerProcess::from_socket(&ours).unwrap();
    assert_eq!(
        peer.credentials(),
        PeerCredentials {
            pid: i32::try_from(std::process::id()).unwrap(),
            uid: geteuid().as_raw(),
            gid: getegid().as_raw(),
        }
    );
    println!("SO_PEERPIDFD offered: {}", peer.has_pidfd());
    assert_eq!(kernel_offers_peer_pidfd().unwrap(), peer.has_pidfd());
    peer.confirm().unwrap();
    without_pidfd(&peer).confirm().unwrap();
}

#[test]
fn a_socket_without_a_peer_is_refused() {
    let unconnected = UnixDatagram::unbound().unwrap();
    let err = PeerProcess::from_socket(&unconnected).unwrap_err();
    assert!(matches!(err, PeerError::NoPeer(_)), "{err:?}");
}

#[test]
fn confirm_holds_while_the_peer_lives_and_fails_once_it_exited() {
    let listener = Listener::new();

    // Positive control: a live peer is confirmed, with and without its pidfd.
    let (client, stream) = listener.connect_client(Some((NOBODY, NOBODY)));
    let peer = PeerProcess::from_socket(&stream).unwrap();
    assert_eq!(peer.credentials().pid, client.pid());
    assert_eq!(peer.credentials().uid, NOBODY);
    peer.confirm().unwrap();
    without_pidfd(&peer).confirm().unwrap();

    client.exit_and_reap();
    let err = peer.confirm().unwrap_err();
    assert!(matches!(err, PeerError::Gone { .. }), "{err:?}");
    let err = without_pidfd(&peer).confirm().unwrap_err();
    assert!(matches!(err, PeerError::Gone { .. }), "{err:?}");
}

#[test]
fn a_peer_that_exited_before_accept_is_refused() {
    let listener = Listener::new();
    let (client, stream) = listener.connect_client(None);
    client.exit_and_reap();
    let err = PeerProcess::from_socket(&stream).unwrap_err();
    assert!(matches!(err, PeerError::Gone { .. }), "{err:?}");
}

#[test]
fn confirm_checks_the_uid_and_the_accept_time() {
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let peer = PeerProcess::from_socket(&ours).unwrap();

    let other_uid = PeerProcess {
        credentials: PeerCredentials {
            uid: peer.credentials.uid ^ 1,
            ..peer.credentials
        },
        ..without_pidfd(&peer)
    };
    let err = other_uid.confirm().unwrap_err();
    assert!(matches!(err, PeerError::UidChanged { .. }), "{err:?}");

    let accepted_before_start = PeerProcess {
        accept_ticks: peer.start_ticks - 1,
        ..without_pidfd(&peer)
    };
    let err = accepted_before_start.confirm().unwrap_err();
    assert!(
        matches!(err, PeerError::StartedAfterAccept { .. }),
        "{err:?}"
    );

    let other_start = PeerProcess {
        start_ticks: peer.start_ticks - 1,
        ..without_pidfd(&peer)
    };
    let err = other_start.confirm().unwrap_err();
    assert!(matches!(err, PeerError::StartTimeChanged { .. }), "{err:?}");
}

/// Starts a process as nobody on exactly `pid`, by setting the kernel's last allocated pid just
/// below it. Other tests start processes and threads meanwhile, so this takes a few tries, and
/// may be impossible where /proc/sys/kernel/ns_last_pid is not writable.
fn spawn_on_pid(pid: i32) -> Option<Child> {
    for _ in 0..20 {
        if let Err(e) = std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()) {
            println!("SKIPPED: cannot write /proc/sys/kernel/ns_last_pid: {e}");
            return None;
        }
        let mut child = Command::new("sleep")
            .arg("30")
            .uid(NOBODY)
            .gid(NOBODY)
            .spawn()
            .unwrap();
        if i64::from(child.id()) == i64::from(pid) {
            return Some(child);
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    println!("SKIPPED: pid {pid} could not be reused");
    None
}

#[test]
fn confirm_fails_when_the_pid_was_reused() {
    let listener = Listener::new();
    let (client, stream) = listener.connect_client(Some((NOBODY, NOBODY)));
    let pid = client.pid();
    let peer = PeerProcess::from_socket(&stream).unwrap();
    peer.confirm().unwrap();
    // The new process must start at a later clock tick than the peer for the fallback to tell
    // them apart; ticks are 10 ms on most systems.
    std::thread::sleep(Duration::from_millis(50));
    client.exit_and_reap();

    let Some(mut reused) = spawn_on_pid(pid) else {
        return;
    };
    // The new process has the same pid and the same uid: only the guard tells it apart, by
    // the pidfd where the kernel has one, and by the start time without it.
    let err = peer.confirm().unwrap_err();
    if peer.pidfd.is_some() {
        assert!(
            matches!(err, PeerError::Gone { pid: p } if p == pid),
            "{err:?}"
        );
    }
    let err = without_pidfd(&peer).confirm().unwrap_err();
    assert!(
        matches!(err, PeerError::StartTimeChanged { pid: p, .. } if p == pid),
        "{err:?}"
    );

    // Were the new process started within the same clock tick as the peer, the start times
    // would agree; the pidfd still knows its process is gone.
    let Some(pidfd) = &peer.pidfd else {
        println!("SKIPPED the pidfd half: this kernel does not offer SO_PEERPIDFD");
        reused.kill().unwrap();
        reused.wait().unwrap();
        return;
    };
    let same_tick = PeerProcess {
        pidfd: Some(pidfd.try_clone().unwrap()),
        start_ticks: procfs::start_ticks(pid).unwrap(),
        accept_ticks: u64::MAX,
        ..without_pidfd(&peer)
    };
    without_pidfd(&same_tick).confirm().unwrap();
    let err = same_tick.confirm().unwrap_err();
    assert!(matches!(err, PeerError::Gone { .. }), "{err:?}");

    reused.kill().unwrap();
    reused.wait().unwrap();
}

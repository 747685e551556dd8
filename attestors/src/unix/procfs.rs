//! Readers for the few /proc files the unix attestor and the peer guard need, and the boot
//! clock they are compared against.
//!
//! The files are read as bytes and parsed leniently as text: a process chooses its own name
//! (`comm`), which may hold bytes that are not UTF-8, and that must not stop its other fields
//! from being read.

use std::io;

use nix::errno::Errno;
use nix::time::{ClockId, clock_gettime};
use nix::unistd::{SysconfVar, sysconf};

/// Why a /proc file could not give the value asked for.
#[derive(Debug)]
pub(crate) enum ProcError {
    /// The process has exited.
    Gone { pid: i32 },
    /// The file could not be read.
    Io { path: String, source: io::Error },
    /// The file was read but did not hold the expected field.
    Malformed { path: String, reason: &'static str },
}

/// The path of a file in a process's /proc directory.
pub(crate) fn pid_path(pid: i32, file: &str) -> String {
    format!("/proc/{pid}/{file}")
}

/// Reads a /proc file. When `pid` is given, the file belongs to that process and "not found" or
/// "no such process" means the process has exited.
pub(crate) fn read(path: &str, pid: Option<i32>) -> Result<String, ProcError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) => Err(match pid {
            Some(pid) if is_gone(&e) => ProcError::Gone { pid },
            _ => ProcError::Io {
                path: path.to_owned(),
                source: e,
            },
        }),
    }
}

/// Whether an error from a `/proc/<pid>` file means the process no longer exists.
pub(crate) fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(Errno::ESRCH as i32)
}

/// The process's start time, in clock ticks since boot, from `/proc/<pid>/stat`.
pub(crate) fn start_ticks(pid: i32) -> Result<u64, ProcError> {
    let path = pid_path(pid, "stat");
    let stat = read(&path, Some(pid))?;
    parse_start_ticks(&stat).ok_or(ProcError::Malformed {
        path,
        reason: "no start time in field 22",
    })
}

/// The process's status file, `/proc/<pid>/status`.
pub(crate) fn status(pid: i32) -> Result<(String, String), ProcError> {
    let path = pid_path(pid, "status");
    let text = read(&path, Some(pid))?;
    Ok((path, text))
}

/// Field 22 of a `/proc/<pid>/stat` line, the start time in clock ticks since boot.
///
/// Field 2 is the process's name in parentheses, and the name may itself contain spaces and
/// parentheses; nothing after it can contain ')', so the fields are counted from the last ')'.
pub(crate) fn parse_start_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // The first field after the name is field 3 (the state), so field 22 is the 20th.
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The value of a `Key:` line in a /proc status-like file, without surrounding whitespace.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        Some(rest.trim())
    })
}

/// The effective uid: the second of the four values on the `Uid:` line (real, effective, saved,
/// filesystem).
pub(crate) fn parse_effective_uid(status: &str) -> Option<u32> {
    field(status, "Uid")?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The supplementary group IDs on the `Groups:` line, which is present but empty for a process
/// without any.
pub(crate) fn parse_groups(status: &str) -> Option<Vec<u32>> {
    field(status, "Groups")?
        .split_whitespace()
        .map(|g| g.parse().ok())
        .collect()
}

/// The `Pid:` line of a pidfd's fdinfo: the pid the process has in our namespace, -1 once it
/// has exited, 0 when it is in a namespace we cannot see.
pub(crate) fn parse_fdinfo_pid(fdinfo: &str) -> Option<i64> {
    field(fdinfo, "Pid")?.parse().ok()
}

/// The kernel's clock ticks per second (`USER_HZ`), the unit of /proc start times.
pub(crate) fn ticks_per_second() -> io::Result<u64> {
    match sysconf(SysconfVar::CLK_TCK)? {
        Some(hz) if hz > 0 => Ok(hz.unsigned_abs()),
        _ => Err(io::Error::other(
            "sysconf(_SC_CLK_TCK) gave no positive value",
        )),
    }
}

/// Now, on the clock /proc start times are measured against (time since boot, counting
/// suspend), in clock ticks.
///
/// Both this and the kernel's start time round down to a whole tick, so a process that started
/// before now never appears to have started after it.
pub(crate) fn boot_ticks_now() -> io::Result<u64> {
    let hz = ticks_per_second()?;
    let now = clock_gettime(ClockId::CLOCK_BOOTTIME)?;
    let secs = u64::try_from(now.tv_sec()).map_err(io::Error::other)?;
    let nanos = u64::try_from(now.tv_nsec()).map_err(io::Error::other)?;
    Ok(secs * hz + nanos * hz / 1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real stat line whose name holds spaces, parentheses and a fake field list.
    const STAT: &str = "4242 (a) b (c) 1 2 3) S 1 4242 4242 0 -1 4194560 97 0 0 0 1 0 0 0 20 0 \
                        1 0 123456 8531968 253 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 \
                        0 0 0 0 0\n";

    #[test]
    fn start_time_is_read_after_the_last_paren_of_the_name() {
        assert_eq!(parse_start_ticks(STAT), Some(123_456));
    }

    #[test]
    fn start_time_refuses_truncated_lines() {
        assert_eq!(parse_start_ticks("4242 (sleep) S 1 4242"), None);
        assert_eq!(parse_start_ticks("4242 sleep S"), None);
        assert_eq!(parse_start_ticks(""), None);
    }

    #[test]
    fn start_time_of_this_process_is_in_the_past() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let start = start_ticks(pid).unwrap();
        assert!(start > 0);
        assert!(start <= boot_ticks_now().unwrap());
    }

    #[test]
    fn status_fields_are_parsed() {
        let status = "Name:\tx Uid: y\nUid:\t1000\t65534\t1000\t1000\nGid:\t5\t5\t5\t5\n\
                      Groups:\t4 24 27 \nNSpid:\t9\n";
        assert_eq!(parse_effective_uid(status), Some(65534));
        assert_eq!(parse_groups(status), Some(vec![4, 24, 27]));
        assert_eq!(parse_groups("Groups:\t\n"), Some(vec![]));
        assert_eq!(parse_groups("Uid:\t1 1 1 1\n"), None);
        assert_eq!(parse_groups("Groups:\t4 x\n"), None);
        assert_eq!(parse_effective_uid("Uid:\t1000\n"), None);
    }

    #[test]
    fn fdinfo_pid_is_parsed() {
        let fdinfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nPid:\t-1\nNSpid:\t-1\n";
        assert_eq!(parse_fdinfo_pid(fdinfo), Some(-1));
        assert_eq!(parse_fdinfo_pid("Pid:\t314\n"), Some(314));
        assert_eq!(parse_fdinfo_pid("NSpid:\t314\n"), None);
    }
}

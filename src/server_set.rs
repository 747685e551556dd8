//! The servers an agent may reach: every address of every `--server HOST:PORT` it was given
//! (a DNS name with several addresses counts as several), which one it last reached, and a
//! jittered backoff for each one that failed.
//!
//! Several servers sharing one PostgreSQL database behave as one, so an agent may use any of
//! them. It stays with the one it reached last, and when that one is lost it moves on to the
//! next in the list. A server that failed is not tried again before its backoff ends, unless
//! every server is in backoff; the backoff grows with each failure and is jittered, so a fleet
//! of agents that lost one server does not come back to it in lockstep.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The first backoff after a server failed.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why a list of server addresses was refused.
#[derive(Debug, thiserror::Error)]
pub enum ServerSetError {
    /// An entry of the list is not HOST:PORT.
    #[error("'{0}' is not a server address: write HOST:PORT, such as 127.0.0.1:8081")]
    Malformed(String),
    /// A host name did not resolve to any address.
    #[error("the server address '{name}' does not resolve; check the name, or give an IP address")]
    Unresolved {
        /// The name as given.
        name: String,
        /// The resolver's error, when it gave one.
        #[source]
        source: Option<std::io::Error>,
    },
    /// The list is empty.
    #[error("no server address was given; pass --server HOST:PORT (repeatable)")]
    Empty,
}

/// The addresses of `names` (each `HOST:PORT`), in the order given, each address once: a name
/// that resolves to several addresses contributes all of them, in the resolver's order.
///
/// # Errors
/// [`ServerSetError`] for an empty list, an entry without a port, or a name that does not
/// resolve.
pub fn resolve(names: &[String]) -> Result<Vec<SocketAddr>, ServerSetError> {
    expand(names, |name| name.to_socket_addrs().map(Iterator::collect))
}

/// [`resolve`] with the resolver given, so the expansion can be checked on its own.
///
/// # Errors
/// As [`resolve`].
pub fn expand(
    names: &[String],
    mut lookup: impl FnMut(&str) -> std::io::Result<Vec<SocketAddr>>,
) -> Result<Vec<SocketAddr>, ServerSetError> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for name in names {
        let name = name.trim();
        // `to_socket_addrs` would say "invalid socket address" for a missing port, which does
        // not tell the user what to write.
        let has_port = name
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !has_port {
            return Err(ServerSetError::Malformed(
                crate::text::escape(name).into_owned(),
            ));
        }
        let found = lookup(name).map_err(|e| ServerSetError::Unresolved {
            name: crate::text::escape(name).into_owned(),
            source: Some(e),
        })?;
        if found.is_empty() {
            return Err(ServerSetError::Unresolved {
                name: crate::text::escape(name).into_owned(),
                source: None,
            });
        }
        for addr in found {
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
    }
    if out.is_empty() {
        return Err(ServerSetError::Empty);
    }
    Ok(out)
}

/// One server's recent failures.
#[derive(Debug, Clone, Copy, Default)]
struct Health {
    /// Failures since it last answered.
    failures: u32,
    /// Not tried again before this, unless every server is in backoff.
    retry_at: Option<Instant>,
}

#[derive(Debug)]
struct State {
    /// The server reached last, tried first.
    preferred: usize,
    health: Vec<Health>,
}

/// The servers an agent may reach, and their health; shared by every connection it makes.
#[derive(Debug)]
pub struct ServerSet {
    addrs: Vec<SocketAddr>,
    state: Mutex<State>,
}

impl ServerSet {
    /// The set of `addrs` (duplicates dropped, order kept).
    ///
    /// # Errors
    /// [`ServerSetError::Empty`] when `addrs` is empty.
    pub fn new(addrs: &[SocketAddr]) -> Result<Self, ServerSetError> {
        let mut unique: Vec<SocketAddr> = Vec::with_capacity(addrs.len());
        for addr in addrs {
            if !unique.contains(addr) {
                unique.push(*addr);
            }
        }
        if unique.is_empty() {
            return Err(ServerSetError::Empty);
        }
        let health = vec![Health::default(); unique.len()];
        Ok(Self {
            addrs: unique,
            state: Mutex::new(State {
                preferred: 0,
                health,
            }),
        })
    }

    /// The set of one server.
    pub fn single(addr: SocketAddr) -> Self {
        Self::new(&[addr]).unwrap_or_else(|_| unreachable!("one address is not empty"))
    }

    /// Every address, in the order given.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The server reached last (or the first of the list).
    pub fn preferred(&self) -> SocketAddr {
        self.addrs[self.state().preferred]
    }

    /// The order to try the servers in at `now`: those not in backoff first, starting with the
    /// preferred one and going round the list; then those in backoff, the soonest due first.
    /// With the order, how long to wait before the first attempt: zero unless every server is
    /// in backoff, else until the soonest is due.
    pub fn attempt_order(&self, now: Instant) -> (Vec<SocketAddr>, Duration) {
        let state = self.state();
        let n = self.addrs.len();
        let mut ready = Vec::with_capacity(n);
        let mut waiting = Vec::new();
        for step in 0..n {
            let i = (state.preferred + step) % n;
            match state.health[i].retry_at {
                Some(at) if at > now => waiting.push((at, i)),
                _ => ready.push(self.addrs[i]),
            }
        }
        waiting.sort();
        let wait = if ready.is_empty() {
            waiting
                .first()
                .map_or(Duration::ZERO, |(at, _)| at.duration_since(now))
        } else {
            Duration::ZERO
        };
        ready.extend(waiting.into_iter().map(|(_, i)| self.addrs[i]));
        (ready, wait)
    }

    /// `addr` answered: it becomes the preferred server and its backoff ends.
    pub fn succeeded(&self, addr: SocketAddr) {
        if let Some(i) = self.index(addr) {
            let mut state = self.state();
            state.preferred = i;
            state.health[i] = Health::default();
        }
    }

    /// `addr` could not be reached, or could not serve: it is not tried again before a jittered
    /// backoff has passed (unless every server is in backoff), and the next server in the list
    /// becomes the preferred one.
    pub fn failed(&self, addr: SocketAddr, now: Instant) {
        let Some(i) = self.index(addr) else { return };
        let mut state = self.state();
        let health = &mut state.health[i];
        health.failures = health.failures.saturating_add(1);
        health.retry_at = Some(now + jittered(backoff(health.failures)));
        if state.preferred == i {
            state.preferred = (i + 1) % self.addrs.len();
        }
    }

    fn index(&self, addr: SocketAddr) -> Option<usize> {
        self.addrs.iter().position(|a| *a == addr)
    }
}

/// The backoff after `failures` failures in a row: 0.5 s, doubling, at most [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_BACKOFF
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}

/// `base`, moved at random to between half of it and all of it.
fn jittered(base: Duration) -> Duration {
    let mut byte = [0u8; 2];
    let _ = aws_lc_rs::rand::fill(&mut byte);
    let fraction = 0.5 + 0.5 * f64::from(u16::from_le_bytes(byte)) / f64::from(u16::MAX);
    base.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    /// `localhost` resolves (through the system's resolver) to 127.0.0.1, and to ::1 as well
    /// where the system says so: every address counts as a server.
    #[test]
    fn localhost_expands_to_each_of_its_addresses() {
        let addrs = resolve(&names(&["localhost:8081"])).unwrap();
        assert!(addrs.contains(&addr("127.0.0.1:8081")), "{addrs:?}");
        let system: Vec<SocketAddr> = "localhost:8081".to_socket_addrs().unwrap().collect();
        for a in &system {
            assert!(
                addrs.contains(a),
                "{a} from the resolver is kept: {addrs:?}"
            );
        }
        assert_eq!(
            addrs.len(),
            system
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
        );
    }

    /// A name with several addresses contributes them all in order; an address given twice
    /// (directly and through a name) counts once.
    #[test]
    fn several_addresses_count_as_several_servers_once_each() {
        let lookup = |name: &str| -> std::io::Result<Vec<SocketAddr>> {
            Ok(match name {
                "servers.test:8081" => vec![
                    addr("10.0.0.1:8081"),
                    addr("10.0.0.2:8081"),
                    addr("[fd00::3]:8081"),
                ],
                "10.0.0.2:8081" => vec![addr("10.0.0.2:8081")],
                "backup.test:9000" => vec![addr("10.0.1.9:9000")],
                _ => vec![],
            })
        };
        let addrs = expand(
            &names(&["servers.test:8081", "10.0.0.2:8081", "backup.test:9000"]),
            lookup,
        )
        .unwrap();
        assert_eq!(
            addrs,
            vec![
                addr("10.0.0.1:8081"),
                addr("10.0.0.2:8081"),
                addr("[fd00::3]:8081"),
                addr("10.0.1.9:9000"),
            ]
        );
    }

    #[test]
    fn bad_lists_are_refused_with_what_to_write() {
        let never = |_: &str| -> std::io::Result<Vec<SocketAddr>> { Ok(vec![]) };
        let err = expand(&names(&["server.test"]), never).unwrap_err();
        assert!(matches!(err, ServerSetError::Malformed(_)), "{err:?}");
        assert!(err.to_string().contains("HOST:PORT"), "{err}");
        let err = expand(&names(&["gone.test:1"]), never).unwrap_err();
        assert!(matches!(err, ServerSetError::Unresolved { .. }), "{err:?}");
        assert!(matches!(
            expand(&[], never).unwrap_err(),
            ServerSetError::Empty
        ));
        // Positive control on the same resolver shape.
        let one = |_: &str| -> std::io::Result<Vec<SocketAddr>> { Ok(vec![addr("10.0.0.1:1")]) };
        assert_eq!(
            expand(&names(&["server.test:1"]), one).unwrap(),
            vec![addr("10.0.0.1:1")]
        );
    }

    /// A failed server goes to the back until its backoff ends; the next becomes preferred;
    /// when all are in backoff the soonest due comes first, after a wait.
    #[test]
    fn failed_servers_wait_out_a_jittered_backoff() {
        let (a, b, c) = (addr("10.0.0.1:1"), addr("10.0.0.2:1"), addr("10.0.0.3:1"));
        let set = ServerSet::new(&[a, b, c, a]).unwrap();
        assert_eq!(set.addrs(), &[a, b, c]);
        let now = Instant::now();
        assert_eq!(set.attempt_order(now), (vec![a, b, c], Duration::ZERO));

        set.failed(a, now);
        assert_eq!(set.preferred(), b);
        assert_eq!(set.attempt_order(now), (vec![b, c, a], Duration::ZERO));
        // After its backoff (at most the first one) it is back in the rotation.
        assert_eq!(
            set.attempt_order(now + FIRST_BACKOFF).0,
            vec![b, c, a],
            "ready again, after the preferred"
        );

        set.failed(b, now);
        set.failed(c, now);
        let (order, wait) = set.attempt_order(now);
        assert_eq!(order.len(), 3);
        assert!(wait > Duration::ZERO && wait <= FIRST_BACKOFF, "{wait:?}");

        set.succeeded(c);
        assert_eq!(set.preferred(), c);
        assert_eq!(set.attempt_order(now).0[0], c);
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        assert_eq!(backoff(1), FIRST_BACKOFF);
        assert_eq!(backoff(2), FIRST_BACKOFF * 2);
        assert_eq!(backoff(100), MAX_BACKOFF);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..100 {
            let j = jittered(Duration::from_secs(10));
            assert!(
                j >= Duration::from_secs(5) && j <= Duration::from_secs(10),
                "{j:?}"
            );
            seen.insert(j.as_millis());
        }
        assert!(seen.len() > 10, "jitter spreads the retries: {seen:?}");
    }
}

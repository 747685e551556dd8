//! The audit log's records and their hash chain.
//!
//! Every issuance, every refusal and every operator change is an [`AuditEvent`]. The store
//! appends it as an [`AuditRecord`] whose hash covers the event, its sequence number and the
//! previous record's hash, so editing, inserting or deleting a record breaks the chain that
//! [`ChainVerifier`] checks. This module is pure: the store persists, the server decides.

use std::fmt;

use aws_lc_rs::digest;
use serde::Serialize;

use crate::svid::Serial;

/// Whether the request was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Granted.
    Allow,
    /// Refused.
    Deny,
}

impl Decision {
    /// `allow` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }

    /// Parses `allow` or `deny`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "allow" => Some(Self::Allow),
            "deny" => Some(Self::Deny),
            _ => None,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What was asked. The names (`svid.task`, ...) are what the store keeps, the admin API sends
/// and the hash chain covers, so they never change once released: a renamed action would make
/// every record that holds it fail verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum AuditAction {
    /// An identity SVID for an entry (`svid.identity`).
    #[serde(rename = "svid.identity")]
    SvidIdentity,
    /// A task SVID with scopes (`svid.task`).
    #[serde(rename = "svid.task")]
    SvidTask,
    /// An identity JWT-SVID for an entry and one audience (`jwt.identity`).
    #[serde(rename = "jwt.identity")]
    JwtIdentity,
    /// A task JWT-SVID with scopes and one audience (`jwt.task`).
    #[serde(rename = "jwt.task")]
    JwtTask,
    /// A node attested with a join token (`agent.attest`).
    #[serde(rename = "agent.attest")]
    AgentAttest,
    /// An agent renewed its own SVID (`agent.renew`).
    #[serde(rename = "agent.renew")]
    AgentRenew,
    /// An operator created an entry (`entry.create`).
    #[serde(rename = "entry.create")]
    EntryCreate,
    /// An operator deleted an entry (`entry.delete`).
    #[serde(rename = "entry.delete")]
    EntryDelete,
    /// An operator generated a join token (`token.create`).
    #[serde(rename = "token.create")]
    TokenCreate,
    /// An operator banned an agent (`agent.ban`).
    #[serde(rename = "agent.ban")]
    AgentBan,
    /// An operator evicted an agent (`agent.evict`).
    #[serde(rename = "agent.evict")]
    AgentEvict,
    /// An operator prepared the next CA (`ca.prepare`).
    #[serde(rename = "ca.prepare")]
    CaPrepare,
    /// An operator activated the prepared CA (`ca.activate`).
    #[serde(rename = "ca.activate")]
    CaActivate,
    /// An operator tainted a CA (`ca.taint`).
    #[serde(rename = "ca.taint")]
    CaTaint,
    /// An operator revoked a CA (`ca.revoke`).
    #[serde(rename = "ca.revoke")]
    CaRevoke,
    /// An operator changed an entry (`entry.update`).
    #[serde(rename = "entry.update")]
    EntryUpdate,
}

impl AuditAction {
    /// Every action, in declaration order.
    pub const ALL: [Self; 16] = [
        Self::SvidIdentity,
        Self::SvidTask,
        Self::JwtIdentity,
        Self::JwtTask,
        Self::AgentAttest,
        Self::AgentRenew,
        Self::EntryCreate,
        Self::EntryDelete,
        Self::TokenCreate,
        Self::AgentBan,
        Self::AgentEvict,
        Self::CaPrepare,
        Self::CaActivate,
        Self::CaTaint,
        Self::CaRevoke,
        Self::EntryUpdate,
    ];

    /// The stored and wire name, e.g. `svid.task`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SvidIdentity => "svid.identity",
            Self::SvidTask => "svid.task",
            Self::JwtIdentity => "jwt.identity",
            Self::JwtTask => "jwt.task",
            Self::AgentAttest => "agent.attest",
            Self::AgentRenew => "agent.renew",
            Self::EntryCreate => "entry.create",
            Self::EntryDelete => "entry.delete",
            Self::EntryUpdate => "entry.update",
            Self::TokenCreate => "token.create",
            Self::AgentBan => "agent.ban",
            Self::AgentEvict => "agent.evict",
            Self::CaPrepare => "ca.prepare",
            Self::CaActivate => "ca.activate",
            Self::CaTaint => "ca.taint",
            Self::CaRevoke => "ca.revoke",
        }
    }

    /// Parses a stored or wire name; `None` for a name this version does not know.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing that happened, before it is chained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEvent {
    /// When, Unix milliseconds.
    pub time_ms: i64,
    /// What was asked.
    pub action: AuditAction,
    /// Granted or refused.
    pub decision: Option<Decision>,
    /// Why, in words (for a refusal, the same sentence the caller got).
    pub reason: String,
    /// The agent that asked, or the operator (`operator`) for admin changes.
    pub agent_id: Option<String>,
    /// The agent's node attestor.
    pub attestor: Option<String>,
    /// The registration entry concerned.
    pub entry_id: Option<String>,
    /// The SPIFFE ID issued or asked for.
    pub spiffe_id: Option<String>,
    /// The task the SVID is for.
    pub task_id: Option<String>,
    /// The scopes granted or asked for, sorted.
    pub scopes: Vec<String>,
    /// The issued certificate's serial number (hex in the store, the hash and JSON).
    pub serial: Option<Serial>,
    /// The issued certificate's `notAfter`, Unix seconds.
    pub not_after: Option<i64>,
}

impl AuditEvent {
    /// An event of `action` with every other field empty (time 0, no decision), for the caller
    /// to fill in.
    pub fn new(action: AuditAction) -> Self {
        Self {
            time_ms: 0,
            action,
            decision: None,
            reason: String::new(),
            agent_id: None,
            attestor: None,
            entry_id: None,
            spiffe_id: None,
            task_id: None,
            scopes: Vec::new(),
            serial: None,
            not_after: None,
        }
    }
}

/// The most characters of escaped text an audit record keeps of a value that failed
/// validation (a task ID, scope or attestor name a caller chose), before the note of how much
/// was cut. It is above the longest valid value (a scope is at most 519 characters, a task ID
/// 128), so a value that passed validation is never cut.
pub const MAX_UNTRUSTED_CHARS: usize = 600;

/// A caller-chosen value as an audit record or a log line keeps it: its control, bidi and
/// zero-width characters escaped and its length bounded to [`MAX_UNTRUSTED_CHARS`], so a
/// refused value (`x\n#9999 ... allow`, `ESC [8m`) cannot forge lines or hide text in an
/// operator's terminal or flood the log. A valid value comes back unchanged.
pub fn untrusted(value: &str) -> String {
    crate::text::escape_bounded(value, MAX_UNTRUSTED_CHARS).into_owned()
}

/// An event as stored: numbered and chained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    /// Position in the log, from 1, without gaps.
    pub seq: i64,
    /// The event.
    #[serde(flatten)]
    pub event: AuditEvent,
    /// The previous record's hash (zeros for the first).
    #[serde(serialize_with = "as_hex")]
    pub prev_hash: [u8; 32],
    /// This record's hash.
    #[serde(serialize_with = "as_hex")]
    pub hash: [u8; 32],
}

fn as_hex<S: serde::Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(bytes))
}

/// The hash of the record numbered `seq` holding `event`, after `prev`.
///
/// Each field is length-prefixed in a fixed order, so no two different records encode alike.
pub(crate) fn chain_hash(prev: &[u8; 32], seq: i64, event: &AuditEvent) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"mayfly-audit-v1\0");
    ctx.update(prev);
    ctx.update(&seq.to_be_bytes());
    ctx.update(&event.time_ms.to_be_bytes());
    let put = |ctx: &mut digest::Context, field: Option<&str>| match field {
        None => ctx.update(&[0]),
        Some(text) => {
            ctx.update(&[1]);
            ctx.update(&(text.len() as u64).to_be_bytes());
            ctx.update(text.as_bytes());
        }
    };
    // The action's name, exactly the bytes the string field held before actions were an enum,
    // so records chained then still verify.
    put(&mut ctx, Some(event.action.as_str()));
    put(&mut ctx, event.decision.map(Decision::as_str));
    put(&mut ctx, Some(&event.reason));
    put(&mut ctx, event.agent_id.as_deref());
    put(&mut ctx, event.attestor.as_deref());
    put(&mut ctx, event.entry_id.as_deref());
    put(&mut ctx, event.spiffe_id.as_deref());
    put(&mut ctx, event.task_id.as_deref());
    ctx.update(&(event.scopes.len() as u64).to_be_bytes());
    for scope in &event.scopes {
        put(&mut ctx, Some(scope));
    }
    put(&mut ctx, event.serial.map(|s| s.to_hex()).as_deref());
    match event.not_after {
        None => ctx.update(&[0]),
        Some(t) => {
            ctx.update(&[1]);
            ctx.update(&t.to_be_bytes());
        }
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Chains `events` after the record `(head_seq, head_hash)`.
pub fn chain(head_seq: i64, head_hash: [u8; 32], events: &[AuditEvent]) -> Vec<AuditRecord> {
    let mut prev = head_hash;
    events
        .iter()
        .enumerate()
        .map(|(i, event)| {
            let seq = head_seq + 1 + i as i64;
            let hash = chain_hash(&prev, seq, event);
            let record = AuditRecord {
                seq,
                event: event.clone(),
                prev_hash: prev,
                hash,
            };
            prev = hash;
            record
        })
        .collect()
}

/// How the audit chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A sequence number is missing: a record was deleted.
    #[error("audit record {expected} is missing (the next one is {found}): a record was deleted")]
    Gap {
        /// The number that should have come next.
        expected: i64,
        /// The number that came.
        found: i64,
    },
    /// A record does not link to its predecessor's hash.
    #[error(
        "audit record {0} does not link to the record before it: records were removed or reordered"
    )]
    BrokenLink(i64),
    /// A record's content does not match its hash.
    #[error("audit record {0} was altered: its content does not match its hash")]
    Altered(i64),
    /// The log ends before the head the store remembers.
    #[error(
        "the audit log ends at record {last} but its head says {head}: records at the end were deleted"
    )]
    Truncated {
        /// The last record present.
        last: i64,
        /// The head's sequence number.
        head: i64,
    },
    /// The head's hash is not the last record's.
    #[error("the audit log head does not match its last record {0}: the log was rewritten")]
    HeadMismatch(i64),
}

/// Checks records one at a time, in sequence order, so a long log needs no memory.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    last_seq: i64,
    last_hash: [u8; 32],
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl ChainVerifier {
    /// Starts at the beginning of the log.
    pub fn new() -> Self {
        Self {
            last_seq: 0,
            last_hash: [0; 32],
        }
    }

    /// Checks the next record.
    ///
    /// # Errors
    /// [`ChainError::Gap`], [`ChainError::BrokenLink`] or [`ChainError::Altered`].
    pub fn push(&mut self, record: &AuditRecord) -> Result<(), ChainError> {
        if record.seq != self.last_seq + 1 {
            return Err(ChainError::Gap {
                expected: self.last_seq + 1,
                found: record.seq,
            });
        }
        if record.prev_hash != self.last_hash {
            return Err(ChainError::BrokenLink(record.seq));
        }
        if chain_hash(&record.prev_hash, record.seq, &record.event) != record.hash {
            return Err(ChainError::Altered(record.seq));
        }
        self.last_seq = record.seq;
        self.last_hash = record.hash;
        Ok(())
    }

    /// Checks that the log ended where its head says; returns how many records were checked.
    ///
    /// # Errors
    /// [`ChainError::Truncated`] or [`ChainError::HeadMismatch`].
    pub fn finish(self, head_seq: i64, head_hash: [u8; 32]) -> Result<i64, ChainError> {
        if head_seq != self.last_seq {
            return Err(ChainError::Truncated {
                last: self.last_seq,
                head: head_seq,
            });
        }
        if head_hash != self.last_hash {
            return Err(ChainError::HeadMismatch(self.last_seq));
        }
        Ok(self.last_seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: i64) -> AuditEvent {
        AuditEvent {
            time_ms: n,
            decision: Some(Decision::Allow),
            reason: "issued".into(),
            task_id: Some(format!("task-{n}")),
            scopes: vec!["a:b".into()],
            serial: Serial::from_hex(&format!("01{n:030x}")),
            not_after: Some(n + 300),
            ..AuditEvent::new(AuditAction::SvidTask)
        }
    }

    fn verify(records: &[AuditRecord], head: (i64, [u8; 32])) -> Result<i64, ChainError> {
        let mut v = ChainVerifier::new();
        for r in records {
            v.push(r)?;
        }
        v.finish(head.0, head.1)
    }

    #[test]
    fn intact_chain_verifies_and_each_tampering_is_named() {
        let events: Vec<_> = (1..=5).map(event).collect();
        let records = chain(0, [0; 32], &events);
        let head = (5, records[4].hash);
        assert_eq!(verify(&records, head), Ok(5));

        let mut edited = records.clone();
        edited[2].event.scopes = vec!["a:b".into(), "a:write".into()];
        assert_eq!(verify(&edited, head), Err(ChainError::Altered(3)));

        let mut deleted = records.clone();
        deleted.remove(2);
        assert_eq!(
            verify(&deleted, head),
            Err(ChainError::Gap {
                expected: 3,
                found: 4
            })
        );

        let truncated = &records[..4];
        assert!(matches!(
            verify(truncated, head),
            Err(ChainError::Truncated { last: 4, head: 5 })
        ));

        // Renumbering after a deletion still breaks the link.
        let mut renumbered = deleted.clone();
        renumbered[2].seq = 3;
        renumbered[3].seq = 4;
        assert_eq!(verify(&renumbered, head), Err(ChainError::BrokenLink(3)));
    }

    #[test]
    fn chaining_continues_from_a_head() {
        let first = chain(0, [0; 32], &[event(1), event(2)]);
        let second = chain(2, first[1].hash, &[event(3)]);
        let all: Vec<_> = first.into_iter().chain(second).collect();
        assert_eq!(verify(&all, (3, all[2].hash)), Ok(3));
    }

    /// Hashes of records chained when the action was a `String` field: computed from the
    /// byte layout `chain_hash` had then (length-prefixed UTF-8 of the name), independently of
    /// this code. An existing log must still verify, so these must never change.
    const STRING_ERA_HASHES: [(&str, &str); 9] = [
        (
            "svid.identity",
            "7f0c547a8d43fa24a55ec1c3afaff236cf3f550ba47b0e896f406537a506714e",
        ),
        (
            "svid.task",
            "4419e3e5e91700aeeaa6dc949409be959716bfa157661f0cc247a0101417f33a",
        ),
        (
            "agent.attest",
            "208d4c9f6670f74ffef90794f24875da8ef4634a1f668cb7225482bd1270844e",
        ),
        (
            "agent.renew",
            "14e57c95c331d1c170f27dd00cc68e389c11f66955821235c53da0e080926a3a",
        ),
        (
            "entry.create",
            "b97a6410f0530e30aa6ee5ea2202c56164cc25b238d842d1bd105c0e2023bf7c",
        ),
        (
            "entry.delete",
            "c5891ac9208c646f1b8cdb7f49a37fa735ae878a73b5d9ce4cc18ddded20ff9d",
        ),
        (
            "token.create",
            "5953085cd6e6e1ee4901254710796a425e7fb32d877ac5b5eca3351248f877ce",
        ),
        (
            "agent.ban",
            "1620c904fad71fd99d3b4588ba8db0931d5ba50a0c94f35ffe2957baa0346df9",
        ),
        (
            "agent.evict",
            "e5399a39d361656dd21b2712486fd14a4793be263d896ac6bdc684a6346a0656",
        ),
    ];

    #[test]
    fn records_chained_with_the_string_action_verify_identically() {
        // Every action of that era comes first in ALL; later ones (the ca.* steps) never had
        // a string form.
        let era: Vec<&str> = STRING_ERA_HASHES.iter().map(|(name, _)| *name).collect();
        let first: Vec<&str> = AuditAction::ALL[..era.len()]
            .iter()
            .map(|a| a.as_str())
            .collect();
        assert_eq!(first, era);
        for (name, hash) in STRING_ERA_HASHES {
            let action = AuditAction::parse(name).expect(name);
            assert_eq!(action.as_str(), name);
            let event = AuditEvent {
                time_ms: 5,
                ..AuditEvent::new(action)
            };
            assert_eq!(hex::encode(chain_hash(&[0; 32], 1, &event)), hash, "{name}");
            // The record as a string-era store holds it verifies as the first of a log.
            let record = AuditRecord {
                seq: 1,
                event,
                prev_hash: [0; 32],
                hash: hex::decode(hash).unwrap().try_into().unwrap(),
            };
            let mut v = ChainVerifier::new();
            assert_eq!(v.push(&record), Ok(()), "{name}");
        }

        // Every field set, as a task SVID issuance record of that era.
        let full = AuditEvent {
            time_ms: 1_796_096_232_000,
            decision: Some(Decision::Allow),
            reason: "issued".into(),
            agent_id: Some("spiffe://mayfly.local/mayfly/agent/join_token/ab".into()),
            attestor: Some("join_token".into()),
            entry_id: Some("e1".into()),
            spiffe_id: Some("spiffe://mayfly.local/w".into()),
            task_id: Some("t-1".into()),
            scopes: vec!["db:read".into(), "db:write".into()],
            serial: Serial::from_hex("01ab23cd45ef67890123456789abcdef"),
            not_after: Some(1_796_096_532),
            ..AuditEvent::new(AuditAction::SvidTask)
        };
        assert_eq!(
            hex::encode(chain_hash(&[7; 32], 42, &full)),
            "44b64617bec5372817d032f0cd6896dfbfd7babb444c02bd4919bdca919339c8"
        );
    }

    #[test]
    fn actions_parse_and_serialize_as_their_names() {
        for action in AuditAction::ALL {
            assert_eq!(AuditAction::parse(action.as_str()), Some(action));
            assert_eq!(
                serde_json::to_string(&action).unwrap(),
                format!("\"{}\"", action.as_str())
            );
        }
        for unknown in ["", "svid", "SVID.TASK", "svid.task ", "task.mint"] {
            assert_eq!(AuditAction::parse(unknown), None, "{unknown:?}");
        }
    }
}

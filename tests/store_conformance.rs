//! The store conformance suite: every check runs against both engines.
//!
//! SQLite runs on a real file in a temporary directory (never `sqlite::memory:`, whose pooled
//! connections would each see their own empty database). PostgreSQL runs when
//! `MAYFLY_TEST_POSTGRES_URL` is set (e.g. `postgres://postgres@127.0.0.1:5432/test`), each test
//! in a fresh schema that is dropped afterwards; otherwise those tests print a skip notice.
//!
//! Test names: `sqlite::<check>` and `postgres::<check>`, plus a few SQLite-only tests
//! (persistence across reopen, two handles on one file) at the top level.

use std::collections::BTreeSet;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use mayfly::Selector;
use mayfly::audit::{AuditAction, AuditEvent, AuditRecord, ChainError, ChainVerifier, Decision};
use mayfly::id::{Scope, SpiffeId};
use mayfly::store::postgres::PostgresStore;
use mayfly::store::sqlite::SqliteStore;
use mayfly::store::{
    self, AgentRecord, AuditFilter, CaCertRecord, CaChange, CaJournalRecord, CaState, Entry,
    EntryId, JoinTokenRecord, Store, StoreError, SyncCursor, SyncQuery,
};
use mayfly::svid::Serial;
use sqlx::{PgPool, SqlitePool};

// ---------------------------------------------------------------------------------------------
// Harness

/// Direct access to the engine's database, for tampering the store API cannot do.
#[derive(Clone)]
enum Raw {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Raw {
    /// Runs one statement; returns the rows it changed.
    async fn execute(&self, sql: &'static str) -> u64 {
        let done = match self {
            Self::Sqlite(pool) => sqlx::query(sql)
                .execute(pool)
                .await
                .map(|d| d.rows_affected()),
            Self::Postgres(pool) => sqlx::query(sql)
                .execute(pool)
                .await
                .map(|d| d.rows_affected()),
        };
        done.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

/// One engine under test.
#[derive(Clone)]
struct Db {
    store: Arc<dyn Store>,
    raw: Raw,
}

impl Db {
    fn store(&self) -> &dyn Store {
        &*self.store
    }
}

async fn on_sqlite<F, Fut>(check: F)
where
    F: FnOnce(Db) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("mayfly.db"))
        .await
        .unwrap();
    let db = Db {
        store: Arc::new(store.clone()),
        raw: Raw::Sqlite(store.pool().clone()),
    };
    check(db).await;
    store.close().await;
}

async fn on_postgres<F, Fut>(check: F)
where
    F: FnOnce(Db) -> Fut,
    Fut: Future<Output = ()>,
{
    let url = match std::env::var("MAYFLY_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            println!("skipped: MAYFLY_TEST_POSTGRES_URL is not set");
            return;
        }
    };
    let schema = format!("mayfly_test_{}", EntryId::generate());
    let admin = PgPool::connect(&url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await
        .unwrap();
    let outcome = AssertUnwindSafe(async {
        let store = PostgresStore::connect_with_schema(&url, &schema)
            .await
            .unwrap();
        let db = Db {
            store: Arc::new(store.clone()),
            raw: Raw::Postgres(store.pool().clone()),
        };
        check(db).await;
        store.close().await;
    })
    .catch_unwind()
    .await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Two tests per check: `sqlite::<check>` and `postgres::<check>`.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() {
                    super::on_sqlite(super::$check).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() {
                    super::on_postgres(super::$check).await;
                }
            )*
        }
    };
}

conformance!(
    entries_round_trip,
    entries_unique_and_revision,
    corrupt_rows_are_reported,
    join_token_single_use_and_expiry,
    join_token_concurrent_consumers_one_winner,
    agents_lifecycle,
    lookups_under_concurrency_answer_each_caller,
    agent_serial_rotation,
    ca_certs_idempotent_and_expiry,
    // The CA journal (issue 10).
    ca_journal_lifecycle_and_sequence,
    ca_journal_steps_out_of_order_change_nothing,
    ca_journal_jwt_keys_are_kept_attached_once_and_bump_the_sequence,
    audit_concurrent_appends_form_one_chain,
    audit_appends_given_up_half_way_leave_the_chain_whole,
    audit_round_trip_and_filters,
    audit_duplicate_serial_writes_nothing,
    audit_tampering_detected,
    // Operator lists, paged and filtered (issue 10).
    entry_pages_hold_every_entry_once,
    entry_filters_are_evaluated_by_the_store,
    agent_pages_hold_every_agent_once,
    // Entry sync for agents (issue 10).
    entry_changes_are_paged_by_revision_per_agent,
    deletions_leave_tombstones_until_pruned,
    entry_revisions_commit_in_order_under_concurrent_writers,
    an_unreadable_row_is_named_and_the_others_still_sync,
    // Entry updates, hint and JWT TTL (issue 11).
    an_update_replaces_what_may_change_and_syncs_again,
    an_update_that_collides_is_stale_or_finds_nothing_writes_nothing,
    // Node attestation and node groups (issue 12): see node_groups.rs.
    agents_keep_their_node_selectors,
    reattestation_replaces_a_record_inserts_a_missing_one_and_never_unbans,
    reattestation_with_other_selectors_asks_for_a_full_sync,
    reattestation_concurrent_with_a_ban_never_unbans,
    single_use_keys_are_claimed_once_until_they_expire,
    single_use_concurrent_claims_have_one_winner,
    single_use_claims_prune_expired_keys_a_bounded_number_at_a_time,
    node_entries_are_listed_by_server_and_group,
    node_entry_writes_raise_the_groups_revision,
    sync_reads_entries_of_every_parent_given,
);

#[path = "store_conformance/node_groups.rs"]
mod node_groups;
use node_groups::*;

// ---------------------------------------------------------------------------------------------
// Fixtures

const NOW: i64 = 1_750_000_000;

fn sid(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn agent_a() -> SpiffeId {
    sid("spiffe://acme.test/mayfly/agent/join_token/node-a")
}

fn agent_b() -> SpiffeId {
    sid("spiffe://acme.test/mayfly/agent/join_token/node-b")
}

fn entry(spiffe_id: &str, parent: &SpiffeId, selectors: &[&str], scopes: &[&str]) -> Entry {
    Entry {
        id: EntryId::generate(),
        spiffe_id: sid(spiffe_id),
        parent_id: parent.clone(),
        // An entry's selectors are sorted and unique (its documented invariant).
        selectors: selectors
            .iter()
            .map(|s| Selector::parse(s).unwrap())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        scopes: scopes.iter().map(|s| Scope::parse(s).unwrap()).collect(),
        ttl_secs: 300,
        dns_names: Vec::new(),
        created_at: NOW,
        hint: String::new(),
        jwt_ttl_secs: 0,
    }
}

/// The serial whose hex is `hex`.
fn sn(hex: &str) -> Serial {
    Serial::from_hex(hex).expect("a valid serial")
}

fn agent(id: &SpiffeId, serial: &str) -> AgentRecord {
    AgentRecord {
        spiffe_id: id.clone(),
        attestor: "join_token".into(),
        current_serial: sn(serial),
        next_serial: None,
        not_after: NOW + 3600,
        banned: false,
        created_at: NOW,
        node_selectors: Vec::new(),
        resync_revision: 0,
    }
}

fn token(byte: u8, node: &str, expires_at: i64) -> JoinTokenRecord {
    JoinTokenRecord {
        secret_hash: [byte; 32],
        node_id: node.into(),
        expires_at,
    }
}

fn event(n: i64, task: Option<&str>, serial: Option<Serial>) -> AuditEvent {
    AuditEvent {
        time_ms: NOW * 1000 + n,
        action: AuditAction::SvidTask,
        decision: Some(Decision::Allow),
        reason: format!("issued {n}"),
        agent_id: Some(agent_a().to_string()),
        attestor: Some("join_token".into()),
        entry_id: Some("00112233445566778899aabbccddeeff".into()),
        spiffe_id: Some("spiffe://acme.test/agents/bot/scope/a.read".into()),
        task_id: task.map(str::to_owned),
        scopes: vec!["a:read".into()],
        serial,
        not_after: Some(NOW + 300),
    }
}

/// A distinct valid 16-octet serial for each `n`.
fn serial(n: i64) -> Option<Serial> {
    Serial::from_hex(&format!("01{n:030x}"))
}

fn all() -> AuditFilter {
    AuditFilter::default()
}

/// Verifies the whole log against the head, as `mayfly audit verify` does.
async fn verify(store: &dyn Store) -> Result<i64, ChainError> {
    let (head_seq, head_hash) = store.audit_head().await.unwrap();
    let mut verifier = ChainVerifier::new();
    for record in store.list_audit(&all()).await.unwrap() {
        verifier.push(&record)?;
    }
    verifier.finish(head_seq, head_hash)
}

fn seqs(records: &[AuditRecord]) -> Vec<i64> {
    records.iter().map(|r| r.seq).collect()
}

fn is_already_exists<T: std::fmt::Debug>(result: Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::AlreadyExists(_)))
}

// ---------------------------------------------------------------------------------------------
// Entries

async fn entries_round_trip(db: Db) {
    let s = db.store();
    let mut billing = entry(
        "spiffe://acme.test/agents/billing-bot",
        &agent_a(),
        &["unix:path:/usr/bin/python3", "unix:uid:1001"],
        &["stripe:read:customers", "stripe:write:refunds"],
    );
    billing.ttl_secs = 600;
    billing.dns_names = vec!["billing.internal".into(), "a.billing.internal".into()];
    billing.created_at = NOW + 7;
    let alpha = entry(
        "spiffe://acme.test/agents/alpha",
        &agent_b(),
        &["unix:gid:10"],
        &[],
    );
    let zeta = entry(
        "spiffe://acme.test/agents/zeta",
        &agent_a(),
        &[&format!("unix:sha256:{}", "ab".repeat(32))],
        &["db:read"],
    );
    for e in [&billing, &alpha, &zeta] {
        s.create_entry(e).await.unwrap();
    }

    // Every field comes back as written.
    assert_eq!(
        s.get_entry(&billing.id).await.unwrap(),
        Some(billing.clone())
    );
    assert_eq!(s.get_entry(&alpha.id).await.unwrap(), Some(alpha.clone()));
    assert_eq!(s.get_entry(&EntryId::generate()).await.unwrap(), None);

    // Ordered by SPIFFE ID.
    assert_eq!(
        s.list_entries().await.unwrap(),
        vec![alpha.clone(), billing.clone(), zeta.clone()]
    );
    assert_eq!(
        s.list_entries_by_parent(&agent_a()).await.unwrap(),
        vec![billing.clone(), zeta.clone()]
    );
    assert_eq!(
        s.list_entries_by_parent(&agent_b()).await.unwrap(),
        vec![alpha.clone()]
    );
    let stranger = sid("spiffe://acme.test/mayfly/agent/join_token/node-z");
    assert_eq!(s.list_entries_by_parent(&stranger).await.unwrap(), vec![]);

    // Delete, then it is gone; deleting again finds nothing.
    assert!(s.delete_entry(&billing.id).await.unwrap());
    assert_eq!(s.get_entry(&billing.id).await.unwrap(), None);
    assert!(!s.delete_entry(&billing.id).await.unwrap());
    assert_eq!(
        s.list_entries().await.unwrap(),
        vec![alpha.clone(), zeta.clone()]
    );
    assert_eq!(
        s.list_entries_by_parent(&agent_a()).await.unwrap(),
        vec![zeta.clone()]
    );

    // Near-maximal sizes: a ~2 kB SPIFFE ID and ~3 kB of selectors still make a unique key.
    let long_path = format!("spiffe://acme.test/{}", "x".repeat(2000));
    let long_selectors: Vec<String> = (0..3)
        .map(|i| format!("unix:path:/{}{i}", "p".repeat(1000)))
        .collect();
    let long_selectors: Vec<&str> = long_selectors.iter().map(String::as_str).collect();
    let big = entry(&long_path, &agent_a(), &long_selectors, &["a:b"]);
    s.create_entry(&big).await.unwrap();
    assert_eq!(s.get_entry(&big.id).await.unwrap(), Some(big.clone()));
    let big_again = entry(&long_path, &agent_a(), &long_selectors, &[]);
    assert!(is_already_exists(s.create_entry(&big_again).await));
}

async fn entries_unique_and_revision(db: Db) {
    let s = db.store();
    let r0 = s.entries_revision().await.unwrap();

    let first = entry(
        "spiffe://acme.test/agents/bot",
        &agent_a(),
        &["unix:uid:1", "unix:gid:2"],
        &["a:read"],
    );
    s.create_entry(&first).await.unwrap();
    let r1 = s.entries_revision().await.unwrap();
    assert!(r1 > r0, "create bumps the revision: {r0} -> {r1}");

    // Reads leave it alone.
    s.get_entry(&first.id).await.unwrap();
    s.list_entries().await.unwrap();
    s.list_entries_by_parent(&agent_a()).await.unwrap();
    assert_eq!(s.entries_revision().await.unwrap(), r1);

    // Same SPIFFE ID, parent and selectors (in any order), new ID: refused, nothing changes.
    let mut same = entry(
        "spiffe://acme.test/agents/bot",
        &agent_a(),
        &["unix:gid:2", "unix:uid:1"],
        &["b:write"],
    );
    same.ttl_secs = 60;
    same.selectors.reverse();
    assert_ne!(same.selectors, first.selectors);
    assert!(is_already_exists(s.create_entry(&same).await));
    // Same ID, different identity: refused as well.
    let mut same_id = entry(
        "spiffe://acme.test/agents/other",
        &agent_b(),
        &["unix:uid:9"],
        &[],
    );
    same_id.id = first.id.clone();
    assert!(is_already_exists(s.create_entry(&same_id).await));
    assert_eq!(s.entries_revision().await.unwrap(), r1);
    assert_eq!(s.list_entries().await.unwrap(), vec![first.clone()]);

    // Positive controls: one difference in any of the three makes a new entry.
    let other_selectors = entry(
        "spiffe://acme.test/agents/bot",
        &agent_a(),
        &["unix:uid:1"],
        &[],
    );
    let other_parent = entry(
        "spiffe://acme.test/agents/bot",
        &agent_b(),
        &["unix:uid:1", "unix:gid:2"],
        &[],
    );
    let other_id = entry(
        "spiffe://acme.test/agents/bot2",
        &agent_a(),
        &["unix:uid:1", "unix:gid:2"],
        &[],
    );
    for e in [&other_selectors, &other_parent, &other_id] {
        s.create_entry(e).await.unwrap();
    }
    let r2 = s.entries_revision().await.unwrap();
    assert!(r2 > r1);
    assert_eq!(s.list_entries().await.unwrap().len(), 4);

    // Delete bumps it; deleting nothing does not.
    assert!(s.delete_entry(&first.id).await.unwrap());
    let r3 = s.entries_revision().await.unwrap();
    assert!(r3 > r2);
    assert!(!s.delete_entry(&first.id).await.unwrap());
    assert_eq!(s.entries_revision().await.unwrap(), r3);

    // The freed identity can be registered again; selectors given out of order are stored
    // (and read back) sorted.
    s.create_entry(&same).await.unwrap();
    assert!(s.entries_revision().await.unwrap() > r3);
    let stored = s.get_entry(&same.id).await.unwrap().unwrap();
    assert_eq!(stored.selectors, first.selectors);
    assert_eq!(stored.ttl_secs, 60);
}

async fn corrupt_rows_are_reported(db: Db) {
    let s = db.store();
    let mut e = entry(
        "spiffe://acme.test/agents/bot",
        &agent_a(),
        &["unix:uid:1"],
        &["a:read"],
    );
    e.id = EntryId::parse("0123456789abcdef0123456789abcdef").unwrap();
    s.create_entry(&e).await.unwrap();
    s.create_agent(&agent(&agent_a(), "01")).await.unwrap();
    // Positive control: intact rows read back.
    assert_eq!(s.get_entry(&e.id).await.unwrap(), Some(e.clone()));
    assert_eq!(s.list_agents().await.unwrap().len(), 1);

    let tamper: [(&'static str, &'static str); 3] = [
        (
            "UPDATE entries SET spiffe_id = 'https://acme.test/bot' \
             WHERE id = '0123456789abcdef0123456789abcdef'",
            "UPDATE entries SET spiffe_id = 'spiffe://acme.test/agents/bot' \
             WHERE id = '0123456789abcdef0123456789abcdef'",
        ),
        (
            "UPDATE entries SET selectors = '[\"unix:pid:1\"]' \
             WHERE id = '0123456789abcdef0123456789abcdef'",
            "UPDATE entries SET selectors = '[\"unix:uid:1\"]' \
             WHERE id = '0123456789abcdef0123456789abcdef'",
        ),
        (
            "UPDATE entries SET scopes = '[\"A:READ\"]' \
             WHERE id = '0123456789abcdef0123456789abcdef'",
            "UPDATE entries SET scopes = '[\"a:read\"]' \
             WHERE id = '0123456789abcdef0123456789abcdef'",
        ),
    ];
    for (break_it, fix_it) in tamper {
        assert_eq!(db.raw.execute(break_it).await, 1);
        let got = s.get_entry(&e.id).await;
        assert!(
            matches!(got, Err(StoreError::Corrupt(_))),
            "{break_it}: {got:?}"
        );
        assert!(matches!(
            s.list_entries().await,
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(db.raw.execute(fix_it).await, 1);
        assert_eq!(s.get_entry(&e.id).await.unwrap(), Some(e.clone()));
    }

    // A stored serial that is no certificate serial (negative, padded, over 20 octets). The
    // statements are made here, and the raw executor takes only static SQL: leaked, test-only.
    let sql = |text: String| -> &'static str { Box::leak(text.into_boxed_str()) };
    for bad in ["ff01".to_owned(), "0001".to_owned(), "01".repeat(21)] {
        let break_it = sql(format!("UPDATE agents SET current_serial = '{bad}'"));
        assert_eq!(db.raw.execute(break_it).await, 1);
        let got = s.get_agent(&agent_a()).await;
        assert!(matches!(got, Err(StoreError::Corrupt(_))), "{bad}: {got:?}");
    }
    // A 20-octet serial is one (the control, on the same row).
    let twenty = "7f".repeat(20);
    let fix_it = sql(format!("UPDATE agents SET current_serial = '{twenty}'"));
    assert_eq!(db.raw.execute(fix_it).await, 1);
    let agent_row = s.get_agent(&agent_a()).await.unwrap().unwrap();
    assert_eq!(agent_row.current_serial.to_hex(), twenty);

    assert_eq!(
        db.raw
            .execute("UPDATE agents SET spiffe_id = 'spiffe://ACME/bad'")
            .await,
        1
    );
    assert!(matches!(s.list_agents().await, Err(StoreError::Corrupt(_))));
}

// ---------------------------------------------------------------------------------------------
// Join tokens

async fn join_token_single_use_and_expiry(db: Db) {
    let s = db.store();
    let live = token(1, "node-1", NOW + 600);
    s.create_join_token(&live).await.unwrap();
    assert!(is_already_exists(s.create_join_token(&live).await));

    assert_eq!(
        s.consume_join_token(&[1; 32], NOW).await.unwrap(),
        Some(live)
    );
    assert_eq!(s.consume_join_token(&[1; 32], NOW).await.unwrap(), None);
    assert_eq!(s.consume_join_token(&[9; 32], NOW).await.unwrap(), None);

    // Expired (and exactly at expiry): refused, and gone, so the hash can be stored anew.
    s.create_join_token(&token(2, "node-2", NOW - 1))
        .await
        .unwrap();
    s.create_join_token(&token(3, "node-3", NOW)).await.unwrap();
    assert_eq!(s.consume_join_token(&[2; 32], NOW).await.unwrap(), None);
    assert_eq!(s.consume_join_token(&[3; 32], NOW).await.unwrap(), None);
    let renewed = token(2, "node-2", NOW + 60);
    s.create_join_token(&renewed).await.unwrap();
    // Positive control: one second before expiry still works.
    s.create_join_token(&token(4, "node-4", NOW + 1))
        .await
        .unwrap();
    assert_eq!(
        s.consume_join_token(&[4; 32], NOW).await.unwrap(),
        Some(token(4, "node-4", NOW + 1))
    );
    assert_eq!(
        s.consume_join_token(&[2; 32], NOW).await.unwrap(),
        Some(renewed)
    );
}

async fn join_token_concurrent_consumers_one_winner(db: Db) {
    const CONSUMERS: usize = 50;
    for round in 0..3u8 {
        let record = token(100 + round, &format!("node-{round}"), NOW + 600);
        db.store.create_join_token(&record).await.unwrap();
        let start = Arc::new(tokio::sync::Barrier::new(CONSUMERS));
        let tasks: Vec<_> = (0..CONSUMERS)
            .map(|_| {
                let store = db.store.clone();
                let start = start.clone();
                let hash = record.secret_hash;
                tokio::spawn(async move {
                    start.wait().await;
                    store.consume_join_token(&hash, NOW).await.unwrap()
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tasks {
            if let Some(won) = task.await.unwrap() {
                winners.push(won);
            }
        }
        assert_eq!(winners, vec![record.clone()], "round {round}");
        assert_eq!(
            db.store()
                .consume_join_token(&record.secret_hash, NOW)
                .await
                .unwrap(),
            None
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Agents

async fn agents_lifecycle(db: Db) {
    let s = db.store();
    let a = agent(&agent_a(), "2a01");
    let mut b = agent(&agent_b(), "3b01");
    b.next_serial = Some(sn("3b02"));
    b.attestor = "x509pop".into();
    s.create_agent(&b).await.unwrap();
    s.create_agent(&a).await.unwrap();

    assert_eq!(s.get_agent(&agent_a()).await.unwrap(), Some(a.clone()));
    assert_eq!(s.get_agent(&agent_b()).await.unwrap(), Some(b.clone()));
    let stranger = sid("spiffe://acme.test/mayfly/agent/join_token/node-z");
    assert_eq!(s.get_agent(&stranger).await.unwrap(), None);
    assert_eq!(s.list_agents().await.unwrap(), vec![a.clone(), b.clone()]);

    // A second record for the same agent is refused and the first is untouched.
    let mut dup = agent(&agent_a(), "7fff");
    dup.banned = true;
    assert!(is_already_exists(s.create_agent(&dup).await));
    assert_eq!(s.get_agent(&agent_a()).await.unwrap(), Some(a.clone()));

    // Ban.
    assert!(s.ban_agent(&agent_a()).await.unwrap());
    assert!(s.get_agent(&agent_a()).await.unwrap().unwrap().banned);
    assert!(!s.get_agent(&agent_b()).await.unwrap().unwrap().banned);
    assert!(!s.ban_agent(&stranger).await.unwrap());

    // Delete (evict): gone, and it may attest again.
    assert!(s.delete_agent(&agent_a()).await.unwrap());
    assert_eq!(s.get_agent(&agent_a()).await.unwrap(), None);
    assert!(!s.delete_agent(&agent_a()).await.unwrap());
    assert_eq!(s.list_agents().await.unwrap(), vec![b.clone()]);
    s.create_agent(&a).await.unwrap();
    assert_eq!(s.get_agent(&agent_a()).await.unwrap(), Some(a));
}

/// Many lookups at once (as under issuance load, where SQLite batches them): every caller
/// gets the record it asked for, or `None` for a key that has none, and a change committed
/// before the lookups were asked is what they all see.
async fn lookups_under_concurrency_answer_each_caller(db: Db) {
    let mut agents = Vec::new();
    let mut entries = Vec::new();
    for i in 0..40 {
        let id = sid(&format!(
            "spiffe://acme.test/mayfly/agent/join_token/node-{i}"
        ));
        let a = agent(&id, &format!("1{i:03x}"));
        db.store().create_agent(&a).await.unwrap();
        let e = entry(
            &format!("spiffe://acme.test/w/{i}"),
            &id,
            &["unix:uid:1"],
            &["a:read"],
        );
        db.store().create_entry(&e).await.unwrap();
        agents.push(a);
        entries.push(e);
    }
    let round = |expect_banned: bool| {
        let lookups: Vec<_> = (0..200usize)
            .map(|n| {
                let store = db.store.clone();
                let a = agents[n % agents.len()].clone();
                let e = entries[(n * 7) % entries.len()].clone();
                tokio::spawn(async move {
                    let missing_agent = sid(&format!("spiffe://acme.test/mayfly/agent/x/{n}"));
                    let missing_entry = EntryId::generate();
                    let (got_a, got_e, none_a, none_e) = tokio::join!(
                        store.get_agent(&a.spiffe_id),
                        store.get_entry(&e.id),
                        store.get_agent(&missing_agent),
                        store.get_entry(&missing_entry),
                    );
                    let got_a = got_a.unwrap().expect("an existing agent is found");
                    assert_eq!(got_a.spiffe_id, a.spiffe_id);
                    assert_eq!(got_a.current_serial, a.current_serial);
                    assert_eq!(got_a.banned, expect_banned && n % 2 == 0);
                    assert_eq!(got_e.unwrap(), Some(e));
                    assert_eq!(none_a.unwrap(), None);
                    assert_eq!(none_e.unwrap(), None);
                })
            })
            .collect();
        async move {
            for lookup in lookups {
                lookup.await.unwrap();
            }
        }
    };
    round(false).await;
    // Ban every other agent (the lookups for even n ask for agents 0, 2, 4, ...): all see it.
    for a in agents.iter().step_by(2) {
        assert!(db.store().ban_agent(&a.spiffe_id).await.unwrap());
    }
    round(true).await;
}

async fn agent_serial_rotation(db: Db) {
    let s = db.store();
    let id = agent_a();
    s.create_agent(&agent(&id, "2a01")).await.unwrap();
    let id_ref = &id;
    let get = move || async move { s.get_agent(id_ref).await.unwrap().unwrap() };

    // Only the current (or next) serial may renew.
    assert!(
        !s.set_agent_next_serial(&id, &sn("7fff"), &sn("2a02"), NOW + 7200)
            .await
            .unwrap()
    );
    assert_eq!(get().await.next_serial, None);
    assert!(
        s.set_agent_next_serial(&id, &sn("2a01"), &sn("2a02"), NOW + 7200)
            .await
            .unwrap()
    );
    let renewed = get().await;
    assert_eq!(renewed.current_serial, sn("2a01"));
    assert_eq!(renewed.next_serial, Some(sn("2a02")));
    assert_eq!(renewed.not_after, NOW + 7200);

    // Promotion: an unknown serial is not promoted; the next one is.
    assert!(!s.promote_agent_serial(&id, &sn("7fff")).await.unwrap());
    assert!(s.promote_agent_serial(&id, &sn("2a02")).await.unwrap());
    let promoted = get().await;
    assert_eq!(promoted.current_serial, sn("2a02"));
    assert_eq!(promoted.next_serial, None);
    // Promoting the current serial again is a harmless success.
    assert!(s.promote_agent_serial(&id, &sn("2a02")).await.unwrap());
    assert_eq!(get().await, promoted);

    // The old serial is superseded: it can neither renew nor be promoted.
    assert!(
        !s.set_agent_next_serial(&id, &sn("2a01"), &sn("2a09"), NOW + 9999)
            .await
            .unwrap()
    );
    assert!(!s.promote_agent_serial(&id, &sn("2a01")).await.unwrap());
    assert_eq!(get().await, promoted);

    // Renewing while a next serial is pending: current or next may present.
    assert!(
        s.set_agent_next_serial(&id, &sn("2a02"), &sn("2a03"), NOW + 8000)
            .await
            .unwrap()
    );
    assert!(
        s.set_agent_next_serial(&id, &sn("2a03"), &sn("2a04"), NOW + 9000)
            .await
            .unwrap()
    );
    let pending = get().await;
    assert_eq!(pending.current_serial, sn("2a02"));
    assert_eq!(pending.next_serial, Some(sn("2a04")));
    assert!(!s.promote_agent_serial(&id, &sn("2a03")).await.unwrap());

    // Unknown agents.
    let stranger = sid("spiffe://acme.test/mayfly/agent/join_token/node-z");
    assert!(
        !s.set_agent_next_serial(&stranger, &sn("2a02"), &sn("7f00"), NOW)
            .await
            .unwrap()
    );
    assert!(
        !s.promote_agent_serial(&stranger, &sn("2a02"))
            .await
            .unwrap()
    );

    // A banned agent cannot renew, even with its current serial.
    assert!(s.ban_agent(&id).await.unwrap());
    assert!(
        !s.set_agent_next_serial(&id, &sn("2a02"), &sn("2a05"), NOW)
            .await
            .unwrap()
    );
    assert!(
        !s.set_agent_next_serial(&id, &sn("2a04"), &sn("2a05"), NOW)
            .await
            .unwrap()
    );
    let banned = get().await;
    assert!(banned.banned);
    assert_eq!(banned.next_serial, Some(sn("2a04")));
}

// ---------------------------------------------------------------------------------------------
// CA certificates

async fn ca_certs_idempotent_and_expiry(db: Db) {
    let s = db.store();
    let cert = |fp: &str, der: &[u8], not_after| CaCertRecord {
        fingerprint: fp.into(),
        der: der.to_vec(),
        not_after,
    };
    let live = cert("bb", b"\x30\x82live", NOW + 100);
    let expired = cert("cc", b"\x30\x82old", NOW - 1);
    let last_second = cert("aa", b"\x30\x82edge", NOW);
    for c in [&live, &expired, &last_second] {
        s.put_ca_cert(c).await.unwrap();
    }
    // Idempotent: a repeated put keeps one record.
    s.put_ca_cert(&live).await.unwrap();
    s.put_ca_cert(&live).await.unwrap();

    assert_eq!(
        s.list_ca_certs(NOW).await.unwrap(),
        vec![last_second.clone(), live.clone()]
    );
    // Positive control: earlier, the expired one is still listed.
    assert_eq!(
        s.list_ca_certs(NOW - 1).await.unwrap(),
        vec![last_second.clone(), live.clone(), expired.clone()]
    );
    assert_eq!(s.list_ca_certs(NOW + 101).await.unwrap(), vec![]);
}

// ---------------------------------------------------------------------------------------------
// The CA journal

/// A journal row of `instance` in `state`, its ID `id` (also its bundle fingerprint).
fn journal_row(id: &str, instance: &str, state: CaState, not_after: i64) -> CaJournalRecord {
    CaJournalRecord {
        ca_id: id.into(),
        instance_id: instance.into(),
        state,
        tainted: false,
        revoked: false,
        upstream: false,
        not_before: NOW - 10,
        not_after,
        der: format!("der of {id}").into_bytes(),
        signed_until: not_after,
        jwt_public: None,
    }
}

/// Inserts `row`, publishing its own certificate.
async fn insert_ca(s: &dyn Store, row: &CaJournalRecord) -> Result<bool, StoreError> {
    s.apply_ca_change(&CaChange::Insert {
        record: row.clone(),
        roots: vec![CaCertRecord {
            fingerprint: row.ca_id.clone(),
            der: row.der.clone(),
            not_after: row.not_after,
        }],
    })
    .await
}

fn fingerprints(certs: &[CaCertRecord]) -> Vec<&str> {
    certs.iter().map(|c| c.fingerprint.as_str()).collect()
}

/// prepare, activate (the previous active becomes old, bounded), taint, revoke (leaves the
/// bundle), drop; the sequence grows exactly when the published certificates change.
async fn ca_journal_lifecycle_and_sequence(db: Db) {
    let s = db.store();
    let seq0 = s.bundle_sequence().await.unwrap();
    let a = journal_row("aa", "one", CaState::Prepared, NOW + 1000);
    assert!(insert_ca(s, &a).await.unwrap());
    let seq1 = s.bundle_sequence().await.unwrap();
    assert!(seq1 > seq0, "publishing a CA bumps the sequence");
    let activate = |id: &str, bound| CaChange::Activate {
        instance_id: "one".into(),
        ca_id: id.into(),
        old_signed_until: bound,
    };
    assert!(s.apply_ca_change(&activate("aa", NOW)).await.unwrap());
    // Activation changes no published certificate.
    assert_eq!(s.bundle_sequence().await.unwrap(), seq1);

    let b = journal_row("bb", "one", CaState::Prepared, NOW + 2000);
    assert!(insert_ca(s, &b).await.unwrap());
    // Another server's CAs live beside these.
    let other = journal_row("cc", "two", CaState::Prepared, NOW + 3000);
    assert!(insert_ca(s, &other).await.unwrap());
    assert!(s.apply_ca_change(&activate("bb", NOW + 50)).await.unwrap());
    let journal = s.list_ca_journal().await.unwrap();
    let get = |id: &str| journal.iter().find(|r| r.ca_id == id).unwrap().clone();
    assert_eq!(get("aa").state, CaState::Old);
    assert_eq!(
        get("aa").signed_until,
        NOW + 50,
        "the bound of what it signed"
    );
    assert_eq!(get("bb").state, CaState::Active);
    assert_eq!(
        get("cc").state,
        CaState::Prepared,
        "another server's CA untouched"
    );
    assert_eq!(get("cc").der, other.der);
    assert_eq!(
        fingerprints(&s.list_ca_certs(NOW).await.unwrap()),
        ["aa", "bb", "cc"]
    );

    let seq2 = s.bundle_sequence().await.unwrap();
    assert!(
        s.apply_ca_change(&CaChange::Taint { ca_id: "aa".into() })
            .await
            .unwrap()
    );
    assert!(s.list_ca_journal().await.unwrap()[0].tainted);
    assert_eq!(s.bundle_sequence().await.unwrap(), seq2);
    assert!(
        s.apply_ca_change(&CaChange::Revoke { ca_id: "aa".into() })
            .await
            .unwrap()
    );
    let seq3 = s.bundle_sequence().await.unwrap();
    assert!(seq3 > seq2, "revoking bumps the sequence");
    assert_eq!(
        fingerprints(&s.list_ca_certs(NOW).await.unwrap()),
        ["bb", "cc"]
    );
    assert!(s.list_ca_journal().await.unwrap()[0].revoked);

    assert!(
        s.apply_ca_change(&CaChange::Drop { ca_id: "aa".into() })
            .await
            .unwrap()
    );
    assert!(s.bundle_sequence().await.unwrap() > seq3);
    let ids: Vec<_> = s
        .list_ca_journal()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.ca_id)
        .collect();
    assert_eq!(ids, ["bb", "cc"]);
}

/// A step whose CA is not in the state it needs writes nothing and says so; one server never
/// holds two prepared or two active CAs.
async fn ca_journal_steps_out_of_order_change_nothing(db: Db) {
    let s = db.store();
    let a = journal_row("aa", "one", CaState::Prepared, NOW + 1000);
    insert_ca(s, &a).await.unwrap();
    // A second prepared CA of the same server is refused; another server's is not.
    let twin = journal_row("ab", "one", CaState::Prepared, NOW + 1000);
    assert!(is_already_exists(insert_ca(s, &twin).await));
    assert!(
        insert_ca(s, &journal_row("zz", "two", CaState::Prepared, NOW))
            .await
            .unwrap()
    );
    // The same ID twice is refused.
    assert!(is_already_exists(insert_ca(s, &a).await));

    let before = s.list_ca_journal().await.unwrap();
    let seq = s.bundle_sequence().await.unwrap();
    let refused = [
        // Only a prepared CA of this server activates.
        CaChange::Activate {
            instance_id: "two".into(),
            ca_id: "aa".into(),
            old_signed_until: NOW,
        },
        CaChange::Activate {
            instance_id: "one".into(),
            ca_id: "nope".into(),
            old_signed_until: NOW,
        },
        // Only a tainted, non-active CA is revoked.
        CaChange::Revoke { ca_id: "aa".into() },
        CaChange::Taint {
            ca_id: "nope".into(),
        },
    ];
    for change in &refused {
        assert!(!s.apply_ca_change(change).await.unwrap(), "{change:?}");
    }
    assert_eq!(
        s.list_ca_journal().await.unwrap(),
        before,
        "nothing written"
    );
    assert_eq!(s.bundle_sequence().await.unwrap(), seq);

    // Positive control on the same fixture: the prepared CA activates, and then an active CA
    // is neither revoked (even tainted) nor dropped.
    let activate = CaChange::Activate {
        instance_id: "one".into(),
        ca_id: "aa".into(),
        old_signed_until: NOW,
    };
    assert!(s.apply_ca_change(&activate).await.unwrap());
    assert!(
        s.apply_ca_change(&CaChange::Taint { ca_id: "aa".into() })
            .await
            .unwrap()
    );
    assert!(
        !s.apply_ca_change(&CaChange::Taint { ca_id: "aa".into() })
            .await
            .unwrap(),
        "tainted once"
    );
    assert!(
        !s.apply_ca_change(&CaChange::Revoke { ca_id: "aa".into() })
            .await
            .unwrap()
    );
    assert!(
        !s.apply_ca_change(&CaChange::Drop { ca_id: "aa".into() })
            .await
            .unwrap()
    );
    assert_eq!(
        fingerprints(&s.list_ca_certs(NOW).await.unwrap()),
        ["aa", "zz"]
    );
}

/// A CA's JWT key is stored with its row; a row without one (journaled before JWT-SVIDs) gets
/// one attached exactly once; every key change grows the bundle sequence, even when the CA's
/// root was published already (several CAs under one upstream root).
async fn ca_journal_jwt_keys_are_kept_attached_once_and_bump_the_sequence(db: Db) {
    let s = db.store();
    let mut with_key = journal_row("aa", "one", CaState::Active, NOW + 100);
    with_key.jwt_public = Some(vec![4; 65]);
    insert_ca(s, &with_key).await.unwrap();
    let without = journal_row("bb", "two", CaState::Active, NOW + 100);
    insert_ca(s, &without).await.unwrap();
    let rows = s.list_ca_journal().await.unwrap();
    assert_eq!(rows[0].jwt_public.as_deref(), Some(&[4u8; 65][..]));
    assert_eq!(rows[1].jwt_public, None);

    let before = s.bundle_sequence().await.unwrap();
    let attach = |key: u8| CaChange::AttachJwtKey {
        ca_id: "bb".into(),
        jwt_public: vec![key; 65],
    };
    assert!(s.apply_ca_change(&attach(5)).await.unwrap());
    assert_eq!(s.bundle_sequence().await.unwrap(), before + 1);
    // Once attached, a key is never replaced: the second attach changes nothing.
    assert!(!s.apply_ca_change(&attach(6)).await.unwrap());
    assert_eq!(s.bundle_sequence().await.unwrap(), before + 1);
    let rows = s.list_ca_journal().await.unwrap();
    assert_eq!(rows[1].jwt_public.as_deref(), Some(&[5u8; 65][..]));

    // A CA under a root already published still changes the bundle through its JWT key.
    let mut sibling = journal_row("cc", "three", CaState::Active, NOW + 100);
    sibling.jwt_public = Some(vec![7; 65]);
    s.apply_ca_change(&CaChange::Insert {
        record: sibling,
        roots: vec![CaCertRecord {
            fingerprint: "aa".into(),
            der: with_key.der.clone(),
            not_after: with_key.not_after,
        }],
    })
    .await
    .unwrap();
    assert_eq!(s.bundle_sequence().await.unwrap(), before + 2);
}

// ---------------------------------------------------------------------------------------------
// Audit

/// A caller that gives up on an append (its future dropped at whatever point it had reached:
/// waiting for the write lock, inside the transaction, at the commit) leaves either all of its
/// records or none, and the next appends chain on as if nothing happened.
async fn audit_appends_given_up_half_way_leave_the_chain_whole(db: Db) {
    let s = db.store();
    // Positive control: an append that is left alone lands.
    assert_eq!(
        s.append_audit(&[event(1, None, serial(1))])
            .await
            .unwrap()
            .len(),
        1
    );
    let mut n = 10;
    let (mut cut, mut done) = (0, 0);
    for round in 0..60u64 {
        let batch: Vec<AuditEvent> = (0..(round % 4 + 1))
            .map(|_| {
                n += 1;
                event(n, None, serial(n))
            })
            .collect();
        // Given up after the append has been polled once, then after more and more turns of
        // the scheduler (tokio's timers, at 1 ms, are too coarse for a fast append), and at
        // last after milliseconds: cut anywhere along the way, and sometimes not at all.
        let turns = round * round;
        let then = std::time::Duration::from_millis(round.saturating_sub(40));
        tokio::select! {
            biased;
            appended = s.append_audit(&batch) => {
                appended.unwrap();
                done += 1;
            }
            () = async {
                for _ in 0..turns {
                    tokio::task::yield_now().await;
                }
                if !then.is_zero() {
                    tokio::time::sleep(then).await;
                }
            } => cut += 1,
        }
    }
    assert!(
        cut > 0 && done > 0,
        "{cut} cut, {done} done: the budgets must do both"
    );
    n += 1;
    let last = s.append_audit(&[event(n, None, serial(n))]).await.unwrap();
    let records = s.list_audit(&all()).await.unwrap();
    assert_eq!(records.last().map(|r| r.seq), Some(last[0].seq));
    assert_eq!(verify(s).await, Ok(records.len() as i64));
}

async fn audit_concurrent_appends_form_one_chain(db: Db) {
    const TASKS: i64 = 8;
    const APPENDS: i64 = 50;
    let start = Arc::new(tokio::sync::Barrier::new(TASKS as usize));
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = db.store.clone();
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                let mut mine = Vec::new();
                for i in 0..APPENDS {
                    let batch: Vec<AuditEvent> = (0..(t + i) % 5 + 1)
                        .map(|k| {
                            let n = (t * 1000 + i) * 10 + k;
                            event(n, Some(&format!("task-{t}")), serial(n))
                        })
                        .collect();
                    let records = store.append_audit(&batch).await.unwrap();
                    assert_eq!(records.len(), batch.len());
                    // One batch is one contiguous run, in order.
                    for (k, (record, event)) in records.iter().zip(&batch).enumerate() {
                        assert_eq!(record.seq, records[0].seq + k as i64);
                        assert_eq!(&record.event, event);
                    }
                    mine.extend(records);
                }
                mine
            })
        })
        .collect();
    let mut returned = Vec::new();
    for task in tasks {
        returned.extend(task.await.unwrap());
    }
    returned.sort_by_key(|r| r.seq);
    let n = returned.len() as i64;
    assert_eq!(seqs(&returned), (1..=n).collect::<Vec<_>>());

    let listed = db.store().list_audit(&all()).await.unwrap();
    assert_eq!(listed, returned, "what was returned is what was stored");
    assert_eq!(verify(db.store()).await, Ok(n));
    assert_eq!(
        db.store().audit_head().await.unwrap(),
        (n, returned.last().unwrap().hash)
    );
    // Each task's own records are in its order.
    let task3 = db
        .store()
        .list_audit(&AuditFilter {
            task_id: Some("task-3".into()),
            ..all()
        })
        .await
        .unwrap();
    let times: Vec<i64> = task3.iter().map(|r| r.event.time_ms).collect();
    let mut sorted = times.clone();
    sorted.sort_unstable();
    assert_eq!(times, sorted);
    assert!(!task3.is_empty());
}

async fn audit_round_trip_and_filters(db: Db) {
    let s = db.store();
    assert_eq!(s.audit_head().await.unwrap(), (0, [0; 32]));
    assert_eq!(s.list_audit(&all()).await.unwrap(), vec![]);
    assert_eq!(s.append_audit(&[]).await.unwrap(), vec![]);
    assert_eq!(verify(s).await, Ok(0));

    // A sparse refusal and a full grant round-trip exactly (unsorted scopes stay as given).
    let refusal = AuditEvent {
        time_ms: 1,
        decision: Some(Decision::Deny),
        reason: "scope 'x:write' is not in the entry".into(),
        scopes: vec!["x:write".into(), "a:read".into(), "NOT A SCOPE".into()],
        ..AuditEvent::new(AuditAction::SvidTask)
    };
    let operator = AuditEvent {
        time_ms: 2,
        decision: None,
        reason: String::new(),
        agent_id: Some("operator".into()),
        ..AuditEvent::new(AuditAction::EntryCreate)
    };
    let mut events = vec![refusal, operator];
    for n in 3..=10 {
        let task = match n % 3 {
            0 => Some("task-a"),
            1 => Some("task-b"),
            _ => None,
        };
        events.push(event(n, task, serial(n)));
    }
    let written = s.append_audit(&events[..4]).await.unwrap();
    let written: Vec<AuditRecord> = written
        .into_iter()
        .chain(s.append_audit(&events[4..]).await.unwrap())
        .collect();
    assert_eq!(seqs(&written), (1..=10).collect::<Vec<_>>());
    assert_eq!(written[0].prev_hash, [0; 32]);
    assert_eq!(written[4].prev_hash, written[3].hash);
    assert_eq!(s.list_audit(&all()).await.unwrap(), written);
    assert_eq!(s.audit_head().await.unwrap(), (10, written[9].hash));

    let list = move |after_seq, task_id: Option<&str>, limit| {
        let filter = AuditFilter {
            after_seq,
            task_id: task_id.map(str::to_owned),
            limit,
        };
        async move { seqs(&s.list_audit(&filter).await.unwrap()) }
    };
    assert_eq!(list(0, None, 0).await, (1..=10).collect::<Vec<_>>());
    assert_eq!(list(6, None, 0).await, vec![7, 8, 9, 10]);
    assert_eq!(list(10, None, 0).await, Vec::<i64>::new());
    assert_eq!(list(0, None, 3).await, vec![1, 2, 3]);
    assert_eq!(list(8, None, 3).await, vec![9, 10]);
    assert_eq!(list(0, Some("task-a"), 0).await, vec![3, 6, 9]);
    assert_eq!(list(0, Some("task-b"), 0).await, vec![4, 7, 10]);
    assert_eq!(list(3, Some("task-a"), 1).await, vec![6]);
    assert_eq!(list(0, Some("task-none"), 0).await, Vec::<i64>::new());
}

async fn audit_duplicate_serial_writes_nothing(db: Db) {
    let s = db.store();
    let first = s
        .append_audit(&[event(1, None, serial(1)), event(2, None, serial(2))])
        .await
        .unwrap();
    let head = s.audit_head().await.unwrap();
    assert_eq!(head, (2, first[1].hash));

    // A batch repeating an issued serial: nothing of it is written.
    let clash = s
        .append_audit(&[event(3, Some("t"), serial(3)), event(4, None, serial(1))])
        .await;
    assert!(
        matches!(clash, Err(StoreError::AlreadyExists(_))),
        "{clash:?}"
    );
    // A batch repeating a serial within itself: the same.
    let inner = s
        .append_audit(&[event(5, None, serial(5)), event(6, None, serial(5))])
        .await;
    assert!(
        matches!(inner, Err(StoreError::AlreadyExists(_))),
        "{inner:?}"
    );
    assert_eq!(s.audit_head().await.unwrap(), head);
    assert_eq!(s.list_audit(&all()).await.unwrap(), first);

    // Positive controls: the refused events' fresh serials are still usable, records without
    // a serial never clash, and the chain continues without a gap.
    let next = s
        .append_audit(&[
            event(3, Some("t"), serial(3)),
            event(7, None, None),
            event(8, None, None),
        ])
        .await
        .unwrap();
    assert_eq!(seqs(&next), vec![3, 4, 5]);
    assert_eq!(next[0].prev_hash, first[1].hash);
    assert_eq!(verify(s).await, Ok(5));
}

async fn audit_tampering_detected(db: Db) {
    let s = db.store();
    let events: Vec<AuditEvent> = (1..=10).map(|n| event(n, None, serial(n))).collect();
    s.append_audit(&events[..5]).await.unwrap();
    s.append_audit(&events[5..]).await.unwrap();
    assert_eq!(verify(s).await, Ok(10));

    // An edited reason.
    assert_eq!(
        db.raw
            .execute("UPDATE audit SET reason = 'nothing to see' WHERE seq = 4")
            .await,
        1
    );
    assert_eq!(verify(s).await, Err(ChainError::Altered(4)));
    assert_eq!(
        db.raw
            .execute("UPDATE audit SET reason = 'issued 4' WHERE seq = 4")
            .await,
        1
    );
    assert_eq!(verify(s).await, Ok(10));

    // An action renamed to another one this version records: the hash names the edit.
    assert_eq!(
        db.raw
            .execute("UPDATE audit SET action = 'agent.ban' WHERE seq = 6")
            .await,
        1
    );
    assert_eq!(verify(s).await, Err(ChainError::Altered(6)));
    // An action no version records: reading the log says which record is damaged.
    assert_eq!(
        db.raw
            .execute("UPDATE audit SET action = 'svid.taskx' WHERE seq = 6")
            .await,
        1
    );
    assert!(matches!(
        s.list_audit(&all()).await,
        Err(StoreError::Corrupt(m)) if m.contains("audit record 6")
    ));
    assert_eq!(
        db.raw
            .execute("UPDATE audit SET action = 'svid.task' WHERE seq = 6")
            .await,
        1
    );
    assert_eq!(verify(s).await, Ok(10));

    // The newest record deleted: the head still remembers it.
    assert_eq!(db.raw.execute("DELETE FROM audit WHERE seq = 10").await, 1);
    assert_eq!(
        verify(s).await,
        Err(ChainError::Truncated { last: 9, head: 10 })
    );

    // A record in the middle deleted.
    assert_eq!(db.raw.execute("DELETE FROM audit WHERE seq = 5").await, 1);
    assert_eq!(
        verify(s).await,
        Err(ChainError::Gap {
            expected: 5,
            found: 6
        })
    );
}

// ---------------------------------------------------------------------------------------------
// SQLite only

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_persists_across_reopen_with_private_files() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data").join("server");
    let path = data_dir.join("mayfly.db");

    let e = entry(
        "spiffe://acme.test/agents/bot",
        &agent_a(),
        &["unix:uid:1001"],
        &["a:read", "b:write"],
    );
    let a = agent(&agent_a(), "2a01");
    let ca = CaCertRecord {
        fingerprint: "ab".repeat(32),
        der: vec![0x30, 0x82, 1, 2, 3],
        not_after: NOW + 3600,
    };
    let events: Vec<AuditEvent> = (1..=3).map(|n| event(n, Some("t"), serial(n))).collect();
    let (revision, written) = {
        let store = SqliteStore::open(&path).await.unwrap();
        store.create_entry(&e).await.unwrap();
        store.create_agent(&a).await.unwrap();
        store.put_ca_cert(&ca).await.unwrap();
        store
            .create_join_token(&token(7, "node-7", NOW + 60))
            .await
            .unwrap();
        let written = store.append_audit(&events).await.unwrap();
        let revision = store.entries_revision().await.unwrap();
        store.close().await;
        (revision, written)
    };
    // Directory 0700, database 0600.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data_dir), 0o700);
    assert_eq!(mode(&dir.path().join("data")), 0o700);
    assert_eq!(mode(&path), 0o600);

    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(store.get_entry(&e.id).await.unwrap(), Some(e.clone()));
    assert_eq!(store.list_entries().await.unwrap(), vec![e]);
    assert_eq!(store.entries_revision().await.unwrap(), revision);
    assert_eq!(store.list_agents().await.unwrap(), vec![a]);
    assert_eq!(store.list_ca_certs(NOW).await.unwrap(), vec![ca]);
    assert_eq!(store.list_audit(&all()).await.unwrap(), written);
    assert_eq!(verify(&store).await, Ok(3));
    assert_eq!(
        store.consume_join_token(&[7; 32], NOW).await.unwrap(),
        Some(token(7, "node-7", NOW + 60))
    );
    // The chain continues where it stopped.
    let more = store
        .append_audit(&[event(4, None, serial(4))])
        .await
        .unwrap();
    assert_eq!(more[0].seq, 4);
    assert_eq!(more[0].prev_hash, written[2].hash);
    assert_eq!(verify(&store).await, Ok(4));
    store.close().await;
}

/// Two handles on one file behave like two processes: writes still serialise.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_two_handles_on_one_file_stay_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mayfly.db");
    let first: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await.unwrap());
    let second: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await.unwrap());
    let handles = [first.clone(), second.clone()];

    first
        .create_join_token(&token(1, "node-1", NOW + 60))
        .await
        .unwrap();
    let consumers: Vec<_> = (0..50)
        .map(|i| {
            let store = handles[i % 2].clone();
            tokio::spawn(async move { store.consume_join_token(&[1; 32], NOW).await.unwrap() })
        })
        .collect();
    let mut winners = 0;
    for c in consumers {
        winners += usize::from(c.await.unwrap().is_some());
    }
    assert_eq!(winners, 1);

    let appenders: Vec<_> = (0..8i64)
        .map(|t| {
            let store = handles[(t % 2) as usize].clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    let n = t * 100 + i;
                    store
                        .append_audit(&[event(n, None, serial(n))])
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for a in appenders {
        a.await.unwrap();
    }
    assert_eq!(verify(&*first).await, Ok(200));
    assert_eq!(verify(&*second).await, Ok(200));
    let serials: BTreeSet<_> = first
        .list_audit(&all())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.event.serial)
        .collect();
    assert_eq!(serials.len(), 200);
}

#[tokio::test]
async fn open_dispatches_on_the_url_scheme() {
    assert!(matches!(
        store::open("mysql://x").await,
        Err(StoreError::UnsupportedUrl(_))
    ));
    assert!(matches!(
        store::open("x.db").await,
        Err(StoreError::UnsupportedUrl(_))
    ));
    assert!(matches!(
        PostgresStore::connect_with_schema("postgres://u@127.0.0.1/db", "x; DROP TABLE y").await,
        Err(StoreError::UnsupportedUrl(_))
    ));
    // Positive control: a sqlite URL opens a working store.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("m.db").display());
    let opened = store::open(&url).await.unwrap();
    // Revision 0 means "none" to an agent, so a new store starts past it (migration 0003).
    assert_eq!(opened.entries_revision().await.unwrap(), 1);
    assert_eq!(opened.audit_head().await.unwrap(), (0, [0; 32]));
}

// ---------------------------------------------------------------------------------------------
// Operator lists, paged and filtered (issue 10)

/// Reads every page of `query` with pages of `limit`, following the last key of each.
async fn all_pages(store: &dyn Store, mut query: store::EntryQuery, limit: u32) -> Vec<Entry> {
    query.limit = limit;
    let mut out: Vec<Entry> = Vec::new();
    loop {
        let page = store.list_entries_page(&query).await.unwrap();
        assert!(
            page.len() <= limit as usize,
            "a page holds at most its limit"
        );
        let Some(last) = page.last() else { break };
        query.after = Some(store::EntryCursor {
            spiffe_id: last.spiffe_id.clone(),
            id: last.id.clone(),
        });
        let full = page.len() == limit as usize;
        out.extend(page);
        if !full {
            break;
        }
    }
    out
}

fn ids(entries: &[Entry]) -> Vec<String> {
    entries.iter().map(|e| e.id.to_string()).collect()
}

async fn entry_pages_hold_every_entry_once(db: Db) {
    let s = db.store();
    // Seven entries share one SPIFFE ID (different selectors), so pages of 3 end inside that
    // run: the cursor must break ties by entry ID.
    let mut made = Vec::new();
    for n in 0..7 {
        let e = entry(
            "spiffe://acme.test/same",
            &agent_a(),
            &[&format!("unix:uid:{n}")],
            &[],
        );
        s.create_entry(&e).await.unwrap();
        made.push(e);
    }
    for name in ["a", "m", "z"] {
        let e = entry(
            &format!("spiffe://acme.test/{name}"),
            &agent_b(),
            &["unix:uid:1"],
            &[],
        );
        s.create_entry(&e).await.unwrap();
        made.push(e);
    }
    let expected = s.list_entries().await.unwrap();
    assert_eq!(expected.len(), 10);
    for limit in [1, 2, 3, 4, 10, 11, 1000] {
        let paged = all_pages(s, store::EntryQuery::default(), limit).await;
        assert_eq!(ids(&paged), ids(&expected), "pages of {limit}");
    }
    let unique: BTreeSet<String> = ids(&all_pages(s, store::EntryQuery::default(), 3).await)
        .into_iter()
        .collect();
    assert_eq!(unique.len(), made.len(), "every entry exactly once");

    // An entry deleted between two pages neither repeats nor hides another.
    let mut query = store::EntryQuery {
        limit: 4,
        ..store::EntryQuery::default()
    };
    let first = s.list_entries_page(&query).await.unwrap();
    let last = first.last().unwrap();
    query.after = Some(store::EntryCursor {
        spiffe_id: last.spiffe_id.clone(),
        id: last.id.clone(),
    });
    assert!(s.delete_entry(&last.id).await.unwrap());
    query.limit = 100;
    let rest = s.list_entries_page(&query).await.unwrap();
    assert_eq!(first.len() + rest.len(), 10);
    assert_eq!(ids(&rest), ids(&expected)[4..].to_vec());
}

async fn entry_filters_are_evaluated_by_the_store(db: Db) {
    let s = db.store();
    let web = entry(
        "spiffe://acme.test/agents/web",
        &agent_a(),
        &["unix:uid:1000", "unix:gid:50"],
        &[],
    );
    let web_b = entry(
        "spiffe://acme.test/agents/web",
        &agent_b(),
        &["unix:uid:1000"],
        &[],
    );
    let billing = entry(
        "spiffe://acme.test/agents/billing-bot",
        &agent_a(),
        &["unix:uid:1001", "unix:gid:50"],
        &[],
    );
    let db_entry = entry("spiffe://acme.test/db", &agent_a(), &["unix:uid:5432"], &[]);
    let other_td = entry(
        "spiffe://acme.tester/agents/web",
        &agent_a(),
        &["unix:uid:1000"],
        &[],
    );
    for e in [&web, &web_b, &billing, &db_entry, &other_td] {
        s.create_entry(e).await.unwrap();
    }
    let select = |f: &dyn Fn(&mut store::EntryQuery)| {
        let mut q = store::EntryQuery::default();
        f(&mut q);
        q
    };
    let sel = |t: &str| Selector::parse(t).unwrap();
    let prefix = |t: &str| Some(store::SpiffeIdPrefix::parse(t).unwrap());
    let sorted = |v: Vec<&Entry>| {
        let mut v: Vec<Entry> = v.into_iter().cloned().collect();
        v.sort_by(|a, b| (&a.spiffe_id, &a.id).cmp(&(&b.spiffe_id, &b.id)));
        ids(&v)
    };
    let cases: Vec<(store::EntryQuery, Vec<String>)> = vec![
        // No filter: everything (the positive control of each filter below).
        (
            select(&|_| {}),
            sorted(vec![&web, &web_b, &billing, &db_entry, &other_td]),
        ),
        // Parent.
        (
            select(&|q| q.parent_id = Some(agent_b())),
            sorted(vec![&web_b]),
        ),
        (
            select(&|q| q.parent_id = Some(sid("spiffe://acme.test/nobody"))),
            vec![],
        ),
        // Prefix: text, not path segments; a longer trust domain is not inside a shorter one
        // ending in '/'.
        (
            select(&|q| q.spiffe_id_prefix = prefix("spiffe://acme.test/agents/")),
            sorted(vec![&web, &web_b, &billing]),
        ),
        (
            select(&|q| q.spiffe_id_prefix = prefix("spiffe://acme.test/agents/bil")),
            sorted(vec![&billing]),
        ),
        (
            select(&|q| q.spiffe_id_prefix = prefix("spiffe://acme.test/")),
            sorted(vec![&web, &web_b, &billing, &db_entry]),
        ),
        (
            select(&|q| q.spiffe_id_prefix = prefix("spiffe://acme.test/nothing")),
            vec![],
        ),
        // Selectors: entries having all of them.
        (
            select(&|q| q.selectors = vec![sel("unix:gid:50")]),
            sorted(vec![&web, &billing]),
        ),
        (
            select(&|q| q.selectors = vec![sel("unix:uid:1000"), sel("unix:gid:50")]),
            sorted(vec![&web]),
        ),
        (
            select(&|q| q.selectors = vec![sel("unix:uid:1001"), sel("unix:uid:1000")]),
            vec![],
        ),
        // A selector that is a prefix or substring of a stored one does not match it.
        (select(&|q| q.selectors = vec![sel("unix:uid:100")]), vec![]),
        // All three together.
        (
            select(&|q| {
                q.parent_id = Some(agent_a());
                q.spiffe_id_prefix = prefix("spiffe://acme.test/agents/");
                q.selectors = vec![sel("unix:uid:1000")];
            }),
            sorted(vec![&web]),
        ),
    ];
    for (query, want) in cases {
        for limit in [1, 2, 100] {
            let got = all_pages(s, query.clone(), limit).await;
            assert_eq!(ids(&got), want, "{query:?}, pages of {limit}");
        }
    }
}

async fn agent_pages_hold_every_agent_once(db: Db) {
    let s = db.store();
    let mut made = Vec::new();
    for n in 0..9 {
        let id = sid(&format!(
            "spiffe://acme.test/mayfly/agent/join_token/node-{n}"
        ));
        s.create_agent(&agent(&id, &format!("01{n:030x}")))
            .await
            .unwrap();
        made.push(id);
    }
    let expected = s.list_agents().await.unwrap();
    for limit in [1, 2, 4, 9, 10] {
        let mut after: Option<SpiffeId> = None;
        let mut got = Vec::new();
        loop {
            let page = s.list_agents_page(after.as_ref(), limit).await.unwrap();
            assert!(page.len() <= limit as usize);
            let full = page.len() == limit as usize;
            after = page.last().map(|a| a.spiffe_id.clone());
            got.extend(page);
            if !full {
                break;
            }
        }
        assert_eq!(got, expected, "pages of {limit}");
    }
    assert_eq!(expected.len(), made.len());
}

// ---------------------------------------------------------------------------------------------
// Entry sync for agents (issue 10)

fn sync_query(parent: &SpiffeId, upto: i64, after: (i64, &str), limit: u32) -> SyncQuery {
    SyncQuery {
        parents: vec![parent.clone()],
        upto,
        after: SyncCursor {
            revision: after.0,
            id: after.1.to_owned(),
        },
        limit,
    }
}

/// The IDs and revisions of a changes page, every row readable.
async fn changes(s: &dyn Store, q: SyncQuery) -> Vec<(String, i64)> {
    s.entry_changes_page(&q)
        .await
        .unwrap()
        .into_iter()
        .map(|row| {
            let entry = row.entry.expect("a readable row");
            assert_eq!(entry.id.as_str(), row.cursor.id);
            (row.cursor.id, row.cursor.revision)
        })
        .collect()
}

async fn entry_changes_are_paged_by_revision_per_agent(db: Db) {
    let s = db.store();
    let r0 = s.entry_revisions().await.unwrap().current;
    let a1 = entry("spiffe://acme.test/w/a1", &agent_a(), &["unix:uid:1"], &[]);
    let b1 = entry("spiffe://acme.test/w/b1", &agent_b(), &["unix:uid:1"], &[]);
    let a2 = entry("spiffe://acme.test/w/a2", &agent_a(), &["unix:uid:2"], &[]);
    for e in [&a1, &b1, &a2] {
        s.create_entry(e).await.unwrap();
    }
    let now = s.entry_revisions().await.unwrap();
    assert_eq!(now.current, r0 + 3, "one revision per entry written");
    assert_eq!(now.horizon, 0);
    let (ida1, ida2) = (a1.id.to_string(), a2.id.to_string());
    // Everything of agent A, in revision order; nothing of B.
    assert_eq!(
        changes(s, sync_query(&agent_a(), now.current, (0, ""), 10)).await,
        vec![(ida1.clone(), r0 + 1), (ida2.clone(), r0 + 3)]
    );
    assert_eq!(
        changes(s, sync_query(&agent_b(), now.current, (0, ""), 10)).await,
        vec![(b1.id.to_string(), r0 + 2)]
    );
    // Pages of one row, each after the last one's cursor.
    assert_eq!(
        changes(s, sync_query(&agent_a(), now.current, (0, ""), 1)).await,
        vec![(ida1.clone(), r0 + 1)]
    );
    assert_eq!(
        changes(s, sync_query(&agent_a(), now.current, (r0 + 1, &ida1), 1)).await,
        vec![(ida2.clone(), r0 + 3)]
    );
    // Only what changed after a known revision (the cursor `(known + 1, "")` stands before
    // every row of the next revision), and only up to the pass's revision.
    assert_eq!(
        changes(s, sync_query(&agent_a(), now.current, (r0 + 2, ""), 10)).await,
        vec![(ida2, r0 + 3)]
    );
    assert_eq!(
        changes(s, sync_query(&agent_a(), r0 + 2, (0, ""), 10)).await,
        vec![(ida1, r0 + 1)]
    );
    assert!(
        changes(
            s,
            sync_query(&agent_a(), now.current, (now.current + 1, ""), 10)
        )
        .await
        .is_empty()
    );
}

async fn deletions_leave_tombstones_until_pruned(db: Db) {
    let s = db.store();
    let a1 = entry("spiffe://acme.test/w/a1", &agent_a(), &["unix:uid:1"], &[]);
    let b1 = entry("spiffe://acme.test/w/b1", &agent_b(), &["unix:uid:1"], &[]);
    s.create_entry(&a1).await.unwrap();
    s.create_entry(&b1).await.unwrap();
    let before = s.entry_revisions().await.unwrap().current;
    // Deleting nothing changes no revision.
    assert!(!s.delete_entry(&EntryId::generate()).await.unwrap());
    assert_eq!(s.entry_revisions().await.unwrap().current, before);
    assert!(s.delete_entry(&a1.id).await.unwrap());
    let after = s.entry_revisions().await.unwrap().current;
    assert_eq!(after, before + 1);
    let deletions = |parent: SpiffeId| async move {
        s.entry_deletions_page(&sync_query(&parent, after, (before + 1, ""), 10))
            .await
            .unwrap()
            .into_iter()
            .map(|d| (d.cursor.id, d.cursor.revision))
            .collect::<Vec<_>>()
    };
    assert_eq!(deletions(agent_a()).await, vec![(a1.id.to_string(), after)]);
    assert!(deletions(agent_b()).await.is_empty(), "B lost nothing");
    // The deleted entry is no change any more; B's entry still is.
    assert!(
        changes(s, sync_query(&agent_a(), after, (0, ""), 10))
            .await
            .is_empty()
    );
    assert_eq!(
        changes(s, sync_query(&agent_b(), after, (0, ""), 10))
            .await
            .len(),
        1
    );
    // Positive control: a prune horizon before the deletion keeps it.
    let long_ago = unix_now() - 3600;
    assert_eq!(s.prune_tombstones(long_ago).await.unwrap(), 0);
    assert_eq!(s.entry_revisions().await.unwrap().horizon, 0);
    assert_eq!(deletions(agent_a()).await.len(), 1);
    // Pruned: forgotten, and the horizon says which agents must sync in full.
    assert_eq!(s.prune_tombstones(unix_now() + 10).await.unwrap(), 1);
    let revisions = s.entry_revisions().await.unwrap();
    assert_eq!(revisions.horizon, after);
    assert_eq!(revisions.current, after);
    assert!(deletions(agent_a()).await.is_empty());
    // The horizon never goes back.
    assert_eq!(s.prune_tombstones(long_ago).await.unwrap(), 0);
    assert_eq!(s.entry_revisions().await.unwrap().horizon, after);
}

async fn entry_revisions_commit_in_order_under_concurrent_writers(db: Db) {
    let s = db.store.clone();
    let r0 = s.entry_revisions().await.unwrap().current;
    const WRITERS: usize = 8;
    const EACH: usize = 12;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A reader that, at every revision it sees, finds every entry up to it: no revision may
    // commit after a later one was visible.
    let reader = {
        let (s, done) = (s.clone(), done.clone());
        tokio::spawn(async move {
            let mut checks = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let seen = s.entry_revisions().await.unwrap().current;
                let found = s
                    .entry_changes_page(&sync_query(&agent_a(), seen, (r0 + 1, ""), 1000))
                    .await
                    .unwrap()
                    .len();
                assert_eq!(
                    i64::try_from(found).unwrap(),
                    seen - r0,
                    "a revision up to {seen} is missing"
                );
                checks += 1;
            }
            checks
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    let e = entry(
                        &format!("spiffe://acme.test/w/{w}-{i}"),
                        &agent_a(),
                        &["unix:uid:1"],
                        &[],
                    );
                    s.create_entry(&e).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(reader.await.unwrap() > 0, "the reader ran");
    let total = WRITERS * EACH;
    let now = s.entry_revisions().await.unwrap().current;
    assert_eq!(now, r0 + i64::try_from(total).unwrap());
    let revisions: BTreeSet<i64> = changes(&*s, sync_query(&agent_a(), now, (r0 + 1, ""), 1000))
        .await
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    assert_eq!(
        revisions,
        (r0 + 1..=now).collect(),
        "one revision each, no gaps"
    );
}

async fn an_unreadable_row_is_named_and_the_others_still_sync(db: Db) {
    let s = db.store();
    let mut broken = entry(
        "spiffe://acme.test/w/broken",
        &agent_a(),
        &["unix:uid:1"],
        &[],
    );
    broken.id = EntryId::parse("0123456789abcdef0123456789abcdef").unwrap();
    let fine = entry(
        "spiffe://acme.test/w/fine",
        &agent_a(),
        &["unix:uid:2"],
        &[],
    );
    s.create_entry(&broken).await.unwrap();
    s.create_entry(&fine).await.unwrap();
    let upto = s.entry_revisions().await.unwrap().current;
    // Positive control: both read.
    assert_eq!(
        changes(s, sync_query(&agent_a(), upto, (0, ""), 10))
            .await
            .len(),
        2
    );
    db.raw
        .execute(
            "UPDATE entries SET selectors = '[\"unix:pid:1\"]' \
             WHERE id = '0123456789abcdef0123456789abcdef'",
        )
        .await;
    let rows = s
        .entry_changes_page(&sync_query(&agent_a(), upto, (0, ""), 10))
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].cursor.id, broken.id.to_string());
    assert!(matches!(rows[0].entry, Err(StoreError::Corrupt(_))));
    assert_eq!(rows[1].entry.as_ref().unwrap(), &fine);
}

fn unix_now() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    i64::try_from(since.as_secs()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Entry updates (issue 11)

async fn an_update_replaces_what_may_change_and_syncs_again(db: Db) {
    let s = db.store();
    let mut bot = entry(
        "spiffe://acme.test/w/bot",
        &agent_a(),
        &["unix:uid:1"],
        &["db:read"],
    );
    bot.hint = "primary".into();
    bot.jwt_ttl_secs = 120;
    let other = entry(
        "spiffe://acme.test/w/other",
        &agent_a(),
        &["unix:uid:2"],
        &[],
    );
    s.create_entry(&bot).await.unwrap();
    s.create_entry(&other).await.unwrap();
    // Positive control: hint and JWT TTL are stored as created.
    assert_eq!(s.get_entry(&bot.id).await.unwrap().as_ref(), Some(&bot));
    let before = s.entry_revisions().await.unwrap().current;

    let mut changed = bot.clone();
    changed.selectors = vec![Selector::parse("unix:uid:3").unwrap()];
    changed.scopes = ["db:write"]
        .iter()
        .map(|x| Scope::parse(x).unwrap())
        .collect();
    changed.ttl_secs = 900;
    changed.jwt_ttl_secs = 0;
    changed.dns_names = vec!["bot.internal".into()];
    changed.hint = "renamed".into();
    // The creation time is the entry's, whatever the caller's copy says.
    changed.created_at = NOW + 99;
    assert!(s.update_entry(&bot, &changed).await.unwrap());
    let stored = s.get_entry(&bot.id).await.unwrap().unwrap();
    assert_eq!(stored.created_at, bot.created_at);
    changed.created_at = bot.created_at;
    assert_eq!(stored, changed);

    // One new revision, and the entry is sent again as a change after the known revision;
    // the untouched entry is not.
    let after = s.entry_revisions().await.unwrap().current;
    assert_eq!(after, before + 1);
    assert_eq!(
        changes(s, sync_query(&agent_a(), after, (before + 1, ""), 10)).await,
        vec![(bot.id.to_string(), after)]
    );
    let listed = s.list_entries().await.unwrap();
    assert_eq!(listed.len(), 2);

    // The new selectors are the uniqueness key now: the old ones are free again.
    let reuse = entry("spiffe://acme.test/w/bot", &agent_a(), &["unix:uid:1"], &[]);
    s.create_entry(&reuse).await.unwrap();
    let clash = entry("spiffe://acme.test/w/bot", &agent_a(), &["unix:uid:3"], &[]);
    assert!(is_already_exists(s.create_entry(&clash).await));
}

async fn an_update_that_collides_is_stale_or_finds_nothing_writes_nothing(db: Db) {
    let s = db.store();
    let one = entry("spiffe://acme.test/w/bot", &agent_a(), &["unix:uid:1"], &[]);
    let two = entry("spiffe://acme.test/w/bot", &agent_a(), &["unix:uid:2"], &[]);
    s.create_entry(&one).await.unwrap();
    s.create_entry(&two).await.unwrap();
    let before = s.entry_revisions().await.unwrap().current;

    // Giving `two` the selectors of `one` would make two identical entries: refused whole.
    let mut collide = two.clone();
    collide.selectors = one.selectors.clone();
    collide.hint = "half-written?".into();
    assert!(is_already_exists(s.update_entry(&two, &collide).await));
    assert_eq!(s.get_entry(&two.id).await.unwrap().as_ref(), Some(&two));
    assert_eq!(s.entry_revisions().await.unwrap().current, before);

    // An unknown ID, or a copy whose SPIFFE ID or parent is not the stored one: nothing.
    let mut unknown = two.clone();
    unknown.id = EntryId::generate();
    assert!(!s.update_entry(&unknown, &unknown).await.unwrap());
    let mut moved = two.clone();
    moved.parent_id = agent_b();
    assert!(!s.update_entry(&two, &moved).await.unwrap());
    let mut renamed = two.clone();
    renamed.spiffe_id = sid("spiffe://acme.test/w/elsewhere");
    assert!(!s.update_entry(&two, &renamed).await.unwrap());
    assert_eq!(s.get_entry(&two.id).await.unwrap().as_ref(), Some(&two));
    assert_eq!(s.entry_revisions().await.unwrap().current, before);

    // Positive control on the same fixture: a change that collides with nothing is written.
    let mut fine = two.clone();
    fine.selectors = vec![Selector::parse("unix:uid:4").unwrap()];
    assert!(s.update_entry(&two, &fine).await.unwrap());
    assert_eq!(s.get_entry(&two.id).await.unwrap().as_ref(), Some(&fine));
    assert_eq!(s.entry_revisions().await.unwrap().current, before + 1);

    // Compare-and-swap: an update computed from the entry as it was before that change
    // (another operator's, read earlier) writes nothing, so it cannot undo the change.
    for stale in [two.clone(), {
        let mut hinted = fine.clone();
        hinted.hint = "not what is stored".into();
        hinted
    }] {
        let mut late = stale.clone();
        late.ttl_secs = 1200;
        assert!(!s.update_entry(&stale, &late).await.unwrap());
    }
    assert_eq!(s.get_entry(&two.id).await.unwrap().as_ref(), Some(&fine));
    assert_eq!(s.entry_revisions().await.unwrap().current, before + 1);
    // Re-read and re-applied, it is written.
    let mut late = fine.clone();
    late.ttl_secs = 1200;
    assert!(s.update_entry(&fine, &late).await.unwrap());
    assert_eq!(s.get_entry(&two.id).await.unwrap().unwrap().ttl_secs, 1200);
}

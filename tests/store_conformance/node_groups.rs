//! Conformance checks for node attestation and node groups (issue 12): agents' node
//! selectors, re-attestation, single-use evidence, node entries and the sync of several
//! parents. Each runs on both engines (see the `conformance!` list).

use super::*;

fn node_selectors(texts: &[&str]) -> Vec<Selector> {
    texts
        .iter()
        .map(|s| Selector::parse(s).unwrap())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn server() -> SpiffeId {
    sid("spiffe://acme.test/mayfly/server")
}

fn x509_agent() -> SpiffeId {
    sid("spiffe://acme.test/mayfly/agent/x509pop/0a1b2c")
}

/// An x509pop agent with serial `serial` and `selectors`.
fn node_agent(serial: &str, selectors: &[&str]) -> AgentRecord {
    let mut a = agent(&x509_agent(), serial);
    a.attestor = "x509pop".into();
    a.node_selectors = node_selectors(selectors);
    a
}

const CN_WEB1: &str = "x509pop:subject:cn:web-1";
const CA_FP: &str = "x509pop:ca:fingerprint:00aa";

pub(crate) async fn agents_keep_their_node_selectors(db: Db) {
    let s = db.store();
    // Given unsorted and repeated, stored sorted and unique.
    let mut a = node_agent("11", &[]);
    a.node_selectors = vec![
        Selector::parse(CN_WEB1).unwrap(),
        Selector::parse(CA_FP).unwrap(),
        Selector::parse(CN_WEB1).unwrap(),
    ];
    s.create_agent(&a).await.unwrap();
    let read = s.get_agent(&x509_agent()).await.unwrap().unwrap();
    assert_eq!(read.node_selectors, node_selectors(&[CA_FP, CN_WEB1]));
    assert_eq!(read.resync_revision, 0);
    assert_eq!(s.list_agents().await.unwrap()[0].node_selectors.len(), 2);
    let page = s.list_agents_page(None, 10).await.unwrap();
    assert_eq!(page[0].node_selectors, read.node_selectors);
    // A join-token agent has none.
    s.create_agent(&agent(&agent_a(), "12")).await.unwrap();
    let plain = s.get_agent(&agent_a()).await.unwrap().unwrap();
    assert!(plain.node_selectors.is_empty());

    // A hand-edited row with a selector that is not one is reported, not trusted.
    db.raw
        .execute("UPDATE agents SET node_selectors = '[\"nope\"]' WHERE attestor = 'x509pop'")
        .await;
    assert!(matches!(
        s.get_agent(&x509_agent()).await,
        Err(StoreError::Corrupt(_))
    ));
}

pub(crate) async fn reattestation_replaces_a_record_inserts_a_missing_one_and_never_unbans(db: Db) {
    let s = db.store();
    // Missing: inserted as given.
    let first = node_agent("21", &[CN_WEB1]);
    assert!(s.reattest_agent(&first).await.unwrap());
    let stored = s.get_agent(&x509_agent()).await.unwrap().unwrap();
    assert_eq!(
        (stored.current_serial, stored.next_serial, stored.not_after),
        (sn("21"), None, NOW + 3600)
    );
    assert_eq!(stored.node_selectors, first.node_selectors);
    assert!(!stored.banned);

    // Existing, mid-renewal: serial, not-after, attestor and selectors replaced, the next
    // serial dropped, the creation time kept.
    assert!(
        s.set_agent_next_serial(&x509_agent(), &sn("21"), &sn("22"), NOW + 7200)
            .await
            .unwrap()
    );
    let mut again = node_agent("23", &[CN_WEB1, CA_FP]);
    again.created_at = NOW + 500;
    again.not_after = NOW + 9000;
    again.attestor = "sshpop".into();
    again.next_serial = Some(sn("59"));
    assert!(s.reattest_agent(&again).await.unwrap());
    let stored = s.get_agent(&x509_agent()).await.unwrap().unwrap();
    assert_eq!(stored.current_serial, sn("23"));
    assert_eq!(stored.next_serial, None);
    assert_eq!(stored.not_after, NOW + 9000);
    assert_eq!(stored.attestor, "sshpop");
    assert_eq!(stored.node_selectors, node_selectors(&[CN_WEB1, CA_FP]));
    assert_eq!(
        stored.created_at, NOW,
        "the first attestation's time is kept"
    );
    // The old serials no longer count.
    assert!(
        !s.set_agent_next_serial(&x509_agent(), &sn("22"), &sn("24"), NOW)
            .await
            .unwrap()
    );

    // Banned: refused, nothing written.
    assert!(s.ban_agent(&x509_agent()).await.unwrap());
    let before = s.get_agent(&x509_agent()).await.unwrap().unwrap();
    let revision = s.entry_revisions().await.unwrap();
    assert!(!s.reattest_agent(&node_agent("25", &[])).await.unwrap());
    assert_eq!(s.get_agent(&x509_agent()).await.unwrap().unwrap(), before);
    assert_eq!(s.entry_revisions().await.unwrap(), revision);

    // Another agent is untouched by all this.
    s.create_agent(&agent(&agent_a(), "31")).await.unwrap();
    assert!(s.reattest_agent(&node_agent("26", &[])).await.is_ok());
    assert_eq!(
        s.get_agent(&agent_a()).await.unwrap().unwrap(),
        agent(&agent_a(), "31")
    );
}

pub(crate) async fn reattestation_with_other_selectors_asks_for_a_full_sync(db: Db) {
    let s = db.store();
    // A new record: its first sync after it is full, from a revision of its own.
    let r0 = s.entry_revisions().await.unwrap().current;
    assert!(
        s.reattest_agent(&node_agent("41", &[CN_WEB1]))
            .await
            .unwrap()
    );
    let r1 = s.entry_revisions().await.unwrap().current;
    let resync = s
        .get_agent(&x509_agent())
        .await
        .unwrap()
        .unwrap()
        .resync_revision;
    assert!(r1 > r0 && resync == r1, "{r0} {r1} {resync}");

    // Same selectors: nothing for sync to do, no revision taken, the resync revision kept.
    assert!(
        s.reattest_agent(&node_agent("42", &[CN_WEB1]))
            .await
            .unwrap()
    );
    assert_eq!(s.entry_revisions().await.unwrap().current, r1);
    let stored = s.get_agent(&x509_agent()).await.unwrap().unwrap();
    assert_eq!(
        (stored.resync_revision, stored.current_serial),
        (r1, sn("42"))
    );

    // Other selectors: a new resync revision.
    assert!(s.reattest_agent(&node_agent("43", &[CA_FP])).await.unwrap());
    let r2 = s.entry_revisions().await.unwrap().current;
    assert!(r2 > r1);
    let stored = s.get_agent(&x509_agent()).await.unwrap().unwrap();
    assert_eq!(stored.resync_revision, r2);

    // Evicted, then back with the same selectors: the store cannot know what it held, so
    // its sync is full again.
    assert!(s.delete_agent(&x509_agent()).await.unwrap());
    assert!(s.reattest_agent(&node_agent("44", &[CA_FP])).await.unwrap());
    let r3 = s.entry_revisions().await.unwrap().current;
    assert!(r3 > r2);
    assert_eq!(
        s.get_agent(&x509_agent())
            .await
            .unwrap()
            .unwrap()
            .resync_revision,
        r3
    );
    // create_agent ignores what it is given.
    let mut fresh = agent(&agent_b(), "45");
    fresh.resync_revision = 77_777;
    s.create_agent(&fresh).await.unwrap();
    assert_eq!(
        s.get_agent(&agent_b())
            .await
            .unwrap()
            .unwrap()
            .resync_revision,
        0
    );
}

pub(crate) async fn reattestation_concurrent_with_a_ban_never_unbans(db: Db) {
    let s = db.store.clone();
    s.create_agent(&node_agent("51", &[CN_WEB1])).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..16u8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let serial = format!("6{i:x}");
            // Alternate selectors so both the kept and the new-revision paths race the ban.
            let selectors: &[&str] = if i % 2 == 0 { &[CN_WEB1] } else { &[CA_FP] };
            s.reattest_agent(&node_agent(&serial, selectors)).await
        }));
    }
    assert!(s.ban_agent(&x509_agent()).await.unwrap());
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert!(s.get_agent(&x509_agent()).await.unwrap().unwrap().banned);
    assert!(!s.reattest_agent(&node_agent("70", &[])).await.unwrap());
}

pub(crate) async fn single_use_keys_are_claimed_once_until_they_expire(db: Db) {
    let s = db.store();
    let (k1, k2) = ([1u8; 32], [2u8; 32]);
    assert!(s.claim_single_use(&k1, NOW + 60, NOW).await.unwrap());
    // The same key again, before it expires: a replay.
    assert!(!s.claim_single_use(&k1, NOW + 60, NOW + 1).await.unwrap());
    assert!(!s.claim_single_use(&k1, NOW + 600, NOW + 59).await.unwrap());
    // Another key is its own.
    assert!(s.claim_single_use(&k2, NOW + 60, NOW + 1).await.unwrap());
    // Once expired (`until <= now`), the key may be claimed again, until its new time.
    assert!(s.claim_single_use(&k1, NOW + 120, NOW + 60).await.unwrap());
    assert!(!s.claim_single_use(&k1, NOW + 120, NOW + 119).await.unwrap());
}

pub(crate) async fn single_use_concurrent_claims_have_one_winner(db: Db) {
    let s = db.store.clone();
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.claim_single_use(&[7u8; 32], NOW + 60, NOW).await
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap().unwrap());
    }
    assert_eq!(winners, 1);
}

pub(crate) async fn single_use_claims_prune_expired_keys_a_bounded_number_at_a_time(db: Db) {
    let s = db.store();
    for i in 0..40u8 {
        assert!(s.claim_single_use(&[i; 32], NOW + 10, NOW).await.unwrap());
    }
    let count = |raw: Raw| async move {
        match raw {
            Raw::Sqlite(pool) => {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM attest_single_use")
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
            Raw::Postgres(pool) => {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM attest_single_use")
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        }
    };
    assert_eq!(count(db.raw.clone()).await, 40);
    // Not expired yet: a claim prunes nothing.
    assert!(
        s.claim_single_use(&[200; 32], NOW + 100, NOW + 9)
            .await
            .unwrap()
    );
    assert_eq!(count(db.raw.clone()).await, 41);
    // Expired: each claim forgets a bounded batch (16), and enough claims forget them all.
    assert!(
        s.claim_single_use(&[201; 32], NOW + 100, NOW + 10)
            .await
            .unwrap()
    );
    assert_eq!(count(db.raw.clone()).await, 41 + 1 - 16);
    for k in 202..206u8 {
        assert!(
            s.claim_single_use(&[k; 32], NOW + 100, NOW + 10)
                .await
                .unwrap()
        );
    }
    assert_eq!(
        count(db.raw.clone()).await,
        6,
        "only the unexpired keys are left"
    );
    assert!(
        !s.claim_single_use(&[200; 32], NOW + 100, NOW + 10)
            .await
            .unwrap()
    );
}

pub(crate) async fn node_entries_are_listed_by_server_and_group(db: Db) {
    let s = db.store();
    let web = entry("spiffe://acme.test/nodes/web", &server(), &[CN_WEB1], &[]);
    let web_ca = entry("spiffe://acme.test/nodes/web", &server(), &[CA_FP], &[]);
    let db_group = entry("spiffe://acme.test/nodes/db", &server(), &[CA_FP], &[]);
    let workload = entry("spiffe://acme.test/w/api", &agent_a(), &["unix:uid:1"], &[]);
    for e in [&web, &web_ca, &db_group, &workload] {
        s.create_entry(e).await.unwrap();
    }
    let ids = |list: Vec<Entry>| list.into_iter().map(|e| e.id).collect::<BTreeSet<_>>();
    let all = s.list_node_entries(&server(), None).await.unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].spiffe_id, db_group.spiffe_id, "ordered by SPIFFE ID");
    assert_eq!(
        ids(all),
        [&web.id, &web_ca.id, &db_group.id]
            .into_iter()
            .cloned()
            .collect()
    );
    let group = s
        .list_node_entries(&server(), Some(&web.spiffe_id))
        .await
        .unwrap();
    assert_eq!(
        ids(group),
        [&web.id, &web_ca.id].into_iter().cloned().collect()
    );
    // No such group; and another server's ID has none.
    let none = sid("spiffe://acme.test/nodes/none");
    assert!(
        s.list_node_entries(&server(), Some(&none))
            .await
            .unwrap()
            .is_empty()
    );
    let other = sid("spiffe://other.test/mayfly/server");
    assert!(s.list_node_entries(&other, None).await.unwrap().is_empty());
    // A workload entry is never a node entry, even looked up by its own ID.
    assert!(
        s.list_node_entries(&server(), Some(&workload.spiffe_id))
            .await
            .unwrap()
            .is_empty()
    );
}

pub(crate) async fn node_entry_writes_raise_the_groups_revision(db: Db) {
    let s = db.store();
    let groups = || async { s.entry_revisions().await.unwrap() };
    let start = groups().await;
    // A workload entry's writes leave it alone.
    let workload = entry("spiffe://acme.test/w/api", &agent_a(), &["unix:uid:1"], &[]);
    s.create_entry(&workload).await.unwrap();
    let mut changed = workload.clone();
    changed.selectors = node_selectors(&["unix:uid:2"]);
    assert!(s.update_entry(&workload, &changed).await.unwrap());
    assert!(s.delete_entry(&workload.id).await.unwrap());
    let after_workload = groups().await;
    assert_eq!(after_workload.groups, start.groups);
    assert!(after_workload.current > start.current);

    // Each write of a node entry takes it to the write's revision.
    let web = entry("spiffe://acme.test/nodes/web", &server(), &[CN_WEB1], &[]);
    s.create_entry(&web).await.unwrap();
    let created = groups().await;
    assert_eq!(created.groups, created.current);
    let mut wider = web.clone();
    wider.selectors = node_selectors(&[CN_WEB1, CA_FP]);
    assert!(s.update_entry(&web, &wider).await.unwrap());
    let updated = groups().await;
    assert_eq!(updated.groups, updated.current);
    assert!(updated.groups > created.groups);
    assert!(s.delete_entry(&web.id).await.unwrap());
    let deleted = groups().await;
    assert_eq!(deleted.groups, deleted.current);
    assert!(deleted.groups > updated.groups);
    // A write that writes nothing (a stale update, a missing delete) leaves it.
    assert!(!s.update_entry(&web, &wider).await.unwrap());
    assert!(!s.delete_entry(&web.id).await.unwrap());
    assert_eq!(groups().await, deleted);
}

pub(crate) async fn sync_reads_entries_of_every_parent_given(db: Db) {
    let s = db.store();
    let group = sid("spiffe://acme.test/nodes/web");
    let own = entry("spiffe://acme.test/w/own", &agent_a(), &["unix:uid:1"], &[]);
    let shared = entry("spiffe://acme.test/w/shared", &group, &["unix:uid:2"], &[]);
    let foreign = entry(
        "spiffe://acme.test/w/foreign",
        &agent_b(),
        &["unix:uid:3"],
        &[],
    );
    for e in [&own, &shared, &foreign] {
        s.create_entry(e).await.unwrap();
    }
    let upto = s.entry_revisions().await.unwrap().current;
    let query = |parents: Vec<SpiffeId>| SyncQuery {
        parents,
        upto,
        after: SyncCursor::default(),
        limit: 100,
    };
    let ids = |rows: Vec<store::SyncRow>| {
        rows.into_iter()
            .map(|r| r.entry.unwrap().id)
            .collect::<Vec<_>>()
    };
    let both = s
        .entry_changes_page(&query(vec![agent_a(), group.clone()]))
        .await
        .unwrap();
    assert_eq!(ids(both), vec![own.id.clone(), shared.id.clone()]);
    // The positive control above; without the group, only the agent's own.
    let alone = s.entry_changes_page(&query(vec![agent_a()])).await.unwrap();
    assert_eq!(ids(alone), vec![own.id.clone()]);

    // Deletions of either parent, and not of another.
    for e in [&own, &shared, &foreign] {
        assert!(s.delete_entry(&e.id).await.unwrap());
    }
    let upto = s.entry_revisions().await.unwrap().current;
    let deleted = s
        .entry_deletions_page(&SyncQuery {
            upto,
            ..query(vec![agent_a(), group.clone()])
        })
        .await
        .unwrap();
    let deleted: Vec<_> = deleted.into_iter().map(|d| d.cursor.id).collect();
    assert_eq!(
        deleted,
        vec![own.id.to_string(), shared.id.to_string()],
        "in revision order"
    );
}

//! Several servers, one PostgreSQL (issue 10, point 5): server processes on one schema behave
//! as one. An agent given several servers survives the SIGKILL of the one it uses under
//! task-mint load and keeps its identity; a ban or a join token made on one server holds on
//! the other; two servers appending to the one audit chain at once do not fork it.
//!
//! Every test skips (with a message) when `MAYFLY_TEST_POSTGRES_URL` is unset.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use common::ha::{HaCluster, SharedSchema};
use mayfly::audit::{AuditAction, AuditEvent, ChainVerifier};
use mayfly::id::TrustDomain;
use mayfly::mtls::{PeerPolicy, TrustSet, Usage};
use mayfly::proto::task::MintX509svidRequest;
use mayfly::store::postgres::PostgresStore;
use mayfly::store::{AuditFilter, Store};
use mayfly::workload_client::{self, WorkloadSvid};
use rustls_pki_types::CertificateDer;

/// Mints in flight at once through the agent's task API.
const IN_FLIGHT: usize = 16;
/// Each worker's successful mints required after the kill.
const AFTER_KILL: usize = 4;

fn uid_selector() -> String {
    format!("unix:uid:{}", nix::unistd::getuid())
}

async fn mint(socket: &std::path::Path, task: &str) -> Result<WorkloadSvid, String> {
    let attempt = async {
        let channel = workload_client::connect(socket)
            .await
            .map_err(|e| e.to_string())?;
        workload_client::mint_x509(
            channel,
            MintX509svidRequest {
                task_id: task.into(),
                scopes: vec!["db:read".into()],
                ttl_seconds: 0,
                spiffe_id: String::new(),
            },
        )
        .await
        .map_err(|e| mayfly::wire::error_chain(&e))
    };
    tokio::time::timeout(Duration::from_secs(60), attempt)
        .await
        .unwrap_or_else(|_| Err("no answer within 60 s".into()))
}

/// Mints until one succeeds (the agent syncs the entry first), for at most a minute.
async fn first_mint(socket: &std::path::Path, task: &str) -> WorkloadSvid {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match mint(socket, task).await {
            Ok(svid) => return svid,
            Err(e) => assert!(Instant::now() < deadline, "no mint succeeded: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The CA of `svid`'s own bundle that signed it: each server has its own CA, so this says which
/// server issued it. Also checks the SVID verifies against the bundle it came with.
fn issuer_of(svid: &WorkloadSvid) -> String {
    let td = TrustDomain::new("mayfly.local").unwrap();
    let chain: Vec<CertificateDer<'static>> = svid
        .chain
        .iter()
        .cloned()
        .map(CertificateDer::from)
        .collect();
    let verifies = |cas: &[Vec<u8>]| {
        let trust = TrustSet::new(mayfly::client::bundle_map(&td, cas)).unwrap();
        mayfly::mtls::verify_chain(
            &chain,
            &trust,
            Usage::Client,
            SystemTime::now(),
            &PeerPolicy::any_id(),
        )
        .is_ok()
    };
    if !verifies(&svid.bundle) {
        // Everything needed to tell which CA signed it and what the bundle lacked.
        let describe = |der: &[u8]| {
            let (_, cert) = x509_parser::parse_x509_certificate(der).expect("a certificate");
            format!(
                "issuer {} subject {} valid {} to {}",
                cert.issuer(),
                cert.subject(),
                cert.validity().not_before,
                cert.validity().not_after
            )
        };
        let bundle: Vec<String> = svid
            .bundle
            .iter()
            .map(|ca| {
                let id = hex::encode(
                    &aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, ca).as_ref()[..8],
                );
                format!("{id}: {}", describe(ca))
            })
            .collect();
        let trust = TrustSet::new(mayfly::client::bundle_map(&td, &svid.bundle)).unwrap();
        let why = mayfly::mtls::verify_chain(
            &chain,
            &trust,
            Usage::Client,
            SystemTime::now(),
            &PeerPolicy::any_id(),
        )
        .err();
        panic!(
            "the SVID does not verify against its bundle ({why:?}) at {:?}: leaf {}; bundle {bundle:#?}",
            SystemTime::now(),
            describe(&svid.chain[0])
        );
    }
    svid.bundle
        .iter()
        .find(|ca| verifies(std::slice::from_ref(*ca)))
        .map(|ca| {
            hex::encode(&aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, ca).as_ref()[..8])
        })
        .expect("one CA of the bundle signed it")
}

#[derive(Default)]
struct Tally {
    /// Successful mints per worker since the kill.
    after_kill: Vec<AtomicUsize>,
    /// Every failure, with its task.
    failures: std::sync::Mutex<Vec<String>>,
    /// Issuing CA of each mint, before and after the kill.
    issuers_before: std::sync::Mutex<BTreeSet<String>>,
    issuers_after: std::sync::Mutex<BTreeSet<String>>,
    minted_before: AtomicUsize,
}

/// Two servers, one agent given both (the victim first, so the agent uses it): under 16 mints
/// in flight the victim is SIGKILLed. No mint fails (each in flight is retried once on the
/// other server), mints go on through the survivor, the agent keeps its ID without attesting
/// again, and the audit chain verifies through the survivor.
async fn survives_the_loss_of(victim: usize) {
    let Some(mut cluster) = HaCluster::start(2).await else {
        return;
    };
    let survivor = 1 - victim;
    cluster.create_entry(
        survivor,
        "spiffe://mayfly.local/ha/worker",
        &["--selector", &uid_selector(), "--scope", "db:read"],
    );
    cluster.start_agent(&[victim, survivor]);
    let socket = cluster.socket();

    // Positive control: mints go through, issued by the victim (the server the agent uses).
    let control = first_mint(&socket, "control").await;
    let victim_ca = issuer_of(&control);

    let tally = Arc::new(Tally {
        after_kill: (0..IN_FLIGHT).map(|_| AtomicUsize::new(0)).collect(),
        ..Tally::default()
    });
    // Set just before the kill, and just after it returns: a mint that completed before the
    // first was issued by the victim, one that started after the second by the survivor; those
    // in flight across the kill may be either (retried on the survivor when the victim died).
    let killing = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|w| {
            let (tally, killing, killed, stop, socket) = (
                tally.clone(),
                killing.clone(),
                killed.clone(),
                stop.clone(),
                socket.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let task = format!("w{w}-{n}");
                    let started_after_kill = killed.load(Ordering::SeqCst);
                    match mint(&socket, &task).await {
                        Ok(svid) => {
                            let issuer = issuer_of(&svid);
                            if started_after_kill {
                                tally.after_kill[w].fetch_add(1, Ordering::SeqCst);
                                tally.issuers_after.lock().unwrap().insert(issuer);
                            } else if !killing.load(Ordering::SeqCst) {
                                tally.minted_before.fetch_add(1, Ordering::SeqCst);
                                tally.issuers_before.lock().unwrap().insert(issuer);
                            }
                        }
                        Err(e) => tally.failures.lock().unwrap().push(format!("{task}: {e}")),
                    }
                }
            })
        })
        .collect();

    let deadline = Instant::now() + Duration::from_secs(120);
    while tally.minted_before.load(Ordering::SeqCst) < 2 * IN_FLIGHT {
        assert!(Instant::now() < deadline, "the load never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The kill lands with mints in flight: the workers never pause.
    killing.store(true, Ordering::SeqCst);
    cluster.kill_server(victim);
    killed.store(true, Ordering::SeqCst);
    while tally
        .after_kill
        .iter()
        .any(|n| n.load(Ordering::SeqCst) < AFTER_KILL)
    {
        assert!(
            Instant::now() < deadline,
            "mints stopped after the kill: {:?}; agent log:\n{}",
            tally.failures.lock().unwrap(),
            cluster.agent_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }

    let failures = tally.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} mints failed after the retry: {failures:#?}\nagent log:\n{}",
        failures.len(),
        cluster.agent_log()
    );
    assert_eq!(
        *tally.issuers_before.lock().unwrap(),
        BTreeSet::from([victim_ca.clone()]),
        "before the kill the victim issued every mint; agent log:\n{}",
        cluster.agent_log()
    );
    let after = tally.issuers_after.lock().unwrap().clone();
    assert_eq!(after.len(), 1, "after the kill one server issued");
    assert!(
        !after.contains(&victim_ca),
        "the survivor issued after the kill"
    );

    println!(
        "victim {victim}: {} mints before the kill, {} after, {} retried on the survivor, 0 failed",
        tally.minted_before.load(Ordering::SeqCst),
        tally
            .after_kill
            .iter()
            .map(|n| n.load(Ordering::SeqCst))
            .sum::<usize>(),
        cluster.agent_log().matches("trying once more").count(),
    );
    // The agent kept its identity: one agent, the same ID, no second attestation.
    let agents = cluster.ok(survivor, &["agent", "list", "--output", "json"]);
    let ids = agent_ids(&agents);
    assert_eq!(ids, vec![cluster.agent_id.clone()], "{agents}");
    let log = cluster.agent_log();
    assert!(!log.contains("attested again"), "no re-attestation: {log}");
    assert!(log.contains("moved to another server"), "{log}");

    // Every mint after the kill was audited by the survivor, on one verified chain.
    let verify = cluster.ok(survivor, &["audit", "verify"]);
    assert!(verify.contains("hash chain verified"), "{verify}");
    let records = cluster.ok(
        survivor,
        &["audit", "list", "--task", "w0-1", "--output", "json"],
    );
    assert!(records.contains("\"allow\""), "{records}");
    cluster.stop().await;
}

/// The agents' IDs in `agent list --output json` (an array, or one object per line).
fn agent_ids(json: &str) -> Vec<String> {
    let values: Vec<serde_json::Value> = match serde_json::from_str(json) {
        Ok(serde_json::Value::Array(all)) => all,
        _ => json
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("agent json"))
            .collect(),
    };
    values
        .iter()
        .map(|v| v["spiffe_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_survives_the_sigkill_of_the_first_server_under_mint_load() {
    survives_the_loss_of(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_survives_the_sigkill_of_the_second_server_under_mint_load() {
    survives_the_loss_of(1).await;
}

/// A ban made on server 0 refuses the agent on server 1 at its next call; before the ban the
/// same agent mints through server 1 (the positive control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_on_one_server_refuses_the_agent_on_the_other() {
    let Some(mut cluster) = HaCluster::start(2).await else {
        return;
    };
    cluster.create_entry(
        0,
        "spiffe://mayfly.local/ha/banned",
        &["--selector", &uid_selector(), "--scope", "db:read"],
    );
    cluster.start_agent(&[1]);
    let socket = cluster.socket();
    first_mint(&socket, "before-ban").await;

    cluster.ok(0, &["agent", "ban", &cluster.agent_id]);
    let err = mint(&socket, "after-ban")
        .await
        .err()
        .expect("refused after the ban");
    assert!(err.contains("banned"), "{err}");
    // The refusal was audited by server 1, on the shared chain.
    let records = cluster.ok(
        0,
        &["audit", "list", "--task", "after-ban", "--output", "json"],
    );
    assert!(records.contains("\"deny\""), "{records}");
    cluster.stop().await;
}

/// A join token made on server 0 is consumed by an agent that reaches only server 1, and then
/// is spent for server 0 as well: single use across servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_made_on_one_server_is_consumed_once_via_the_other() {
    let Some(mut cluster) = HaCluster::start(2).await else {
        return;
    };
    cluster.start_agent(&[1]);
    let agents = cluster.ok(0, &["agent", "list", "--output", "json"]);
    assert_eq!(
        agent_ids(&agents),
        vec![cluster.agent_id.clone()],
        "{agents}"
    );
    let log = cluster.agent_log();
    assert!(log.contains(&cluster.agent_id), "{log}");

    // The same token again, through server 0, from a fresh data dir: refused.
    let out = cluster
        .agent_command("second", &[0], &cluster.token)
        .output()
        .expect("run a second agent");
    assert!(!out.status.success(), "a spent token must not attest twice");
    let stderr = std::fs::read_to_string(cluster.path("second.log")).unwrap_or_default();
    assert!(stderr.contains("already used"), "{stderr}");
    cluster.stop().await;
}

/// An agent attested by a server that has just started (so its SVID is signed by a CA the
/// other server may not have read yet, for up to 5 s) keeps its identity when that server is
/// killed: the other server serves it (it re-reads the store's CAs when it refuses a client
/// certificate, and every 5 s), and the agent does not attest again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_attested_by_a_server_just_started_is_served_by_the_other() {
    let Some(mut cluster) = HaCluster::start(1).await else {
        return;
    };
    cluster.create_entry(
        0,
        "spiffe://mayfly.local/ha/newcomer",
        &["--selector", &uid_selector(), "--scope", "db:read"],
    );
    let newcomer = cluster.add_server();
    cluster.save_bundle_of(newcomer);
    cluster.start_agent(&[newcomer, 0]);
    let socket = cluster.socket();
    let control = first_mint(&socket, "by-newcomer").await;
    let newcomer_ca = issuer_of(&control);

    cluster.kill_server(newcomer);
    let after = first_mint(&socket, "by-first").await;
    assert_ne!(issuer_of(&after), newcomer_ca, "the first server issued");
    let log = cluster.agent_log();
    assert!(!log.contains("attested again"), "no re-attestation: {log}");
    let agents = cluster.ok(0, &["agent", "list", "--output", "json"]);
    assert_eq!(
        agent_ids(&agents),
        vec![cluster.agent_id.clone()],
        "{agents}"
    );
    cluster.stop().await;
}

/// An agent whose first server is down at its start attests through the next one and mints
/// there; once the first comes up and the second is killed, it moves to the first, keeping
/// its identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_skips_a_server_that_is_down_at_its_start() {
    let Some(mut cluster) = HaCluster::start(1).await else {
        return;
    };
    cluster.create_entry(
        0,
        "spiffe://mayfly.local/ha/skipper",
        &["--selector", &uid_selector(), "--scope", "db:read"],
    );
    let down = cluster.reserve_server();
    cluster.start_agent(&[down, 0]);
    let socket = cluster.socket();
    let first = first_mint(&socket, "through-the-second").await;
    assert!(cluster.agent_log().contains(&cluster.agent_id));

    // The server that was down comes up; the one in use is killed.
    cluster.start_server(down);
    // The agent learns the new server's CA from the server it uses (which re-reads the store's
    // CAs every 5 s) at its next sync: only then can it verify the new server.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    while mint(&socket, &format!("learning-{n}"))
        .await
        .map_or(0, |s| s.bundle.len())
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the agent never learnt the new server's CA"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        n += 1;
    }
    cluster.kill_server(0);
    // The mint in flight is retried on the server that came up.
    let after = mint(&socket, "through-the-first")
        .await
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", cluster.agent_log()));
    assert_ne!(
        issuer_of(&after),
        issuer_of(&first),
        "another server issued"
    );
    let log = cluster.agent_log();
    assert!(!log.contains("attested again"), "no re-attestation: {log}");
    cluster.stop().await;
}

/// The agent's own SVID and its workloads' identity SVIDs keep being renewed after the server
/// that issued them is killed: the survivor renews both (short TTLs compress the time), and
/// the agent never attests again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_and_identity_svids_go_on_at_the_survivor() {
    let Some(mut cluster) =
        HaCluster::start_with(2, &["--agent-ttl", "6s", "--min-entry-ttl", "2s"]).await
    else {
        return;
    };
    cluster.create_entry(
        1,
        "spiffe://mayfly.local/ha/renewed",
        &[
            "--selector",
            &uid_selector(),
            "--scope",
            "db:read",
            "--ttl",
            "4s",
        ],
    );
    cluster.start_agent(&[0, 1]);
    let socket = cluster.socket();
    let fetch = || async {
        let channel = workload_client::connect(&socket).await.ok()?;
        workload_client::fetch_x509(channel).await.ok()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let identity = loop {
        if let Some(svid) = fetch().await {
            break svid;
        }
        assert!(Instant::now() < deadline, "no identity SVID");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let first_ca = issuer_of(&identity);
    let serial_of_agent = |c: &HaCluster| -> String {
        let out = c.ok(1, &["agent", "list", "--output", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        v[0]["current_serial"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };

    cluster.kill_server(0);
    let serial_at_kill = serial_of_agent(&cluster);
    // Identity SVIDs (4 s) rotate at about 2 s; the agent SVID (6 s) renews at about 3 s: wait
    // until both were renewed by the survivor, and the agent's first SVID has expired.
    let waited_from = Instant::now();
    let deadline = waited_from + Duration::from_secs(90);
    loop {
        let rotated = fetch().await.is_some_and(|s| issuer_of(&s) != first_ca);
        let renewed = serial_of_agent(&cluster) != serial_at_kill;
        if rotated && renewed && waited_from.elapsed() > Duration::from_secs(8) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rotated {rotated}, renewed {renewed}; agent log:\n{}",
            cluster.agent_log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Past the first agent SVID's life, the agent still mints: it uses its renewed SVID.
    mint(&socket, "after-renewal")
        .await
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", cluster.agent_log()));
    let log = cluster.agent_log();
    assert!(!log.contains("attested again"), "no re-attestation: {log}");
    cluster.stop().await;
}

/// An agent restarted with a stored identity while every server is down starts anyway (it
/// connects at its first call) and serves once a server is back, without attesting again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_during_an_outage_serves_when_a_server_is_back() {
    let Some(mut cluster) = HaCluster::start(2).await else {
        return;
    };
    cluster.create_entry(
        0,
        "spiffe://mayfly.local/ha/outage",
        &["--selector", &uid_selector(), "--scope", "db:read"],
    );
    cluster.start_agent(&[0, 1]);
    first_mint(&cluster.socket(), "before-outage").await;
    if let Some(mut agent) = cluster.agent.take() {
        agent.kill();
    }
    cluster.kill_server(0);
    cluster.kill_server(1);

    cluster.start_agent(&[0, 1]);
    assert!(
        cluster
            .agent
            .as_mut()
            .unwrap()
            .0
            .try_wait()
            .unwrap()
            .is_none(),
        "the agent runs with no server up: {}",
        cluster.agent_log()
    );
    cluster.start_server(1);
    first_mint(&cluster.socket(), "after-outage").await;
    let log = cluster.agent_log();
    assert!(!log.contains("attested again"), "no re-attestation: {log}");
    assert_eq!(
        log.matches("agent identity ready").count(),
        2,
        "the stored identity was used: {log}"
    );
    cluster.stop().await;
}

/// An eviction on server 0 refuses the agent on server 1 (it is unknown there too); before it
/// the agent mints through server 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_on_one_server_refuses_the_agent_on_the_other() {
    let Some(mut cluster) = HaCluster::start(2).await else {
        return;
    };
    cluster.create_entry(
        0,
        "spiffe://mayfly.local/ha/evicted",
        &["--selector", &uid_selector(), "--scope", "db:read"],
    );
    cluster.start_agent(&[1]);
    let socket = cluster.socket();
    first_mint(&socket, "before-evict").await;

    cluster.ok(0, &["agent", "evict", &cluster.agent_id]);
    let err = mint(&socket, "after-evict")
        .await
        .err()
        .expect("refused after the eviction");
    assert!(err.contains("unknown to the server"), "{err}");
    cluster.stop().await;
}

fn event(writer: usize, n: usize) -> AuditEvent {
    AuditEvent {
        reason: "issued".into(),
        task_id: Some(format!("writer{writer}-{n}")),
        time_ms: 1,
        ..AuditEvent::new(AuditAction::SvidTask)
    }
}

/// Two stores on one schema (two servers' connection pools) append 500 records each at once,
/// in batches of 1 to 7 from 8 tasks each: every record lands once on one linear chain that
/// verifies, each writer's records in its own order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_appending_at_once_keep_one_audit_chain() {
    const PER_SERVER: usize = 500;
    const TASKS: usize = 8;
    let Some(schema) = SharedSchema::create().await else {
        return;
    };
    let mut stores = Vec::new();
    for _ in 0..2 {
        let store: Arc<dyn Store> = Arc::new(
            PostgresStore::connect_with_schema(schema.url(), schema.name())
                .await
                .expect("connect"),
        );
        stores.push(store);
    }
    let mut handles = Vec::new();
    for (writer, store) in stores.iter().enumerate() {
        for t in 0..TASKS {
            let store = store.clone();
            handles.push(tokio::spawn(async move {
                let mine: Vec<usize> = (0..PER_SERVER).filter(|n| n % TASKS == t).collect();
                let mut seqs = Vec::new();
                for (i, batch) in mine.chunks(1 + t % 7).enumerate() {
                    let events: Vec<AuditEvent> = batch.iter().map(|&n| event(writer, n)).collect();
                    let records = store.append_audit(&events).await.expect("append");
                    assert_eq!(records.len(), events.len(), "batch {i}");
                    seqs.extend(records.iter().map(|r| r.seq));
                }
                seqs
            }));
        }
    }
    let mut all_seqs = Vec::new();
    for handle in handles {
        let seqs = handle.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one task's records in order"
        );
        all_seqs.extend(seqs);
    }
    all_seqs.sort_unstable();
    let expected: Vec<i64> = (1..=(2 * PER_SERVER) as i64).collect();
    assert_eq!(
        all_seqs, expected,
        "every sequence number once, none skipped"
    );

    // The chain, read back through either store, verifies end to end.
    let (head_seq, head_hash) = stores[1].audit_head().await.unwrap();
    let records = stores[0].list_audit(&AuditFilter::default()).await.unwrap();
    let mut verifier = ChainVerifier::new();
    let mut per_writer: BTreeMap<String, usize> = BTreeMap::new();
    for record in &records {
        verifier.push(record).expect("the chain links");
        let task = record.event.task_id.clone().unwrap_or_default();
        *per_writer
            .entry(task.split('-').next().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        verifier.finish(head_seq, head_hash).unwrap(),
        (2 * PER_SERVER) as i64
    );
    assert_eq!(per_writer.get("writer0"), Some(&PER_SERVER));
    assert_eq!(per_writer.get("writer1"), Some(&PER_SERVER));
}

/// `MAYFLY_AGENT_SERVER` takes several servers separated by commas: the second entry of the
/// list is read (and refused, for lacking a port, with what to write), while the same list
/// with a port on both gets past the server addresses (to the missing join token).
#[test]
fn the_server_variable_takes_a_comma_separated_list() {
    let dir = tempfile::tempdir().unwrap();
    let run = |servers: &str| {
        std::process::Command::new(common::cluster::BIN)
            .args(["agent", "run", "--insecure-bootstrap"])
            .arg("--data-dir")
            .arg(dir.path().join("agent"))
            .arg("--socket")
            .arg(dir.path().join("agent.sock"))
            .env("MAYFLY_AGENT_SERVER", servers)
            .env_remove("MAYFLY_JOIN_TOKEN")
            .output()
            .unwrap()
    };
    let out = run("127.0.0.1:1,127.0.0.1");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("'127.0.0.1' is not a server address"), "{err}");
    assert!(err.contains("HOST:PORT"), "{err}");

    let out = run("127.0.0.1:1,127.0.0.1:2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains("server address"), "{err}");
    assert!(err.contains("join token"), "{err}");
}

/// Server `i`'s `ca list --output json`: `(id, state, owned by server i)` of each CA.
fn ca_rows(cluster: &HaCluster, i: usize) -> Vec<(String, String, bool)> {
    let json = cluster.ok(i, &["ca", "list", "--output", "json"]);
    let all: serde_json::Value = serde_json::from_str(&json).expect("ca list json");
    all.as_array()
        .expect("an array")
        .iter()
        .map(|c| {
            (
                c["id"].as_str().expect("id").to_owned(),
                c["state"].as_str().expect("state").to_owned(),
                c["this_server"] == true,
            )
        })
        .collect()
}

/// The ID of the CA server `i` signs with now.
fn active_ca(cluster: &HaCluster, i: usize) -> String {
    let active: Vec<String> = ca_rows(cluster, i)
        .into_iter()
        .filter(|(_, state, own)| *own && state == "active")
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(active.len(), 1, "server {i} has one active CA: {active:?}");
    active.into_iter().next().unwrap_or_default()
}

/// The IDs (hex SHA-256 of the DER) of the CAs in server `i`'s bundle.
fn bundle_ids_of(cluster: &HaCluster, i: usize) -> BTreeSet<String> {
    let pem = cluster.ok(i, &["bundle", "show"]);
    mayfly::bundle::from_pem(pem.as_bytes())
        .expect("a PEM bundle")
        .iter()
        .map(|der| hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)))
        .collect()
}

/// Two servers on one schema, each rotating its own 60 s CA, and one agent given both, minting
/// a task SVID every 300 ms across a rotation of each server: no mint fails, each SVID
/// verifies against the bundle that came with it, and the mints were signed by several CAs.
/// Each server rotates only its own CAs (the other's rows are the other's in both lists); the
/// two bundles converge to one union holding both servers' active CAs; the agent keeps its ID
/// and the audit chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_rotate_their_own_cas_and_the_bundle_is_their_union() {
    // A 60 s CA: 20 s between publishing the next CA and signing with it, room for the other
    // server's 5 s re-read of the store and the agent's sync on a loaded machine.
    let lifetimes = [
        "--ca-ttl",
        "60s",
        "--agent-ttl",
        "10s",
        "--min-entry-ttl",
        "2s",
    ];
    let Some(mut cluster) = HaCluster::start_with(2, &lifetimes).await else {
        return;
    };
    cluster.create_entry(
        0,
        "spiffe://mayfly.local/ha/rotating",
        &[
            "--selector",
            &uid_selector(),
            "--scope",
            "db:read",
            "--ttl",
            "5s",
        ],
    );
    cluster.start_agent(&[0, 1]);
    let socket = cluster.socket();
    first_mint(&socket, "rotating-first").await;

    let first = [active_ca(&cluster, 0), active_ca(&cluster, 1)];
    assert_ne!(first[0], first[1], "each server has a CA of its own");
    for i in 0..2 {
        let rows = ca_rows(&cluster, i);
        assert!(
            rows.contains(&(first[i].clone(), "active".into(), true)),
            "{rows:?}"
        );
        assert!(
            rows.contains(&(first[1 - i].clone(), "active".into(), false)),
            "server {i} sees the other's CA as the other's: {rows:?}"
        );
    }

    let mut seen = [BTreeSet::new(), BTreeSet::new()];
    let mut issuers = BTreeSet::new();
    let mut failures = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut n = 0;
    // Two distinct active CAs per server: a rotation each.
    while seen.iter().any(|s| s.len() < 2) {
        assert!(
            Instant::now() < deadline,
            "both servers did not rotate in 180 s: {seen:?}"
        );
        match mint(&socket, &format!("rotating-{n}")).await {
            Ok(svid) => {
                issuers.insert(issuer_of(&svid));
            }
            Err(e) => failures.push(e),
        }
        n += 1;
        for (i, s) in seen.iter_mut().enumerate() {
            s.insert(active_ca(&cluster, i));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Mints go on until one is signed by a CA activated during the run.
    let after_deadline = Instant::now() + Duration::from_secs(30);
    while issuers.len() < 2 && Instant::now() < after_deadline {
        match mint(&socket, &format!("rotating-{n}")).await {
            Ok(svid) => {
                issuers.insert(issuer_of(&svid));
            }
            Err(e) => failures.push(e),
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        failures.is_empty(),
        "{} of {n} mints failed: {failures:?}",
        failures.len()
    );
    assert!(
        issuers.len() >= 2,
        "the mints were signed by several CAs: {issuers:?}"
    );
    assert!(
        seen[0].is_disjoint(&seen[1]),
        "no server activated the other's CA"
    );

    // Each server re-reads the store's CAs every 5 s: within a few rounds both bundles are the
    // same union, holding both servers' active CAs.
    let union_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (b0, b1) = (bundle_ids_of(&cluster, 0), bundle_ids_of(&cluster, 1));
        let actives = [active_ca(&cluster, 0), active_ca(&cluster, 1)];
        if b0 == b1 && actives.iter().all(|a| b0.contains(a)) {
            break;
        }
        assert!(
            Instant::now() < union_deadline,
            "the bundles never became one union: {b0:?} {b1:?} {actives:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let agents = agent_ids(&cluster.ok(1, &["agent", "list", "--output", "json"]));
    assert_eq!(agents, [cluster.agent_id.clone()], "the agent kept its ID");
    cluster.ok(1, &["audit", "verify"]);
    cluster.stop().await;
}

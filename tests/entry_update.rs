//! Entries after they are created (issue 11, point 6): a stable default identity, the hint in
//! Workload API answers, and `mayfly entry update`, as real processes: `mayfly server run`,
//! `mayfly agent run`, the `mayfly` command as operator and as a second workload, and this test
//! process as the first workload on the agent's socket.
//!
//! The two workloads share a uid and differ in their executable (`unix:path`): this test binary
//! and the `mayfly` binary. An entry that names one path serves that workload only, so moving
//! an entry from one to the other is one `entry update --selector ...`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cluster::{BIN, Cluster};
use mayfly::proto::workload::{X509svidRequest, X509svidResponse};
use mayfly::workload_client;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

const TD: &str = "spiffe://mayfly.local";
/// How long a change may take to reach the agent (it holds a sync call the server answers at
/// once on a change; a few seconds covers a loaded machine).
const SYNC: Duration = Duration::from_secs(15);

fn uid_selector() -> String {
    format!("unix:uid:{}", nix::unistd::getuid())
}

/// The `unix:path` selector of an executable, as the agent's attestor reads it (resolved).
fn path_selector(exe: &Path) -> String {
    let exe = std::fs::canonicalize(exe).expect("canonical path");
    format!("unix:path:{}", exe.display())
}

fn this_test() -> String {
    path_selector(&std::env::current_exe().expect("current exe"))
}

fn the_mayfly_command() -> String {
    path_selector(&PathBuf::from(BIN))
}

/// A FetchX509SVID stream from this process, or why there is none.
async fn svid_stream(socket: &Path) -> Result<tonic::Streaming<X509svidResponse>, String> {
    let channel = workload_client::connect(socket)
        .await
        .map_err(|e| e.to_string())?;
    Ok(workload_client::workload_api(channel)
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(|s| s.to_string())?
        .into_inner())
}

/// Opens streams until one's first message satisfies `done`; returns that message.
async fn first_message_where(
    socket: &Path,
    done: impl Fn(&X509svidResponse) -> bool,
) -> X509svidResponse {
    let deadline = Instant::now() + SYNC;
    loop {
        let last = match svid_stream(socket).await {
            Ok(mut stream) => {
                match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
                    Ok(Ok(Some(m))) if done(&m) => return m,
                    other => format!("{other:?}"),
                }
            }
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "no FetchX509SVID answer as expected in time; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The SPIFFE IDs of a message, in order.
fn ids(m: &X509svidResponse) -> Vec<&str> {
    m.svids.iter().map(|s| s.spiffe_id.as_str()).collect()
}

/// The DNS names of the leaf of a DER chain.
fn leaf_dns_names(chain: &[u8]) -> Vec<String> {
    let (_, leaf) = X509Certificate::from_der(chain).expect("leaf");
    leaf.subject_alternative_name()
        .expect("SAN")
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `mayfly svid fetch` as the second workload: its SPIFFE ID, or its error.
fn fetch_as_mayfly(cluster: &Cluster) -> Result<String, String> {
    fetch_with_hint(cluster).map(|(id, _)| id)
}

/// `mayfly svid fetch` as the second workload: its SPIFFE ID and hint, or its error.
fn fetch_with_hint(cluster: &Cluster) -> Result<(String, String), String> {
    let out = cluster.mayfly(&["svid", "fetch", "--output", "json"]);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("svid json");
    let text = |key: &str| v[key].as_str().expect(key).to_owned();
    Ok((text("spiffe_id"), text("hint")))
}

/// `mayfly svid mint` as the second workload: the minted SPIFFE ID, or the one-line error.
fn mint_as_mayfly(cluster: &Cluster, task: &str, scope: &str) -> Result<String, String> {
    let out = cluster.mayfly(&[
        "svid", "mint", "--task", task, "--scope", scope, "--output", "json",
    ]);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.starts_with("error: "), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        return Err(err);
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("svid json");
    Ok(v["spiffe_id"].as_str().expect("spiffe_id").to_owned())
}

/// Retries `f` until it gives `Some`, or fails the test with `what`.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + SYNC;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} did not happen in time");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `entry show ID` as JSON.
fn show(cluster: &Cluster, id: &str) -> serde_json::Value {
    serde_json::from_str(&cluster.ok(&["entry", "show", id, "--output", "json"])).expect("json")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_identity_is_the_first_created_entry_and_carries_its_hint() {
    let mut cluster = Cluster::start();
    cluster.start_agent();
    let socket = cluster.socket();
    let uid = uid_selector();
    let first_id = format!("{TD}/zz/first");
    let first = cluster.create_entry(
        &first_id,
        &[
            "--selector",
            &uid,
            "--ttl",
            "1h",
            "--hint",
            "primary",
            "--scope",
            "db:read",
        ],
    );
    // Positive control: alone, it is the default, with its hint.
    let m = first_message_where(&socket, |m| !m.svids.is_empty()).await;
    assert_eq!(ids(&m), [first_id.as_str()]);
    assert_eq!(m.svids[0].hint, "primary");
    assert_eq!(
        fetch_with_hint(&cluster).unwrap(),
        (first_id.clone(), "primary".to_owned())
    );
    let text = cluster.ok(&["svid", "fetch"]);
    assert!(text.contains("Hint:      primary\n"), "{text}");

    // Entries created within one second tie on their creation time and fall back to their IDs:
    // the next one is created in a later second, as an unrelated entry would be.
    std::thread::sleep(Duration::from_millis(1100));
    let later_id = format!("{TD}/aa/later");
    cluster.create_entry(
        &later_id,
        &["--selector", &uid, "--ttl", "1h", "--scope", "db:read"],
    );
    // Its SPIFFE ID sorts first (the order the default used to follow); the default stays.
    let m = first_message_where(&socket, |m| m.svids.len() == 2).await;
    assert_eq!(ids(&m), [first_id.as_str(), later_id.as_str()]);
    assert_eq!(m.svids[0].hint, "primary");
    assert_eq!(m.svids[1].hint, "", "no hint given, none served");
    assert_eq!(fetch_as_mayfly(&cluster).unwrap(), first_id);
    // The task API's choice without --spiffe-id is the same default.
    let minted = mint_as_mayfly(&cluster, "default-choice", "db:read").unwrap();
    assert!(
        minted.starts_with(&format!("{first_id}/scope/")),
        "{minted}"
    );

    // An update of the hint and the DNS names reaches the stream at the next sync, with a
    // new SVID holding the new name; the order stays.
    let mut stream = svid_stream(&socket).await.unwrap();
    let before = stream.message().await.unwrap().unwrap();
    assert!(leaf_dns_names(&before.svids[0].x509_svid).is_empty());
    cluster.ok(&[
        "entry",
        "update",
        &first,
        "--hint",
        "renamed",
        "--dns",
        "db.internal",
    ]);
    let deadline = tokio::time::Instant::now() + SYNC;
    loop {
        let m = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("the update reached the stream in time")
            .unwrap()
            .expect("the stream goes on");
        if m.svids[0].hint == "renamed" {
            assert_eq!(ids(&m), [first_id.as_str(), later_id.as_str()]);
            assert_eq!(
                leaf_dns_names(&m.svids[0].x509_svid),
                ["db.internal"],
                "re-issued with the new DNS name along with the new hint"
            );
            assert_eq!(m.svids[1].x509_svid, before.svids[1].x509_svid);
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_moves_an_identity_between_workloads_and_scopes_between_tasks() {
    let mut cluster = Cluster::start();
    cluster.start_agent();
    let socket = cluster.socket();
    let (uid, me, mayfly) = (uid_selector(), this_test(), the_mayfly_command());
    let bot_id = format!("{TD}/bot");
    let bot = cluster.create_entry(
        &bot_id,
        &["--selector", &uid, "--selector", &me, "--scope", "db:read"],
    );
    // This process holds it; the `mayfly` command does not (the control for what follows).
    let m = first_message_where(&socket, |m| !m.svids.is_empty()).await;
    assert_eq!(ids(&m), [bot_id.as_str()]);
    let mut held = svid_stream(&socket).await.unwrap();
    held.message().await.unwrap().expect("served");
    let refused = fetch_as_mayfly(&cluster).unwrap_err();
    assert!(refused.contains("error: "), "{refused}");

    // Move it: the selectors given replace the entry's.
    let updated: serde_json::Value = serde_json::from_str(&cluster.ok(&[
        "entry",
        "update",
        &bot,
        "--selector",
        &uid,
        "--selector",
        &mayfly,
        "--output",
        "json",
    ]))
    .unwrap();
    let mut want = vec![uid.clone(), mayfly.clone()];
    want.sort();
    assert_eq!(updated["selectors"], serde_json::json!(want));
    assert_eq!(updated["scopes"], serde_json::json!(["db:read"]), "kept");
    // This process loses its only identity (the stream ends with PermissionDenied) ...
    let ended = tokio::time::timeout(SYNC, async {
        loop {
            match held.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status.code()),
            }
        }
    })
    .await
    .expect("the stream ended in time");
    assert_eq!(ended, Some(tonic::Code::PermissionDenied));
    // ... and the `mayfly` command gains it.
    let got = eventually("the mayfly command getting the identity", || {
        fetch_as_mayfly(&cluster).ok()
    });
    assert_eq!(got, bot_id);

    // Scopes: the entry's are the ceiling of what a task may hold.
    assert!(mint_as_mayfly(&cluster, "t-read", "db:read").is_ok());
    let err = mint_as_mayfly(&cluster, "t-write", "db:write").unwrap_err();
    assert!(err.contains("db:write"), "{err}");
    cluster.ok(&["entry", "update", &bot, "--scope", "db:write"]);
    // The server judges scopes from its store, so the change holds at once.
    assert!(mint_as_mayfly(&cluster, "t-write-2", "db:write").is_ok());
    let err = mint_as_mayfly(&cluster, "t-read-2", "db:read").unwrap_err();
    assert!(err.contains("db:read"), "removed: {err}");
    cluster.ok(&["entry", "update", &bot, "--clear-scopes"]);
    assert!(mint_as_mayfly(&cluster, "t-write-3", "db:write").is_err());
    assert_eq!(show(&cluster, &bot)["scopes"], serde_json::json!([]));

    // Every update is in the audit log, as the operator's, naming what it changed.
    let audit = cluster.ok(&["audit", "list", "--output", "json"]);
    let updates: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["action"] == "entry.update")
        .collect();
    assert_eq!(updates.len(), 3, "{audit}");
    assert!(updates.iter().all(|r| r["entry_id"] == bot.as_str()
        && r["agent_id"] == "operator"
        && r["decision"] == "allow"));
    assert_eq!(updates[0]["reason"], "entry updated: selectors");
    assert_eq!(updates[1]["scopes"], serde_json::json!(["db:write"]));
    assert!(cluster.ok(&["audit", "verify"]).contains("intact"));
}

/// A refusal: non-zero exit, one `error:` sentence containing `needle`.
fn refused(cluster: &Cluster, args: &[&str], needle: &str) {
    let out = cluster.mayfly(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(err.starts_with("error: "), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "'{needle}' not in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_updates_are_one_sentence_and_change_nothing() {
    let cluster = Cluster::start();
    let agent = cluster.agent_id.clone();
    let create = |name: &str, selector: &str| {
        let out = cluster.ok(&[
            "entry",
            "create",
            "--spiffe-id",
            &format!("{TD}/{name}"),
            "--parent-id",
            &agent,
            "--selector",
            selector,
            "--hint",
            "first",
            "--jwt-ttl",
            "2m",
            "--output",
            "json",
        ]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let id = create("bot", "unix:uid:1001");
    create("bot", "unix:uid:1002");
    // Created with the hint and JWT TTL, shown by show and list.
    let original = show(&cluster, &id);
    assert_eq!(original["hint"], "first");
    assert_eq!(original["jwt_ttl_seconds"], 120);
    let text = cluster.ok(&["entry", "show", &id]);
    assert!(text.contains("Hint:      first\n"), "{text}");
    assert!(text.contains("JWT TTL:   2m\n"), "{text}");
    let list = cluster.ok(&["entry", "list"]);
    assert!(list.contains("JWT TTL") && list.contains("HINT"), "{list}");

    let unknown = "0123456789abcdef0123456789abcdef";
    let cases: [(&[&str], &str); 8] = [
        (
            &["--hint", "x"],
            "no entry 0123456789abcdef0123456789abcdef",
        ),
        (&["--selector", "unix"], "selector"),
        (&["--hint", "bell\u{7}ring"], "control"),
        (&["--hint", &"h".repeat(65)], "at most 64 characters"),
        (&["--jwt-ttl", "2h"], "above the ceiling"),
        (&["--ttl", "1s"], "below the floor"),
        (&["--selector", "unix:uid:1002"], "already exists"),
        (&[], "names nothing to change"),
    ];
    for (i, (flags, needle)) in cases.iter().enumerate() {
        let target = if i == 0 { unknown } else { id.as_str() };
        let mut args = vec!["entry", "update", target];
        args.extend_from_slice(flags);
        refused(&cluster, &args, needle);
        assert_eq!(show(&cluster, &id), original, "unchanged after {flags:?}");
    }
    refused(
        &cluster,
        &["entry", "update", "not-an-id", "--hint", "x"],
        "not an entry ID",
    );
    assert!(
        !cluster
            .ok(&["audit", "list", "--output", "json"])
            .contains("entry.update"),
        "nothing refused is recorded as an update"
    );

    // Positive control on the same entry: each field changes, and only what was given.
    let out = cluster.ok(&[
        "entry",
        "update",
        &id,
        "--hint",
        "",
        "--jwt-ttl",
        "default",
        "--ttl",
        "10m",
        "--dns-name",
        "b.internal",
        "--dns-name",
        "a.internal",
        "--output",
        "json",
    ]);
    let updated: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(updated["hint"], "");
    assert_eq!(updated["jwt_ttl_seconds"], 0);
    assert_eq!(updated["ttl_seconds"], 600);
    assert_eq!(
        updated["dns_names"],
        serde_json::json!(["a.internal", "b.internal"])
    );
    assert_eq!(updated["selectors"], original["selectors"]);
    assert_eq!(updated["created_at"], original["created_at"]);
    assert_eq!(show(&cluster, &id), updated);
    let text = cluster.ok(&["entry", "show", &id]);
    assert!(text.contains("JWT TTL:   default\n") && text.contains("Hint:      -\n"));
    cluster.ok(&["entry", "update", &id, "--clear-dns"]);
    assert_eq!(show(&cluster, &id)["dns_names"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_updates_of_different_fields_all_hold() {
    use mayfly::proto::admin::{StringList, UpdateEntryRequest};
    let cluster = Cluster::start();
    let id = cluster.create_entry(&format!("{TD}/busy"), &["--selector", "unix:uid:1001"]);
    let admin = mayfly::client::connect_admin(&cluster.path(".mayfly/server/admin.sock"))
        .await
        .expect("admin socket");
    let update = |change: fn(&mut UpdateEntryRequest)| {
        let mut request = UpdateEntryRequest {
            id: id.clone(),
            ..Default::default()
        };
        change(&mut request);
        request
    };
    let list = |v: &[&str]| StringList {
        values: v.iter().map(|s| s.to_string()).collect(),
    };
    // Each round, five operators change five different fields of one entry at once.
    for round in 0..5u32 {
        let requests = [
            update(|r| r.hint = Some("busy".into())),
            update(|r| r.ttl_seconds = Some(600)),
            update(|r| r.jwt_ttl_seconds = Some(120)),
            update(|r| {
                r.dns_names = Some(StringList {
                    values: vec!["busy.internal".into()],
                })
            }),
            UpdateEntryRequest {
                scopes: Some(list(&["db:read"])),
                ..update(|_| {})
            },
        ];
        let answers = futures::future::join_all(requests.into_iter().map(|r| {
            let mut admin = admin.clone();
            async move { admin.update_entry(r).await }
        }))
        .await;
        for a in answers {
            a.expect("every update is applied");
        }
        let e = show(&cluster, &id);
        assert_eq!(
            (
                &e["hint"],
                &e["ttl_seconds"],
                &e["jwt_ttl_seconds"],
                &e["dns_names"],
                &e["scopes"]
            ),
            (
                &serde_json::json!("busy"),
                &serde_json::json!(600),
                &serde_json::json!(120),
                &serde_json::json!(["busy.internal"]),
                &serde_json::json!(["db:read"])
            ),
            "round {round}: no update undid another"
        );
        // Back to the start for the next round (the positive control: one update at a time).
        cluster.ok(&[
            "entry",
            "update",
            &id,
            "--hint",
            "",
            "--ttl",
            "5m",
            "--jwt-ttl",
            "default",
            "--clear-dns",
            "--clear-scopes",
        ]);
        let e = show(&cluster, &id);
        assert_eq!(e["hint"], "");
        assert_eq!(e["scopes"], serde_json::json!([]));
    }
}

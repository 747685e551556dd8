//! What an entry may hold, over the admin API of a real server on real sockets (SQLite file,
//! TLS node API): IP literals as DNS names, TTLs below the floor, and entries too large to be
//! issued or synced are refused with one sentence and nothing stored; entries at every cap are
//! stored, synced and issued. Refused values that reach the audit log (an unauthenticated
//! caller's attestor name, a workload's task ID) are recorded escaped and bounded. The message
//! an operator sees is checked once through the `mayfly` binary.

mod common;

use common::cluster::Cluster;
use common::{TestServer, csr, entry_request, expect_code, task_request};
use mayfly::audit::MAX_UNTRUSTED_CHARS;
use mayfly::id::MAX_SPIFFE_ID_LEN;
use mayfly::proto::admin as admin_pb;
use mayfly::proto::node as node_pb;
use mayfly::server::entry_rules::{
    LEAF_BYTES_WITHOUT_DNS, MAX_ENTRY_DNS_NAMES, MAX_ENTRY_SCOPES, MAX_ENTRY_SELECTORS,
    MAX_HINT_CHARS, MIN_TTL,
};
use mayfly::svid::MAX_LEAF_LEN;
use mayfly::wire::MAX_NODE_MESSAGE;
use prost::Message;
use tonic::Code;

/// Asserts that `request` is refused as an invalid argument whose message contains `reason`,
/// and that nothing was stored. Returns the message.
async fn refused(server: &TestServer, request: admin_pb::CreateEntryRequest, reason: &str) {
    let before = server.entries().await.len();
    let status = expect_code(server.create_entry(request).await, Code::InvalidArgument);
    assert!(
        status.message().contains(reason),
        "{:?} should mention {reason:?}",
        status.message()
    );
    assert!(
        !status.message().chars().any(char::is_control),
        "one sentence, no control characters: {:?}",
        status.message()
    );
    assert_eq!(server.entries().await.len(), before, "something was stored");
}

/// `count` distinct scopes (`s00:read`, `s01:read`...).
fn scopes(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("s{i:02}:read")).collect()
}

/// The length of `id` with `scopes` encoded as Mayfly encodes them.
fn scoped_len(id: &str, scopes: &[String]) -> usize {
    id.len() + "/scope".len() + scopes.iter().map(|s| 1 + s.len()).sum::<usize>()
}

/// A SPIFFE ID whose encoding with `scopes` is exactly `total` bytes.
fn id_for_total(total: usize, scopes: &[String]) -> String {
    let base = "spiffe://mayfly.local/agents/big-";
    let pad = total - scoped_len(base, scopes);
    format!("{base}{}", "p".repeat(pad))
}

/// `count` distinct DNS names of the longest length, 253 bytes.
fn dns_names(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            let name = format!(
                "n{i:03}{}.{}.{}.{}",
                "a".repeat(59),
                "b".repeat(63),
                "c".repeat(63),
                "d".repeat(61)
            );
            assert_eq!(name.len(), 253);
            name
        })
        .collect()
}

/// `count` distinct selectors with the longest value (1,024 bytes).
fn selectors(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| format!("unix:group:g{i:03}{}", "x".repeat(1020)))
        .collect()
}

#[tokio::test]
async fn ip_literals_and_unsignable_dns_names_are_refused_and_host_names_are_issued() {
    let server = TestServer::start().await;
    let mut agent = server.attest().await;
    let parent = agent.spiffe_id.to_string();
    for name in [
        "127.0.0.1",
        "::1",
        "[::1]",
        "[2001:db8::1]",
        "10.0.0.1",
        "0.0.0.0",
    ] {
        let mut request = entry_request(&parent);
        request.dns_names = vec!["api.example.com".into(), name.into()];
        refused(&server, request, "is an IP address, not a DNS name").await;
    }
    // Names the admin API accepted before but the certificate builder refused: a numeric last
    // label reads as an IPv4 address.
    for name in ["127.1", "host.123", "a.0x7f"] {
        let mut request = entry_request(&parent);
        request.dns_names = vec![name.into()];
        refused(&server, request, "ends in a number").await;
    }

    // Control: host names are stored and put in the SVID.
    let mut request = entry_request(&parent);
    request.dns_names = vec!["api.example.com".into(), "localhost".into()];
    let entry = server.create_entry(request).await.expect("host names");
    assert_eq!(entry.dns_names, vec!["api.example.com", "localhost"]);
    let key = csr();
    let identity = agent
        .node
        .issue_identity(node_pb::IssueIdentityRequest {
            entry_id: entry.id.clone(),
            csr: key.csr.clone(),
        })
        .await
        .expect("identity SVID with DNS names")
        .into_inner()
        .svid
        .expect("an SVID");
    server.verify(&identity.cert_chain).await;
    server.stop().await;
}

#[tokio::test]
async fn ttls_below_the_floor_are_refused_and_the_floor_itself_is_issued() {
    let server = TestServer::start().await;
    let mut agent = server.attest().await;
    let parent = agent.spiffe_id.to_string();
    let floor = MIN_TTL.as_secs() as u32;
    assert!(floor >= 30);
    for ttl in [1, 10, floor - 1] {
        let mut request = entry_request(&parent);
        request.ttl_seconds = ttl;
        refused(&server, request, "re-issue this identity continuously").await;
    }

    // Control: the floor is stored, and an identity SVID is issued for it.
    let mut request = entry_request(&parent);
    request.ttl_seconds = floor;
    let entry = server.create_entry(request).await.expect("the floor");
    assert_eq!(entry.ttl_seconds, floor);
    let key = csr();
    agent
        .node
        .issue_identity(node_pb::IssueIdentityRequest {
            entry_id: entry.id.clone(),
            csr: key.csr.clone(),
        })
        .await
        .expect("identity SVID at the floor");
    server.stop().await;
}

#[tokio::test]
async fn an_entry_at_every_cap_is_stored_synced_and_issued_and_one_over_any_cap_is_refused() {
    let server = TestServer::start().await;
    let mut agent = server.attest().await;
    let parent = agent.spiffe_id.to_string();
    let all_scopes = scopes(MAX_ENTRY_SCOPES);
    let at_caps = || {
        let mut r = entry_request(&parent);
        r.spiffe_id = id_for_total(MAX_SPIFFE_ID_LEN, &all_scopes);
        r.scopes = all_scopes.clone();
        r.dns_names = dns_names(MAX_ENTRY_DNS_NAMES);
        r.selectors = selectors(MAX_ENTRY_SELECTORS);
        // The longest hint in bytes: every character 4 bytes of UTF-8.
        r.hint = "\u{1d11e}".repeat(MAX_HINT_CHARS);
        r.jwt_ttl_seconds = 3600;
        r
    };

    // One over each cap, the rest at the caps: refused, nothing stored.
    let mut r = at_caps();
    r.scopes = scopes(MAX_ENTRY_SCOPES + 1);
    r.spiffe_id = "spiffe://mayfly.local/agents/many-scopes".into();
    refused(&server, r, "at most 64 scopes").await;
    let mut r = at_caps();
    r.spiffe_id = id_for_total(MAX_SPIFFE_ID_LEN + 1, &all_scopes);
    refused(&server, r, "2049 bytes, over the SPIFFE limit of 2048").await;
    let mut r = at_caps();
    r.dns_names = dns_names(MAX_ENTRY_DNS_NAMES + 1);
    refused(
        &server,
        r,
        &format!("at most {MAX_ENTRY_DNS_NAMES} DNS names"),
    )
    .await;
    let mut r = at_caps();
    r.hint.push('a');
    refused(&server, r, &format!("at most {MAX_HINT_CHARS} characters")).await;
    let mut r = at_caps();
    r.selectors = selectors(MAX_ENTRY_SELECTORS + 1);
    refused(
        &server,
        r,
        &format!("at most {MAX_ENTRY_SELECTORS} selectors"),
    )
    .await;
    // The sizes the issue reported: 10,000 scopes, 2,000 DNS names, 2,000 selectors.
    let mut r = entry_request(&parent);
    r.scopes = (0..10_000).map(|i| format!("s{i}:read")).collect();
    refused(&server, r, "at most 64 scopes").await;
    let mut r = entry_request(&parent);
    r.dns_names = (0..2_000).map(|i| format!("h{i}.example.com")).collect();
    refused(&server, r, "DNS names").await;
    let mut r = entry_request(&parent);
    r.selectors = (0..2_000).map(|i| format!("unix:gid:{i}")).collect();
    refused(&server, r, "selectors").await;
    assert!(server.entries().await.is_empty());

    // At every cap at once: stored...
    let entry = server.create_entry(at_caps()).await.expect("at the caps");
    assert_eq!(entry.scopes.len(), MAX_ENTRY_SCOPES);
    assert_eq!(entry.dns_names.len(), MAX_ENTRY_DNS_NAMES);
    assert_eq!(entry.selectors.len(), MAX_ENTRY_SELECTORS);
    assert_eq!(entry.hint.chars().count(), MAX_HINT_CHARS);

    // ...synced to its agent (the agent's client decodes at most MAX_NODE_MESSAGE), taking at
    // most half the message, so it syncs beside the bundle and other entries...
    let listed = agent
        .node
        .list_entries(node_pb::ListEntriesRequest {
            known_revision: 0,
            ..Default::default()
        })
        .await
        .expect("the agent syncs an entry at every cap")
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    let wire = listed.entries[0].encoded_len();
    println!(
        "an entry at every cap is {wire} bytes on the wire (limit {MAX_NODE_MESSAGE}); the sync answer {}",
        listed.encoded_len()
    );
    assert!(wire <= MAX_NODE_MESSAGE / 2, "{wire} bytes");

    // ...and issued: its identity, and a task SVID holding every scope (an ID of exactly
    // 2,048 bytes) with every DNS name, within the verifier's leaf limit.
    let key = csr();
    let identity = agent
        .node
        .issue_identity(node_pb::IssueIdentityRequest {
            entry_id: entry.id.clone(),
            csr: key.csr.clone(),
        })
        .await
        .expect("identity SVID at the caps")
        .into_inner()
        .svid
        .expect("an SVID");
    server.verify(&identity.cert_chain).await;
    let scope_refs: Vec<&str> = all_scopes.iter().map(String::as_str).collect();
    let task = agent
        .node
        .issue_task(task_request(
            &entry.id,
            &key.csr,
            "all-scopes",
            &scope_refs,
            60,
        ))
        .await
        .expect("task SVID with every scope at the caps")
        .into_inner()
        .svid
        .expect("an SVID");
    assert_eq!(task.spiffe_id.len(), MAX_SPIFFE_ID_LEN);
    let leaf = task.cert_chain[0].len();
    println!("the leaf at every cap is {leaf} bytes (limit {MAX_LEAF_LEN})");
    assert!(leaf <= MAX_LEAF_LEN, "{leaf} bytes");
    let verified = server.verify(&task.cert_chain).await;
    assert_eq!(verified.id.scopes().len(), MAX_ENTRY_SCOPES);

    // The budget the DNS cap is derived from holds: the same leaf without DNS names.
    let mut r = at_caps();
    r.spiffe_id = id_for_total(MAX_SPIFFE_ID_LEN, &all_scopes).replace("big-", "bag-");
    r.dns_names.clear();
    let bare = server.create_entry(r).await.expect("no DNS names");
    let bare_task = agent
        .node
        .issue_task(task_request(&bare.id, &key.csr, "bare", &scope_refs, 60))
        .await
        .expect("task SVID without DNS names")
        .into_inner()
        .svid
        .expect("an SVID");
    let bare_leaf = bare_task.cert_chain[0].len();
    println!("without DNS names: {bare_leaf} bytes (budget {LEAF_BYTES_WITHOUT_DNS})");
    assert!(bare_leaf <= LEAF_BYTES_WITHOUT_DNS);
    server.stop().await;
}

/// A forged line and terminal escapes, as a workload or an unauthenticated caller would send
/// them, long enough to be cut.
fn forged(tail_len: usize) -> String {
    format!(
        "x\n#9999 1700000000000 token.create allow operator\r\u{1b}[8m\u{202e}{}",
        "z".repeat(tail_len)
    )
}

fn assert_escaped_and_bounded(field: &str, value: &str) {
    assert!(
        !value.chars().any(char::is_control),
        "{field} holds a control character: {value:?}"
    );
    assert!(
        !value.contains('\u{202e}'),
        "{field} holds a bidi override: {value:?}"
    );
    assert!(
        value
            .starts_with("x\\n#9999 1700000000000 token.create allow operator\\r\\x1b[8m\\u{202e}"),
        "{field} is escaped: {value:?}"
    );
    let kept = value.split('…').next().unwrap_or_default();
    assert!(
        kept.chars().count() <= MAX_UNTRUSTED_CHARS,
        "{field} keeps {} characters",
        kept.chars().count()
    );
    assert!(
        value.ends_with(" chars)"),
        "{field} says it was cut: {value:?}"
    );
}

#[tokio::test]
async fn refused_attestor_names_and_task_ids_are_audited_escaped_and_bounded() {
    let server = TestServer::start().await;
    let mut agent = server.attest().await;
    let entry = server
        .create_entry(entry_request(agent.spiffe_id.as_str()))
        .await
        .expect("entry");
    let key = csr();

    // An unauthenticated caller of Attest names a forged attestor.
    let mark = server.audit_mark().await;
    let mut anonymous = server.node_client(None).await;
    let status = expect_code(
        anonymous
            .attest(node_pb::AttestRequest {
                attestor: forged(5000),
                evidence: b"whatever".to_vec(),
                csr: key.csr.clone(),
            })
            .await,
        Code::InvalidArgument,
    );
    assert!(!status.message().chars().any(char::is_control));
    let record = server
        .assert_one_denial(mark, "agent.attest", "unknown node attestor")
        .await;
    assert_escaped_and_bounded("attestor", &record.attestor);
    assert!(
        !record.reason.chars().any(char::is_control),
        "{:?}",
        record.reason
    );
    assert!(record.reason.contains("x\\n#9999"), "{:?}", record.reason);

    // A workload mints with a forged task ID (and a forged scope).
    let mark = server.audit_mark().await;
    let mut request = task_request(&entry.id, &key.csr, "t", &["stripe:read:customers"], 60);
    request.task_id = forged(5000);
    expect_code(agent.node.issue_task(request).await, Code::InvalidArgument);
    let record = server
        .assert_one_denial(mark, "svid.task", "a task ID is 1 to 128 characters")
        .await;
    assert_escaped_and_bounded("task ID", &record.task_id);

    let mark = server.audit_mark().await;
    let mut request = task_request(&entry.id, &key.csr, "scoped", &[], 60);
    request.scopes = vec![forged(5000)];
    expect_code(agent.node.issue_task(request).await, Code::InvalidArgument);
    let record = server
        .assert_one_denial(mark, "svid.task", "is not a valid scope")
        .await;
    assert_eq!(record.scopes.len(), 1);
    assert_escaped_and_bounded("scope", &record.scopes[0]);
    assert!(
        !record.reason.chars().any(char::is_control),
        "{:?}",
        record.reason
    );

    // Control: valid values are recorded as they are, and the chain verifies.
    let mark = server.audit_mark().await;
    agent
        .node
        .issue_task(task_request(
            &entry.id,
            &key.csr,
            "task-42.a_b:c",
            &["stripe:read:customers"],
            60,
        ))
        .await
        .expect("a valid task");
    let records = server.audit_after(mark).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].task_id, "task-42.a_b:c");
    assert_eq!(records[0].scopes, vec!["stripe:read:customers"]);
    assert!(server.verify_audit().await.ok);
    server.stop().await;
}

#[test]
fn the_cli_refuses_ip_literals_and_short_ttls_with_one_sentence() {
    let cluster = Cluster::start();
    let create = |extra: &[&str]| {
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://mayfly.local/agents/cli-bot",
            "--parent-id",
            &cluster.agent_id,
            "--selector",
            "unix:uid:1001",
        ];
        args.extend_from_slice(extra);
        cluster.mayfly(&args)
    };
    for (extra, reason) in [
        (
            &["--dns", "127.0.0.1"][..],
            "'127.0.0.1' is an IP address, not a DNS name",
        ),
        (
            &["--ttl", "1s"][..],
            "the agent renews an SVID at half its lifetime",
        ),
    ] {
        let out = create(extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(stderr.contains(reason), "{extra:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one sentence: {stderr}");
    }
    let listed = cluster.ok(&["entry", "list", "--output", "json"]);
    let entries: serde_json::Value = serde_json::from_str(&listed).expect("json");
    assert_eq!(entries.as_array().map(Vec::len), Some(0), "nothing stored");
    // Control: the corrected request is stored.
    let out = create(&["--dns", "localhost", "--ttl", "30s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

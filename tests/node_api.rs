//! The node API end to end, over real sockets: the real server in-process on 127.0.0.1:0 with
//! a real SQLite file (and, where named `*_postgres`, PostgreSQL from
//! `MAYFLY_TEST_POSTGRES_URL` in a fresh schema). Operators use the admin client on the admin
//! socket; agents attest with join tokens and then call over mTLS with their agent SVID.
//!
//! Every refusal is checked three ways: the gRPC code, the audit record (decision `deny` and
//! the reason), and that no certificate came back. Every negative test has its positive
//! control on the same fixture.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use common::{
    Engine, TestServer, csr, entry_request, expect_code, now_secs, random_hex, task_request,
};
use futures::StreamExt;
use mayfly::client::{AttestError, AttestedAgent};
use mayfly::proto::admin as admin_pb;
use mayfly::proto::node::{self as node_pb, node_client::NodeClient};
use mayfly::svid::KeyAndCsr;
use mayfly::wire::RefusalKind;
use rustls_pki_types::CertificateDer;
use tonic::Code;
use tonic::transport::Channel;

const READ: &str = "stripe:read:customers";
const WRITE: &str = "stripe:write:refunds";

/// A server, one agent, and one entry of that agent (the [`entry_request`] defaults).
async fn agent_with_entry(server: &TestServer) -> (AttestedAgent, admin_pb::Entry) {
    let agent = server.attest().await;
    let entry = server
        .create_entry(entry_request(agent.spiffe_id.as_str()))
        .await
        .expect("create entry");
    (agent, entry)
}

/// A valid task SVID request for `entry` must succeed (the positive control after refusals).
async fn assert_task_issued(
    node: &mut NodeClient<Channel>,
    entry: &admin_pb::Entry,
    csr: &[u8],
) -> node_pb::Svid {
    node.issue_task(task_request(&entry.id, csr, "control", &[READ], 60))
        .await
        .expect("a valid IssueTask succeeds")
        .into_inner()
        .svid
        .expect("an SVID")
}

// ---------------------------------------------------------------------------------------------
// 1. Happy path

async fn happy_path(engine: Engine) {
    let Some(server) = TestServer::on(engine).await else {
        return;
    };
    // Token → attest → the agent SVID is the ID the token promised.
    let token = server.join_token().await;
    assert!(
        token
            .agent_id
            .starts_with("spiffe://mayfly.local/mayfly/agent/join_token/"),
        "{}",
        token.agent_id
    );
    let mut agent = server.attest_with(&token.token).await.expect("attest");
    assert_eq!(agent.spiffe_id.as_str(), token.agent_id);
    let agent_svid = server
        .verify(&agent.chain.iter().map(|c| c.to_vec()).collect::<Vec<_>>())
        .await;
    assert_eq!(agent_svid.id.spiffe_id().as_str(), token.agent_id);
    assert!(agent_svid.id.scopes().is_empty());

    // The operator registers a workload under the agent.
    let created = server
        .create_entry(entry_request(&token.agent_id))
        .await
        .expect("create entry");
    assert_eq!(created.parent_id, token.agent_id);
    assert_eq!(created.ttl_seconds, 300);

    // ListEntries returns it; with that revision the answer is `unchanged`.
    let listed = agent
        .node
        .list_entries(node_pb::ListEntriesRequest {
            known_revision: 0,
            ..Default::default()
        })
        .await
        .expect("ListEntries")
        .into_inner();
    assert!(!listed.unchanged);
    assert!(listed.revision > 0);
    assert!(!listed.bundle.is_empty());
    assert_eq!(listed.entries.len(), 1);
    let entry = &listed.entries[0];
    assert_eq!(entry.id, created.id);
    assert_eq!(entry.spiffe_id, created.spiffe_id);
    assert_eq!(entry.selectors, vec!["unix:uid:1001".to_string()]);
    assert_eq!(entry.scopes, vec![READ.to_string(), WRITE.to_string()]);
    assert_eq!(entry.ttl_seconds, 300);
    let again = agent
        .node
        .list_entries(node_pb::ListEntriesRequest {
            known_revision: listed.revision,
            ..Default::default()
        })
        .await
        .expect("ListEntries")
        .into_inner();
    assert!(again.unchanged);
    assert_eq!(again.revision, listed.revision);
    assert!(again.entries.is_empty());

    // IssueIdentity: the entry's ID, no scopes, chained to the bundle.
    let key = csr();
    let identity = agent
        .node
        .issue_identity(node_pb::IssueIdentityRequest {
            entry_id: created.id.clone(),
            csr: key.csr.clone(),
        })
        .await
        .expect("IssueIdentity")
        .into_inner()
        .svid
        .expect("an SVID");
    assert_eq!(identity.spiffe_id, created.spiffe_id);
    let verified = server.verify(&identity.cert_chain).await;
    assert_eq!(verified.id.spiffe_id().as_str(), created.spiffe_id);
    assert!(verified.id.scopes().is_empty());
    assert_eq!(verified.serial.to_hex(), identity.serial);
    let now = now_secs();
    assert!(
        (now + 298..=now + 300).contains(&identity.not_after),
        "an identity SVID lives the entry's TTL (300 s): notAfter {} at {now}",
        identity.not_after
    );

    // IssueTask: exactly the scope asked for, for 60 s.
    let before = now_secs();
    let task_id = format!("task-{}", &random_hex()[..8]);
    let task = agent
        .node
        .issue_task(task_request(&created.id, &key.csr, &task_id, &[READ], 60))
        .await
        .expect("IssueTask")
        .into_inner()
        .svid
        .expect("an SVID");
    let after = now_secs();
    let expected_id = format!("{}/scope/stripe.read.customers", created.spiffe_id);
    assert_eq!(task.spiffe_id, expected_id);
    assert!(
        task.not_after >= before + 60 && task.not_after <= after + 60,
        "notAfter {} should be now+60 (now {before}..{after})",
        task.not_after
    );
    let verified = server.verify(&task.cert_chain).await;
    assert_eq!(verified.id.to_string(), expected_id);
    assert_eq!(verified.serial.to_hex(), task.serial);
    assert_eq!(
        verified
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64,
        task.not_after
    );

    // The audit log has the allow record with everything in it.
    let records = server.audit_of_task(&task_id).await;
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    assert_eq!(r.action, "svid.task");
    assert_eq!(r.decision, "allow");
    assert_eq!(r.task_id, task_id);
    assert_eq!(r.scopes, vec![READ.to_string()]);
    assert_eq!(r.serial, task.serial);
    assert_eq!(r.not_after, task.not_after);
    assert_eq!(r.agent_id, token.agent_id);
    assert_eq!(r.attestor, "join_token");
    assert_eq!(r.entry_id, created.id);
    assert_eq!(r.spiffe_id, expected_id);
    // The attestation and the identity issuance are on record too.
    let all = server.audit().await;
    assert!(all.iter().any(|r| r.action == "agent.attest"
        && r.decision == "allow"
        && r.spiffe_id == token.agent_id
        && r.serial == agent_svid.serial.to_hex()));
    assert!(all.iter().any(|r| r.action == "svid.identity"
        && r.decision == "allow"
        && r.serial == identity.serial
        && r.scopes.is_empty()));
    assert!(server.verify_audit().await.ok);
    server.stop().await;
}

#[tokio::test]
async fn happy_path_sqlite() {
    happy_path(Engine::Sqlite).await;
}

#[tokio::test]
async fn happy_path_postgres() {
    happy_path(Engine::Postgres).await;
}

// ---------------------------------------------------------------------------------------------
// 2. An agent may only get its own entries

#[tokio::test]
async fn agent_gets_only_its_own_entries() {
    let server = TestServer::start().await;
    let (mut a, entry_a) = agent_with_entry(&server).await;
    let mut b = server.attest().await;
    let key = csr();

    // Control: A gets its entry.
    assert_task_issued(&mut a.node, &entry_a, &key.csr).await;
    a.node
        .issue_identity(node_pb::IssueIdentityRequest {
            entry_id: entry_a.id.clone(),
            csr: key.csr.clone(),
        })
        .await
        .expect("A gets its identity SVID");

    // B does not see it, and cannot have it.
    let listed = b
        .node
        .list_entries(node_pb::ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty());

    let mark = server.audit_mark().await;
    expect_code(
        b.node
            .issue_task(task_request(&entry_a.id, &key.csr, "steal", &[READ], 60))
            .await,
        Code::PermissionDenied,
    );
    let r = server
        .assert_one_denial(mark, "svid.task", "is not registered to this agent")
        .await;
    assert_eq!(r.agent_id, b.spiffe_id.as_str());
    assert_eq!(r.task_id, "steal");

    let mark = server.audit_mark().await;
    expect_code(
        b.node
            .issue_identity(node_pb::IssueIdentityRequest {
                entry_id: entry_a.id.clone(),
                csr: key.csr.clone(),
            })
            .await,
        Code::PermissionDenied,
    );
    server
        .assert_one_denial(mark, "svid.identity", "is not registered to this agent")
        .await;

    // An unknown entry is refused the same way (no probing for other agents' entries).
    let mark = server.audit_mark().await;
    let unknown = expect_code(
        b.node
            .issue_task(task_request(&random_hex(), &key.csr, "probe", &[READ], 60))
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(
        RefusalKind::of(&unknown),
        Some(RefusalKind::EntryNotAuthorized)
    );
    server
        .assert_one_denial(mark, "svid.task", "is not registered to this agent")
        .await;

    // A still gets it afterwards; once the operator deletes the entry, not even A does.
    assert_task_issued(&mut a.node, &entry_a, &key.csr).await;
    server
        .admin()
        .delete_entry(admin_pb::EntryIdRequest {
            id: entry_a.id.clone(),
        })
        .await
        .expect("DeleteEntry");
    let mark = server.audit_mark().await;
    expect_code(
        a.node
            .issue_task(task_request(&entry_a.id, &key.csr, "deleted", &[READ], 60))
            .await,
        Code::PermissionDenied,
    );
    server
        .assert_one_denial(mark, "svid.task", "is not registered to this agent")
        .await;
    server.stop().await;
}

#[tokio::test]
async fn workload_svids_cannot_act_as_agents() {
    let server = TestServer::start().await;
    let (mut agent, entry) = agent_with_entry(&server).await;
    let key = csr();

    // Control: the agent's own SVID works.
    assert_task_issued(&mut agent.node, &entry, &key.csr).await;

    // A workload's identity SVID and task SVID are valid SVIDs of the trust domain, but
    // neither is an agent: the node API's TLS policy admits agent IDs only, so the handshake
    // refuses them and no call reaches a handler (nothing audited, nothing issued). Whether the
    // client sees it at connect or at its first call depends on timing (TLS 1.3 sends the
    // client certificate last).
    let identity = agent
        .node
        .issue_identity(node_pb::IssueIdentityRequest {
            entry_id: entry.id.clone(),
            csr: key.csr.clone(),
        })
        .await
        .expect("IssueIdentity")
        .into_inner()
        .svid
        .unwrap();
    let task = assert_task_issued(&mut agent.node, &entry, &key.csr).await;
    for svid in [identity, task] {
        let chain: Vec<CertificateDer<'static>> = svid
            .cert_chain
            .iter()
            .cloned()
            .map(CertificateDer::from)
            .collect();
        let mark = server.audit_mark().await;
        match server.try_connect_as(&chain, &key.key_pkcs8).await {
            Err(e) => println!("{}: refused at connect: {e}", svid.spiffe_id),
            Ok(mut impostor) => {
                let listed = impostor
                    .list_entries(node_pb::ListEntriesRequest::default())
                    .await;
                assert!(
                    listed.is_err(),
                    "a workload SVID listed entries: {listed:?}"
                );
                let issued = impostor
                    .issue_task(task_request(&entry.id, &key.csr, "impostor", &[READ], 60))
                    .await;
                assert!(issued.is_err(), "a workload SVID got {issued:?}");
                let renewed = impostor
                    .renew_agent(node_pb::RenewAgentRequest { csr: csr().csr })
                    .await;
                assert!(renewed.is_err(), "a workload SVID renewed: {renewed:?}");
            }
        }
        let after = server.audit_after(mark).await;
        assert!(after.is_empty(), "the handshake must refuse it: {after:#?}");
    }
    // The agent's own connection still works after the refusals.
    assert_task_issued(&mut agent.node, &entry, &key.csr).await;
    server.stop().await;
}

/// The node API's TLS lets a client without a certificate through (it must be able to
/// attest), and then every call but Attest is refused as unauthenticated, from the peer the
/// handshake recorded, and audited.
#[tokio::test]
async fn a_connection_without_a_certificate_may_only_attest() {
    let server = TestServer::start().await;
    let (mut agent, entry) = agent_with_entry(&server).await;
    let key = csr();
    // Control: the same calls over the agent's mTLS connection succeed.
    agent
        .node
        .list_entries(node_pb::ListEntriesRequest::default())
        .await
        .expect("ListEntries with the agent SVID");
    assert_task_issued(&mut agent.node, &entry, &key.csr).await;

    let mut anonymous = server.node_client(None).await;
    let status = expect_code(
        anonymous
            .list_entries(node_pb::ListEntriesRequest::default())
            .await,
        Code::Unauthenticated,
    );
    assert_eq!(
        RefusalKind::of(&status),
        Some(RefusalKind::NotAuthenticated),
        "{status:?}"
    );
    let mark = server.audit_mark().await;
    expect_code(
        anonymous
            .renew_agent(node_pb::RenewAgentRequest {
                csr: key.csr.clone(),
            })
            .await,
        Code::Unauthenticated,
    );
    server
        .assert_one_denial(mark, "agent.renew", "needs mTLS with an agent SVID")
        .await;
    // The same connection can attest: the handshake itself was accepted.
    let token = server.join_token().await;
    anonymous
        .attest(node_pb::AttestRequest {
            attestor: "join_token".into(),
            evidence: token.token.into_bytes(),
            csr: key.csr.clone(),
        })
        .await
        .expect("Attest without a client certificate");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Scopes, TTLs and task IDs

#[tokio::test]
async fn task_request_limits() {
    let server = TestServer::start().await;
    let (mut agent, entry) = agent_with_entry(&server).await;
    let key = csr();
    let node = &mut agent.node;

    // Controls: a subset, the full set, the ceiling itself.
    let both = node
        .issue_task(task_request(
            &entry.id,
            &key.csr,
            "t-both",
            &[WRITE, READ],
            300,
        ))
        .await
        .expect("both scopes at the ceiling")
        .into_inner()
        .svid
        .unwrap();
    assert!(
        both.spiffe_id
            .ends_with("/scope/stripe.read.customers/stripe.write.refunds"),
        "{}",
        both.spiffe_id
    );
    assert_task_issued(node, &entry, &key.csr).await;

    // A scope the entry does not grant.
    let mark = server.audit_mark().await;
    let status = expect_code(
        node.issue_task(task_request(
            &entry.id,
            &key.csr,
            "t-superset",
            &[READ, "stripe:delete:customers"],
            60,
        ))
        .await,
        Code::PermissionDenied,
    );
    assert_eq!(RefusalKind::of(&status), Some(RefusalKind::ScopeNotGranted));
    assert!(status.message().contains("stripe:delete:customers"));
    let r = server
        .assert_one_denial(
            mark,
            "svid.task",
            "scope stripe:delete:customers is not granted",
        )
        .await;
    assert_eq!(r.task_id, "t-superset");
    assert_eq!(r.entry_id, entry.id);

    // No scopes at all.
    let mark = server.audit_mark().await;
    expect_code(
        node.issue_task(task_request(&entry.id, &key.csr, "t-empty", &[], 60))
            .await,
        Code::InvalidArgument,
    );
    server
        .assert_one_denial(mark, "svid.task", "needs at least one scope")
        .await;

    // A malformed scope.
    let mark = server.audit_mark().await;
    expect_code(
        node.issue_task(task_request(
            &entry.id,
            &key.csr,
            "t-bad-scope",
            &["Stripe Read"],
            60,
        ))
        .await,
        Code::InvalidArgument,
    );
    server.assert_one_denial(mark, "svid.task", "").await;

    // Above the entry's ceiling.
    let mark = server.audit_mark().await;
    expect_code(
        node.issue_task(task_request(&entry.id, &key.csr, "t-long", &[READ], 301))
            .await,
        Code::PermissionDenied,
    );
    server
        .assert_one_denial(mark, "svid.task", "above entry")
        .await;

    // TTL 0: the default, min(300 s, ceiling), on this entry (300) and on a 120 s one.
    let t0 = now_secs();
    let default = node
        .issue_task(task_request(&entry.id, &key.csr, "t-default", &[READ], 0))
        .await
        .expect("TTL 0 takes the default")
        .into_inner()
        .svid
        .unwrap();
    assert!((t0 + 300..=now_secs() + 300).contains(&default.not_after));
    let mut short = entry_request(agent.spiffe_id.as_str());
    short.ttl_seconds = 120;
    let short = server.create_entry(short).await.expect("create entry");
    let t0 = now_secs();
    let cut = node
        .issue_task(task_request(
            &short.id,
            &key.csr,
            "t-default-cut",
            &[READ],
            0,
        ))
        .await
        .expect("TTL 0 on a 120 s entry")
        .into_inner()
        .svid
        .unwrap();
    assert!((t0 + 120..=now_secs() + 120).contains(&cut.not_after));
    let mark = server.audit_mark().await;
    expect_code(
        node.issue_task(task_request(
            &short.id,
            &key.csr,
            "t-cut-long",
            &[READ],
            121,
        ))
        .await,
        Code::PermissionDenied,
    );
    server
        .assert_one_denial(mark, "svid.task", "ceiling of 120s")
        .await;

    // Malformed and empty task IDs; the record names what was asked.
    for bad in ["task with spaces", "t/../x", "tâche", &"x".repeat(129)] {
        let mark = server.audit_mark().await;
        expect_code(
            node.issue_task(task_request(&entry.id, &key.csr, bad, &[READ], 60))
                .await,
            Code::InvalidArgument,
        );
        let r = server
            .assert_one_denial(mark, "svid.task", "a task ID is 1 to 128 characters")
            .await;
        // Recorded escaped and bounded (these need no escape, and are under the bound).
        let named = mayfly::audit::untrusted(bad);
        assert_eq!(r.task_id, named);
        assert_eq!(server.audit_of_task(&named).await.len(), 1);
    }
    let mark = server.audit_mark().await;
    expect_code(
        node.issue_task(task_request(&entry.id, &key.csr, "", &[READ], 60))
            .await,
        Code::InvalidArgument,
    );
    let r = server
        .assert_one_denial(mark, "svid.task", "a task ID is 1 to 128 characters")
        .await;
    assert_eq!(r.task_id, "");
    assert_eq!(r.scopes, vec![READ.to_string()]);

    // Still serving.
    assert_task_issued(node, &entry, &key.csr).await;
    assert!(server.verify_audit().await.ok);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Banned agent

#[tokio::test]
async fn banned_agent_is_refused_at_its_next_call() {
    let server = TestServer::start().await;
    let (mut agent, entry) = agent_with_entry(&server).await;
    let (mut other, other_entry) = agent_with_entry(&server).await;
    let key = csr();

    // Control: before the ban it works.
    assert_task_issued(&mut agent.node, &entry, &key.csr).await;
    agent
        .node
        .list_entries(node_pb::ListEntriesRequest::default())
        .await
        .expect("ListEntries before the ban");

    let banned = server
        .admin()
        .ban_agent(admin_pb::AgentIdRequest {
            spiffe_id: agent.spiffe_id.to_string(),
        })
        .await
        .expect("BanAgent")
        .into_inner();
    assert!(banned.banned);

    // The same connection, at its next call.
    let mark = server.audit_mark().await;
    let status = expect_code(
        agent
            .node
            .issue_task(task_request(&entry.id, &key.csr, "after-ban", &[READ], 60))
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(RefusalKind::of(&status), Some(RefusalKind::Banned));
    server
        .assert_one_denial(mark, "svid.task", "is banned")
        .await;
    // ListEntries refusals are returned, not audited (a polling banned agent would flood the
    // log): nothing is written.
    let mark = server.audit_mark().await;
    let status = expect_code(
        agent
            .node
            .list_entries(node_pb::ListEntriesRequest::default())
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(RefusalKind::of(&status), Some(RefusalKind::Banned));
    assert!(server.audit_after(mark).await.is_empty());

    // A new connection, and renewal, are refused too.
    let mut fresh = server.connect_as(&agent.chain, &agent.key_pkcs8).await;
    expect_code(
        fresh
            .issue_identity(node_pb::IssueIdentityRequest {
                entry_id: entry.id.clone(),
                csr: key.csr.clone(),
            })
            .await,
        Code::PermissionDenied,
    );
    let mark = server.audit_mark().await;
    expect_code(
        fresh
            .renew_agent(node_pb::RenewAgentRequest { csr: csr().csr })
            .await,
        Code::PermissionDenied,
    );
    server
        .assert_one_denial(mark, "agent.renew", "is banned")
        .await;

    // Other agents are unaffected.
    assert_task_issued(&mut other.node, &other_entry, &key.csr).await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Evicted agent

#[tokio::test]
async fn evicted_agent_must_attest_again() {
    let server = TestServer::start().await;
    let (mut agent, entry) = agent_with_entry(&server).await;
    let key = csr();
    assert_task_issued(&mut agent.node, &entry, &key.csr).await;

    server
        .admin()
        .evict_agent(admin_pb::AgentIdRequest {
            spiffe_id: agent.spiffe_id.to_string(),
        })
        .await
        .expect("EvictAgent");
    let agents = server
        .admin()
        .list_agents(admin_pb::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert!(
        agents
            .iter()
            .all(|a| a.spiffe_id != agent.spiffe_id.as_str())
    );

    let mark = server.audit_mark().await;
    let status = expect_code(
        agent
            .node
            .issue_task(task_request(
                &entry.id,
                &key.csr,
                "after-evict",
                &[READ],
                60,
            ))
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(RefusalKind::of(&status), Some(RefusalKind::UnknownAgent));
    server
        .assert_one_denial(mark, "svid.task", "is unknown to the server")
        .await;
    expect_code(
        agent
            .node
            .list_entries(node_pb::ListEntriesRequest::default())
            .await,
        Code::PermissionDenied,
    );

    // A new token lets the node attest again (a new agent identity); the operator re-parents
    // the workload and issuance works.
    let mut again = server.attest().await;
    assert_ne!(again.spiffe_id, agent.spiffe_id);
    let entry2 = server
        .create_entry(entry_request(again.spiffe_id.as_str()))
        .await
        .unwrap();
    assert_task_issued(&mut again.node, &entry2, &key.csr).await;
    // The evicted SVID stays refused.
    expect_code(
        agent
            .node
            .issue_task(task_request(
                &entry.id,
                &key.csr,
                "still-evicted",
                &[READ],
                60,
            ))
            .await,
        Code::PermissionDenied,
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Superseded and expired agent SVIDs

#[tokio::test]
async fn superseded_agent_svid_is_refused_after_the_new_one_is_used() {
    let server = TestServer::start().await;
    let (mut agent, entry) = agent_with_entry(&server).await;
    let key = csr();

    let renewal = csr();
    let renewed = agent
        .node
        .renew_agent(node_pb::RenewAgentRequest {
            csr: renewal.csr.clone(),
        })
        .await
        .expect("RenewAgent")
        .into_inner();
    let new_svid = renewed.svid.expect("an SVID");
    assert_eq!(new_svid.spiffe_id, agent.spiffe_id.as_str());
    let old_serial = server
        .verify(&agent.chain.iter().map(|c| c.to_vec()).collect::<Vec<_>>())
        .await
        .serial
        .to_hex();
    assert_ne!(new_svid.serial, old_serial);
    assert_eq!(
        server.verify(&new_svid.cert_chain).await.serial.to_hex(),
        new_svid.serial
    );

    // Until the new SVID is used, the old one still works (the agent may not have it yet).
    assert_task_issued(&mut agent.node, &entry, &key.csr).await;

    // The new SVID works, and its first use promotes it.
    let new_chain: Vec<CertificateDer<'static>> = new_svid
        .cert_chain
        .iter()
        .cloned()
        .map(CertificateDer::from)
        .collect();
    let mut renewed_node = server.connect_as(&new_chain, &renewal.key_pkcs8).await;
    assert_task_issued(&mut renewed_node, &entry, &key.csr).await;
    let record = server
        .admin()
        .list_agents(admin_pb::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents
        .into_iter()
        .find(|a| a.spiffe_id == agent.spiffe_id.as_str())
        .expect("the agent");
    assert_eq!(record.current_serial, new_svid.serial);
    assert!(record.next_serial.is_empty());

    // The old SVID is now refused: on its existing connection and on a new one.
    let mark = server.audit_mark().await;
    let status = expect_code(
        agent
            .node
            .issue_task(task_request(&entry.id, &key.csr, "old-conn", &[READ], 60))
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(RefusalKind::of(&status), Some(RefusalKind::SupersededSvid));
    server
        .assert_one_denial(mark, "svid.task", "superseded")
        .await;
    let mut old_node = server.connect_as(&agent.chain, &agent.key_pkcs8).await;
    let mark = server.audit_mark().await;
    expect_code(
        old_node
            .issue_task(task_request(
                &entry.id,
                &key.csr,
                "old-new-conn",
                &[READ],
                60,
            ))
            .await,
        Code::PermissionDenied,
    );
    server
        .assert_one_denial(mark, "svid.task", "superseded")
        .await;
    // Nor may the old SVID renew again.
    let mark = server.audit_mark().await;
    expect_code(
        old_node
            .renew_agent(node_pb::RenewAgentRequest { csr: csr().csr })
            .await,
        Code::PermissionDenied,
    );
    server
        .assert_one_denial(mark, "agent.renew", "superseded")
        .await;

    // The new one keeps working.
    assert_task_issued(&mut renewed_node, &entry, &key.csr).await;
    server.stop().await;
}

#[tokio::test]
async fn expired_agent_svid_is_refused() {
    let Some(server) = TestServer::start_with(Engine::Sqlite, |c| {
        c.agent_ttl = Duration::from_secs(2);
    })
    .await
    else {
        unreachable!("SQLite needs no environment");
    };
    // The entry is registered before attesting (the token names the agent's ID), so the
    // control call runs right after attestation, well inside the SVID's 1 to 2 s of life.
    let token = server.join_token().await;
    let entry = server
        .create_entry(entry_request(&token.agent_id))
        .await
        .expect("create entry");
    let key = csr();
    let mut agent = server.attest_with(&token.token).await.expect("attest");

    // Control: while valid, it works.
    assert_task_issued(&mut agent.node, &entry, &key.csr).await;
    let not_after = server
        .verify(&agent.chain.iter().map(|c| c.to_vec()).collect::<Vec<_>>())
        .await
        .not_after;
    assert!(not_after <= SystemTime::now() + Duration::from_secs(2));

    // Wait until the SVID has expired (webpki compares whole seconds).
    let expired_at = not_after + Duration::from_secs(1);
    if let Ok(wait) = expired_at.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait + Duration::from_millis(100)).await;
    }

    // The long-lived connection is refused at its next call, and audited.
    let mark = server.audit_mark().await;
    let status = expect_code(
        agent
            .node
            .issue_task(task_request(
                &entry.id,
                &key.csr,
                "expired-conn",
                &[READ],
                60,
            ))
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(RefusalKind::of(&status), Some(RefusalKind::ExpiredSvid));
    server
        .assert_one_denial(mark, "svid.task", "expired SVID")
        .await;

    // A new connection with the expired SVID fails: the server's verifier refuses the
    // certificate in the TLS handshake, so the call never reaches a handler (no audit record)
    // and nothing is issued. Whether the client sees it at connect or at its first call
    // depends on timing (TLS 1.3 sends the client certificate last).
    let mark = server.audit_mark().await;
    match server.try_connect_as(&agent.chain, &agent.key_pkcs8).await {
        Err(e) => println!("refused at connect: {e}"),
        Ok(mut node) => {
            let result = node
                .issue_task(task_request(
                    &entry.id,
                    &key.csr,
                    "expired-new",
                    &[READ],
                    60,
                ))
                .await;
            match result {
                Ok(answer) => panic!("an expired agent SVID got {answer:?}"),
                Err(status) => println!("refused at the first call: {status:?}"),
            }
        }
    }
    let after = server.audit_after(mark).await;
    assert!(after.is_empty(), "the handshake must refuse it: {after:#?}");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Join tokens are single-use

#[tokio::test]
async fn reused_join_token_is_refused() {
    let server = TestServer::start().await;
    let token = server.join_token().await;
    let mark = server.audit_mark().await;
    let agent = server.attest_with(&token.token).await.expect("first use");
    assert_eq!(agent.spiffe_id.as_str(), token.agent_id);
    let records = server.audit_after(mark).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].decision, "allow");

    let mark = server.audit_mark().await;
    match server.attest_with(&token.token).await {
        Err(AttestError::Refused(status)) => {
            assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        }
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("a join token was used twice"),
    }
    let r = server
        .assert_one_denial(mark, "agent.attest", "already used")
        .await;
    assert_eq!(r.agent_id, token.agent_id);

    // A malformed token is InvalidArgument, and does not spend anything.
    let mark = server.audit_mark().await;
    match server.attest_with("not-a-token").await {
        Err(AttestError::Refused(status)) => {
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}")
        }
        other => panic!("expected a refusal, got {:?}", other.err()),
    }
    server
        .assert_one_denial(mark, "agent.attest", "64 hexadecimal digits")
        .await;
    server.stop().await;
}

async fn concurrent_attestations_with_one_token(engine: Engine) {
    // 50 attempts from one address: above the default bound on refused attestations per
    // source, which this test is not about (a_flood_of_bad_attestations_... is).
    let generous = |c: &mut mayfly::server::ServerConfig| {
        c.attest_limits = mayfly::server::attest_gate::AttestLimits {
            burst: 100,
            audited_each: 100,
            ..Default::default()
        };
    };
    let Some(server) = TestServer::start_with(engine, generous).await else {
        return;
    };
    let token = server.join_token().await;
    let bundles = server.bundles().await;
    let mark = server.audit_mark().await;
    let attempts = (0..50).map(|_| {
        let bundles = bundles.clone();
        let addr = server.node_addr();
        let id = server.server_id();
        let secret = token.token.clone();
        tokio::spawn(async move {
            mayfly::client::attest_with_join_token(addr, bundles, &id, &secret).await
        })
    });
    let results = futures::future::join_all(attempts).await;
    let mut won = Vec::new();
    let mut refused = 0;
    for result in results {
        match result.expect("task") {
            Ok(agent) => won.push(agent),
            Err(AttestError::Refused(status)) => {
                assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
                refused += 1;
            }
            Err(other) => panic!("unexpected failure: {other}"),
        }
    }
    assert_eq!(won.len(), 1, "exactly one attestation may succeed");
    assert_eq!(refused, 49);
    assert_eq!(won[0].spiffe_id.as_str(), token.agent_id);

    let records = server.audit_after(mark).await;
    let allows: Vec<_> = records.iter().filter(|r| r.decision == "allow").collect();
    let denies = records.iter().filter(|r| r.decision == "deny").count();
    assert_eq!(allows.len(), 1, "{records:#?}");
    assert_eq!(denies, 49);
    assert!(records.iter().all(|r| r.action == "agent.attest"));
    assert_eq!(
        server
            .admin()
            .list_agents(admin_pb::ListAgentsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .agents
            .len(),
        1
    );

    // The winner is a working agent.
    let mut winner = won.pop().unwrap();
    let entry = server
        .create_entry(entry_request(winner.spiffe_id.as_str()))
        .await
        .unwrap();
    assert_task_issued(&mut winner.node, &entry, &csr().csr).await;
    assert!(server.verify_audit().await.ok);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_attestations_with_one_token_sqlite() {
    concurrent_attestations_with_one_token(Engine::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_attestations_with_one_token_postgres() {
    concurrent_attestations_with_one_token(Engine::Postgres).await;
}

// ---------------------------------------------------------------------------------------------
// 8. Malformed input

/// A P-384 key's CSR, correctly self-signed.
fn p384_csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.serialize_request(&key).unwrap().der().to_vec()
}

#[tokio::test]
async fn malformed_requests_are_refused_and_the_server_keeps_serving() {
    let server = TestServer::start().await;
    let (mut agent, entry) = agent_with_entry(&server).await;
    let good = csr();
    assert_task_issued(&mut agent.node, &entry, &good.csr).await;

    let mut flipped = good.csr.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    let mut garbage = vec![0u8; 300];
    aws_lc_rs::rand::fill(&mut garbage).unwrap();
    garbage[0] = 0x30;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            good.csr[..good.csr.len() - 7].to_vec(),
            "not exactly one DER SEQUENCE",
        ),
        ("garbage", garbage, "CSR"),
        ("flipped signature", flipped, "signature"),
        ("P-384", p384_csr(), "another curve"),
        ("empty", Vec::new(), "CSR"),
        ("5 KiB", vec![0x30; 5 * 1024], "CSR"),
    ];
    for (name, bad_csr, reason) in cases {
        let mark = server.audit_mark().await;
        let task = format!("bad-csr-{}", name.replace(' ', "-"));
        let status = expect_code(
            agent
                .node
                .issue_task(task_request(&entry.id, &bad_csr, &task, &[READ], 60))
                .await,
            Code::InvalidArgument,
        );
        assert!(status.message().contains("CSR"), "{name}: {status:?}");
        // The caller gets the cause too, not only the outermost message.
        assert!(status.message().contains(reason), "{name}: {status:?}");
        let r = server.assert_one_denial(mark, "svid.task", reason).await;
        assert_eq!(r.task_id, task);
        // Identity SVIDs and renewals refuse it the same way.
        let mark = server.audit_mark().await;
        expect_code(
            agent
                .node
                .issue_identity(node_pb::IssueIdentityRequest {
                    entry_id: entry.id.clone(),
                    csr: bad_csr.clone(),
                })
                .await,
            Code::InvalidArgument,
        );
        server
            .assert_one_denial(mark, "svid.identity", reason)
            .await;
        let mark = server.audit_mark().await;
        expect_code(
            agent
                .node
                .renew_agent(node_pb::RenewAgentRequest { csr: bad_csr })
                .await,
            Code::InvalidArgument,
        );
        server.assert_one_denial(mark, "agent.renew", reason).await;
        assert_task_issued(&mut agent.node, &entry, &good.csr).await;
    }

    // A 16 MiB message: refused from its length prefix (64 KiB limit), quickly, as
    // InvalidArgument; the handler never runs, so there is no record.
    let mark = server.audit_mark().await;
    let mut big = agent.node.clone().max_encoding_message_size(32 << 20);
    let started = Instant::now();
    let status = expect_code(
        big.issue_task(task_request(
            &entry.id,
            &vec![0x30; 16 << 20],
            "huge",
            &[READ],
            60,
        ))
        .await,
        Code::InvalidArgument,
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "a 16 MiB request took {took:?}"
    );
    assert!(status.message().contains("64 KiB"), "{status:?}");
    assert!(server.audit_after(mark).await.is_empty());
    assert_task_issued(&mut agent.node, &entry, &good.csr).await;
    // The same on a connection that has not attested.
    let mut anonymous = server
        .node_client(None)
        .await
        .max_encoding_message_size(32 << 20);
    expect_code(
        anonymous
            .attest(node_pb::AttestRequest {
                attestor: "join_token".into(),
                evidence: vec![b'a'; 16 << 20],
                csr: good.csr.clone(),
            })
            .await,
        Code::InvalidArgument,
    );
    assert_task_issued(&mut agent.node, &entry, &good.csr).await;

    // A 10 KiB entry ID.
    let long_id = "a".repeat(10 * 1024);
    let mark = server.audit_mark().await;
    let status = expect_code(
        agent
            .node
            .issue_task(task_request(
                &long_id,
                &good.csr,
                "long-entry-id",
                &[READ],
                60,
            ))
            .await,
        Code::InvalidArgument,
    );
    assert!(
        status.message().len() < 1024,
        "the refusal echoes the input"
    );
    let r = server
        .assert_one_denial(mark, "svid.task", "entry IDs are 32 hexadecimal digits")
        .await;
    assert!(r.entry_id.is_empty());
    let mark = server.audit_mark().await;
    expect_code(
        agent
            .node
            .issue_identity(node_pb::IssueIdentityRequest {
                entry_id: long_id,
                csr: good.csr.clone(),
            })
            .await,
        Code::InvalidArgument,
    );
    server
        .assert_one_denial(mark, "svid.identity", "entry IDs are 32 hexadecimal digits")
        .await;
    // A malformed short one too.
    let mark = server.audit_mark().await;
    expect_code(
        agent
            .node
            .issue_task(task_request("XYZ", &good.csr, "bad-entry-id", &[READ], 60))
            .await,
        Code::InvalidArgument,
    );
    server
        .assert_one_denial(mark, "svid.task", "is not an entry ID")
        .await;

    // An unauthenticated connection may only attest.
    let mut anonymous = server.node_client(None).await;
    let mark = server.audit_mark().await;
    expect_code(
        anonymous
            .issue_task(task_request(&entry.id, &good.csr, "anon", &[READ], 60))
            .await,
        Code::Unauthenticated,
    );
    server
        .assert_one_denial(mark, "svid.task", "needs mTLS with an agent SVID")
        .await;

    assert_task_issued(&mut agent.node, &entry, &good.csr).await;
    assert!(server.verify_audit().await.ok);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 9. Restart

/// Issues `n` task SVIDs (one key, so only the serial tells them apart) and returns serials.
async fn issue_many(
    node: &NodeClient<Channel>,
    entry_id: &str,
    key: &KeyAndCsr,
    n: usize,
) -> Vec<String> {
    futures::stream::iter(0..n)
        .map(|i| {
            let mut node = node.clone();
            let request = task_request(entry_id, &key.csr, &format!("bulk-{i}"), &[READ], 60);
            async move {
                node.issue_task(request)
                    .await
                    .expect("IssueTask")
                    .into_inner()
                    .svid
                    .expect("an SVID")
                    .serial
            }
        })
        .buffer_unordered(32)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_entries_ca_and_audit() {
    const N: usize = 2000;
    let mut server = TestServer::start().await;
    let (agent, entry) = agent_with_entry(&server).await;
    let key = csr();
    let (td, bundle_before) = server.bundle_der().await;
    let before = issue_many(&agent.node, &entry.id, &key, N).await;
    let entries_before = server.entries().await;
    let audit_before = server.audit().await;
    let addr_before = server.node_addr();

    server.restart().await;

    // Entries, CA and audit are kept.
    assert_eq!(server.entries().await, entries_before);
    let (td_after, bundle_after) = server.bundle_der().await;
    assert_eq!(td_after, td);
    assert_eq!(bundle_after, bundle_before, "the CA must survive a restart");
    let audit_after = server.audit().await;
    assert_eq!(&audit_after[..audit_before.len()], &audit_before[..]);
    let verified = server.verify_audit().await;
    assert!(verified.ok, "{}", verified.problem);
    assert_eq!(verified.records, audit_before.len() as i64);

    // The same address: shutdown freed it. The agent's own channel reconnects there with the
    // SVID it has (the first call may see the old connection's end), and so does a new one.
    assert_eq!(server.node_addr(), addr_before);
    let mut reconnected = None;
    for _ in 0..3 {
        match agent
            .node
            .clone()
            .list_entries(node_pb::ListEntriesRequest::default())
            .await
        {
            Ok(answer) => {
                reconnected = Some(answer.into_inner());
                break;
            }
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        }
    }
    assert_eq!(
        reconnected
            .expect("the agent's channel reconnects")
            .entries
            .len(),
        1
    );
    let mut node = server.connect_as(&agent.chain, &agent.key_pkcs8).await;
    let listed = node
        .list_entries(node_pb::ListEntriesRequest::default())
        .await
        .expect("ListEntries after restart")
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    let identity = node
        .issue_identity(node_pb::IssueIdentityRequest {
            entry_id: entry.id.clone(),
            csr: key.csr.clone(),
        })
        .await
        .expect("IssueIdentity after restart")
        .into_inner()
        .svid
        .unwrap();
    server.verify(&identity.cert_chain).await;
    let after = issue_many(&node, &entry.id, &key, N).await;

    // Serials are unique across all issuances, before and after.
    let mut all: HashSet<String> = HashSet::new();
    for serial in before.iter().chain(&after).chain([&identity.serial]) {
        assert_eq!(serial.len(), 32);
        assert!(
            all.insert(serial.clone()),
            "serial {serial} was issued twice"
        );
    }
    assert_eq!(all.len(), 2 * N + 1);
    let verified = server.verify_audit().await;
    assert!(verified.ok, "{}", verified.problem);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 10. Audit verification through the admin API

#[tokio::test]
async fn audit_verify_detects_edits_and_deletions() {
    let server = TestServer::start().await;
    let (mut agent, entry) = agent_with_entry(&server).await;
    let key = csr();
    for _ in 0..5 {
        assert_task_issued(&mut agent.node, &entry, &key.csr).await;
    }
    let _ = agent
        .node
        .issue_task(task_request(&entry.id, &key.csr, "refused", &[WRITE], 7200))
        .await
        .expect_err("above the ceiling");

    // Control: the untouched log verifies.
    let records = server.audit().await;
    let verified = server.verify_audit().await;
    assert!(verified.ok, "{}", verified.problem);
    assert_eq!(verified.records, records.len() as i64);
    assert!(records.len() >= 8);
    let middle = &records[records.len() / 2];

    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(server.sqlite_path())
        .create_if_missing(false);
    let raw = sqlx::SqlitePool::connect_with(options).await.unwrap();

    // Edit one record's reason.
    sqlx::query("UPDATE audit SET reason = 'nothing to see here' WHERE seq = $1")
        .bind(middle.seq)
        .execute(&raw)
        .await
        .unwrap();
    let verified = server.verify_audit().await;
    assert!(!verified.ok);
    assert!(verified.problem.contains("altered"), "{}", verified.problem);
    assert!(verified.problem.contains(&middle.seq.to_string()));

    // Put it back: verifies again.
    sqlx::query("UPDATE audit SET reason = $1 WHERE seq = $2")
        .bind(&middle.reason)
        .bind(middle.seq)
        .execute(&raw)
        .await
        .unwrap();
    assert!(server.verify_audit().await.ok);

    // Delete a record in the middle (kept aside, to put back afterwards).
    sqlx::query("CREATE TABLE audit_saved AS SELECT * FROM audit WHERE seq = $1")
        .bind(middle.seq)
        .execute(&raw)
        .await
        .unwrap();
    sqlx::query("DELETE FROM audit WHERE seq = $1")
        .bind(middle.seq)
        .execute(&raw)
        .await
        .unwrap();
    let verified = server.verify_audit().await;
    assert!(!verified.ok);
    assert!(
        verified.problem.contains("missing") && verified.problem.contains("deleted"),
        "{}",
        verified.problem
    );

    // Put it back, then delete the newest record instead: the chain head notices.
    sqlx::query("INSERT INTO audit SELECT * FROM audit_saved")
        .execute(&raw)
        .await
        .unwrap();
    let verified = server.verify_audit().await;
    assert!(verified.ok, "restored: {}", verified.problem);
    let last = records.last().unwrap().seq;
    sqlx::query("DELETE FROM audit WHERE seq = $1")
        .bind(last)
        .execute(&raw)
        .await
        .unwrap();
    let verified = server.verify_audit().await;
    assert!(!verified.ok);
    assert!(verified.problem.contains("deleted"), "{}", verified.problem);
    raw.close().await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 11. Admin API bad input

#[tokio::test]
async fn admin_refuses_bad_entries_and_stores_nothing() {
    let server = TestServer::start().await;
    let agent = server.attest().await;
    let parent = agent.spiffe_id.to_string();
    let mark = server.audit_mark().await;

    type Edit = fn(&mut admin_pb::CreateEntryRequest);
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "malformed SPIFFE ID",
            |r| r.spiffe_id = "spiffe://mayfly.local/has space".into(),
            "path character",
        ),
        (
            "not a URI",
            |r| r.spiffe_id = "billing-bot".into(),
            "is not a SPIFFE ID",
        ),
        (
            "uppercase trust domain",
            |r| r.spiffe_id = "spiffe://Mayfly.local/x".into(),
            "trust domain",
        ),
        (
            "foreign trust domain",
            |r| r.spiffe_id = "spiffe://other.test/x".into(),
            "is not in trust domain",
        ),
        (
            "root ID",
            |r| r.spiffe_id = "spiffe://mayfly.local".into(),
            "add a path",
        ),
        (
            "reserved scope segment",
            |r| r.spiffe_id = "spiffe://mayfly.local/agents/bot/scope/stripe.read.customers".into(),
            "the path segment 'scope'",
        ),
        (
            "reserved /mayfly prefix",
            |r| r.spiffe_id = "spiffe://mayfly.local/mayfly/agent/join_token/x".into(),
            "reserved",
        ),
        (
            "malformed parent",
            |r| r.parent_id = "not an id".into(),
            "is not a SPIFFE ID",
        ),
        (
            // Not an agent, and no node entry defines a group by that ID (issue 12).
            "workload as parent",
            |r| r.parent_id = "spiffe://mayfly.local/agents/other".into(),
            "neither an agent nor a node group",
        ),
        (
            "server as parent",
            |r| r.parent_id = "spiffe://mayfly.local/mayfly/server".into(),
            "must be an agent",
        ),
        (
            "foreign agent as parent",
            |r| r.parent_id = "spiffe://other.test/mayfly/agent/join_token/x".into(),
            "must be an agent",
        ),
        (
            "unknown selector type",
            |r| r.selectors = vec!["k8s:ns:default".into()],
            "unknown selector type",
        ),
        (
            "unknown unix selector",
            |r| r.selectors = vec!["unix:pid:42".into()],
            "unknown unix selector",
        ),
        (
            "selector shape",
            |r| r.selectors = vec!["uid=1001".into()],
            "TYPE:KIND:VALUE",
        ),
        (
            "bad selector value",
            |r| r.selectors = vec!["unix:uid:01001".into()],
            "bad value",
        ),
        (
            "no selectors",
            |r| r.selectors.clear(),
            "at least one selector",
        ),
        ("TTL 7200", |r| r.ttl_seconds = 7200, "above the ceiling"),
        (
            "malformed scope",
            |r| r.scopes = vec!["Stripe:Read".into()],
            "is not a valid scope",
        ),
        (
            "bad DNS name",
            |r| r.dns_names = vec!["not a name".into()],
            "DNS name",
        ),
    ];
    for (name, edit, reason) in cases {
        let mut request = entry_request(&parent);
        edit(&mut request);
        let status = expect_code(server.create_entry(request).await, Code::InvalidArgument);
        assert!(
            status.message().contains(reason),
            "{name}: {:?} should mention {reason:?}",
            status.message()
        );
        assert!(
            server.entries().await.is_empty(),
            "{name}: something was stored"
        );
    }
    // Nothing stored, nothing recorded as created.
    assert!(
        server
            .audit_after(mark)
            .await
            .iter()
            .all(|r| r.action != "entry.create"),
    );

    // Control: the valid request (the ceiling itself) is stored.
    let mut request = entry_request(&parent);
    request.ttl_seconds = 3600;
    let created = server.create_entry(request).await.expect("valid entry");
    let entries = server.entries().await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].id, created.id);
    assert_eq!(entries[0].ttl_seconds, 3600);
    let records = server.audit_after(mark).await;
    assert!(
        records.iter().any(|r| r.action == "entry.create"
            && r.decision == "allow"
            && r.entry_id == created.id)
    );
    server.stop().await;
}

/// A flood of bad attestations from one source (issue 12): past the source's burst, attempts
/// are answered ResourceExhausted without reading their evidence, and the audit log gets the
/// first few refusals one by one and then one summary per interval, not a row per attempt.
#[tokio::test]
async fn a_flood_of_bad_attestations_from_one_source_is_throttled_and_summarised() {
    // One refill a second, so that a slow (debug, loaded) run of the flood is still mostly
    // throttled; the default is 5 a second.
    let server = TestServer::start_with(Engine::Sqlite, |c| {
        c.attest_limits.interval = Duration::from_secs(2);
        c.attest_limits.rate_per_sec = 1.0;
    })
    .await
    .expect("sqlite");
    let mark = server.audit_mark().await;
    let mut node = server.node_client(None).await;
    let mut csr = KeyAndCsr::generate().unwrap().csr;
    let (mut refused, mut throttled) = (0, 0);
    for i in 0..1000u32 {
        let token = format!("{:064x}", u64::from(i) + 0xdead_0000);
        let answer = node
            .attest(node_pb::AttestRequest {
                attestor: "join_token".into(),
                evidence: token.into_bytes(),
                csr: std::mem::take(&mut csr),
            })
            .await;
        csr = KeyAndCsr::generate().unwrap().csr;
        match answer {
            Ok(_) => panic!("a made-up token attested"),
            // The positive control: the first attempts are judged (the token is unknown).
            Err(s) if s.code() == Code::PermissionDenied => refused += 1,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert_eq!(RefusalKind::of(&s), Some(RefusalKind::RateLimited), "{s:?}");
                assert!(
                    s.message().contains("too many refused attestations"),
                    "{s:?}"
                );
                throttled += 1;
            }
            Err(s) => panic!("unexpected status {s:?}"),
        }
    }
    assert!(refused >= 20, "the burst is judged: {refused}");
    assert!(
        throttled >= 950,
        "at least 95% throttled: {throttled} of 1000"
    );

    // Every attempt is accounted for in the audit log, in few rows: per interval, the first
    // ten refusals one by one and one summary of the rest (the count of each summary is read
    // back from its reason).
    let summed = |records: &[admin_pb::AuditRecord]| -> (usize, u64, u64) {
        let mut individual = 0;
        let (mut more, mut throttled_sum) = (0u64, 0u64);
        for r in records {
            if let Some(rest) = r
                .reason
                .split_once(" more attestations from 127.0.0.1 refused and ")
            {
                more += rest.0.parse::<u64>().unwrap();
                throttled_sum += rest.1.split(' ').next().unwrap().parse::<u64>().unwrap();
            } else {
                assert!(r.reason.contains("join token is unknown"), "{r:#?}");
                individual += 1;
            }
        }
        (individual, more, throttled_sum)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let records = loop {
        let records = server.audit_after(mark).await;
        let (individual, more, throttled_sum) = summed(&records);
        if individual as u64 + more + throttled_sum == 1000 {
            break records;
        }
        assert!(
            Instant::now() < deadline,
            "not all attempts accounted for: {records:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (individual, _, throttled_sum) = summed(&records);
    let summaries = records.len() - individual;
    assert_eq!(throttled_sum, throttled as u64);
    assert!(individual <= 10 * summaries, "{records:#?}");
    println!(
        "1000 bad attestations: {refused} judged, {throttled} throttled; {} audit rows ({individual} one by one, {summaries} summaries)",
        records.len()
    );
    server.stop().await;
}

//! The agent's workload socket end to end, over real sockets: a real server in-process, an agent
//! attested to it with a join token, its entries created through the admin API with selectors
//! matching this test process (`unix:uid:<our uid>`), identity SVIDs issued by the server over
//! the node API, and the endpoint serving them on a Unix socket in a temporary directory.
//!
//! The test plays the agent's sync task: it fills the [`Snapshot`] itself. Workloads are the
//! `spiffe` crate (an independent SPIFFE client), raw tonic clients (to send what a conforming
//! client never would, such as no header), and this test binary re-executed as another process
//! (another uid, or a process that inherits a connection after its creator exits). Every
//! negative test has its positive control on the same fixture.

mod common;

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Engine, TestServer, entry_request, expect_code};
use hyper_util::rt::TokioIo;
use mayfly::agent::endpoint::{self, EndpointError};
use mayfly::agent::link::ServerLink;
use mayfly::agent::state::{AgentEntry, CachedSvid, Snapshot, SnapshotTx};
use mayfly::attestors::{Selector, UnixAttestor};
use mayfly::id::{SpiffeId, TrustDomain, parse_scopes};
use mayfly::proto::task::{self as task_pb, task_client::TaskClient};
use mayfly::proto::workload::{self as wl_pb, spiffe_workload_api_client::SpiffeWorkloadApiClient};
use mayfly::wire::RefusalKind;
use tokio::io::AsyncReadExt;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status, Streaming};

const READ: &str = "stripe:read:customers";
const WRITE: &str = "stripe:write:refunds";
/// How long a test waits for something that should happen at once.
const SOON: Duration = Duration::from_secs(10);

/// The environment variable that makes [`child_process_role`] act as a workload process.
const ROLE_ENV: &str = "MAYFLY_WORKLOAD_TEST_ROLE";
const SOCKET_ENV: &str = "MAYFLY_WORKLOAD_TEST_SOCKET";
const GO_ENV: &str = "MAYFLY_WORKLOAD_TEST_GO";
const HOLD_ENV: &str = "MAYFLY_WORKLOAD_TEST_HOLD";

fn our_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

fn our_selector() -> String {
    format!("unix:uid:{}", our_uid())
}

/// A server, an agent attested to it, and the agent's workload endpoint on a socket.
struct Fixture {
    server: TestServer,
    agent_id: String,
    link: Arc<ServerLink>,
    td: TrustDomain,
    bundle: Vec<Vec<u8>>,
    snapshot: SnapshotTx,
    _dir: tempfile::TempDir,
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    serving: Option<JoinHandle<Result<(), EndpointError>>>,
}

impl Fixture {
    /// Everything running, the snapshot not ready yet (as before the agent's first sync).
    async fn start() -> Self {
        // Entries of a few seconds (below the entry TTL floor) let expiry happen within a test.
        let server = TestServer::start_with(Engine::Sqlite, |c| {
            c.min_entry_ttl = Duration::from_secs(1);
        })
        .await
        .expect("SQLite needs no environment");
        let agent = server.attest().await;
        let td = server.trust_domain();
        let link = Arc::new(ServerLink::new(
            server.node_addr(),
            mayfly::wire::server_id(&td),
            agent.source,
            agent.node,
        ));
        let (_, bundle) = server.bundle_der().await;
        let (snapshot, rx) = watch::channel(Arc::new(Snapshot::empty(td.clone(), bundle.clone())));

        let dir = tempfile::tempdir().expect("temp dir");
        // Other users' processes must reach the socket too (the mode of the socket itself is
        // the endpoint's business; this is the test's own directory).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let socket = dir.path().join("agent.sock");
        let listener = endpoint::bind(&socket).expect("bind");
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = tokio::spawn(endpoint::serve(
            listener,
            rx,
            link.clone(),
            Arc::new(UnixAttestor::default()),
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            server,
            agent_id: agent.spiffe_id.to_string(),
            link,
            td,
            bundle,
            snapshot,
            _dir: dir,
            socket,
            stop: Some(stop),
            serving: Some(serving),
        }
    }

    /// Creates an entry of this agent through the admin API.
    async fn entry(
        &self,
        selectors: &[&str],
        scopes: &[&str],
        ttl_seconds: u32,
    ) -> Arc<AgentEntry> {
        let mut request = entry_request(&self.agent_id);
        request.selectors = selectors.iter().map(|s| s.to_string()).collect();
        request.scopes = scopes.iter().map(|s| s.to_string()).collect();
        request.ttl_seconds = ttl_seconds;
        let e = self
            .server
            .create_entry(request)
            .await
            .expect("create entry");
        Arc::new(AgentEntry {
            id: e.id,
            spiffe_id: SpiffeId::parse(&e.spiffe_id).expect("entry ID"),
            selectors: e
                .selectors
                .iter()
                .map(|s| Selector::parse(s).expect("selector"))
                .collect(),
            scopes: parse_scopes(&e.scopes).expect("scopes"),
            ttl: Duration::from_secs(e.ttl_seconds.into()),
            dns_names: e.dns_names,
            hint: e.hint,
            jwt_ttl: None,
            created_at: e.created_at,
        })
    }

    /// An entry for this process, with both scopes and a 300 s TTL.
    async fn our_entry(&self) -> Arc<AgentEntry> {
        self.entry(&[&our_selector()], &[READ, WRITE], 300).await
    }

    /// A fresh identity SVID for `entry` from the server, as the sync task would get it.
    async fn issue(&self, entry: &AgentEntry) -> Arc<CachedSvid> {
        Arc::new(
            self.link
                .issue_identity(entry)
                .await
                .expect("issue identity"),
        )
    }

    /// Publishes a ready snapshot of `entries`, each with its SVID if given.
    fn publish(&self, entries: &[(&Arc<AgentEntry>, Option<&Arc<CachedSvid>>)]) {
        self.publish_with_bundle(entries, self.bundle.clone());
    }

    fn publish_with_bundle(
        &self,
        entries: &[(&Arc<AgentEntry>, Option<&Arc<CachedSvid>>)],
        bundle: Vec<Vec<u8>>,
    ) {
        let mut snapshot = Snapshot::empty(self.td.clone(), bundle);
        for (entry, svid) in entries {
            snapshot.entries.push(Arc::clone(entry));
            if let Some(svid) = svid {
                snapshot.svids.insert(entry.id.clone(), Arc::clone(svid));
            }
        }
        snapshot.ready = true;
        self.snapshot.send_replace(Arc::new(snapshot));
    }

    /// The socket as the `spiffe` crate and SPIFFE_ENDPOINT_SOCKET name it.
    fn endpoint_uri(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    async fn spiffe_client(&self) -> spiffe::WorkloadApiClient {
        spiffe::WorkloadApiClient::connect_to(self.endpoint_uri())
            .await
            .expect("spiffe client connects")
    }

    async fn workload_client(&self) -> SpiffeWorkloadApiClient<Channel> {
        SpiffeWorkloadApiClient::new(channel_to(&self.socket).await)
    }

    async fn task_client(&self) -> TaskClient<Channel> {
        TaskClient::new(channel_to(&self.socket).await)
    }

    /// Stops the endpoint and returns what `serve` returned.
    async fn shutdown(&mut self) -> Result<(), EndpointError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let serving = self.serving.take().expect("serving");
        tokio::time::timeout(SOON, serving)
            .await
            .expect("the endpoint stops in time")
            .expect("the endpoint task does not panic")
    }

    async fn stop(mut self) {
        self.shutdown().await.expect("the endpoint stops cleanly");
        self.server.stop().await;
    }
}

/// A gRPC channel over a new connection to the Unix socket `path`.
async fn channel_to(path: &Path) -> Channel {
    let path = path.to_owned();
    Endpoint::from_static("http://workload")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .expect("connect to the agent socket")
}

/// A request whose `workload.spiffe.io` header says something other than `true`.
fn bad_value<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(endpoint::HEADER, "false".parse().expect("ascii"));
    request
}

/// A request carrying the `workload.spiffe.io: true` header.
fn with_header<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(endpoint::HEADER, "true".parse().expect("ascii"));
    request
}

async fn fetch_svids(
    client: &mut SpiffeWorkloadApiClient<Channel>,
) -> Result<Streaming<wl_pb::X509svidResponse>, Status> {
    client
        .fetch_x509svid(with_header(wl_pb::X509svidRequest {}))
        .await
        .map(|r| r.into_inner())
}

/// The next message of `stream` (an `Err` for a status ending it), waiting at most [`SOON`].
async fn next<T>(stream: &mut Streaming<T>) -> Result<T, Status> {
    tokio::time::timeout(SOON, stream.message())
        .await
        .expect("a stream message in time")?
        .ok_or_else(|| Status::unknown("the stream ended without a status"))
}

/// The DER certificates in a concatenation.
fn split_der(mut der: &[u8]) -> Vec<Vec<u8>> {
    let mut certs = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der).expect("a DER certificate");
        certs.push(der[..der.len() - rest.len()].to_vec());
        der = rest;
    }
    certs
}

/// The leaf's URI SAN.
fn uri_san(leaf: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).expect("leaf");
    let san = cert
        .subject_alternative_name()
        .expect("SAN extension parses")
        .expect("a SAN extension");
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris.len(), 1, "exactly one URI SAN");
    uris[0].clone()
}

/// Asserts the PKCS#8 key is the private half of the leaf's public key.
fn assert_key_matches(leaf: &[u8], key_pkcs8: &[u8]) {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key_pkcs8).expect("key");
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).expect("leaf");
    assert_eq!(
        key.public_key().as_ref(),
        &*cert.public_key().subject_public_key.data,
        "the key must belong to the leaf"
    );
}

// ---- the socket ---------------------------------------------------------------------------

#[tokio::test]
async fn bind_replaces_a_stale_socket_and_refuses_anything_else() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/run/agent.sock");

    // A missing directory is created; the socket is open to every user.
    let first = endpoint::bind(&path).expect("bind in a new directory");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o777, "mode {mode:o}");

    // While an agent listens there, the socket is not taken from it.
    let err = endpoint::bind(&path).unwrap_err();
    assert!(matches!(err, EndpointError::InUse(_)), "{err}");
    drop(first);

    // Once nobody listens, the file left behind is stale and replaced.
    assert!(path.exists(), "a dropped listener leaves its socket file");
    let second = endpoint::bind(&path).expect("a stale socket is replaced");
    tokio::net::UnixStream::connect(&path)
        .await
        .expect("the new socket answers");
    drop(second);

    // A regular file is not deleted.
    let file = dir.path().join("precious.txt");
    std::fs::write(&file, "keep me").unwrap();
    let err = endpoint::bind(&file).unwrap_err();
    assert!(matches!(err, EndpointError::NotASocket(_)), "{err}");
    assert!(err.to_string().contains("refusing to delete it"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_removes_the_socket() {
    let mut fx = Fixture::start().await;
    let entry = fx.our_entry().await;
    let svid = fx.issue(&entry).await;
    fx.publish(&[(&entry, Some(&svid))]);

    let mut client = fx.workload_client().await;
    let mut stream = fetch_svids(&mut client).await.expect("FetchX509SVID");
    next(&mut stream).await.expect("the first message");

    fx.shutdown().await.expect("serve returns Ok");
    let status = next(&mut stream).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(!fx.socket.exists(), "the socket file is removed");
    fx.server.stop().await;
}

// ---- FetchX509SVID and FetchX509Bundles -----------------------------------------------------

/// The hint an operator gave an entry (`entry create --hint`) reaches an independent SPIFFE
/// client with each SVID; an entry without one has none.
#[tokio::test]
async fn a_spiffe_client_receives_each_svids_hint() {
    let fx = Fixture::start().await;
    let primary = fx.our_entry().await;
    let primary = Arc::new(AgentEntry {
        hint: "primary".into(),
        ..(*primary).clone()
    });
    let plain = fx.entry(&[&our_selector()], &[READ], 600).await;
    let (primary_svid, plain_svid) = (fx.issue(&primary).await, fx.issue(&plain).await);
    fx.publish(&[(&primary, Some(&primary_svid)), (&plain, Some(&plain_svid))]);

    let client = fx.spiffe_client().await;
    let all = client.fetch_all_x509_svids().await.expect("all SVIDs");
    let hints: Vec<(String, Option<&str>)> = all
        .iter()
        .map(|s| (s.spiffe_id().to_string(), s.hint()))
        .collect();
    assert_eq!(
        hints,
        [
            (primary.spiffe_id.to_string(), Some("primary")),
            (plain.spiffe_id.to_string(), None),
        ]
    );
    // The default SVID is the first, with its hint.
    let default = client.fetch_x509_svid().await.expect("FetchX509SVID");
    assert_eq!(default.hint(), Some("primary"));
    fx.stop().await;
}

#[tokio::test]
async fn a_spiffe_client_gets_the_svid_of_its_entry_and_the_bundle() {
    let fx = Fixture::start().await;
    let ours = fx.our_entry().await;
    let theirs = fx.entry(&["unix:uid:1001"], &[READ], 300).await;
    let (our_svid, their_svid) = (fx.issue(&ours).await, fx.issue(&theirs).await);
    fx.publish(&[(&theirs, Some(&their_svid)), (&ours, Some(&our_svid))]);

    let client = fx.spiffe_client().await;
    let svid = client.fetch_x509_svid().await.expect("FetchX509SVID");
    assert_eq!(svid.spiffe_id().to_string(), ours.spiffe_id.as_str());
    let chain: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert_eq!(chain, our_svid.chain, "the chain as issued, leaf first");
    assert_key_matches(&chain[0], svid.private_key().as_bytes());
    fx.server.verify(&chain).await;

    // Only the entries whose selectors this process has: not uid 1001's.
    let all = client.fetch_all_x509_svids().await.expect("all SVIDs");
    assert_eq!(all.len(), 1);

    let bundles = client.fetch_x509_bundles().await.expect("FetchX509Bundles");
    let td = spiffe::TrustDomain::new(fx.td.as_str()).unwrap();
    let bundle = bundles.get(&td).expect("our trust domain's bundle");
    let authorities: Vec<Vec<u8>> = bundle
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert_eq!(authorities, fx.bundle);

    // X509Source, what most Rust services use, takes it as well.
    let source = spiffe::X509Source::builder()
        .endpoint(fx.endpoint_uri())
        .build()
        .await
        .expect("X509Source");
    assert_eq!(
        source.svid().unwrap().spiffe_id().to_string(),
        ours.spiffe_id.as_str()
    );
    source.shutdown().await;
    fx.stop().await;
}

#[tokio::test]
async fn a_workload_connecting_before_the_first_sync_waits_for_it() {
    let fx = Fixture::start().await;
    let entry = fx.our_entry().await;
    let svid = fx.issue(&entry).await;

    let client = fx.spiffe_client().await;
    let fetch = tokio::spawn(async move { client.fetch_x509_svid().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !fetch.is_finished(),
        "not answered before the agent is ready"
    );

    fx.publish(&[(&entry, Some(&svid))]);
    let got = tokio::time::timeout(SOON, fetch)
        .await
        .unwrap()
        .unwrap()
        .expect("answered");
    assert_eq!(got.spiffe_id().to_string(), entry.spiffe_id.as_str());
    fx.stop().await;
}

#[tokio::test]
async fn a_rotation_is_a_new_message_and_an_unchanged_state_is_not_resent() {
    let fx = Fixture::start().await;
    let entry = fx.our_entry().await;
    let old = fx.issue(&entry).await;
    fx.publish(&[(&entry, Some(&old))]);

    let mut client = fx.workload_client().await;
    let mut stream = fetch_svids(&mut client).await.expect("FetchX509SVID");
    let first = next(&mut stream).await.expect("first message");
    assert_eq!(first.svids.len(), 1);
    assert_eq!(first.svids[0].x509_svid, old.chain.concat());
    assert_eq!(first.svids[0].x509_svid_key, old.key_pkcs8);
    assert_eq!(first.svids[0].bundle, fx.bundle.concat());
    assert!(first.svids[0].hint.is_empty());

    // A new snapshot with the same content: nothing to send.
    fx.publish(&[(&entry, Some(&old))]);
    let quiet = tokio::time::timeout(Duration::from_millis(700), stream.message()).await;
    assert!(
        quiet.is_err(),
        "no message for an unchanged state: {quiet:?}"
    );

    // Rotation: the new SVID in a new message.
    let new = fx.issue(&entry).await;
    assert_ne!(new.serial, old.serial);
    fx.publish(&[(&entry, Some(&new))]);
    let rotated = next(&mut stream).await.expect("the rotated SVID");
    assert_eq!(rotated.svids.len(), 1);
    assert_eq!(rotated.svids[0].x509_svid, new.chain.concat());
    assert_key_matches(&new.chain[0], &rotated.svids[0].x509_svid_key);

    // An added entry: both SVIDs, in entry order.
    let second = fx.entry(&[&our_selector()], &[READ], 300).await;
    let second_svid = fx.issue(&second).await;
    fx.publish(&[(&entry, Some(&new)), (&second, Some(&second_svid))]);
    let both = next(&mut stream).await.expect("two SVIDs");
    let ids: Vec<_> = both.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(ids, [entry.spiffe_id.as_str(), second.spiffe_id.as_str()]);
    fx.stop().await;
}

#[tokio::test]
async fn the_bundle_stream_follows_bundle_changes() {
    let fx = Fixture::start().await;
    let entry = fx.our_entry().await;
    let svid = fx.issue(&entry).await;
    fx.publish(&[(&entry, Some(&svid))]);

    let mut client = fx.workload_client().await;
    let mut stream = client
        .fetch_x509_bundles(with_header(wl_pb::X509BundlesRequest {}))
        .await
        .expect("FetchX509Bundles")
        .into_inner();
    let key = fx.td.id().to_string();
    let first = next(&mut stream).await.expect("first bundle");
    assert_eq!(first.bundles.len(), 1);
    assert_eq!(first.bundles[&key], fx.bundle.concat());

    // A CA added to the trust domain (any certificate will do for the wire).
    let mut grown = fx.bundle.clone();
    grown.push(svid.chain[0].clone());
    fx.publish_with_bundle(&[(&entry, Some(&svid))], grown.clone());
    let second = next(&mut stream).await.expect("the grown bundle");
    assert_eq!(second.bundles[&key], grown.concat());
    assert_eq!(split_der(&second.bundles[&key]).len(), fx.bundle.len() + 1);

    // The SVID stream carries the new bundle too.
    let mut svids = fetch_svids(&mut client).await.expect("FetchX509SVID");
    assert_eq!(
        next(&mut svids).await.unwrap().svids[0].bundle,
        grown.concat()
    );
    fx.stop().await;
}

#[tokio::test]
async fn removing_the_entry_ends_both_streams_with_permission_denied() {
    let fx = Fixture::start().await;
    let entry = fx.our_entry().await;
    let svid = fx.issue(&entry).await;
    fx.publish(&[(&entry, Some(&svid))]);

    let mut client = fx.workload_client().await;
    let mut svids = fetch_svids(&mut client).await.expect("FetchX509SVID");
    let mut bundles = client
        .fetch_x509_bundles(with_header(wl_pb::X509BundlesRequest {}))
        .await
        .expect("FetchX509Bundles")
        .into_inner();
    next(&mut svids).await.expect("positive control: an SVID");
    next(&mut bundles)
        .await
        .expect("positive control: a bundle");

    fx.publish(&[]);
    for status in [
        next(&mut svids).await.unwrap_err(),
        next(&mut bundles).await.unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status
                .message()
                .contains("no registration entry matches this workload's selectors"),
            "{status:?}"
        );
        assert!(status.message().contains(&our_selector()), "{status:?}");
    }

    // A matching entry whose SVID is not there (yet) is no identity either.
    fx.publish(&[(&entry, None)]);
    let status = expect_code(fetch_svids(&mut client).await, Code::PermissionDenied);
    assert!(status.message().contains("no valid SVID"), "{status:?}");
    // And the spiffe crate recognises it as "no identity issued".
    let err = fx
        .spiffe_client()
        .await
        .fetch_x509_svid()
        .await
        .unwrap_err();
    assert!(
        matches!(err, spiffe::WorkloadApiError::NoIdentityIssued),
        "{err:?}"
    );
    fx.stop().await;
}

#[tokio::test]
async fn an_expiring_svid_is_withdrawn_on_time_without_a_snapshot_change() {
    let fx = Fixture::start().await;
    let short = fx.entry(&[&our_selector()], &[READ], 3).await;
    let long = fx.our_entry().await;
    let (short_svid, long_svid) = (fx.issue(&short).await, fx.issue(&long).await);
    assert!(short_svid.not_after < long_svid.not_after);
    fx.publish(&[(&short, Some(&short_svid)), (&long, Some(&long_svid))]);

    let mut client = fx.workload_client().await;
    let mut stream = fetch_svids(&mut client).await.expect("FetchX509SVID");
    assert_eq!(
        next(&mut stream).await.unwrap().svids.len(),
        2,
        "both, while valid"
    );

    // No snapshot change: the stream wakes at the short SVID's notAfter by itself.
    let left = next(&mut stream)
        .await
        .expect("the state without the expired SVID");
    let withdrawn_at = SystemTime::now();
    assert!(
        withdrawn_at >= short_svid.not_after,
        "never withdrawn early"
    );
    assert!(
        withdrawn_at < short_svid.not_after + Duration::from_secs(1),
        "withdrawn on time, not at the next snapshot change"
    );
    let ids: Vec<_> = left.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(ids, [long.spiffe_id.as_str()]);

    // When the expiring SVID is the only one, the stream ends with PermissionDenied.
    let short_again = fx.issue(&short).await;
    fx.publish(&[(&short, Some(&short_again))]);
    let only = next(&mut stream).await.expect("the new short SVID alone");
    assert_eq!(only.svids[0].x509_svid, short_again.chain.concat());
    let status = next(&mut stream).await.unwrap_err();
    assert!(SystemTime::now() >= short_again.not_after);
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("no valid SVID"), "{status:?}");
    fx.stop().await;
}

#[tokio::test]
async fn requests_without_the_header_are_invalid_argument_on_both_services() {
    let fx = Fixture::start().await;
    let entry = fx.our_entry().await;
    let svid = fx.issue(&entry).await;
    fx.publish(&[(&entry, Some(&svid))]);
    let mut workload = fx.workload_client().await;
    let mut task = fx.task_client().await;
    let mint = || task_pb::MintX509svidRequest {
        task_id: "header-check".into(),
        scopes: vec![READ.into()],
        ..Default::default()
    };

    let refusals = [
        workload
            .fetch_x509svid(wl_pb::X509svidRequest {})
            .await
            .map(drop),
        workload
            .fetch_x509svid(bad_value(wl_pb::X509svidRequest {}))
            .await
            .map(drop),
        workload
            .fetch_x509_bundles(wl_pb::X509BundlesRequest {})
            .await
            .map(drop),
        workload
            .fetch_jwtsvid(wl_pb::JwtsvidRequest::default())
            .await
            .map(drop),
        task.mint_x509svid(mint()).await.map(drop),
        task.mint_x509svid(bad_value(mint())).await.map(drop),
    ];
    for result in refusals {
        let status = expect_code(result, Code::InvalidArgument);
        assert!(
            status
                .message()
                .contains("lacks the `workload.spiffe.io: true` header"),
            "{status:?}"
        );
    }

    // Positive controls on the same connections.
    let mut stream = fetch_svids(&mut workload).await.expect("with the header");
    next(&mut stream).await.expect("an SVID");
    let mut bundles = workload
        .fetch_x509_bundles(with_header(wl_pb::X509BundlesRequest {}))
        .await
        .expect("with the header")
        .into_inner();
    next(&mut bundles).await.expect("a bundle");
    task.mint_x509svid(with_header(mint()))
        .await
        .expect("a task SVID");
    fx.stop().await;
}

#[tokio::test]
async fn jwt_calls_are_unimplemented_with_a_reason() {
    let fx = Fixture::start().await;
    let entry = fx.our_entry().await;
    let svid = fx.issue(&entry).await;
    fx.publish(&[(&entry, Some(&svid))]);
    let mut client = fx.workload_client().await;
    let results = [
        client
            .fetch_jwtsvid(with_header(wl_pb::JwtsvidRequest {
                audience: vec!["x".into()],
                spiffe_id: String::new(),
            }))
            .await
            .map(drop),
        client
            .fetch_jwt_bundles(with_header(wl_pb::JwtBundlesRequest {}))
            .await
            .map(drop),
        client
            .validate_jwtsvid(with_header(wl_pb::ValidateJwtsvidRequest::default()))
            .await
            .map(drop),
    ];
    for result in results {
        let status = expect_code(result, Code::Unimplemented);
        assert!(
            status.message().contains("JWT-SVIDs are not supported"),
            "{status:?}"
        );
    }
    // Positive control: X.509 on the same connection.
    let mut stream = fetch_svids(&mut client).await.expect("FetchX509SVID");
    next(&mut stream).await.expect("an SVID");
    fx.stop().await;
}

// ---- other processes ----------------------------------------------------------------------

/// One `RESULT <call> <code> <message>` line per call a child made.
fn results(output: &[u8]) -> Vec<(String, String, String)> {
    String::from_utf8_lossy(output)
        .lines()
        // The test harness may have started the line ("test child_process_role ... ").
        .filter_map(|l| l.find("RESULT ").map(|at| &l[at + "RESULT ".len()..]))
        .map(|l| {
            let mut parts = l.splitn(3, ' ');
            let mut part = || parts.next().unwrap_or_default().to_owned();
            (part(), part(), part())
        })
        .collect()
}

/// This test binary, run as a child that executes only [`child_process_role`].
fn child(role: &str, socket: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(std::env::current_exe().expect("test binary"));
    command
        .args([
            "child_process_role",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE_ENV, role)
        .env(SOCKET_ENV, socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn read_all(child: &mut tokio::process::Child) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stdout = child.stdout.take().expect("piped stdout");
    tokio::time::timeout(Duration::from_secs(60), stdout.read_to_end(&mut out))
        .await
        .expect("the child finishes in time")
        .expect("read the child's output");
    out
}

#[tokio::test]
async fn a_process_of_another_uid_is_refused_while_ours_is_served() {
    assert_eq!(
        our_uid(),
        0,
        "this test runs as root, to start a process as another user"
    );
    let fx = Fixture::start().await;
    let entry = fx.our_entry().await;
    let svid = fx.issue(&entry).await;
    fx.publish(&[(&entry, Some(&svid))]);

    let mut nobody = child("client", &fx.socket);
    nobody.uid(65534).gid(65534);
    let mut run = nobody.spawn().expect("start the child as nobody");
    let out = read_all(&mut run).await;
    assert!(
        run.wait().await.unwrap().success(),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let got = results(&out);
    assert_eq!(got.len(), 3, "{}", String::from_utf8_lossy(&out));
    for (call, code, message) in &got {
        assert_eq!(code, "PermissionDenied", "{call}: {message}");
        assert!(message.contains("unix:uid:65534"), "{call}: {message}");
    }

    // Positive control: the same calls as our uid, from a process of our own.
    let mut ours = child("client", &fx.socket)
        .spawn()
        .expect("start the child as us");
    let out = read_all(&mut ours).await;
    let got = results(&out);
    assert_eq!(got.len(), 3, "{}", String::from_utf8_lossy(&out));
    for (call, code, message) in &got {
        assert_eq!(code, "Ok", "{call}: {message}");
    }
    fx.stop().await;
}

/// Runs the connection-handover scenario: a creator process connects and hands the connection
/// to an heir (as its stdin); the heir calls FetchX509SVID over it once `go` exists. With
/// `creator_stays`, the creator waits for the heir; otherwise it exits first and is reaped
/// before the heir calls.
async fn hand_over(fx: &Fixture, creator_stays: bool) -> (String, String) {
    let go = fx.socket.with_file_name(format!("go-{creator_stays}"));
    let mut creator = child("creator", &fx.socket);
    creator
        .env(GO_ENV, &go)
        .env(HOLD_ENV, if creator_stays { "stay" } else { "leave" });
    let mut creator = creator.spawn().expect("start the creator");
    if !creator_stays {
        let status = tokio::time::timeout(SOON, creator.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "the creator exits");
    }
    std::fs::write(&go, "").unwrap();
    let out = read_all(&mut creator).await;
    let got = results(&out);
    assert_eq!(got.len(), 1, "{}", String::from_utf8_lossy(&out));
    let (_, code, message) = got.into_iter().next().unwrap();
    (code, message)
}

#[tokio::test]
async fn a_connection_handed_on_after_its_creator_exits_gets_nothing() {
    let fx = Fixture::start().await;
    let entry = fx.our_entry().await;
    let svid = fx.issue(&entry).await;
    fx.publish(&[(&entry, Some(&svid))]);

    // Positive control: while the process that connected lives, its connection is served.
    let (code, message) = hand_over(&fx, true).await;
    assert_eq!(code, "Ok", "{message}");

    let (code, message) = hand_over(&fx, false).await;
    assert_eq!(code, "PermissionDenied", "{message}");
    assert!(
        message.contains("gone") || message.contains("attest"),
        "{message}"
    );
    fx.stop().await;
}

/// Not a test of its own: the body of the child processes above, selected by [`ROLE_ENV`].
/// Without it (a normal test run), it does nothing.
#[test]
fn child_process_role() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    let socket = PathBuf::from(std::env::var(SOCKET_ENV).expect("socket"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match role.as_str() {
        "client" => runtime.block_on(child_client(&socket)),
        "creator" => child_creator(&socket),
        "heir" => runtime.block_on(child_heir()),
        other => panic!("unknown role {other}"),
    }
}

fn report<T>(call: &str, result: Result<T, Status>) {
    match result {
        Ok(_) => println!("RESULT {call} Ok -"),
        Err(s) => println!("RESULT {call} {:?} {}", s.code(), s.message()),
    }
}

/// Fetches an SVID and a bundle and mints a task SVID, reporting each outcome.
async fn child_client(socket: &Path) {
    let mut workload = SpiffeWorkloadApiClient::new(channel_to(socket).await);
    let svid = match fetch_svids(&mut workload).await {
        Ok(mut stream) => next(&mut stream).await.map(drop),
        Err(s) => Err(s),
    };
    report("FetchX509SVID", svid);
    let bundle = match workload
        .fetch_x509_bundles(with_header(wl_pb::X509BundlesRequest {}))
        .await
    {
        Ok(r) => next(&mut r.into_inner()).await.map(drop),
        Err(s) => Err(s),
    };
    report("FetchX509Bundles", bundle);
    let mut task = TaskClient::new(channel_to(socket).await);
    let mint = task
        .mint_x509svid(with_header(task_pb::MintX509svidRequest {
            task_id: "child".into(),
            scopes: vec![READ.into()],
            ..Default::default()
        }))
        .await;
    report("MintX509SVID", mint);
}

/// Connects, gives the connection to an heir process, and either waits for it or leaves.
// Leaving the heir running is the point: it must outlive the process that connected.
#[allow(clippy::zombie_processes)]
fn child_creator(socket: &Path) {
    let conn = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    // Time for the agent to attest this process, so the heir meets the per-call check.
    std::thread::sleep(Duration::from_millis(500));
    let mut heir = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "child_process_role",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE_ENV, "heir")
        .stdin(Stdio::from(OwnedFd::from(conn)))
        .spawn()
        .expect("start the heir");
    if std::env::var(HOLD_ENV).as_deref() == Ok("stay") {
        heir.wait().expect("the heir finishes");
    }
}

/// Waits for the go file, then calls FetchX509SVID over the inherited connection (stdin).
async fn child_heir() {
    let go = PathBuf::from(std::env::var(GO_ENV).expect("go file"));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !go.exists() {
        assert!(std::time::Instant::now() < deadline, "no go");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fd = nix::unistd::dup(std::io::stdin().as_fd()).expect("dup stdin");
    let conn = std::os::unix::net::UnixStream::from(fd);
    conn.set_nonblocking(true).unwrap();
    let slot = Arc::new(Mutex::new(Some(
        tokio::net::UnixStream::from_std(conn).unwrap(),
    )));
    let channel = Endpoint::from_static("http://workload")
        .connect_with_connector(tower::service_fn(move |_| {
            let taken = slot.lock().unwrap().take();
            async move {
                taken
                    .map(TokioIo::new)
                    .ok_or_else(|| io::Error::other("the inherited connection is used up"))
            }
        }))
        .await
        .expect("HTTP/2 over the inherited connection");
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let result = match fetch_svids(&mut client).await {
        Ok(mut stream) => next(&mut stream).await.map(drop),
        Err(s) => Err(s),
    };
    report("FetchX509SVID", result);
}

// ---- the task API -------------------------------------------------------------------------

fn mint_request(task_id: &str, scopes: &[&str], ttl_seconds: u32) -> task_pb::MintX509svidRequest {
    task_pb::MintX509svidRequest {
        task_id: task_id.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ttl_seconds,
        spiffe_id: String::new(),
    }
}

#[tokio::test]
async fn a_task_svid_carries_exactly_the_scopes_asked_for() {
    let fx = Fixture::start().await;
    let entry = fx.our_entry().await;
    // No identity SVID needed: a task SVID is minted from the entry.
    fx.publish(&[(&entry, None)]);
    let mut task = fx.task_client().await;

    let answer = task
        .mint_x509svid(with_header(mint_request("t-read-1", &[READ], 60)))
        .await
        .expect("mint")
        .into_inner();
    let expected = format!("{}/scope/stripe.read.customers", entry.spiffe_id);
    assert_eq!(answer.spiffe_id, expected);
    let chain = split_der(&answer.x509_svid);
    assert_eq!(
        uri_san(&chain[0]),
        expected,
        "the leaf says what the answer says"
    );
    assert_key_matches(&chain[0], &answer.x509_svid_key);
    assert_eq!(split_der(&answer.bundle), fx.bundle);
    fx.server.verify(&chain).await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now + 55..=now + 61).contains(&answer.not_after),
        "{} vs {now}",
        answer.not_after
    );
    assert_eq!(
        answer.serial.len(),
        32,
        "128-bit serial in hex: {}",
        answer.serial
    );
    let audit = fx.server.audit_of_task("t-read-1").await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].serial, answer.serial);

    // Both scopes, when both are asked for: sorted, one segment each.
    let both = task
        .mint_x509svid(with_header(mint_request("t-both", &[WRITE, READ], 0)))
        .await
        .expect("mint")
        .into_inner();
    assert_eq!(
        both.spiffe_id,
        format!(
            "{}/scope/stripe.read.customers/stripe.write.refunds",
            entry.spiffe_id
        )
    );
    fx.stop().await;
}

#[tokio::test]
async fn the_servers_refusals_of_a_task_come_back_unchanged() {
    let fx = Fixture::start().await;
    let entry = fx.our_entry().await;
    fx.publish(&[(&entry, None)]);
    let mut task = fx.task_client().await;

    let cases = [
        (
            mint_request("t-1", &["stripe:delete:everything"], 0),
            Code::PermissionDenied,
        ),
        (mint_request("", &[READ], 0), Code::InvalidArgument),
        (mint_request("t-2", &[], 0), Code::InvalidArgument),
        (mint_request("t-3", &[READ], 3601), Code::PermissionDenied),
    ];
    for (request, code) in cases {
        let via_agent = expect_code(task.mint_x509svid(with_header(request.clone())).await, code);
        // What the node API says to the agent itself for the same request.
        let direct = fx
            .link
            .mint_task(
                &entry,
                &request.task_id,
                &request.scopes,
                request.ttl_seconds,
            )
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(via_agent.code(), direct.code());
        assert_eq!(via_agent.message(), direct.message());
        let kind = RefusalKind::of(&direct);
        assert!(kind.is_some(), "the server names the refusal");
        assert_eq!(RefusalKind::of(&via_agent), kind);
    }

    // Positive control: a scope of the entry, a task ID, a TTL under the ceiling.
    task.mint_x509svid(with_header(mint_request("t-4", &[READ], 300)))
        .await
        .expect("allowed");
    fx.stop().await;
}

#[tokio::test]
async fn a_task_svid_is_for_the_callers_entry_it_names_or_the_first() {
    let fx = Fixture::start().await;
    let first = fx.our_entry().await;
    let second = fx.entry(&[&our_selector()], &[WRITE], 300).await;
    let theirs = fx.entry(&["unix:uid:1001"], &[READ], 300).await;
    fx.publish(&[(&theirs, None), (&first, None), (&second, None)]);
    let mut task = fx.task_client().await;
    let mint = |spiffe_id: &str, scope: &str| task_pb::MintX509svidRequest {
        spiffe_id: spiffe_id.into(),
        ..mint_request("t-pick", &[scope], 0)
    };

    let default = task
        .mint_x509svid(with_header(mint("", READ)))
        .await
        .unwrap()
        .into_inner();
    assert!(
        default
            .spiffe_id
            .starts_with(&format!("{}/scope/", first.spiffe_id))
    );
    let named = task
        .mint_x509svid(with_header(mint(second.spiffe_id.as_str(), WRITE)))
        .await
        .unwrap()
        .into_inner();
    assert!(
        named
            .spiffe_id
            .starts_with(&format!("{}/scope/", second.spiffe_id))
    );

    // Another workload's entry, though this agent holds it.
    let status = expect_code(
        task.mint_x509svid(with_header(mint(theirs.spiffe_id.as_str(), READ)))
            .await,
        Code::PermissionDenied,
    );
    assert!(
        status
            .message()
            .contains("is not an identity of this workload"),
        "{status:?}"
    );
    let status = expect_code(
        task.mint_x509svid(with_header(mint("https://not/spiffe", READ)))
            .await,
        Code::InvalidArgument,
    );
    assert!(
        status.message().contains("is not a SPIFFE ID"),
        "{status:?}"
    );

    // No entry of ours at all.
    fx.publish(&[(&theirs, None)]);
    let status = expect_code(
        task.mint_x509svid(with_header(mint("", READ))).await,
        Code::PermissionDenied,
    );
    assert!(
        status.message().contains("no registration entry matches"),
        "{status:?}"
    );
    fx.stop().await;
}

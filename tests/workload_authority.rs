//! Every `:authority` a standard gRPC client sends on a Unix socket is served by the agent's
//! Workload API: the socket path (grpc-java, Bazel), the percent-encoded path (grpcio >= 1.57,
//! hence py-spiffe), `localhost` (grpc-go, tonic) and none at all. No HTTP library builds the
//! first two, so this test speaks HTTP/2 itself over the real agent's socket: a few frames by
//! hand, HPACK from the `hpack` crate.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use prost::Message as _;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
/// Generous: the machine is slow and shared; a healthy answer takes milliseconds.
const WAIT: Duration = Duration::from_secs(30);

/// How the agent answered one FetchX509SVID call on stream 1.
#[derive(Debug)]
enum Answer {
    /// The first response message of the stream.
    Svids(mayfly::proto::workload::X509svidResponse),
    /// The stream ended without a message, with these trailers (or headers, for trailers-only).
    Ended(Vec<(String, String)>),
    /// The stream was reset with this HTTP/2 error code (1 is PROTOCOL_ERROR).
    Reset(u32),
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .expect("small frame")
        .to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn read_frame(sock: &mut UnixStream) -> (u8, u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    sock.read_exact(&mut head).expect("read a frame header");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    sock.read_exact(&mut payload).expect("read a frame payload");
    (head[3], head[4], stream, payload)
}

/// Calls FetchX509SVID on the agent at `cluster`'s socket with `authority` (`None`: no
/// `:authority` at all), with or without the `workload.spiffe.io: true` header.
fn fetch_x509(cluster: &Cluster, authority: Option<&str>, with_header: bool) -> Answer {
    let mut sock = UnixStream::connect(cluster.socket()).expect("connect to the agent");
    sock.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut headers: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
    ];
    if let Some(a) = authority {
        headers.push((b":authority", a.as_bytes()));
    }
    headers.extend_from_slice(&[
        (b"content-type".as_slice(), b"application/grpc".as_slice()),
        (b"te", b"trailers"),
    ]);
    if with_header {
        headers.push((b"workload.spiffe.io", b"true"));
    }
    let block = hpack::Encoder::new().encode(headers);
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(HEADERS, END_HEADERS, 1, &block));
    // An empty X509SVIDRequest: uncompressed, zero length.
    out.extend(frame(DATA, END_STREAM, 1, &[0, 0, 0, 0, 0]));
    sock.write_all(&out).expect("send the request");

    let mut decoder = hpack::Decoder::new();
    let mut body = Vec::new();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let (kind, flags, stream, payload) = read_frame(&mut sock);
        match kind {
            SETTINGS if flags & ACK == 0 => sock
                .write_all(&frame(SETTINGS, ACK, 0, &[]))
                .expect("ack settings"),
            GOAWAY => panic!("the agent closed the connection: {payload:?}"),
            RST_STREAM if stream == 1 => {
                return Answer::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap()));
            }
            HEADERS if stream == 1 => {
                assert!(flags & END_HEADERS != 0, "no CONTINUATION expected");
                let fields = decoder
                    .decode(&payload)
                    .expect("decode the agent's headers");
                if flags & END_STREAM != 0 {
                    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
                    return Answer::Ended(
                        fields
                            .into_iter()
                            .map(|(n, v)| (text(n), text(v)))
                            .collect(),
                    );
                }
            }
            DATA if stream == 1 => {
                body.extend_from_slice(&payload);
                if body.len() >= 5 {
                    let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
                    if body.len() >= 5 + len {
                        let message =
                            mayfly::proto::workload::X509svidResponse::decode(&body[5..5 + len])
                                .expect("decode X509SVIDResponse");
                        return Answer::Svids(message);
                    }
                }
            }
            _ => {}
        }
    }
    panic!("no answer within {WAIT:?}");
}

/// A cluster whose agent serves an entry for this process (its uid), once it does.
fn serving_cluster() -> (Cluster, String) {
    let mut cluster = Cluster::start();
    cluster.start_agent();
    let uid = nix::unistd::getuid().as_raw().to_string();
    let id = "spiffe://mayfly.local/agents/python".to_owned();
    cluster.create_entry(&id, &["--selector", &format!("unix:uid:{uid}")]);
    let deadline = Instant::now() + WAIT;
    while !matches!(
        fetch_x509(&cluster, Some("localhost"), true),
        Answer::Svids(_)
    ) {
        assert!(
            Instant::now() < deadline,
            "the agent never served the entry"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (cluster, id)
}

#[test]
fn every_authority_a_grpc_client_sends_on_a_unix_socket_gets_an_svid() {
    let (cluster, id) = serving_cluster();
    let path = cluster.socket().display().to_string();
    // grpcio's form: the path percent-encoded, its leading `/` dropped.
    let encoded = path.trim_start_matches('/').replace('/', "%2F");
    let forms = [
        ("raw path", Some(path.clone())),
        ("percent-encoded path", Some(encoded.clone())),
        (
            "percent-encoded absolute path",
            Some(format!("%2F{encoded}")),
        ),
        ("localhost", Some("localhost".to_owned())),
        ("empty", Some(String::new())),
        ("absent", None),
    ];
    for (form, authority) in forms {
        match fetch_x509(&cluster, authority.as_deref(), true) {
            Answer::Svids(r) => {
                assert_eq!(r.svids.len(), 1, "{form}: {r:?}");
                assert_eq!(r.svids[0].spiffe_id, id, "{form}");
                assert!(!r.svids[0].x509_svid.is_empty(), "{form}");
            }
            other => panic!("{form} ({authority:?}): {other:?}"),
        }
    }
}

#[test]
fn without_the_workload_header_every_authority_is_still_refused() {
    let (cluster, _) = serving_cluster();
    let encoded = cluster
        .socket()
        .display()
        .to_string()
        .trim_start_matches('/')
        .replace('/', "%2F");
    for authority in [Some(encoded.as_str()), Some("localhost"), None] {
        // Positive control on the same socket and authority: with the header, an SVID.
        assert!(
            matches!(fetch_x509(&cluster, authority, true), Answer::Svids(_)),
            "{authority:?}"
        );
        match fetch_x509(&cluster, authority, false) {
            Answer::Ended(trailers) => {
                let status = trailers.iter().find(|(n, _)| n == "grpc-status");
                // 3: InvalidArgument, what the Workload API spec asks for.
                assert_eq!(status.map(|(_, v)| v.as_str()), Some("3"), "{trailers:?}");
                let message = trailers.iter().find(|(n, _)| n == "grpc-message");
                assert!(
                    message.is_some_and(|(_, m)| m.contains("workload.spiffe.io")),
                    "{trailers:?}"
                );
            }
            other => panic!("{authority:?} without the header: {other:?}"),
        }
    }
}

#[test]
fn a_malformed_authority_that_is_no_socket_path_is_still_reset() {
    let (cluster, _) = serving_cluster();
    // Positive control first, then a value that is neither an authority nor a socket path.
    assert!(matches!(
        fetch_x509(&cluster, Some("localhost"), true),
        Answer::Svids(_)
    ));
    match fetch_x509(&cluster, Some("a b"), true) {
        // 1: PROTOCOL_ERROR, as upstream h2 answers any malformed authority.
        Answer::Reset(code) => assert_eq!(code, 1),
        other => panic!("{other:?}"),
    }
}

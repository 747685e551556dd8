//! The client against a fake metadata service on 127.0.0.1 that speaks IMDSv2 as AWS's does:
//! a session token from `PUT /latest/api/token`, and reads refused (401) without it.

use std::io::{BufRead as _, BufReader};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::*;
use crate::aws_iid::tests::{INSTANCE, NODE_ID, aws, document_for, times};
use crate::aws_iid::{AwsIidEvidence, NAME};
use crate::node::{AttestError, NodeEvidence as _};

/// How the fake answers reads made with a valid token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// As the metadata service does.
    Normal,
    /// A document of 100 KiB.
    Huge,
    /// Nothing at all, the connection left open.
    Silent,
    /// A chunked body.
    Chunked,
    /// Bodies without a Content-Length, ended by closing the connection.
    NoLength,
    /// A session token that would add a header line to the next request.
    InjectingToken,
}

struct FakeImds {
    url: String,
    mode: Arc<Mutex<Mode>>,
    /// Each request seen: method, path, and whether it carried the session token.
    seen: Arc<Mutex<Vec<(String, String, bool)>>>,
}

const TOKEN: &str = "AQAEAFake-session-token-0123456789abcdef==";

impl FakeImds {
    fn start(document: String, signature: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mode = Arc::new(Mutex::new(Mode::Normal));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (m, s) = (mode.clone(), seen.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (m, s) = (m.clone(), s.clone());
                let (document, signature) = (document.clone(), signature.clone());
                std::thread::spawn(move || serve(stream, &m, &s, &document, &signature));
            }
        });
        Self { url, mode, seen }
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

fn serve(
    mut stream: TcpStream,
    mode: &Mutex<Mode>,
    seen: &Mutex<Vec<(String, String, bool)>>,
    document: &str,
    signature: &str,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    let mut parts = request_line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let (mut ttl, mut token) = (None, None);
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        match name.to_ascii_lowercase().as_str() {
            "x-aws-ec2-metadata-token-ttl-seconds" => ttl = Some(value.trim().to_owned()),
            "x-aws-ec2-metadata-token" => token = Some(value.trim().to_owned()),
            _ => {}
        }
    }
    let authorized = token.as_deref() == Some(TOKEN);
    seen.lock()
        .unwrap()
        .push((method.to_owned(), path.to_owned(), authorized));
    let mode = *mode.lock().unwrap();
    let answer = |status: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let reply = match (method, path) {
        ("PUT", "/latest/api/token") => match ttl.as_deref().map(str::parse::<u32>) {
            Some(Ok(1..=21600)) if mode == Mode::InjectingToken => {
                answer("200 OK", &format!("{TOKEN}\r\nX-Injected: 1"))
            }
            Some(Ok(1..=21600)) => answer("200 OK", TOKEN),
            _ => answer("400 Bad Request", ""),
        },
        // IMDSv2 only: a read without the session token is refused.
        ("GET", _) if !authorized => answer("401 Unauthorized", ""),
        ("GET", _) if mode == Mode::Silent => {
            std::thread::sleep(Duration::from_secs(5));
            return;
        }
        ("GET", "/latest/dynamic/instance-identity/document") if mode == Mode::Huge => {
            answer("200 OK", &" ".repeat(100 * 1024))
        }
        ("GET", "/latest/dynamic/instance-identity/document") if mode == Mode::Chunked => format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{document}\r\n0\r\n\r\n",
            document.len()
        ),
        ("GET", "/latest/dynamic/instance-identity/document") if mode == Mode::NoLength => {
            format!("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{document}")
        }
        ("GET", "/latest/dynamic/instance-identity/document") => answer("200 OK", document),
        ("GET", "/latest/dynamic/instance-identity/signature") => answer("200 OK", signature),
        _ => answer("404 Not Found", ""),
    };
    let _ = stream.write_all(reply.as_bytes());
}

/// A fake serving a document signed by a test AWS, and the attestor trusting it.
fn fixture() -> (FakeImds, crate::aws_iid::AwsIidAttestor, SystemTime) {
    let aws = aws();
    let (pending, now) = times();
    let document = document_for(INSTANCE, pending);
    let signature = aws.sign(&document);
    (FakeImds::start(document, signature), aws.attestor(), now)
}

#[test]
fn the_fake_refuses_reads_without_the_session_token_as_imdsv2_does() {
    let (imds, _, _) = fixture();
    let client = ImdsClient::new(&imds.url).unwrap();
    let token = client
        .request(
            "PUT",
            TOKEN_PATH,
            &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")],
        )
        .unwrap();
    assert_eq!(token, TOKEN);
    let with = client.request(
        "GET",
        DOCUMENT_PATH,
        &[("X-aws-ec2-metadata-token", &token)],
    );
    assert!(with.unwrap().contains(INSTANCE));
    assert_eq!(
        client.request("GET", DOCUMENT_PATH, &[]).unwrap_err(),
        ImdsError::Status {
            path: DOCUMENT_PATH,
            status: 401,
            hint: "; the session token was refused"
        }
    );
}

#[test]
fn the_agent_reads_its_evidence_through_imdsv2_and_the_server_verifies_it() {
    let (imds, attestor, now) = fixture();
    let agent = AwsIidEvidence::imds(&imds.url).unwrap();
    let node = attestor.verify(&agent.evidence().unwrap(), now).unwrap();
    assert_eq!(node.node_id, NODE_ID);
    let seen = imds.seen.lock().unwrap().clone();
    let seen: Vec<(&str, &str, bool)> = seen
        .iter()
        .map(|(m, p, t)| (m.as_str(), p.as_str(), *t))
        .collect();
    assert_eq!(
        seen,
        [
            ("PUT", TOKEN_PATH, false),
            ("GET", DOCUMENT_PATH, true),
            ("GET", SIGNATURE_PATH, true),
        ]
    );
}

fn unavailable(agent: &AwsIidEvidence) -> String {
    match agent.evidence() {
        Err(AttestError::Unavailable { attestor, reason }) => {
            assert_eq!(attestor, NAME);
            reason
        }
        other => panic!("expected the evidence to be unavailable, got {other:?}"),
    }
}

#[test]
fn an_answer_over_the_body_limit_is_refused() {
    let (imds, _, _) = fixture();
    let agent = AwsIidEvidence::imds(&imds.url).unwrap();
    assert!(agent.evidence().is_ok());
    imds.set(Mode::Huge);
    assert!(unavailable(&agent).contains("over 72 KiB"));
}

#[test]
fn a_silent_service_times_out_in_about_two_seconds() {
    let (imds, _, _) = fixture();
    let agent = AwsIidEvidence::imds(&imds.url).unwrap();
    assert!(agent.evidence().is_ok());
    imds.set(Mode::Silent);
    let started = Instant::now();
    let reason = unavailable(&agent);
    let took = started.elapsed();
    assert!(reason.contains("did not answer"), "{reason}");
    assert!(
        took >= TIMEOUT && took < TIMEOUT + Duration::from_secs(1),
        "{took:?}"
    );
}

#[test]
fn a_chunked_answer_is_refused() {
    let (imds, _, _) = fixture();
    let agent = AwsIidEvidence::imds(&imds.url).unwrap();
    assert!(agent.evidence().is_ok());
    imds.set(Mode::Chunked);
    assert!(unavailable(&agent).contains("transfer encoding"));
}

#[test]
fn an_unreachable_service_is_reported_with_its_address() {
    let (imds, _, _) = fixture();
    assert!(AwsIidEvidence::imds(&imds.url).unwrap().evidence().is_ok());
    // A port that was just free: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let agent = AwsIidEvidence::imds(&format!("http://127.0.0.1:{port}")).unwrap();
    let reason = unavailable(&agent);
    assert!(
        reason.contains(&format!("127.0.0.1:{port} could not be reached")),
        "{reason}"
    );
}

#[test]
fn base_urls_are_http_host_and_port_only() {
    for (url, host, port) in [
        ("http://169.254.169.254", "169.254.169.254", 80),
        ("http://169.254.169.254/", "169.254.169.254", 80),
        ("http://127.0.0.1:8080", "127.0.0.1", 8080),
        ("http://[fd00:ec2::254]", "fd00:ec2::254", 80),
        ("http://[fd00:ec2::254]:81", "fd00:ec2::254", 81),
        ("http://imds.local:81", "imds.local", 81),
    ] {
        let client = ImdsClient::new(url).unwrap();
        assert_eq!((client.host.as_str(), client.port), (host, port), "{url}");
    }
    for bad in [
        "",
        "169.254.169.254",
        "https://169.254.169.254",
        "http://",
        "http://host:port",
        "http://host:99999",
        "http://host/latest",
        "http://user@host",
        "http://ho st",
        "http://host\r\nX: y",
    ] {
        assert!(
            matches!(ImdsClient::new(bad), Err(ImdsError::BadUrl(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn a_body_ended_by_the_connections_close_is_read_whole() {
    let (imds, attestor, now) = fixture();
    let agent = AwsIidEvidence::imds(&imds.url).unwrap();
    let with_length = agent.evidence().unwrap();
    imds.set(Mode::NoLength);
    let at_close = agent.evidence().unwrap();
    assert_eq!(at_close, with_length);
    assert_eq!(attestor.verify(&at_close, now).unwrap().node_id, NODE_ID);
}

#[test]
fn a_session_token_that_would_inject_a_header_is_refused() {
    let (imds, _, _) = fixture();
    let agent = AwsIidEvidence::imds(&imds.url).unwrap();
    assert!(agent.evidence().is_ok());
    imds.set(Mode::InjectingToken);
    assert!(unavailable(&agent).contains("not one line of printable text"));
    // The token was refused before any read was sent with it.
    let seen = imds.seen.lock().unwrap();
    assert_eq!(seen.last().map(|(m, _, _)| m.as_str()), Some("PUT"));
}

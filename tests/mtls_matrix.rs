//! The `mtls` verifier matrix, over real TLS handshakes on real sockets (127.0.0.1), both
//! sides: our server verifier against a client presenting each case's certificate, and our
//! client verifier against a server presenting it. The matrix runs over each set of config
//! builders that uses the stack: the services' (`mtls::server_config`, `mtls::client_config`)
//! and the node API's (`server::node_tls_config`, optional client certificate, and
//! `client::node_tls_config`, the agent's). Every case runs on a fresh fixture, after a
//! positive control on that same fixture, and a refusal must name the rule it broke. Then
//! session resumption (it must never skip authorization), live updates of the source, and the
//! source fed by a Workload API over a Unix socket.
//!
//! The whole PKI is generated with rcgen at test time. Our configs run on a fixed clock, so
//! "expired by 1 s" and "not yet valid by 1 s" are exact, whatever the machine's load.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::Stream;
use mayfly::id::{Scope, TrustDomain};
use mayfly::mtls::{self, IdPattern, PeerPolicy, SvidSource, VerifiedPeer};
use mayfly::proto::workload as pb;
use mayfly::svid::{Bundles, Serial};
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::time_provider::TimeProvider;
use rustls::{DigitallySignedStruct, HandshakeKind, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::{Request, Response, Status};

const HOUR: Duration = Duration::from_secs(3600);
const SECOND: Duration = Duration::from_secs(1);
/// Whatever name a client dials: our verifiers never match it against the certificate.
const DIALED_NAME: &str = "not-the-peer.example";

// ---------------------------------------------------------------------------------------------
// Clock and PKI.

/// The instant every case is judged at: now, to the whole second (X.509 has no fractions).
fn judged_at() -> SystemTime {
    UNIX_EPOCH
        + Duration::from_secs(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
}

#[derive(Debug)]
struct FixedClock(SystemTime);

impl TimeProvider for FixedClock {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(
            self.0.duration_since(UNIX_EPOCH).unwrap(),
        ))
    }
}

fn datetime(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64)
        .unwrap()
}

fn random_serial() -> SerialNumber {
    SerialNumber::from_slice(Serial::generate().as_bytes())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A CA (root or intermediate) that can sign.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

/// A CA for trust domain `td` (URI SAN `spiffe://td`, CA=true, keyCertSign + cRLSign),
/// self-signed or signed by `parent`. Two CAs made with the same arguments differ only in key.
fn ca(
    td: &str,
    name: &str,
    parent: Option<&Ca>,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Ca {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Mayfly test");
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(
        Ia5String::try_from(format!("spiffe://{td}")).unwrap(),
    )];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = datetime(not_before);
    params.not_after = datetime(not_after);
    params.serial_number = Some(random_serial());
    let cert = match parent {
        None => params.self_signed(&key).unwrap(),
        Some(parent) => params.signed_by(&key, &parent.issuer).unwrap(),
    };
    Ca {
        issuer: Issuer::new(params, key),
        der: cert.der().clone(),
    }
}

/// A leaf certificate and its key, as a peer presents it.
#[derive(Clone)]
struct Svid {
    chain: Vec<CertificateDer<'static>>,
    key_pkcs8: Vec<u8>,
    /// The content octets of the leaf's serial number, as signed.
    serial: Vec<u8>,
}

impl Svid {
    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }
}

/// Everything a leaf can get wrong; [`LeafSpec::new`] is a correct X509-SVID.
#[derive(Clone)]
struct LeafSpec {
    sans: Vec<SanType>,
    is_ca: IsCa,
    key_usages: Vec<KeyUsagePurpose>,
    ekus: Vec<ExtendedKeyUsagePurpose>,
    not_before: SystemTime,
    not_after: SystemTime,
    /// The serial's DER content octets; a fresh Mayfly serial (16 octets) when `None`.
    serial: Option<Vec<u8>>,
}

/// A serial as pyca's `random_serial_number()` makes it: a positive 159-bit integer, 20 octets
/// of DER content.
fn pyca_serial() -> Vec<u8> {
    let mut octets = vec![0u8; 20];
    aws_lc_rs::rand::fill(&mut octets).unwrap();
    octets[0] = (octets[0] & 0x7f) | 0x40;
    octets
}

impl LeafSpec {
    fn new(uri: &str, now: SystemTime) -> Self {
        Self {
            sans: vec![uri_san(uri)],
            is_ca: IsCa::ExplicitNoCa,
            key_usages: vec![KeyUsagePurpose::DigitalSignature],
            ekus: vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            not_before: now - HOUR,
            not_after: now + HOUR,
            serial: None,
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }

    /// Signs the leaf with `issuer`; the chain sent is the leaf then `intermediates`.
    fn sign(&self, issuer: &Ca, intermediates: &[&Ca]) -> Svid {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let serial = self
            .serial
            .clone()
            .unwrap_or_else(|| Serial::generate().as_bytes().to_vec());
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Mayfly");
        params.distinguished_name = dn;
        params.subject_alt_names = self.sans.clone();
        params.is_ca = self.is_ca;
        params.key_usages = self.key_usages.clone();
        params.extended_key_usages = self.ekus.clone();
        params.not_before = datetime(self.not_before);
        params.not_after = datetime(self.not_after);
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let leaf = params.signed_by(&key, &issuer.issuer).unwrap();
        let mut chain = vec![leaf.der().clone()];
        chain.extend(intermediates.iter().map(|ca| ca.der.clone()));
        Svid {
            chain,
            key_pkcs8: key.serialize_der(),
            serial,
        }
    }
}

fn uri_san(uri: &str) -> SanType {
    SanType::URI(Ia5String::try_from(uri).unwrap())
}

fn dns_san(name: &str) -> SanType {
    SanType::DnsName(Ia5String::try_from(name).unwrap())
}

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

/// The PKI of one test: trust domains a.test and b.test, an intermediate under A, and an
/// impostor CA with A's trust domain, name and URI SAN (only its key differs).
struct Pki {
    now: SystemTime,
    ca_a: Ca,
    inter_a: Ca,
    inter_a_expired: Ca,
    ca_b: Ca,
    impostor_a: Ca,
}

impl Pki {
    fn new() -> Self {
        let now = judged_at();
        let (from, to) = (now - 24 * HOUR, now + 24 * HOUR);
        let ca_a = ca("a.test", "a.test CA", None, from, to);
        let inter_a = ca("a.test", "a.test intermediate", Some(&ca_a), from, to);
        let inter_a_expired = ca(
            "a.test",
            "a.test old intermediate",
            Some(&ca_a),
            from,
            now - SECOND,
        );
        let ca_b = ca("b.test", "b.test CA", None, from, to);
        let impostor_a = ca("a.test", "a.test CA", None, from, to);
        Self {
            now,
            ca_a,
            inter_a,
            inter_a_expired,
            ca_b,
            impostor_a,
        }
    }

    fn bundles(&self, domains: &[(&str, &[&Ca])]) -> Bundles {
        domains
            .iter()
            .map(|(name, cas)| (td(name), cas.iter().map(|ca| ca.der.clone()).collect()))
            .collect()
    }

    /// A and B, each with its own CA.
    fn trusted(&self) -> Bundles {
        self.bundles(&[("a.test", &[&self.ca_a]), ("b.test", &[&self.ca_b])])
    }

    fn leaf(&self, uri: &str) -> LeafSpec {
        LeafSpec::new(uri, self.now)
    }

    /// A correct SVID for `uri`, signed by A's CA.
    fn valid_a(&self, uri: &str) -> Svid {
        self.leaf(uri).sign(&self.ca_a, &[])
    }
}

// ---------------------------------------------------------------------------------------------
// The other end of a handshake: plain rustls, trusting nothing and checking nothing, so that
// every decision in these tests is our verifier's.

#[derive(Debug)]
struct AcceptAnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used here".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client presenting `svid` and accepting any server.
fn plain_client(svid: &Svid) -> rustls::ClientConfig {
    let provider = provider();
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        .with_client_auth_cert(svid.chain.clone(), svid.key())
        .unwrap()
}

/// A server presenting `svid`, asking for no client certificate, issuing tickets (rustls'
/// defaults: a session cache and two TLS 1.3 tickets per connection).
fn plain_server(svid: &Svid) -> rustls::ServerConfig {
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(svid.chain.clone(), svid.key())
        .unwrap()
}

fn on_clock(mut config: rustls::ServerConfig, now: SystemTime) -> rustls::ServerConfig {
    config.time_provider = Arc::new(FixedClock(now));
    config
}

fn on_clock_client(mut config: rustls::ClientConfig, now: SystemTime) -> rustls::ClientConfig {
    config.time_provider = Arc::new(FixedClock(now));
    config
}

// ---------------------------------------------------------------------------------------------
// One handshake over TCP.

/// What each end saw. An end "accepted" when its handshake completed and the application byte
/// exchange went through.
#[derive(Debug)]
struct Handshake {
    /// The server's view: the verified client (from `mtls::peer_of`), or its error.
    server: Result<Option<VerifiedPeer>, String>,
    /// The client's view: the verified server, or its error.
    client: Result<Option<VerifiedPeer>, String>,
    /// The leaf the server presented, as the client received it.
    server_leaf: Option<CertificateDer<'static>>,
    /// Full or resumed, as the client saw it.
    kind: Option<HandshakeKind>,
}

impl Handshake {
    fn both_accepted(&self) -> bool {
        self.server.is_ok() && self.client.is_ok()
    }
}

async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> Handshake {
    tokio::time::timeout(Duration::from_secs(20), handshake_inner(server, client))
        .await
        .expect("the handshake hung")
}

async fn handshake_inner(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> Handshake {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server);
    let server_end = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = mtls::peer_of(tls.get_ref().1);
        tls.write_all(b"ok").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });

    let connector = TlsConnector::from(client);
    let name = ServerName::try_from(DIALED_NAME).unwrap();
    let mut server_leaf = None;
    let mut kind = None;
    let client_end = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let connection = tls.get_ref().1;
        server_leaf = connection
            .peer_certificates()
            .and_then(|certs| certs.first().cloned())
            .map(CertificateDer::into_owned);
        kind = connection.handshake_kind();
        let peer = mtls::peer_of(connection);
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        if answer != b"ok" {
            return Err(format!("the server answered {answer:?}"));
        }
        Ok(peer)
    }
    .await;
    let server_end = server_end.await.unwrap();
    Handshake {
        server: server_end,
        client: client_end,
        server_leaf,
        kind,
    }
}

// ---------------------------------------------------------------------------------------------
// The matrix.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    /// Our `server_config` verifies the case certificate, presented by a plain client.
    Server,
    /// Our `client_config` verifies the case certificate, presented by a plain server.
    Client,
}

enum Expect {
    Accept,
    /// Refused, with an error containing this text (the rule broken).
    Refuse(&'static str),
}

struct Case {
    name: &'static str,
    /// Accepted on the same fixture just before the case.
    control: Svid,
    /// Bundles installed in the source between the control and the case, if any.
    update: Option<Bundles>,
    presented: Svid,
    expect: Expect,
}

/// The policy of every matrix fixture: workloads below `/workloads` of A or B, or exactly
/// `spiffe://a.test/billing`, carrying scope `db:read`.
fn matrix_policy() -> PeerPolicy {
    PeerPolicy::parse_ids(&[
        "spiffe://a.test/workloads/*",
        "spiffe://b.test/workloads/*",
        "spiffe://a.test/billing",
    ])
    .unwrap()
    .require_scope(Scope::parse("db:read").unwrap())
}

const GOOD: &str = "spiffe://a.test/workloads/bot/scope/db.read";
const GOOD_B: &str = "spiffe://b.test/workloads/bot/scope/db.read";

fn cases(pki: &Pki) -> Vec<Case> {
    let now = pki.now;
    let control = pki.valid_a(GOOD);
    let control_b = pki.leaf(GOOD_B).sign(&pki.ca_b, &[]);
    let case = |name, presented, expect| Case {
        name,
        control: control.clone(),
        update: None,
        presented,
        expect,
    };
    let refuse_a = |name, uri: &str, rule| case(name, pki.valid_a(uri), Expect::Refuse(rule));
    let not_allowed = "is not allowed";
    let lacks = "lacks the required scope 'db:read'";
    vec![
        // Accepted.
        case("valid", pki.valid_a(GOOD), Expect::Accept),
        case(
            "via an intermediate",
            pki.leaf(GOOD).sign(&pki.inter_a, &[&pki.inter_a]),
            Expect::Accept,
        ),
        case(
            "extra DNS SAN (never matched against the dialed name)",
            pki.leaf(GOOD)
                .with(|l| l.sans.push(dns_san("bot.a.test")))
                .sign(&pki.ca_a, &[]),
            Expect::Accept,
        ),
        case(
            "valid for one more second",
            pki.leaf(GOOD)
                .with(|l| l.not_after = now + SECOND)
                .sign(&pki.ca_a, &[]),
            Expect::Accept,
        ),
        case(
            "valid for one second already",
            pki.leaf(GOOD)
                .with(|l| l.not_before = now - SECOND)
                .sign(&pki.ca_a, &[]),
            Expect::Accept,
        ),
        case(
            "trust domain B signed by B's CA",
            pki.leaf(GOOD_B).sign(&pki.ca_b, &[]),
            Expect::Accept,
        ),
        case(
            "exactly the allowed ID",
            pki.valid_a("spiffe://a.test/billing/scope/db.read"),
            Expect::Accept,
        ),
        case(
            "more scopes than required",
            pki.valid_a("spiffe://a.test/workloads/bot/scope/db.read/db.write"),
            Expect::Accept,
        ),
        case(
            "deeper below the allowed prefix",
            pki.valid_a("spiffe://a.test/workloads/team/bot/scope/db.read"),
            Expect::Accept,
        ),
        case(
            "20-octet serial (pyca's random_serial_number), signed by A's CA",
            pki.leaf(GOOD)
                .with(|l| l.serial = Some(pyca_serial()))
                .sign(&pki.ca_a, &[]),
            Expect::Accept,
        ),
        case(
            "1-octet serial, signed by A's CA",
            pki.leaf(GOOD)
                .with(|l| l.serial = Some(vec![0x01]))
                .sign(&pki.ca_a, &[]),
            Expect::Accept,
        ),
        // The chain and its trust domain.
        case(
            "untrusted CA with the same trust domain name",
            pki.leaf(GOOD).sign(&pki.impostor_a, &[]),
            Expect::Refuse("does not lead to a root"),
        ),
        case(
            "untrusted CA presented as the intermediate",
            pki.leaf(GOOD).sign(&pki.impostor_a, &[&pki.impostor_a]),
            Expect::Refuse("does not lead to a root"),
        ),
        case(
            "intermediate not sent",
            pki.leaf(GOOD).sign(&pki.inter_a, &[]),
            Expect::Refuse("does not lead to a root"),
        ),
        Case {
            name: "trust domain B signed by A's CA",
            control: control_b.clone(),
            update: None,
            presented: pki.leaf(GOOD_B).sign(&pki.ca_a, &[]),
            expect: Expect::Refuse("does not lead to a root"),
        },
        case(
            "trust domain A signed by B's CA",
            pki.leaf(GOOD).sign(&pki.ca_b, &[]),
            Expect::Refuse("does not lead to a root"),
        ),
        case(
            "trust domain without a bundle, signed by A's CA",
            pki.valid_a("spiffe://c.test/workloads/bot/scope/db.read"),
            Expect::Refuse("no trust bundle is known for trust domain 'c.test'"),
        ),
        Case {
            name: "CA removed from the bundle after an update (trust domain dropped)",
            control: control.clone(),
            update: Some(pki.bundles(&[("b.test", &[&pki.ca_b])])),
            presented: pki.valid_a(GOOD),
            expect: Expect::Refuse("no trust bundle is known for trust domain 'a.test'"),
        },
        Case {
            name: "CA removed from the bundle after an update (replaced by another CA)",
            control: control.clone(),
            update: Some(pki.bundles(&[("a.test", &[&pki.impostor_a]), ("b.test", &[&pki.ca_b])])),
            presented: control.clone(),
            expect: Expect::Refuse("does not lead to a root"),
        },
        case(
            "chain longer than 8 certificates",
            pki.leaf(GOOD).sign(&pki.inter_a, &[&pki.inter_a; 8]),
            Expect::Refuse("over the limit of 8"),
        ),
        case(
            "21-octet serial, over RFC 5280's 20, signed by A's CA",
            pki.leaf(GOOD)
                .with(|l| l.serial = Some([vec![0x01], pyca_serial()].concat()))
                .sign(&pki.ca_a, &[]),
            Expect::Refuse("at most 20 octets"),
        ),
        // Validity, at the handshake's time.
        case(
            "expired by 1 s",
            pki.leaf(GOOD)
                .with(|l| l.not_after = now - SECOND)
                .sign(&pki.ca_a, &[]),
            Expect::Refuse("has expired"),
        ),
        case(
            "not yet valid by 1 s",
            pki.leaf(GOOD)
                .with(|l| l.not_before = now + SECOND)
                .sign(&pki.ca_a, &[]),
            Expect::Refuse("not valid yet"),
        ),
        case(
            "intermediate expired by 1 s",
            pki.leaf(GOOD)
                .sign(&pki.inter_a_expired, &[&pki.inter_a_expired]),
            Expect::Refuse("has expired"),
        ),
        // The X509-SVID leaf rules.
        case(
            "CA=true leaf",
            pki.leaf(GOOD)
                .with(|l| l.is_ca = IsCa::Ca(BasicConstraints::Unconstrained))
                .sign(&pki.ca_a, &[]),
            Expect::Refuse("is a CA (basicConstraints CA=true)"),
        ),
        case(
            "keyCertSign",
            pki.leaf(GOOD)
                .with(|l| l.key_usages.push(KeyUsagePurpose::KeyCertSign))
                .sign(&pki.ca_a, &[]),
            Expect::Refuse("has the key usage keyCertSign"),
        ),
        case(
            "cRLSign",
            pki.leaf(GOOD)
                .with(|l| l.key_usages.push(KeyUsagePurpose::CrlSign))
                .sign(&pki.ca_a, &[]),
            Expect::Refuse("has the key usage cRLSign"),
        ),
        case(
            "no digitalSignature",
            pki.leaf(GOOD)
                .with(|l| l.key_usages = vec![KeyUsagePurpose::KeyEncipherment])
                .sign(&pki.ca_a, &[]),
            Expect::Refuse("lacks the digitalSignature key usage"),
        ),
        case(
            "extended key usage codeSigning only",
            pki.leaf(GOOD)
                .with(|l| l.ekus = vec![ExtendedKeyUsagePurpose::CodeSigning])
                .sign(&pki.ca_a, &[]),
            Expect::Refuse("extended key usage lacks"),
        ),
        case(
            "two URI SANs",
            pki.leaf(GOOD)
                .with(|l| {
                    l.sans
                        .push(uri_san("spiffe://a.test/workloads/other/scope/db.read"))
                })
                .sign(&pki.ca_a, &[]),
            Expect::Refuse("has 2 URI SANs"),
        ),
        case(
            "no URI SAN (a DNS SAN only)",
            pki.leaf(GOOD)
                .with(|l| l.sans = vec![dns_san("bot.a.test")])
                .sign(&pki.ca_a, &[]),
            Expect::Refuse("has no URI SAN"),
        ),
        case(
            "no SAN at all",
            pki.leaf(GOOD).with(|l| l.sans.clear()).sign(&pki.ca_a, &[]),
            Expect::Refuse("has no URI SAN"),
        ),
        refuse_a(
            "a non-spiffe URI",
            "https://a.test/workloads/bot/scope/db.read",
            "is not a valid SPIFFE ID",
        ),
        refuse_a(
            "an uppercase scheme",
            "SPIFFE://a.test/workloads/bot/scope/db.read",
            "is not a valid SPIFFE ID",
        ),
        refuse_a(
            "root-path ID",
            "spiffe://a.test",
            "names a trust domain, not a workload",
        ),
        // Authorization: the identity.
        refuse_a(
            "trusted ID outside the allowed ones",
            "spiffe://a.test/services/bot/scope/db.read",
            not_allowed,
        ),
        case(
            "trusted trust domain B, outside the allowed ones",
            pki.leaf("spiffe://b.test/services/bot/scope/db.read")
                .sign(&pki.ca_b, &[]),
            Expect::Refuse(not_allowed),
        ),
        refuse_a(
            "prefix pattern, no segment boundary (/workloadsx)",
            "spiffe://a.test/workloadsx/bot/scope/db.read",
            not_allowed,
        ),
        refuse_a(
            "prefix pattern's own path (/workloads itself)",
            "spiffe://a.test/workloads/scope/db.read",
            not_allowed,
        ),
        refuse_a(
            "prefix pattern, other case (/Workloads)",
            "spiffe://a.test/Workloads/bot/scope/db.read",
            not_allowed,
        ),
        refuse_a(
            "exact ID plus an extra segment",
            "spiffe://a.test/billing/extra/scope/db.read",
            not_allowed,
        ),
        refuse_a(
            "exact ID, no segment boundary (/billingx)",
            "spiffe://a.test/billingx/scope/db.read",
            not_allowed,
        ),
        refuse_a(
            "exact ID, other case (/Billing)",
            "spiffe://a.test/Billing/scope/db.read",
            not_allowed,
        ),
        // Authorization: the scopes.
        refuse_a("scope missing", "spiffe://a.test/workloads/bot", lacks),
        refuse_a(
            "another scope only",
            "spiffe://a.test/workloads/bot/scope/db.write",
            lacks,
        ),
        refuse_a(
            "scope prefix confusion: read-admin for read",
            "spiffe://a.test/workloads/bot/scope/db.read-admin",
            lacks,
        ),
        refuse_a(
            "scope prefix confusion: extra token (db:read:all)",
            "spiffe://a.test/workloads/bot/scope/db.read.all",
            lacks,
        ),
        refuse_a(
            "scope prefix confusion: fewer tokens (db)",
            "spiffe://a.test/workloads/bot/scope/db",
            lacks,
        ),
        refuse_a(
            "scope prefix confusion: truncated token (db:rea)",
            "spiffe://a.test/workloads/bot/scope/db.rea",
            lacks,
        ),
        refuse_a(
            "scope as a plain path segment, no scope mark",
            "spiffe://a.test/workloads/bot/db.read",
            lacks,
        ),
        refuse_a(
            "scope after a look-alike mark (/scopes/)",
            "spiffe://a.test/workloads/bot/scopes/db.read",
            lacks,
        ),
        refuse_a(
            "scope in another case (DB.READ)",
            "spiffe://a.test/workloads/bot/scope/DB.READ",
            "malformed scope list",
        ),
        refuse_a(
            "scope in another case (db.Read)",
            "spiffe://a.test/workloads/bot/scope/db.Read",
            "malformed scope list",
        ),
        refuse_a(
            "scopes out of order",
            "spiffe://a.test/workloads/bot/scope/db.write/db.read",
            "malformed scope list",
        ),
        refuse_a(
            "scope mark with no scope",
            "spiffe://a.test/workloads/bot/scope",
            "malformed scope list",
        ),
    ]
}

/// The URI of a leaf's first URI SAN, for comparing with what `peer_of` reports.
fn first_uri(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::certificate::X509Certificate;
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::FromDer;
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => Some((*u).to_owned()),
        _ => None,
    })
}

/// The config builders a matrix runs over: a server config and a client config from a source
/// and a policy, as a user of the stack builds them.
#[derive(Clone, Copy)]
struct Configs {
    name: &'static str,
    server: fn(&SvidSource, PeerPolicy) -> rustls::ServerConfig,
    client: fn(&SvidSource, PeerPolicy) -> rustls::ClientConfig,
}

fn services_server(source: &SvidSource, policy: PeerPolicy) -> rustls::ServerConfig {
    mtls::server_config(source, policy).unwrap()
}

fn services_client(source: &SvidSource, policy: PeerPolicy) -> rustls::ClientConfig {
    mtls::client_config(source, policy).unwrap()
}

fn node_server(source: &SvidSource, policy: PeerPolicy) -> rustls::ServerConfig {
    mayfly::server::node_tls_config(source, policy).unwrap()
}

fn node_client(source: &SvidSource, policy: PeerPolicy) -> rustls::ClientConfig {
    mayfly::client::node_tls_config(source, policy).unwrap()
}

/// Services and the proxy: a client certificate is required.
const SERVICES: Configs = Configs {
    name: "services (mtls::server_config, mtls::client_config)",
    server: services_server,
    client: services_client,
};

/// The node API: the server's config (a client certificate optional, for attestation) and the
/// agent's client config. In production their policies are agent IDs only and exactly the
/// server's ID; the matrix gives them its own policy, to run the same cases.
const NODE_API: Configs = Configs {
    name: "node API (server::node_tls_config, client::node_tls_config)",
    server: node_server,
    client: node_client,
};

/// One handshake on `side`, with `presented` at the other end; returns our end's verdict.
async fn run_side(
    side: Side,
    configs: Configs,
    pki: &Pki,
    source: &SvidSource,
    presented: &Svid,
) -> (Result<Option<VerifiedPeer>, String>, Handshake) {
    let outcome = match side {
        Side::Server => {
            let ours = on_clock((configs.server)(source, matrix_policy()), pki.now);
            handshake(Arc::new(ours), Arc::new(plain_client(presented))).await
        }
        Side::Client => {
            let ours = on_clock_client((configs.client)(source, matrix_policy()), pki.now);
            handshake(Arc::new(plain_server(presented)), Arc::new(ours)).await
        }
    };
    let verdict = match side {
        Side::Server => outcome.server.clone(),
        Side::Client => outcome.client.clone(),
    };
    (verdict, outcome)
}

/// Checks an accepted verdict against the presented leaf: `peer_of` reports its identity,
/// serial and notAfter.
fn check_peer(peer: Option<&VerifiedPeer>, presented: &Svid) -> Result<(), String> {
    let peer = peer.ok_or("accepted, but mtls::peer_of returned nothing")?;
    let uri = first_uri(&presented.chain[0]).unwrap();
    if peer.id.to_string() != uri {
        return Err(format!("peer_of says {} but the leaf says {uri}", peer.id));
    }
    if peer.serial.as_bytes() != presented.serial {
        return Err(format!(
            "peer_of serial {} is not the leaf's {}",
            peer.serial,
            hex::encode(&presented.serial)
        ));
    }
    Ok(())
}

async fn run_matrix(side: Side, configs: Configs) {
    let pki = Pki::new();
    let own_uri = match side {
        Side::Server => "spiffe://a.test/svc/server",
        Side::Client => "spiffe://a.test/svc/client",
    };
    let own = pki.valid_a(own_uri);
    let cases = cases(&pki);
    let mut report = Vec::new();
    let mut failures = Vec::new();
    let (mut accepted, mut refused, mut false_accepts) = (0, 0, 0);
    for case in &cases {
        // A fresh fixture per case: our source, trusting A and B.
        let source =
            SvidSource::from_parts(own.chain.clone(), &own.key_pkcs8, pki.trusted()).unwrap();

        let (control, _) = run_side(side, configs, &pki, &source, &case.control).await;
        if let Err(e) = control
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|p| check_peer(p.as_ref(), &case.control))
        {
            failures.push(format!("{}: positive control refused: {e}", case.name));
            continue;
        }
        if let Some(bundles) = &case.update {
            source.set_bundles(bundles.clone()).unwrap();
        }

        let (verdict, outcome) = run_side(side, configs, &pki, &source, &case.presented).await;
        match (&case.expect, &verdict) {
            (Expect::Accept, Ok(peer)) => match check_peer(peer.as_ref(), &case.presented) {
                Ok(()) => {
                    accepted += 1;
                    report.push(format!("  accepted  {}", case.name));
                }
                Err(e) => failures.push(format!("{}: {e}", case.name)),
            },
            (Expect::Accept, Err(e)) => failures.push(format!("{}: refused: {e}", case.name)),
            (Expect::Refuse(_), Ok(_)) => {
                false_accepts += 1;
                failures.push(format!("{}: FALSE ACCEPT", case.name));
            }
            (Expect::Refuse(rule), Err(e)) => {
                // The refusal is our verifier's, naming the rule, and the other end did not
                // carry on as if connected.
                if !e.contains("invalid peer certificate") || !e.contains(rule) {
                    failures.push(format!(
                        "{}: refused for the wrong reason: {e} (wanted '{rule}')",
                        case.name
                    ));
                } else if outcome.both_accepted() {
                    failures.push(format!(
                        "{}: the other end completed: {outcome:?}",
                        case.name
                    ));
                } else {
                    refused += 1;
                    report.push(format!("  refused   {}: {e}", case.name));
                }
            }
        }
    }
    println!(
        "{}, {side:?} side: {} cases (each after its positive control): {accepted} accepted, {refused} refused, {false_accepts} false accepts\n{}",
        configs.name,
        cases.len(),
        report.join("\n")
    );
    assert!(
        failures.is_empty(),
        "{}, {side:?} side:\n{}",
        configs.name,
        failures.join("\n")
    );
    assert_eq!(false_accepts, 0);
    assert_eq!(accepted + refused, cases.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_matrix() {
    run_matrix(Side::Server, SERVICES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_side_matrix() {
    run_matrix(Side::Client, SERVICES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_api_server_side_matrix() {
    run_matrix(Side::Server, NODE_API).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_api_client_side_matrix() {
    run_matrix(Side::Client, NODE_API).await;
}

// ---------------------------------------------------------------------------------------------
// The node API's own policies and its optional client certificate.

/// A client presenting no certificate and accepting any server.
fn anonymous_client() -> rustls::ClientConfig {
    let provider = provider();
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        .with_no_client_auth()
}

/// The node API's server config completes a handshake with a client that presents no
/// certificate (an agent about to attest) and reports no peer for it; the services' config,
/// on the same fixture, refuses that client. A client that does present one is verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_api_server_lets_a_client_without_a_certificate_through_with_no_peer() {
    let pki = Pki::new();
    let own = pki.valid_a("spiffe://a.test/mayfly/server");
    let source = SvidSource::from_parts(own.chain.clone(), &own.key_pkcs8, pki.trusted()).unwrap();
    let node = Arc::new(on_clock(
        mayfly::server::node_tls_config(&source, matrix_policy()).unwrap(),
        pki.now,
    ));

    // Control: a client with a good SVID is verified and reported.
    let good = pki.valid_a(GOOD);
    let with_cert = handshake(node.clone(), Arc::new(plain_client(&good))).await;
    check_peer(with_cert.server.as_ref().unwrap().as_ref(), &good).unwrap();

    let without = handshake(node.clone(), Arc::new(anonymous_client())).await;
    assert!(without.both_accepted(), "{without:?}");
    assert_eq!(without.server.unwrap(), None, "no certificate, no peer");

    // A certificate that is presented is still verified: optional is not unchecked.
    let expired = pki
        .leaf(GOOD)
        .with(|l| l.not_after = pki.now - SECOND)
        .sign(&pki.ca_a, &[]);
    let refused = handshake(node, Arc::new(plain_client(&expired))).await;
    assert!(refused.server.unwrap_err().contains("has expired"));

    // The services' config requires a certificate.
    let services = Arc::new(on_clock(
        mtls::server_config(&source, matrix_policy()).unwrap(),
        pki.now,
    ));
    let refused = handshake(services, Arc::new(anonymous_client())).await;
    let error = refused.server.unwrap_err();
    assert!(error.contains("peer sent no certificates"), "{error}");
}

/// The node server's production policy admits agents of its trust domain only: a valid
/// workload SVID of that trust domain is refused in the handshake, an agent SVID accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_api_server_policy_admits_agents_only() {
    let pki = Pki::new();
    let own = pki.valid_a("spiffe://a.test/mayfly/server");
    let source = SvidSource::from_parts(own.chain.clone(), &own.key_pkcs8, pki.trusted()).unwrap();
    let node = Arc::new(on_clock(
        mayfly::server::node_tls_config(&source, mayfly::server::agent_policy(&td("a.test")))
            .unwrap(),
        pki.now,
    ));
    let agent = pki.valid_a("spiffe://a.test/mayfly/agent/join_token/n1");
    let accepted = handshake(node.clone(), Arc::new(plain_client(&agent))).await;
    check_peer(accepted.server.as_ref().unwrap().as_ref(), &agent).unwrap();

    for refused_id in [
        "spiffe://a.test/workloads/bot",
        GOOD,
        "spiffe://a.test/mayfly/server",
        "spiffe://a.test/mayfly/agentx/join_token/n1",
        "spiffe://b.test/mayfly/agent/join_token/n1",
    ] {
        let ca = if refused_id.starts_with("spiffe://b.test") {
            &pki.ca_b
        } else {
            &pki.ca_a
        };
        let svid = pki.leaf(refused_id).sign(ca, &[]);
        let refused = handshake(node.clone(), Arc::new(plain_client(&svid))).await;
        let error = refused.server.unwrap_err();
        assert!(error.contains("is not allowed"), "{refused_id}: {error}");
    }
}

/// The agent's production policy accepts exactly the server's ID: another valid SVID of the
/// trust domain at the server's address is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_client_accepts_exactly_the_server_id() {
    let pki = Pki::new();
    let own = pki.valid_a("spiffe://a.test/mayfly/agent/join_token/n1");
    let source = SvidSource::from_parts(own.chain.clone(), &own.key_pkcs8, pki.trusted()).unwrap();
    let server_id = mayfly::wire::server_id(&td("a.test"));
    let agent = || {
        let policy = mayfly::client::server_policy(&server_id).unwrap();
        Arc::new(on_clock_client(
            mayfly::client::node_tls_config(&source, policy).unwrap(),
            pki.now,
        ))
    };
    let server = pki.valid_a("spiffe://a.test/mayfly/server");
    let accepted = handshake(Arc::new(plain_server(&server)), agent()).await;
    check_peer(accepted.client.as_ref().unwrap().as_ref(), &server).unwrap();
    for refused_id in [
        "spiffe://a.test/mayfly/server/x",
        "spiffe://a.test/mayfly/agent/join_token/n2",
        "spiffe://a.test/workloads/bot",
    ] {
        let impostor = pki.valid_a(refused_id);
        let refused = handshake(Arc::new(plain_server(&impostor)), agent()).await;
        let error = refused.client.unwrap_err();
        assert!(error.contains("is not allowed"), "{refused_id}: {error}");
    }
}

// ---------------------------------------------------------------------------------------------
// Session resumption never skips authorization.

fn ticket_count(store: &ClientSessionMemoryCache, name: &ServerName<'static>) -> usize {
    let mut n = 0;
    while store.take_tls13_ticket(name).is_some() {
        n += 1;
    }
    n
}

/// A listener that (wrongly) keeps sessions is fooled: after trust is removed, a client with a
/// ticket comes back in without the verifier running. Ours stores nothing and issues no
/// ticket, so the same reconnection, ticket in hand, runs the verifier and is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumption_cannot_skip_authorization_server_side() {
    let pki = Pki::new();
    let server_svid = pki.valid_a("spiffe://a.test/svc/server");
    let client_svid = pki.valid_a(GOOD);
    let name = ServerName::try_from(DIALED_NAME).unwrap();
    let without_a = pki.bundles(&[("b.test", &[&pki.ca_b])]);
    let client_with = |store: &Arc<ClientSessionMemoryCache>| {
        let mut config = plain_client(&client_svid);
        config.resumption = Resumption::store(store.clone());
        Arc::new(config)
    };

    // Control: resumption turned back on, on top of our config.
    let careless_source = SvidSource::from_parts(
        server_svid.chain.clone(),
        &server_svid.key_pkcs8,
        pki.trusted(),
    )
    .unwrap();
    let mut careless = mtls::server_config(&careless_source, matrix_policy()).unwrap();
    careless.session_storage = rustls::server::ServerSessionMemoryCache::new(64);
    careless.send_tls13_tickets = 2;
    let careless = Arc::new(careless);
    let store = Arc::new(ClientSessionMemoryCache::new(64));
    let client = client_with(&store);
    let first = handshake(careless.clone(), client.clone()).await;
    assert!(first.both_accepted(), "{first:?}");
    assert_eq!(first.kind, Some(HandshakeKind::Full));
    careless_source.set_bundles(without_a.clone()).unwrap();
    let resumed = handshake(careless.clone(), client.clone()).await;
    assert!(
        resumed.both_accepted() && resumed.kind == Some(HandshakeKind::Resumed),
        "the control must show the hole resumption opens: {resumed:?}"
    );

    // Ours.
    let source = SvidSource::from_parts(
        server_svid.chain.clone(),
        &server_svid.key_pkcs8,
        pki.trusted(),
    )
    .unwrap();
    let ours = Arc::new(mtls::server_config(&source, matrix_policy()).unwrap());
    let store = Arc::new(ClientSessionMemoryCache::new(64));
    let client = client_with(&store);
    let first = handshake(ours.clone(), client.clone()).await;
    assert!(first.both_accepted(), "positive control: {first:?}");
    assert_eq!(first.kind, Some(HandshakeKind::Full));
    assert_eq!(
        ticket_count(&store, &name),
        0,
        "our listener issued a ticket"
    );

    // Give the client tickets for the same server name (from a plain listener that issues
    // two per connection), then remove trust and reconnect to ours, offering one.
    let seeded = handshake(Arc::new(plain_server(&server_svid)), client.clone()).await;
    assert!(seeded.client.is_ok(), "{seeded:?}");
    assert!(
        store.take_tls13_ticket(&name).is_some(),
        "the client holds tickets"
    );
    source.set_bundles(without_a).unwrap();
    let again = handshake(ours.clone(), client.clone()).await;
    let error = again
        .server
        .expect_err("reconnecting with a ticket after trust was removed must be refused");
    assert!(
        error.contains("no trust bundle is known for trust domain 'a.test'"),
        "{error}"
    );
    assert_eq!(
        ticket_count(&store, &name),
        0,
        "the client offered its last ticket"
    );
    assert_ne!(again.kind, Some(HandshakeKind::Resumed));
}

/// Our client never resumes: a careless client (our config with resumption turned back on)
/// accepts a server it no longer trusts on a ticket; ours runs the verifier and refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumption_cannot_skip_authorization_client_side() {
    let pki = Pki::new();
    let server = Arc::new(plain_server(&pki.valid_a(GOOD)));
    let own = pki.valid_a("spiffe://a.test/svc/client");
    let without_a = pki.bundles(&[("b.test", &[&pki.ca_b])]);

    let careless_source =
        SvidSource::from_parts(own.chain.clone(), &own.key_pkcs8, pki.trusted()).unwrap();
    let mut careless = mtls::client_config(&careless_source, matrix_policy()).unwrap();
    careless.resumption = Resumption::in_memory_sessions(64);
    let careless = Arc::new(careless);
    assert!(
        handshake(server.clone(), careless.clone())
            .await
            .both_accepted()
    );
    careless_source.set_bundles(without_a.clone()).unwrap();
    let resumed = handshake(server.clone(), careless).await;
    assert!(
        resumed.both_accepted() && resumed.kind == Some(HandshakeKind::Resumed),
        "the control must show the hole resumption opens: {resumed:?}"
    );

    let source = SvidSource::from_parts(own.chain.clone(), &own.key_pkcs8, pki.trusted()).unwrap();
    let ours = Arc::new(mtls::client_config(&source, matrix_policy()).unwrap());
    let first = handshake(server.clone(), ours.clone()).await;
    assert!(first.both_accepted(), "positive control: {first:?}");
    source.set_bundles(without_a).unwrap();
    let again = handshake(server.clone(), ours).await;
    let error = again
        .client
        .expect_err("a server no longer trusted must be refused");
    assert!(
        error.contains("no trust bundle is known for trust domain 'a.test'"),
        "{error}"
    );
}

// ---------------------------------------------------------------------------------------------
// Live updates, given in code.

/// Rotating the source's SVID changes what the next handshake presents, and the client reads
/// the server's identity with `peer_of`; connections need no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_and_bundle_updates_apply_to_the_next_handshake() {
    let pki = Pki::new();
    let first = pki.valid_a("spiffe://a.test/svc/server/scope/db.read");
    let second = pki
        .leaf("spiffe://a.test/svc/server/scope/db.read")
        .sign(&pki.inter_a, &[&pki.inter_a]);
    let source =
        SvidSource::from_parts(first.chain.clone(), &first.key_pkcs8, pki.trusted()).unwrap();
    let server = Arc::new(mtls::server_config(&source, matrix_policy()).unwrap());
    let client_svid = pki.valid_a(GOOD);
    let other = pki.valid_a(GOOD);
    assert!(
        SvidSource::from_parts(client_svid.chain.clone(), &other.key_pkcs8, pki.trusted()).is_err(),
        "a key that does not fit its leaf is refused"
    );
    let client_source = SvidSource::from_parts(
        client_svid.chain.clone(),
        &client_svid.key_pkcs8,
        pki.trusted(),
    )
    .unwrap();
    let expect_server = PeerPolicy::exact("spiffe://a.test/svc/server".parse().unwrap())
        .unwrap()
        .require_scope(Scope::parse("db:read").unwrap());
    let client = Arc::new(mtls::client_config(&client_source, expect_server).unwrap());

    let before = handshake(server.clone(), client.clone()).await;
    assert!(before.both_accepted(), "{before:?}");
    let seen = before.client.unwrap().unwrap();
    assert_eq!(seen.serial.as_bytes(), first.serial);
    assert_eq!(seen.id.base().as_str(), "spiffe://a.test/svc/server");
    assert_eq!(
        before.server.unwrap().unwrap().id.to_string(),
        GOOD,
        "the server reads the client's identity and scopes"
    );

    let changes = source.subscribe();
    source
        .set_svid(second.chain.clone(), &second.key_pkcs8)
        .unwrap();
    assert!(changes.has_changed().unwrap());
    let after = handshake(server.clone(), client.clone()).await;
    assert!(after.both_accepted(), "{after:?}");
    assert_eq!(
        after.client.unwrap().unwrap().serial.as_bytes(),
        second.serial
    );
    assert_eq!(after.server_leaf.as_ref(), Some(&second.chain[0]));

    // An unusable SVID is refused and the current one stays.
    assert!(source.set_svid(Vec::new(), &second.key_pkcs8).is_err());
    assert!(
        source
            .set_svid(pki.valid_a("spiffe://a.test/x").chain, &second.key_pkcs8)
            .is_err()
    );
    assert_eq!(
        source.svid_id().unwrap().base().as_str(),
        "spiffe://a.test/svc/server"
    );

    // The client stops trusting A: the next handshake fails on the client's side.
    client_source
        .set_bundles(pki.bundles(&[("b.test", &[&pki.ca_b])]))
        .unwrap();
    let refused = handshake(server, client).await;
    assert!(
        refused
            .client
            .unwrap_err()
            .contains("no trust bundle is known for trust domain 'a.test'")
    );
    assert_eq!(client_source.bundles().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// The source fed by a Workload API.

/// A third-party Workload API server of the kind Mayfly's agent is not: one without
/// FetchX509Bundles (older SPIFFE implementations predate that RPC). Mayfly's own agent serves
/// both streams and is tested as itself in tests/proxy_e2e.rs; this stand-in exists only to show
/// the source's fallback for such servers, speaking the real protocol: each message the full
/// current state, a new one on every change.
struct FakeAgent {
    svids: watch::Receiver<pb::X509svidResponse>,
}

type FakeStream<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

#[tonic::async_trait]
impl pb::spiffe_workload_api_server::SpiffeWorkloadApi for FakeAgent {
    type FetchX509SVIDStream = FakeStream<pb::X509svidResponse>;
    type FetchX509BundlesStream = FakeStream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = FakeStream<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        _request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let mut feed = self.svids.clone();
        Ok(Response::new(Box::pin(async_stream::stream! {
            loop {
                let current = feed.borrow_and_update().clone();
                yield Ok(current);
                if feed.changed().await.is_err() {
                    break;
                }
            }
        })))
    }

    async fn fetch_x509_bundles(
        &self,
        _request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented("no FetchX509Bundles here"))
    }

    async fn fetch_jwtsvid(
        &self,
        _request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        Err(Status::unimplemented("no JWT"))
    }

    async fn fetch_jwt_bundles(
        &self,
        _request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("no JWT"))
    }

    async fn validate_jwtsvid(
        &self,
        _request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("no JWT"))
    }
}

fn serve_fake(path: &Path, agent: FakeAgent) {
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(pb::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(agent))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await
            .unwrap();
    });
}

fn svid_message(
    svid: &Svid,
    uri: &str,
    bundle: &[&Ca],
    federated: &[(&str, &[&Ca])],
) -> pb::X509svidResponse {
    let concat = |cas: &[&Ca]| {
        cas.iter()
            .flat_map(|ca| ca.der.to_vec())
            .collect::<Vec<u8>>()
    };
    pb::X509svidResponse {
        svids: vec![pb::X509svid {
            spiffe_id: uri.to_owned(),
            x509_svid: svid.chain.iter().flat_map(|c| c.to_vec()).collect(),
            x509_svid_key: svid.key_pkcs8.clone(),
            bundle: concat(bundle),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: federated
            .iter()
            .map(|(td, cas)| (format!("spiffe://{td}"), concat(cas)))
            .collect(),
    }
}

/// Polls `check` until it holds, for up to 10 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const SERVER_URI: &str = "spiffe://a.test/svc/server";

/// Against an agent without FetchX509Bundles, the bundles come from the SVID messages: the
/// SVID's own trust domain and the federated ones, replaced on every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_takes_bundles_from_svid_messages_without_fetch_x509_bundles() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let svid = pki.valid_a(SERVER_URI);
    let (svid_tx, svid_rx) = watch::channel(svid_message(
        &svid,
        SERVER_URI,
        &[&pki.ca_a],
        &[("b.test", &[&pki.ca_b])],
    ));
    serve_fake(&socket, FakeAgent { svids: svid_rx });
    let source = SvidSource::connect(&socket, Duration::from_secs(10))
        .await
        .unwrap();
    let mut held = source.bundles();
    assert_eq!(
        held.remove(&td("a.test")).unwrap(),
        vec![pki.ca_a.der.clone()]
    );
    assert_eq!(
        held.remove(&td("b.test")).unwrap(),
        vec![pki.ca_b.der.clone()]
    );

    let server = Arc::new(mtls::server_config(&source, matrix_policy()).unwrap());
    let from_b = Arc::new(plain_client(&pki.leaf(GOOD_B).sign(&pki.ca_b, &[])));
    assert!(
        handshake(server.clone(), from_b.clone())
            .await
            .both_accepted()
    );

    // B is no longer federated.
    svid_tx.send_replace(svid_message(&svid, SERVER_URI, &[&pki.ca_a], &[]));
    eventually("B is dropped", || {
        let source = source.clone();
        async move { !source.bundles().contains_key(&td("b.test")) }
    })
    .await;
    let refused = handshake(server, from_b).await;
    assert!(
        refused
            .server
            .unwrap_err()
            .contains("no trust bundle is known for trust domain 'b.test'")
    );
}

// ---------------------------------------------------------------------------------------------
// Policies and configs.

#[test]
fn policies_are_explicit() {
    assert!(PeerPolicy::ids(Vec::<IdPattern>::new()).is_err());
    assert!(PeerPolicy::parse_ids(&["spiffe://a.test/x/*/y"]).is_err());
    assert!(PeerPolicy::parse_ids(&["spiffe://a.test/x/scope/db.read"]).is_err());
    assert!(PeerPolicy::any_id().allowed_ids().is_none());
    let policy = matrix_policy();
    assert_eq!(policy.allowed_ids().unwrap().len(), 3);
    assert_eq!(policy.required_scopes().len(), 1);
}

#[test]
fn configs_are_tls13_with_no_resumption_and_no_alpn() {
    let pki = Pki::new();
    let own = pki.valid_a(SERVER_URI);
    let source = SvidSource::from_parts(own.chain.clone(), &own.key_pkcs8, pki.trusted()).unwrap();
    let server = mtls::server_config(&source, PeerPolicy::any_id()).unwrap();
    assert_eq!(server.send_tls13_tickets, 0);
    assert!(!server.session_storage.can_cache());
    assert!(!server.ticketer.enabled());
    assert!(server.alpn_protocols.is_empty());
    let client = mtls::client_config(&source, PeerPolicy::any_id()).unwrap();
    assert!(client.alpn_protocols.is_empty());
    assert!(!client.enable_early_data);
    assert!(
        SvidSource::from_parts(own.chain.clone(), &own.key_pkcs8, {
            let mut b = Bundles::new();
            b.insert(td("a.test"), vec![CertificateDer::from(vec![0x30, 0x00])]);
            b
        })
        .is_err(),
        "a bundle certificate that is not a root is refused"
    );
}

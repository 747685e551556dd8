//! The node API's attestation stream driven by hand, so a test can answer a challenge with
//! what an agent never would (a replayed or misdirected response) (issue 12).

use mayfly::proto::node::{self as pb, attest_agent_request, attest_agent_response};

use super::TestServer;

/// One attestation stream driven by hand: the parameters for `attestor`, then `respond` to
/// the challenge with what the server sent; the server's final answer.
pub async fn attest_by_hand(
    server: &TestServer,
    attestor: &str,
    evidence: Vec<u8>,
    respond: impl FnOnce(Vec<u8>) -> Vec<u8>,
) -> Result<pb::AttestResponse, tonic::Status> {
    let source = mayfly::mtls::SvidSource::trust_only(server.bundles().await).unwrap();
    let mut node = mayfly::client::connect_node(server.node_addr(), &source, &server.server_id())
        .await
        .unwrap();
    let csr = mayfly::svid::KeyAndCsr::generate().unwrap().csr;
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(pb::AttestAgentRequest {
        step: Some(attest_agent_request::Step::Params(pb::AttestRequest {
            attestor: attestor.into(),
            evidence,
            csr,
        })),
    })
    .await
    .unwrap();
    let mut answers = node
        .attest_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut respond = Some(respond);
    loop {
        match answers.message().await?.and_then(|m| m.step) {
            Some(attest_agent_response::Step::Challenge(nonce)) => {
                let response = respond.take().expect("one challenge")(nonce);
                tx.send(pb::AttestAgentRequest {
                    step: Some(attest_agent_request::Step::ChallengeResponse(response)),
                })
                .await
                .unwrap();
            }
            Some(attest_agent_response::Step::Result(result)) => return Ok(result),
            None => panic!("the stream ended without a result"),
        }
    }
}

//! The agent's half of the node API's attestation stream (`AttestAgent`): send the evidence,
//! answer the challenge if the server's attestor asks one, take the result.
//!
//! Evidence and answers come from a [`NodeEvidence`], whose calls may block (files, a cloud
//! metadata service): they run on tokio's blocking threads.

use std::sync::Arc;
use std::time::Duration;

use mayfly_attestors::{AttestError, NodeEvidence};
use tonic::transport::Channel;

use crate::proto::node::{self as pb, attest_agent_request, attest_agent_response};

/// How long the agent waits for each answer of the server on the stream.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an attestation on the stream failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeAttestError {
    /// The server refused (the status carries its sentence and refusal kind).
    #[error("the server refused attestation: {}", .0.message())]
    Refused(tonic::Status),
    /// This node could not produce its evidence or answer the challenge.
    #[error(transparent)]
    Evidence(#[from] AttestError),
    /// The server answered out of protocol.
    #[error("the server's attestation answer was malformed: {0}")]
    Protocol(&'static str),
}

/// Attests over `node` with `evidence`, sending `csr` for the agent SVID.
///
/// # Errors
/// [`NodeAttestError`] naming the side that failed.
pub async fn attest(
    node: &mut pb::node_client::NodeClient<Channel>,
    evidence: Arc<dyn NodeEvidence>,
    csr: Vec<u8>,
) -> Result<pb::AttestResponse, NodeAttestError> {
    let produced = blocking(evidence.clone(), |e| e.evidence()).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let send = |step| pb::AttestAgentRequest { step: Some(step) };
    // The channel has room for both messages, so these sends never wait.
    let _ = tx
        .send(send(attest_agent_request::Step::Params(
            pb::AttestRequest {
                attestor: evidence.name().into(),
                evidence: produced,
                csr,
            },
        )))
        .await;
    let mut answers = node
        .attest_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(NodeAttestError::Refused)?
        .into_inner();
    let mut challenged = false;
    loop {
        let message = tokio::time::timeout(STEP_TIMEOUT, answers.message())
            .await
            .map_err(|_| {
                NodeAttestError::Refused(tonic::Status::deadline_exceeded(
                    "the server did not answer the attestation within 30 s",
                ))
            })?
            .map_err(NodeAttestError::Refused)?;
        match message.and_then(|m| m.step) {
            Some(attest_agent_response::Step::Result(result)) => return Ok(result),
            Some(attest_agent_response::Step::Challenge(challenge)) if !challenged => {
                challenged = true;
                let response = blocking(evidence.clone(), move |e| e.answer(&challenge)).await?;
                let _ = tx
                    .send(send(attest_agent_request::Step::ChallengeResponse(
                        response,
                    )))
                    .await;
            }
            Some(attest_agent_response::Step::Challenge(_)) => {
                return Err(NodeAttestError::Protocol("it sent a second challenge"));
            }
            None => {
                return Err(NodeAttestError::Protocol(
                    "it ended the stream without a result",
                ));
            }
        }
    }
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    evidence: Arc<dyn NodeEvidence>,
    f: impl FnOnce(&dyn NodeEvidence) -> Result<T, AttestError> + Send + 'static,
) -> Result<T, AttestError> {
    let name = evidence.name();
    tokio::task::spawn_blocking(move || f(evidence.as_ref()))
        .await
        .unwrap_or_else(|_| {
            Err(AttestError::Unavailable {
                attestor: name,
                reason: "the evidence reader stopped unexpectedly".into(),
            })
        })
}

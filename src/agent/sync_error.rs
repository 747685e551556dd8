//! Why a sync round failed, worded by which side refused what (issue 10): the server refusing a
//! call, the agent refusing an answer larger than it decodes, or the server out of reach.

use tonic::{Code, Status};

use super::identity::IdentityError;

/// Why a sync round failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The server refused a call (its status, with its reason).
    #[error("the server refused: {}", .0.message())]
    Refused(Status),
    /// The agent refused the server's answer: it is larger than the agent decodes.
    #[error(
        "the agent refused the server's answer to {call}: {detail}; the answer is larger than this agent accepts (servers of this version page their answers: upgrade the server)"
    )]
    AnswerTooLarge {
        /// The node API call.
        call: &'static str,
        /// The decoder's words (sizes found and allowed).
        detail: String,
    },
    /// The server could not be reached, or the connection broke during the call.
    #[error("could not reach the server for {call}: {detail}; retrying with backoff")]
    Unreachable {
        /// The node API call.
        call: &'static str,
        /// What the transport said.
        detail: String,
    },
    /// The server's answers broke the sync protocol.
    #[error("the server's answer to {call} is not valid: {detail}; retrying from a full sync")]
    Protocol {
        /// The node API call.
        call: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The agent's identity could not be renewed or re-established.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The agent needs a new join token from an operator.
    #[error("the agent needs a new join token")]
    NeedsToken,
}

impl SyncError {
    /// Says which side `status`, the outcome of `call`, came from. tonic makes a status on the
    /// agent's side for its own decode limit (OutOfRange, "decoded message length too large";
    /// the server turns its own into InvalidArgument) and for transport failures (with the
    /// transport error as its source); any other status is the server's.
    pub fn of_call(call: &'static str, status: Status) -> Self {
        if status.code() == Code::OutOfRange
            && status
                .message()
                .contains("decoded message length too large")
        {
            return Self::AnswerTooLarge {
                call,
                detail: status.message().to_owned(),
            };
        }
        if std::error::Error::source(&status).is_some() {
            return Self::Unreachable {
                call,
                detail: crate::wire::error_chain(&status),
            };
        }
        Self::Refused(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_own_decode_limit_is_not_blamed_on_the_server() {
        let local = Status::out_of_range(
            "Error, decoded message length too large: found 70000 bytes, the limit is: 65536 bytes",
        );
        let text = SyncError::of_call("ListEntries", local).to_string();
        assert!(
            text.starts_with("the agent refused the server's answer to ListEntries"),
            "{text}"
        );
        assert!(text.contains("70000"), "{text}");
        // Positive control: a status the server sent stays the server's refusal.
        let remote = Status::permission_denied("agent is banned");
        let text = SyncError::of_call("ListEntries", remote).to_string();
        assert_eq!(text, "the server refused: agent is banned");
        let transport = Status::from_error(Box::new(std::io::Error::other("connection reset")));
        assert!(matches!(
            SyncError::of_call("ListEntries", transport),
            SyncError::Unreachable { .. }
        ));
    }
}

//! Mayfly's attestors: the [`NodeAttestor`] trait and its plugins, the [`WorkloadAttestor`]
//! trait and the `unix` workload attestor, and the [`Selector`] type workload attestors produce.
//!
//! Attestors are pure: they turn evidence into claims and hold no server or agent state. The
//! server decides what a claim is worth (for a join token: whether the store still holds it,
//! consumed atomically).
//!
//! For a workload, the evidence is the process at the other end of the agent's socket. The
//! agent records it at accept with [`PeerProcess::from_socket`], attests
//! [`PeerProcess::credentials`] with a [`WorkloadAttestor`] on a blocking thread, and calls
//! [`PeerProcess::confirm`] before answering, so that selectors read from /proc for a pid are
//! never credited to a workload that has exited and left its pid to another process. Any error
//! along the way means refusing the workload.
#![forbid(unsafe_code)]

pub mod aws_iid;
pub mod join_token;
pub mod k8s_psat;
pub mod node;
pub mod selector;
pub mod sshpop;
pub mod unix;
pub mod workload;
pub mod x509pop;

pub use node::{
    AttestError, Begun, Challenge, MAX_EVIDENCE, NodeAttestor, NodeClaim, NodeEvidence, ProvenNode,
    SingleUse,
};
pub use selector::{Selector, SelectorClass, SelectorError};
pub use unix::peer::{PeerError, PeerProcess};
pub use unix::{UnixAttestor, UnixAttestorConfig};
pub use workload::{PeerCredentials, WorkloadAttestError, WorkloadAttestor};

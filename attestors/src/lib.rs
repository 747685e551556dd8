//! Mayfly's attestors: the [`NodeAttestor`] trait and its plugins, and the [`Selector`] type
//! workload attestors produce.
//!
//! Attestors are pure: they turn evidence into claims and hold no server or agent state. The
//! server decides what a claim is worth (for a join token: whether the store still holds it,
//! consumed atomically).
#![forbid(unsafe_code)]

pub mod join_token;
pub mod node;
pub mod selector;

pub use node::{AttestError, NodeAttestor, NodeClaim};
pub use selector::{Selector, SelectorError};

//! Mayfly: workload identity for AI agents and the services they call.
//!
//! See `DESIGN.md` in the shared folder and README.md for the big picture.
//!
//! The library is shaped by who uses it, through Cargo features:
//!
//! - `mtls` (in every build): [`id`] (SPIFFE IDs and scopes), [`svid`] (the X509-SVID
//!   parser), [`mtls`] (the verifier stack and the SVID source), [`workload_client`] (the
//!   Workload and task API clients), [`bundle`] (PEM and SPIFFE bundles), [`proto`] (the
//!   generated clients), [`jwt`] (JWT-SVIDs: keys, signing, the validator), [`text`] (escaping for terminals and logs). A service that only
//!   verifies peers builds `--no-default-features --features mtls`: no sqlx, no hyper server,
//!   no server or agent.
//! - `server`: [`ca`] (signing keys), [`store`] (persistence), [`audit`] (the hash-chained
//!   log), [`server`] (node and admin APIs), [`client`] (the node and admin API clients).
//! - `agent`: [`agent`] (node attestation, sync, the Workload and task APIs it serves).
//! - `proxy`: [`proxy`] (the enforcing mTLS proxy).
//! - `cli` (the default): all of the above, for the `mayfly` binary.
#![forbid(unsafe_code)]

pub mod id;
pub mod svid;
pub mod text;

#[cfg(feature = "mtls")]
pub mod bundle;
#[cfg(feature = "mtls")]
mod codec;
#[cfg(feature = "mtls")]
pub(crate) mod files;
#[cfg(feature = "mtls")]
pub mod jwt;
#[cfg(feature = "mtls")]
pub mod mtls;
#[cfg(feature = "mtls")]
pub mod proto;
#[cfg(feature = "mtls")]
pub mod wire;
#[cfg(feature = "mtls")]
pub mod workload_client;

#[cfg(feature = "server")]
pub mod audit;
#[cfg(feature = "server")]
pub mod ca;
#[cfg(feature = "server")]
mod dns_name;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
mod under_way;

#[cfg(any(feature = "server", feature = "agent"))]
pub mod client;
// Several servers, one PostgreSQL (issue 10): the agent's list of servers and their failover.
#[cfg(any(feature = "server", feature = "agent"))]
pub mod node_attest;
#[cfg(any(feature = "server", feature = "agent"))]
pub mod server_set;

#[cfg(feature = "agent")]
pub mod agent;

#[cfg(feature = "proxy")]
pub mod proxy;

#[cfg(feature = "config")]
pub mod config_file;
#[cfg(feature = "config")]
pub mod duration;

#[cfg(any(feature = "server", feature = "agent"))]
pub use mayfly_attestors as attestors;
#[cfg(any(feature = "server", feature = "agent"))]
pub use mayfly_attestors::Selector;

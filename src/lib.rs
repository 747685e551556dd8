//! Mayfly: workload identity for AI agents and the services they call.
//!
//! See `DESIGN.md` in the shared folder and README.md for the big picture. Modules:
//! [`id`] (SPIFFE IDs and scopes), [`svid`] (the X509-SVID profile), [`ca`] (signing keys),
//! [`store`] (persistence), [`audit`] (the hash-chained log), [`server`] (node and admin APIs).
#![forbid(unsafe_code)]

pub mod agent;
pub mod audit;
pub mod bundle;
pub mod ca;
pub mod client;
pub mod codec;
pub mod config_file;
pub mod dns_name;
pub mod duration;
pub mod files;
pub mod id;
pub mod mtls;
pub mod proto;
pub mod proxy;
pub mod server;
pub mod store;
pub mod svid;
pub mod text;
mod under_way;
pub mod wire;
pub mod workload_client;

pub use mayfly_attestors as attestors;
pub use mayfly_attestors::Selector;

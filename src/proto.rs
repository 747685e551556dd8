//! Generated gRPC code for Mayfly's APIs.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// The node API (agents → server).
#[cfg(any(feature = "server", feature = "agent"))]
pub mod node {
    tonic::include_proto!("mayfly.node.v1");
}

/// The admin API (operators → server).
#[cfg(any(feature = "server", feature = "agent"))]
pub mod admin {
    tonic::include_proto!("mayfly.admin.v1");
}

/// Mayfly's task API (workloads → agent): just-in-time task SVIDs.
pub mod task {
    tonic::include_proto!("mayfly.task.v1");
}

/// The SPIFFE Workload API (workloads → agent). The upstream proto declares no package, so
/// prost writes it to `_.rs`.
pub mod workload {
    tonic::include_proto!("_");
}

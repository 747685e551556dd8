//! Generated gRPC code for Mayfly's APIs.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// The node API (agents → server).
pub mod node {
    tonic::include_proto!("mayfly.node.v1");
}

/// The admin API (operators → server).
pub mod admin {
    tonic::include_proto!("mayfly.admin.v1");
}

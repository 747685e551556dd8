//! The standard gRPC services the Workload Endpoint spec says an agent socket SHOULD serve
//! beside the Workload API: health checking (`grpc.health.v1.Health`) and server reflection
//! (`grpc.reflection.v1` and `v1alpha`, which grpcurl and grpc_cli ask first).
//!
//! Neither needs the `workload.spiffe.io` header: probes such as `grpc_health_probe` do not
//! send it, and neither service says anything about a workload. Both describe only what any
//! process on the node may already read (the APIs' schema, whether the agent serves).

use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthReporter;
use tonic_reflection::server::{v1, v1alpha};

use crate::proto::task::task_server::TaskServer;
use crate::proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;

/// The encoded descriptors of the Workload and task APIs and what they import, written by
/// build.rs.
const AGENT_SOCKET_DESCRIPTORS: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/agent_socket_descriptor.bin"));

/// The names health is reported for: the whole server (`""`) and each API on the socket.
const SERVICES: [&str; 3] = [
    "",
    <SpiffeWorkloadApiServer<()> as NamedService>::NAME,
    <TaskServer<()> as NamedService>::NAME,
];

/// Health and reflection, built for one socket.
pub(super) struct Introspection<H, R1, R1a> {
    /// The health service, to add to the router.
    pub health: HealthServer<H>,
    /// Reflection, v1.
    pub reflection: v1::ServerReflectionServer<R1>,
    /// Reflection, v1alpha.
    pub reflection_alpha: v1alpha::ServerReflectionServer<R1a>,
    /// Where serving statuses are set.
    pub reporter: Reporter,
}

/// Builds both services, every API reported as serving.
///
/// # Errors
/// [`tonic_reflection::server::Error`] when a built-in descriptor set does not decode, which
/// would be a build defect.
pub(super) async fn build() -> Result<
    Introspection<
        impl tonic_health::pb::health_server::Health,
        impl v1::ServerReflection,
        impl v1alpha::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in SERVICES {
        reporter
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(AGENT_SOCKET_DESCRIPTORS)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok(Introspection {
        health,
        reflection: builder().build_v1()?,
        reflection_alpha: builder().build_v1alpha()?,
        reporter: Reporter(reporter),
    })
}

/// Sets the serving statuses of the socket's APIs.
pub(super) struct Reporter(HealthReporter);

impl Reporter {
    /// Reports every API as not serving, then ends every health `Watch` stream (they would
    /// otherwise hold the graceful shutdown open forever, like any endless stream).
    pub async fn stopping(mut self) {
        for name in SERVICES {
            self.0
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        for name in SERVICES {
            // Dropping a status's sender is what ends the streams watching it.
            self.0.clear_service_status(name).await;
        }
    }
}

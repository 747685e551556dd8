//! The standard gRPC services on the real agent's socket (Workload Endpoint spec: SHOULD):
//! health checking and server reflection, asked as a probe or grpcurl would (no
//! `workload.spiffe.io` header), and a health `Watch` that does not hold the agent's shutdown.

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use mayfly::workload_client;
use tokio_stream::StreamExt as _;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

async fn health(cluster: &Cluster) -> HealthClient<tonic::transport::Channel> {
    HealthClient::new(
        workload_client::connect(&cluster.socket())
            .await
            .expect("connect"),
    )
}

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_owned(),
    }
}

/// One reflection request on a fresh v1 stream, and its answer (or the stream's status).
async fn reflect(
    cluster: &Cluster,
    request: MessageRequest,
) -> Result<MessageResponse, tonic::Status> {
    let channel = workload_client::connect(&cluster.socket())
        .await
        .expect("connect");
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection stream")
        .into_inner();
    let answer = answers.message().await?.expect("an answer before the end");
    Ok(answer.message_response.expect("a message response"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_each_api_serving_and_does_not_know_others() {
    let mut cluster = Cluster::start();
    cluster.start_agent();
    let mut client = health(&cluster).await;
    for service in ["", "SpiffeWorkloadAPI", "mayfly.task.v1.Task"] {
        let answer = client
            .check(check(service))
            .await
            .expect(service)
            .into_inner();
        assert_eq!(answer.status(), ServingStatus::Serving, "{service:?}");
    }
    // Negative on the same connection: a service the socket does not serve.
    let unknown = client.check(check("grpc.nope.v1.Nope")).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_and_describes_the_workload_api() {
    let mut cluster = Cluster::start();
    cluster.start_agent();
    let MessageResponse::ListServicesResponse(list) =
        reflect(&cluster, MessageRequest::ListServices(String::new()))
            .await
            .expect("list")
    else {
        panic!("not a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "SpiffeWorkloadAPI",
        "mayfly.task.v1.Task",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&expected), "{expected} not in {names:?}");
    }

    let answer = reflect(
        &cluster,
        MessageRequest::FileContainingSymbol("SpiffeWorkloadAPI".into()),
    )
    .await
    .expect("describe");
    let MessageResponse::FileDescriptorResponse(files) = answer else {
        panic!("not a file descriptor: {answer:?}");
    };
    let workload = files
        .file_descriptor_proto
        .iter()
        .find(|f| f.windows(14).any(|w| w == b"workload.proto"));
    assert!(workload.is_some(), "no workload.proto descriptor");
    // Negative on the same socket: a symbol that is not there.
    let missing = reflect(
        &cluster,
        MessageRequest::FileContainingSymbol("Nope".into()),
    )
    .await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_health_watch_sees_not_serving_and_does_not_hold_the_agent() {
    let mut cluster = Cluster::start();
    cluster.start_agent();
    let mut watch = health(&cluster)
        .await
        .watch(check("SpiffeWorkloadAPI"))
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("first status").expect("one");
    assert_eq!(first.status(), ServingStatus::Serving);

    let mut agent = cluster.agent.take().expect("the agent runs");
    let stopping = tokio::task::spawn_blocking(move || agent.stop());
    // The watcher is told, then its stream ends.
    let mut statuses = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(60), watch.next()).await {
        statuses.push(m.status());
    }
    assert_eq!(
        statuses.last(),
        Some(&ServingStatus::NotServing),
        "{statuses:?}"
    );
    // Generous: the agent's stop sometimes takes ~25 s on its own (seen on main too); a held
    // stream would keep it up for good.
    let status = tokio::time::timeout(Duration::from_secs(120), stopping)
        .await
        .expect("the agent stopped")
        .expect("join");
    assert!(status.success(), "{status}");
}

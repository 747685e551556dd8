//! Compiles the .proto files in Rust (protox), so the build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server_protos = [
        "proto/mayfly/node/v1/node.proto",
        "proto/mayfly/admin/v1/admin.proto",
    ];
    // The agent socket's APIs hold one long-lived stream per workload: they use small codec
    // buffers (src/codec.rs).
    let agent_protos = [
        "proto/mayfly/task/v1/task.proto",
        "proto/spiffe/workload.proto",
    ];
    println!("cargo:rerun-if-changed=migrations");
    for p in server_protos.iter().chain(&agent_protos) {
        println!("cargo:rerun-if-changed={p}");
    }
    // The admin API's records print as JSON (`--output json`) by derive, so the JSON keys are
    // the proto field names and a new field appears in the output without hand-written code.
    let mut server = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true);
    for message in [
        "Entry",
        "CreateJoinTokenResponse",
        "Agent",
        "AuditRecord",
        "VerifyAuditResponse",
    ] {
        server = server.type_attribute(
            format!(".mayfly.admin.v1.{message}"),
            "#[derive(serde::Serialize)]",
        );
    }
    server.compile_fds(protox::compile(server_protos, ["proto"])?)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(protox::compile(agent_protos, ["proto"])?)?;
    Ok(())
}

//! Compiles the .proto files in Rust (protox), so the build needs no system `protoc`.
//!
//! Only what the enabled features use is generated: the `mtls` build gets the Workload and task
//! API clients; the node and admin APIs come with the server or the agent, and the server
//! stubs of each API only with the component that serves it.

use std::env;

/// Whether the Cargo feature `name` is enabled for this build.
fn feature(name: &str) -> bool {
    let var = format!("CARGO_FEATURE_{}", name.to_uppercase().replace('-', "_"));
    env::var_os(var).is_some()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = feature("server");
    let agent = feature("agent");
    let mtls = feature("mtls");
    println!("cargo:rerun-if-changed=migrations");
    let node_admin = [
        "proto/mayfly/node/v1/node.proto",
        "proto/mayfly/admin/v1/admin.proto",
    ];
    // The agent socket's APIs hold one long-lived stream per workload: they use small codec
    // buffers (src/codec.rs).
    let agent_socket = [
        "proto/mayfly/task/v1/task.proto",
        "proto/spiffe/workload.proto",
    ];
    for p in node_admin.iter().chain(&agent_socket) {
        println!("cargo:rerun-if-changed={p}");
    }
    // The node and admin APIs: the server serves both; the agent is a node API client (and
    // the command line, which builds the server too, an admin API client).
    if server || agent {
        // The admin API's records print as JSON (`--output json`) by derive, so the JSON keys
        // are the proto field names and a new field appears in the output without hand-written
        // code.
        let mut config = tonic_prost_build::configure()
            .build_client(true)
            .build_server(server);
        for message in [
            "Entry",
            "CreateJoinTokenResponse",
            "Agent",
            "AgentDetail",
            "AuditRecord",
            "VerifyAuditResponse",
            "Ca",
        ] {
            config = config.type_attribute(
                format!(".mayfly.admin.v1.{message}"),
                "#[derive(serde::Serialize)]",
            );
        }
        config.compile_fds(protox::compile(node_admin, ["proto"])?)?;
    }
    // The Workload and task APIs: every build has their clients; the agent serves them.
    if mtls {
        let mut compiler = protox::Compiler::new(["proto"])?;
        compiler
            .include_source_info(true)
            .include_imports(true)
            .open_files(agent_socket)?;
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(agent)
            .codec_path("crate::codec::SmallBufferCodec")
            .compile_fds(compiler.file_descriptor_set())?;
        // The agent serves server reflection on its socket, which describes these APIs (and
        // the well-known types they import) from their encoded descriptors.
        if agent {
            let out = std::path::PathBuf::from(env::var("OUT_DIR")?);
            std::fs::write(
                out.join("agent_socket_descriptor.bin"),
                compiler.encode_file_descriptor_set(),
            )?;
        }
    }
    Ok(())
}

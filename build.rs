//! Compiles the .proto files in Rust (protox), so the build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/mayfly/node/v1/node.proto",
        "proto/mayfly/admin/v1/admin.proto",
        "proto/mayfly/task/v1/task.proto",
        "proto/spiffe/workload.proto",
    ];
    println!("cargo:rerun-if-changed=migrations");
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

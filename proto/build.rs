//! Compiles the .proto files with protox (a pure-Rust protobuf compiler), so that building
//! needs no system `protoc`, then generates the prost messages and tonic services.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/common.proto",
        "proto/chunk.proto",
        "proto/cli.proto",
        "proto/copyset.proto",
        "proto/heartbeat.proto",
        "proto/raft.proto",
        "proto/mds.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}

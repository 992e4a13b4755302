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
    // Payloads are `bytes::Bytes`: decoded without a copy (a slice of the received buffer),
    // and a retry or a hand-over clones a reference count, not the data.
    tonic_prost_build::configure()
        .bytes(".curve.chunk.ChunkRequest.data")
        .bytes(".curve.chunk.ChunkResponse.data")
        .bytes(".curve.raft.RaftRequest.payload")
        .bytes(".curve.raft.RaftResponse.payload")
        .bytes(".curve.raft.WriteCommand.data")
        .bytes(".curve.raft.InstallSnapshot.data")
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}

//! Generates the containerd snapshots API (messages, the tonic server, and the client the
//! tests use) from our copies of containerd's protos under `proto/`. `protox` compiles them
//! in pure Rust and carries the google well-known types, so no system `protoc` is needed.

const PROTOS: [&str; 2] = [
    "proto/containerd/services/snapshots/v1/snapshots.proto",
    "proto/containerd/types/mount.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let files = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        // The client is plain generated code over any tonic channel; `connect` (which needs
        // tonic's transport) is left out so the library builds without the client stack.
        .build_client(true)
        .build_transport(false)
        .compile_fds(files)?;
    Ok(())
}

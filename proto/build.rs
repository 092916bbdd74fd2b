//! Generates the Rust types of `proto/*.proto` with prost, and with the `grpc` feature the
//! gRPC services of cluster mode (`cluster.proto`, the node's internal API, and
//! `push.proto`, the push API) with tonic.
//!
//! protoc comes from `protoc-bin-vendored`, so a build needs nothing installed beyond cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc.clone());
    config.bytes(["."]);
    config.compile_protos(
        &["proto/pigeon/device.proto", "proto/pigeon/store.proto"],
        &["proto"],
    )?;
    #[cfg(feature = "grpc")]
    {
        let mut config = prost_build::Config::new();
        config.protoc_executable(protoc);
        config.bytes(["."]);
        // The services' messages refer to the types generated above.
        config.extern_path(".pigeon.device.v1", "crate::device");
        config.extern_path(".pigeon.store.v1", "crate::store");
        tonic_prost_build::configure().compile_with_config(
            config,
            &["proto/pigeon/cluster.proto", "proto/pigeon/push.proto"],
            &["proto"],
        )?;
    }
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

//! Generates the gRPC services of cluster mode (`proto/pigeon/cluster.proto`, the internal
//! node API, and `proto/pigeon/push.proto`, the push API) with tonic. Their messages refer
//! to the device and store types that `pigeon-proto` already generates.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    config.bytes(["."]);
    config.extern_path(".pigeon.device.v1", "::pigeon_proto::device");
    config.extern_path(".pigeon.store.v1", "::pigeon_proto::store");
    tonic_prost_build::configure().compile_with_config(
        config,
        &[
            "../proto/proto/pigeon/cluster.proto",
            "../proto/proto/pigeon/push.proto",
        ],
        &["../proto/proto"],
    )?;
    println!("cargo:rerun-if-changed=../proto/proto");
    Ok(())
}

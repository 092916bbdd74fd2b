//! Generates the Rust types of `proto/*.proto` with prost.
//!
//! protoc comes from `protoc-bin-vendored`, so a build needs nothing installed beyond cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    config.bytes(["."]);
    config.compile_protos(
        &["proto/pigeon/device.proto", "proto/pigeon/store.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

//! Compiles `proto/telemetry.proto` into Rust types with prost. protox parses the schema in
//! pure Rust, so building Tellus needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let schema = proto_dir.join("telemetry.proto");
    println!("cargo:rerun-if-changed={}", schema.display());
    let descriptors = protox::compile([&schema], [&proto_dir])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}

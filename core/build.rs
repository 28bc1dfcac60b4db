//! Compiles `proto/telemetry.proto` into Rust types with prost. protox parses the schema in
//! pure Rust, so building Tellus needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script binary may be reused for another checkout.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let proto_dir = std::path::Path::new(&manifest_dir).join("../proto");
    let schema = proto_dir.join("telemetry.proto");
    println!("cargo:rerun-if-changed={}", schema.display());
    let descriptors = protox::compile([&schema], [&proto_dir])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}

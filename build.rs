//! Compiles the protobuf API with protox (pure Rust: no system `protoc`) and
//! keeps the encoded descriptor set for gRPC server reflection.

use prost::Message;
use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/docsidecar/v1/document_service.proto";
    println!("cargo:rerun-if-changed={proto}");

    let fds = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // compile_fds does not write the set; reflection needs it.
    fs::write(
        out_dir.join("docsidecar_descriptor.bin"),
        fds.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        // Decode failures (for example Struct nesting past prost's recursion limit)
        // are the caller's input problem: INVALID_ARGUMENT, not INTERNAL.
        .codec_path("crate::codec::ProtoCodec")
        // Documents are encoded straight from their stored JSON (src/wire.rs).
        .extern_path(".google.protobuf.Struct", "crate::wire::Data")
        .compile_fds(fds)?;
    Ok(())
}

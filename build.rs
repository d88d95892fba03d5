//! Compiles `proto/user.proto` without a system `protoc` (protox is a pure-Rust
//! compiler) and writes the descriptor set that reflection serves.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // tonic-prost-build does not emit these itself; without them a proto or
    // migration edit would not rebuild the crate (migrations are embedded).
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=migrations");

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptors = protox::compile(["user.proto"], ["proto"])?;
    std::fs::write(
        out_dir.join("user_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Decode errors in requests answer INVALID_ARGUMENT (src/grpc/codec.rs).
        .codec_path("crate::grpc::codec::Codec")
        .compile_fds(descriptors)?;
    Ok(())
}

//! Code generated from `proto/user.proto` (package-less, so the generated
//! module is `_`), and its encoded descriptor set for reflection.

#![allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    unreachable_pub,
    unused_qualifications
)]

tonic::include_proto!("_");

// Hand-written (see `response`); `build.rs` points the generated code here.
pub use super::response::UserResponse;

/// `FileDescriptorSet` of `proto/user.proto`, written by `build.rs`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/user_descriptor.bin"));

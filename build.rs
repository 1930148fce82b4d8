//! Compiles the protobuf contract without a system `protoc`: protox parses the
//! files, tonic-prost-build generates the code, and the descriptor set is kept for
//! server reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "users/v1/user_service.proto",
    "users/v1/group_service.proto",
    "users/v1/event_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTOS)?;
    let fds = compiler.file_descriptor_set();

    std::fs::write(out_dir.join("users_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        // Maps with a stable order: the request fingerprint used for idempotency
        // keys hashes the encoded request, which must not depend on hash order.
        .btree_map(".")
        // google.rpc.Status (ImportUsers failures) is tonic-types' own type, so
        // a status built with its error details drops straight in.
        .extern_path(".google.rpc", "::tonic_types::pb")
        // Malformed requests are INVALID_ARGUMENT, not INTERNAL.
        .codec_path("crate::grpc::codec::StrictProstCodec")
        // `prost::Name` on every message: the codec looks a request's schema
        // up by its full name to bound what decoding it costs.
        .compile_fds_with_config(fds, {
            let mut config = tonic_prost_build::Config::new();
            config.enable_type_names();
            config
        })?;
    Ok(())
}

//! Generates the etcd v3 wire types and tonic services from `proto/`, and the serde (protobuf
//! JSON) implementations the JSON gRPC-gateway uses.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/kv.proto",
        "proto/auth.proto",
        "proto/rpc.proto",
        "proto/v3lock.proto",
        "proto/v3election.proto",
        "proto/raft.proto",
        "proto/migration.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let descriptors = PathBuf::from(std::env::var("OUT_DIR")?).join("etcd_descriptors.bin");
    tonic_prost_build::configure()
        .bytes(".")
        .codec_path("crate::codec::Codec")
        .generate_default_stubs(true)
        .file_descriptor_set_path(&descriptors)
        .compile_protos(&protos, &["proto"])?;

    // etcd's gateway marshals with jsonpb `OrigName: true`: field names as written in the
    // .proto (`create_revision`, but `dbSize`), 64-bit integers as strings, bytes as base64,
    // enums by name (names or numbers accepted), defaults omitted, unknown input fields
    // ignored. Byte fields deserialise into whatever type prost generated (`bytes::Bytes`
    // here, as configured above), so nothing more is needed for `.bytes(".")`.
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptors)?)?
        .preserve_proto_field_names()
        .ignore_unknown_fields()
        .build(&[
            ".mvccpb",
            ".authpb",
            ".etcdserverpb",
            ".v3lockpb",
            ".v3electionpb",
        ])?;
    Ok(())
}

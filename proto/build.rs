//! Compiles the contracts in `hearth/` with protox (pure Rust, no `protoc`
//! needed), generates prost types and their proto3 JSON mapping (pbjson).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["hearth/v1/event.proto", "hearth/v1/command.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }

    let descriptors = protox::compile(files, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    prost_build::Config::new()
        .out_dir(&out_dir)
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(descriptors.clone())?;

    pbjson_build::Builder::new()
        .out_dir(&out_dir)
        .register_descriptors(&prost::Message::encode_to_vec(&descriptors))?
        // `{"motion":{"detected":false}}` rather than `{"motion":{}}`: stored events
        // are read by people in `nats stream view`, and a false reading is a reading.
        .emit_fields()
        .build(&[".hearth"])?;
    Ok(())
}

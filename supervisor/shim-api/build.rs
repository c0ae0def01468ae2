//! Generates the containerd shim v2 API's messages and async ttrpc
//! client/server code from `protos/*.proto` with the pure-Rust codegen (no
//! protoc). The google/protobuf imports resolve to protobuf's own
//! `well_known_types`.

/// Every input, by file stem. The stem is the generated module's name, and
/// the generated code refers to imported files as `super::<stem>`, so lib.rs
/// declares one module per stem. Files with a service also give
/// `<stem>_ttrpc.rs`.
const PROTOS: &[&str] = &[
    "mount",
    "task",
    "shim",
    "task_events",
    "events",
    "cgroups_v2",
    "runtimeoptions",
];
const SERVICES: &[&str] = &["shim", "events"];

fn main() {
    println!("cargo:rerun-if-changed=protos");
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let inputs: Vec<String> = PROTOS.iter().map(|s| format!("protos/{s}.proto")).collect();
    for input in &inputs {
        println!("cargo:rerun-if-changed={input}");
    }
    ttrpc_codegen::Codegen::new()
        .out_dir(&out)
        .inputs(&inputs)
        .include("protos")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ttrpc_codegen::ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generating the shim API from protos/");
    // The generated files open with inner attributes, which `include!` cannot
    // take inside a module: drop them (lib.rs sets the allowances instead).
    let generated = PROTOS
        .iter()
        .map(|s| format!("{s}.rs"))
        .chain(SERVICES.iter().map(|s| format!("{s}_ttrpc.rs")));
    for name in generated {
        let path = std::path::Path::new(&out).join(&name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading generated {name}: {e}"));
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("writing generated code");
    }
}

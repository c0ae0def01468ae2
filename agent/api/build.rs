//! Generates the agent API's messages and ttrpc client/server code from
//! `protos/agent.proto` with the pure-Rust codegen (no protoc).

fn main() {
    println!("cargo:rerun-if-changed=protos/agent.proto");
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    ttrpc_codegen::Codegen::new()
        .out_dir(&out)
        .input("protos/agent.proto")
        .include("protos")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize { ..Default::default() })
        .rust_protobuf_customize(ttrpc_codegen::ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generating the agent API from protos/agent.proto");
    // The generated files open with inner attributes, which `include!` cannot
    // take inside a module: drop them (lib.rs sets the allowances instead).
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = std::path::Path::new(&out).join(name);
        let text = std::fs::read_to_string(&path).expect("reading generated code");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("writing generated code");
    }
}

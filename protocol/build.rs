//! Generates the Rust protobuf messages and the async ttrpc client/server of
//! `protos/agent.proto` into `OUT_DIR` (pure Rust parser: no `protoc` needed).

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=protos/agent.proto");
    let out_dir = std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo for build scripts");
    Codegen::new()
        .out_dir(&out_dir)
        .input("protos/agent.proto")
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generating Rust code from protos/agent.proto");
    // The generated files start with inner attributes and inner doc comments,
    // which `include!` does not accept: drop them (src/lib.rs puts the
    // equivalent `allow`s on the enclosing modules).
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = Path::new(&out_dir).join(name);
        let text = std::fs::read_to_string(&path).expect("reading generated file");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                let t = l.trim_start();
                !(t.starts_with("#![") || t.starts_with("//!"))
            })
            .collect();
        std::fs::write(&path, kept.join("\n") + "\n").expect("rewriting generated file");
    }
}

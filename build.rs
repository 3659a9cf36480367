//! Builds what crust embeds: the protobuf image schemas (through protox, so
//! no system `protoc` is needed) and the two freestanding blobs of
//! `parasite/`, compiled as position-independent code for the host, flattened
//! into one image each with goblin, their relocations checked and recorded.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use goblin::elf::{Elf, program_header::PT_LOAD};

const R_X86_64_RELATIVE: u32 = 8;

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    build_protos();
    let mut generated = String::new();
    for (name, entry) in [
        ("parasite", "parasite_entry"),
        ("restorer", "restorer_entry"),
    ] {
        let elf = compile_blob(name, entry, &out);
        generated.push_str(&flatten_blob(name, entry, &elf, &out));
    }
    std::fs::write(out.join("blobs.rs"), generated).unwrap();
    for f in [
        "parasite/abi.rs",
        "parasite/rt.rs",
        "parasite/crc32.rs",
        "parasite/parasite.rs",
        "parasite/restorer.rs",
        "proto",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
}

fn build_protos() {
    let files = [
        "proto/inventory.proto",
        "proto/core.proto",
        "proto/mm.proto",
        "proto/files.proto",
        "proto/sockets.proto",
    ];
    let fds = protox::compile(files, ["proto"]).expect("compiling proto/ with protox");
    let mut cfg = prost_build::Config::new();
    cfg.type_attribute(".", "#[derive(serde::Serialize)]");
    cfg.compile_fds(fds).expect("generating Rust from proto/");
}

fn compile_blob(name: &str, entry: &str, out: &Path) -> PathBuf {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let elf = out.join(format!("{name}.elf"));
    let status = Command::new(rustc)
        .args([
            "--edition",
            "2024",
            "--crate-type",
            "bin",
            "--crate-name",
            name,
        ])
        .arg(format!("parasite/{name}.rs"))
        .args([
            "-C",
            "panic=abort",
            "-C",
            "opt-level=2",
            "-C",
            "relocation-model=pie",
        ])
        .args(["-C", "debuginfo=0", "-C", "codegen-units=1"])
        // No libc, no start files: a self-contained static PIE whose only
        // relocations are R_X86_64_RELATIVE, which crust applies when it loads it.
        .args([
            "-C",
            "link-arg=-nostdlib",
            "-C",
            "link-arg=-nostartfiles",
            "-C",
            "link-arg=-static-pie",
        ])
        .args([
            "-C",
            "link-arg=-Wl,--no-dynamic-linker",
            "-C",
            "link-arg=-Wl,-z,norelro",
        ])
        .args([
            "-C",
            "link-arg=-Wl,--build-id=none",
            "-C",
            "link-arg=-Wl,-z,noexecstack",
        ])
        .args([
            "-C",
            &format!("link-arg=-Wl,-e,{entry}"),
            "-C",
            &format!("link-arg=-Wl,-u,{entry}"),
        ])
        .arg("-o")
        .arg(&elf)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("running rustc for a blob");
    assert!(status.success(), "building the {name} blob failed");
    elf
}

/// Lays the PT_LOAD segments out flat from address 0, records the relative
/// relocations and the entry offset, and emits Rust constants for them.
fn flatten_blob(name: &str, entry: &str, path: &Path, out: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    let elf = Elf::parse(&bytes).expect("parsing a blob ELF");
    let end = elf
        .program_headers
        .iter()
        .filter(|p| p.p_type == PT_LOAD)
        .map(|p| p.p_vaddr + p.p_memsz)
        .max()
        .expect("blob has no PT_LOAD");
    let mut image = vec![0u8; end as usize];
    for p in elf.program_headers.iter().filter(|p| p.p_type == PT_LOAD) {
        let (off, fsz, va) = (p.p_offset as usize, p.p_filesz as usize, p.p_vaddr as usize);
        image[va..va + fsz].copy_from_slice(&bytes[off..off + fsz]);
    }
    let mut relocs = Vec::new();
    for r in elf.dynrelas.iter().chain(elf.dynrels.iter()) {
        assert_eq!(
            r.r_type, R_X86_64_RELATIVE,
            "{name} blob: relocation type {} at {:#x} cannot be resolved at load time",
            r.r_type, r.r_offset
        );
        relocs.push((r.r_offset, r.r_addend.unwrap_or(0) as u64));
    }
    for sh in &elf.section_headers {
        let n = elf.shdr_strtab.get_at(sh.sh_name).unwrap_or("");
        assert!(
            !(n.starts_with(".rela") && n != ".rela.dyn") && n != ".got.plt" && n != ".plt",
            "{name} blob: section {n} means calls through a PLT or unresolved symbols"
        );
    }
    let entry_off = elf
        .syms
        .iter()
        .find(|s| elf.strtab.get_at(s.st_name) == Some(entry))
        .unwrap_or_else(|| panic!("{name} blob: no symbol {entry}"))
        .st_value;
    let bin = out.join(format!("{name}.bin"));
    std::fs::write(&bin, &image).unwrap();
    let up = name.to_uppercase();
    let mut s = String::new();
    writeln!(s, "pub const {up}_BLOB: Blob = Blob {{").unwrap();
    writeln!(s, "    name: {name:?},").unwrap();
    writeln!(
        s,
        "    image: include_bytes!({:?}),",
        bin.display().to_string()
    )
    .unwrap();
    writeln!(s, "    entry: {entry_off:#x},").unwrap();
    writeln!(s, "    relocs: &{relocs:?},").unwrap();
    writeln!(s, "}};").unwrap();
    s
}

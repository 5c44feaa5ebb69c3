//! Embeds `libfspf_preload.so` in the `fspf` binary (feature `embed-preload`, on by default), so
//! that `cargo install --path crates/fspf`, or the binary copied alone, gives a working
//! `fspf run`. The library is built by a nested `cargo build -p fspf-preload` into a target
//! directory of its own under `OUT_DIR` (the outer build holds the lock of the workspace's).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    // The unwinder from `libgcc_eh.a`: no `libgcc_s.so.1` to load (and no CPUID-probing
    // constructor of it to run) at every `fspf run`; see crates/fspf-preload/build.rs.
    if std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu") {
        println!("cargo:rustc-link-lib=static=gcc_eh");
    }
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    let dest = out.join("libfspf_preload.so");
    let root = manifest.join("../..");
    for p in [
        "crates/fspf-preload/src",
        "crates/fspf-preload/Cargo.toml",
        "crates/fspf-preload/build.rs",
        "crates/fspf-core/src",
        "crates/fspf-core/Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    if std::env::var_os("CARGO_FEATURE_EMBED_PRELOAD").is_none() {
        std::fs::write(&dest, b"").expect("writing an empty placeholder into OUT_DIR");
        std::fs::write(out.join("libfspf_preload.id"), "").expect("writing into OUT_DIR");
        return;
    }
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let target_dir = out.join("preload-target");
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(root.join("crates/fspf-preload/Cargo.toml"))
        .arg("--lib")
        .arg("--target-dir")
        .arg(&target_dir);
    if release {
        cmd.arg("--release");
    }
    // Clippy's wrapper is for the outer build; the embedded copy needs no debug info.
    cmd.env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .env("CARGO_PROFILE_DEV_STRIP", "debuginfo")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo");
    let status = cmd
        .status()
        .expect("running the nested cargo build of fspf-preload");
    assert!(
        status.success(),
        "nested `cargo build -p fspf-preload` failed: {status}"
    );
    let built = target_dir
        .join(if release { "release" } else { "debug" })
        .join("libfspf_preload.so");
    let bytes =
        std::fs::read(&built).unwrap_or_else(|e| panic!("reading {}: {e}", built.display()));
    std::fs::write(&dest, &bytes).expect("writing the library into OUT_DIR");
    // The name of the cached copy, computed once here instead of on every `fspf run`. It only
    // tells builds apart: `fspf run` compares the cached bytes with the embedded ones anyway.
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    let id = format!("{:016x}{:016x}", h.finish(), bytes.len());
    std::fs::write(out.join("libfspf_preload.id"), id).expect("writing into OUT_DIR");
}

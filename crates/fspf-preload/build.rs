//! Link the unwinder statically (`libgcc_eh.a`) so that the library does not load
//! `libgcc_s.so.1` into every shielded process: one shared object fewer to map and relocate per
//! process start, and no `__cpu_indicator_init` constructor (a dozen CPUID instructions, each a
//! VM exit on virtual machines). `--as-needed` then drops `libgcc_s` from `DT_NEEDED`.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu") {
        println!("cargo:rustc-link-lib=static=gcc_eh");
    }
}

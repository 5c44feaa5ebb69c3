//! One end-to-end test binary for the `fspf` CLI (ripgrep style): a small harness, the reference
//! walkthrough and CLI contract (`cli`), attacks on every property of DESIGN.md §2 (`attacks`),
//! every attack through every access path of every region class (`matrix`), a writer killed at
//! random points and a full disk (`crash`), and one test per bug found (`regression`).
mod attacks;
mod cli;
mod conformance;
mod crash;
mod fuse;
mod harness;
mod image;
mod matrix;
mod podman;
mod regression;
mod shielded;

//! One end-to-end test binary for the `fspf` CLI (ripgrep style): a small harness, the reference
//! walkthrough and CLI contract (`cli`), attacks on every property of DESIGN.md §2 (`attacks`), and
//! one test per bug found (`regression`).
mod attacks;
mod cli;
mod harness;
mod regression;

//! `fspf image`: protect a container image without Docker. Reads an OCI image layout, an OCI
//! archive or a `docker save` archive, streams its layers once (nothing is extracted), records
//! every file the container sees in a new fspf, seals encrypted paths into rewritten layers, and
//! writes an OCI archive whose entrypoint starts the image's program under the shield.
//! [`verify`] checks such an archive offline.
//!
//! Layers: this crate knows image formats and tar; sealing and verifying are fspf-core's
//! ([`fspf_core::Volume::seal_stream`], [`fspf_core::Volume::check_stored`]).
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod error;
pub mod merge;
pub mod paths;
pub mod protect;
pub mod source;
pub mod tarw;
pub mod verify;

pub use error::{ImageError, Result};
pub use protect::{
    protect, ProtectOptions, Protected, DEFAULT_NOT_PROTECTED, FSPF_DIR, FSPF_IN_IMAGE,
};
pub use verify::{verify, VerifyReport};

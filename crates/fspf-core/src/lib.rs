//! fspf-core: the file-system protection file (`fspf.pb`), its cryptography, the region policy,
//! the chunked file codec and the volume API that every frontend (CLI, preload shim, FUSE) uses.
//!
//! Layers, bottom up: [`format`] (bytes only, no I/O) → [`crypto`] (the one place that names
//! aws-lc-rs) → [`policy`] (embed path → region) → [`codec`] (chunked reader/writer over
//! positioned I/O) → [`volume`] (opens an fspf with key + tag, serves files, commits updates).
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod codec;
pub mod crypto;
pub mod error;
pub mod format;
pub mod policy;
pub mod session;
pub mod view;
pub mod volume;

pub use crypto::{FileId, RegionKey, Tag, VolumeKey};
pub use error::{Error, Result};
pub use format::index::{build_index, FrozenIndex};
pub use format::metadata::{FileEntry, FileKind, Protection, Region, RegionKind, Version};
pub use format::view::{ChildKind, MetaView};
pub use policy::EmbedPath;
pub use volume::{write_file_durably, Volume, VolumeOptions};

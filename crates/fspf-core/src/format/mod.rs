//! Bytes on disk, and nothing else: the `fspf.pb` header, the metadata schema, the chunk layout
//! and size arithmetic, and the frozen in-memory index of the metadata. Pure functions; no I/O.
//! Normative description: docs/FORMAT.md (the index: docs/ARCHITECTURE.md §2.1).
pub mod header;
pub mod index;
pub mod layout;
pub mod log;
pub mod metadata;
pub mod tree;
pub mod view;

//! Bytes on disk, and nothing else: the `fspf.pb` header, the metadata schema, the chunk layout
//! and size arithmetic. Pure functions; no I/O. Normative description: docs/FORMAT.md.
pub mod header;
pub mod layout;
pub mod metadata;

//! What `fspf image` reports: every error names the image part (file, layer, member) it is about.
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The source is not an image this tool reads, or a part of it is malformed.
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    /// A layer member that would land outside the image's root if extracted.
    #[error(
        "layer {layer}: member {name:?} is refused: {reason} (it would escape the image root)"
    )]
    Escape {
        layer: usize,
        name: String,
        reason: &'static str,
    },
    /// A blob whose bytes do not hash to the digest the image names.
    #[error("{what}: digest mismatch: the image names {expected}, its bytes hash to {found}")]
    Digest {
        what: String,
        expected: String,
        found: String,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Core(#[from] fspf_core::Error),
}

pub type Result<T, E = ImageError> = std::result::Result<T, E>;

impl ImageError {
    pub(crate) fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        ImageError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        ImageError::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

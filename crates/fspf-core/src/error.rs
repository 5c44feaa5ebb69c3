//! Structured errors. Every variant names what was expected so a user can act on it.
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a file system protection file (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("{path}: unsupported fspf format version {version} (this build reads versions 1..={supported})")]
    UnsupportedVersion {
        path: PathBuf,
        version: u16,
        supported: u16,
    },
    #[error("{path}: truncated file system protection file ({len} bytes)")]
    TruncatedFspf { path: PathBuf, len: usize },
    #[error(
        "{path}: the fspf is encrypted; a key is required (--key, --key-file or SCONE_FSPF_KEY)"
    )]
    KeyRequired { path: PathBuf },
    #[error("{path}: a key was given but this fspf is not encrypted; refusing it (an encrypted fspf replaced by a forged unencrypted one looks exactly like this). Give no key for an fspf that was never encrypted")]
    NotEncrypted { path: PathBuf },
    #[error("{path}: tag mismatch: the fspf on disk has tag {actual}, expected {expected} (fspf replaced or rolled back, or wrong tag given)")]
    TagMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path}: the metadata log was modified at byte {offset} ({reason}); the fspf's state cannot be trusted")]
    LogDamaged {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("{path}: cannot decrypt the fspf: wrong key, or the fspf was modified")]
    WrongKeyOrCorrupt { path: PathBuf },
    #[error("{path}: fspf metadata is malformed: {reason}")]
    MalformedMetadata { path: PathBuf, reason: String },
    #[error("invalid key: {0}")]
    InvalidKey(String),
    #[error("invalid tag: {0}")]
    InvalidTag(String),
    #[error("invalid embed path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("region {0} already exists")]
    DuplicateRegion(String),
    #[error("invalid region {embed_point}: {reason}")]
    InvalidRegion { embed_point: String, reason: String },
    #[error("the fspf has {count} regions but no root region \"/\"; add one with `fspf addr FSPF / --kernel / --not-protected` (or another class) before using it")]
    MissingRootRegion { count: usize },
    #[error("the fspf has no regions; add one with `fspf addr`")]
    NoRegions,
    #[error("{path}: not inside any region")]
    NoRegion { path: String },
    #[error("{path}: region {region} is not protected; there is nothing to record")]
    NotProtected { path: String, region: String },
    #[error(
        "{path}: not listed in the fspf (unlisted files in protected regions cannot be opened)"
    )]
    NotListed { path: String },
    #[error("{path}: region {region} is ephemeral; it has no files on disk")]
    Ephemeral { path: String, region: String },
    #[error("{path}: chunk {chunk} failed authentication (file modified, swapped or rolled back)")]
    ChunkAuth { path: String, chunk: u64 },
    #[error("{path}: chunk-tree page {page} of level {level} failed authentication (tree modified, swapped or rolled back)")]
    TreeAuth { path: String, level: u32, page: u64 },
    #[error("{path}: chunk tree is {actual} bytes, expected {expected} (tree missing, truncated or extended)")]
    TreeSize {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: journal {journal} is damaged ({reason}); the file cannot be brought to its committed state")]
    JournalDamaged {
        path: String,
        journal: String,
        reason: String,
    },
    #[error(
        "{path}: changed by another writer since this update began (base {base}, now {current})"
    )]
    UpdateConflict {
        path: String,
        base: String,
        current: String,
    },
    #[error(
        "{path}: size on disk is {actual} bytes, expected {expected} (file truncated or extended)"
    )]
    SizeMismatch {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "{path}: file header belongs to another file or version (file swapped or rolled back)"
    )]
    HeaderMismatch { path: String },
    #[error("{path}: listed size {size} bytes does not fit the on-disk format (metadata corrupt or forged)")]
    FileTooLarge { path: String, size: u64 },
    #[error("{path}: is a {kind}, not a regular file (refusing to read it)")]
    NotRegular { path: String, kind: &'static str },
    #[error("{path}: a symbolic link on disk where the fspf lists a directory or file (fspf does not follow it)")]
    SymlinkInPath { path: String },
    #[error("{path}: {len} bytes, more than the {max} bytes an fspf may have")]
    FspfTooLarge { path: PathBuf, len: u64, max: u64 },
    #[error("{path}: listed file is missing on disk")]
    Missing { path: String },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error(transparent)]
    Index(#[from] crate::format::index::IndexError),
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// Did data on storage fail verification (tampered, swapped, truncated, rolled back,
    /// missing, or of the wrong kind)? As opposed to an I/O error of the machine (a full disk,
    /// a permission) or a usage error. Frontends report the former as `EIO` and never let such
    /// a process exit 0; the latter keep their own errno.
    pub fn is_integrity(&self) -> bool {
        matches!(
            self,
            Error::BadMagic { .. }
                | Error::TruncatedFspf { .. }
                | Error::TagMismatch { .. }
                | Error::WrongKeyOrCorrupt { .. }
                | Error::LogDamaged { .. }
                | Error::MalformedMetadata { .. }
                | Error::ChunkAuth { .. }
                | Error::TreeAuth { .. }
                | Error::TreeSize { .. }
                | Error::JournalDamaged { .. }
                | Error::SizeMismatch { .. }
                | Error::HeaderMismatch { .. }
                | Error::NotRegular { .. }
                | Error::SymlinkInPath { .. }
                | Error::FspfTooLarge { .. }
                | Error::Missing { .. }
        )
    }

    /// The OS error number behind an I/O error, if this is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An error of kernel-side access to the listed entry `label` (an embed path) at `disk`: a
    /// refused symlink below the region's kernel directory is [`Error::SymlinkInPath`].
    pub(crate) fn kernel(label: &str, disk: impl Into<PathBuf>, source: std::io::Error) -> Self {
        if crate::volume::kernel_fs::is_symlink_refusal(&source) {
            Error::SymlinkInPath { path: label.into() }
        } else {
            Error::io(disk, source)
        }
    }

    /// [`Error::kernel`] for [`kernel_fs::open_regular`](crate::volume::kernel_fs::open_regular)
    /// and friends; a missing entry is [`Error::Missing`].
    pub(crate) fn kernel_open(
        label: &str,
        disk: impl Into<PathBuf>,
        e: crate::volume::kernel_fs::OpenError,
    ) -> Self {
        use crate::volume::kernel_fs::OpenError;
        match e {
            OpenError::NotRegular(kind) => Error::NotRegular {
                path: label.into(),
                kind,
            },
            OpenError::Io(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Error::Missing { path: label.into() }
            }
            OpenError::Io(e) => Error::kernel(label, disk, e),
        }
    }
}

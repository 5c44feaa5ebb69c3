//! The metadata sealed inside `fspf.pb`: protobuf wire structs (`*Pb`) and the validated domain
//! types they parse into. Parsing rejects anything malformed, so later layers never re-check.
use crate::crypto::{FileId, RegionKey, FILE_ID_LEN};
use crate::format::layout::{self, MAX_CHUNK_LEN, MAX_FILE_SIZE, MIN_CHUNK_LEN};
use crate::format::view::{ChildKind, Children};
use crate::policy::EmbedPath;
use std::collections::BTreeMap;
use std::ops::Bound::{Included, Unbounded};
use std::path::PathBuf;

#[derive(Clone, PartialEq, prost::Message)]
pub struct MetadataPb {
    #[prost(uint32, tag = "1")]
    pub format_version: u32,
    #[prost(uint64, tag = "2")]
    pub generation: u64,
    #[prost(message, repeated, tag = "3")]
    pub regions: Vec<RegionPb>,
    #[prost(message, repeated, tag = "4")]
    pub files: Vec<FileEntryPb>,
}

/// One record of the metadata log (FORMAT.md §5c): the entries a commit changed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LogRecordPb {
    /// The generation after this commit.
    #[prost(uint64, tag = "1")]
    pub generation: u64,
    /// Entries (with their paths) as they are after the commit.
    #[prost(message, repeated, tag = "2")]
    pub put: Vec<FileEntryPb>,
    /// Paths no longer listed (each exactly; not their subtrees).
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub removed: Vec<Vec<u8>>,
    /// Update journals of format-2 files changed by this commit (FORMAT.md §5b, "Journals in
    /// the log"), each a format-3 journal; only in version-4 logs.
    #[prost(bytes = "vec", repeated, tag = "4")]
    pub journals: Vec<Vec<u8>>,
    /// Bytes of journals and files in the log's records up to and including this one.
    #[prost(uint64, tag = "5")]
    pub journal_bytes: u64,
    /// Whole format-1 versions (the data file's bytes) of small files this record puts
    /// (FORMAT.md §5b, "Files in the log"); only in version-5 logs.
    #[prost(bytes = "vec", repeated, tag = "6")]
    pub files: Vec<Vec<u8>>,
    /// The boot id of the writer's machine, in a record that carries files: they are written
    /// again from the record only after a restart.
    #[prost(bytes = "vec", tag = "7")]
    pub boot: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RegionPb {
    #[prost(bytes = "vec", tag = "1")]
    pub embed_point: Vec<u8>,
    /// 1 = kernel, 2 = ephemeral
    #[prost(uint32, tag = "2")]
    pub kind: u32,
    #[prost(bytes = "vec", tag = "3")]
    pub kernel_path: Vec<u8>,
    /// 1 = not-protected, 2 = authenticated, 3 = encrypted
    #[prost(uint32, tag = "4")]
    pub protection: u32,
    #[prost(bytes = "vec", tag = "5")]
    pub key: Vec<u8>,
    #[prost(uint32, tag = "6")]
    pub chunk_len: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct FileEntryPb {
    #[prost(bytes = "vec", tag = "1")]
    pub path: Vec<u8>,
    /// 1 = regular file, 2 = directory, 3 = symlink
    #[prost(uint32, tag = "2")]
    pub kind: u32,
    #[prost(bytes = "vec", tag = "3")]
    pub file_id: Vec<u8>,
    #[prost(uint64, tag = "4")]
    pub size: u64,
    /// authenticated files: 32-byte Merkle root; encrypted files: empty
    #[prost(bytes = "vec", tag = "5")]
    pub root: Vec<u8>,
    #[prost(uint32, tag = "6")]
    pub mode: u32,
    /// symlinks: target bytes
    #[prost(bytes = "vec", tag = "7")]
    pub target: Vec<u8>,
    /// Modification time, nanoseconds since the epoch; 0 = not recorded (older writers).
    #[prost(int64, tag = "8")]
    pub mtime_ns: i64,
    /// The owner below is recorded (older writers and `addf` record none: the files then
    /// belong to whoever serves them).
    #[prost(bool, tag = "9")]
    pub owned: bool,
    #[prost(uint32, tag = "10")]
    pub uid: u32,
    #[prost(uint32, tag = "11")]
    pub gid: u32,
    /// kind 4 (special file): 1 = fifo, 2 = character device, 3 = block device, 4 = socket
    #[prost(uint32, tag = "12")]
    pub special: u32,
    /// kind 4: device number of a character or block device
    #[prost(uint64, tag = "13")]
    pub rdev: u64,
    /// Inode number the shields report, kept across renames and new versions; 0 = none recorded
    /// (derived from the path: [`EmbedPath::default_ino`]).
    #[prost(uint64, tag = "14")]
    pub ino: u64,
    /// Change time (the entry's content or metadata last changed), nanoseconds since the epoch;
    /// 0 = not recorded (older writers: readers show the modification time).
    #[prost(int64, tag = "15")]
    pub ctime_ns: i64,
    /// Kinds 1 and 4: the other names of this file (kind-5 entries that name this one as their
    /// `target`), so the file has `1 + links.len()` hard links.
    #[prost(bytes = "vec", repeated, tag = "16")]
    pub links: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    NotProtected,
    Authenticated,
    Encrypted,
}
impl Protection {
    pub fn name(self) -> &'static str {
        match self {
            Protection::NotProtected => "not-protected",
            Protection::Authenticated => "authenticated",
            Protection::Encrypted => "encrypted",
        }
    }
    fn code(self) -> u32 {
        match self {
            Protection::NotProtected => 1,
            Protection::Authenticated => 2,
            Protection::Encrypted => 3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionKind {
    /// Files live on disk under this directory.
    Kernel(PathBuf),
    /// Files live in the process's memory, empty at start.
    Ephemeral,
}

impl RegionKind {
    /// The kernel directory of a kernel region.
    pub fn kernel_dir(&self) -> Option<&std::path::Path> {
        match self {
            RegionKind::Kernel(p) => Some(p),
            RegionKind::Ephemeral => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub embed_point: EmbedPath,
    pub kind: RegionKind,
    pub protection: Protection,
    /// `None` exactly for not-protected regions.
    pub key: Option<RegionKey>,
    pub chunk_len: u32,
}
impl Region {
    pub fn class(&self) -> String {
        let k = match self.kind {
            RegionKind::Kernel(_) => "kernel",
            RegionKind::Ephemeral => "ephemeral",
        };
        format!("{k} {}", self.protection.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileKind {
    File {
        id: FileId,
        size: u64,
        root: Option<[u8; 32]>,
    },
    Dir,
    Symlink(Vec<u8>),
    /// A fifo, device node or socket: an entry only (no content, nothing on disk).
    Special {
        kind: SpecialKind,
        rdev: u64,
    },
    /// Another name (a hard link) of the regular or special file listed at this path, which
    /// lists this name among its `links`. Nothing is on disk at this name; everything but the
    /// name (content, mode, owner, times, inode number) is the target's.
    Link(EmbedPath),
}

/// The kinds of special files an entry can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialKind {
    Fifo,
    Char,
    Block,
    Socket,
}

impl SpecialKind {
    pub fn code(self) -> u32 {
        match self {
            SpecialKind::Fifo => 1,
            SpecialKind::Char => 2,
            SpecialKind::Block => 3,
            SpecialKind::Socket => 4,
        }
    }

    pub fn from_code(c: u32) -> Option<SpecialKind> {
        Some(match c {
            1 => SpecialKind::Fifo,
            2 => SpecialKind::Char,
            3 => SpecialKind::Block,
            4 => SpecialKind::Socket,
            _ => return None,
        })
    }

    /// The file-type bits of `st_mode` (`S_IFIFO`, `S_IFCHR`, `S_IFBLK`, `S_IFSOCK`).
    pub fn file_type(self) -> u32 {
        match self {
            SpecialKind::Fifo => 0o010000,
            SpecialKind::Char => 0o020000,
            SpecialKind::Block => 0o060000,
            SpecialKind::Socket => 0o140000,
        }
    }

    /// The kind whose file-type bits `mode` carries (`mknod`'s mode); `None` for other types.
    pub fn from_mode(mode: u32) -> Option<SpecialKind> {
        [
            SpecialKind::Fifo,
            SpecialKind::Char,
            SpecialKind::Block,
            SpecialKind::Socket,
        ]
        .into_iter()
        .find(|k| k.file_type() == mode & 0o170000)
    }
}

/// One committed state of a regular file's content: its file id, and for a format-2 file
/// (updated in place under the same id, FORMAT.md §4a) its chunk-tree root. Two states with
/// equal versions have equal content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub id: FileId,
    pub root: Option<[u8; 32]>,
}

impl FileKind {
    /// The content version of a regular file; `None` for other kinds.
    pub fn version(&self) -> Option<Version> {
        match self {
            FileKind::File { id, root, .. } => Some(Version {
                id: *id,
                root: *root,
            }),
            _ => None,
        }
    }
}

/// Who owns an entry (numeric ids, as the kernel reports them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Now, in nanoseconds since the epoch (the `mtime_ns` of a version written now).
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub kind: FileKind,
    /// Permission bits (st_mode & 0o7777).
    pub mode: u32,
    /// Modification time in nanoseconds since the epoch, as the fspf records it (protected by
    /// the fspf's seal, unlike the kernel file's times); 0 = not recorded.
    pub mtime_ns: i64,
    /// Recorded owner; `None`: the entry belongs to whoever serves it (the mounting user, the
    /// running program's user).
    pub owner: Option<Owner>,
    /// Recorded inode number (set when the entry first moves, then kept); `None`: derived from
    /// the path ([`EmbedPath::default_ino`]).
    pub ino: Option<u64>,
    /// Change time in nanoseconds since the epoch: when the content or any metadata (mode,
    /// owner, times, name) last changed; 0 = not recorded (then the modification time applies).
    pub ctime_ns: i64,
    /// Regular and special files: the paths of their other names ([`FileKind::Link`] entries),
    /// in the order they were made. Empty for other kinds.
    pub links: Vec<EmbedPath>,
}

impl FileEntry {
    /// The number of names of this entry (`st_nlink` of a non-directory).
    pub fn nlink(&self) -> u64 {
        1 + self.links.len() as u64
    }
}

#[cfg(test)]
impl FileEntry {
    /// A directory entry with fixed times (tests).
    pub(crate) fn test_dir() -> FileEntry {
        FileEntry {
            links: Vec::new(),
            kind: FileKind::Dir,
            mode: 0o755,
            mtime_ns: 1,
            ctime_ns: 0,
            owner: None,
            ino: None,
        }
    }
}

impl FileEntry {
    /// A new version of a regular file: permission bits of `mode`, sealed now, no owner.
    pub fn new_file(id: FileId, size: u64, root: Option<[u8; 32]>, mode: u32) -> FileEntry {
        let now = now_ns();
        FileEntry {
            links: Vec::new(),
            kind: FileKind::File { id, size, root },
            mode: mode & 0o7777,
            mtime_ns: now,
            owner: None,
            ino: None,
            ctime_ns: now,
        }
    }

    /// The change time to report: the recorded one, else the modification time.
    pub fn ctime(&self) -> i64 {
        if self.ctime_ns != 0 {
            self.ctime_ns
        } else {
            self.mtime_ns
        }
    }

    /// The inode number the shields report for this entry at `path`.
    pub fn ino_at(&self, path: &EmbedPath) -> u64 {
        self.ino.unwrap_or_else(|| path.default_ino())
    }
}

/// Validated content of an fspf.
/// An entry from its wire struct, checked (`regions`: for the size limit of its region).
pub fn entry_from_pb(f: FileEntryPb, regions: &[Region]) -> Result<(EmbedPath, FileEntry), String> {
    let path = EmbedPath::from_bytes(&f.path).map_err(|e| e.to_string())?;
    let kind = match f.kind {
        1 => {
            let id: [u8; FILE_ID_LEN] = f
                .file_id
                .as_slice()
                .try_into()
                .map_err(|_| format!("{path}: bad file id"))?;
            let root = match f.root.len() {
                0 => None,
                32 => {
                    let mut r = [0u8; 32];
                    r.copy_from_slice(&f.root);
                    Some(r)
                }
                _ => return Err(format!("{path}: bad root length")),
            };
            if f.size > MAX_FILE_SIZE {
                return Err(format!(
                    "{path}: size {} is larger than any file can be",
                    f.size
                ));
            }
            // Every size up to 2^62 fits at any chunk length; above, check with the
            // chunk length of the file's region (the smallest one if it has none).
            if f.size > 1 << 62 {
                let chunk_len = regions
                    .iter()
                    .filter(|r| path.starts_with(&r.embed_point))
                    .max_by_key(|r| r.embed_point.as_bytes().len())
                    .map_or(MIN_CHUNK_LEN, |r| r.chunk_len);
                if !layout::size_fits(f.size, chunk_len) {
                    return Err(format!(
                        "{path}: size {} bytes does not fit the on-disk format",
                        f.size
                    ));
                }
            }
            FileKind::File {
                id: FileId(id),
                size: f.size,
                root,
            }
        }
        2 => FileKind::Dir,
        3 => FileKind::Symlink(f.target),
        4 => FileKind::Special {
            kind: SpecialKind::from_code(f.special)
                .ok_or_else(|| format!("{path}: unknown special kind {}", f.special))?,
            rdev: f.rdev,
        },
        5 => {
            let t = EmbedPath::from_bytes(&f.target)
                .map_err(|e| format!("{path}: link target: {e}"))?;
            if t == path {
                return Err(format!("{path}: a hard link to itself"));
            }
            FileKind::Link(t)
        }
        k => return Err(format!("{path}: unknown file kind {k}")),
    };
    let links = match &kind {
        FileKind::File { .. } | FileKind::Special { .. } => f
            .links
            .iter()
            .map(|l| EmbedPath::from_bytes(l).map_err(|e| format!("{path}: link: {e}")))
            .collect::<Result<Vec<_>, _>>()?,
        _ if !f.links.is_empty() => {
            return Err(format!("{path}: links on an entry that cannot have them"))
        }
        _ => Vec::new(),
    };
    Ok((
        path,
        FileEntry {
            kind,
            mode: f.mode & 0o7777,
            mtime_ns: f.mtime_ns,
            owner: f.owned.then_some(Owner {
                uid: f.uid,
                gid: f.gid,
            }),
            ino: (f.ino != 0).then_some(f.ino),
            ctime_ns: f.ctime_ns,
            links,
        },
    ))
}

/// Hard links are consistent: every link entry names a regular or special file of its own
/// region that lists it, and every listed link is such an entry naming its file back.
pub fn check_links(
    files: &BTreeMap<EmbedPath, FileEntry>,
    regions: &[Region],
) -> Result<(), String> {
    for (p, e) in files {
        for l in &e.links {
            match files.get(l).map(|e| &e.kind) {
                Some(FileKind::Link(t)) if t == p => {}
                _ => {
                    return Err(format!(
                        "{p}: lists {l} as a hard link, which does not name it"
                    ))
                }
            }
        }
        if let FileKind::Link(t) = &e.kind {
            let target = files.get(t);
            let listed = target.is_some_and(|te| {
                matches!(te.kind, FileKind::File { .. } | FileKind::Special { .. })
                    && te.links.contains(p)
            });
            if !listed {
                return Err(format!("{p}: a hard link to {t}, which does not list it"));
            }
            if region_index_in(regions, p) != region_index_in(regions, t) {
                return Err(format!("{p}: a hard link to {t} in another region"));
            }
        }
    }
    Ok(())
}

/// An entry as its wire struct.
pub fn entry_to_pb(p: &EmbedPath, e: &FileEntry) -> FileEntryPb {
    let mut pb = FileEntryPb {
        path: p.as_bytes().to_vec(),
        mode: e.mode,
        mtime_ns: e.mtime_ns,
        ctime_ns: e.ctime_ns,
        ..Default::default()
    };
    pb.ino = e.ino.unwrap_or(0);
    if let Some(o) = e.owner {
        pb.owned = true;
        pb.uid = o.uid;
        pb.gid = o.gid;
    }
    match &e.kind {
        FileKind::File { id, size, root } => {
            pb.kind = 1;
            pb.file_id = id.0.to_vec();
            pb.size = *size;
            pb.root = root.map(|r| r.to_vec()).unwrap_or_default();
        }
        FileKind::Dir => pb.kind = 2,
        FileKind::Symlink(t) => {
            pb.kind = 3;
            pb.target = t.clone();
        }
        FileKind::Special { kind, rdev } => {
            pb.kind = 4;
            pb.special = kind.code();
            pb.rdev = *rdev;
        }
        FileKind::Link(t) => {
            pb.kind = 5;
            pb.target = t.as_bytes().to_vec();
        }
    }
    pb.links = e.links.iter().map(|l| l.as_bytes().to_vec()).collect();
    pb
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    pub generation: u64,
    /// Sorted by embed point; embed points are unique.
    pub regions: Vec<Region>,
    pub files: BTreeMap<EmbedPath, FileEntry>,
}

impl Metadata {
    pub fn to_pb(&self) -> MetadataPb {
        MetadataPb {
            format_version: u32::from(super::header::CURRENT_VERSION),
            generation: self.generation,
            regions: self.regions_pb(),
            files: self.files.iter().map(|(p, e)| entry_to_pb(p, e)).collect(),
        }
    }

    /// The regions as wire structs (what the frozen index carries besides the files).
    pub fn regions_pb(&self) -> Vec<RegionPb> {
        self.regions
            .iter()
            .map(|r| RegionPb {
                embed_point: r.embed_point.as_bytes().to_vec(),
                kind: match r.kind {
                    RegionKind::Kernel(_) => 1,
                    RegionKind::Ephemeral => 2,
                },
                kernel_path: match &r.kind {
                    RegionKind::Kernel(p) => p.as_os_str().as_encoded_bytes().to_vec(),
                    RegionKind::Ephemeral => Vec::new(),
                },
                protection: r.protection.code(),
                key: r
                    .key
                    .as_ref()
                    .map(|k| k.as_bytes().to_vec())
                    .unwrap_or_default(),
                chunk_len: r.chunk_len,
            })
            .collect()
    }

    pub fn from_pb(pb: MetadataPb) -> Result<Metadata, String> {
        if pb.format_version == 0 || pb.format_version > u32::from(super::header::CURRENT_VERSION) {
            return Err(format!(
                "metadata format version {} (expected 1..={})",
                pb.format_version,
                super::header::CURRENT_VERSION
            ));
        }
        let mut regions = Vec::with_capacity(pb.regions.len());
        for r in pb.regions {
            let embed_point = EmbedPath::from_bytes(&r.embed_point).map_err(|e| e.to_string())?;
            let kind = match r.kind {
                1 => {
                    if r.kernel_path.first() != Some(&b'/') {
                        return Err(format!("region {embed_point}: kernel path is not absolute"));
                    }
                    use std::os::unix::ffi::OsStringExt;
                    RegionKind::Kernel(PathBuf::from(std::ffi::OsString::from_vec(r.kernel_path)))
                }
                2 => RegionKind::Ephemeral,
                k => return Err(format!("region {embed_point}: unknown kind {k}")),
            };
            let protection = match r.protection {
                1 => Protection::NotProtected,
                2 => Protection::Authenticated,
                3 => Protection::Encrypted,
                p => return Err(format!("region {embed_point}: unknown protection {p}")),
            };
            let key = match (protection, r.key.len()) {
                (Protection::NotProtected, 0) => None,
                (Protection::NotProtected, _) => {
                    return Err(format!(
                        "region {embed_point}: key on a not-protected region"
                    ))
                }
                (_, 16 | 24 | 32) => Some(RegionKey::from_bytes(r.key).map_err(|e| e.to_string())?),
                (_, n) => return Err(format!("region {embed_point}: key of {n} bytes")),
            };
            if !(MIN_CHUNK_LEN..=MAX_CHUNK_LEN).contains(&r.chunk_len) {
                return Err(format!(
                    "region {embed_point}: chunk length {} out of range",
                    r.chunk_len
                ));
            }
            regions.push(Region {
                embed_point,
                kind,
                protection,
                key,
                chunk_len: r.chunk_len,
            });
        }
        regions.sort_by(|a, b| a.embed_point.cmp(&b.embed_point));
        if regions
            .windows(2)
            .any(|w| w[0].embed_point == w[1].embed_point)
        {
            return Err("duplicate region".into());
        }
        // Collected, then bulk-built: writers emit paths sorted, so the sort is a linear scan and
        // the map's nodes come out full (inserting one by one leaves them half empty and costs
        // a search per entry; both matter for fspfs of 100 000 files).
        let mut files = Vec::with_capacity(pb.files.len());
        for f in pb.files {
            files.push(entry_from_pb(f, &regions)?);
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = files.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(format!("{}: listed twice", w[0].0));
        }
        let files: BTreeMap<EmbedPath, FileEntry> = files.into_iter().collect();
        check_links(&files, &regions)?;
        Ok(Metadata {
            generation: pb.generation,
            regions,
            files,
        })
    }

    /// Index of the region that owns `path` (longest embed-point prefix, by whole components).
    pub fn region_index(&self, path: &EmbedPath) -> Option<usize> {
        region_index_in(&self.regions, path)
    }

    pub fn region_for(&self, path: &EmbedPath) -> Option<&Region> {
        self.region_index(path).map(|i| &self.regions[i])
    }

    /// Direct children of `dir` (rules: [`crate::format::view::MetaView`]), in name order.
    ///
    /// The map is in byte order, where a subtree is not contiguous with its root: `/a-b` and
    /// `/a.b` sort between `/a` and `/a/x`. Each child `c` therefore shows up as at most two runs,
    /// the entry `dir/c` and the block `dir/c/…`; a block is jumped over with one range search, so
    /// the cost is O(log n) per child that has descendants and O(1) per other child. A directory
    /// implied only by its block is met after the names that extend it with a byte below `/`,
    /// so the result is sorted at the end (it is sorted but for those, which stable sort handles
    /// in linear time).
    pub fn children(&self, dir: &EmbedPath) -> Children<'_> {
        let prefix = dir.child_prefix();
        let mut out: Vec<(&[u8], ChildKind)> = Vec::new();
        let mut probe: Vec<u8> = Vec::new();
        let mut range = self
            .files
            .range::<[u8], _>((Included(&prefix[..]), Unbounded));
        while let Some((k, e)) = range.next() {
            let Some(rest) = k.as_bytes().strip_prefix(&prefix[..]) else {
                break;
            };
            match rest.iter().position(|&c| c == b'/') {
                // `/` itself, when listing the root.
                None if rest.is_empty() => {}
                None => out.push((
                    rest,
                    ChildKind::of(&e.kind, |t| self.files.get(t).map(|e| e.kind.clone())),
                )),
                Some(i) => {
                    let name = &rest[..i];
                    probe.clear();
                    probe.extend_from_slice(&prefix);
                    probe.extend_from_slice(name);
                    // A listed `dir/name` sorts before its block and was reported there.
                    if !self.files.contains_key(&probe[..]) {
                        out.push((name, ChildKind::Dir));
                    }
                    probe.push(b'/' + 1);
                    range = self
                        .files
                        .range::<[u8], _>((Included(&probe[..]), Unbounded));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(b.0));
        Children::listed(out)
    }

    /// Is any path listed strictly below `dir`? O(log n).
    pub fn has_below(&self, dir: &EmbedPath) -> bool {
        let prefix = dir.child_prefix();
        self.files
            .range::<[u8], _>((Included(&prefix[..]), Unbounded))
            .find(|(k, _)| k.as_bytes() != prefix)
            .is_some_and(|(k, _)| k.as_bytes().starts_with(&prefix))
    }

    /// `path` and every listed path below it, in order. (Byte order puts `/a-x` between `/a` and
    /// `/a/b`, so the scan runs over the whole byte-prefix range and filters by component.)
    pub fn paths_below(&self, path: &EmbedPath) -> Vec<EmbedPath> {
        self.files
            .range(path.clone()..)
            .take_while(|(k, _)| k.as_bytes().starts_with(path.as_bytes()))
            .filter(|(k, _)| k.starts_with(path))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The fspf is usable once it has a region, and a root region when it has more than one.
    pub fn check_usable(&self) -> crate::Result<()> {
        if self.regions.is_empty() {
            return Err(crate::Error::NoRegions);
        }
        if self.regions.len() > 1 && !self.regions.iter().any(|r| r.embed_point.is_root()) {
            return Err(crate::Error::MissingRootRegion {
                count: self.regions.len(),
            });
        }
        Ok(())
    }
}

/// Index in `regions` of the region that owns `path` (longest embed-point prefix, by whole
/// components).
pub fn region_index_in(regions: &[Region], path: &EmbedPath) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (i, r) in regions.iter().enumerate() {
        let len = r.embed_point.as_bytes().len();
        if path.starts_with(&r.embed_point) && best.is_none_or(|(_, b)| len > b) {
            best = Some((i, len));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {

    #[test]
    fn special_kinds_map_to_and_from_file_type_bits() {
        for k in [
            SpecialKind::Fifo,
            SpecialKind::Char,
            SpecialKind::Block,
            SpecialKind::Socket,
        ] {
            assert_eq!(SpecialKind::from_mode(k.file_type() | 0o644), Some(k));
        }
        assert_eq!(SpecialKind::from_mode(0o100644), None);
        assert_eq!(SpecialKind::from_mode(0o644), None);
        assert_eq!(SpecialKind::Fifo.file_type(), libc::S_IFIFO);
        assert_eq!(SpecialKind::Socket.file_type(), libc::S_IFSOCK);
    }

    use super::*;
    use prost::Message;

    fn file_pb(path: &str, size: u64) -> FileEntryPb {
        FileEntryPb {
            path: path.as_bytes().to_vec(),
            kind: 1,
            file_id: vec![7; FILE_ID_LEN],
            size,
            mode: 0o644,
            ..Default::default()
        }
    }

    #[test]
    fn owners_and_special_files_round_trip_and_older_entries_have_no_owner() {
        let mut m = Metadata::default();
        let p = |s: &str| EmbedPath::parse(s).unwrap();
        m.files.insert(
            p("/a/fifo"),
            FileEntry {
                links: Vec::new(),
                kind: FileKind::Special {
                    kind: SpecialKind::Fifo,
                    rdev: 0,
                },
                mode: 0o640,
                mtime_ns: 5,
                owner: Some(Owner { uid: 0, gid: 65534 }),
                ino: None,
                ctime_ns: 0,
            },
        );
        m.files.insert(
            p("/a/dev"),
            FileEntry {
                links: Vec::new(),
                kind: FileKind::Special {
                    kind: SpecialKind::Block,
                    rdev: 0x0801,
                },
                mode: 0o600,
                mtime_ns: 6,
                owner: None,
                ino: None,
                ctime_ns: 0,
            },
        );
        let back =
            Metadata::from_pb(MetadataPb::decode(&*m.to_pb().encode_to_vec()).unwrap()).unwrap();
        assert_eq!(back, m);
        // An entry as older writers encode it (no owner fields) has no owner; an unknown
        // special kind is refused.
        let old = MetadataPb {
            format_version: 1,
            files: vec![file_pb("/x", 1)],
            ..Default::default()
        };
        let got = Metadata::from_pb(old).unwrap();
        assert_eq!(got.files[&p("/x")].owner, None);
        let bad = MetadataPb {
            format_version: 1,
            files: vec![FileEntryPb {
                path: b"/s".to_vec(),
                kind: 4,
                special: 9,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(Metadata::from_pb(bad).unwrap_err().contains("special kind"));
    }

    fn link_pb(path: &str, target: &str) -> FileEntryPb {
        FileEntryPb {
            path: path.as_bytes().to_vec(),
            kind: 5,
            target: target.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    fn two_regions(files: Vec<FileEntryPb>) -> MetadataPb {
        let region = |e: &str| RegionPb {
            embed_point: e.as_bytes().to_vec(),
            kind: 2,
            protection: 3,
            key: vec![1; 32],
            chunk_len: 4096,
            ..Default::default()
        };
        MetadataPb {
            format_version: 3,
            regions: vec![region("/"), region("/r")],
            files,
            ..Default::default()
        }
    }

    #[test]
    fn hard_links_round_trip_and_inconsistent_ones_are_refused() {
        let mut a = file_pb("/a", 3);
        a.links = vec![b"/b".to_vec(), b"/d/c".to_vec()];
        let good = two_regions(vec![a.clone(), link_pb("/b", "/a"), link_pb("/d/c", "/a")]);
        let m = Metadata::from_pb(good).unwrap();
        let p = |s: &str| EmbedPath::parse(s).unwrap();
        assert_eq!(m.files[&p("/a")].nlink(), 3);
        assert_eq!(m.files[&p("/b")].kind, FileKind::Link(p("/a")));
        let back =
            Metadata::from_pb(MetadataPb::decode(&*m.to_pb().encode_to_vec()).unwrap()).unwrap();
        assert_eq!(back, m);
        let refused = |files: Vec<FileEntryPb>, what: &str| {
            let e = Metadata::from_pb(two_regions(files)).unwrap_err();
            assert!(e.contains(what), "{what}: {e}");
        };
        // A link its target does not list, or to nothing.
        refused(
            vec![file_pb("/a", 1), link_pb("/b", "/a")],
            "/b: a hard link to /a",
        );
        refused(vec![link_pb("/b", "/a")], "/b: a hard link to /a");
        // A listed link that is not a link to the file.
        let mut a1 = file_pb("/a", 1);
        a1.links = vec![b"/b".to_vec()];
        refused(vec![a1.clone(), file_pb("/b", 1)], "/a: lists /b");
        refused(vec![a1.clone()], "/a: lists /b");
        // A link to a link, to a directory, to itself, across regions.
        let mut l = link_pb("/b", "/a");
        l.links = vec![b"/c".to_vec()];
        refused(vec![a1.clone(), l], "links on an entry");
        let dir = FileEntryPb {
            path: b"/dir".to_vec(),
            kind: 2,
            links: vec![b"/b".to_vec()],
            ..Default::default()
        };
        refused(vec![dir, link_pb("/b", "/dir")], "links on an entry");
        refused(vec![link_pb("/b", "/b")], "to itself");
        let mut a2 = file_pb("/a", 1);
        a2.links = vec![b"/r/b".to_vec()];
        refused(vec![a2, link_pb("/r/b", "/a")], "another region");
    }

    /// Regression: a listed size whose on-disk size (header + size + 16 per chunk) does not fit
    /// in a u64 was accepted, and `layout::enc_file_len` then overflowed when the file was opened.
    #[test]
    fn a_file_size_overflowing_its_on_disk_size_was_accepted() {
        for (size, chunk_len) in [
            (u64::MAX, 4096),
            (u64::MAX - 8, 16 * 1024 * 1024),
            ((u64::MAX / 528 + 1) * 512, 512),
        ] {
            let mut pb = MetadataPb {
                format_version: 1,
                ..Default::default()
            };
            pb.regions = vec![RegionPb {
                embed_point: b"/".to_vec(),
                kind: 2,
                protection: 3,
                key: vec![1; 32],
                chunk_len,
                ..Default::default()
            }];
            pb.files = vec![file_pb("/a", size)];
            let e = Metadata::from_pb(pb).unwrap_err();
            assert!(e.contains("/a: size"), "{e}");
        }
        // The largest sizes that still fit are accepted.
        let mut pb = MetadataPb {
            format_version: 1,
            ..Default::default()
        };
        pb.files = vec![file_pb("/a", 1 << 62)];
        assert!(Metadata::from_pb(pb).is_ok());
    }

    #[test]
    fn unsorted_files_parse_into_the_same_map_as_sorted_ones() {
        let mut pb = MetadataPb {
            format_version: 1,
            ..Default::default()
        };
        pb.files = vec![file_pb("/b", 2), file_pb("/a/c", 3), file_pb("/a", 1)];
        let m = Metadata::from_pb(pb).unwrap();
        let keys: Vec<String> = m.files.keys().map(|k| k.to_string()).collect();
        assert_eq!(keys, ["/a", "/a/c", "/b"]);
        assert_eq!(Metadata::from_pb(m.to_pb()).unwrap(), m);
    }

    #[test]
    fn a_path_listed_twice_is_rejected_also_after_normalisation() {
        let mut pb = MetadataPb {
            format_version: 1,
            ..Default::default()
        };
        pb.files = vec![file_pb("/a/b", 1), file_pb("/x", 1), file_pb("/a//b/", 2)];
        let e = Metadata::from_pb(pb).unwrap_err();
        assert!(e.contains("/a/b: listed twice"), "{e}");
    }

    /// Found by the `fspf_metadata` fuzzer: an entry whose size no file can have (above
    /// `i64::MAX`, the largest `off_t`) was accepted, and the reader's length check overflowed.
    #[test]
    fn huge_file_size_in_metadata_overflowed_the_length_check() {
        for size in [u64::MAX, crate::format::layout::MAX_FILE_SIZE + 1] {
            let pb = MetadataPb {
                format_version: 1,
                files: vec![file_pb("/huge", size)],
                ..Default::default()
            };
            let e = Metadata::from_pb(pb).unwrap_err();
            assert!(e.contains("/huge: size"), "{e}");
        }
        let pb = MetadataPb {
            format_version: 1,
            files: vec![file_pb("/largest", crate::format::layout::MAX_FILE_SIZE)],
            ..Default::default()
        };
        assert!(Metadata::from_pb(pb).is_ok());
    }

    #[test]
    fn paths_below_is_component_wise_despite_byte_order() {
        let mut m = Metadata::default();
        for p in ["/a", "/a-x", "/a/b", "/a/b/c", "/ab", "/b"] {
            m.files.insert(
                EmbedPath::parse(p).unwrap(),
                FileEntry {
                    links: Vec::new(),
                    kind: FileKind::Dir,
                    mode: 0,
                    mtime_ns: 0,
                    owner: None,
                    ino: None,
                    ctime_ns: 0,
                },
            );
        }
        let got: Vec<String> = m
            .paths_below(&EmbedPath::parse("/a").unwrap())
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(got, ["/a", "/a/b", "/a/b/c"]);
        assert_eq!(m.paths_below(&EmbedPath::root()).len(), 6);
    }

    #[test]
    fn children_are_listed_once_in_name_order_despite_byte_order() {
        // Byte order: /a, /a-x, /a.y, /a/b, /c-d, /c/e. `/c` is implied by `/c/e` alone and is
        // met after `/c-d`; `/a` is listed and its block comes after `/a-x`.
        let mut m = Metadata::default();
        for p in ["/a", "/a-x", "/a.y", "/a/b", "/c-d", "/c/e"] {
            let kind = if p == "/a" {
                FileKind::Dir
            } else {
                FileKind::Symlink(b"t".to_vec())
            };
            m.files.insert(
                EmbedPath::parse(p).unwrap(),
                FileEntry {
                    links: Vec::new(),
                    kind,
                    mode: 0,
                    mtime_ns: 0,
                    owner: None,
                    ino: None,
                    ctime_ns: 0,
                },
            );
        }
        let got: Vec<(String, ChildKind)> = m
            .children(&EmbedPath::root())
            .map(|(n, k)| (String::from_utf8_lossy(n).into_owned(), k))
            .collect();
        let want = [
            ("a", ChildKind::Dir),
            ("a-x", ChildKind::Symlink),
            ("a.y", ChildKind::Symlink),
            ("c", ChildKind::Dir),
            ("c-d", ChildKind::Symlink),
        ];
        assert_eq!(got, want.map(|(n, k)| (n.to_string(), k)));
        assert!(m.has_below(&EmbedPath::parse("/c").unwrap()));
        assert!(!m.has_below(&EmbedPath::parse("/c-d").unwrap()));
        assert!(!m.has_below(&EmbedPath::parse("/a/b").unwrap()));
    }
}

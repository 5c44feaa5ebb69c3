//! What a path means in a protected region: the one place that decides it, for every frontend.
//!
//! A [`View`] joins three layers: the committed volume (searched in place, O(log n) per lookup,
//! O(log n + k) per listing), the [`Pending`] changes of the frontend that are queued but not yet
//! committed (new directories, removals, modes, times), and the frontend's own state that no
//! commit has seen yet, reached through [`Frontend`]: files open for writing (their plaintext
//! lives in the frontend's buffers) and the ephemeral regions (in the frontend's memory). The
//! in-process shield implements [`Frontend`] over its buffers; a test implements it over two maps.
//! Errors are a typed [`ViewError`]; frontends map them to errno in one place.
use crate::format::metadata::{FileEntry, FileKind, Owner, Region, RegionKind, SpecialKind};
use crate::format::view::ChildKind;
use crate::policy::EmbedPath;
use crate::volume::{KernelPath, Volume};
use std::collections::BTreeMap;

/// Why a path has no node (or cannot be resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewError {
    /// Nothing is listed there (`ENOENT`).
    NotFound,
    /// A file where a directory is needed (`ENOTDIR`).
    NotDir,
    /// Too many symlinks (`ELOOP`).
    Loop,
    /// Something is already there (`EEXIST`).
    Exists,
    /// A directory where a file is needed (`EISDIR`).
    IsDir,
    /// The directory is not empty (`ENOTEMPTY`).
    NotEmpty,
    /// A region's embed point cannot be removed or moved (`EBUSY`).
    Busy,
    /// The region takes no writes: a kernel region of an immutable session (`EROFS`).
    ReadOnly,
    /// A rename across regions (`EXDEV`).
    CrossDevice,
    /// An invalid request: unknown flags, a directory moved below itself (`EINVAL`).
    Invalid,
    /// Not possible in this kind of region, e.g. a symlink in an ephemeral one (`EPERM`).
    NotPermitted,
    /// Not supported on this node, e.g. the mode of a symlink (`EOPNOTSUPP`).
    NotSupported,
    /// The volume cannot be trusted: not opened, or the fspf on disk is not the one the run's
    /// anchor names (`EACCES`: fail closed).
    Untrusted,
    /// Data failed verification, or plain I/O failed (`EIO`).
    Io,
    /// The disk is full (`ENOSPC`).
    NoSpace,
    /// A quota is exhausted (`EDQUOT`).
    Quota,
    /// Too large for the file system (`EFBIG`).
    TooBig,
}

impl ViewError {
    /// The errno a POSIX frontend reports for it: the one place a view error becomes an errno,
    /// for the in-process shield and the FUSE shield alike.
    pub fn errno(self) -> i32 {
        use rustix::io::Errno as E;
        match self {
            ViewError::NotFound => E::NOENT,
            ViewError::NotDir => E::NOTDIR,
            ViewError::Loop => E::LOOP,
            ViewError::Exists => E::EXIST,
            ViewError::IsDir => E::ISDIR,
            ViewError::NotEmpty => E::NOTEMPTY,
            ViewError::Busy => E::BUSY,
            ViewError::ReadOnly => E::ROFS,
            ViewError::CrossDevice => E::XDEV,
            ViewError::Invalid => E::INVAL,
            ViewError::NotPermitted => E::PERM,
            ViewError::NotSupported => E::OPNOTSUPP,
            ViewError::Untrusted => E::ACCESS,
            ViewError::Io => E::IO,
            ViewError::NoSpace => E::NOSPC,
            ViewError::Quota => E::DQUOT,
            ViewError::TooBig => E::FBIG,
        }
        .raw_os_error()
    }
}

/// Symlinks followed while resolving one path before [`ViewError::Loop`] (Linux: 40).
pub const MAX_SYMLINKS: u32 = 40;

/// Node kinds in the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    File,
    Dir,
    Symlink(Vec<u8>),
    /// A fifo, device node or socket (an entry only).
    Special {
        kind: SpecialKind,
        rdev: u64,
    },
}

/// What is at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: NodeKind,
    pub size: u64,
    pub mode: u32,
    /// Kernel object backing it, when the region is a kernel region.
    pub kernel: Option<KernelPath>,
    /// Modification time (ns since the epoch), when the view knows it; else the kernel
    /// object's applies.
    pub mtime: Option<i64>,
    /// Recorded owner; `None`: whoever serves the view.
    pub owner: Option<Owner>,
    /// Recorded inode number; `None`: the path's ([`EmbedPath::default_ino`]).
    pub ino: Option<u64>,
    /// Change time (ns since the epoch), when the view knows it; else the modification time
    /// applies (frontends report the later of the two).
    pub ctime: Option<i64>,
    /// Names of a regular or special file (1 + its hard links); 1 for other kinds (frontends
    /// count a directory's links themselves).
    pub nlink: u64,
}

impl Node {
    fn dir(mode: u32, kernel: Option<KernelPath>, mtime: Option<i64>) -> Node {
        Node {
            nlink: 1,
            kind: NodeKind::Dir,
            size: 4096,
            mode,
            kernel,
            mtime,
            owner: None,
            ino: None,
            ctime: None,
        }
    }

    /// The node of a listed entry.
    pub fn of_entry(e: &FileEntry, kernel: Option<KernelPath>) -> Node {
        let mtime = (e.mtime_ns != 0).then_some(e.mtime_ns);
        let mut n = match &e.kind {
            // Lookups resolve a hard link to its target first ([`View::lookup`]); an
            // unresolved one shows as an empty file without content.
            FileKind::File { .. } | FileKind::Link(_) => Node {
                nlink: 1,
                kind: NodeKind::File,
                size: match e.kind {
                    FileKind::File { size, .. } => size,
                    _ => 0,
                },
                mode: e.mode,
                kernel: kernel.filter(|_| matches!(e.kind, FileKind::File { .. })),
                mtime,
                owner: None,
                ino: None,
                ctime: None,
            },
            FileKind::Dir => Node::dir(e.mode, kernel, mtime),
            FileKind::Symlink(t) => Node {
                nlink: 1,
                kind: NodeKind::Symlink(t.clone()),
                size: t.len() as u64,
                mode: 0o777,
                kernel,
                mtime,
                owner: None,
                ino: None,
                ctime: None,
            },
            FileKind::Special { kind, rdev } => Node {
                kind: NodeKind::Special {
                    kind: *kind,
                    rdev: *rdev,
                },
                size: 0,
                mode: e.mode,
                kernel: None,
                mtime,
                owner: None,
                ino: None,
                ctime: None,
                nlink: 1,
            },
        };
        n.nlink = e.nlink();
        n.owner = e.owner;
        n.ino = e.ino;
        n.ctime = (e.ctime_ns != 0).then_some(e.ctime_ns);
        n
    }
}

/// Changes queued for the next commit that lookups and listings must already show.
#[derive(Debug, Default)]
pub struct Pending {
    /// Directories made in kernel regions, with their mode.
    pub new_dirs: BTreeMap<EmbedPath, u32>,
    /// Removed paths (value: it was a directory); hidden with everything below them.
    pub removed: BTreeMap<EmbedPath, bool>,
    /// Modes set since the last commit.
    pub modes: BTreeMap<EmbedPath, u32>,
    /// Modification times set since the last commit (ns).
    pub times: BTreeMap<EmbedPath, i64>,
    /// Owners set since the last commit.
    pub owners: BTreeMap<EmbedPath, Owner>,
    /// Change times of entries whose mode, owner or times changed since the last commit (ns).
    pub ctimes: BTreeMap<EmbedPath, i64>,
}

impl Pending {
    /// Everything was committed.
    pub fn clear(&mut self) {
        self.new_dirs.clear();
        self.removed.clear();
        self.modes.clear();
        self.times.clear();
        self.owners.clear();
        self.ctimes.clear();
    }

    /// Was `ep`, or a directory above it, removed?
    pub fn hidden(&self, ep: &EmbedPath) -> bool {
        if self.removed.is_empty() {
            return false;
        }
        let mut p = Some(ep.clone());
        while let Some(q) = p {
            if self.removed.contains_key(&q) {
                return true;
            }
            p = q.parent();
        }
        false
    }
}

/// A file open for writing, as the frontend's buffer holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFile {
    pub size: u64,
    pub mode: u32,
    pub mtime: i64,
    /// The owner the file was created with, when the frontend records one.
    pub owner: Option<Owner>,
}

/// A node of an ephemeral region (in the frontend's memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EphemeralNode {
    Dir { mode: u32, mtime: i64 },
    File { size: u64, mode: u32, mtime: i64 },
}

/// The frontend's state the view consults.
pub trait Frontend {
    /// The file open for writing at `ep`, if any.
    fn open_file(&self, ep: &EmbedPath) -> Option<OpenFile>;
    /// Paths of open files strictly below `dir`.
    fn open_below(&self, dir: &EmbedPath) -> Vec<EmbedPath>;
    /// The ephemeral node at `ep`, if any.
    fn ephemeral(&self, ep: &EmbedPath) -> Option<EphemeralNode>;
    /// Ephemeral nodes strictly below `dir`, with whether each is a directory.
    fn ephemeral_below(&self, dir: &EmbedPath) -> Vec<(EmbedPath, bool)>;
}

/// The path a symlink at `link` with target `t` names: `t` itself when absolute, else `t`
/// relative to the link's directory (resolved further by the caller).
pub fn link_target(link: &EmbedPath, t: &[u8]) -> Vec<u8> {
    if t.first() == Some(&b'/') {
        return t.to_vec();
    }
    let mut v = link
        .parent()
        .unwrap_or_else(EmbedPath::root)
        .as_bytes()
        .to_vec();
    v.push(b'/');
    v.extend_from_slice(t);
    v
}

/// First component of `k` below `dir`, and whether more components follow.
fn first_component<'a>(k: &'a EmbedPath, dir: &EmbedPath) -> Option<(&'a [u8], bool)> {
    let rest = k.strip_prefix(dir)?;
    if rest.is_empty() {
        return None;
    }
    Some(match rest.iter().position(|&c| c == b'/') {
        Some(i) => (&rest[..i], true),
        None => (rest, false),
    })
}

/// The shielded view of a volume for one frontend.
pub struct View<'a> {
    pub vol: &'a Volume,
    pub pending: &'a Pending,
    pub frontend: &'a dyn Frontend,
}

impl View<'_> {
    /// Is `ep` an ancestor of some region's embed point (a directory that must exist)?
    fn region_ancestor(&self, ep: &EmbedPath) -> bool {
        self.vol
            .regions()
            .iter()
            .any(|r| &r.embed_point != ep && r.embed_point.starts_with(ep))
    }

    /// The path whose entry holds what `ep` names: a hard link's target, else `ep` itself.
    /// O(log n).
    pub fn canonical(&self, ep: &EmbedPath) -> EmbedPath {
        self.link_target(ep).unwrap_or_else(|| ep.clone())
    }

    /// The target of the hard link at `ep`, if a visible hard link is listed there.
    pub fn link_target(&self, ep: &EmbedPath) -> Option<EmbedPath> {
        // Most volumes have none: then no name costs a lookup here.
        if !self.vol.has_links()
            || self.pending.hidden(ep)
            || self.pending.new_dirs.contains_key(ep)
        {
            return None;
        }
        match self.vol.lookup(ep)?.into_owned().kind {
            FileKind::Link(t) => Some(t),
            _ => None,
        }
    }

    /// What is at `ep` (no symlink followed; a hard link shows its target). O(log n) in the
    /// volume.
    pub fn lookup(&self, ep: &EmbedPath) -> Result<Node, ViewError> {
        self.lookup_at(ep).map(|(_, n)| n)
    }

    /// [`View::lookup`], and the target when `ep` is a hard link (the path the file is listed
    /// at): one lookup in the volume for a name that is not a link.
    pub fn lookup_at(&self, ep: &EmbedPath) -> Result<(Option<EmbedPath>, Node), ViewError> {
        let mut link = None;
        let (target, mut n) = match self.lookup_kind(ep, &mut link) {
            Err(_) if link.is_some() => {
                let t = link.take().unwrap_or_else(|| ep.clone());
                let n = self.lookup_kind(&t, &mut link)?;
                if link.is_some() {
                    // A link to a link: parsing refuses it.
                    return Err(ViewError::Io);
                }
                (Some(t), n)
            }
            r => (None, r?),
        };
        let ep = target.as_ref().unwrap_or(ep);
        // Kernel regions: the number every process shows for it (unique among the entries).
        if self
            .vol
            .region_for(ep)
            .is_some_and(|r| r.kind != RegionKind::Ephemeral)
        {
            n.ino = Some(self.vol.ino_of(ep, n.ino));
        }
        if let Some(o) = self.pending.owners.get(ep) {
            n.owner = Some(*o);
        }
        if let Some(&c) = self.pending.ctimes.get(ep) {
            n.ctime = n.ctime.max(Some(c));
        }
        Ok((target, n))
    }

    /// What the entries at `ep` make of it. A hard link listed there is not followed: `link`
    /// is set to its target, and the result is an error.
    fn lookup_kind(&self, ep: &EmbedPath, link: &mut Option<EmbedPath>) -> Result<Node, ViewError> {
        let Some(region) = self.vol.region_for(ep) else {
            // Outside every region: only the directories that lead to an embed point exist
            // (`/` of a volume whose one region is `/data`).
            return match self.region_ancestor(ep) {
                true => Ok(Node::dir(0o755, None, None)),
                false => Err(ViewError::NotFound),
            };
        };
        let kernel = KernelPath::of(region, ep);
        if let Some(o) = self.frontend.open_file(ep) {
            let listed = self.vol.lookup(ep);
            let nlink = listed.as_ref().map_or(1, |e| e.nlink());
            let ino = listed.and_then(|e| e.ino);
            return Ok(Node {
                nlink,
                kind: NodeKind::File,
                size: o.size,
                mode: o.mode,
                kernel,
                mtime: Some(o.mtime),
                owner: o.owner,
                ino,
                ctime: None,
            });
        }
        if region.kind == RegionKind::Ephemeral {
            return match self.frontend.ephemeral(ep) {
                Some(EphemeralNode::Dir { mode, mtime }) => Ok(Node::dir(mode, None, Some(mtime))),
                Some(EphemeralNode::File { size, mode, mtime }) => Ok(Node {
                    nlink: 1,
                    kind: NodeKind::File,
                    size,
                    mode,
                    kernel: None,
                    mtime: Some(mtime),
                    owner: None,
                    ino: None,
                    ctime: None,
                }),
                None if ep == &region.embed_point
                    || self.region_ancestor(ep)
                    || !self.frontend.ephemeral_below(ep).is_empty() =>
                {
                    Ok(Node::dir(0o755, None, None))
                }
                None => Err(ViewError::NotFound),
            };
        }
        if let Some(&mode) = self.pending.new_dirs.get(ep) {
            return Ok(Node::dir(mode, kernel, self.pending.times.get(ep).copied()));
        }
        if self.pending.hidden(ep) {
            return Err(ViewError::NotFound);
        }
        match self.vol.lookup(ep) {
            Some(e) if matches!(e.kind, FileKind::Link(_)) => {
                if let FileKind::Link(t) = e.into_owned().kind {
                    *link = Some(t);
                }
                Err(ViewError::NotFound)
            }
            Some(e) => {
                let mut n = Node::of_entry(&e, kernel);
                if !matches!(n.kind, NodeKind::Symlink(_)) {
                    if let Some(m) = self.pending.modes.get(ep) {
                        n.mode = *m;
                    }
                    if let Some(t) = self.pending.times.get(ep) {
                        n.mtime = Some(*t);
                    }
                }
                Ok(n)
            }
            None if ep == &region.embed_point
                || self.region_ancestor(ep)
                || self.vol.has_below(ep)
                || self.pending.new_dirs.keys().any(|d| d.starts_with(ep))
                || !self.frontend.open_below(ep).is_empty() =>
            {
                // An implied directory (only paths below it are listed); a mode or time set on
                // it is queued as its entry and shows at once.
                let mode = self.pending.modes.get(ep).copied().unwrap_or(0o755);
                Ok(Node::dir(mode, kernel, self.pending.times.get(ep).copied()))
            }
            None => Err(ViewError::NotFound),
        }
    }

    /// Entries of directory `ep`, sorted by name, without `.`/`..`. O(log n + k) in the volume.
    pub fn children(&self, ep: &EmbedPath) -> Vec<(Vec<u8>, ChildKind)> {
        let mut m: BTreeMap<Vec<u8>, ChildKind> = BTreeMap::new();
        for r in self.vol.regions() {
            if let Some((c, _)) = first_component(&r.embed_point, ep) {
                m.insert(c.to_vec(), ChildKind::Dir);
            }
        }
        let eph = self
            .vol
            .region_for(ep)
            .is_some_and(|r| r.kind == RegionKind::Ephemeral);
        if eph {
            for (k, is_dir) in self.frontend.ephemeral_below(ep) {
                if let Some((c, more)) = first_component(&k, ep) {
                    let t = if more || is_dir {
                        ChildKind::Dir
                    } else {
                        ChildKind::File
                    };
                    m.entry(c.to_vec()).or_insert(t);
                }
            }
        } else {
            for (c, kind) in self.vol.children(ep) {
                if !self.pending.removed.is_empty()
                    && ep
                        .join(c)
                        .is_ok_and(|p| self.pending.removed.contains_key(&p))
                {
                    continue;
                }
                m.entry(c.to_vec()).or_insert(kind);
            }
            for d in self.pending.new_dirs.keys() {
                if let Some((c, _)) = first_component(d, ep) {
                    m.insert(c.to_vec(), ChildKind::Dir);
                }
            }
        }
        for k in self.frontend.open_below(ep) {
            if let Some((c, more)) = first_component(&k, ep) {
                m.entry(c.to_vec()).or_insert(if more {
                    ChildKind::Dir
                } else {
                    ChildKind::File
                });
            }
        }
        m.into_iter().collect()
    }

    /// A symlink in a directory position of `ep` (`l/f` with `l -> d`): the path with the
    /// link's target substituted (to be routed again), [`ViewError::NotDir`] when a file is in a
    /// directory position, or `None` when every ancestor below the region is a directory.
    pub fn dir_link(&self, region: &Region, ep: &EmbedPath) -> Option<Result<Vec<u8>, ViewError>> {
        let b = ep.as_bytes();
        let mut i = region.embed_point.as_bytes().len();
        while let Some(off) = b
            .get(i + 1..)
            .and_then(|r| r.iter().position(|&c| c == b'/'))
        {
            let end = i + 1 + off;
            i = end;
            let Ok(anc) = EmbedPath::from_bytes(&b[..end]) else {
                continue;
            };
            if self.frontend.open_file(&anc).is_some() {
                return Some(Err(ViewError::NotDir));
            }
            if self.pending.hidden(&anc) || self.pending.new_dirs.contains_key(&anc) {
                continue;
            }
            match self.vol.lookup(&anc).map(|e| e.into_owned().kind) {
                Some(FileKind::Symlink(t)) => {
                    let mut v = link_target(&anc, &t);
                    v.extend_from_slice(&b[end..]);
                    return Some(Ok(v));
                }
                // A file, special file or hard link (never a directory) in a directory position.
                Some(FileKind::File { .. } | FileKind::Special { .. } | FileKind::Link(_)) => {
                    return Some(Err(ViewError::NotDir))
                }
                _ => {}
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{FileId, RegionKey, Tag};
    use crate::format::metadata::{Metadata, Protection};

    /// The frontend's state, as two maps.
    #[derive(Default)]
    struct Mem {
        open: BTreeMap<EmbedPath, OpenFile>,
        eph: BTreeMap<EmbedPath, EphemeralNode>,
    }
    impl Frontend for Mem {
        fn open_file(&self, ep: &EmbedPath) -> Option<OpenFile> {
            self.open.get(ep).copied()
        }
        fn open_below(&self, dir: &EmbedPath) -> Vec<EmbedPath> {
            self.open
                .keys()
                .filter(|k| *k != dir && k.starts_with(dir))
                .cloned()
                .collect()
        }
        fn ephemeral(&self, ep: &EmbedPath) -> Option<EphemeralNode> {
            self.eph.get(ep).copied()
        }
        fn ephemeral_below(&self, dir: &EmbedPath) -> Vec<(EmbedPath, bool)> {
            self.eph
                .iter()
                .filter(|(k, _)| *k != dir && k.starts_with(dir))
                .map(|(k, n)| (k.clone(), matches!(n, EphemeralNode::Dir { .. })))
                .collect()
        }
    }

    fn p(s: &str) -> EmbedPath {
        EmbedPath::parse(s).unwrap()
    }

    /// A volume over a frozen index: no disk needed. `/` ephemeral, `/data` an encrypted kernel
    /// region holding `a`, `d/b`, `l -> d`, `f`, `deep/x/y`.
    fn volume() -> Volume {
        let mut m = Metadata::default();
        m.regions.push(Region {
            embed_point: EmbedPath::root(),
            kind: RegionKind::Ephemeral,
            protection: Protection::Encrypted,
            key: Some(RegionKey::random(32).unwrap()),
            chunk_len: 4096,
        });
        m.regions.push(Region {
            embed_point: p("/data"),
            kind: RegionKind::Kernel("/srv/vol".into()),
            protection: Protection::Encrypted,
            key: Some(RegionKey::random(32).unwrap()),
            chunk_len: 4096,
        });
        let file = |n: u8, size: u64| FileEntry {
            links: Vec::new(),
            kind: FileKind::File {
                id: FileId([n; 16]),
                size,
                root: None,
            },
            mode: 0o640,
            mtime_ns: 1_000 + u64::from(n) as i64,
            owner: None,
            ino: None,
            ctime_ns: 0,
        };
        m.files.insert(p("/data/a"), file(1, 10));
        m.files.insert(
            p("/data/d"),
            FileEntry {
                links: Vec::new(),
                kind: FileKind::Dir,
                mode: 0o750,
                mtime_ns: 0,
                owner: None,
                ino: None,
                ctime_ns: 0,
            },
        );
        m.files.insert(p("/data/d/b"), file(2, 20));
        m.files.insert(
            p("/data/l"),
            FileEntry {
                links: Vec::new(),
                kind: FileKind::Symlink(b"d".to_vec()),
                mode: 0o777,
                mtime_ns: 0,
                owner: None,
                ino: None,
                ctime_ns: 0,
            },
        );
        m.files.insert(p("/data/f"), file(3, 30));
        m.files.insert(p("/data/deep/x/y"), file(4, 40));
        let bytes = crate::format::index::build_index(&m, Tag([7; 16])).unwrap();
        let bytes: &'static [u8] = Box::leak(bytes.to_vec().into_boxed_slice());
        Volume::from_index(std::path::Path::new("/srv/fspf.pb"), None, bytes).unwrap()
    }

    #[test]
    fn the_root_of_a_volume_without_a_root_region_was_not_found() {
        let mut m = Metadata::default();
        m.regions.push(Region {
            embed_point: p("/srv/data"),
            kind: RegionKind::Kernel("/vol".into()),
            protection: Protection::Encrypted,
            key: Some(RegionKey::random(32).unwrap()),
            chunk_len: 4096,
        });
        let bytes = crate::format::index::build_index(&m, Tag([7; 16])).unwrap();
        let bytes: &'static [u8] = Box::leak(bytes.to_vec().into_boxed_slice());
        let vol = Volume::from_index(std::path::Path::new("/fspf.pb"), None, bytes).unwrap();
        let (pending, fe) = (Pending::default(), Mem::default());
        let v = View {
            vol: &vol,
            pending: &pending,
            frontend: &fe,
        };
        for d in ["/", "/srv", "/srv/data"] {
            assert_eq!(v.lookup(&p(d)).unwrap().kind, NodeKind::Dir, "{d}");
        }
        assert_eq!(names(&v, "/"), ["srv:Dir"]);
        assert_eq!(names(&v, "/srv"), ["data:Dir"]);
        assert!(matches!(v.lookup(&p("/etc")), Err(ViewError::NotFound)));
        assert!(matches!(v.lookup(&p("/srv/x")), Err(ViewError::NotFound)));
    }

    fn names(v: &View<'_>, dir: &str) -> Vec<String> {
        v.children(&p(dir))
            .into_iter()
            .map(|(n, k)| format!("{}:{k:?}", String::from_utf8_lossy(&n)))
            .collect()
    }

    #[test]
    fn listed_entries_implied_directories_and_regions() {
        let vol = volume();
        let (pending, fe) = (Pending::default(), Mem::default());
        let v = View {
            vol: &vol,
            pending: &pending,
            frontend: &fe,
        };
        let a = v.lookup(&p("/data/a")).unwrap();
        assert_eq!(
            (a.kind, a.size, a.mode, a.mtime),
            (NodeKind::File, 10, 0o640, Some(1001))
        );
        assert_eq!(
            a.kernel.unwrap().full(),
            std::path::PathBuf::from("/srv/vol/a")
        );
        assert_eq!(v.lookup(&p("/data/d")).unwrap().mode, 0o750);
        assert_eq!(v.lookup(&p("/data/deep")).unwrap().kind, NodeKind::Dir);
        assert_eq!(v.lookup(&p("/data")).unwrap().kind, NodeKind::Dir);
        assert_eq!(
            v.lookup(&p("/")).unwrap().kind,
            NodeKind::Dir,
            "region ancestor"
        );
        assert_eq!(
            v.lookup(&p("/data/l")).unwrap().kind,
            NodeKind::Symlink(b"d".to_vec())
        );
        assert_eq!(v.lookup(&p("/data/nope")), Err(ViewError::NotFound));
        assert_eq!(
            names(&v, "/data"),
            ["a:File", "d:Dir", "deep:Dir", "f:File", "l:Symlink"]
        );
        assert_eq!(names(&v, "/"), ["data:Dir"]);
    }

    #[test]
    fn pending_changes_show_before_the_commit() {
        let vol = volume();
        let mut pending = Pending::default();
        pending.removed.insert(p("/data/d"), true);
        pending.new_dirs.insert(p("/data/n"), 0o700);
        pending.modes.insert(p("/data/a"), 0o755);
        pending.times.insert(p("/data/a"), 42);
        let mut fe = Mem::default();
        fe.open.insert(
            p("/data/w/new"),
            OpenFile {
                size: 3,
                mode: 0o600,
                mtime: 7,
                owner: None,
            },
        );
        let v = View {
            vol: &vol,
            pending: &pending,
            frontend: &fe,
        };
        assert_eq!(v.lookup(&p("/data/d")), Err(ViewError::NotFound));
        assert_eq!(
            v.lookup(&p("/data/d/b")),
            Err(ViewError::NotFound),
            "hidden below"
        );
        assert_eq!(v.lookup(&p("/data/n")).unwrap().mode, 0o700);
        let a = v.lookup(&p("/data/a")).unwrap();
        assert_eq!((a.mode, a.mtime), (0o755, Some(42)));
        assert_eq!(v.lookup(&p("/data/w")).unwrap().kind, NodeKind::Dir);
        assert_eq!(v.lookup(&p("/data/w/new")).unwrap().size, 3);
        assert_eq!(
            names(&v, "/data"),
            [
                "a:File",
                "deep:Dir",
                "f:File",
                "l:Symlink",
                "n:Dir",
                "w:Dir"
            ]
        );
    }

    #[test]
    fn symlinks_in_directory_positions_and_files_that_are_not_directories() {
        let vol = volume();
        let (pending, fe) = (Pending::default(), Mem::default());
        let v = View {
            vol: &vol,
            pending: &pending,
            frontend: &fe,
        };
        let region = vol.region_for(&p("/data")).unwrap().clone();
        assert_eq!(
            v.dir_link(&region, &p("/data/l/b")),
            Some(Ok(b"/data/d/b".to_vec()))
        );
        assert_eq!(
            v.dir_link(&region, &p("/data/f/x")),
            Some(Err(ViewError::NotDir))
        );
        assert_eq!(v.dir_link(&region, &p("/data/d/b")), None);
        assert_eq!(link_target(&p("/data/l"), b"/abs"), b"/abs".to_vec());
        assert_eq!(
            link_target(&p("/data/l"), b"rel/x"),
            b"/data/rel/x".to_vec()
        );
    }

    #[test]
    fn ephemeral_regions_come_from_the_frontend() {
        let vol = volume();
        let pending = Pending::default();
        let mut fe = Mem::default();
        fe.eph.insert(
            p("/tmp/x"),
            EphemeralNode::File {
                size: 5,
                mode: 0o600,
                mtime: 9,
            },
        );
        let v = View {
            vol: &vol,
            pending: &pending,
            frontend: &fe,
        };
        assert_eq!(v.lookup(&p("/tmp/x")).unwrap().size, 5);
        assert_eq!(v.lookup(&p("/tmp")).unwrap().kind, NodeKind::Dir);
        assert_eq!(v.lookup(&p("/other")), Err(ViewError::NotFound));
        assert_eq!(names(&v, "/"), ["data:Dir", "tmp:Dir"]);
    }
}

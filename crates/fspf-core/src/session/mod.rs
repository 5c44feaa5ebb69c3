//! The session: one frontend's live state over an opened volume, and the rules every frontend
//! (the in-process shield, FUSE) applies to it.
//!
//! A [`Session`] owns the opened [`Volume`], the run's trust [`Anchor`] (a trait: the preload
//! implements it over an inherited memfd, a FUSE daemon over its own state, the tests over a
//! cell), the queue of uncommitted [`Change`]s, the overlay of uncommitted entries
//! ([`Pending`]) and the ephemeral regions (sealed in memory). It answers what a path means
//! ([`Session::lookup`], [`Session::children`], through [`crate::view::View`]), changes the
//! namespace ([`Session::mkdir`], [`Session::unlink`], [`Session::rename`],
//! [`Session::symlink`], [`Session::chmod`], [`Session::set_mtime`]), stages file versions and
//! commits (the protocol in `commit.rs`). Errors are a typed [`ViewError`].
//!
//! What stays with the frontend: the files it holds open for writing (their plaintext buffers),
//! reached through [`OpenFiles`], and when to commit (fsync, fork/exec, exit; the session says
//! when a batch is full). After any call that may commit, the frontend takes the committed
//! versions ([`Session::take_committed`]) to move its open buffers onto them.
mod commit;
mod namespace;
#[cfg(test)]
mod tests;

use crate::format::metadata::{FileKind, Owner, Protection, Region, RegionKind};
use crate::format::view::ChildKind;
use crate::policy::EmbedPath;
use crate::view::{EphemeralNode, Frontend, Node, OpenFile, Pending, View, ViewError};
use crate::volume::memory::{self, SealedMem};
use crate::volume::{kernel_fs, Change, KernelPath, StagedFile};
use crate::{Tag, Volume, VolumeKey, VolumeOptions};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

pub use commit::Committed;
pub use namespace::{Renamed, RENAME_NOREPLACE};

/// What a run's trust anchor holds: the tag the run trusts and, during a commit, the tag of the
/// fspf about to replace it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnchorState {
    pub current: Tag,
    /// Announced by a committer that has not (yet) confirmed its commit.
    pub pending: Option<Tag>,
}

impl AnchorState {
    /// Parse the anchor's bytes: 16 (one tag) or 32 (current, then announced).
    pub fn parse(b: &[u8]) -> Option<AnchorState> {
        let tag = |s: &[u8]| {
            let mut t = [0u8; 16];
            t.copy_from_slice(s);
            Tag(t)
        };
        match b.len() {
            16 => Some(AnchorState {
                current: tag(b),
                pending: None,
            }),
            32 => Some(AnchorState {
                current: tag(&b[..16]),
                pending: Some(tag(&b[16..])),
            }),
            _ => None,
        }
    }

    /// The bytes [`AnchorState::parse`] reads.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = self.current.0.to_vec();
        if let Some(p) = self.pending {
            v.extend_from_slice(&p.0);
        }
        v
    }

    /// The trusted tag among the two that equals `disk`, if any.
    pub fn accepts(&self, disk: Tag) -> Option<Tag> {
        if disk == self.current || self.pending == Some(disk) {
            Some(disk)
        } else {
            None
        }
    }
}

/// How often a process joining a run opens the fspf again when another process of the run
/// committed meanwhile ([`join_run`]).
pub const JOIN_RETRIES: usize = 32;

/// Open the state a process joining a run must see: the anchor's current tag, or, during a
/// commit in flight (two tags), whichever of the two is on disk (`disk_tag`). Another process of
/// the run may commit between the read of the anchor and the open (the fspf on disk is then
/// newer than the tag read), so a failed open is tried again, at most [`JOIN_RETRIES`] times,
/// with the anchor read anew (`read_anchor`): when it moved, and when it names a commit in
/// flight, whose commit point changes the disk without moving the anchor. Returns the open's
/// result and the tag it was asked for.
pub fn join_run<V, E>(
    mut anchor: AnchorState,
    mut read_anchor: impl FnMut() -> Option<AnchorState>,
    mut disk_tag: impl FnMut() -> Option<Tag>,
    mut open: impl FnMut(Tag) -> Result<V, E>,
) -> (Result<V, E>, Tag) {
    let mut retries = 0;
    loop {
        // A committer killed inside its commit window leaves two trusted tags: the one on disk
        // is the one to open (either is a state the run committed).
        let trusted = match anchor.pending {
            Some(_) => disk_tag()
                .and_then(|d| anchor.accepts(d))
                .unwrap_or(anchor.current),
            None => anchor.current,
        };
        let r = open(trusted);
        if r.is_err() && retries < JOIN_RETRIES {
            if let Some(now) = read_anchor() {
                if now != anchor || now.pending.is_some() {
                    anchor = now;
                    retries += 1;
                    continue;
                }
            }
        }
        return (r, trusted);
    }
}

/// Write a tag file, the durable copy of an [`Anchor`] outside the run: one tag per line (two
/// while a commit is in flight: a reader may trust either), overwritten in place with one
/// `fdatasync` ([`crate::volume::overwrite_file_durably`]). A commit announces through it
/// before its commit point; [`publish_tag_file`] follows after it.
pub fn write_tag_file(path: &std::path::Path, tags: &[Tag]) -> crate::Result<()> {
    crate::volume::overwrite_file_durably(path, tag_lines(tags).as_bytes(), 0o600)
}

/// A tag file's content: one tag per line.
fn tag_lines(tags: &[Tag]) -> String {
    tags.iter().map(|t| format!("{t}\n")).collect()
}

/// [`write_tag_file`] without its `fdatasync`: for a tag file that is a channel to another
/// process on this boot (the one `fspf mount` keeps for `fspf umount` when no `--tag-file` was
/// given, in a runtime directory), not a durable anchor. A killed writer leaves it in the page
/// cache, so it still names the state on disk; a power loss may leave an older content.
pub fn mirror_tag_file(path: &std::path::Path, tags: &[Tag]) -> crate::Result<()> {
    crate::volume::overwrite_file(path, tag_lines(tags).as_bytes(), 0o600)
}

/// After a commit point: the tag file names `tag` alone, overwritten in place **without**
/// `fdatasync`. The durable content is the announce before it (both tags, either of which a
/// reader may trust), until the next commit's announce or [`settle_tag_file`] (the end of a
/// run, an unmount) makes it durable: a process that dies leaves the write in the page cache,
/// and only a power loss can bring back the announce (THREAT-MODEL.md, "The trusted channel
/// for the tag"). Saves one device flush per commit.
pub fn publish_tag_file(path: &std::path::Path, tag: Tag) -> crate::Result<()> {
    mirror_tag_file(path, &[tag])
}

/// Make the tag file at `path` name `tag` alone, durably: when it already does (the run's last
/// committer wrote it), only its data is synced (nothing to write back when it is on disk
/// already); else it is written as [`write_tag_file`] does. For `fspf run`, before the program
/// starts and after it ends.
pub fn settle_tag_file(path: &std::path::Path, tag: Tag) -> crate::Result<()> {
    settle_tag_file_with(path, tag, true)
}

/// [`settle_tag_file`] at the start of a run: a file that already names `tag` alone is left as
/// it is, not synced. Nothing is lost if that content is not durable yet (the previous run was
/// killed after a publish): what is durable is the announce before it, which names this
/// state too, and the run's first commit announces durably before its commit point.
pub fn start_tag_file(path: &std::path::Path, tag: Tag) -> crate::Result<()> {
    settle_tag_file_with(path, tag, false)
}

fn settle_tag_file_with(path: &std::path::Path, tag: Tag, sync: bool) -> crate::Result<()> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let want = tag_lines(&[tag]);
    let same = (|| {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)
            .ok()?;
        let m = f.metadata().ok()?;
        if !m.is_file() || m.nlink() != 1 || m.len() != want.len() as u64 {
            return None;
        }
        let mut got = Vec::with_capacity(want.len());
        f.read_to_end(&mut got).ok()?;
        (got == want.as_bytes()).then_some(f)
    })();
    match same {
        Some(_) if !sync => Ok(()),
        Some(f) => f
            .sync_data()
            .map_err(|e| crate::Error::io(path.display().to_string(), e)),
        None => write_tag_file(path, &[tag]),
    }
}

/// The run's trust anchor: where the tag the run trusts lives while the run goes on, and the
/// lock that serialises the run's committers. Storage must not be able to change either.
pub trait Anchor {
    /// Held while one committer commits; released on drop.
    type Lock;
    /// The trusted state; `None` when it cannot be read (the session then fails closed).
    fn read(&self) -> Option<AnchorState>;
    /// Exclusive: the run's committers one at a time (blocks).
    fn lock(&self) -> Result<Self::Lock, ViewError>;
    /// Before the commit point (under the lock): trust `next` as well as `current`.
    fn announce(&self, current: Tag, next: Tag) -> Result<(), ViewError>;
    /// After the commit point (or on finding a crashed committer's commit on disk): `t` alone.
    fn publish(&self, t: Tag) -> Result<(), ViewError>;
    /// Called right after the commit point, before [`Anchor::publish`] (fault injection).
    fn after_commit_point(&self) {}
}

impl<T: Anchor> Anchor for Arc<T> {
    type Lock = T::Lock;
    fn read(&self) -> Option<AnchorState> {
        (**self).read()
    }
    fn lock(&self) -> Result<Self::Lock, ViewError> {
        (**self).lock()
    }
    fn announce(&self, current: Tag, next: Tag) -> Result<(), ViewError> {
        (**self).announce(current, next)
    }
    fn publish(&self, t: Tag) -> Result<(), ViewError> {
        (**self).publish(t)
    }
    fn after_commit_point(&self) {
        (**self).after_commit_point()
    }
}

/// The frontend's files open for writing, as the view must show them.
pub trait OpenFiles {
    /// The file open for writing at `ep`, if any.
    fn open_file(&self, ep: &EmbedPath) -> Option<OpenFile>;
    /// Paths of open files strictly below `dir`.
    fn open_below(&self, dir: &EmbedPath) -> Vec<EmbedPath>;
}

/// No files open (a frontend between operations, the CLI, tests).
pub struct NoOpenFiles;

impl OpenFiles for NoOpenFiles {
    fn open_file(&self, _: &EmbedPath) -> Option<OpenFile> {
        None
    }
    fn open_below(&self, _: &EmbedPath) -> Vec<EmbedPath> {
        Vec::new()
    }
}

/// A node of an ephemeral region.
#[derive(Debug)]
pub enum EphNode {
    Dir { mode: u32, mtime: i64 },
    File { sealed: SealedMem, mtime: i64 },
}

/// What a staged, append-only version added to the version it was loaded from: rebased at
/// commit onto what another process of the run committed meanwhile.
#[derive(Debug, Clone)]
pub struct AppendDelta {
    pub base: crate::Version,
    pub delta: Vec<u8>,
}

/// The ranges of `[0, len)` that [`Session::stage_diff`] compares: all but `equal` (sorted,
/// disjoint, whole `chunk`s below `common`, else an error naming the first that is not).
fn compared_ranges(
    equal: &[(u64, u64)],
    chunk: u64,
    common: u64,
    len: u64,
) -> Result<Vec<(u64, u64)>, String> {
    let mut todo = Vec::new();
    let mut at = 0u64;
    for &(a, b) in equal {
        if a < at || b < a || b > common || !a.is_multiple_of(chunk) || !b.is_multiple_of(chunk) {
            return Err(format!(
                "the buffer's unloaded part {a}..{b} is not whole chunks"
            ));
        }
        if a > at {
            todo.push((at, a));
        }
        at = b;
    }
    todo.push((at, len));
    Ok(todo)
}

/// Changes larger than this (bytes written since the last commit) are staged as a whole new
/// version instead of an in-place update: an update holds what it changed in memory.
pub const UPDATE_MAX: u64 = 64 << 20;

/// [`Session::stage_diff`] compares this many bytes at a time.
const DIFF_BLOCK: usize = 1 << 20;

/// The largest file a frontend writes (1 TiB): every version is sealed whole at its commit, so
/// a sparse `truncate` to petabytes would mean writing petabytes. Larger sizes give
/// [`ViewError::TooBig`] (`EFBIG`), as a file system's own limit does.
pub const MAX_FILE_LEN: u64 = 1 << 40;

/// Appends larger than this are not kept for a rebase (the later committer then wins).
pub const APPEND_REBASE_MAX: u64 = 64 << 20;

/// [`Session::stage_puts`] of fewer files than this stays on the calling thread (a pool job sent
/// from outside the pool wakes a worker and waits for it: more than sealing a small file costs).
const STAGE_PUTS_PARALLEL_MIN: usize = 16;

/// What a staged version records besides its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionMeta {
    /// Permission bits.
    pub mode: u32,
    /// The modification time the program set; `None`: now.
    pub mtime: Option<i64>,
    /// The owner to record; `None`: none (whoever serves the file owns it).
    pub owner: Option<Owner>,
}

/// What a frontend wrote into a file's buffer since the buffer last equalled a committed or
/// staged state: the byte ranges written and the smallest length it had
/// ([`Session::stage_update`] stages exactly those).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    /// Sorted, disjoint, non-adjacent (offset, length).
    pub ranges: Vec<(u64, u64)>,
    pub min_len: u64,
}

impl Written {
    /// Nothing written yet to a buffer of `len` bytes.
    pub fn new(len: u64) -> Written {
        Written {
            ranges: Vec::new(),
            min_len: len,
        }
    }

    /// Record bytes `off .. off + len` as written.
    pub fn add(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (mut lo, mut hi) = (off, off.saturating_add(len));
        // The ranges that touch [lo, hi] merge into one.
        let first = self.ranges.partition_point(|&(o, l)| o + l < lo);
        let mut last = first;
        while last < self.ranges.len() && self.ranges[last].0 <= hi {
            lo = lo.min(self.ranges[last].0);
            hi = hi.max(self.ranges[last].0 + self.ranges[last].1);
            last += 1;
        }
        self.ranges.splice(first..last, [(lo, hi - lo)]);
    }

    /// The buffer was cut (or extended) to `len`.
    pub fn set_len(&mut self, len: u64) {
        self.min_len = self.min_len.min(len);
        self.ranges.retain_mut(|(o, l)| {
            if *o >= len {
                return false;
            }
            *l = (*l).min(len - *o);
            true
        });
    }
}

/// What a queued in-place update wrote: the length it left, the shortest length since its
/// base, and the bytes written (at most [`UPDATE_MAX`]).
#[derive(Debug, Clone)]
pub(crate) struct UpdateWrites {
    pub len: u64,
    pub min_len: u64,
    pub writes: Vec<(u64, Vec<u8>)>,
    pub meta: VersionMeta,
}

/// How a session is opened and when it asks for a commit.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub fspf: PathBuf,
    pub key: Option<VolumeKey>,
    pub opts: VolumeOptions,
    /// Kernel regions take writes (`SCONE_FSPF_MUTABLE=1`); ephemeral regions always do.
    pub mutable: bool,
    /// A batch is full after this many queued changes ...
    pub batch_files: usize,
    /// ... or this many staged bytes.
    pub batch_bytes: u64,
    /// Messages for the user (a commit that lost changes); the frontend decides where they go.
    pub say: fn(&str),
    /// Diagnostics (why an operation failed).
    pub log: fn(&str),
}

impl SessionConfig {
    pub fn new(fspf: PathBuf, key: Option<VolumeKey>, opts: VolumeOptions) -> SessionConfig {
        SessionConfig {
            fspf,
            key,
            opts,
            mutable: false,
            batch_files: 500,
            batch_bytes: 256 << 20,
            say: |m| eprintln!("fspf: {m}"),
            log: |_| {},
        }
    }
}

/// One frontend's state over a volume. See the module documentation.
pub struct Session<A: Anchor> {
    cfg: SessionConfig,
    anchor: A,
    /// `None` when the fspf could not be opened or authenticated: everything fails (EACCES).
    vol: Option<Volume>,
    eph: BTreeMap<EmbedPath, EphNode>,
    pending: Pending,
    appends: BTreeMap<EmbedPath, AppendDelta>,
    /// The bytes each queued update wrote, to apply them again onto what another process
    /// committed meanwhile (`commit.rs`, `rebase_updates`).
    updates: BTreeMap<EmbedPath, Vec<UpdateWrites>>,
    /// Files whose queued update went onto another process's newer state: after the commit
    /// the frontend's buffer takes the committed content ([`Committed::merged`]).
    remerge: BTreeSet<EmbedPath>,
    queue: Vec<Change>,
    /// Where in `queue` each directory's [`Change::Touch`] is (one per directory and commit).
    touches: BTreeMap<EmbedPath, usize>,
    /// Files with a version in the queue, as the view shows them until the commit.
    queued: BTreeMap<EmbedPath, OpenFile>,
    staged_bytes: u64,
    /// Kernel directories known to exist (see `ensure_parent`).
    dirs_made: HashSet<PathBuf>,
    /// Committed since the frontend last asked ([`Session::take_committed`]).
    committed: Committed,
}

/// The view's frontend: the session's ephemeral regions and queued file versions, plus the
/// frontend's open files (which take precedence: they are newer than what they staged).
struct Joined<'a> {
    open: &'a dyn OpenFiles,
    eph: &'a BTreeMap<EmbedPath, EphNode>,
    queued: &'a BTreeMap<EmbedPath, OpenFile>,
}

/// Keys of `map` strictly below `dir` (a range query: stops at the first key past it).
pub fn below<'a, V>(
    map: &'a BTreeMap<EmbedPath, V>,
    dir: &'a EmbedPath,
) -> impl Iterator<Item = (&'a EmbedPath, &'a V)> + 'a {
    map.range(dir.clone()..)
        .take_while(move |(k, _)| k.as_bytes().starts_with(dir.as_bytes()))
        .filter(move |(k, _)| *k != dir && k.starts_with(dir))
}

/// Remove `ep` and everything below it from `m`; returns what was removed.
pub fn remove_tree<V>(m: &mut BTreeMap<EmbedPath, V>, ep: &EmbedPath) -> Vec<(EmbedPath, V)> {
    let keys: Vec<EmbedPath> = m
        .range(ep.clone()..)
        .take_while(|(k, _)| k.as_bytes().starts_with(ep.as_bytes()))
        .filter(|(k, _)| k.starts_with(ep))
        .map(|(k, _)| k.clone())
        .collect();
    keys.into_iter()
        .filter_map(|k| m.remove(&k).map(|v| (k, v)))
        .collect()
}

/// Move `from` and everything below it to `to` in `m` (a rename), replacing what was at or below
/// `to`; `moved` sees each moved value with its new path. Returns the replaced entries.
pub fn move_tree<V>(
    m: &mut BTreeMap<EmbedPath, V>,
    from: &EmbedPath,
    to: &EmbedPath,
    mut moved: impl FnMut(&EmbedPath, &mut V),
) -> Vec<(EmbedPath, V)> {
    let replaced = remove_tree(m, to);
    for (k, mut v) in remove_tree(m, from) {
        // `k` is `from` or below it, so it rebases; the fallback only keeps the value.
        let dest = k.rebased(from, to).unwrap_or_else(|| to.clone());
        moved(&dest, &mut v);
        m.insert(dest, v);
    }
    replaced
}

impl Frontend for Joined<'_> {
    fn open_file(&self, ep: &EmbedPath) -> Option<OpenFile> {
        self.open
            .open_file(ep)
            .or_else(|| self.queued.get(ep).copied())
    }
    fn open_below(&self, dir: &EmbedPath) -> Vec<EmbedPath> {
        let mut v = self.open.open_below(dir);
        v.extend(below(self.queued, dir).map(|(k, _)| k.clone()));
        v
    }
    fn ephemeral(&self, ep: &EmbedPath) -> Option<EphemeralNode> {
        Some(match self.eph.get(ep)? {
            EphNode::Dir { mode, mtime } => EphemeralNode::Dir {
                mode: *mode,
                mtime: *mtime,
            },
            EphNode::File { sealed, mtime } => EphemeralNode::File {
                size: match &sealed.entry.kind {
                    FileKind::File { size, .. } => *size,
                    _ => 0,
                },
                mode: sealed.entry.mode,
                mtime: *mtime,
            },
        })
    }
    fn ephemeral_below(&self, dir: &EmbedPath) -> Vec<(EmbedPath, bool)> {
        below(self.eph, dir)
            .map(|(k, n)| (k.clone(), matches!(n, EphNode::Dir { .. })))
            .collect()
    }
}

/// Current time, ns since the epoch.
pub fn now_ns() -> i64 {
    crate::format::metadata::now_ns()
}

impl<A: Anchor> Session<A> {
    /// A session over `vol` (already opened against the anchor's tag; `None` when that failed).
    pub fn new(mut cfg: SessionConfig, anchor: A, mut vol: Option<Volume>) -> Session<A> {
        // A session's commits go to the metadata log (FORMAT.md §5c): they cost what changed.
        cfg.opts.log = true;
        if let Some(v) = vol.as_mut() {
            let mut o = v.options();
            o.log = true;
            v.set_options(o);
        }
        Session {
            cfg,
            anchor,
            vol,
            eph: BTreeMap::new(),
            pending: Pending::default(),
            appends: BTreeMap::new(),
            updates: BTreeMap::new(),
            remerge: BTreeSet::new(),
            queue: Vec::new(),
            touches: BTreeMap::new(),
            queued: BTreeMap::new(),
            staged_bytes: 0,
            dirs_made: HashSet::new(),
            committed: Committed::default(),
        }
    }

    /// The volume at the state this session last loaded; `None` when it is unusable.
    pub fn vol(&self) -> Option<&Volume> {
        self.vol.as_ref()
    }

    /// Make the files whose update journals this session applied durable and remove those
    /// journals (FORMAT.md §5b): at exit and unmount. Until then a crash is recovered from the
    /// journals, so nothing committed depends on it.
    pub fn settle_journals(&self) -> Result<(), ViewError> {
        match &self.vol {
            Some(v) => v.settle_journals().map_err(|e| ViewError::of_io(&e)),
            None => Ok(()),
        }
    }

    fn vol_ok(&self) -> Result<&Volume, ViewError> {
        self.vol.as_ref().ok_or(ViewError::Untrusted)
    }

    /// The region `ep` lies in.
    pub fn region_of(&self, ep: &EmbedPath) -> Option<&Region> {
        self.vol.as_ref()?.region_for(ep)
    }

    pub fn is_ephemeral(&self, ep: &EmbedPath) -> bool {
        self.region_of(ep)
            .is_some_and(|r| r.kind == RegionKind::Ephemeral)
    }

    /// May `ep` be changed? Ephemeral regions always; kernel regions in mutable sessions.
    pub fn check_writable(&self, ep: &EmbedPath) -> Result<(), ViewError> {
        if self.is_ephemeral(ep) || self.cfg.mutable {
            Ok(())
        } else {
            (self.cfg.log)(&format!(
                "{ep}: protected region is read-only (set SCONE_FSPF_MUTABLE=1 to allow updates)"
            ));
            Err(ViewError::ReadOnly)
        }
    }

    fn view<'a>(&'a self, fe: &'a Joined<'a>) -> Result<View<'a>, ViewError> {
        Ok(View {
            vol: self.vol_ok()?,
            pending: &self.pending,
            frontend: fe,
        })
    }

    /// What is at `ep` (no symlink followed): the one place that decides it.
    pub fn lookup(&self, open: &dyn OpenFiles, ep: &EmbedPath) -> Result<Node, ViewError> {
        let fe = Joined {
            open,
            eph: &self.eph,
            queued: &self.queued,
        };
        self.view(&fe)?.lookup(ep)
    }

    /// [`Session::lookup`], and the target when `ep` is a hard link (the path frontends key
    /// the file by), in one lookup.
    pub fn lookup_at(
        &self,
        open: &dyn OpenFiles,
        ep: &EmbedPath,
    ) -> Result<(Option<EmbedPath>, Node), ViewError> {
        let fe = Joined {
            open,
            eph: &self.eph,
            queued: &self.queued,
        };
        self.view(&fe)?.lookup_at(ep)
    }

    /// Entries of directory `ep`, sorted by name, without `.`/`..`.
    pub fn children(&self, open: &dyn OpenFiles, ep: &EmbedPath) -> Vec<(Vec<u8>, ChildKind)> {
        let fe = Joined {
            open,
            eph: &self.eph,
            queued: &self.queued,
        };
        match self.view(&fe) {
            Ok(v) => v.children(ep),
            Err(_) => Vec::new(),
        }
    }

    /// A symlink or file in a directory position of `ep` (see [`View::dir_link`]).
    pub fn dir_link(
        &self,
        open: &dyn OpenFiles,
        region: &Region,
        ep: &EmbedPath,
    ) -> Option<Result<Vec<u8>, ViewError>> {
        let fe = Joined {
            open,
            eph: &self.eph,
            queued: &self.queued,
        };
        self.view(&fe).ok()?.dir_link(region, ep)
    }

    /// The sealed ephemeral file at `ep`.
    pub fn ephemeral_file(&self, ep: &EmbedPath) -> Option<&SealedMem> {
        match self.eph.get(ep)? {
            EphNode::File { sealed, .. } => Some(sealed),
            EphNode::Dir { .. } => None,
        }
    }

    /// If the anchor moved (another process of the run committed), reload the fspf requiring
    /// exactly the anchor's tag. Errors mean the fspf on disk is not the one the run trusts.
    pub fn refresh(&mut self) -> Result<(), ViewError> {
        let Some(vol) = self.vol.as_ref() else {
            return Err(ViewError::Untrusted);
        };
        // Fail closed: without a readable anchor nothing on disk can be trusted.
        let Some(anchor) = self.anchor.read() else {
            (self.cfg.log)("the run's trust anchor is unreadable");
            return Err(ViewError::Untrusted);
        };
        if anchor.current == vol.tag() && anchor.pending.is_none() {
            return Ok(());
        }
        if self.follow(anchor.current).is_err() || anchor.pending.is_some() {
            // A commit in flight, or a committer that died inside its commit window: decide
            // under the run's commit lock which of the anchor's tags is on disk.
            let _l = self.anchor.lock()?;
            self.settle_anchor()?;
            let a = self.anchor.read().ok_or(ViewError::Untrusted)?;
            self.follow(a.current).map_err(|e| {
                (self.cfg.log)(&format!("refusing the fspf on disk: {e}"));
                ViewError::Untrusted
            })?;
        }
        Ok(())
    }

    /// Bring the volume to the state with tag `t`, which must be the one on disk: by applying
    /// the metadata log's records after its own state when it can (O(changes)), else by
    /// opening the fspf anew against `t`. On error the volume holds its own state or a later
    /// one of the same authenticated chain, never an untrusted one.
    pub(crate) fn follow(&mut self, t: Tag) -> crate::Result<()> {
        if let Some(v) = self.vol.as_mut() {
            if v.tag() == t {
                return Ok(());
            }
            let st = crate::volume::DiskState::read(&self.cfg.fspf)?;
            if st.tag() == t && v.catch_up_to(st)? && v.tag() == t {
                return Ok(());
            }
        }
        let v = Volume::open_with(&self.cfg.fspf, self.cfg.key.clone(), Some(t), self.cfg.opts)?;
        self.vol = Some(v);
        Ok(())
    }

    /// Under the anchor lock: if a committer died after announcing a tag and that tag is now on
    /// disk (it passed the commit point), make it the current one. Err when the disk holds
    /// neither trusted tag (a rollback or a forgery).
    fn settle_anchor(&self) -> Result<Tag, ViewError> {
        self.settle_anchor_locked(None).map(|(t, _)| t)
    }

    /// [`Session::settle_anchor`]; under the fspf's `lock` (a commit), also what the look at
    /// the disk found for the commit that follows ([`Volume::disk_tag_locked`]).
    fn settle_anchor_locked<'l>(
        &self,
        lock: Option<&'l crate::volume::FspfLock>,
    ) -> Result<(Tag, Option<crate::volume::CurrentOnDisk<'l>>), ViewError> {
        let st = self.anchor.read().ok_or(ViewError::Untrusted)?;
        // Before every commit: in O(1) when the disk holds this session's own state.
        let disk = match (self.vol.as_ref(), lock) {
            (Some(v), Some(l)) => v.disk_tag_locked(l),
            (Some(v), None) => v.disk_tag().map(|t| (t, None)),
            (None, _) => Volume::read_tag(&self.cfg.fspf).map(|t| (t, None)),
        };
        let (disk, current) = disk.map_err(|e| {
            (self.cfg.log)(&format!("cannot read the fspf's tag: {e}"));
            ViewError::Untrusted
        })?;
        let Some(t) = st.accepts(disk) else {
            (self.cfg.log)(&format!(
                "the fspf on disk (tag {disk}) is not the one this run trusts ({})",
                st.current
            ));
            return Err(ViewError::Untrusted);
        };
        if st.pending.is_some() || t != st.current {
            self.anchor.publish(t)?;
        }
        Ok((t, current))
    }

    /// Is a batch full (the frontend should commit now)?
    pub fn batch_full(&self) -> bool {
        self.batch_full_with(0)
    }

    /// [`Session::batch_full`] counting `files` more that the frontend holds for the commit
    /// to stage ([`Session::stage_puts`]).
    pub fn batch_full_with(&self, files: usize) -> bool {
        self.queue.len() + files >= self.cfg.batch_files
            || self.staged_bytes >= self.cfg.batch_bytes
    }

    /// Anything queued for the next commit?
    pub fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Does the next commit remove a file or directory (and so free room on its file system)?
    pub fn removes_anything(&self) -> bool {
        self.queue.iter().any(|c| matches!(c, Change::Remove(_)))
    }

    /// Seal `data` as the new content of the ephemeral file `ep` (in memory).
    pub fn put_ephemeral(
        &mut self,
        ep: &EmbedPath,
        mode: u32,
        mtime: i64,
        data: &[u8],
    ) -> Result<(), ViewError> {
        let region = self.region_of(ep).ok_or(ViewError::Untrusted)?.clone();
        let sealed = memory::seal_in_memory(self.cfg.opts.threads, &region, ep, mode, data)
            .map_err(|e| {
                (self.cfg.log)(&format!("{ep}: {e}"));
                ViewError::Io
            })?;
        self.eph.insert(ep.clone(), EphNode::File { sealed, mtime });
        Ok(())
    }

    /// Verified plaintext reader of the ephemeral file `ep`, or its plaintext when the region is
    /// not protected.
    pub fn open_ephemeral(&self, ep: &EmbedPath) -> Result<EphemeralContent, ViewError> {
        let vol = self.vol_ok()?;
        let region = vol.region_for(ep).ok_or(ViewError::NotFound)?;
        let sealed = self.ephemeral_file(ep).ok_or(ViewError::NotFound)?;
        if region.protection == Protection::NotProtected {
            return Ok(EphemeralContent::Plain(sealed.data.clone()));
        }
        let r = memory::open_in_memory(vol.options().threads, region, ep, sealed)
            .map_err(|e| ViewError::of_core(&self.cfg, ep, &e))?;
        Ok(EphemeralContent::Sealed(Box::new(r)))
    }

    /// Make sure the kernel directory of `path` exists (once per directory and session).
    fn ensure_parent(&mut self, region: &Region, path: &EmbedPath) {
        let Some(kp) = KernelPath::of(region, path) else {
            return;
        };
        let Some(parent) = kp.rel().parent() else {
            return;
        };
        let full = kp.base().join(parent);
        if self.dirs_made.contains(&full) {
            return;
        }
        // No symlink below the region's directory is followed: a directory the attacker
        // replaced by a link to elsewhere makes this fail (ELOOP), it creates nothing there.
        if kernel_fs::create_dirs_like_base(kp.base(), parent).is_ok() {
            self.dirs_made.insert(full);
        }
    }

    /// Seal `size` bytes from `src()` as a new version of kernel file `path` (a shadow beside
    /// it) and queue it. When staging fails (the directory may have been removed since it was
    /// made), once more after making the directory again. `mtime`: the time the program set, or
    /// `None` for now; returns the time recorded. `append`: what the version appended to the
    /// version it was loaded from (kept for a rebase at commit).
    pub fn stage_put<R: std::io::Read>(
        &mut self,
        path: &EmbedPath,
        size: u64,
        meta: VersionMeta,
        append: Option<AppendDelta>,
        src: impl Fn() -> R,
    ) -> Result<i64, ViewError> {
        let staged = self.stage(path, size, meta.mode, src)?;
        self.queue_put(path, staged, size, meta, append)
    }

    /// [`Session::stage_put`] of several whole files held in memory (a frontend's small files
    /// closed since the last commit), with the sealing and the writing of their shadows spread
    /// over the thread pool when the volume uses one. Queued in the order given; one result
    /// per file, as `stage_put` gives it.
    pub fn stage_puts(
        &mut self,
        files: &[(&EmbedPath, VersionMeta, &[u8])],
    ) -> Vec<Result<i64, ViewError>> {
        use rayon::prelude::*;
        for (path, _, _) in files {
            if let Some(region) = self.region_of(path).cloned() {
                self.ensure_parent(&region, path);
            }
        }
        let staged: Vec<crate::Result<crate::volume::StagedFile>> = match self.vol.as_ref() {
            None => return files.iter().map(|_| Err(ViewError::Untrusted)).collect(),
            Some(vol) => {
                let one = |(path, meta, data): &(&EmbedPath, VersionMeta, &[u8])| {
                    let mut src: &[u8] = data;
                    vol.stage_file(path, data.len() as u64, meta.mode, &mut src)
                };
                if vol.options().threads.pool && files.len() >= STAGE_PUTS_PARALLEL_MIN {
                    files.par_iter().map(one).collect()
                } else {
                    files.iter().map(one).collect()
                }
            }
        };
        files
            .iter()
            .zip(staged)
            .map(|((path, meta, data), s)| {
                let s = match s {
                    Ok(s) => s,
                    // As `stage`: once more, after making the directory again.
                    Err(_) => self.stage(path, data.len() as u64, meta.mode, || *data)?,
                };
                self.queue_put(path, s, data.len() as u64, *meta, None)
            })
            .collect()
    }

    /// Start a new version of the kernel file `path` that is sealed while it is written
    /// (`volume::StreamStage`: a frontend receiving a large file in order keeps only what is
    /// not sealed yet); finish it with [`Session::stage_streamed`]. `Ok(None)`: not an
    /// encrypted kernel region.
    pub fn stream_file(
        &mut self,
        path: &EmbedPath,
    ) -> Result<Option<crate::volume::StreamStage>, ViewError> {
        self.start_stream(path, false)
    }

    /// [`Session::stream_file`] for a stream several processes write
    /// (`volume::Volume::stream_file_shared`); they go on with it through
    /// `volume::Volume::resume_stream`.
    pub fn stream_file_shared(
        &mut self,
        path: &EmbedPath,
    ) -> Result<Option<crate::volume::StreamStage>, ViewError> {
        self.start_stream(path, true)
    }

    fn start_stream(
        &mut self,
        path: &EmbedPath,
        shared: bool,
    ) -> Result<Option<crate::volume::StreamStage>, ViewError> {
        let region = self.region_of(path).ok_or(ViewError::Untrusted)?.clone();
        self.ensure_parent(&region, path);
        let vol = self.vol_ok()?;
        let started = if shared {
            vol.stream_file_shared(path)
        } else {
            vol.stream_file(path)
        };
        started.map_err(|e| {
            (self.cfg.log)(&format!("{path}: starting a sealed stream failed: {e}"));
            ViewError::of_io(&e)
        })
    }

    /// Queue the version `stream` sealed, with `tail` (the rest of the file, encrypted in
    /// place) sealed after it, as [`Session::stage_put`] queues one.
    pub fn stage_streamed(
        &mut self,
        path: &EmbedPath,
        stream: &mut crate::volume::StreamStage,
        tail: &mut [u8],
        meta: VersionMeta,
    ) -> Result<i64, ViewError> {
        let size = stream.sealed() + tail.len() as u64;
        let staged = stream
            .finish(self.vol_ok()?, tail, meta.mode)
            .map_err(|e| {
                (self.cfg.log)(&format!("{path}: staging a sealed stream failed: {e}"));
                ViewError::of_io(&e)
            })?;
        self.queue_put(path, staged, size, meta, None)
    }

    fn queue_put(
        &mut self,
        path: &EmbedPath,
        mut staged: crate::volume::StagedFile,
        size: u64,
        meta: VersionMeta,
        append: Option<AppendDelta>,
    ) -> Result<i64, ViewError> {
        if let Some(t) = meta.mtime {
            staged.entry.mtime_ns = t;
        }
        staged.entry.owner = meta.owner;
        // A new version keeps the inode number of the one it replaces.
        staged.entry.ino = self
            .vol
            .as_ref()
            .and_then(|v| v.lookup(path))
            .and_then(|e| e.ino);
        let t = staged.entry.mtime_ns;
        match append {
            Some(d) if d.delta.len() as u64 <= APPEND_REBASE_MAX => {
                self.appends.insert(path.clone(), d);
            }
            _ => {
                self.appends.remove(path);
            }
        }
        self.staged_bytes += size;
        self.queued.insert(
            path.clone(),
            OpenFile {
                size,
                mode: staged.entry.mode,
                mtime: t,
                owner: meta.owner,
            },
        );
        // A whole version supersedes an update of the same file queued before it.
        self.updates.remove(path);
        let mut i = 0;
        while i < self.queue.len() {
            match &self.queue[i] {
                Change::Update(u) if &u.path == path => {
                    u.discard();
                    self.queue.remove(i);
                }
                _ => i += 1,
            }
        }
        self.queue.push(Change::Put(staged));
        Ok(t)
    }

    /// Stage what a frontend's buffer changed since it was loaded from (or last committed as)
    /// `base` as an in-place update of the format-2 file `path` (FORMAT.md §5b): the buffer is
    /// now `len` bytes, and `written` holds every byte written and the smallest length since
    /// then; `read` reads the buffer. `Ok(None)`: not possible (the file is not in format 2, a
    /// version of it is already queued, or the change is too large to hold): the caller stages
    /// a whole version with [`Session::stage_put`].
    pub fn stage_update(
        &mut self,
        path: &EmbedPath,
        base: crate::Version,
        len: u64,
        written: &Written,
        meta: VersionMeta,
        mut read: impl FnMut(&mut [u8], u64) -> std::io::Result<()>,
    ) -> Result<Option<i64>, ViewError> {
        let total: u64 = written.ranges.iter().map(|r| r.1).sum();
        if base.root.is_none() || total > UPDATE_MAX || len > MAX_FILE_LEN {
            return Ok(None);
        }
        let Some((_lock, mut steps)) = self.begin_update(path, Some(base))? else {
            return Ok(None);
        };
        let mut w = UpdateWrites {
            len,
            min_len: written.min_len.min(len),
            writes: Vec::new(),
            meta,
        };
        for &(off, l) in &written.ranges {
            let end = off.saturating_add(l).min(len);
            if end > off {
                let mut buf = vec![0u8; (end - off) as usize];
                if let Err(e) = read(&mut buf, off) {
                    return Err(self.update_failed(path, &crate::Error::io(path.to_string(), e)));
                }
                w.writes.push((off, buf));
            }
        }
        steps.push(w);
        self.finish_update(path, steps)
    }

    /// Like [`Session::stage_update`] for a buffer whose writes this frontend could not all
    /// see (other processes write it, or a shared map): the chunks that differ from the
    /// committed state (read and verified) are the update. Costs a read of the whole file, but
    /// writes only what differs. `equal`: ranges in which the buffer is known to equal the
    /// committed file (parts the frontend never loaded: sorted, disjoint, whole chunks within
    /// both lengths), which are neither read nor compared.
    pub fn stage_diff(
        &mut self,
        path: &EmbedPath,
        len: u64,
        equal: &[(u64, u64)],
        meta: VersionMeta,
        mut read: impl FnMut(&mut [u8], u64) -> std::io::Result<()>,
    ) -> Result<Option<i64>, ViewError> {
        if len > MAX_FILE_LEN {
            return Ok(None);
        }
        // The comparison is with the committed state: it covers a queued update too.
        let Some((_lock, _)) = self.begin_update(path, None)? else {
            return Ok(None);
        };
        let io = |e: std::io::Error| crate::Error::io(path.to_string(), e);
        let diff = (|| -> crate::Result<Option<UpdateWrites>> {
            let vol = self.vol.as_ref().ok_or_else(|| crate::Error::NotListed {
                path: path.to_string(),
            })?;
            let c = vol.region_for(path).map_or(4096, |r| r.chunk_len) as usize;
            let mut r = vol.open_file(path)?;
            let size = r.size();
            let mut w = UpdateWrites {
                len,
                min_len: len.min(size),
                writes: Vec::new(),
                meta,
            };
            let mut total = 0u64;
            let block = (DIFF_BLOCK / c).max(1) * c;
            let (mut mine, mut theirs) = (vec![0u8; block], vec![0u8; block]);
            let common = len.min(size);
            let todo = compared_ranges(equal, c as u64, common, len).map_err(|reason| {
                crate::Error::io(
                    path.to_string(),
                    std::io::Error::other(format!(
                        "{reason}, within the committed file ({size} bytes) and the buffer ({len} bytes)"
                    )),
                )
            })?;
            for (from, to) in todo {
                let mut off = from;
                while off < to {
                    let take = (to - off).min(block as u64) as usize;
                    read(&mut mine[..take], off).map_err(io)?;
                    // Past the committed end everything is new.
                    let same_end = common.saturating_sub(off).min(take as u64) as usize;
                    r.read_exact_at(&mut theirs[..same_end], off)?;
                    for (k, (a, b)) in mine[..take]
                        .chunks(c)
                        .zip(theirs[..take].chunks(c))
                        .enumerate()
                    {
                        let at = off + (k * c) as u64;
                        let differs = (k * c) + a.len() > same_end || a != b;
                        if !differs {
                            continue;
                        }
                        total += a.len() as u64;
                        if total > UPDATE_MAX {
                            return Ok(None);
                        }
                        match w.writes.last_mut() {
                            Some((o, v)) if *o + v.len() as u64 == at => v.extend_from_slice(a),
                            _ => w.writes.push((at, a.to_vec())),
                        }
                    }
                    off += take as u64;
                }
            }
            Ok(Some(w))
        })();
        match diff {
            Ok(Some(w)) => self.finish_update(path, vec![w]),
            Ok(None) => Ok(None),
            Err(e) => Err(self.update_failed(path, &e)),
        }
    }

    fn update_failed(&self, path: &EmbedPath, e: &crate::Error) -> ViewError {
        (self.cfg.log)(&format!("{path}: staging an update failed: {e}"));
        ViewError::of_io(e)
    }

    /// Is the committed `path` a format-2 file (can a change of it be staged as an in-place
    /// update), as far as this session knows? Constant time: frontends ask before they read
    /// their buffer for [`Session::stage_update`] or [`Session::stage_diff`].
    pub fn updatable(&self, path: &EmbedPath) -> bool {
        self.vol
            .as_ref()
            .and_then(|v| v.lookup(path))
            .is_some_and(|e| matches!(e.kind, FileKind::File { root: Some(_), .. }))
    }

    /// Checks before an update of `path`, and the run's commit lock to stage it under (the
    /// committed pages are read, and rewritten in place by commits). `base`: the version the
    /// frontend's writes are relative to (`None`: whatever is committed). Also returns the
    /// writes of an update of `path` already queued (taken off the queue: the new update is
    /// made from the committed state with those writes first; a journal cannot build on a
    /// journal that is not applied yet).
    #[allow(clippy::type_complexity)]
    fn begin_update(
        &mut self,
        path: &EmbedPath,
        base: Option<crate::Version>,
    ) -> Result<Option<(A::Lock, Vec<UpdateWrites>)>, ViewError> {
        // A whole version queued for the path: the frontend's `stage_put` supersedes it.
        let whole = self
            .queue
            .iter()
            .any(|c| matches!(c, Change::Put(s) if &s.path == path));
        // Not format 2 as far as this session knows (a new or small file, the common case):
        // a whole version, without taking the run's lock. (A file another process made format
        // 2 meanwhile is then rewritten whole: correct, only slower.)
        if whole || !self.updatable(path) {
            return Ok(None);
        }
        let Some(lock) = self.lock_current()? else {
            return Ok(None);
        };
        let current = self.vol_ok()?.lookup(path).and_then(|e| e.kind.version());
        match (current, base) {
            (Some(crate::Version { root: Some(_), .. }), None) => {}
            (Some(v), Some(b)) if v == b => {}
            // Another process of the run committed the file since this buffer was loaded:
            // the writes go onto its state (both survive), and the frontend's buffer takes
            // the merged content after the commit.
            (Some(crate::Version { root: Some(_), .. }), Some(_)) => {
                self.remerge.insert(path.clone());
            }
            _ => return Ok(None),
        }
        let mut prior = Vec::new();
        if let Some(i) = self
            .queue
            .iter()
            .position(|c| matches!(c, Change::Update(u) if &u.path == path))
        {
            if let Change::Update(u) = self.queue.remove(i) {
                u.discard();
            }
            prior = self.updates.remove(path).unwrap_or_default();
        }
        Ok(Some((lock, prior)))
    }

    /// Make the update of `path` from `steps` (in order) at the current state, and queue it.
    fn finish_update(
        &mut self,
        path: &EmbedPath,
        steps: Vec<UpdateWrites>,
    ) -> Result<Option<i64>, ViewError> {
        let size: u64 = steps
            .iter()
            .flat_map(|w| &w.writes)
            .map(|(_, b)| b.len() as u64)
            .sum();
        let Some(last) = steps.last() else {
            return Ok(None);
        };
        let (len, meta) = (last.len, last.meta);
        let added: u64 = last.writes.iter().map(|(_, b)| b.len() as u64).sum();
        if size > UPDATE_MAX {
            return Ok(None);
        }
        let vol = self.vol_ok()?;
        let staged = match vol.update_file(path) {
            Ok(Some(mut u)) => apply_all(&mut u, &steps).and_then(|()| u.stage(vol)),
            Ok(None) => return Ok(None),
            Err(e) => Err(e),
        };
        let mut staged = staged.map_err(|e| self.update_failed(path, &e))?;
        staged.entry.mode = meta.mode & 0o7777;
        staged.entry.owner = meta.owner;
        let t = staged.entry.mtime_ns;
        self.appends.remove(path);
        self.staged_bytes += added;
        self.queued.insert(
            path.clone(),
            OpenFile {
                size: len,
                mode: staged.entry.mode,
                mtime: t,
                owner: meta.owner,
            },
        );
        self.updates.insert(path.clone(), steps);
        self.queue.push(Change::Update(staged));
        Ok(Some(t))
    }

    /// Hold the run's commit lock with the volume at the run's current state (no commit, and
    /// so no in-place update, can run meanwhile). `None` if the state kept moving.
    fn lock_current(&mut self) -> Result<Option<A::Lock>, ViewError> {
        for _ in 0..3 {
            // `refresh` may take and drop the lock itself (a pending tag): before taking it.
            self.refresh()?;
            let l = self.anchor.lock()?;
            let current = self
                .anchor
                .read()
                .filter(|a| a.pending.is_none())
                .map(|a| a.current);
            if current.is_some() && current == self.vol.as_ref().map(|v| v.tag()) {
                return Ok(Some(l));
            }
        }
        Ok(None)
    }

    /// A verified reader of the kernel file `path` as the run's current state has it, opened
    /// under the run's commit lock: for a reader whose format-2 file another process updated
    /// in place since it was opened (its pages no longer match the root it knew).
    pub fn open_current(
        &mut self,
        path: &EmbedPath,
    ) -> Result<crate::volume::KernelReader, ViewError> {
        let Some(_lock) = self.lock_current()? else {
            return Err(ViewError::Io);
        };
        let cfg = self.cfg.clone();
        self.vol_ok()?
            .open_file(path)
            .map_err(|e| ViewError::of_core(&cfg, path, &e))
    }

    fn stage<R: std::io::Read>(
        &mut self,
        path: &EmbedPath,
        size: u64,
        mode: u32,
        src: impl Fn() -> R,
    ) -> Result<StagedFile, ViewError> {
        let region = self.region_of(path).ok_or(ViewError::Untrusted)?.clone();
        self.ensure_parent(&region, path);
        let vol = self.vol_ok()?;
        let r = match vol.stage_file(path, size, mode, &mut src()) {
            Ok(s) => Ok(s),
            Err(_) => {
                self.dirs_made.clear();
                self.ensure_parent(&region, path);
                self.vol_ok()?.stage_file(path, size, mode, &mut src())
            }
        };
        r.map_err(|e| {
            (self.cfg.log)(&format!("{path}: staging failed: {e}"));
            ViewError::of_io(&e)
        })
    }
}

/// Content of an ephemeral file.
pub enum EphemeralContent {
    /// Not protected: the plaintext itself.
    Plain(Arc<Vec<u8>>),
    /// A verified reader.
    Sealed(Box<memory::MemReader>),
}

impl ViewError {
    /// A core error as the view reports it: data that failed verification or plain I/O is
    /// [`ViewError::Io`]; a full disk or quota is the program's to see.
    pub fn of_io(e: &crate::Error) -> ViewError {
        match e.raw_os_error() {
            Some(n) if n == rustix::io::Errno::NOSPC.raw_os_error() => ViewError::NoSpace,
            Some(n) if n == rustix::io::Errno::DQUOT.raw_os_error() => ViewError::Quota,
            Some(n) if n == rustix::io::Errno::FBIG.raw_os_error() => ViewError::TooBig,
            _ => ViewError::Io,
        }
    }

    fn of_core(cfg: &SessionConfig, ep: &EmbedPath, e: &crate::Error) -> ViewError {
        (cfg.log)(&format!("{ep}: {e}"));
        ViewError::of_io(e)
    }
}

/// Apply several updates' writes to `u`, in order.
pub(crate) fn apply_all(
    u: &mut crate::volume::FileUpdate,
    steps: &[UpdateWrites],
) -> crate::Result<()> {
    steps.iter().try_for_each(|w| apply_writes(u, w))
}

/// Apply what an update wrote to `u` (lengths, then the bytes).
pub(crate) fn apply_writes(
    u: &mut crate::volume::FileUpdate,
    w: &UpdateWrites,
) -> crate::Result<()> {
    u.set_len(w.min_len)?;
    u.set_len(w.len)?;
    for (off, b) in &w.writes {
        u.write_at(b, *off)?;
    }
    if let Some(t) = w.meta.mtime {
        u.set_mtime(t);
    }
    Ok(())
}

//! The volume API: open an fspf with key + tag, resolve embed paths, read verified files,
//! import trees, verify, and commit updates atomically. Frontends (CLI, preload, FUSE) use only this.
mod commit;
pub mod direct;
mod import;
pub mod index_cache;
pub mod kernel_fs;
mod log;
pub mod memory;
mod moves;
mod orphans;
mod store;
mod stream;
mod update;
mod verify;

pub use commit::{Change, StagedFile};
pub use import::{ImportOptions, ImportReport};
pub use kernel_fs::KernelPath;
pub use log::{log_limit, log_path, CurrentOnDisk, DiskState, LOG_MIN_LIMIT};
pub use moves::PreparedMove;
pub use orphans::{CleanReport, Orphan, OrphanKind};
pub use store::{held_fds, FspfLock, WriterGuard, WRITER_FD_BASE};
pub use store::{
    is_fspf_internal, overwrite_file, overwrite_file_durably, sync_filesystems, write_file_durably,
};
pub use stream::{piece_in, StreamStage, StreamState, PIECE_SLACK};
pub use update::{FileUpdate, StagedUpdate};
pub use verify::Finding;

use crate::codec::{FileCodec, ProtectedReader, Threads};
use crate::crypto::{self, RegionKey, Tag, VolumeKey};
use crate::error::{Error, Result};
use crate::format::layout::{
    DEFAULT_CHUNK_LEN, DEFAULT_CHUNK_LEN_ENCRYPTED, MAX_CHUNK_LEN, MIN_CHUNK_LEN,
};
use crate::format::metadata::{FileEntry, FileKind, Metadata, Protection, Region, RegionKind};
use crate::policy::EmbedPath;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Reader over a kernel file (the outboard, when present, is a file too).
/// Verified reader over a kernel file (and its outboard), both kept open as [`kernel_fs::TrackedFile`]s.
pub type KernelReader = ProtectedReader<kernel_fs::TrackedFile, kernel_fs::TrackedFile>;

/// An opened file system protection file.
#[derive(Debug)]
pub struct Volume {
    path: PathBuf,
    key: Option<VolumeKey>,
    tag: Tag,
    /// The parsed metadata. While [`Volume::index`] is set, only its regions and generation
    /// are filled in; [`Volume::ensure_loaded`] parses the rest from the index when needed.
    /// Private: frontends read it through the accessors below, and change it only through
    /// the methods that keep the index, the files and the writer lock consistent.
    meta: Metadata,
    /// A frozen index of this fspf shared by the processes of a run (see
    /// [`Volume::from_index`]): lookups and listings read it, nothing is parsed.
    index: Option<crate::format::index::FrozenIndex<'static>>,
    /// The bytes `index` reads (handed on unchanged by [`Volume::build_index`]).
    index_bytes: Option<&'static [u8]>,
    /// How this volume seals, verifies and syncs.
    opts: VolumeOptions,
    /// The writer lock shared by the versions this volume stages (see [`WriterGuard`]).
    writer: std::sync::Mutex<std::sync::Weak<WriterGuard>>,
    /// Where this volume's state lies in the metadata log (FORMAT.md §5c).
    log: log::LogPos,
    /// While [`Volume::index`] is set: the entries changed since the state the index
    /// describes (`None`: removed), from the log and this process's commits. Every read
    /// consults it before the index.
    overlay: std::collections::BTreeMap<EmbedPath, Option<FileEntry>>,
    /// Format-2 files whose update journals this volume applied without making the files
    /// durable yet (FORMAT.md §5b, chains): settled at [`update::PENDING_MAX`] journals, at a
    /// later update that writes in place, and by [`Volume::settle_journals`].
    pending: std::sync::Mutex<std::collections::HashMap<crypto::FileId, PendingJournals>>,
    /// Update journals the current log's records carry, and the files whose chains run
    /// through them (FORMAT.md §5b, "Journals in the log").
    logj: update::LogJournals,
    /// How many entries record each inode number, among the parsed entries (or, over a frozen
    /// index, the overlay's; the index has its own table). Built on first use, then kept up to
    /// date by [`Volume::raw_set`].
    recorded: std::sync::OnceLock<std::collections::HashMap<u64, u32>>,
    /// How many hard-link entries there are among the parsed entries (or the overlay's);
    /// counted at the first use, then kept up to date by [`Volume::raw_set`].
    links: std::sync::OnceLock<usize>,
}

/// The applied, not yet durable journals of one file (see [`Volume::settle_journals`]).
#[derive(Debug, Clone)]
struct PendingJournals {
    path: EmbedPath,
    /// The root of the last journal applied (where its chain ends).
    root: [u8; 32],
    count: u32,
    bytes: u64,
    /// Whether a journal of the chain is a file (else all are in the log's records, which keep
    /// them until a checkpoint: the session's end need not sync the file).
    in_files: bool,
}

/// How a [`Volume`] seals, verifies and syncs: options of the volume a frontend opens
/// ([`Volume::open_with`], [`Volume::from_index_with`]), never process-wide state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeOptions {
    /// Threads for sealing and verifying (the preload shield uses [`Threads::FORK_SAFE`]).
    pub threads: Threads,
    /// When false, staged files are not fsync'd one by one: the caller makes them durable (e.g.
    /// one `syncfs`) before [`Volume::commit`]. The preload shield batches commits this way.
    pub sync_each_file: bool,
    /// Commit through the metadata log (FORMAT.md §5c): a commit appends what it changed.
    /// When false (the CLI's commands), every commit writes a checkpoint, so that the fspf
    /// file alone holds the state (`addf`'s output is copied into images as one file).
    pub log: bool,
    /// Journals and small files the log may carry before a checkpoint, at least (beside
    /// [`log::log_journals_limit`], FORMAT.md §5c). Every process that opens the volume reads
    /// the whole log, so the in-process shield keeps the default (0: that limit alone); the FUSE
    /// daemon, which opens it once, takes more and checkpoints less often.
    pub log_journals: u64,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            threads: Threads::default(),
            sync_each_file: true,
            log: false,
            log_journals: 0,
        }
    }
}

/// Parameters of `addr`.
#[derive(Debug, Clone)]
pub struct RegionSpec {
    pub embed_point: EmbedPath,
    pub kind: RegionKind,
    pub protection: Protection,
    /// Key length in bytes (16/24/32); `None` = default 32 (protected) or none (not-protected).
    pub key_len: Option<usize>,
    pub chunk_len: Option<u32>,
}

impl Volume {
    /// Create an empty, unencrypted fspf. Refuses to replace an existing file unless `force`.
    pub fn create(path: &Path, force: bool) -> Result<Tag> {
        let mut v = Volume {
            path: store::absolute(path),
            key: None,
            tag: Tag::default(),
            meta: Metadata::default(),
            index: None,
            index_bytes: None,
            opts: VolumeOptions::default(),
            writer: Default::default(),
            log: Default::default(),
            overlay: Default::default(),
            pending: Default::default(),
            logj: Default::default(),
            recorded: Default::default(),
            links: Default::default(),
        };
        // Under the update lock: the orphan cleanup removes temporaries only while holding it.
        let _lock = FspfLock::acquire(&v.path)?;
        store::write_new(&mut v, force)?;
        Ok(v.tag)
    }

    /// Read the tag of an fspf without any key.
    pub fn read_tag(path: &Path) -> Result<Tag> {
        store::read_tag(path)
    }

    /// Open and authenticate an fspf. `key` is required once it is encrypted; `expected_tag`,
    /// when given, must equal the tag on disk (freshness: an older fspf has another tag).
    pub fn open(path: &Path, key: Option<VolumeKey>, expected_tag: Option<Tag>) -> Result<Volume> {
        store::open(path, key, expected_tag)
    }

    /// [`Volume::open`] with explicit [`VolumeOptions`].
    pub fn open_with(
        path: &Path,
        key: Option<VolumeKey>,
        expected_tag: Option<Tag>,
        opts: VolumeOptions,
    ) -> Result<Volume> {
        let mut v = store::open(path, key, expected_tag)?;
        v.opts = opts;
        Ok(v)
    }

    /// [`Volume::from_index`] with explicit [`VolumeOptions`].
    pub fn from_index_with(
        path: &Path,
        key: Option<VolumeKey>,
        bytes: &'static [u8],
        opts: VolumeOptions,
    ) -> Result<Volume> {
        let mut v = Volume::from_index(path, key, bytes)?;
        v.opts = opts;
        Ok(v)
    }

    /// The options this volume was opened with.
    pub fn options(&self) -> VolumeOptions {
        self.opts
    }

    /// Change the options for later operations (e.g. a volume handed to a forked child).
    pub fn set_options(&mut self, opts: VolumeOptions) {
        self.opts = opts;
    }

    /// A volume over a frozen index (`format::index`) that a process of the same run built
    /// from the fspf with tag `index.tag()` and that the caller trusts as it trusts that tag
    /// (the preload checks it against the run's anchor). O(#regions): nothing is parsed, so a
    /// process starts in time independent of the volume's size. The first change parses the
    /// index into [`Metadata`] (O(n)).
    pub fn from_index(path: &Path, key: Option<VolumeKey>, bytes: &'static [u8]) -> Result<Volume> {
        let ix = crate::format::index::FrozenIndex::open(bytes)?;
        Ok(Volume::over(path, key, ix, Some(bytes)))
    }

    /// [`Volume::from_index`] over an index read a page at a time (the sealed index cache,
    /// `index_cache::PagedCache`): a lookup reads the pages it touches.
    pub fn from_paged(
        path: &Path,
        key: Option<VolumeKey>,
        src: &'static dyn crate::format::index::PageSource,
    ) -> Result<Volume> {
        let ix = crate::format::index::FrozenIndex::open_paged(src)?;
        Ok(Volume::over(path, key, ix, None))
    }

    fn over(
        path: &Path,
        key: Option<VolumeKey>,
        ix: crate::format::index::FrozenIndex<'static>,
        bytes: Option<&'static [u8]>,
    ) -> Volume {
        let meta = Metadata {
            generation: ix.generation(),
            regions: ix.regions().to_vec(),
            files: Default::default(),
        };
        Volume {
            path: store::absolute(path),
            key,
            tag: ix.tag(),
            meta,
            index: Some(ix),
            index_bytes: bytes,
            opts: VolumeOptions::default(),
            writer: Default::default(),
            log: Default::default(),
            overlay: Default::default(),
            pending: Default::default(),
            logj: Default::default(),
            recorded: Default::default(),
            links: Default::default(),
        }
    }

    /// The frozen index of this volume's current state, for the processes it starts (the
    /// bytes hold the region keys: keep them in memory the run trusts, like the key).
    pub fn build_index(&self) -> Result<zeroize::Zeroizing<Vec<u8>>> {
        // Its readers learn only the log's later records: the journals of the records it
        // stands for are applied first (best effort: a file that cannot be fixed up here fails
        // its reader's verification, as it would have failed this process's).
        let _ = self.apply_log_chains(false);
        self.index_of_state()
    }

    /// The frozen index of this volume's state, as it is (no journal applied first).
    pub(crate) fn index_of_state(&self) -> Result<zeroize::Zeroizing<Vec<u8>>> {
        match (&self.index, self.index_bytes) {
            (Some(_), Some(b)) if self.overlay.is_empty() => {
                Ok(zeroize::Zeroizing::new(b.to_vec()))
            }
            (Some(ix), _) if !self.overlay.is_empty() => {
                let m = self.with_overlay(ix.to_metadata()?);
                Ok(crate::format::index::build_index(&m, self.tag)?)
            }
            (Some(_), Some(b)) => Ok(zeroize::Zeroizing::new(b.to_vec())),
            (Some(ix), None) => {
                let m = self.with_overlay(ix.to_metadata()?);
                Ok(crate::format::index::build_index(&m, self.tag)?)
            }
            (None, _) => Ok(crate::format::index::build_index(&self.meta, self.tag)?),
        }
    }

    /// An index-backed volume as a parsed one (for whole-volume walks: verify, orphans).
    pub(crate) fn parsed_copy(&self) -> Result<Option<Volume>> {
        let Some(ix) = &self.index else {
            return Ok(None);
        };
        Ok(Some(Volume {
            path: self.path.clone(),
            key: self.key.clone(),
            tag: self.tag,
            meta: self.with_overlay(ix.to_metadata()?),
            index: None,
            index_bytes: None,
            opts: self.opts,
            writer: Default::default(),
            log: self.log,
            overlay: Default::default(),
            pending: Default::default(),
            logj: self.logj.clone(),
            recorded: Default::default(),
            links: Default::default(),
        }))
    }

    /// The regions, sorted by embed point (either backing).
    pub fn regions(&self) -> &[Region] {
        &self.meta.regions
    }

    /// The generation this fspf was sealed at (either backing).
    pub fn generation(&self) -> u64 {
        self.meta.generation
    }

    /// Refuse a volume no frontend can use (no regions).
    pub fn check_usable(&self) -> Result<()> {
        self.meta.check_usable()
    }

    /// All listed entries, in path order, of a parsed volume ([`Volume::open`], or after
    /// [`Volume::ensure_loaded`]); a volume still backed by its frozen index lists nothing
    /// here, use [`Volume::lookup`]/[`Volume::children`] for either backing.
    pub fn files(&self) -> &std::collections::BTreeMap<EmbedPath, FileEntry> {
        &self.meta.files
    }

    /// Paths listed at or below `path`, in byte order (either backing).
    pub fn paths_below(&self, path: &EmbedPath) -> Vec<EmbedPath> {
        let Some(ix) = &self.index else {
            return self.meta.paths_below(path);
        };
        let mut out: std::collections::BTreeSet<EmbedPath> = ix
            .subtree(path)
            .filter(|p| !matches!(self.overlay.get(*p), Some(None)))
            .filter_map(|p| EmbedPath::from_bytes(p).ok())
            .collect();
        for (p, v) in self
            .overlay
            .range(path.clone()..)
            .take_while(|(k, _)| k.as_bytes().starts_with(path.as_bytes()))
            .filter(|(k, _)| k.starts_with(path))
        {
            if v.is_some() {
                out.insert(p.clone());
            }
        }
        out.into_iter().collect()
    }

    /// The frozen index's entries with the overlay applied.
    fn with_overlay(&self, mut m: Metadata) -> Metadata {
        for (p, v) in &self.overlay {
            match v {
                Some(e) => m.files.insert(p.clone(), e.clone()),
                None => m.files.remove(p),
            };
        }
        m.generation = self.meta.generation;
        m
    }

    /// Set (or, with `None`, remove) the entry at `path` in whichever backing holds them.
    pub(crate) fn raw_set(&mut self, path: EmbedPath, v: Option<FileEntry>) -> Option<FileEntry> {
        let added = v.as_ref().and_then(|e| e.ino);
        let link = |e: &Option<FileEntry>| {
            matches!(
                e,
                Some(FileEntry {
                    kind: FileKind::Link(_),
                    ..
                })
            )
        };
        let is_link = link(&v);
        let (old, gone, was_link) = if self.index.is_some() {
            let old = self.lookup(&path).map(|e| e.into_owned());
            let before = self.overlay.insert(path, v).flatten();
            let was = link(&before);
            (old, before.and_then(|e| e.ino), was)
        } else {
            let old = match v {
                Some(e) => self.meta.files.insert(path, e),
                None => self.meta.files.remove(&path),
            };
            let gone = old.as_ref().and_then(|e| e.ino);
            let was = link(&old);
            (old, gone, was)
        };
        if let Some(n) = self.links.get_mut() {
            *n = n.saturating_sub(usize::from(was_link)) + usize::from(is_link);
        }
        if let Some(m) = self.recorded.get_mut() {
            if let Some(i) = gone {
                if let Some(n) = m.get_mut(&i) {
                    *n = n.saturating_sub(1);
                }
            }
            if let Some(i) = added {
                *m.entry(i).or_default() += 1;
            }
        }
        old
    }

    /// May any entry be a hard link? False only when none is (then no name needs resolving).
    /// O(1) after the first call, which counts the parsed entries (an index counts its own).
    pub fn has_links(&self) -> bool {
        if self.index.as_ref().is_some_and(|ix| ix.has_links()) {
            return true;
        }
        *self.links.get_or_init(|| {
            let entries: Box<dyn Iterator<Item = &FileEntry>> = match &self.index {
                Some(_) => Box::new(self.overlay.values().flatten()),
                None => Box::new(self.meta.files.values()),
            };
            entries
                .filter(|e| matches!(e.kind, FileKind::Link(_)))
                .count()
        }) > 0
    }

    /// Does a listed entry record inode number `ino`? O(log n) over a frozen index; the parsed
    /// entries are counted once, at the first call.
    pub fn ino_recorded(&self, ino: u64) -> bool {
        let counted = self.recorded.get_or_init(|| {
            let mut m = std::collections::HashMap::new();
            let entries: Box<dyn Iterator<Item = &FileEntry>> = match &self.index {
                Some(_) => Box::new(self.overlay.values().flatten()),
                None => Box::new(self.meta.files.values()),
            };
            for i in entries.filter_map(|e| e.ino) {
                *m.entry(i).or_default() += 1;
            }
            m
        });
        if counted.get(&ino).is_some_and(|&n| n > 0) {
            return true;
        }
        match &self.index {
            // An entry of the index counts unless the overlay replaced it (then it was counted
            // above if it still records the number).
            Some(ix) => ix
                .with_ino(ino)
                .any(|p| EmbedPath::from_bytes(p).is_ok_and(|p| !self.overlay.contains_key(&p))),
            None => false,
        }
    }

    /// The inode number of the entry at `path` (or of a new one there), given the number it
    /// records: that one, else the path's own ([`EmbedPath::default_ino`]) unless another
    /// entry records it (a file renamed away from `path` keeps the number it showed there),
    /// then the first of a fixed sequence derived from it that none records. Every process
    /// computes the same number from the same state. FORMAT.md §2, inode numbers.
    pub fn ino_of(&self, path: &EmbedPath, recorded: Option<u64>) -> u64 {
        if let Some(i) = recorded {
            return i;
        }
        let mut h = path.default_ino();
        for _ in 0..64 {
            if !self.ino_recorded(h) {
                break;
            }
            h = h.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) | 1;
        }
        h
    }

    /// Re-point kernel regions whose kernel path lies under `from` to the same place under
    /// `to` (a volume restored elsewhere, e.g. a frozen fixture). Only the in-memory
    /// metadata changes; [`Volume::save`] seals it. Returns how many regions moved.
    pub fn rebase_kernel_paths(&mut self, from: &Path, to: &Path) -> usize {
        let mut moved = 0;
        for r in &mut self.meta.regions {
            if let RegionKind::Kernel(k) = &r.kind {
                if let Ok(rest) = k.strip_prefix(from) {
                    r.kind = RegionKind::Kernel(to.join(rest));
                    moved += 1;
                }
            }
        }
        moved
    }

    /// The raw metadata, for fixtures and benchmarks that build volumes no frontend could
    /// (e.g. 100 000 synthetic entries). Bypasses every check the other methods make; the
    /// next [`Volume::save`] seals whatever is here.
    #[doc(hidden)]
    pub fn metadata_mut(&mut self) -> Result<&mut Metadata> {
        self.ensure_loaded()?;
        Ok(&mut self.meta)
    }

    /// The frozen index bytes this volume reads in place, if it is backed by one.
    pub fn index_bytes(&self) -> Option<&'static [u8]> {
        self.index.as_ref().and(self.index_bytes)
    }

    /// Is this volume backed by a frozen index (nothing parsed yet)?
    pub fn is_indexed(&self) -> bool {
        self.index.is_some()
    }

    /// Parse the frozen index into `meta` (before any change, or a caller that needs all of
    /// it). A no-op for a volume opened from its fspf.
    pub fn ensure_loaded(&mut self) -> Result<()> {
        if let Some(ix) = &self.index {
            let m = self.with_overlay(ix.to_metadata()?);
            self.index = None;
            self.index_bytes = None;
            self.overlay.clear();
            self.meta = m;
            self.recorded = Default::default();
            self.links = Default::default();
        }
        Ok(())
    }

    /// What is listed at `path`. O(log n) for either backing.
    pub fn lookup(&self, path: &EmbedPath) -> Option<std::borrow::Cow<'_, FileEntry>> {
        match &self.index {
            Some(ix) => match self.overlay.get(path) {
                Some(v) => v.as_ref().map(std::borrow::Cow::Borrowed),
                None => ix.get(path).map(std::borrow::Cow::Owned),
            },
            None => self.meta.files.get(path).map(std::borrow::Cow::Borrowed),
        }
    }

    /// Direct children of `dir` (name, kind), in name order. O(log n + k).
    pub fn children(&self, dir: &EmbedPath) -> crate::format::view::Children<'_> {
        match &self.index {
            Some(ix) => {
                let prefix = dir.child_prefix();
                let mut names: Vec<&[u8]> = self
                    .overlay
                    .range::<[u8], _>((
                        std::ops::Bound::Included(&prefix[..]),
                        std::ops::Bound::Unbounded,
                    ))
                    .map(|(k, _)| k.as_bytes())
                    .take_while(|k| k.starts_with(&prefix))
                    .filter_map(|k| {
                        let rest = &k[prefix.len()..];
                        let name = rest.split(|&c| c == b'/').next().unwrap_or_default();
                        (!name.is_empty()).then_some(name)
                    })
                    .collect();
                if names.is_empty() {
                    return ix.children(dir);
                }
                names.dedup();
                let mut out: std::collections::BTreeMap<&[u8], crate::format::view::ChildKind> =
                    ix.children(dir).collect();
                for name in names {
                    let mut b = prefix.clone();
                    b.extend_from_slice(name);
                    let Ok(child) = EmbedPath::from_bytes(&b) else {
                        continue;
                    };
                    let kind = match self.lookup(&child) {
                        Some(e) => Some(crate::format::view::ChildKind::of(&e.kind, |t| {
                            self.lookup(t).map(|e| e.into_owned().kind)
                        })),
                        None if self.has_below(&child) => Some(crate::format::view::ChildKind::Dir),
                        None => None,
                    };
                    match kind {
                        Some(k) => out.insert(name, k),
                        None => out.remove(name),
                    };
                }
                crate::format::view::Children::listed(out.into_iter().collect())
            }
            None => self.meta.children(dir),
        }
    }

    /// Is anything listed strictly below `dir`? O(log n).
    pub fn has_below(&self, dir: &EmbedPath) -> bool {
        match &self.index {
            Some(ix) => {
                let prefix = dir.child_prefix();
                let mut changed = self
                    .overlay
                    .range::<[u8], _>((
                        std::ops::Bound::Included(&prefix[..]),
                        std::ops::Bound::Unbounded,
                    ))
                    .take_while(|(k, _)| k.as_bytes().starts_with(&prefix))
                    .filter(|(k, _)| k.as_bytes() != prefix);
                if changed.any(|(_, v)| v.is_some()) {
                    return true;
                }
                ix.subtree(dir)
                    .filter(|p| *p != dir.as_bytes())
                    .any(|p| !matches!(self.overlay.get(p), Some(None)))
            }
            None => self.meta.has_below(dir),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn tag(&self) -> Tag {
        self.tag
    }
    pub fn is_encrypted(&self) -> bool {
        self.key.is_some()
    }
    pub fn key(&self) -> Option<&VolumeKey> {
        self.key.as_ref()
    }

    /// The shared writer lock for a new staged version: one per volume while any of its staged
    /// versions is alive.
    pub(crate) fn writer_guard(&self) -> Result<std::sync::Arc<WriterGuard>> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = w.upgrade() {
            return Ok(g);
        }
        let g = std::sync::Arc::new(WriterGuard::acquire(&self.path)?);
        *w = std::sync::Arc::downgrade(&g);
        Ok(g)
    }

    /// Take the update lock (`FSPF.lock`); commands that modify the fspf hold it throughout.
    pub fn lock(path: &Path) -> Result<FspfLock> {
        FspfLock::acquire(path)
    }

    /// Seal and atomically replace the fspf on disk; returns the new tag. The chains through
    /// the journals of the log it replaces are made durable first.
    pub fn save(&mut self) -> Result<Tag> {
        self.settle_log_chains()?;
        self.save_announced(&mut |_| Ok(()))
    }

    /// [`Volume::save`], telling `announce` the new tag just before the commit point.
    pub(crate) fn save_announced(
        &mut self,
        announce: &mut dyn FnMut(Tag) -> Result<()>,
    ) -> Result<Tag> {
        self.ensure_loaded()?;
        self.meta.generation += 1;
        if let Err(e) = store::write(self, announce) {
            self.meta.generation -= 1;
            return Err(e);
        }
        Ok(self.tag)
    }

    /// Encrypt the fspf under a fresh random key (rotating the key if it already was encrypted).
    pub fn encrypt(&mut self) -> Result<(Tag, VolumeKey)> {
        let k = VolumeKey::random()?;
        self.key = Some(k.clone());
        let t = self.save()?;
        Ok((t, k))
    }

    /// Directory beside the fspf that holds Merkle outboards of authenticated multi-chunk files.
    pub fn tree_dir(&self) -> PathBuf {
        store::tree_dir(&self.path)
    }

    /// Add a region (`addr`). Keys come from the OS CSPRNG.
    pub fn add_region(&mut self, spec: RegionSpec) -> Result<()> {
        self.ensure_loaded()?;
        let ep = spec.embed_point.to_string();
        if self
            .meta
            .regions
            .iter()
            .any(|r| r.embed_point == spec.embed_point)
        {
            return Err(Error::DuplicateRegion(ep));
        }
        let invalid = |reason: String| Error::InvalidRegion {
            embed_point: ep.clone(),
            reason,
        };
        if let RegionKind::Kernel(k) = &spec.kind {
            if !k.is_absolute() {
                return Err(invalid(format!(
                    "kernel path {} must be absolute",
                    k.display()
                )));
            }
        }
        let key = match spec.protection {
            Protection::NotProtected => {
                if spec.key_len.is_some() || spec.chunk_len.is_some() {
                    return Err(invalid(
                        "--key-length/--chunk-length make no sense for a not-protected region"
                            .into(),
                    ));
                }
                None
            }
            _ => {
                let l = spec.key_len.unwrap_or(32);
                if ![16, 24, 32].contains(&l) {
                    return Err(invalid(format!(
                        "key length must be 16, 24 or 32 bytes, got {l}"
                    )));
                }
                Some(RegionKey::random(l)?)
            }
        };
        let chunk_len = spec.chunk_len.unwrap_or(match spec.protection {
            Protection::Encrypted => DEFAULT_CHUNK_LEN_ENCRYPTED,
            _ => DEFAULT_CHUNK_LEN,
        });
        if !(MIN_CHUNK_LEN..=MAX_CHUNK_LEN).contains(&chunk_len) {
            return Err(invalid(format!("chunk length must be between {MIN_CHUNK_LEN} and {MAX_CHUNK_LEN} bytes, got {chunk_len}")));
        }
        let region = Region {
            embed_point: spec.embed_point.clone(),
            kind: spec.kind,
            protection: spec.protection,
            key,
            chunk_len,
        };
        // A new region must not take over files already sealed under another region's key.
        let mut probe = self.meta.clone();
        probe.regions.push(region.clone());
        probe
            .regions
            .sort_by(|a, b| a.embed_point.cmp(&b.embed_point));
        let moved = self
            .meta
            .files
            .keys()
            .filter(|p| probe.region_for(p).map(|r| &r.embed_point) == Some(&spec.embed_point))
            .count();
        if moved > 0 {
            return Err(invalid(format!("{moved} file(s) already recorded under another region lie below it; they would become unreadable")));
        }
        self.meta.regions = probe.regions;
        Ok(())
    }

    pub fn region_for(&self, path: &EmbedPath) -> Option<&Region> {
        self.meta.region_for(path)
    }

    /// Where `path` lives on disk: its kernel path, when its region is a kernel one.
    pub fn kernel_path(&self, path: &EmbedPath) -> Option<KernelPath> {
        KernelPath::of(self.region_for(path)?, path)
    }

    /// The entry at `path` of a parsed volume; see [`Volume::lookup`] for either backing.
    pub fn entry(&self, path: &EmbedPath) -> Option<&FileEntry> {
        self.meta.files.get(path)
    }

    /// Open a listed regular file of a kernel region for verified reading.
    pub fn open_file(&self, path: &EmbedPath) -> Result<KernelReader> {
        // A hard link reads its target's file (a target is never a link itself: parsing
        // refuses that).
        if let Some(FileKind::Link(t)) = self.lookup(path).map(|e| e.into_owned().kind) {
            if self
                .lookup(&t)
                .is_some_and(|e| !matches!(e.kind, FileKind::Link(_)))
            {
                return self.open_file(&t);
            }
        }
        let region = self.region_for(path).ok_or_else(|| Error::NoRegion {
            path: path.to_string(),
        })?;
        if region.protection == Protection::NotProtected {
            return Err(Error::NotProtected {
                path: path.to_string(),
                region: region.embed_point.to_string(),
            });
        }
        let kernel = KernelPath::of(region, path).ok_or_else(|| Error::Ephemeral {
            path: path.to_string(),
            region: region.embed_point.to_string(),
        })?;
        let (id, size, root) = self.listed_file(path)?;
        let label = path.to_string();
        // The directory is opened without following symlinks below the region's kernel
        // directory; the file, in it, without following one and only if it is a regular file.
        let (dir, name) = kernel.parent().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Missing {
                path: label.clone(),
            },
            _ => Error::kernel(&label, kernel.full(), e),
        })?;
        // (Authenticated files have a root too, and no journal: only encrypted roots are trees.)
        let tree = root
            .as_ref()
            .filter(|_| region.protection == Protection::Encrypted);
        commit::roll_forward(&self.path, &self.logj, &dir, &name, &id, tree, &label)?;
        if root.is_none() {
            self.restore_version(&dir, &name, &id, &label, false)?;
        }
        let data = kernel_fs::open_regular_at(&dir, &name)
            .map_err(|e| Error::kernel_open(&label, kernel.full(), e))?;
        self.reader_over(region, path, &id, size, root.as_ref(), data)
    }

    /// The version, size and Merkle root of the listed regular file `path`.
    pub(crate) fn listed_file(
        &self,
        path: &EmbedPath,
    ) -> Result<(crypto::FileId, u64, Option<[u8; 32]>)> {
        let entry = self.lookup(path).ok_or_else(|| Error::NotListed {
            path: path.to_string(),
        })?;
        match &entry.kind {
            FileKind::File { id, size, root } => Ok((*id, *size, *root)),
            _ => Err(Error::Invalid {
                path: path.to_string(),
                reason: "not a regular file".into(),
            }),
        }
    }

    /// Verified reader over `data` holding file version `id` of `region`.
    pub fn reader_over(
        &self,
        region: &Region,
        path: &EmbedPath,
        id: &crypto::FileId,
        size: u64,
        root: Option<&[u8; 32]>,
        data: File,
    ) -> Result<KernelReader> {
        let label = path.to_string();
        let codec = codec_for(
            region,
            path,
            id,
            root,
            size,
            kernel_fs::TrackedFile::new(data),
            || store::open_tree(&self.path, id, &label).map(|o| o.map(kernel_fs::TrackedFile::new)),
        )?;
        Ok(
            ProtectedReader::new(codec, size, region.chunk_len, path.to_string())?
                .with_threads(self.opts.threads),
        )
    }
}

/// The codec that checks version `id` of a file of `region`: the one place that derives file keys
/// for reading. `outboard` is consulted only for authenticated files.
pub(crate) fn codec_for<R: crate::codec::ReadAt, O: crate::codec::ReadAt>(
    region: &Region,
    path: &EmbedPath,
    id: &crypto::FileId,
    root: Option<&[u8; 32]>,
    size: u64,
    data: R,
    outboard: impl FnOnce() -> Result<Option<O>>,
) -> Result<FileCodec<R, O>> {
    let key = region.key.as_ref().ok_or_else(|| Error::NotProtected {
        path: path.to_string(),
        region: region.embed_point.to_string(),
    })?;
    Ok(match region.protection {
        // Format 2 (FORMAT.md §4a): an encrypted file with a root has a chunk tree.
        Protection::Encrypted if root.is_some() => {
            let label = path.to_string();
            let tree = outboard()?.ok_or_else(|| Error::TreeSize {
                path: label.clone(),
                expected: crate::format::tree::tree_len(size, region.chunk_len),
                actual: 0,
            })?;
            let root = *root.unwrap_or(&[0; 32]);
            FileCodec::Tree {
                keys: crate::codec::tree::EpochKeys::new(key.clone(), *id),
                tree: crate::codec::tree::TreeReader::new(
                    crypto::tree_key(key, id)?,
                    root,
                    size,
                    region.chunk_len,
                    tree,
                    label,
                )?,
                data,
            }
        }
        Protection::Encrypted => FileCodec::Encrypted {
            key: crypto::file_chunk_key(key, id)?,
            id: *id,
            data,
        },
        _ => FileCodec::Authenticated {
            key: crypto::file_mac_key(key, id)?,
            root: *root.ok_or_else(|| Error::Invalid {
                path: path.to_string(),
                reason: "authenticated file has no root in the fspf".into(),
            })?,
            data,
            outboard: outboard()?,
        },
    })
}

/// Test fixture: a new unencrypted fspf at `p` whose only region `/` is encrypted, in the
/// kernel directory `vol`, saved.
#[cfg(test)]
pub(crate) fn encrypted_root_volume(p: &Path, vol: &Path) -> Volume {
    Volume::create(p, false).unwrap();
    let mut v = Volume::open(p, None, None).unwrap();
    v.add_region(RegionSpec {
        embed_point: EmbedPath::root(),
        kind: RegionKind::Kernel(vol.to_path_buf()),
        protection: Protection::Encrypted,
        key_len: None,
        chunk_len: None,
    })
    .unwrap();
    v.save().unwrap();
    v
}

/// Test fixture: an fspf in a temp dir whose only region `/` is encrypted, in the kernel
/// directory `vol` beside it, holding `files` (path, contents), committed.
#[cfg(test)]
pub(crate) fn test_volume(files: &[(&str, &[u8])]) -> (tempfile::TempDir, PathBuf, Volume) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("fspf.pb");
    let vol = d.path().join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    let mut v = encrypted_root_volume(&p, &vol);
    let mut staged = Vec::new();
    for (path, data) in files {
        let ep = EmbedPath::parse(path).unwrap();
        if let Some(parent) = std::path::Path::new(&path[1..]).parent() {
            std::fs::create_dir_all(vol.join(parent)).unwrap();
        }
        let s = v
            .stage_file(&ep, data.len() as u64, 0o644, &mut &data[..])
            .unwrap();
        staged.push(Change::Put(s));
    }
    let tag = v.tag();
    v.commit(staged, Some(tag)).unwrap();
    (d, p, v)
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_volume_moved_elsewhere_reads_after_rebase_kernel_paths_and_the_accessors_agree() {
        let (d, p, v) = test_volume(&[("/d/a", b"abc")]);
        let (key, tag) = (v.key().cloned(), v.tag());
        drop(v);
        let moved = d.path().join("moved");
        std::fs::rename(d.path().join("vol"), &moved).unwrap();
        let mut v = Volume::open(&p, key, Some(tag)).unwrap();
        let a = EmbedPath::parse("/d/a").unwrap();
        assert!(v.open_file(&a).is_err(), "the old kernel path is gone");
        assert_eq!(v.rebase_kernel_paths(&d.path().join("vol"), &moved), 1);
        assert_eq!(v.rebase_kernel_paths(Path::new("/nowhere"), &moved), 0);
        let mut buf = [0u8; 3];
        assert_eq!(v.open_file(&a).unwrap().read_at(&mut buf, 0).unwrap(), 3);
        assert_eq!(&buf, b"abc");
        assert_eq!(v.regions().len(), 1);
        assert!(v.check_usable().is_ok());
        assert_eq!(
            v.paths_below(&EmbedPath::parse("/d").unwrap()),
            vec![a.clone()]
        );
        assert!(v.files().contains_key(&a));
        assert!(v.generation() > 0);
    }

    #[test]
    fn a_volume_over_a_frozen_index_reads_lists_commits_and_verifies_like_the_parsed_one() {
        let (_d, p, v) = test_volume(&[("/d/a", b"abc")]);
        let a = EmbedPath::parse("/d/a").unwrap();
        let bytes: &'static [u8] = Box::leak(v.build_index().unwrap().to_vec().into_boxed_slice());
        let mut ix = Volume::from_index(&p, None, bytes).unwrap();
        assert!(ix.is_indexed());
        assert_eq!(ix.tag(), v.tag());
        assert!(ix.lookup(&a).is_some());
        assert!(ix.has_below(&EmbedPath::parse("/d").unwrap()));
        let names: Vec<_> = ix
            .children(&EmbedPath::parse("/d").unwrap())
            .map(|(n, _)| n.to_vec())
            .collect();
        assert_eq!(names, vec![b"a".to_vec()]);
        let mut r = ix.open_file(&a).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(r.read_at(&mut buf, 0).unwrap(), 3);
        assert_eq!(&buf[..3], b"abc");
        assert!(ix.verify().is_empty(), "{:?}", ix.verify());
        // The first change parses the index; nothing listed is lost.
        let b = EmbedPath::parse("/b").unwrap();
        let s = ix.stage_file(&b, 1, 0o644, &mut &b"b"[..]).unwrap();
        let tag = ix.tag();
        ix.commit(vec![Change::Put(s)], Some(tag)).unwrap();
        assert!(!ix.is_indexed());
        let v2 = Volume::open(&p, None, Some(ix.tag())).unwrap();
        assert!(v2.lookup(&a).is_some() && v2.lookup(&b).is_some());
    }
    use super::*;

    #[test]
    fn unencrypted_fspf_is_refused_when_a_key_is_given() {
        // An attacker can forge an unencrypted fspf with any chosen tag (the key is public), so a
        // caller that holds a key must never accept one, even when the tag matches.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fspf.pb");
        let tag = Volume::create(&p, false).unwrap();
        let key = VolumeKey::random().unwrap();
        let e = Volume::open(&p, Some(key), Some(tag)).unwrap_err();
        assert!(matches!(e, Error::NotEncrypted { .. }), "{e}");
        assert!(Volume::open(&p, None, Some(tag)).is_ok());
    }

    #[test]
    fn encrypted_fspf_needs_the_right_key_and_tag() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fspf.pb");
        Volume::create(&p, false).unwrap();
        let mut v = Volume::open(&p, None, None).unwrap();
        let (tag, key) = v.encrypt().unwrap();
        assert!(matches!(
            Volume::open(&p, None, None).unwrap_err(),
            Error::KeyRequired { .. }
        ));
        let other = VolumeKey::random().unwrap();
        assert!(matches!(
            Volume::open(&p, Some(other), Some(tag)).unwrap_err(),
            Error::WrongKeyOrCorrupt { .. }
        ));
        let stale = Tag([0; 16]);
        assert!(matches!(
            Volume::open(&p, Some(key.clone()), Some(stale)).unwrap_err(),
            Error::TagMismatch { .. }
        ));
        assert!(Volume::open(&p, Some(key), Some(tag)).is_ok());
    }

    /// Regression: with `vol/sub` (a directory of a kernel region) replaced by a symlink to a
    /// victim directory, staging a new version of `/data/sub/a` wrote its shadow into the victim
    /// directory and the commit renamed it over the victim's file; reads followed the link.
    #[test]
    fn symlinked_region_directory_redirected_staged_writes_outside_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fspf.pb");
        let vol = d.path().join("vol");
        let victim = d.path().join("victim");
        std::fs::create_dir_all(vol.join("sub")).unwrap();
        std::fs::create_dir_all(&victim).unwrap();
        std::fs::write(victim.join("a"), "victim's file").unwrap();
        let mut v = encrypted_root_volume(&p, &vol);
        let _l = Volume::lock(&p).unwrap();
        let a = EmbedPath::parse("/sub/a").unwrap();
        let s = v.stage_file(&a, 3, 0o644, &mut &b"old"[..]).unwrap();
        let tag = v.tag();
        v.commit(vec![Change::Put(s)], Some(tag)).unwrap();
        assert!(v.open_file(&a).is_ok());

        std::fs::remove_dir_all(vol.join("sub")).unwrap();
        std::os::unix::fs::symlink(&victim, vol.join("sub")).unwrap();
        let e = v.stage_file(&a, 3, 0o644, &mut &b"new"[..]).unwrap_err();
        assert!(matches!(e, Error::SymlinkInPath { .. }), "{e}");
        let e = v.open_file(&a).err();
        assert!(matches!(e, Some(Error::SymlinkInPath { .. })), "{e:?}");
        let rel = Path::new("sub/a");
        assert!(kernel_fs::remove_beneath(&vol, rel, false).is_err());
        let names: Vec<_> = std::fs::read_dir(&victim).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert_eq!(std::fs::read(victim.join("a")).unwrap(), b"victim's file");
        let findings = v.verify();
        assert!(
            findings
                .iter()
                .any(|f| f.path == "/sub/a" && f.problem.contains("a symbolic link on disk")),
            "{findings:?}"
        );
    }

    #[test]
    fn create_refuses_to_overwrite_without_force() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fspf.pb");
        let t1 = Volume::create(&p, false).unwrap();
        assert!(Volume::create(&p, false).is_err());
        assert_eq!(Volume::read_tag(&p).unwrap(), t1);
        assert_ne!(Volume::create(&p, true).unwrap(), t1);
    }
}

#[cfg(test)]
mod log_tests;

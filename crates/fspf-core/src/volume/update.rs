//! In-place updates of format-2 encrypted files (FORMAT.md §4a, §5b): the one update API both
//! frontends use. [`Volume::update_file`] opens the committed version; [`FileUpdate::write_at`],
//! [`FileUpdate::set_len`] and [`FileUpdate::read_at`] work on it in memory, holding only the
//! chunks that changed; [`FileUpdate::stage`] seals those chunks under a fresh epoch key,
//! computes the tree pages they change and writes both, with the new lengths, to a **journal**;
//! the commit that records the new root then applies the journal in place. A crash before the
//! commit point leaves the old state untouched (the journal is an orphan); after it, whoever
//! opens the file next finds the journal the committed root names and applies it again
//! (idempotent) before reading.
use super::commit::Change;
use super::{kernel_fs, store, KernelReader, Volume};
use crate::codec::tree::{self as ct, ChunkEntry};
use crate::crypto::{self, FileId, RegionKey, EPOCH_LEN};
use crate::error::{Error, Result};
use crate::format::layout::{chunk_count, chunk_plain_len};
use crate::format::metadata::{now_ns, FileEntry, FileKind, Protection};
use crate::format::tree as ft;
use crate::policy::EmbedPath;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An open update of one format-2 file.
pub struct FileUpdate {
    path: EmbedPath,
    label: String,
    region: RegionKey,
    chunk_len: u32,
    id: FileId,
    base: KernelReader,
    base_size: u64,
    base_root: [u8; 32],
    /// Bytes of the committed version below this offset are still the file's content (the
    /// smallest length the file had since the update began).
    valid: u64,
    size: u64,
    /// Plaintext of every chunk written since the update began (its length under `size`).
    dirty: BTreeMap<u64, Vec<u8>>,
    entry: FileEntry,
    mtime: Option<i64>,
}

/// A sealed update, journaled and waiting for its commit ([`Change::Update`]).
#[derive(Debug, Clone)]
pub struct StagedUpdate {
    pub path: EmbedPath,
    pub id: FileId,
    /// The root the update was computed from; the commit refuses it if the file moved on.
    pub base_root: [u8; 32],
    /// The entry after the update (new size, root and times).
    pub entry: FileEntry,
    /// The journal, `FSPF.trees/<id>.<new root>.journal`, once written to a file.
    pub journal: PathBuf,
    /// Its length in bytes.
    pub journal_len: u64,
    /// The journal while it is only in memory (at most [`LOG_JOURNAL_MAX`] bytes): the commit
    /// puts it into its log record, or writes it to `journal` first ([`StagedUpdate::materialize`]).
    pub(crate) inline: Arc<std::sync::Mutex<Option<Arc<[u8]>>>>,
    /// Sealed chunks wholly past the committed data's end (appended): written straight to the
    /// data file by the commit, before its commit point, instead of to the journal
    /// (FORMAT.md §5b), so that an append is written once.
    pub(crate) direct: Arc<Direct>,
    pub(crate) _writer: Arc<store::WriterGuard>,
}

/// Sealed chunk bytes and their data-file offsets (runs of consecutive chunks joined).
#[derive(Default)]
pub(crate) struct Direct(pub Vec<(u64, Vec<u8>)>);

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes: usize = self.0.iter().map(|(_, b)| b.len()).sum();
        write!(f, "Direct({} runs, {bytes} bytes)", self.0.len())
    }
}

impl Direct {
    fn push(&mut self, at: u64, bytes: &[u8]) {
        if let Some((pat, pb)) = self.0.last_mut() {
            if *pat + pb.len() as u64 == at {
                pb.extend_from_slice(bytes);
                return;
            }
        }
        self.0.push((at, bytes.to_vec()));
    }
}

impl StagedUpdate {
    pub fn root(&self) -> [u8; 32] {
        match self.entry.kind {
            FileKind::File { root: Some(r), .. } => r,
            _ => [0; 32],
        }
    }

    /// Remove the journal of an update that will not be committed.
    pub fn discard(&self) {
        // An update that changed nothing (its root is the committed one) wrote no journal:
        // `journal` names the committed state's, which is not its to remove. One still in
        // memory has no file.
        if self.root() != self.base_root && self.inline_bytes().is_none() {
            let _ = std::fs::remove_file(&self.journal);
        }
    }

    /// The journal, while it is only in memory.
    pub(crate) fn inline_bytes(&self) -> Option<Arc<[u8]>> {
        self.inline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Drop the journal if it is still only in memory: the commit makes no state with its root
    /// (a later change of the same batch replaced or removed the file).
    pub(crate) fn forget_inline(&self) {
        *self.inline.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Write the journal to its file and make it durable, if it is still only in memory: before
    /// a commit that does not carry it in its log record.
    pub(crate) fn materialize(&self, fspf: &Path) -> Result<()> {
        let mut g = self.inline.lock().unwrap_or_else(|e| e.into_inner());
        let Some(b) = g.as_ref() else {
            return Ok(());
        };
        write_journal_file(fspf, &self.id, &self.root(), b)?;
        *g = None;
        Ok(())
    }
}

/// The format-2 data file `dir`/`name`, opened for writing, if its header names file version
/// `id` (else it moved, or another version replaced it).
fn data_file_of(dir: &std::os::fd::OwnedFd, name: &std::ffi::OsStr, id: &FileId) -> Option<File> {
    let f = kernel_fs::open_regular_rw_at(dir, name).ok()?;
    let mut h = [0u8; 24];
    f.read_exact_at(&mut h, 0).ok()?;
    (h == ct::header2(id)).then_some(f)
}

/// Write journal `bytes` of file `id` at `root` to `FSPF.trees/<id>.<root>.journal`, durably.
fn write_journal_file(fspf: &Path, id: &FileId, root: &[u8; 32], bytes: &[u8]) -> Result<()> {
    let jp = store::journal_path(fspf, id, root);
    let full = jp.full();
    // A journal for exactly this root cannot exist (its epoch is new); a leftover of an
    // identical name is replaced.
    let _ = kernel_fs::remove_beneath(jp.base(), jp.rel(), false);
    let (dir, name) = jp.parent().map_err(|e| Error::io(&full, e))?;
    let mut f = kernel_fs::create_new_at(&dir, &name, 0o600, rustix::fs::OFlags::empty())
        .map_err(|e| Error::io(&full, e))?;
    // fdatasync: the journal's data and length; its times do not matter (an fsync would
    // also force a file-system journal commit for them).
    f.write_all(bytes)
        .and_then(|_| f.sync_data())
        .map_err(|e| Error::io(&full, e))
}

impl Volume {
    fn pending_map(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<FileId, super::PendingJournals>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The directory and name of the data file of the listed file `path`.
    fn data_file_at(&self, path: &EmbedPath) -> Option<(std::os::fd::OwnedFd, std::ffi::OsString)> {
        self.kernel_path(path).and_then(|l| l.parent().ok())
    }

    /// [`apply_chain`] over this volume's fspf and the journals its log carries.
    fn apply(
        &self,
        dir: &std::os::fd::OwnedFd,
        name: &std::ffi::OsStr,
        id: &FileId,
        root: &[u8; 32],
        label: &str,
        mode: ApplyMode,
    ) -> Result<bool> {
        apply_chain(&self.path, &self.logj, dir, name, id, root, label, mode)
    }

    /// Whether this volume applied journals of file `id` that are not durable yet.
    pub(crate) fn journals_pending(&self, id: &FileId) -> bool {
        self.pending_map().contains_key(id)
    }

    /// After a commit: apply the journals that lead to the committed root `root` of `path`
    /// (file `id`) and keep them until the file is settled; settle it at the limits.
    /// `in_file`: the commit's journal is a file, not in its log record.
    pub(crate) fn apply_committed(
        &self,
        path: &EmbedPath,
        id: &FileId,
        root: &[u8; 32],
        journal_len: u64,
        in_file: bool,
    ) -> Result<()> {
        let Some((dir, name)) = self.data_file_at(path) else {
            return Ok(());
        };
        let label = path.to_string();
        super::commit::roll_forward_at(&dir, &name, id);
        let kept = self.apply(&dir, &name, id, root, &label, ApplyMode::Defer)?;
        let full = {
            let mut p = self.pending_map();
            if !kept {
                p.remove(id);
                return Ok(());
            }
            let e = p.entry(*id).or_insert_with(|| super::PendingJournals {
                path: path.clone(),
                root: *root,
                count: 0,
                bytes: 0,
                in_files: false,
            });
            e.path = path.clone();
            e.root = *root;
            e.count += 1;
            e.bytes += journal_len;
            e.in_files |= in_file;
            e.count >= PENDING_MAX || e.bytes >= PENDING_MAX_BYTES
        };
        if full {
            self.settle_file(path, id, root)?;
        }
        Ok(())
    }

    /// After a commit replaced or removed file version `id`: its applied journals describe no
    /// committed file any more and go (no sync: nothing committed needs them).
    pub(crate) fn drop_journals(&self, id: &FileId) {
        let Some(p) = self.pending_map().remove(id) else {
            return;
        };
        let _ = remove_chain(&self.path, &self.logj, id, &p.root, &p.path.to_string());
    }

    /// Make file `id` at `path` durable up to its root `root` and remove the journals that led
    /// there (applying any not applied in this boot).
    pub(crate) fn settle_file(&self, path: &EmbedPath, id: &FileId, root: &[u8; 32]) -> Result<()> {
        self.pending_map().remove(id);
        let Some((dir, name)) = self.data_file_at(path) else {
            return Ok(());
        };
        let label = path.to_string();
        self.apply(&dir, &name, id, root, &label, ApplyMode::Settle)
            .map(drop)
    }

    /// Make every file whose journals this volume applied durable and remove those journals
    /// (at a session's end: the frontends call it at exit and unmount). A file since replaced
    /// or moved keeps its journals for the next update or open of it. A chain whose journals
    /// are all in the log's records is left to the log, which keeps them until a checkpoint
    /// or an index cache settles them (FORMAT.md §5b): the writes applied reach the disk by
    /// the kernel's writeback, and a restart before that replays them. Up to
    /// [`SETTLE_EACH_MAX`] files are synced one by one (two `fdatasync`s each); more take one
    /// `syncfs` per file system for all of them.
    pub fn settle_journals(&self) -> Result<()> {
        let all: Vec<(FileId, EmbedPath)> = self
            .pending_map()
            .drain()
            .filter(|(_, p)| p.in_files)
            .map(|(id, p)| (id, p.path))
            .collect();
        let live: Vec<(FileId, EmbedPath, [u8; 32])> = all
            .into_iter()
            .filter_map(
                |(id, path)| match self.lookup(&path).map(|e| e.kind.clone()) {
                    Some(FileKind::File {
                        id: i,
                        root: Some(r),
                        ..
                    }) if i == id => Some((id, path, r)),
                    _ => None,
                },
            )
            .collect();
        let mut first = Ok(());
        let mut keep = |r: Result<()>| {
            if let (Err(e), true) = (r, first.is_ok()) {
                first = Err(e);
            }
        };
        if live.len() <= SETTLE_EACH_MAX {
            for (id, path, root) in &live {
                keep(self.settle_file(path, id, root));
            }
            return first;
        }
        // Anything not applied in this boot is applied first (normally nothing), then every
        // file system holding a data file or the trees is synced once, then the chains go.
        let mut dirs: Vec<PathBuf> = vec![self.tree_dir()];
        let mut synced: Vec<(&FileId, &EmbedPath, &[u8; 32])> = Vec::new();
        for (id, path, root) in &live {
            let Some(loc) = self.kernel_path(path) else {
                continue;
            };
            let Ok((dir, name)) = loc.parent() else {
                continue;
            };
            let label = path.to_string();
            match self.apply(&dir, &name, id, root, &label, ApplyMode::Defer) {
                Ok(true) => {
                    if let Some(d) = loc.full().parent() {
                        dirs.push(d.to_path_buf());
                    }
                    synced.push((id, path, root));
                }
                // Settled already (no boot id, or a journal that could not be marked).
                Ok(false) => {}
                Err(e) => keep(Err(e)),
            }
        }
        if let Err(e) = store::sync_filesystems(dirs.iter().map(|d| d.as_path())) {
            keep(Err(e));
            return first;
        }
        for (id, path, root) in &synced {
            keep(remove_chain(
                &self.path,
                &self.logj,
                id,
                root,
                &path.to_string(),
            ));
        }
        first
    }

    /// Apply the chains that run through the log's journals to the files they belong to, as
    /// [`ApplyMode::Defer`] does (`durable` false: before a frozen index of this state is
    /// handed to other processes, which learn only the log's later records), or make them
    /// durable ([`ApplyMode::Settle`]: before a checkpoint replaces the log, or an index cache
    /// on disk stands for it). A file replaced or moved since is skipped: the chain belongs to
    /// the data file only while that still holds the version.
    pub(crate) fn apply_log_chains(&self, durable: bool) -> Result<()> {
        let files: Vec<(FileId, (EmbedPath, [u8; 32]))> = self
            .logj
            .files
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (id, (path, root)) in files {
            let Some((dir, name)) = self.data_file_at(&path) else {
                continue;
            };
            if data_file_of(&dir, &name, &id).is_none() {
                continue;
            }
            let label = path.to_string();
            let mode = if durable {
                self.pending_map().remove(&id);
                ApplyMode::Settle
            } else {
                ApplyMode::Defer
            };
            self.apply(&dir, &name, &id, &root, &label, mode)?;
        }
        // Versions the log carries whole, where the state still lists them.
        for (id, path) in self.logj.versions() {
            let listed = matches!(
                self.lookup(&path).map(|e| e.kind.clone()),
                Some(FileKind::File { id: i, root: None, .. }) if i == id
            );
            if let (true, Some((dir, name))) = (listed, self.data_file_at(&path)) {
                self.restore_version(&dir, &name, &id, &path.to_string(), durable)?;
            }
        }
        Ok(())
    }

    /// [`Volume::apply_log_chains`], durably: before a checkpoint replaces the log.
    pub(crate) fn settle_log_chains(&self) -> Result<()> {
        self.apply_log_chains(true)
    }

    /// Make the kernel file `name` in `dir` hold version `id`, which a record of the log
    /// carries whole (FORMAT.md §5b, "Files in the log"): a power loss after the commit point
    /// may have left it (or its shadow) lost or torn. Only after a restart of the machine
    /// (within the boot that wrote the record, the page cache holds the shadow or the file even
    /// after the writer was killed, and a difference is a change on disk, which the read then
    /// detects) is it compared with the record, and written again from it where it differs,
    /// under `FSPF.lock`, and only while this volume's state is the one on disk, so that a
    /// process that has not caught up never puts an older version over a newer one.
    /// `durable`: synced as well (before the log that carries it goes). Versions the log does
    /// not carry: nothing to do.
    pub(crate) fn restore_version(
        &self,
        dir: &std::os::fd::OwnedFd,
        name: &std::ffi::OsStr,
        id: &FileId,
        label: &str,
        durable: bool,
    ) -> Result<()> {
        let Some(CarriedVersion {
            bytes,
            boot: written_in,
            ..
        }) = self.logj.version(id)
        else {
            return Ok(());
        };
        let io = |e: std::io::Error| Error::io(label, e);
        let sync = |f: &File| -> Result<()> {
            f.sync_data().map_err(io)?;
            kernel_fs::sync_dir_fd(dir).map_err(io)
        };
        // In the boot that wrote the record, the file is where its writer put it (the page
        // cache): nothing to compare, and a difference is a change on disk that its read
        // detects. A settle makes what is there durable.
        if written_in.is_some() && written_in == boot_id() {
            return match kernel_fs::open_regular_at(dir, name) {
                Ok(f) if durable => sync(&f),
                _ => Ok(()),
            };
        }
        let in_place = |dir: &std::os::fd::OwnedFd| -> Option<File> {
            let f = kernel_fs::open_regular_at(dir, name).ok()?;
            if f.metadata().ok()?.len() != bytes.len() as u64 {
                return None;
            }
            let mut b = vec![0u8; bytes.len()];
            f.read_exact_at(&mut b, 0).ok()?;
            (b[..] == bytes[..]).then_some(f)
        };
        if let Some(f) = in_place(dir) {
            return if durable { sync(&f) } else { Ok(()) };
        }
        let _lock = if store::FspfLock::held_here(&self.path) {
            None
        } else {
            Some(store::FspfLock::acquire(&self.path)?)
        };
        if !self.is_current_on_disk()? || in_place(dir).is_some() {
            return Ok(());
        }
        let tmp = super::commit::shadow_name(name, id);
        let _ = rustix::fs::unlinkat(dir, &tmp, rustix::fs::AtFlags::empty());
        let mut f =
            kernel_fs::create_new_at(dir, &tmp, 0o600, rustix::fs::OFlags::empty()).map_err(io)?;
        let written = f
            .write_all(&bytes)
            .and_then(|_| if durable { f.sync_data() } else { Ok(()) });
        if let Err(e) = written.and_then(|_| kernel_fs::rename_at(dir, &tmp, name)) {
            let _ = rustix::fs::unlinkat(dir, &tmp, rustix::fs::AtFlags::empty());
            return Err(io(e));
        }
        if durable {
            kernel_fs::sync_dir_fd(dir).map_err(io)?;
        }
        Ok(())
    }

    /// Open the listed file `path` for an in-place update. `Ok(None)` when it is not a
    /// format-2 file of a kernel region (the caller writes a whole new version instead).
    pub fn update_file(&self, path: &EmbedPath) -> Result<Option<FileUpdate>> {
        let Some(region) = self.region_for(path) else {
            return Ok(None);
        };
        let kernel = matches!(region.kind, crate::format::metadata::RegionKind::Kernel(_));
        if region.protection != Protection::Encrypted || !kernel {
            return Ok(None);
        }
        let Some(entry) = self.lookup(path).map(|e| e.into_owned()) else {
            return Err(Error::NotListed {
                path: path.to_string(),
            });
        };
        let FileKind::File {
            id,
            size,
            root: Some(root),
        } = entry.kind
        else {
            return Ok(None);
        };
        let Some(key) = region.key.clone() else {
            return Ok(None);
        };
        let chunk_len = region.chunk_len;
        let base = self.open_file(path)?;
        Ok(Some(FileUpdate {
            path: path.clone(),
            label: path.to_string(),
            region: key,
            chunk_len,
            id,
            base,
            base_size: size,
            base_root: root,
            valid: size,
            size,
            dirty: BTreeMap::new(),
            entry,
            mtime: None,
        }))
    }
}

impl FileUpdate {
    pub fn path(&self) -> &EmbedPath {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Plaintext bytes held for changed chunks.
    pub fn changed_bytes(&self) -> u64 {
        self.dirty.values().map(|v| v.len() as u64).sum()
    }

    /// Record `ns` as the modification time of the new state (default: the time of `stage`).
    pub fn set_mtime(&mut self, ns: i64) {
        self.mtime = Some(ns);
    }

    /// Current content of chunk `i` (its length under the current size).
    fn chunk(&mut self, i: u64) -> Result<Vec<u8>> {
        if let Some(d) = self.dirty.get(&i) {
            return Ok(d.clone());
        }
        let c = u64::from(self.chunk_len);
        let mut v = vec![0u8; chunk_plain_len(self.size, self.chunk_len, i) as usize];
        let start = i * c;
        let lim = self.valid.min(self.base_size);
        if start < lim {
            let k = ((lim - start) as usize).min(v.len());
            self.base.read_exact_at(&mut v[..k], start)?;
        }
        Ok(v)
    }

    /// Read at `off` what the file holds now (committed content plus this update's changes).
    pub fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<usize> {
        let end = off.saturating_add(buf.len() as u64).min(self.size);
        let c = u64::from(self.chunk_len);
        let mut pos = off;
        while pos < end {
            let i = pos / c;
            let cend = ((i + 1) * c).min(self.size);
            let take = (end.min(cend) - pos) as usize;
            let at = (pos - off) as usize;
            if let Some(d) = self.dirty.get(&i) {
                let s = (pos - i * c) as usize;
                buf[at..at + take].copy_from_slice(&d[s..s + take]);
            } else {
                let lim = self.valid.min(self.base_size);
                let k = if pos < lim {
                    ((lim - pos) as usize).min(take)
                } else {
                    0
                };
                if k > 0 {
                    self.base.read_exact_at(&mut buf[at..at + k], pos)?;
                }
                buf[at + k..at + take].fill(0);
            }
            pos += take as u64;
        }
        Ok(end.saturating_sub(off) as usize)
    }

    /// Write `data` at `off`, extending the file (with zeros in between) if needed.
    pub fn write_at(&mut self, data: &[u8], off: u64) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = off
            .checked_add(data.len() as u64)
            .filter(|e| *e <= crate::format::layout::MAX_FILE_SIZE)
            .ok_or_else(|| Error::FileTooLarge {
                path: self.label.clone(),
                size: u64::MAX,
            })?;
        if end > self.size {
            self.set_len(end)?;
        }
        let c = u64::from(self.chunk_len);
        let mut pos = off;
        while pos < end {
            let i = pos / c;
            let s = (pos - i * c) as usize;
            let take = ((end - pos) as usize).min(c as usize - s);
            let whole = chunk_plain_len(self.size, self.chunk_len, i) as usize;
            let mut chunk = match self.dirty.remove(&i) {
                Some(d) => d,
                // The write replaces the chunk's every byte: what it held is not needed (nor
                // read: a 4 KiB page of a database written over costs no read and no
                // decryption of the page it replaces, nor of the reader's window around it).
                None if s == 0 && take == whole => vec![0u8; whole],
                None => self.chunk(i)?,
            };
            let from = (pos - off) as usize;
            chunk[s..s + take].copy_from_slice(&data[from..from + take]);
            self.dirty.insert(i, chunk);
            pos += take as u64;
        }
        Ok(())
    }

    /// Truncate or extend (with zeros) to `len` bytes.
    pub fn set_len(&mut self, len: u64) -> Result<()> {
        if len > crate::format::layout::MAX_FILE_SIZE {
            return Err(Error::FileTooLarge {
                path: self.label.clone(),
                size: len,
            });
        }
        let c = self.chunk_len;
        let last_now = chunk_count(self.size, c) - 1;
        if len < self.size {
            self.valid = self.valid.min(len);
            let n = chunk_count(len, c);
            self.dirty.retain(|&i, _| i < n);
            if let Some(d) = self.dirty.get_mut(&(n - 1)) {
                d.truncate(chunk_plain_len(len, c, n - 1) as usize);
            }
        } else if len > self.size {
            if let Some(d) = self.dirty.get_mut(&last_now) {
                d.resize(chunk_plain_len(len, c, last_now) as usize, 0);
            }
        }
        self.size = len;
        Ok(())
    }

    /// Seal the changed chunks under a fresh epoch, compute the tree pages they change, and
    /// write all of it with the new lengths to the journal (fsync'd). Nothing on disk that a
    /// reader uses changes before the commit.
    pub fn stage(mut self, vol: &Volume) -> Result<StagedUpdate> {
        const BLOCK: u64 = 4096;
        let c = self.chunk_len;
        let n = chunk_count(self.size, c);
        // Chunks whose content changed without a write: a new or shortened last chunk, and
        // everything the file grew by (zeros), or lost to a truncation and regained.
        let reseal_from = if self.size == self.base_size && self.valid >= self.base_size {
            n
        } else {
            self.valid.min(self.base_size).min(self.size) / u64::from(c)
        };
        let mut todo: Vec<u64> = self.dirty.keys().copied().filter(|&i| i < n).collect();
        todo.extend((reseal_from..n).filter(|i| !self.dirty.contains_key(i)));
        todo.sort_unstable();
        let mut epoch = [0u8; EPOCH_LEN];
        crypto::random_bytes(&mut epoch)?;
        let key = crypto::epoch_chunk_key(&self.region, &self.id, &epoch)?;
        let mut changed = BTreeMap::new();
        let mut j = Journal::new(self.id, None);
        let mut direct = Direct::default();
        j.set_len(Target::Data, ft::data_len(self.size).unwrap_or(u64::MAX));
        // Chunks that start at or past the committed data's end overwrite nothing a reader of
        // the committed state uses: the commit writes them in place before its commit point.
        let committed_end = ft::data_len(self.base_size).unwrap_or(u64::MAX);
        // A small update keeps even those in its journal (FORMAT.md §5b): a journal of at most
        // LOG_JOURNAL_MAX rides in the commit's log record, where chunks written in place
        // before the commit point would cost the data file's own `fdatasync`, and a settle of
        // the file's chain before them.
        let journal_appends = todo.len() as u64 * u64::from(c) <= LOG_JOURNAL_MAX as u64 / 2;
        let mut hint: Option<(u64, u64)> = None;
        for i in todo {
            let mut chunk = self.chunk(i)?;
            let tag = ct::seal_chunk2(&key, &self.id, i, &mut chunk)?;
            changed.insert(i, ChunkEntry { epoch, tag });
            let at = ft::chunk_offset(c, i).unwrap_or(u64::MAX);
            if at >= committed_end && !chunk.is_empty() && !journal_appends {
                direct.push(at, &chunk);
            } else {
                // Applied in place after the commit point: a chunk does not start or end on a
                // 4 KiB block of the data file (its 24-byte header shifts them), so the file
                // system reads the blocks it overwrites in part. Asked for now, they are read
                // while the commit syncs, not after it (runs of chunks: one hint).
                let (from, to) = (
                    at & !(BLOCK - 1),
                    at.saturating_add(chunk.len() as u64)
                        .next_multiple_of(BLOCK),
                );
                match hint.as_mut() {
                    Some((_, end)) if *end >= from => *end = to.max(*end),
                    _ => {
                        if let Some((a, b)) = hint.replace((from, to)) {
                            self.base.will_need_data(a, b - a);
                        }
                    }
                }
                j.write(Target::Data, at, &chunk);
            }
        }
        if let Some((a, b)) = hint {
            self.base.will_need_data(a, b - a);
        }
        let tkey = crypto::tree_key(&self.region, &self.id)?;
        let tree = self.base.tree_mut().ok_or_else(|| Error::Invalid {
            path: self.label.clone(),
            reason: "not a format-2 file".into(),
        })?;
        let (pages, root) = ct::update_pages(&tkey, tree, &changed, n)?;
        // A page is journaled as the byte ranges in which it differs from what the committed
        // tree file holds at its position (a changed chunk's entry is 32 bytes of its 4 KiB
        // page; a new page of one entry after an append is one entry): past the committed
        // length the file is first cut to that length, so that what lies there are zeros.
        // Bytes no journal of a chain changes are the same in every state of it, so a replay of
        // byte ranges is as exact as one of whole pages (FORMAT.md §5b).
        let page = ft::PAGE_LEN as u64;
        let old_len = ft::tree_pages(chunk_count(self.base_size, c)) * page;
        let new_len = ft::tree_pages(n) * page;
        if new_len > old_len {
            j.set_len(Target::Tree, old_len);
        }
        j.set_len(Target::Tree, new_len);
        for ((l, p), pg) in &pages {
            let at = ft::page_pos(n, *l, *p) * page;
            let mut base = [0u8; ft::PAGE_LEN];
            let have = old_len.saturating_sub(at).min(page) as usize;
            tree.read_raw(&mut base[..have], at)?;
            for (a, b) in changed_runs(&base, &pg[..]) {
                j.write(Target::Tree, at + a as u64, &pg[a..b]);
            }
        }
        let writer = vol.writer_guard()?;
        let jp = store::journal_path(&vol.path, &self.id, &root);
        let full = jp.full();
        let now = now_ns();
        let mut entry = self.entry.clone();
        entry.kind = FileKind::File {
            id: self.id,
            size: self.size,
            root: Some(root),
        };
        entry.mtime_ns = self.mtime.unwrap_or(now);
        entry.ctime_ns = now;
        if root == self.base_root {
            // Nothing changed (what a comparison stages for an unchanged file): no journal. One
            // named after this root is the committed state's (a chain not yet settled): it is
            // neither replaced nor removed by this update (a kill while it was being replaced
            // left a damaged journal of the committed root).
            return Ok(StagedUpdate {
                path: self.path,
                id: self.id,
                base_root: self.base_root,
                entry,
                journal: full,
                journal_len: 0,
                inline: Default::default(),
                direct: Arc::new(direct),
                _writer: writer,
            });
        }
        // Chain this journal to the applied ones of earlier updates that are not durable yet
        // (FORMAT.md §5b), or make those durable first and start a chain: always when chunks are
        // written in place before the commit point (a replay of older journals would cut or
        // overwrite them), and at this volume's first update of the file (another process's
        // chain is ended, so that chains stay short).
        // A chain whose last journal is in the log is continued too, whoever wrote it: its
        // length is bounded by the log's (a checkpoint settles it), and a walk stops at the
        // first journal applied in this boot.
        let continues =
            vol.journals_pending(&self.id) || vol.logj.get(&self.id, &self.base_root).is_some();
        if direct.0.is_empty() && continues {
            j.prev = Some(self.base_root);
        } else {
            vol.settle_file(&self.path, &self.id, &self.base_root)?;
        }
        let bytes = j.encode(&root);
        let journal_len = bytes.len() as u64;
        // A small journal stays in memory for the commit's log record (FORMAT.md §5b,
        // "Journals in the log"); a larger one is a file now.
        let inline = if bytes.len() <= LOG_JOURNAL_MAX {
            Some(Arc::from(bytes))
        } else {
            write_journal_file(&vol.path, &self.id, &root, &bytes)?;
            None
        };
        Ok(StagedUpdate {
            path: self.path,
            id: self.id,
            base_root: self.base_root,
            entry,
            journal: full,
            journal_len,
            inline: Arc::new(std::sync::Mutex::new(inline)),
            direct: Arc::new(direct),
            _writer: writer,
        })
    }
}

impl StagedUpdate {
    /// Before the commit point, under the fspf's lock: write the appended chunks to the data
    /// file at `dir`/`name` and make them durable. When the file there is not this update's
    /// (it moves in the same batch, or is gone), the journal takes them instead, so the next
    /// open applies them wherever the file is (roll-forward).
    pub(crate) fn write_direct(
        &self,
        fspf: &Path,
        at: Option<(&std::os::fd::OwnedFd, &std::ffi::OsStr)>,
    ) -> Result<()> {
        if self.direct.0.is_empty() {
            return Ok(());
        }
        let label = self.path.to_string();
        let data = at.and_then(|(dir, name)| data_file_of(dir, name, &self.id));
        let Some(data) = data else {
            return self.journal_direct(fspf);
        };
        for (off, b) in &self.direct.0 {
            data.write_all_at(b, *off)
                .map_err(|e| Error::io(&label, e))?;
        }
        data.sync_data().map_err(|e| Error::io(&label, e))
    }

    /// The journal rewritten with the appended chunks in it (see [`StagedUpdate::write_direct`]).
    fn journal_direct(&self, fspf: &Path) -> Result<()> {
        let root = self.root();
        let jp = store::journal_path(fspf, &self.id, &root);
        let full = jp.full();
        let damaged = |reason: String| Error::JournalDamaged {
            path: self.path.to_string(),
            journal: full.display().to_string(),
            reason,
        };
        let with_direct = |bytes: &[u8]| -> Result<Vec<u8>> {
            let parsed = parse_journal(bytes, &self.id, &root).map_err(damaged)?;
            let mut j = Journal::new(self.id, parsed.prev);
            for r in parsed.records {
                match r {
                    Record::Len(t, len) => j.set_len(t, len),
                    Record::Write(t, at, b) => j.write(t, at, b),
                }
            }
            for (at, b) in &self.direct.0 {
                j.write(Target::Data, *at, b);
            }
            Ok(j.encode(&root))
        };
        {
            let mut g = self.inline.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(b) = g.as_ref() {
                let out = with_direct(b)?;
                if out.len() <= LOG_JOURNAL_MAX {
                    *g = Some(Arc::from(out));
                } else {
                    write_journal_file(fspf, &self.id, &root, &out)?;
                    *g = None;
                }
                return Ok(());
            }
        }
        let f = kernel_fs::open_regular_rw(jp.base(), jp.rel()).map_err(|e| match e {
            kernel_fs::OpenError::Io(e) => Error::io(&full, e),
            kernel_fs::OpenError::NotRegular(kind) => Error::NotRegular {
                path: full.display().to_string(),
                kind,
            },
        })?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &f, &mut bytes).map_err(|e| Error::io(&full, e))?;
        let out = with_direct(&bytes)?;
        f.write_all_at(&out, 0)
            .and_then(|_| f.set_len(out.len() as u64))
            .and_then(|_| f.sync_data())
            .map_err(|e| Error::io(&full, e))
    }
}

impl From<StagedUpdate> for Change {
    fn from(s: StagedUpdate) -> Change {
        Change::Update(s)
    }
}

/// The byte ranges `[a, b)` in which `new` differs from `old` (same length), runs closer than
/// a journal record's header (17 bytes) joined.
fn changed_runs(old: &[u8], new: &[u8]) -> Vec<(usize, usize)> {
    const JOIN: usize = 17;
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < new.len() {
        if old[i] == new[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < new.len() && old[i] != new[i] {
            i += 1;
        }
        match out.last_mut() {
            Some(last) if start - last.1 < JOIN => last.1 = i,
            _ => out.push((start, i)),
        }
    }
    out
}

/// What a journal record writes to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Data,
    Tree,
}

/// A journal being built: lengths first, then writes (FORMAT.md §5b).
struct Journal {
    id: FileId,
    /// The root of the journal this one continues (FORMAT.md §5b, chains); `None`: the first
    /// of its chain (the committed state before it is durable in the files).
    prev: Option<[u8; 32]>,
    lens: Vec<(Target, u64)>,
    writes: Vec<(Target, u64, Vec<u8>)>,
}

/// Journal format 3 (chained, with an applied mark); format 2 journals are still applied.
const JOURNAL_MAGIC: [u8; 8] = *b"FSPFJ\x03\0\0";
const JOURNAL_MAGIC_V2: [u8; 8] = *b"FSPFJ\x02\0\0";
/// Where a format-3 journal holds the boot id of the boot in which it was applied (16 bytes,
/// zeros until then; not covered by the checksum).
const APPLIED_AT: usize = 8;
/// Header of a format-3 journal: magic, applied mark, file id, root, previous root, count.
const HEAD3: usize = 8 + 16 + 16 + 32 + 32 + 8;
/// Header of a format-2 journal: magic, file id, root, count.
const HEAD2: usize = 8 + 16 + 32 + 8;
/// A chain longer than this is refused as damaged (a writer settles at [`PENDING_MAX`]).
const CHAIN_MAX: usize = 4096;
/// Applied journals a volume keeps per file before it makes the file durable and removes them.
pub(crate) const PENDING_MAX: u32 = 64;
/// Bytes of applied journals a volume keeps per file before it does the same.
pub(crate) const PENDING_MAX_BYTES: u64 = 32 << 20;
/// [`Volume::settle_journals`] syncs at most this many files one by one; more by `syncfs`.
pub(crate) const SETTLE_EACH_MAX: usize = 8;

impl Journal {
    fn new(id: FileId, prev: Option<[u8; 32]>) -> Journal {
        Journal {
            id,
            prev,
            lens: Vec::new(),
            writes: Vec::new(),
        }
    }
    fn set_len(&mut self, t: Target, len: u64) {
        self.lens.push((t, len));
    }
    /// Add a write; one that continues the previous write of the same target joins it.
    fn write(&mut self, t: Target, at: u64, bytes: &[u8]) {
        if let Some((pt, pat, pb)) = self.writes.last_mut() {
            if *pt == t && *pat + pb.len() as u64 == at {
                pb.extend_from_slice(bytes);
                return;
            }
        }
        self.writes.push((t, at, bytes.to_vec()));
    }
    fn encode(&self, root: &[u8; 32]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&JOURNAL_MAGIC);
        out.extend_from_slice(&[0u8; 16]);
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(root);
        out.extend_from_slice(&self.prev.unwrap_or([0; 32]));
        let count = (self.lens.len() + self.writes.len()) as u64;
        out.extend_from_slice(&count.to_le_bytes());
        let code = |t: Target, w: bool| match (t, w) {
            (Target::Data, true) => 1u8,
            (Target::Tree, true) => 2,
            (Target::Data, false) => 3,
            (Target::Tree, false) => 4,
        };
        for (t, len) in &self.lens {
            out.push(code(*t, false));
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&0u64.to_le_bytes());
        }
        for (t, at, b) in &self.writes {
            out.push(code(*t, true));
            out.extend_from_slice(&at.to_le_bytes());
            out.extend_from_slice(&(b.len() as u64).to_le_bytes());
            out.extend_from_slice(b);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }
}

/// A parsed journal record: set a length, or write bytes.
enum Record<'a> {
    Len(Target, u64),
    Write(Target, u64, &'a [u8]),
}

/// A parsed journal: the root it continues and its records.
struct Parsed<'a> {
    prev: Option<[u8; 32]>,
    records: Vec<Record<'a>>,
}

/// The header fields a chain walk needs.
struct Head {
    /// Boot id of the boot in which the journal was applied (format 3 only).
    applied: Option<[u8; 16]>,
    prev: Option<[u8; 32]>,
}

fn nonzero(b: &[u8]) -> Option<[u8; 32]> {
    let r: [u8; 32] = b.try_into().ok()?;
    (r != [0; 32]).then_some(r)
}

/// Read the header of journal `f` (of file `id` at `root`).
fn read_head(f: &File, id: &FileId, root: &[u8; 32]) -> std::result::Result<Head, String> {
    let mut h = [0u8; HEAD3];
    let mut got = 0;
    while got < h.len() {
        match f.read_at(&mut h[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    let h = &h[..got];
    let (ids, prev, applied) = match h.get(..8) {
        Some(m) if m == JOURNAL_MAGIC && h.len() == HEAD3 => {
            let a: [u8; 16] = h[8..24].try_into().unwrap_or_default();
            (
                &h[24..72],
                nonzero(&h[72..104]),
                (a != [0; 16]).then_some(a),
            )
        }
        Some(m) if m == JOURNAL_MAGIC_V2 && h.len() >= HEAD2 => (&h[8..56], None, None),
        _ => return Err("bad magic or shorter than its header".into()),
    };
    if ids[..16] != id.0 || ids[16..48] != root[..] {
        return Err("names another file or root".into());
    }
    Ok(Head { applied, prev })
}

fn parse_journal<'a>(
    b: &'a [u8],
    id: &FileId,
    root: &[u8; 32],
) -> std::result::Result<Parsed<'a>, String> {
    let v3 = b.get(..8) == Some(&JOURNAL_MAGIC[..]);
    let head = if v3 { HEAD3 } else { HEAD2 };
    if b.len() < head + 32 {
        return Err("shorter than its header".into());
    }
    let (body, sum) = b.split_at(b.len() - 32);
    let mut h = blake3::Hasher::new();
    if v3 {
        // The applied mark is written after the checksum: it counts as zeros.
        h.update(&body[..APPLIED_AT]);
        h.update(&[0u8; 16]);
        h.update(&body[APPLIED_AT + 16..]);
    } else {
        h.update(body);
    }
    if h.finalize().as_bytes() != sum {
        return Err("checksum mismatch (torn or modified)".into());
    }
    let (ids, prev) = if v3 {
        (&body[24..72], nonzero(&body[72..104]))
    } else if body[..8] == JOURNAL_MAGIC_V2 {
        (&body[8..56], None)
    } else {
        return Err("bad magic".into());
    };
    if ids[..16] != id.0 || ids[16..48] != root[..] {
        return Err("names another file or root".into());
    }
    let count = u64::from_le_bytes(body[head - 8..head].try_into().unwrap_or_default());
    let mut at = head;
    let mut out = Vec::new();
    for _ in 0..count {
        let Some(h) = body.get(at..at + 17) else {
            return Err("record past the end".into());
        };
        let off = u64::from_le_bytes(h[1..9].try_into().unwrap_or_default());
        let len = u64::from_le_bytes(h[9..17].try_into().unwrap_or_default());
        at += 17;
        let t = match h[0] {
            1 | 3 => Target::Data,
            2 | 4 => Target::Tree,
            k => return Err(format!("unknown record kind {k}")),
        };
        if h[0] >= 3 {
            out.push(Record::Len(t, off));
            continue;
        }
        let Some(bytes) = usize::try_from(len)
            .ok()
            .and_then(|l| body.get(at..at.checked_add(l)?))
        else {
            return Err("record past the end".into());
        };
        at += bytes.len();
        out.push(Record::Write(t, off, bytes));
    }
    if at != body.len() {
        return Err("bytes after the last record".into());
    }
    Ok(Parsed { prev, records: out })
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`): the page cache of one boot survives any
/// process's death, so a journal applied in this boot needs no second application until the
/// machine restarts. `None` where it cannot be read: journals are then made durable at once.
pub(crate) fn boot_id() -> Option<[u8; 16]> {
    static ID: std::sync::OnceLock<Option<[u8; 16]>> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let h: String = s.trim().chars().filter(|c| *c != '-').collect();
        let v = hex::decode(h).ok()?;
        let id: [u8; 16] = v.try_into().ok()?;
        (id != [0; 16]).then_some(id)
    })
}

/// Largest journal a commit carries in its log record (FORMAT.md §5b, "Journals in the log");
/// a larger one is written to a journal file.
pub(crate) const LOG_JOURNAL_MAX: usize = 64 << 10;

/// The journals the records of the current log carry (FORMAT.md §5b, "Journals in the log"),
/// and the files whose chains may run through them: what a volume learns from the records it
/// applies and the commits it makes, forgotten when a checkpoint replaces the log (every such
/// chain is made durable first, [`Volume::settle_log_chains`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct LogJournals {
    /// Format-3 journals by (file id, root).
    journals: HashMap<(FileId, [u8; 32]), Arc<[u8]>>,
    /// Files with a journal in the log: the path and root of their last committed entry.
    files: HashMap<FileId, (EmbedPath, [u8; 32])>,
    /// Whole format-1 versions carried by the log's records (FORMAT.md §5b, "Files in the
    /// log"): the path of the version's last committed entry, its data file's bytes and the
    /// boot its record was written in.
    versions: HashMap<FileId, CarriedVersion>,
    /// Whether the tree directory keeps extended attributes (the marks): probed once.
    marks: std::sync::OnceLock<bool>,
}

/// A whole version a record of the log carries: the path of its last committed entry, its
/// data file's bytes, and the boot its record was written in.
#[derive(Debug, Clone)]
pub(crate) struct CarriedVersion {
    path: EmbedPath,
    pub(crate) bytes: Arc<[u8]>,
    pub(crate) boot: Option<[u8; 16]>,
}

impl LogJournals {
    fn get(&self, id: &FileId, root: &[u8; 32]) -> Option<Arc<[u8]>> {
        self.journals.get(&(*id, *root)).cloned()
    }

    pub(crate) fn clear(&mut self) {
        self.journals.clear();
        self.files.clear();
        self.versions.clear();
    }

    /// Are there files whose chains run through the log's journals, or versions the log
    /// carries whole?
    pub(crate) fn has_files(&self) -> bool {
        !self.files.is_empty() || !self.versions.is_empty()
    }

    /// The data file's bytes of version `id`, if a record of the log carries it, and the boot
    /// that record was written in.
    pub(crate) fn version(&self, id: &FileId) -> Option<CarriedVersion> {
        self.versions.get(id).cloned()
    }

    /// The versions the log carries: id and path of its last entry.
    pub(crate) fn versions(&self) -> Vec<(FileId, EmbedPath)> {
        self.versions
            .iter()
            .map(|(id, v)| (*id, v.path.clone()))
            .collect()
    }

    /// A whole version (format 1, `bytes` its data file) this process's commit carried in its
    /// record for `path`.
    pub(crate) fn insert_version(&mut self, path: EmbedPath, bytes: Arc<[u8]>) {
        if let Some(id) = version_id(&bytes) {
            self.versions.insert(
                id,
                CarriedVersion {
                    path,
                    bytes,
                    boot: boot_id(),
                },
            );
        }
    }

    /// What a restart of the machine does: the versions' records name another boot.
    #[cfg(test)]
    pub(crate) fn restarted(&mut self) {
        for v in self.versions.values_mut() {
            v.boot = Some([0xee; 16]);
        }
    }

    /// The journals and whole versions of one record, with the entries it puts: each
    /// journal's file and root, and each version's id, are the ones an entry of the same
    /// record names.
    pub(crate) fn record(
        &mut self,
        journals: Vec<Vec<u8>>,
        versions: Vec<Vec<u8>>,
        boot: &[u8],
        put: &[(EmbedPath, FileEntry)],
    ) -> std::result::Result<(), String> {
        self.entries(put.iter().map(|(p, e)| (p, e)));
        let boot: Option<[u8; 16]> = match boot.len() {
            0 => None,
            _ => Some(
                boot.try_into()
                    .map_err(|_| "a boot id of the wrong length")?,
            ),
        };
        if !versions.is_empty() && boot.is_none() {
            return Err("files without the boot id of their writer".into());
        }
        for v in versions {
            let id = version_id(&v).ok_or("a file with a bad header")?;
            let path = put
                .iter()
                .find(
                    |(_, e)| matches!(e.kind, FileKind::File { id: i, root: None, .. } if i == id),
                )
                .map(|(p, _)| p.clone())
                .ok_or("a file whose entry is not in its record")?;
            self.versions.insert(
                id,
                CarriedVersion {
                    path,
                    bytes: v.into(),
                    boot,
                },
            );
        }
        for j in journals {
            let (id, root) = journal_names(&j).ok_or("a journal with a bad header")?;
            let path = put
                .iter()
                .find(|(_, e)| {
                    matches!(e.kind, FileKind::File { id: i, root: Some(r), .. } if i == id && r == root)
                })
                .map(|(p, _)| p.clone())
                .ok_or("a journal whose entry is not in its record")?;
            self.insert(path, j.into());
        }
        Ok(())
    }

    /// A journal a commit of this volume carried in its record.
    pub(crate) fn insert(&mut self, path: EmbedPath, bytes: Arc<[u8]>) {
        if let Some((id, root)) = journal_names(&bytes) {
            self.journals.insert((id, root), bytes);
            self.files.insert(id, (path, root));
        }
    }

    /// Entries put by a record or a commit: a file with a chain in the log keeps its path and
    /// root current (a rename, an update journaled in a file).
    pub(crate) fn entries<'a>(
        &mut self,
        put: impl Iterator<Item = (&'a EmbedPath, &'a FileEntry)>,
    ) {
        if !self.has_files() {
            return;
        }
        for (p, e) in put {
            match &e.kind {
                FileKind::File {
                    id, root: Some(r), ..
                } => {
                    if let Some(f) = self.files.get_mut(id) {
                        *f = (p.clone(), *r);
                    }
                }
                FileKind::File { id, root: None, .. } => {
                    if let Some(v) = self.versions.get_mut(id) {
                        v.path = p.clone();
                    }
                }
                _ => {}
            }
        }
    }

    /// Can the file system of `fspf`'s tree directory keep the marks that tell which journals
    /// of the log are applied? Without them journals are written to files, as before.
    pub(crate) fn marks_supported(&self, fspf: &Path) -> bool {
        *self.marks.get_or_init(|| {
            let dir = store::tree_dir(fspf);
            let Ok(d) = File::open(&dir) else {
                return false;
            };
            let mut b = [0u8; MARK_LEN];
            match rustix::fs::fgetxattr(&d, MARK_XATTR, &mut b[..]) {
                Ok(_) => true,
                Err(e) => e == rustix::io::Errno::NODATA,
            }
        })
    }
}

/// The file id a format-1 encrypted data file's header names.
fn version_id(b: &[u8]) -> Option<FileId> {
    if b.get(..8)? != crate::format::layout::ENC_MAGIC {
        return None;
    }
    Some(FileId(b.get(8..24)?.try_into().ok()?))
}

/// File id and root a format-3 journal's header names.
fn journal_names(b: &[u8]) -> Option<(FileId, [u8; 32])> {
    if b.get(..8)? != JOURNAL_MAGIC || b.len() < HEAD3 {
        return None;
    }
    let id = FileId(b[24..40].try_into().ok()?);
    let root: [u8; 32] = b[40..72].try_into().ok()?;
    Some((id, root))
}

/// Extended attribute of a chunk tree file (`FSPF.trees/<id>`) naming the journals of the log
/// applied to the file (FORMAT.md §5b): log journals have no file of their own to mark.
const MARK_XATTR: &str = "user.fspf.mark";
const MARK_LEN: usize = 16 + 32 + 32;

/// A tree file's mark: the newest journal applied in boot `boot`, and the newest root the
/// data and tree files are durable at (synced before the mark was written).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Mark {
    boot: [u8; 16],
    applied: [u8; 32],
    durable: [u8; 32],
}

impl Mark {
    fn read(tree: &File) -> Mark {
        let mut b = [0u8; MARK_LEN];
        match rustix::fs::fgetxattr(tree, MARK_XATTR, &mut b[..]) {
            Ok(MARK_LEN) => Mark {
                boot: b[..16].try_into().unwrap_or_default(),
                applied: b[16..48].try_into().unwrap_or_default(),
                durable: b[48..].try_into().unwrap_or_default(),
            },
            _ => Mark::default(),
        }
    }

    fn of_tree(fspf: &Path, id: &FileId) -> Mark {
        match store::open_tree(fspf, id, "") {
            Ok(Some(t)) => Mark::read(&t),
            _ => Mark::default(),
        }
    }

    fn write(&self, tree: &File) -> bool {
        let mut b = [0u8; MARK_LEN];
        b[..16].copy_from_slice(&self.boot);
        b[16..48].copy_from_slice(&self.applied);
        b[48..].copy_from_slice(&self.durable);
        rustix::fs::fsetxattr(tree, MARK_XATTR, &b, rustix::fs::XattrFlags::empty()).is_ok()
    }

    /// Is the journal of the log with root `r` applied: in this boot, or durably?
    fn covers(&self, boot: Option<[u8; 16]>, r: &[u8; 32]) -> bool {
        (boot == Some(self.boot) && self.applied == *r) || self.durable == *r
    }
}

/// What [`apply_chain`] does with the journals it finds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ApplyMode {
    /// On open (recovery): apply what this boot has not applied; if anything was, make the
    /// files durable and remove the chain.
    Recover,
    /// After a commit: apply and mark; the journals stay until the file is settled.
    Defer,
    /// Make the files durable and remove the whole chain (applying what is not applied).
    Settle,
}

/// Where a journal of a chain lies.
enum Src {
    /// A journal file (it carries its own applied mark).
    File(File),
    /// A journal carried by a log record (the tree file's mark tells whether it is applied).
    Log(Arc<[u8]>),
}

/// One journal of a chain, newest first.
struct Link {
    src: Src,
    root: [u8; 32],
    applied: bool,
}

fn journal_err(label: &str, full: &Path, e: kernel_fs::OpenError) -> Error {
    match e {
        kernel_fs::OpenError::Io(e) => Error::kernel(label, full.to_path_buf(), e),
        kernel_fs::OpenError::NotRegular(kind) => Error::NotRegular {
            path: format!("{label}: journal {}", full.display()),
            kind,
        },
    }
}

/// Open the journal of file `id` at `root` (read-write where allowed: the applier marks it).
fn open_journal(fspf: &Path, id: &FileId, root: &[u8; 32], label: &str) -> Result<Option<File>> {
    let jp = store::journal_path(fspf, id, root);
    let ro = |e: &std::io::Error| {
        use rustix::io::Errno;
        [Errno::ACCESS, Errno::ROFS, Errno::PERM]
            .iter()
            .any(|x| e.raw_os_error() == Some(x.raw_os_error()))
    };
    match kernel_fs::open_regular_rw(jp.base(), jp.rel()) {
        Ok(f) => Ok(Some(f)),
        Err(kernel_fs::OpenError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(kernel_fs::OpenError::Io(e)) if ro(&e) => {
            match kernel_fs::open_regular(jp.base(), jp.rel()) {
                Ok(f) => Ok(Some(f)),
                Err(kernel_fs::OpenError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                    Ok(None)
                }
                Err(e) => Err(journal_err(label, &jp.full(), e)),
            }
        }
        Err(e) => Err(journal_err(label, &jp.full(), e)),
    }
}

/// The chain of journals that ends at `root` (newest first): each names the root it continues,
/// found among the log's journals (`log`) or as a journal file; the walk stops where that
/// journal is neither. With `all` false it also stops at the first journal applied in this
/// boot or durably (it and everything before it are applied).
/// The second value: whether the walk stopped at an applied journal. `mark`: the tree's mark
/// when the caller read it already (else it is read at the first journal of the log).
fn walk_chain(
    fspf: &Path,
    log: &LogJournals,
    id: &FileId,
    root: &[u8; 32],
    label: &str,
    all: bool,
    mut mark: Option<Mark>,
) -> Result<(Vec<Link>, bool)> {
    let boot = boot_id();
    let mut out: Vec<Link> = Vec::new();
    // Journals are applied oldest first: past an applied one, every older one is applied (the
    // tree's mark names only the newest).
    let mut seen_applied = false;
    let mut r = *root;
    loop {
        let full = || store::journal_path(fspf, id, &r).full();
        let damaged = |reason: String| Error::JournalDamaged {
            path: label.into(),
            journal: full().display().to_string(),
            reason,
        };
        if out.len() >= CHAIN_MAX || out.iter().any(|l| l.root == r) {
            return Err(damaged("its chain is cyclic or too long".into()));
        }
        let (src, prev, applied) = match log.get(id, &r) {
            Some(b) => {
                let m = *mark.get_or_insert_with(|| Mark::of_tree(fspf, id));
                let prev = b.get(72..104).and_then(nonzero);
                (Src::Log(b), prev, m.covers(boot, &r))
            }
            None => {
                let Some(file) = open_journal(fspf, id, &r, label)? else {
                    break;
                };
                let head = read_head(&file, id, &r).map_err(damaged)?;
                let applied = boot.is_some() && head.applied == boot;
                (Src::File(file), head.prev, applied)
            }
        };
        if applied && !all {
            return Ok((out, true));
        }
        seen_applied |= applied;
        out.push(Link {
            src,
            root: r,
            applied: seen_applied,
        });
        match prev {
            Some(p) => r = p,
            None => break,
        }
    }
    Ok((out, false))
}

/// Remove the journal files among `links` of file `id` (once what they hold is durable, or
/// needed by no committed state); journals of the log go with the log.
fn unlink_links(fspf: &Path, id: &FileId, links: &[Link]) {
    for l in links.iter().filter(|l| matches!(l.src, Src::File(_))) {
        let jp = store::journal_path(fspf, id, &l.root);
        let _ = kernel_fs::remove_beneath(jp.base(), jp.rel(), false);
    }
}

/// Remove the whole chain of file `id` that ends at `root`.
fn remove_chain(
    fspf: &Path,
    log: &LogJournals,
    id: &FileId,
    root: &[u8; 32],
    label: &str,
) -> Result<()> {
    unlink_links(
        fspf,
        id,
        &walk_chain(fspf, log, id, root, label, true, None)?.0,
    );
    Ok(())
}

/// Apply the journals of file `id` that lead to its committed root `root` to the data file
/// `dir`/`name` and its tree, oldest first (FORMAT.md §5b); `mode` says what happens after.
/// Returns whether journals were left in place (applied, not yet durable: [`ApplyMode::Defer`],
/// also when another process applied them).
/// A journal file's application is serialised on its own `flock`: whoever comes second finds
/// it unlinked or marked applied and does nothing. Journals of the log have no file of their
/// own: a chain with any is applied under the tree file's `flock`, walked again under it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply_chain(
    fspf: &Path,
    log: &LogJournals,
    dir: &std::os::fd::OwnedFd,
    name: &std::ffi::OsStr,
    id: &FileId,
    root: &[u8; 32],
    label: &str,
    mode: ApplyMode,
) -> Result<bool> {
    let boot = boot_id();
    let mode = match (mode, boot) {
        (ApplyMode::Defer, None) => ApplyMode::Settle,
        (m, _) => m,
    };
    let all = mode == ApplyMode::Settle;
    // Right after a commit whose record carries the chain's newest journal, that journal is
    // not applied yet (unless another process of the run applied it meanwhile, which the walk
    // under the lock sees): the walk without the lock, which would read the tree's mark through
    // a file of its own, is skipped.
    let fresh = mode == ApplyMode::Defer && log.get(id, root).is_some();
    let (mut chain, mut applied_stop) = if fresh {
        (Vec::new(), false)
    } else {
        walk_chain(fspf, log, id, root, label, all, None)?
    };
    let mut files: Option<(File, File)> = None;
    let has_log = fresh || chain.iter().any(|l| matches!(l.src, Src::Log(_)));
    // The tree's mark as read under the lock (its durable root is kept when it is rewritten).
    let mut mark = Mark::default();
    if fresh || (has_log && chain.iter().any(|l| !l.applied)) {
        let (data, tree) = open_targets(fspf, dir, name, id, label)?;
        rustix::fs::flock(&tree, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| Error::io(label, e.into()))?;
        mark = Mark::read(&tree);
        (chain, applied_stop) = walk_chain(fspf, log, id, root, label, all, Some(mark))?;
        files = Some((data, tree));
    }
    if chain.is_empty() {
        // Nothing to apply; journals applied in this boot stay in place unless settling.
        return Ok(applied_stop && mode == ApplyMode::Defer);
    }
    let mut all_marked = true;
    let mut applied_log = false;
    for l in chain.iter().rev().filter(|l| !l.applied) {
        match &l.src {
            Src::File(f) => {
                all_marked &= apply_one(fspf, dir, name, id, f, &l.root, label, boot, &mut files)?;
            }
            Src::Log(b) => {
                let full = store::journal_path(fspf, id, &l.root).full();
                let parsed =
                    parse_journal(b, id, &l.root).map_err(|reason| Error::JournalDamaged {
                        path: label.into(),
                        journal: format!("{} (in the log)", full.display()),
                        reason,
                    })?;
                apply_records(fspf, dir, name, id, &parsed, label, &mut files)?;
                applied_log = true;
            }
        }
    }
    // The tree's mark names the newest journal applied in this boot: written after the
    // writes it vouches for, in the same page cache.
    if has_log {
        let marked = match (&files, boot) {
            (Some((_, tree)), Some(b)) => Mark {
                boot: b,
                applied: *root,
                durable: mark.durable,
            }
            .write(tree),
            _ => false,
        };
        all_marked &= marked || !applied_log;
    }
    if mode == ApplyMode::Defer && all_marked {
        return Ok(true);
    }
    let (data, tree) = match files {
        Some(f) => f,
        None => open_targets(fspf, dir, name, id, label)?,
    };
    // fdatasync: the chunks, pages and lengths are what the committed root needs; the files'
    // times are not part of the state.
    data.sync_data().map_err(|e| Error::io(label, e))?;
    tree.sync_data().map_err(|e| Error::io(label, e))?;
    if has_log {
        // Written after the syncs: a mark that reaches the disk names a durable state.
        Mark {
            boot: boot.unwrap_or_default(),
            applied: *root,
            durable: *root,
        }
        .write(&tree);
    }
    // Everything up to `root` is durable: the whole chain goes (for Recover, or a Defer whose
    // journal could not be marked, the applied journals before the unapplied suffix too).
    if mode == ApplyMode::Settle {
        unlink_links(fspf, id, &chain);
    } else {
        remove_chain(fspf, log, id, root, label)?;
    }
    Ok(false)
}

fn open_targets(
    fspf: &Path,
    dir: &std::os::fd::OwnedFd,
    name: &std::ffi::OsStr,
    id: &FileId,
    label: &str,
) -> Result<(File, File)> {
    let data = kernel_fs::open_regular_rw_at(dir, name).map_err(|e| match e {
        kernel_fs::OpenError::Io(e) => Error::io(label, e),
        kernel_fs::OpenError::NotRegular(kind) => Error::NotRegular {
            path: label.into(),
            kind,
        },
    })?;
    let tree = store::open_tree_rw(fspf, id, label)?;
    Ok((data, tree))
}

/// Write a parsed journal's records to the data and tree files (opened on first use).
fn apply_records(
    fspf: &Path,
    dir: &std::os::fd::OwnedFd,
    name: &std::ffi::OsStr,
    id: &FileId,
    parsed: &Parsed<'_>,
    label: &str,
    files: &mut Option<(File, File)>,
) -> Result<()> {
    if files.is_none() {
        *files = Some(open_targets(fspf, dir, name, id, label)?);
    }
    let Some((data, tree)) = files.as_ref() else {
        return Err(Error::Other(format!("{label}: no data file")));
    };
    for r in &parsed.records {
        let res = match r {
            Record::Len(Target::Data, len) => data.set_len(*len),
            Record::Len(Target::Tree, len) => tree.set_len(*len),
            Record::Write(Target::Data, at, b) => data.write_all_at(b, *at),
            Record::Write(Target::Tree, at, b) => tree.write_all_at(b, *at),
        };
        res.map_err(|e| Error::io(label, e))?;
    }
    Ok(())
}

/// Apply one journal file `f` (of root `root`) under its `flock` and mark it applied in this
/// boot; whether it is marked (or was applied, or removed, by another process).
#[allow(clippy::too_many_arguments)]
fn apply_one(
    fspf: &Path,
    dir: &std::os::fd::OwnedFd,
    name: &std::ffi::OsStr,
    id: &FileId,
    f: &File,
    root: &[u8; 32],
    label: &str,
    boot: Option<[u8; 16]>,
    files: &mut Option<(File, File)>,
) -> Result<bool> {
    let full = store::journal_path(fspf, id, root).full();
    rustix::fs::flock(f, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| Error::io(&full, e.into()))?;
    let unlock = || {
        let _ = rustix::fs::flock(f, rustix::fs::FlockOperation::Unlock);
    };
    let st = rustix::fs::fstat(f).map_err(|e| Error::io(&full, e.into()))?;
    let damaged = |reason: String| Error::JournalDamaged {
        path: label.into(),
        journal: full.display().to_string(),
        reason,
    };
    if st.st_nlink == 0
        || boot.is_some() && read_head(f, id, root).map_err(damaged)?.applied == boot
    {
        unlock();
        return Ok(true);
    }
    let mut bytes = vec![0u8; usize::try_from(st.st_size).unwrap_or(0)];
    f.read_exact_at(&mut bytes, 0)
        .map_err(|e| Error::io(&full, e))?;
    let parsed = parse_journal(&bytes, id, root).map_err(damaged)?;
    apply_records(fspf, dir, name, id, &parsed, label, files)?;
    // The mark is a page-cache write like the application itself: one boot sees both; after a
    // restart the mark names another boot and the journal is applied again. A journal that
    // cannot be marked (a format-2 one, or one this process may only read) is not left to
    // others: the caller makes the files durable and removes the chain at once.
    let marked = match (boot, bytes.get(..8) == Some(&JOURNAL_MAGIC[..])) {
        (Some(b), true) => f.write_all_at(&b, APPLIED_AT as u64).is_ok(),
        _ => false,
    };
    unlock();
    Ok(marked)
}

/// Roots of the journal files in the chain that ends at `root` (orphan cleanup keeps them).
pub(crate) fn chain_roots(
    fspf: &Path,
    log: &LogJournals,
    id: &FileId,
    root: &[u8; 32],
) -> Vec<[u8; 32]> {
    walk_chain(fspf, log, id, root, "", true, None)
        .map(|(c, _)| c.into_iter().map(|l| l.root).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::test_volume;

    /// The committed content of `p`, read through `v` and verified.
    pub(super) fn read_all(v: &Volume, p: &EmbedPath) -> Result<Vec<u8>> {
        let mut r = v.open_file(p)?;
        let mut out = vec![0u8; r.size() as usize];
        let mut off = 0;
        while off < out.len() {
            let n = r.read_at(&mut out[off..], off as u64)?;
            assert!(n > 0);
            off += n;
        }
        Ok(out)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Stage `u` with its journal in a file, as a commit that does not carry it in a log
    /// record has it (these tests' volumes are unsealed: every commit is a checkpoint).
    fn staged(u: FileUpdate, v: &Volume) -> StagedUpdate {
        let s = u.stage(v).unwrap();
        s.materialize(&v.path).unwrap();
        s
    }

    fn commit_update(v: &mut Volume, u: FileUpdate) -> StagedUpdate {
        let s = u.stage(v).unwrap();
        let tag = v.tag();
        v.commit(vec![Change::Update(s.clone())], Some(tag))
            .unwrap();
        s
    }

    fn ep(s: &str) -> EmbedPath {
        EmbedPath::parse(s).unwrap()
    }

    /// Kernel file and tree of `/f` in the fixture's volume.
    fn files_of(d: &tempfile::TempDir, v: &Volume, p: &EmbedPath) -> (PathBuf, PathBuf) {
        let FileKind::File { id, .. } = v.lookup(p).unwrap().kind else {
            panic!()
        };
        (
            d.path().join("vol").join(&p.to_string()[1..]),
            store::tree_path(&v.path, &id).full(),
        )
    }

    /// [`files_of`] with what the two files hold now.
    fn saved_files(
        d: &tempfile::TempDir,
        v: &Volume,
        p: &EmbedPath,
    ) -> (PathBuf, PathBuf, Vec<u8>, Vec<u8>) {
        let (data, tree) = files_of(d, v, p);
        let (od, ot) = (std::fs::read(&data).unwrap(), std::fs::read(&tree).unwrap());
        (data, tree, od, ot)
    }

    /// Put the data and tree files back as they were (a lost page cache after a restart).
    fn put_back(data: &Path, tree: &Path, old_data: &[u8], old_tree: &[u8]) {
        std::fs::write(data, old_data).unwrap();
        std::fs::write(tree, old_tree).unwrap();
    }

    #[test]
    fn large_files_are_written_in_format_2_and_small_ones_in_format_1() {
        let big = pattern(100_000, 1);
        let (_d, _p, v) = test_volume(&[("/big", &big), ("/small", b"tiny")]);
        let root_of = |p: &str| match v.lookup(&ep(p)).unwrap().kind {
            FileKind::File { root, .. } => root,
            _ => panic!(),
        };
        assert!(root_of("/big").is_some());
        assert!(root_of("/small").is_none());
        assert_eq!(read_all(&v, &ep("/big")).unwrap(), big);
        assert!(v.update_file(&ep("/small")).unwrap().is_none());
    }

    /// Random writes, truncations and extensions, committed in rounds, read back equal to a
    /// plain model (tree shapes across heights: `codec::tree` tests).
    #[test]
    fn updates_read_back_like_a_plain_file() {
        let mut model = pattern(300_000, 2);
        let (_d, _p, mut v) = test_volume(&[("/f", &model)]);
        let f = ep("/f");
        let mut rng = 0x9e3779b97f4a7c15u64;
        let mut next = |m: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % m.max(1)
        };
        for round in 0..12 {
            let mut u = v.update_file(&f).unwrap().unwrap();
            for _ in 0..6 {
                match next(4) {
                    0 | 1 => {
                        let off = next(model.len() as u64 + 9000);
                        let len = 1 + next(20_000) as usize;
                        let data = pattern(len, round as u8 * 7 + 3);
                        u.write_at(&data, off).unwrap();
                        let end = off as usize + len;
                        if model.len() < end {
                            model.resize(end, 0);
                        }
                        model[off as usize..end].copy_from_slice(&data);
                    }
                    2 => {
                        let len = next(model.len() as u64 + 1);
                        u.set_len(len).unwrap();
                        model.truncate(len as usize);
                    }
                    _ => {
                        let len = model.len() as u64 + next(70_000);
                        u.set_len(len).unwrap();
                        model.resize(len as usize, 0);
                    }
                }
                let mut got = vec![0u8; model.len()];
                assert_eq!(u.read_at(&mut got, 0).unwrap(), model.len());
                assert!(
                    got == model,
                    "round {round}: the update reads what was written"
                );
            }
            commit_update(&mut v, u);
            assert!(
                read_all(&v, &f).unwrap() == model,
                "round {round} after commit"
            );
        }
        // A fresh open (new volume, no caches) reads the same.
        let (key, tag, p) = (v.key().cloned(), v.tag(), v.path.clone());
        let v2 = Volume::open(&p, key, Some(tag)).unwrap();
        assert!(read_all(&v2, &f).unwrap() == model);
    }

    /// A write that covers whole chunks (SQLite's 4 KiB pages, `randw`) needs nothing of what
    /// they held: the update neither reads nor decrypts them. Shown with a damaged chunk on
    /// disk: written over whole, the update succeeds and reads back as written; written in
    /// part, its old bytes are needed and the damage is reported.
    #[test]
    fn a_write_of_whole_chunks_read_and_decrypted_the_chunks_it_replaced() {
        let mut model = pattern(300_000, 4);
        let (d, _p, mut v) = test_volume(&[("/f", &model)]);
        let f = ep("/f");
        let c = v.update_file(&f).unwrap().unwrap().chunk_len as usize;
        let (data, _tree) = files_of(&d, &v, &f);
        let mut bytes = std::fs::read(&data).unwrap();
        for i in [3u64, 7] {
            let at = ft::chunk_offset(c as u32, i).unwrap() as usize;
            bytes[at + 40] ^= 1;
        }
        std::fs::write(&data, &bytes).unwrap();

        let mut u = v.update_file(&f).unwrap().unwrap();
        let page = pattern(c, 77);
        u.write_at(&page, 3 * c as u64).unwrap();
        // The last chunk, whole, as the file grows past it: also nothing to read.
        let tail = pattern(c + 10, 78);
        let last = (model.len() / c) as u64;
        u.write_at(&tail, last * c as u64).unwrap();
        commit_update(&mut v, u);
        model[3 * c..4 * c].copy_from_slice(&page);
        model.truncate(last as usize * c);
        model.extend_from_slice(&tail);
        let mut r = v.open_file(&f).unwrap();
        let mut got = vec![0u8; c];
        assert_eq!(r.read_at(&mut got, 3 * c as u64).unwrap(), c);
        assert!(
            got == model[3 * c..4 * c],
            "the chunk written over reads as written"
        );
        let mut got = vec![0u8; tail.len()];
        r.read_exact_at(&mut got, last * c as u64).unwrap();
        assert!(got == tail);

        // Part of the other damaged chunk: its old bytes are needed, and refused.
        let mut u = v.update_file(&f).unwrap().unwrap();
        let e = u.write_at(b"part", 7 * c as u64 + 10).unwrap_err();
        assert!(e.is_integrity(), "{e}");
    }

    #[test]
    fn a_small_update_of_a_large_file_journals_only_what_changed() {
        let big = pattern(8 << 20, 3);
        let (_d, _p, mut v) = test_volume(&[("/f", &big)]);
        let mut u = v.update_file(&ep("/f")).unwrap().unwrap();
        u.write_at(b"hello", 4_000_000).unwrap();
        let s = staged(u, &v);
        let jlen = std::fs::metadata(&s.journal).unwrap().len();
        // one 4 KiB chunk, three tree pages (levels 0..2 above 2 048 chunks: 2), headers
        assert!(jlen < 4 * 4096 + 1024, "journal of {jlen} bytes");
        let mut u = v.update_file(&ep("/f")).unwrap().unwrap();
        u.write_at(b"line\n", 8 << 20).unwrap();
        let s2 = staged(u, &v);
        let jlen = std::fs::metadata(&s2.journal).unwrap().len();
        assert!(jlen < 4 * 4096 + 1024, "append journal of {jlen} bytes");
        s2.discard();
        let tag = v.tag();
        v.commit(vec![Change::Update(s)], Some(tag)).unwrap();
        let mut want = big.clone();
        want[4_000_000..4_000_005].copy_from_slice(b"hello");
        assert!(read_all(&v, &ep("/f")).unwrap() == want);
    }

    /// An append's chunks are written once, in place, by the commit: the journal holds only
    /// the rewritten last chunk and the tree pages, whatever the size of the append.
    #[test]
    fn an_append_was_written_twice_through_the_journal() {
        let big = pattern((2 << 20) + 100, 5);
        let (d, _p, mut v) = test_volume(&[("/f", &big)]);
        let tail = pattern(3 << 20, 9);
        let mut u = v.update_file(&ep("/f")).unwrap().unwrap();
        u.write_at(&tail, big.len() as u64).unwrap();
        let s = staged(u, &v);
        let jlen = std::fs::metadata(&s.journal).unwrap().len();
        // (The last old chunk, and the tree pages: about one per 128 new chunks.)
        assert!(
            jlen < tail.len() as u64 / 50,
            "journal of {jlen} bytes for a 3 MiB append"
        );
        let tag = v.tag();
        v.commit(vec![Change::Update(s)], Some(tag)).unwrap();
        let mut want = big.clone();
        want.extend_from_slice(&tail);
        assert!(read_all(&v, &ep("/f")).unwrap() == want);
        let (data, _) = files_of(&d, &v, &ep("/f"));
        assert_eq!(
            std::fs::metadata(&data).unwrap().len(),
            ft::data_len(want.len() as u64).unwrap()
        );
        let v2 = Volume::open(&v.path, v.key.clone(), Some(v.tag())).unwrap();
        assert!(read_all(&v2, &ep("/f")).unwrap() == want, "reopened");
    }

    /// A commit that wrote its appended chunks and stopped before its commit point leaves a
    /// data file longer than the committed state: it reads as that state, and the next update
    /// writes over the leftovers.
    #[test]
    fn chunks_appended_by_a_commit_that_stopped_before_its_commit_point_are_ignored() {
        let big = pattern((1 << 20) + 10, 6);
        let (d, _p, mut v) = test_volume(&[("/f", &big)]);
        let (data, _) = files_of(&d, &v, &ep("/f"));
        let mut u = v.update_file(&ep("/f")).unwrap().unwrap();
        u.write_at(&pattern(1 << 20, 1), big.len() as u64).unwrap();
        let s = staged(u, &v);
        let loc = std::fs::File::open(data.parent().unwrap()).unwrap();
        let dir: std::os::fd::OwnedFd = loc.into();
        let name = data.file_name().unwrap().to_owned();
        s.write_direct(&v.path, Some((&dir, &name))).unwrap();
        s.discard();
        assert!(std::fs::metadata(&data).unwrap().len() > ft::data_len(big.len() as u64).unwrap());
        let v2 = Volume::open(&v.path, v.key.clone(), Some(v.tag())).unwrap();
        assert!(
            read_all(&v2, &ep("/f")).unwrap() == big,
            "the committed state"
        );
        let mut u = v.update_file(&ep("/f")).unwrap().unwrap();
        u.write_at(b"after", big.len() as u64).unwrap();
        commit_update(&mut v, u);
        let mut want = big.clone();
        want.extend_from_slice(b"after");
        assert!(read_all(&v, &ep("/f")).unwrap() == want);
        assert_eq!(
            std::fs::metadata(&data).unwrap().len(),
            ft::data_len(want.len() as u64).unwrap(),
            "the leftovers are cut"
        );
    }

    /// When the data file is not where the update's path says at the commit, the appended
    /// chunks go to the journal, and the open that rolls the file forward writes them.
    #[test]
    fn appended_chunks_of_a_file_not_found_at_its_path_go_to_the_journal() {
        let big = pattern((1 << 20) + 10, 7);
        let (_d, _p, mut v) = test_volume(&[("/f", &big)]);
        let tail = pattern(200_000, 2);
        let mut u = v.update_file(&ep("/f")).unwrap().unwrap();
        u.write_at(&tail, big.len() as u64).unwrap();
        let s = staged(u, &v);
        let before = std::fs::metadata(&s.journal).unwrap().len();
        s.write_direct(&v.path, None).unwrap();
        let after = std::fs::metadata(&s.journal).unwrap().len();
        assert!(
            after > before + tail.len() as u64 - 4096,
            "{before} -> {after}"
        );
        let tag = v.tag();
        v.commit(vec![Change::Update(s)], Some(tag)).unwrap();
        let mut want = big.clone();
        want.extend_from_slice(&tail);
        assert!(read_all(&v, &ep("/f")).unwrap() == want);
    }

    /// P9: a crash before the commit point leaves the old state; after it (journal written,
    /// not or partly applied), the next open applies it and reads the new state.
    #[test]
    fn a_crash_before_or_after_the_commit_point_reads_one_committed_state() {
        let old = pattern(200_000, 4);
        let (d, _p, mut v) = test_volume(&[("/f", &old)]);
        let f = ep("/f");
        let (data, tree, old_data, old_tree) = saved_files(&d, &v, &f);
        let mut u = v.update_file(&f).unwrap().unwrap();
        u.write_at(&pattern(10_000, 9), 150_000).unwrap();
        u.write_at(b"tail", 250_000).unwrap();
        let mut new = old.clone();
        new[150_000..160_000].copy_from_slice(&pattern(10_000, 9));
        new.resize(250_004, 0);
        new[250_000..].copy_from_slice(b"tail");
        // Staged, not committed: the journal exists, nothing else changed.
        let s = staged(u, &v);
        assert!(s.journal.exists());
        assert_eq!(std::fs::read(&data).unwrap(), old_data);
        assert!(read_all(&v, &f).unwrap() == old);
        let journal = std::fs::read(&s.journal).unwrap();
        let tag = v.tag();
        v.commit(vec![Change::Update(s.clone())], Some(tag))
            .unwrap();
        // Applied, marked with this boot's id, kept until the file is settled.
        let marked = std::fs::read(&s.journal).unwrap();
        assert_eq!(&marked[8..24], &boot_id().unwrap()[..]);
        assert_eq!(&marked[..8], &journal[..8]);
        v.settle_journals().unwrap();
        assert!(!s.journal.exists(), "settled and removed");
        let (new_data, new_tree) = (std::fs::read(&data).unwrap(), std::fs::read(&tree).unwrap());
        // Crash after the commit point, before the journal was applied, or half way: the
        // appended chunks were made durable before the commit point (FORMAT.md §5b).
        for half in [false, true] {
            let mut d0 = old_data.clone();
            assert!(!s.direct.0.is_empty(), "the append past the end is direct");
            for (at, b) in &s.direct.0 {
                let (at, end) = (*at as usize, *at as usize + b.len());
                d0.resize(d0.len().max(end), 0);
                d0[at..end].copy_from_slice(b);
            }
            if half {
                let k = d0.len().min(new_data.len()) / 2;
                d0[..k].copy_from_slice(&new_data[..k]);
            }
            std::fs::write(&data, &d0).unwrap();
            std::fs::write(&tree, &old_tree).unwrap();
            std::fs::write(&s.journal, &journal).unwrap();
            assert!(
                read_all(&v, &f).unwrap() == new,
                "rolled forward (half = {half})"
            );
            assert!(!s.journal.exists());
            assert_eq!(std::fs::read(&tree).unwrap(), new_tree);
        }
    }

    #[test]
    fn a_chunk_or_tree_rolled_back_or_a_damaged_journal_is_detected() {
        let old = pattern(200_000, 5);
        let (d, _p, mut v) = test_volume(&[("/f", &old)]);
        let f = ep("/f");
        let (data, tree, old_data, old_tree) = saved_files(&d, &v, &f);
        let mut u = v.update_file(&f).unwrap().unwrap();
        u.write_at(b"new bytes", 8192).unwrap();
        let s = commit_update(&mut v, u);
        let (new_data, new_tree) = (std::fs::read(&data).unwrap(), std::fs::read(&tree).unwrap());
        // One chunk (chunk 2) spliced back from before the update.
        let mut d1 = new_data.clone();
        d1[24 + 8192..24 + 12288].copy_from_slice(&old_data[24 + 8192..24 + 12288]);
        std::fs::write(&data, &d1).unwrap();
        assert!(matches!(
            read_all(&v, &f),
            Err(Error::ChunkAuth { chunk: 2, .. })
        ));
        // The whole tree rolled back with the chunk: the root no longer matches.
        put_back(&data, &tree, &old_data, &old_tree);
        assert!(matches!(read_all(&v, &f), Err(Error::TreeAuth { .. })));
        // A journal that was tampered with is refused, and nothing is applied.
        let mut j = Journal::new(s.id, None);
        j.set_len(Target::Data, 1);
        let mut bytes = j.encode(&s.root());
        let k = bytes.len() - 40;
        bytes[k] ^= 1;
        std::fs::write(&s.journal, &bytes).unwrap();
        assert!(matches!(
            read_all(&v, &f),
            Err(Error::JournalDamaged { .. })
        ));
        assert_eq!(std::fs::read(&data).unwrap(), old_data);
        std::fs::remove_file(&s.journal).unwrap();
        // A journal of an older state put back is not applied (its root is not the entry's).
        std::fs::write(&data, &new_data).unwrap();
        std::fs::write(&tree, &new_tree).unwrap();
        let mut u = v.update_file(&f).unwrap().unwrap();
        u.write_at(b"second", 0).unwrap();
        let s2 = staged(u, &v);
        let stale = std::fs::read(&s2.journal).unwrap();
        let tag = v.tag();
        v.commit(vec![Change::Update(s2.clone())], Some(tag))
            .unwrap();
        let mut u = v.update_file(&f).unwrap().unwrap();
        u.write_at(b"third", 0).unwrap();
        commit_update(&mut v, u);
        std::fs::write(&s2.journal, &stale).unwrap();
        let got = read_all(&v, &f).unwrap();
        assert_eq!(&got[..5], b"third");
        assert!(
            s2.journal.exists(),
            "a journal of a root no entry has is left alone"
        );
    }

    /// A [`Helper`] for tests that counts its lends: the job on a scoped thread of its own (as
    /// concurrent as the shield's lent thread); `busy` refuses every job, as a helper in use
    /// does.
    struct TestHelper {
        busy: bool,
        lent: std::sync::atomic::AtomicUsize,
    }

    impl crate::codec::Helper for TestHelper {
        fn run_beside(&self, job: &mut (dyn FnMut() + Send), own: &mut dyn FnMut()) -> bool {
            if self.busy {
                return false;
            }
            self.lent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            crate::codec::ScopedThread.run_beside(job, own)
        }
    }

    static LENDS: TestHelper = TestHelper {
        busy: false,
        lent: std::sync::atomic::AtomicUsize::new(0),
    };
    static BUSY: TestHelper = TestHelper {
        busy: true,
        lent: std::sync::atomic::AtomicUsize::new(0),
    };

    /// Large reads of a format-2 file with a lent helper thread (the shield's), one that is
    /// busy, and none: each reads the file, and a flipped chunk in the first or the second half
    /// of a read fails it with that chunk, leaving neither its ciphertext nor the chunks after it
    /// in the caller's buffer (the ciphertext is read into it and opened in place).
    #[test]
    fn large_reads_with_a_lent_helper_read_the_file_and_refuse_a_flipped_chunk_in_either_half() {
        use crate::codec::{HelperRef, Threads};
        let len = (3 << 20) + 1234;
        let plain = pattern(len, 11);
        let (d, _p, v) = test_volume(&[("/f", &plain)]);
        let f = ep("/f");
        let (data, _) = files_of(&d, &v, &f);
        let helpers = [Some(HelperRef(&LENDS)), Some(HelperRef(&BUSY)), None];
        let threads = |h| Threads {
            helper: h,
            ..Threads::FORK_SAFE
        };
        for h in helpers {
            let mut r = v.open_file(&f).unwrap();
            r.set_threads(threads(h));
            for step in [256 << 10, 1 << 20, 3 << 20, len] {
                let got = r.read_in_steps(step).unwrap();
                assert!(got == plain, "{h:?}, reads of {step}");
            }
        }
        assert!(LENDS.lent.load(std::sync::atomic::Ordering::Relaxed) > 0);
        let good = std::fs::read(&data).unwrap();
        // A 1 MiB read at 1 MiB: chunks 256..512; its halves are 256..384 and 384..512.
        for bad in [300u64, 400] {
            let mut flipped = good.clone();
            flipped[crate::format::tree::chunk_offset(4096, bad).unwrap() as usize + 7] ^= 1;
            std::fs::write(&data, &flipped).unwrap();
            for h in helpers {
                let mut r = v.open_file(&f).unwrap();
                r.set_threads(threads(h));
                let mut buf = vec![0xAAu8; 1 << 20];
                let e = r.read_at(&mut buf, 1 << 20).unwrap_err();
                assert!(
                    matches!(e, Error::ChunkAuth { chunk, .. } if chunk == bad),
                    "{h:?}: {e}"
                );
                let from = (bad as usize - 256) * 4096;
                assert!(
                    buf[from..from + 4096].iter().all(|&b| b == 0),
                    "{h:?}: the flipped chunk is zeroed"
                );
                let half_end = if bad < 384 { 128 * 4096 } else { 1 << 20 };
                assert!(
                    buf[from..half_end].iter().all(|&b| b == 0),
                    "{h:?}: the chunks after it in its half are zeroed"
                );
                assert!(
                    buf[..from] == plain[(1 << 20)..(1 << 20) + from],
                    "{h:?}: the chunks before it are plaintext"
                );
            }
        }
        std::fs::write(&data, &good).unwrap();
    }

    #[test]
    fn an_uncommitted_journal_is_an_orphan_and_a_committed_one_is_not() {
        let big = pattern(100_000, 10);
        let (_d, p, mut v) = test_volume(&[("/f", &big)]);
        let f = ep("/f");
        let mut u = v.update_file(&f).unwrap().unwrap();
        u.write_at(b"x", 1).unwrap();
        let lost = staged(u, &v);
        let lost_path = lost.journal.clone();
        drop(lost); // a writer that died before its commit
        let orphans = v.orphans();
        assert!(orphans
            .iter()
            .any(|o| o.kind == crate::volume::OrphanKind::Journal && o.disk.full() == lost_path));
        let lock = Volume::lock(&p).unwrap();
        let report = v.clean_orphans(&lock).unwrap();
        drop(lock);
        assert!(report.removed.contains(&lost_path), "{report:?}");
        // A committed entry's journal left by a crash is not an orphan: it is applied on open.
        let mut u = v.update_file(&f).unwrap().unwrap();
        u.write_at(b"y", 2).unwrap();
        let s = commit_update(&mut v, u);
        std::fs::write(&s.journal, b"left by a crash").unwrap();
        assert!(!v.orphans().iter().any(|o| o.disk.full() == s.journal));
        std::fs::remove_file(&s.journal).unwrap();
    }

    /// SQLite rewrites pages with the bytes they hold: the shield's comparison then finds
    /// nothing changed, and staging the empty update panicked (no top page was rewritten).
    #[test]
    fn an_update_that_changed_nothing_panicked() {
        let big = pattern(100_000, 11);
        let (_d, _p, mut v) = test_volume(&[("/f", &big)]);
        let f = ep("/f");
        let mut u = v.update_file(&f).unwrap().unwrap();
        u.write_at(&big[5000..6000], 5000).unwrap();
        u.set_len(100_000).unwrap();
        commit_update(&mut v, u);
        assert!(read_all(&v, &f).unwrap() == big);
        // An update with no writes at all (what the comparison stages): the same root.
        let u = v.update_file(&f).unwrap().unwrap();
        let s = commit_update(&mut v, u);
        assert_eq!(s.root(), s.base_root, "nothing changed: the same root");
        assert!(read_all(&v, &f).unwrap() == big);
    }

    /// Journals of `f` in the volume's tree directory.
    fn journals(v: &Volume) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = std::fs::read_dir(v.tree_dir())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "journal"))
            .collect();
        out.sort();
        out
    }

    /// What a restart does to an applied journal: its mark names another boot.
    fn forget_marks(v: &Volume) {
        for j in journals(v) {
            let mut b = std::fs::read(&j).unwrap();
            b[8..24].copy_from_slice(&[0xee; 16]);
            std::fs::write(&j, &b).unwrap();
        }
    }

    /// The data and tree writes after the commit point are not synced at once: a chain of
    /// applied journals stays, and after a restart (the page cache lost: the files as they
    /// were before the chain) the chain is applied again, oldest first.
    #[test]
    fn applied_journals_are_kept_until_settled_and_replayed_in_order_after_a_restart() {
        let mut model = pattern(300_000, 21);
        let (d, _p, mut v) = test_volume(&[("/f", &model)]);
        let f = ep("/f");
        let (data, tree, old_data, old_tree) = saved_files(&d, &v, &f);
        // Overlapping writes (later ones must win) and a cut inside the file (journaled).
        let steps: [(usize, usize, u8); 4] = [
            (10_000, 9_000, 1),
            (14_000, 4_096, 2),
            (200_000, 50_000, 3),
            (12_000, 3_000, 4),
        ];
        for (at, len, seed) in steps {
            let mut u = v.update_file(&f).unwrap().unwrap();
            let b = pattern(len, seed);
            u.write_at(&b, at as u64).unwrap();
            model[at..at + len].copy_from_slice(&b);
            commit_update(&mut v, u);
        }
        let mut u = v.update_file(&f).unwrap().unwrap();
        u.set_len(250_001).unwrap();
        model.truncate(250_001);
        commit_update(&mut v, u);
        assert_eq!(journals(&v).len(), 5, "one applied journal per update");
        assert!(read_all(&v, &f).unwrap() == model);
        // A restart: the files as before the first update, the marks of another boot.
        put_back(&data, &tree, &old_data, &old_tree);
        forget_marks(&v);
        assert!(read_all(&v, &f).unwrap() == model, "the chain replayed");
        assert!(journals(&v).is_empty(), "replayed, made durable, removed");
        // Settling makes the files durable and removes the chain.
        let mut u = v.update_file(&f).unwrap().unwrap();
        u.write_at(b"x", 5).unwrap();
        model[5] = b'x';
        commit_update(&mut v, u);
        assert_eq!(journals(&v).len(), 1);
        v.settle_journals().unwrap();
        assert!(journals(&v).is_empty());
        assert!(read_all(&v, &f).unwrap() == model);
    }

    /// An overwrite journals the chunk and the tree entries that changed (32 bytes per level),
    /// not whole 4 KiB pages; replayed over the committed files it gives the new state.
    #[test]
    fn an_overwrite_journals_the_changed_tree_entries_not_whole_pages() {
        let mut model = pattern(2_000_000, 27);
        let (d, _p, mut v) = test_volume(&[("/f", &model)]);
        let f = ep("/f");
        let (data, tree, old_data, old_tree) = saved_files(&d, &v, &f);
        let mut u = v.update_file(&f).unwrap().unwrap();
        u.write_at(b"0123456789", 1_000_000).unwrap();
        model[1_000_000..1_000_010].copy_from_slice(b"0123456789");
        let s = commit_update(&mut v, u);
        // Two levels (489 chunks): the chunk, and one 32-byte entry in each of two pages.
        let chunk = 4096 + 17;
        let entries = 2 * (32 + 17);
        assert!(
            s.journal_len <= (HEAD3 + 2 * 17 + chunk + entries + 32) as u64,
            "journal of {} bytes",
            s.journal_len
        );
        put_back(&data, &tree, &old_data, &old_tree);
        forget_marks(&v);
        assert!(read_all(&v, &f).unwrap() == model);
    }

    /// More than [`SETTLE_EACH_MAX`] files with applied journals are settled with one `syncfs`:
    /// afterwards no journal is left and every file reads its committed content.
    #[test]
    fn many_files_with_applied_journals_are_settled_together() {
        let n = SETTLE_EACH_MAX + 4;
        let mut models: Vec<Vec<u8>> = (0..n).map(|k| pattern(100_000, k as u8)).collect();
        let names: Vec<String> = (0..n).map(|k| format!("/f{k}")).collect();
        let files: Vec<(&str, &[u8])> = names
            .iter()
            .zip(&models)
            .map(|(p, m)| (p.as_str(), m.as_slice()))
            .collect();
        let (_d, _p, mut v) = test_volume(&files);
        for (k, name) in names.iter().enumerate() {
            let mut u = v.update_file(&ep(name)).unwrap().unwrap();
            u.write_at(b"settled", 50_000).unwrap();
            models[k][50_000..50_007].copy_from_slice(b"settled");
            commit_update(&mut v, u);
        }
        assert_eq!(journals(&v).len(), n);
        v.settle_journals().unwrap();
        assert!(journals(&v).is_empty());
        for (name, m) in names.iter().zip(&models) {
            assert!(read_all(&v, &ep(name)).unwrap() == *m, "{name}");
        }
    }

    /// An append that adds a chunk and a tree level journals the entries of its new pages, not
    /// the pages; replayed over the committed tree it gives the new tree.
    #[test]
    fn an_append_that_grows_the_tree_journals_entries_not_pages() {
        let mut model = pattern(128 * 4096, 28);
        let (d, _p, mut v) = test_volume(&[("/f", &model)]);
        let f = ep("/f");
        let (_data, tree) = files_of(&d, &v, &f);
        let old_tree = std::fs::read(&tree).unwrap();
        assert_eq!(old_tree.len(), 4096, "one page");
        let mut u = v.update_file(&f).unwrap().unwrap();
        u.write_at(b"line\n", model.len() as u64).unwrap();
        model.extend_from_slice(b"line\n");
        let s = commit_update(&mut v, u);
        // Pages: level 0 page 1 (one entry) and the new top (two entries), both past the
        // committed end: 3 entries and record headers, where whole pages were 8 KiB.
        assert!(s.journal_len < 600, "journal of {} bytes", s.journal_len);
        let new_tree = std::fs::read(&tree).unwrap();
        assert_eq!(new_tree.len(), 3 * 4096);
        // A restart before the tree's pages were written back: the committed (old) tree, or one
        // with bytes past its committed end, replayed to exactly the new tree.
        let journal = std::fs::read(&s.journal).unwrap();
        for leftover in [0usize, 9000] {
            let mut t = old_tree.clone();
            t.resize(4096 + leftover, 0xAB);
            std::fs::write(&tree, &t).unwrap();
            std::fs::write(&s.journal, &journal).unwrap();
            forget_marks(&v);
            assert!(read_all(&v, &f).unwrap() == model, "leftover {leftover}");
            assert!(
                std::fs::read(&tree).unwrap() == new_tree,
                "leftover {leftover}"
            );
        }
    }

    /// A chain replayed after a restart must not cut or overwrite chunks that a later update
    /// wrote in place before its commit point: such an update ends the chain first.
    #[test]
    fn an_append_after_a_cut_was_lost_when_an_older_chain_was_replayed() {
        let mut model = pattern(300_000, 22);
        let (_d, _p, mut v) = test_volume(&[("/f", &model)]);
        let f = ep("/f");
        let mut u = v.update_file(&f).unwrap().unwrap();
        u.write_at(&pattern(4096, 7), 290_000).unwrap();
        model[290_000..294_096].copy_from_slice(&pattern(4096, 7));
        commit_update(&mut v, u);
        let mut u = v.update_file(&f).unwrap().unwrap();
        u.set_len(100_000).unwrap();
        model.truncate(100_000);
        commit_update(&mut v, u);
        assert_eq!(journals(&v).len(), 2);
        // The append's chunks go in place (past the committed end): the chain is settled.
        let mut u = v.update_file(&f).unwrap().unwrap();
        let tail = pattern(200_000, 8);
        u.write_at(&tail, 100_000).unwrap();
        model.extend_from_slice(&tail);
        let s = staged(u, &v);
        assert!(!s.direct.0.is_empty());
        assert!(
            journals(&v) == vec![s.journal.clone()],
            "the older chain is gone"
        );
        let tag = v.tag();
        v.commit(vec![Change::Update(s)], Some(tag)).unwrap();
        // A restart replays only the append's journal, which starts a chain.
        forget_marks(&v);
        assert!(read_all(&v, &f).unwrap() == model);
    }

    #[test]
    fn a_volume_keeps_at_most_pending_max_journals_per_file() {
        let mut model = pattern(300_000, 23);
        let (_d, _p, mut v) = test_volume(&[("/f", &model)]);
        let f = ep("/f");
        for k in 0..(PENDING_MAX as usize + 6) {
            let mut u = v.update_file(&f).unwrap().unwrap();
            let at = (k * 4096) % 290_000;
            u.write_at(&[k as u8; 100], at as u64).unwrap();
            model[at..at + 100].fill(k as u8);
            commit_update(&mut v, u);
            assert!(journals(&v).len() <= PENDING_MAX as usize);
        }
        forget_marks(&v);
        assert!(read_all(&v, &f).unwrap() == model);
    }

    /// A format-2 journal (written by older writers, left by a crash after its commit point) is
    /// still applied by the next open.
    #[test]
    fn a_format_2_journal_left_by_an_older_writer_is_applied() {
        let old = pattern(300_000, 26);
        let (d, _p, mut v) = test_volume(&[("/f", &old)]);
        let f = ep("/f");
        let (data, tree, old_data, old_tree) = saved_files(&d, &v, &f);
        let mut u = v.update_file(&f).unwrap().unwrap();
        u.write_at(&pattern(9000, 3), 20_000).unwrap();
        let mut new = old.clone();
        new[20_000..29_000].copy_from_slice(&pattern(9000, 3));
        let s = staged(u, &v);
        let v3 = std::fs::read(&s.journal).unwrap();
        let tag = v.tag();
        v.commit(vec![Change::Update(s.clone())], Some(tag))
            .unwrap();
        v.settle_journals().unwrap();
        // The same records in format 2: magic, id, root, count, records, BLAKE3 of all that.
        let mut v2 = JOURNAL_MAGIC_V2.to_vec();
        v2.extend_from_slice(&v3[24..72]);
        v2.extend_from_slice(&v3[HEAD3 - 8..v3.len() - 32]);
        let sum = blake3::hash(&v2);
        v2.extend_from_slice(sum.as_bytes());
        put_back(&data, &tree, &old_data, &old_tree);
        std::fs::write(&s.journal, &v2).unwrap();
        assert!(read_all(&v, &f).unwrap() == new);
        assert!(!s.journal.exists());
    }

    /// An update that changed nothing has the committed root, so its journal had the committed
    /// state's name: staging it replaced the committed journal (a kill in between left it empty:
    /// "journal damaged", found by the crash loop), and discarding it removed that journal.
    #[test]
    fn an_update_that_changed_nothing_replaced_the_committed_journal() {
        let mut model = pattern(300_000, 29);
        let (d, _p, mut v) = test_volume(&[("/f", &model)]);
        let f = ep("/f");
        let (data, tree, old_data, old_tree) = saved_files(&d, &v, &f);
        let mut u = v.update_file(&f).unwrap().unwrap();
        u.write_at(b"kept", 70_000).unwrap();
        model[70_000..70_004].copy_from_slice(b"kept");
        let s1 = commit_update(&mut v, u);
        let committed = std::fs::read(&s1.journal).unwrap();
        // Nothing written: the same root, no journal of its own.
        let s2 = staged(v.update_file(&f).unwrap().unwrap(), &v);
        assert_eq!(s2.root(), s1.root());
        assert_eq!(std::fs::read(&s1.journal).unwrap(), committed, "untouched");
        s2.discard();
        assert_eq!(
            std::fs::read(&s1.journal).unwrap(),
            committed,
            "not removed"
        );
        // Committed too, it leaves the chain as it was: a restart still replays it.
        let tag = v.tag();
        v.commit(vec![Change::Update(s2)], Some(tag)).unwrap();
        put_back(&data, &tree, &old_data, &old_tree);
        forget_marks(&v);
        assert!(read_all(&v, &f).unwrap() == model);
    }

    /// A file updated in place and then replaced by a whole new version (or removed) left its
    /// applied journals behind for good: the commit that drops a version drops them.
    #[test]
    fn applied_journals_of_a_replaced_or_removed_file_were_left_behind() {
        let model = pattern(300_000, 30);
        let (_d, _p, mut v) = test_volume(&[("/f", &model), ("/g", &model)]);
        for name in ["/f", "/g"] {
            let mut u = v.update_file(&ep(name)).unwrap().unwrap();
            u.write_at(b"x", 10).unwrap();
            commit_update(&mut v, u);
        }
        assert_eq!(journals(&v).len(), 2);
        let s = v.stage_file(&ep("/f"), 3, 0o644, &mut &b"new"[..]).unwrap();
        let tag = v.tag();
        v.commit(vec![Change::Put(s), Change::Remove(ep("/g"))], Some(tag))
            .unwrap();
        assert!(journals(&v).is_empty(), "{:?}", journals(&v));
        assert_eq!(read_all(&v, &ep("/f")).unwrap(), b"new");
    }

    /// Journals are untrusted: a chain whose links loop is refused, not walked forever.
    #[test]
    fn a_journal_chain_that_loops_is_refused() {
        let model = pattern(300_000, 24);
        let (_d, _p, mut v) = test_volume(&[("/f", &model)]);
        let f = ep("/f");
        let mut u = v.update_file(&f).unwrap().unwrap();
        u.write_at(b"abc", 7).unwrap();
        let s = commit_update(&mut v, u);
        // Rewritten to continue itself, unmarked (checksums are unkeyed: anyone can).
        let mut j = Journal::new(s.id, Some(s.root()));
        j.set_len(Target::Data, 1);
        std::fs::write(&s.journal, j.encode(&s.root())).unwrap();
        assert!(matches!(
            read_all(&v, &f),
            Err(Error::JournalDamaged { .. })
        ));
    }

    /// Orphan cleanup removes journals no committed root reaches, never a chain's.
    #[test]
    fn orphan_cleanup_keeps_the_applied_journals_of_a_chain() {
        let mut model = pattern(300_000, 25);
        let (_d, _p, mut v) = test_volume(&[("/f", &model)]);
        let f = ep("/f");
        for k in 0..3u8 {
            let mut u = v.update_file(&f).unwrap().unwrap();
            u.write_at(&[k; 10], 1000 * u64::from(k)).unwrap();
            model[1000 * k as usize..1000 * k as usize + 10].fill(k);
            commit_update(&mut v, u);
        }
        let before = journals(&v);
        assert_eq!(before.len(), 3);
        let orphan = v.tree_dir().join(format!(
            "{}.{}.journal",
            hex::encode([1u8; 16]),
            hex::encode([2u8; 32])
        ));
        std::fs::write(&orphan, b"junk").unwrap();
        let lock = Volume::lock(&v.path).unwrap();
        v.clean_orphans(&lock).unwrap();
        assert!(journals(&v) == before, "the chain stays, the orphan goes");
        forget_marks(&v);
        assert!(read_all(&v, &f).unwrap() == model);
    }

    #[test]
    fn a_format_2_file_swapped_for_a_format_1_file_is_refused() {
        let big = pattern(100_000, 6);
        let (d, _p, v) = test_volume(&[("/v2", &big)]);
        let (data, _) = files_of(&d, &v, &ep("/v2"));
        let mut b = std::fs::read(&data).unwrap();
        b[5] = 1; // "fspfE\x01": claims format 1
        std::fs::write(&data, &b).unwrap();
        assert!(matches!(
            read_all(&v, &ep("/v2")),
            Err(Error::HeaderMismatch { .. })
        ));
    }

    #[test]
    fn a_second_update_from_the_same_base_is_refused_and_leaves_no_journal() {
        let big = pattern(100_000, 7);
        let (_d, _p, mut v) = test_volume(&[("/f", &big)]);
        let f = ep("/f");
        let mut a = v.update_file(&f).unwrap().unwrap();
        let mut b = v.update_file(&f).unwrap().unwrap();
        a.write_at(b"aaaa", 10).unwrap();
        b.write_at(b"bbbb", 99_000).unwrap();
        let sa = staged(a, &v);
        let sb = staged(b, &v);
        let tag = v.tag();
        v.commit(vec![Change::Update(sa)], Some(tag)).unwrap();
        let tag = v.tag();
        let e = v
            .commit(vec![Change::Update(sb.clone())], Some(tag))
            .unwrap_err();
        assert!(matches!(e, Error::UpdateConflict { .. }), "{e}");
        assert!(!sb.journal.exists());
        assert_eq!(&read_all(&v, &f).unwrap()[10..14], b"aaaa");
    }

    /// P8: every seal draws a fresh epoch, so a chunk sealed again (after any number of
    /// updates, crashes or rollbacks) is never sealed under a (key, nonce) used before.
    #[test]
    fn every_update_seals_under_a_fresh_epoch_key() {
        let big = pattern(100_000, 8);
        let (d, _p, mut v) = test_volume(&[("/f", &big)]);
        let f = ep("/f");
        let mut epochs = std::collections::HashSet::new();
        for i in 0..20u8 {
            let mut u = v.update_file(&f).unwrap().unwrap();
            u.write_at(&[i], 5).unwrap();
            // The same chunk staged and dropped (a crash before the commit) and staged again.
            let dropped = staged(u, &v);
            dropped.discard();
            let mut u = v.update_file(&f).unwrap().unwrap();
            u.write_at(&[i], 5).unwrap();
            commit_update(&mut v, u);
            let (_, tree) = files_of(&d, &v, &f);
            let t = std::fs::read(&tree).unwrap();
            let FileKind::File {
                root: Some(root),
                size,
                id,
            } = v.lookup(&f).unwrap().kind
            else {
                panic!()
            };
            let key = v.region_for(&f).unwrap().key.clone().unwrap();
            let mut r = ct::TreeReader::new(
                crypto::tree_key(&key, &id).unwrap(),
                root,
                size,
                4096,
                t,
                "t".into(),
            )
            .unwrap();
            assert!(epochs.insert(r.entry(0).unwrap().epoch), "epoch reused");
        }
    }
}

/// Journals carried by log records (FORMAT.md §5b, "Journals in the log"): a sealed volume
/// that commits through the log, as the frontends do.
#[cfg(test)]
mod log_journal_tests {
    use super::*;
    use crate::volume::log::log_path;
    use crate::volume::test_volume;

    fn ep(s: &str) -> EmbedPath {
        EmbedPath::parse(s).unwrap()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
            .collect()
    }

    struct Fx {
        d: tempfile::TempDir,
        p: PathBuf,
        key: crate::crypto::VolumeKey,
    }

    impl Fx {
        /// `/f` holding `data` in a sealed volume that commits through the log.
        fn new(data: &[u8]) -> (Fx, Volume) {
            let (d, p, mut v) = test_volume(&[("/f", data)]);
            let (t, key) = v.encrypt().unwrap();
            let fx = Fx { d, p, key };
            let v = fx.open(t);
            (fx, v)
        }
        fn open(&self, t: crate::Tag) -> Volume {
            let mut v = Volume::open(&self.p, Some(self.key.clone()), Some(t)).unwrap();
            let mut o = v.options();
            o.log = true;
            v.set_options(o);
            v
        }
        fn data(&self) -> PathBuf {
            self.d.path().join("vol/f")
        }
        fn tree(&self, v: &Volume) -> PathBuf {
            let FileKind::File { id, .. } = v.lookup(&ep("/f")).unwrap().kind else {
                panic!()
            };
            store::tree_path(&v.path, &id).full()
        }
        /// The data and tree files of `/f` as they are now.
        fn files(&self, v: &Volume) -> (Vec<u8>, Vec<u8>) {
            (
                std::fs::read(self.data()).unwrap(),
                std::fs::read(self.tree(v)).unwrap(),
            )
        }
        /// Put the data and tree files of `/f` back as `old` (what a lost page cache, or a
        /// kill before the application, leaves).
        fn restore(&self, v: &Volume, old: &(Vec<u8>, Vec<u8>)) {
            std::fs::write(self.data(), &old.0).unwrap();
            std::fs::write(self.tree(v), &old.1).unwrap();
        }
        /// `v` dropped and the volume opened again at its tag (another process).
        fn reopen(&self, v: Volume) -> Volume {
            let t = v.tag();
            drop(v);
            self.open(t)
        }
        fn journal_files(&self, v: &Volume) -> usize {
            std::fs::read_dir(v.tree_dir())
                .unwrap()
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "journal"))
                .count()
        }
    }

    fn read_all(v: &Volume) -> Result<Vec<u8>> {
        super::tests::read_all(v, &ep("/f"))
    }

    fn update(v: &mut Volume, model: &mut Vec<u8>, at: usize, bytes: &[u8]) -> StagedUpdate {
        let mut u = v.update_file(&ep("/f")).unwrap().unwrap();
        u.write_at(bytes, at as u64).unwrap();
        if model.len() < at + bytes.len() {
            model.resize(at + bytes.len(), 0);
        }
        model[at..at + bytes.len()].copy_from_slice(bytes);
        let s = u.stage(v).unwrap();
        let t = v.tag();
        v.commit(vec![Change::Update(s.clone())], Some(t)).unwrap();
        s
    }

    /// A writer killed before it applied its journal left no mark.
    fn unmarked(tree: &Path) {
        assert!(Mark::default().write(&File::open(tree).unwrap()));
    }

    /// What a machine's restart does to a tree file's mark: it names another boot.
    fn other_boot(tree: &Path) {
        let f = File::open(tree).unwrap();
        let mut m = Mark::read(&f);
        m.boot = [0xee; 16];
        assert!(m.write(&f));
    }

    #[test]
    fn a_small_update_carries_its_journal_in_the_log_record_and_writes_no_journal_file() {
        let mut model = pattern(300_000, 1);
        let (fx, mut v) = Fx::new(&model);
        for (i, at) in [10_000usize, 12_000, 200_000, 10_500]
            .into_iter()
            .enumerate()
        {
            update(&mut v, &mut model, at, &pattern(5_000, i as u8));
            assert_eq!(fx.journal_files(&v), 0, "no journal file");
            assert!(read_all(&v).unwrap() == model, "update {i}");
        }
        let v = fx.reopen(v);
        assert!(read_all(&v).unwrap() == model, "another reader");
        v.settle_journals().unwrap();
        assert!(read_all(&v).unwrap() == model);
    }

    #[test]
    fn a_checkpoint_makes_the_chains_of_the_log_durable_before_the_log_goes() {
        let mut model = pattern(300_000, 2);
        let (fx, mut v) = Fx::new(&model);
        for i in 0..3u8 {
            update(
                &mut v,
                &mut model,
                1_000 + 7_000 * i as usize,
                &pattern(3_000, i),
            );
        }
        // A checkpoint replaces the log: the chain is applied and synced first.
        v.save().unwrap();
        assert!(!log_path(&fx.p).exists() || v.log.end == 0);
        assert!(read_all(&v).unwrap() == model);
        let m = Mark::read(&File::open(fx.tree(&v)).unwrap());
        let FileKind::File { root: Some(r), .. } = v.lookup(&ep("/f")).unwrap().kind else {
            panic!()
        };
        assert_eq!(m.durable, r, "durable at the committed root");
        // Updates go on after the checkpoint, in a new log.
        for i in 3..6u8 {
            update(
                &mut v,
                &mut model,
                2_000 + 9_000 * i as usize,
                &pattern(3_000, i),
            );
            assert!(read_all(&v).unwrap() == model);
        }
        let v = fx.reopen(v);
        assert!(read_all(&v).unwrap() == model, "another reader");
    }

    /// At [`PENDING_MAX`] journals a file is settled; its chain in the log was walked to the
    /// start with only the newest journal counted as applied (the tree's mark names only that
    /// one), and the older ones were applied again over the newer writes.
    #[test]
    fn a_settle_at_the_pending_limit_applied_older_journals_of_the_log_over_newer_ones() {
        let mut model = pattern(1_000_000, 2);
        let (fx, mut v) = Fx::new(&model);
        for i in 0..PENDING_MAX as usize + 6 {
            // Overlapping writes: an older journal applied again changes what a newer wrote.
            let at = (i * 7919 * 64) % 900_000;
            update(&mut v, &mut model, at, &pattern(6_000, i as u8));
            let got = read_all(&v).unwrap_or_else(|e| panic!("update {i}: {e}"));
            assert!(got == model, "update {i}");
        }
        let _ = fx;
    }

    /// A writer killed after its commit point and before it applied the journal: the next
    /// reader finds the journal in the log record, applies it and makes the files durable.
    #[test]
    fn a_journal_in_the_log_left_unapplied_by_a_crash_is_applied_by_the_next_reader() {
        let mut model = pattern(300_000, 3);
        let (fx, mut v) = Fx::new(&model);
        let old = fx.files(&v);
        let s = update(&mut v, &mut model, 100_000, &pattern(9_000, 7));
        assert_eq!(fx.journal_files(&v), 0);
        // The state after the kill: the record is durable, the files are as before it.
        fx.restore(&v, &old);
        unmarked(&fx.tree(&v));
        let v = fx.reopen(v);
        assert!(read_all(&v).unwrap() == model, "applied on open");
        let m = Mark::read(&File::open(fx.tree(&v)).unwrap());
        assert_eq!(m.durable, s.root(), "and made durable");
    }

    /// After a restart (the page cache lost: the files as before the chain, the tree's mark of
    /// another boot) the chain in the log is applied again, oldest first.
    #[test]
    fn journals_in_the_log_are_replayed_in_order_after_a_restart() {
        let mut model = pattern(300_000, 4);
        let (fx, mut v) = Fx::new(&model);
        let old = fx.files(&v);
        for (i, at) in [10_000usize, 12_000, 200_000, 11_000]
            .into_iter()
            .enumerate()
        {
            update(&mut v, &mut model, at, &pattern(6_000, 40 + i as u8));
        }
        let mut u = v.update_file(&ep("/f")).unwrap().unwrap();
        u.set_len(250_001).unwrap();
        model.truncate(250_001);
        let s = u.stage(&v).unwrap();
        let t = v.tag();
        v.commit(vec![Change::Update(s)], Some(t)).unwrap();
        assert!(read_all(&v).unwrap() == model);
        fx.restore(&v, &old);
        other_boot(&fx.tree(&v));
        let v = fx.reopen(v);
        assert!(read_all(&v).unwrap() == model, "the chain replayed");
    }

    /// A chunk or tree page rolled back under a journal of the log that the mark calls
    /// applied is detected, never read as data.
    #[test]
    fn a_chunk_rolled_back_under_an_applied_journal_of_the_log_is_detected() {
        let mut model = pattern(300_000, 5);
        let (fx, mut v) = Fx::new(&model);
        let old = fx.files(&v);
        update(&mut v, &mut model, 50_000, &pattern(4_096, 9));
        std::fs::write(fx.data(), &old.0).unwrap();
        assert!(read_all(&v).is_err(), "old chunk under the new tree");
        let t = v.tag();
        let v2 = fx.open(t);
        assert!(read_all(&v2).is_err(), "and for another reader");
        std::fs::write(fx.tree(&v), &old.1).unwrap();
        assert!(read_all(&v2).is_err(), "old tree under the new root");
    }

    /// An index cache stands for log records whose journals its readers do not learn: the
    /// chains through them are applied and made durable before it is written.
    #[test]
    fn an_index_cache_is_written_only_over_durable_chains() {
        let mut model = pattern(300_000, 6);
        let (fx, mut v) = Fx::new(&model);
        let old = fx.files(&v);
        let s = update(&mut v, &mut model, 70_000, &pattern(5_000, 3));
        let t = v.tag();
        drop(v);
        // Left unapplied by a killed writer; a later process writes the cache.
        std::fs::write(fx.data(), &old.0).unwrap();
        std::fs::write(fx.tree(&fx.open(t)), &old.1).unwrap();
        unmarked(&fx.tree(&fx.open(t)));
        let v = Volume::open(&fx.p, Some(fx.key.clone()), Some(t)).unwrap();
        crate::volume::index_cache::write(&v).unwrap();
        let m = Mark::read(&File::open(fx.tree(&v)).unwrap());
        assert_eq!(m.durable, s.root());
        drop(v);
        let v = Volume::open_cached(&fx.p, fx.key.clone(), t).unwrap();
        assert!(v.is_indexed(), "read through the cache");
        assert!(read_all(&v).unwrap() == model);
    }

    /// A log of an older writer (version 3) is continued without journals in its records:
    /// that writer's readers would not apply them.
    #[test]
    fn a_version_3_log_is_continued_with_journal_files() {
        let mut model = pattern(300_000, 8);
        let (fx, mut v) = Fx::new(&model);
        update(&mut v, &mut model, 1_000, &pattern(100, 1));
        assert_eq!(fx.journal_files(&v), 0);
        let t = v.tag();
        drop(v);
        let lp = log_path(&fx.p);
        let mut b = std::fs::read(&lp).unwrap();
        b[..8].copy_from_slice(&crate::format::log::LOG_MAGIC_V3);
        std::fs::write(&lp, &b).unwrap();
        let mut v = fx.open(t);
        let s = update(&mut v, &mut model, 2_000, &pattern(100, 2));
        assert!(s.journal.exists(), "a journal file");
        assert!(read_all(&v).unwrap() == model);
        assert_eq!(
            &std::fs::read(&lp).unwrap()[..8],
            &crate::format::log::LOG_MAGIC_V3
        );
    }

    /// An update and the removal of its file in one batch: the record carried the update's
    /// journal with no entry of its root, and every later open refused the log as damaged.
    #[test]
    fn a_record_carried_the_journal_of_a_file_removed_in_the_same_batch() {
        let mut model = pattern(300_000, 9);
        let (fx, mut v) = Fx::new(&model);
        let mut u = v.update_file(&ep("/f")).unwrap().unwrap();
        u.write_at(b"gone", 10).unwrap();
        let s = u.stage(&v).unwrap();
        let t = v.tag();
        v.commit(vec![Change::Update(s), Change::Remove(ep("/f"))], Some(t))
            .unwrap();
        assert!(v.lookup(&ep("/f")).is_none());
        let t = v.tag();
        let v = Volume::open(&fx.p, Some(fx.key.clone()), Some(t));
        assert!(v.is_ok(), "{:?}", v.err());
        // And an update followed by a new version of the same path.
        let (fx, mut v) = Fx::new(&model);
        let mut u = v.update_file(&ep("/f")).unwrap().unwrap();
        u.write_at(b"old", 10).unwrap();
        let s = u.stage(&v).unwrap();
        model.truncate(1000);
        let put = v
            .stage_file(&ep("/f"), model.len() as u64, 0o644, &mut &model[..])
            .unwrap();
        let t = v.tag();
        v.commit(vec![Change::Update(s), Change::Put(put)], Some(t))
            .unwrap();
        let t = v.tag();
        let v = fx.open(t);
        assert!(read_all(&v).unwrap() == model);
    }

    /// A small append is journaled, not written in place before the commit point: the journal
    /// rides in the record, and no settle of the file's chain comes first.
    #[test]
    fn a_small_append_rides_in_the_log_record_with_its_chunks() {
        let mut model = pattern(300_000, 10);
        let (fx, mut v) = Fx::new(&model);
        update(&mut v, &mut model, 1_000, &pattern(100, 1));
        let mut u = v.update_file(&ep("/f")).unwrap().unwrap();
        u.write_at(b"line\n", model.len() as u64).unwrap();
        model.extend_from_slice(b"line\n");
        let s = u.stage(&v).unwrap();
        assert!(
            s.direct.0.is_empty(),
            "nothing written in place before the commit point"
        );
        assert!(s.inline_bytes().is_some());
        let t = v.tag();
        v.commit(vec![Change::Update(s.clone())], Some(t)).unwrap();
        assert!(s.inline_bytes().is_some(), "carried by the record");
        assert_eq!(fx.journal_files(&v), 0);
        assert!(read_all(&v).unwrap() == model);
    }

    /// A chain in the log is continued by the next writer (another volume, as another process
    /// or run would be), and after a restart the whole of it is replayed.
    #[test]
    fn a_chain_in_the_log_is_continued_by_the_next_writer_and_replayed_whole_after_a_restart() {
        let mut model = pattern(300_000, 11);
        let (fx, mut v) = Fx::new(&model);
        let old = fx.files(&v);
        update(&mut v, &mut model, 5_000, &pattern(3_000, 1));
        let a = update(&mut v, &mut model, 6_000, &pattern(3_000, 2));
        let t = v.tag();
        drop(v);
        let mut w = fx.open(t);
        let b = update(&mut w, &mut model, 5_500, &pattern(3_000, 3));
        let jb = w.logj.get(&b.id, &b.root()).unwrap();
        assert_eq!(
            jb.get(72..104),
            Some(&a.root()[..]),
            "continues the other writer's chain"
        );
        assert!(read_all(&w).unwrap() == model);
        fx.restore(&w, &old);
        other_boot(&fx.tree(&w));
        let v = fx.reopen(w);
        assert!(
            read_all(&v).unwrap() == model,
            "all three replayed in order"
        );
    }

    /// Files in the log (FORMAT.md §5b): small new versions whose shadows the caller did not
    /// sync ride whole in the commit's record.
    mod files_in_the_log {
        use super::*;
        use crate::volume::commit::StagedFile;

        fn stage(v: &Volume, path: &str, data: &[u8]) -> StagedFile {
            let mut s = v
                .stage_file(&ep(path), data.len() as u64, 0o644, &mut &data[..])
                .unwrap();
            assert!(s.may_ride_in_log());
            s.defer_sync();
            s
        }

        fn commit(v: &mut Volume, changes: Vec<Change>) {
            let t = v.tag();
            v.commit(changes, Some(t)).unwrap();
        }

        fn put(v: &mut Volume, path: &str, data: &[u8]) {
            let s = stage(v, path, data);
            commit(v, vec![Change::Put(s)]);
        }

        fn read(v: &Volume, path: &str) -> Result<Vec<u8>> {
            super::super::tests::read_all(v, &ep(path))
        }

        fn id_of(v: &Volume, path: &str) -> FileId {
            match v.lookup(&ep(path)).unwrap().kind {
                FileKind::File { id, .. } => id,
                _ => panic!(),
            }
        }

        fn kernel(fx: &Fx, path: &str) -> PathBuf {
            fx.d.path().join("vol").join(&path[1..])
        }

        /// A power loss that kept the record and lost or tore the file (or its unpublished
        /// shadow): after the restart the next reader writes the file from the record. Within
        /// the boot that wrote it, a changed copy is a change on disk and detected.
        #[test]
        fn a_small_new_file_rides_in_the_record_and_is_restored_from_it_after_a_restart() {
            let (fx, mut v) = Fx::new(&pattern(300_000, 1));
            let data = pattern(9_000, 7);
            let log_before = std::fs::metadata(log_path(&fx.p)).map_or(0, |m| m.len());
            let end_before = v.log.end;
            let s = stage(&v, "/s", &data);
            commit(&mut v, vec![Change::Put(s)]);
            assert!(v.log.end - end_before > 9_000, "the record holds the file");
            assert!(v.logj.version(&id_of(&v, "/s")).is_some());
            assert!(std::fs::metadata(log_path(&fx.p)).unwrap().len() >= log_before);
            let on_disk = std::fs::read(kernel(&fx, "/s")).unwrap();
            assert!(read(&v, "/s").unwrap() == data);
            // Lost: within this boot an error, after a restart restored from the log.
            std::fs::remove_file(kernel(&fx, "/s")).unwrap();
            let mut v = fx.reopen(v);
            assert!(read(&v, "/s").is_err(), "within the boot: detected");
            v.logj.restarted();
            assert!(read(&v, "/s").unwrap() == data, "restored when lost");
            assert!(std::fs::read(kernel(&fx, "/s")).unwrap() == on_disk);
            // Torn: the right length, zeros where the data did not reach the disk.
            let mut torn = on_disk.clone();
            torn[100..].fill(0);
            std::fs::write(kernel(&fx, "/s"), &torn).unwrap();
            let mut v = fx.reopen(v);
            assert!(read(&v, "/s").is_err(), "within the boot: detected");
            v.logj.restarted();
            assert!(read(&v, "/s").unwrap() == data, "restored when torn");
            // A torn shadow left unpublished: rolled forward, then restored.
            let sh =
                crate::volume::commit::shadow_name(std::ffi::OsStr::new("s"), &id_of(&v, "/s"));
            std::fs::write(fx.d.path().join("vol").join(&sh), &torn[..50]).unwrap();
            std::fs::remove_file(kernel(&fx, "/s")).unwrap();
            let mut v = fx.reopen(v);
            v.logj.restarted();
            assert!(
                read(&v, "/s").unwrap() == data,
                "restored over a torn shadow"
            );
            assert!(!fx.d.path().join("vol").join(&sh).exists());
        }

        /// A process that has not caught up with a newer version of the file must not put the
        /// version it knows from the log back over it.
        #[test]
        fn a_reader_behind_never_restores_an_older_version_over_a_newer_one() {
            let (fx, mut v) = Fx::new(&pattern(300_000, 2));
            let a = pattern(5_000, 1);
            let b = pattern(6_000, 2);
            put(&mut v, "/s", &a);
            let mut behind = fx.open(v.tag());
            behind.logj.restarted();
            put(&mut v, "/s", &b);
            let newer = std::fs::read(kernel(&fx, "/s")).unwrap();
            assert!(read(&behind, "/s").is_err(), "its version is gone");
            assert!(
                std::fs::read(kernel(&fx, "/s")).unwrap() == newer,
                "left alone"
            );
            assert!(read(&v, "/s").unwrap() == b);
        }

        /// A checkpoint replaces the log: the files it carries are written where lost (after a
        /// restart) and made durable first, and read without it afterwards.
        #[test]
        fn a_checkpoint_makes_the_files_of_the_log_durable_before_the_log_goes() {
            let (fx, mut v) = Fx::new(&pattern(300_000, 3));
            let data = pattern(7_000, 5);
            put(&mut v, "/s", &data);
            std::fs::remove_file(kernel(&fx, "/s")).unwrap();
            v.logj.restarted();
            v.save().unwrap();
            assert!(
                v.logj.version(&id_of(&v, "/s")).is_none(),
                "the log is gone"
            );
            assert!(read(&v, "/s").unwrap() == data);
            let v = fx.reopen(v);
            assert!(read(&v, "/s").unwrap() == data, "without the log");
        }

        /// A commit whose record has no room left writes a checkpoint: the shadows it would
        /// have carried are synced instead, and the file reads.
        #[test]
        fn a_checkpoint_commit_syncs_the_shadows_it_does_not_carry() {
            let (fx, mut v) = Fx::new(&pattern(300_000, 4));
            let mut last = Vec::new();
            for i in 0..40u8 {
                last = pattern(20_000, i);
                put(&mut v, "/s", &last);
            }
            let v = fx.reopen(v);
            assert!(read(&v, "/s").unwrap() == last);
        }

        /// A batch of small files larger than the log has room for (a shield commits 500 files
        /// at a time): the files did not fit in the record, and the commit wrote a whole
        /// checkpoint at every such batch instead of syncing them and appending a record.
        #[test]
        fn a_batch_of_small_files_too_large_for_the_log_wrote_a_checkpoint() {
            let (fx, mut v) = Fx::new(&pattern(300_000, 7));
            let checkpoint = std::fs::read(&fx.p).unwrap();
            let end_before = v.log.end;
            let files: Vec<(String, Vec<u8>)> = (0..200u32)
                .map(|i| (format!("/b{i}"), pattern(3_000, i as u8)))
                .collect();
            let changes = files
                .iter()
                .map(|(p, d)| Change::Put(stage(&v, p, d)))
                .collect();
            commit(&mut v, changes);
            assert!(std::fs::read(&fx.p).unwrap() == checkpoint, "no checkpoint");
            assert!(v.log.end > end_before, "a record appended");
            assert!(v.logj.versions().is_empty(), "without the files");
            let v = fx.reopen(v);
            for (p, d) in &files {
                assert!(read(&v, p).unwrap() == *d, "{p}");
            }
        }

        /// An index cache stands for records whose files its readers do not learn: they are
        /// written and made durable before it is.
        #[test]
        fn an_index_cache_is_written_only_over_durable_files_of_the_log() {
            let (fx, mut v) = Fx::new(&pattern(300_000, 6));
            let data = pattern(3_000, 9);
            put(&mut v, "/s", &data);
            let t = v.tag();
            std::fs::remove_file(kernel(&fx, "/s")).unwrap();
            v.logj.restarted();
            crate::volume::index_cache::write(&v).unwrap();
            drop(v);
            let v = Volume::open_cached(&fx.p, fx.key.clone(), t).unwrap();
            assert!(v.is_indexed(), "read through the cache");
            assert!(read(&v, "/s").unwrap() == data);
        }

        /// A version-4 log (an older writer's readers would not know files in records) is
        /// continued with synced shadows.
        #[test]
        fn a_version_4_log_is_continued_without_files_in_its_records() {
            let (fx, mut v) = Fx::new(&pattern(300_000, 8));
            put(&mut v, "/s", b"first");
            let t = v.tag();
            drop(v);
            let lp = log_path(&fx.p);
            let mut b = std::fs::read(&lp).unwrap();
            b[..8].copy_from_slice(&crate::format::log::LOG_MAGIC_V4);
            std::fs::write(&lp, &b).unwrap();
            let mut v = fx.open(t);
            assert!(!v.log_takes_files());
            put(&mut v, "/s", b"second");
            assert!(v.logj.version(&id_of(&v, "/s")).is_none());
            let v = fx.reopen(v);
            assert_eq!(read(&v, "/s").unwrap(), b"second");
            assert_eq!(
                &std::fs::read(&lp).unwrap()[..8],
                &crate::format::log::LOG_MAGIC_V4
            );
        }

        /// A record that carries a file no entry of it puts is refused as damaged (only the
        /// volume key makes records; this is what a bug in a writer would leave).
        #[test]
        fn a_record_carrying_a_file_no_entry_of_it_names_is_damaged() {
            let (fx, mut v) = Fx::new(&pattern(300_000, 9));
            let stray = stage(&v, "/s", b"never listed");
            let bytes: Arc<[u8]> = std::fs::read(&stray.shadow).unwrap().into();
            let touched: std::collections::BTreeSet<EmbedPath> = [ep("/f")].into();
            v.append_log(&touched, &[], &[bytes], None, &mut |_| Ok(()))
                .unwrap();
            let t = v.tag();
            let e = Volume::open(&fx.p, Some(fx.key.clone()), Some(t)).unwrap_err();
            assert!(matches!(e, Error::LogDamaged { .. }), "{e}");
        }
    }
}

//! Staging new file versions and committing them with the fspf (P8, P9).
//!
//! A new version is written to a *shadow* beside its kernel path (`.NAME.fspf-<file id>`), fsync'd,
//! then the fspf is replaced atomically (the commit point), then the shadow is renamed over the
//! kernel path. A crash before the commit leaves the old fspf and an ignored shadow; a crash after
//! it leaves a shadow whose name is the committed file id, which `roll_forward` renames into place
//! on the next open. Every version has a fresh file id, hence a fresh key: no nonce is ever reused.
use super::direct::DirectWriter;
use super::kernel_fs::{self, KernelPath};
use super::{store, Volume};
use crate::codec;
use crate::crypto::{self, FileId, Tag};
use crate::error::{Error, Result};
use crate::format::metadata::{FileEntry, FileKind, Protection, Region};
use crate::policy::EmbedPath;
use rayon::prelude::*;
use rustix::fs::{AtFlags, FileType, OFlags};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Encrypted versions of at least this size are written with direct I/O ([`DirectWriter`]).
pub const DIRECT_MIN: u64 = 8 << 20;

/// A file version written to disk but not yet committed.
#[derive(Debug, Clone)]
pub struct StagedFile {
    pub path: EmbedPath,
    pub entry: FileEntry,
    /// Shadow to rename onto `kernel` after the commit.
    pub shadow: PathBuf,
    pub kernel: PathBuf,
    /// `kernel` as its trusted base directory (the region's kernel directory, or `addf`'s
    /// output directory) and the part below it: every access resolves no symlink below the base.
    pub loc: KernelPath,
    /// Outboard written for this version (removed again if the commit fails).
    pub outboard: Option<PathBuf>,
    /// Held from before the shadow was created until this version is committed or dropped,
    /// so the orphan cleanup never takes the shadow for an orphan.
    pub(crate) _writer: Arc<store::WriterGuard>,
    /// The shadow's length when it is an encrypted format-1 version (its data file is all
    /// there is of it), which may ride in a log record when small (FORMAT.md §5b).
    pub(crate) whole_len: Option<u64>,
    /// The caller did not make the shadow durable before the commit (no `syncfs`): the commit
    /// carries it in its log record, or syncs it before the commit point.
    pub(crate) unsynced: bool,
}

/// Largest encrypted format-1 version (its data file) a log record carries whole instead of
/// the commit syncing its shadow first (FORMAT.md §5b, "Files in the log"). Each one makes
/// the log longer, which every process opening the volume reads, and brings the next
/// checkpoint nearer.
pub const FILE_IN_LOG_MAX: u64 = 32 << 10;

impl StagedFile {
    fn shadow_name(&self) -> &OsStr {
        self.shadow.file_name().unwrap_or_default()
    }

    /// May this version ride in the commit's log record instead of being made durable before
    /// it (FORMAT.md §5b, "Files in the log")? Small encrypted format-1 versions only.
    pub fn may_ride_in_log(&self) -> bool {
        self.whole_len.is_some_and(|n| n <= FILE_IN_LOG_MAX)
    }

    /// The caller leaves the shadow unsynced: the commit carries it in its log record (or, when
    /// the record cannot take it, syncs it before the commit point).
    pub fn defer_sync(&mut self) {
        self.unsynced = true;
    }

    /// The shadow's bytes, if they are the whole version this entry names.
    fn read_whole(&self) -> Option<Arc<[u8]>> {
        let n = usize::try_from(self.whole_len?).ok()?;
        let FileKind::File { id, .. } = &self.entry.kind else {
            return None;
        };
        let (dir, _) = self.loc.parent().ok()?;
        let f = kernel_fs::open_regular_at(&dir, self.shadow_name()).ok()?;
        let mut b = vec![0u8; n];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 0).ok()?;
        let whole = f.metadata().ok()?.len() == n as u64
            && b.get(..8) == Some(&crate::format::layout::ENC_MAGIC[..])
            && b.get(8..24) == Some(&id.0[..]);
        whole.then(|| b.into())
    }

    /// Remove the shadow and the outboard of a version that will not be committed.
    pub fn discard(&self, fspf: &Path) {
        if let Ok((dir, _)) = self.loc.parent() {
            let _ = rustix::fs::unlinkat(&dir, self.shadow_name(), AtFlags::empty());
        }
        if let (Some(_), FileKind::File { id, .. }) = (&self.outboard, &self.entry.kind) {
            store::remove_tree(fspf, id);
        }
    }

    /// Rename the shadow over the kernel file (after the commit); a failure is left to
    /// [`roll_forward_at`].
    fn publish(&self) {
        if let Ok((dir, name)) = self.loc.parent() {
            if kernel_fs::rename_at(&dir, self.shadow_name(), &name).is_err() {
                // A directory the fspf no longer lists may still hold the name (its removal
                // was interrupted): the committed file takes precedence.
                let _ = kernel_fs::clear_stale_dir(self.loc.base(), self.loc.rel());
                let _ = kernel_fs::rename_at(&dir, self.shadow_name(), &name);
            }
        }
    }
}

/// Small new versions ride in one record only up to this many bytes in all: a batch of many
/// (`cp -r`) is written once, synced with one `syncfs`, rather than twice (log and file), and
/// does not fill a large log budget (`VolumeOptions::log_journals`) in a few commits.
const FILES_IN_RECORD_MAX: u64 = 256 << 10;

/// Committed shadows renamed into place in parallel (on the pool) from this many on.
const PARALLEL_RENAMES_MIN: usize = 64;

/// One change to the fspf.
#[derive(Debug, Clone)]
pub enum Change {
    /// A staged regular file replaces whatever was at its path.
    Put(StagedFile),
    /// A directory or symlink entry (the caller made the kernel-side object).
    PutEntry(EmbedPath, FileEntry),
    /// Remove the entry at a path (and everything below it). The caller removes the kernel file
    /// after the commit: until then the old state must stay readable (P9).
    Remove(EmbedPath),
    /// Move an entry (and, for a directory, everything below it). The file id, hence the key,
    /// is kept: a rename re-encrypts nothing. The caller renames the kernel object after the commit.
    /// Hard links follow: a moved file's links name its new path, a moved link is listed under
    /// its new one. A file moved over one of its own links takes that name (the link goes).
    Rename { from: EmbedPath, to: EmbedPath },
    /// A hard link at `link` (a free name) to the regular or special file listed at `target`,
    /// whose change time moves to `ns`. Nothing changes on disk.
    Link {
        link: EmbedPath,
        target: EmbedPath,
        ns: i64,
    },
    /// An entry was made in or removed from directory `dir` at `ns`: its modification and change
    /// times move to `ns` (never back). Only those two fields change, so a concurrent `chmod` of
    /// the directory by another process is kept; an implied directory (only paths below it are
    /// listed) is recorded, with the mode it shows (0755).
    Touch { dir: EmbedPath, ns: i64 },
    /// An in-place update of a format-2 file ([`crate::volume::FileUpdate`]): the entry takes
    /// the new size, root and times (keeping mode, owner and inode number as they are then),
    /// and the journal is applied after the commit point. Refused (the whole commit fails
    /// with [`Error::UpdateConflict`]) if the entry is no longer the version the update began
    /// from.
    Update(super::update::StagedUpdate),
}

/// The entries a commit changed, and what each held before (to undo a failed commit).
#[derive(Debug, Default)]
struct Tx {
    touched: std::collections::BTreeSet<EmbedPath>,
    undo: Vec<(EmbedPath, Option<FileEntry>)>,
}

impl Volume {
    /// Set the entry at `path` within `tx`; returns what it replaced.
    fn tx_set(&mut self, tx: &mut Tx, path: &EmbedPath, v: Option<FileEntry>) -> Option<FileEntry> {
        let old = self.raw_set(path.clone(), v);
        tx.touched.insert(path.clone());
        tx.undo.push((path.clone(), old.clone()));
        old
    }

    /// Change the entry at `path` in place within `tx` (nothing if none is listed there).
    fn tx_edit(&mut self, tx: &mut Tx, path: &EmbedPath, f: impl FnOnce(&mut FileEntry)) {
        if let Some(mut e) = self.lookup(path).map(|e| e.into_owned()) {
            f(&mut e);
            self.tx_set(tx, path, Some(e));
        }
    }

    /// Set the entry at `path` to `v`, keeping hard links consistent: links are changed only by
    /// [`Change::Link`], removals and renames, so a new version or entry (a mode, a time)
    /// keeps the links listed now, whatever the entry it was made from listed; a replaced link is
    /// no longer listed by its target (whose change time moves). Refuses to drop a file whose
    /// links stay.
    fn tx_replace(
        &mut self,
        tx: &mut Tx,
        path: &EmbedPath,
        mut v: Option<FileEntry>,
    ) -> Result<Option<FileEntry>> {
        // Without links, and with the name's own inode number free, the entry it replaces
        // decides nothing: no lookup beside the one `tx_set` makes.
        let new_ino = v.as_ref().is_some_and(|n| n.ino.is_none());
        let decides = self.has_links() || (new_ino && self.ino_recorded(path.default_ino()));
        if !decides {
            return Ok(self.tx_set(tx, path, v));
        }
        let old = self.lookup(path).map(|e| e.into_owned());
        let file = |k: &FileKind| matches!(k, FileKind::File { .. } | FileKind::Special { .. });
        // A new name whose own number another entry records (a file renamed away from it)
        // records the one it shows instead ([`Volume::ino_of`]).
        if let (None, Some(n)) = (&old, &mut v) {
            if n.ino.is_none() && !matches!(n.kind, FileKind::Link(_)) {
                let shown = self.ino_of(path, None);
                if shown != path.default_ino() {
                    n.ino = Some(shown);
                }
            }
        }
        if let Some(n) = &mut v {
            if file(&n.kind) {
                n.links = match &old {
                    Some(o) if file(&o.kind) => o.links.clone(),
                    _ => Vec::new(),
                };
            }
        }
        match &old {
            Some(FileEntry {
                kind: FileKind::Link(t),
                ..
            }) if !matches!(&v, Some(FileEntry { kind: FileKind::Link(t2), .. }) if t2 == t) => {
                let now = crate::format::metadata::now_ns();
                self.tx_edit(tx, t, |e| {
                    e.links.retain(|l| l != path);
                    e.ctime_ns = e.ctime_ns.max(now);
                });
            }
            Some(o) if !o.links.is_empty() && !v.as_ref().is_some_and(|n| file(&n.kind)) => {
                return Err(Error::Invalid {
                    path: path.to_string(),
                    reason: "removed while it still has hard links".into(),
                });
            }
            _ => {}
        }
        Ok(self.tx_set(tx, path, v))
    }

    /// [`Volume::tx_replace`] in the commit's loop: the id of a version it replaced becomes
    /// garbage once the commit is durable; the first refusal is kept, to fail the commit.
    fn tx_replace_into(
        &mut self,
        tx: &mut Tx,
        path: &EmbedPath,
        v: Option<FileEntry>,
        garbage: &mut Vec<FileId>,
        invalid: &mut Option<Error>,
    ) {
        match self.tx_replace(tx, path, v) {
            Ok(Some(FileEntry {
                kind: FileKind::File { id, .. },
                ..
            })) => garbage.push(id),
            Ok(_) => {}
            Err(e) => {
                invalid.get_or_insert(e);
            }
        }
    }

    /// After entries below `from` moved below `to` (`moved`: their old paths): the links of a
    /// moved file name its new path, and a moved link is listed under its new one, wherever the
    /// other side lies.
    fn relink_moved(&mut self, tx: &mut Tx, from: &EmbedPath, to: &EmbedPath, moved: &[EmbedPath]) {
        let rebase = |p: &EmbedPath| p.rebased(from, to).unwrap_or_else(|| p.clone());
        for k in moved {
            let dest = rebase(k);
            let Some(e) = self.lookup(&dest).map(|e| e.into_owned()) else {
                continue;
            };
            match &e.kind {
                FileKind::Link(t) => {
                    let t2 = rebase(t);
                    if &t2 != t {
                        self.tx_edit(tx, &dest, |e| e.kind = FileKind::Link(t2.clone()));
                    } else {
                        self.tx_edit(tx, t, |e| {
                            for l in &mut e.links {
                                if l == k {
                                    *l = dest.clone();
                                }
                            }
                        });
                    }
                }
                _ if !e.links.is_empty() => {
                    let links: Vec<EmbedPath> = e.links.iter().map(rebase).collect();
                    for (old, new) in e.links.iter().zip(&links) {
                        if old == new {
                            self.tx_edit(tx, new, |l| l.kind = FileKind::Link(dest.clone()));
                        }
                    }
                    if links != e.links {
                        self.tx_edit(tx, &dest, |e| e.links = links);
                    }
                }
                _ => {}
            }
        }
    }

    fn rollback(&mut self, tx: Tx) {
        for (p, old) in tx.undo.into_iter().rev() {
            self.raw_set(p, old);
        }
    }

    /// Bring this volume to the state on disk before changing it. If another process committed
    /// since, the state on disk is accepted only if its tag is `trusted` (the run's trust
    /// anchor); the changes are then merged onto it.
    ///
    /// `current`: what a look at the disk under the same lock found ([`Volume::disk_tag_locked`]);
    /// when it found this volume's own state, the disk is not looked at again, and the log it
    /// opened is returned for the commit's record.
    fn follow_disk(
        &mut self,
        trusted: Option<Tag>,
        current: Option<super::CurrentOnDisk<'_>>,
    ) -> Result<Option<super::log::OpenLog>> {
        if let Some(log) = current.and_then(|c| c.log_for(self.tag)) {
            return Ok(Some(log));
        }
        if self.is_current_on_disk()? {
            return Ok(None);
        }
        let st = super::log::DiskState::read(&self.path)?;
        let disk = st.tag();
        let mismatch = Error::TagMismatch {
            path: self.path.clone(),
            expected: self.tag.to_hex(),
            actual: disk.to_hex(),
        };
        if disk == self.tag {
            // A volume over a frozen index learns where its state lies in the log.
            if self.log.base.is_none() && self.log_enabled() && !self.catch_up_to(st)? {
                return Err(mismatch);
            }
            return Ok(None);
        }
        let Some(trusted) = trusted.filter(|t| *t == disk) else {
            return Err(mismatch);
        };
        if self.catch_up_to(st)? && self.tag == trusted {
            return Ok(None);
        }
        let opts = self.opts;
        let pending = std::mem::take(&mut self.pending);
        *self = store::open(&self.path, self.key.clone(), Some(trusted))?;
        self.opts = opts;
        self.pending = pending;
        Ok(None)
    }

    /// Make the changes in `tx` durable: one record appended to the metadata log, or a new
    /// checkpoint (the whole fspf) when the log is full or the fspf is not sealed. The journals
    /// of `updates` still in memory go into the record (FORMAT.md §5b, "Journals in the log")
    /// where the log takes them, else to their files first.
    fn persist(
        &mut self,
        tx: &Tx,
        updates: &[&super::update::StagedUpdate],
        unsynced: &[&StagedFile],
        open_log: Option<super::log::OpenLog>,
        announce: &mut dyn FnMut(Tag) -> Result<()>,
    ) -> Result<Vec<(EmbedPath, Arc<[u8]>)>> {
        // A rough size of the record: each entry is a path and at most ~100 bytes.
        let estimate: u64 = tx
            .touched
            .iter()
            .map(|p| p.as_bytes().len() as u64 + 128)
            .sum();
        // An update whose root no entry of the batch ends with (the file was replaced or
        // removed later in the same batch) needs no journal: the state never names its root.
        if !updates.is_empty() {
            let ends: std::collections::HashSet<(FileId, [u8; 32])> = tx
                .touched
                .iter()
                .filter_map(|p| match self.lookup(p).map(|e| e.kind.clone()) {
                    Some(FileKind::File {
                        id, root: Some(r), ..
                    }) => Some((id, r)),
                    _ => None,
                })
                .collect();
            for u in updates {
                if !ends.contains(&(u.id, u.root())) {
                    u.forget_inline();
                }
            }
        }
        let inline: Vec<std::sync::Arc<[u8]>> =
            updates.iter().filter_map(|u| u.inline_bytes()).collect();
        let logging = self.opts.log && self.log_enabled();
        let carry = logging && !inline.is_empty() && self.log_takes_journals();
        let jlen: u64 = if carry {
            inline.iter().map(|j| j.len() as u64).sum()
        } else {
            0
        };
        // Small new versions whose shadows the caller left unsynced ride in the record, whole,
        // when they all fit in what the log has left (a batch of many files does not: it is
        // synced and recorded as before, instead of bringing a checkpoint per batch); any the
        // record does not take are synced before the commit point.
        let mut versions: Vec<(EmbedPath, Arc<[u8]>)> = Vec::new();
        let mut to_sync: Vec<&StagedFile> = Vec::new();
        let want: u64 = unsynced
            .iter()
            .filter(|s| s.may_ride_in_log())
            .filter_map(|s| s.whole_len)
            .sum();
        let ride = want > 0
            && want <= FILES_IN_RECORD_MAX
            && self.log_takes_files()
            && self.log_has_room(estimate, jlen + want);
        for s in unsynced {
            let whole = (ride && s.may_ride_in_log())
                .then(|| s.read_whole())
                .flatten();
            match whole {
                Some(b) => versions.push((s.path.clone(), b)),
                None => to_sync.push(s),
            }
        }
        let flen: u64 = versions.iter().map(|(_, b)| b.len() as u64).sum();
        let materialize =
            |fspf: &Path| -> Result<()> { updates.iter().try_for_each(|u| u.materialize(fspf)) };
        let sync_shadows = |files: &[&StagedFile]| -> Result<()> {
            if files.is_empty() {
                return Ok(());
            }
            store::sync_filesystems(files.iter().map(|s| s.loc.base()))
        };
        if !logging || !self.log_has_room(estimate, jlen + flen) {
            sync_shadows(unsynced)?;
            materialize(&self.path)?;
            // The checkpoint replaces the log: the chains through its journals and the
            // versions it carries are made durable first (they go with the log).
            self.settle_log_chains()?;
            return self.save_announced(announce).map(|_| Vec::new());
        }
        sync_shadows(&to_sync)?;
        if !carry {
            materialize(&self.path)?;
        }
        self.meta.generation += 1;
        let journals = if carry { inline } else { Vec::new() };
        let files: Vec<Arc<[u8]>> = versions.iter().map(|(_, b)| b.clone()).collect();
        if let Err(e) = self.append_log(&tx.touched, &journals, &files, open_log, announce) {
            self.meta.generation -= 1;
            return Err(e);
        }
        Ok(versions)
    }
}

/// Longest `NAME` kept whole in a shadow name: `.NAME.fspf-<32 hex>` must fit the 255 bytes of
/// a file name (`NAME_MAX`).
pub const SHADOW_NAME_KEEP: usize = 255 - 1 - 6 - 32;

/// Shadow name of file version `id` of the file named `name`: `.NAME.fspf-<id hex>`, with
/// `NAME` cut to its first [`SHADOW_NAME_KEEP`] bytes when longer (FORMAT.md §5): the id alone
/// identifies the version, the name only helps a human.
pub fn shadow_name(name: &OsStr, id: &FileId) -> OsString {
    use std::os::unix::ffi::OsStrExt;
    let b = name.as_bytes();
    let mut s = OsString::from(".");
    s.push(OsStr::from_bytes(&b[..b.len().min(SHADOW_NAME_KEEP)]));
    s.push(format!(".fspf-{}", id.to_hex()));
    s
}

/// If a committed shadow for `id` is still beside `name` in `dir`, rename it into place (crash
/// recovery). Only a regular file is moved.
pub(crate) fn roll_forward_at(dir: &OwnedFd, name: &OsStr, id: &FileId) {
    let sh = shadow_name(name, id);
    let regular = rustix::fs::statat(dir, &sh, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile);
    if regular && kernel_fs::rename_at(dir, &sh, name).is_ok() {
        let _ = kernel_fs::sync_dir_fd(dir);
    }
}

/// Bring the kernel file `name` in `dir` to committed version `id`: its committed shadow is
/// renamed into place, and for a format-2 file (`root`: its committed chunk-tree root) a journal
/// of that root left by an interrupted commit is applied (FORMAT.md §5, §5b).
pub(crate) fn roll_forward(
    fspf: &Path,
    log: &super::update::LogJournals,
    dir: &OwnedFd,
    name: &OsStr,
    id: &FileId,
    root: Option<&[u8; 32]>,
    label: &str,
) -> Result<()> {
    roll_forward_at(dir, name, id);
    match root {
        Some(r) => {
            use super::update::{apply_chain, ApplyMode};
            apply_chain(fspf, log, dir, name, id, r, label, ApplyMode::Recover).map(drop)
        }
        None => Ok(()),
    }
}

/// Where a new version is written: a new file `name` in the directory `dir` (opened without
/// following symlinks below its base); `label` names it in errors.
pub(crate) struct Output {
    pub dir: OwnedFd,
    pub name: OsString,
    pub label: PathBuf,
}

impl Output {
    /// The shadow of version `id` beside the kernel file at `loc` (`path` names it in errors):
    /// where `stage_file` and `addf` write a new version.
    pub fn shadow(loc: &KernelPath, id: &FileId, path: &EmbedPath) -> Result<Output> {
        let (dir, name) = loc
            .parent()
            .map_err(|e| Error::kernel(&path.to_string(), loc.full(), e))?;
        let name = shadow_name(&name, id);
        let label = loc.with_file_name(&name).full();
        Ok(Output { dir, name, label })
    }

    fn create(&self, mode: u32) -> Result<File> {
        kernel_fs::create_new_at(&self.dir, &self.name, mode, OFlags::empty())
            .map_err(|e| Error::io(&self.label, e))
    }

    /// Remove the file again (a failed seal).
    pub fn remove(&self) {
        let _ = rustix::fs::unlinkat(&self.dir, &self.name, AtFlags::empty());
    }
}

/// Seal `size` bytes of `src` as a new version of `path` in `region`, writing the on-disk form to
/// `out` (ciphertext for encrypted regions; a plaintext copy for authenticated ones when given).
#[allow(clippy::too_many_arguments)]
pub(crate) fn seal_version(
    vol: &Volume,
    region: &Region,
    path: &EmbedPath,
    id: FileId,
    size: u64,
    mode: u32,
    src: &mut impl Read,
    out: Option<&Output>,
    format2: bool,
) -> Result<(FileEntry, Option<PathBuf>)> {
    let label = path.to_string();
    let key = region.key.as_ref().ok_or_else(|| Error::NotProtected {
        path: label.clone(),
        region: region.embed_point.to_string(),
    })?;
    let file_mode = if mode & 0o777 == 0 {
        0o600
    } else {
        mode & 0o777
    };
    match region.protection {
        Protection::Encrypted => {
            let out = out.ok_or_else(|| Error::Invalid {
                path: label.clone(),
                reason: "encrypted files need an output directory for the ciphertext".into(),
            })?;
            let c = region.chunk_len;
            // Format 2 (chunk tree, updatable in place) for files the frontends write that are
            // larger than a few chunks; format 1 for small files and imports (FORMAT.md §4a).
            let tree = if format2
                && crate::format::layout::chunk_count(size, c)
                    > crate::format::tree::FORMAT2_MIN_CHUNKS
            {
                Some(store::create_tree(&vol.path, &id)?)
            } else {
                None
            };
            let k = crypto::file_chunk_key(key, &id)?;
            let p = &out.label;
            let tree_file = std::cell::RefCell::new(tree.as_ref().map(|(f, _)| f));
            let root = std::cell::Cell::new(None);
            let seal = |src: &mut dyn Read, mut w: &mut (dyn Write + Send)| {
                if let Some(t) = tree_file.borrow_mut().take() {
                    let tw = BufWriter::with_capacity(1 << 20, t);
                    let (r, tw) = codec::tree::seal_file2(
                        key,
                        &id,
                        c,
                        size,
                        &mut &mut *src,
                        &mut w,
                        tw,
                        &label,
                    )?;
                    let t = tw.into_inner().map_err(|e| Error::io(p, e.into_error()))?;
                    if vol.opts.sync_each_file {
                        t.sync_all().map_err(|e| Error::io(p, e))?;
                    }
                    root.set(Some(r));
                    return Ok(());
                }
                let t = vol.opts.threads;
                codec::seal_encrypted_with(t, &k, &id, c, size, &mut &mut *src, &mut w, &label)
            };
            let fail = |e: Error| {
                if tree.is_some() {
                    store::remove_tree(&vol.path, &id);
                }
                e
            };
            let f = if size >= DIRECT_MIN && super::direct::worthwhile_at(&out.dir) {
                let open = |direct: bool| {
                    let extra = if direct {
                        OFlags::DIRECT
                    } else {
                        // A refused O_DIRECT open may have created the file already.
                        let _ = rustix::fs::unlinkat(&out.dir, &out.name, AtFlags::empty());
                        OFlags::empty()
                    };
                    kernel_fs::create_new_at(&out.dir, &out.name, file_mode, extra)
                };
                let mut w = DirectWriter::create_with(open).map_err(|e| fail(Error::io(p, e)))?;
                seal(src, &mut w).map_err(fail)?;
                w.finish().map_err(|e| fail(Error::io(p, e)))?
            } else {
                let f = out.create(file_mode).map_err(fail)?;
                let mut w = BufWriter::with_capacity(1 << 20, f);
                seal(src, &mut w).map_err(fail)?;
                w.into_inner()
                    .map_err(|e| fail(Error::io(p, e.into_error())))?
            };
            if vol.opts.sync_each_file {
                f.sync_all().map_err(|e| fail(Error::io(p, e)))?;
            }
            let root = root.get();
            Ok((
                FileEntry::new_file(id, size, root, mode),
                tree.map(|(_, path)| path),
            ))
        }
        Protection::Authenticated => {
            let k = crypto::file_mac_key(key, &id)?;
            let (root, outboard) = match out {
                Some(o) => {
                    let f = o.create(file_mode)?;
                    let mut w = BufWriter::with_capacity(1 << 20, f);
                    let r = codec::seal_authenticated_with(
                        vol.opts.threads,
                        &k,
                        region.chunk_len,
                        size,
                        src,
                        Some(&mut w),
                        &label,
                    )?;
                    let f = w
                        .into_inner()
                        .map_err(|e| Error::io(&o.label, e.into_error()))?;
                    if vol.opts.sync_each_file {
                        f.sync_all().map_err(|e| Error::io(&o.label, e))?;
                    }
                    r
                }
                None => codec::seal_authenticated_with(
                    vol.opts.threads,
                    &k,
                    region.chunk_len,
                    size,
                    src,
                    None,
                    &label,
                )?,
            };
            let tree = if outboard.is_empty() {
                None
            } else {
                let (mut f, p) = store::create_tree(&vol.path, &id)?;
                f.write_all(&outboard)
                    .and_then(|_| {
                        if vol.opts.sync_each_file {
                            f.sync_all()
                        } else {
                            Ok(())
                        }
                    })
                    .map_err(|e| Error::io(&p, e))?;
                Some(p)
            };
            Ok((FileEntry::new_file(id, size, Some(root), mode), tree))
        }
        Protection::NotProtected => Err(Error::NotProtected {
            path: label,
            region: region.embed_point.to_string(),
        }),
    }
}

impl Volume {
    /// Write a new version of the kernel-region file `path` (contents: `size` bytes of `src`) to
    /// its shadow. Nothing is visible until [`Volume::commit`].
    pub fn stage_file(
        &self,
        path: &EmbedPath,
        size: u64,
        mode: u32,
        src: &mut impl Read,
    ) -> Result<StagedFile> {
        let region = self.region_for(path).ok_or_else(|| Error::NoRegion {
            path: path.to_string(),
        })?;
        let loc = KernelPath::of(region, path).ok_or_else(|| Error::Ephemeral {
            path: path.to_string(),
            region: region.embed_point.to_string(),
        })?;
        let id = FileId::random()?;
        let writer = self.writer_guard()?;
        let out = Output::shadow(&loc, &id, path)?;
        let (entry, outboard) =
            seal_version(self, region, path, id, size, mode, src, Some(&out), true)
                .inspect_err(|_| out.remove())?;
        let shadow = out.label;
        let whole_len = match (&entry.kind, region.protection, &outboard) {
            (
                FileKind::File {
                    size, root: None, ..
                },
                Protection::Encrypted,
                None,
            ) => crate::format::layout::enc_file_len(*size, region.chunk_len),
            _ => None,
        };
        Ok(StagedFile {
            path: path.clone(),
            entry,
            shadow,
            kernel: loc.full(),
            loc,
            outboard,
            _writer: writer,
            whole_len,
            unsynced: false,
        })
    }

    /// Apply `changes` to the fspf and commit it (caller holds [`Volume::lock`]).
    ///
    /// If another process committed since this volume was opened, the on-disk fspf is accepted only
    /// when its tag equals `trusted_tag` (the run's trust anchor); changes are merged onto it.
    pub fn commit(&mut self, changes: Vec<Change>, trusted_tag: Option<Tag>) -> Result<Tag> {
        self.commit_announced(changes, trusted_tag, None, &mut |_| Ok(()))
    }

    /// [`Volume::commit`], calling `announce(new_tag)` once the new fspf is durable in its temp
    /// file and before it replaces the old one (the commit point). A trust anchor records the
    /// new tag there beside the old one, so that a crash between the commit point and the
    /// anchor's update leaves a state the anchor accepts (P9); an `Err` aborts the commit.
    /// `current`: what the caller's look at the disk under the same lock found
    /// ([`Volume::disk_tag_locked`]), so that the commit does not look again.
    pub fn commit_announced(
        &mut self,
        changes: Vec<Change>,
        trusted_tag: Option<Tag>,
        current: Option<super::CurrentOnDisk<'_>>,
        announce: &mut dyn FnMut(Tag) -> Result<()>,
    ) -> Result<Tag> {
        let fspf = self.path.clone();
        let cleanup = |changes: &[Change]| {
            for c in changes {
                match c {
                    Change::Put(s) => s.discard(&fspf),
                    Change::Update(u) => u.discard(),
                    _ => {}
                }
            }
        };
        let open_log = match self.follow_disk(trusted_tag, current) {
            Ok(l) => l,
            Err(e) => {
                cleanup(&changes);
                return Err(e);
            }
        };
        // The changes go through `tx`, which remembers what each replaced: O(changes), on
        // either backing (a volume over a frozen index is not parsed).
        let mut tx = Tx::default();
        let mut garbage: Vec<FileId> = Vec::new();
        // Updates to apply after the commit point, and the first one that no longer fits.
        let mut updates: Vec<&super::update::StagedUpdate> = Vec::new();
        let mut conflict: Option<&super::update::StagedUpdate> = None;
        // A change that would leave hard links inconsistent (the frontends never queue one).
        let mut invalid: Option<Error> = None;
        // Shadows to move into place once the commit is durable.
        let mut post: Vec<&StagedFile> = Vec::new();
        // Versions staged and then removed within this batch: never published, shadows dropped.
        let mut dropped: Vec<&StagedFile> = Vec::new();
        // Index into `post` by path: the renames below run in parallel, in no order, so only
        // the last version of a path in this batch may be among them; earlier ones are dropped.
        let mut post_index: std::collections::HashMap<&EmbedPath, usize> =
            std::collections::HashMap::new();
        for c in &changes {
            match c {
                Change::Put(s) => {
                    let e = Some(s.entry.clone());
                    self.tx_replace_into(&mut tx, &s.path, e, &mut garbage, &mut invalid);
                    match post_index.entry(&s.path) {
                        std::collections::hash_map::Entry::Occupied(o) => {
                            let slot = &mut post[*o.get()];
                            dropped.push(*slot);
                            *slot = s;
                        }
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(post.len());
                            post.push(s);
                        }
                    }
                }
                Change::PutEntry(p, e) => {
                    let e = Some(e.clone());
                    self.tx_replace_into(&mut tx, p, e, &mut garbage, &mut invalid);
                }
                Change::Link { link, target, ns } => {
                    let free = self.lookup(link).is_none();
                    match self.lookup(target).map(|e| e.into_owned()) {
                        Some(mut e)
                            if free
                                && matches!(
                                    e.kind,
                                    FileKind::File { .. } | FileKind::Special { .. }
                                ) =>
                        {
                            e.links.push(link.clone());
                            e.ctime_ns = e.ctime_ns.max(*ns);
                            self.tx_set(&mut tx, target, Some(e));
                            let l = FileEntry {
                                kind: FileKind::Link(target.clone()),
                                mode: 0,
                                mtime_ns: 0,
                                owner: None,
                                ino: None,
                                ctime_ns: 0,
                                links: Vec::new(),
                            };
                            self.tx_set(&mut tx, link, Some(l));
                        }
                        _ => {
                            invalid.get_or_insert(Error::Invalid {
                                path: link.to_string(),
                                reason: format!(
                                    "a hard link to {target}, which is not a listed file, or the name is taken"
                                ),
                            });
                        }
                    }
                }
                Change::Remove(p) => {
                    post.retain(|s| {
                        let keep = !s.path.starts_with(p);
                        if !keep {
                            dropped.push(s);
                        }
                        keep
                    });
                    post_index = post.iter().enumerate().map(|(i, s)| (&s.path, i)).collect();
                    let below = self.paths_below(p);
                    for k in &below {
                        // Links below `p` go with it; a file whose links stay is refused.
                        let listed = match self.has_links() {
                            true => self.lookup(k).map(|e| e.into_owned()),
                            false => None,
                        };
                        if let Some(mut e) = listed.filter(|e| !e.links.is_empty()) {
                            e.links.retain(|l| !l.starts_with(p));
                            self.tx_set(&mut tx, k, Some(e));
                        }
                        self.tx_replace_into(&mut tx, k, None, &mut garbage, &mut invalid);
                    }
                }
                Change::Update(u) => {
                    let current = self.lookup(&u.path).map(|e| e.into_owned());
                    let base = match &current {
                        Some(FileEntry {
                            kind:
                                FileKind::File {
                                    id, root: Some(r), ..
                                },
                            ..
                        }) if *id == u.id => *r,
                        _ => [0; 32],
                    };
                    match current {
                        Some(e) if base == u.base_root => {
                            // The staged entry (content, mode, owner, times); the inode number
                            // stays what it is.
                            let mut n = u.entry.clone();
                            n.ino = e.ino;
                            n.links = e.links;
                            self.tx_set(&mut tx, &u.path, Some(n));
                            updates.push(u);
                        }
                        _ => conflict = Some(u),
                    }
                }
                Change::Touch { dir, ns } => match self.lookup(dir).map(|e| e.into_owned()) {
                    Some(mut e) => {
                        if matches!(e.kind, FileKind::Dir) {
                            e.mtime_ns = e.mtime_ns.max(*ns);
                            e.ctime_ns = e.ctime_ns.max(*ns);
                            self.tx_set(&mut tx, dir, Some(e));
                        }
                    }
                    None => {
                        let root = self
                            .meta
                            .region_for(dir)
                            .is_some_and(|r| &r.embed_point == dir);
                        if !root && self.has_below(dir) {
                            let e = FileEntry {
                                links: Vec::new(),
                                kind: FileKind::Dir,
                                mode: 0o755,
                                mtime_ns: *ns,
                                ctime_ns: *ns,
                                owner: None,
                                ino: None,
                            };
                            self.tx_set(&mut tx, dir, Some(e));
                        }
                    }
                },
                Change::Rename { from, to } => {
                    let now = crate::format::metadata::now_ns();
                    let moved = self.paths_below(from);
                    // The name moved over: a link goes (its target no longer lists it, even
                    // when the target is what moves), a file with links must have lost them.
                    if from != to && !moved.is_empty() {
                        self.tx_replace_into(&mut tx, to, None, &mut garbage, &mut invalid);
                    }
                    for k in &moved {
                        let Some(dest) = k.rebased(from, to) else {
                            continue;
                        };
                        if let Some(mut e) = self.tx_set(&mut tx, k, None) {
                            // The entry keeps the inode number it showed (FORMAT.md §2); a
                            // hard link shows its target's and records none. (An entry that
                            // records none counts for no number, so the one it showed is the
                            // same with it gone.)
                            if e.ino.is_none() && !matches!(e.kind, FileKind::Link(_)) {
                                e.ino = Some(self.ino_of(k, None));
                            }
                            if k == from {
                                // A rename changes the moved object's status, as on Linux.
                                e.ctime_ns = now;
                            }
                            if let Some(FileEntry {
                                kind: FileKind::File { id, .. },
                                ..
                            }) = self.tx_set(&mut tx, &dest, Some(e))
                            {
                                garbage.push(id);
                            }
                        }
                    }
                    if self.has_links() {
                        self.relink_moved(&mut tx, from, to, &moved);
                    }
                }
            }
        }
        if let Some(e) = invalid {
            self.rollback(tx);
            cleanup(&changes);
            return Err(e);
        }
        if let Some(u) = conflict {
            let current = match self.lookup(&u.path).map(|e| e.kind.clone()) {
                Some(FileKind::File { root: Some(r), .. }) => hex::encode(r),
                Some(_) => "another kind of entry".into(),
                None => "removed".into(),
            };
            let e = Error::UpdateConflict {
                path: u.path.to_string(),
                base: hex::encode(u.base_root),
                current,
            };
            self.rollback(tx);
            cleanup(&changes);
            return Err(e);
        }
        // Appended chunks of updates: written in place now, durable before the commit point
        // (they lie past the committed data's end, so nothing a reader uses changes).
        for u in &updates {
            let loc = self.kernel_path(&u.path).and_then(|l| l.parent().ok());
            let at = loc.as_ref().map(|(d, n)| (d, n.as_os_str()));
            if let Err(e) = u.write_direct(&self.path, at) {
                self.rollback(tx);
                cleanup(&changes);
                return Err(e);
            }
        }
        let unsynced: Vec<&StagedFile> = post.iter().filter(|s| s.unsynced).copied().collect();
        let carried = match self.persist(&tx, &updates, &unsynced, open_log, announce) {
            Ok(c) => c,
            Err(e) => {
                self.rollback(tx);
                cleanup(&changes);
                return Err(e);
            }
        };
        // What the log now carries: the journals still in memory and the small versions went
        // into the record, and a file with a chain in the log keeps its path and root current.
        for u in &updates {
            if let Some(b) = u.inline_bytes() {
                self.logj.insert(u.path.clone(), b);
            }
        }
        for (p, b) in carried {
            self.logj.insert_version(p, b);
        }
        if self.logj.has_files() {
            let entries: Vec<(EmbedPath, FileEntry)> = tx
                .touched
                .iter()
                .filter_map(|p| self.lookup(p).map(|e| (p.clone(), e.into_owned())))
                .collect();
            self.logj.entries(entries.iter().map(|(p, e)| (p, e)));
        }
        // Independent renames; in parallel because a large `addf` moves tens of thousands of
        // shadows and this is otherwise its longest serial step. A failed rename is harmless:
        // the committed shadow stays and `roll_forward` moves it on the next open.
        // Not in the preload shield: its processes fork, and a rayon pool does not survive fork.
        // A few renames stay on this thread: a pool job sent from outside the pool wakes a
        // worker and waits for it, which costs more than a rename.
        let rename = |s: &&StagedFile| s.publish();
        if !self.opts.threads.pool || post.len() < PARALLEL_RENAMES_MIN {
            post.iter().for_each(rename);
        } else {
            post.par_iter().for_each(rename);
        }
        for s in dropped {
            s.discard(&self.path);
        }
        // Journals: applied now where the file is where the entry says; any left (the file
        // moves in this batch, or an error) are applied by the next open (roll-forward).
        for u in updates {
            let root = u.root();
            let live = matches!(
                self.lookup(&u.path).map(|e| e.kind.clone()),
                Some(FileKind::File { id, root: Some(r), .. }) if id == u.id && r == root
            );
            if !live {
                continue;
            }
            let in_file = u.inline_bytes().is_none();
            let _ = self.apply_committed(&u.path, &u.id, &root, u.journal_len, in_file);
        }
        // Outboards of versions no longer referenced are garbage now that the commit is durable.
        // A version's id is listed at one path at most, and every path whose entry changed is
        // in `tx`: a replaced id still listed is listed at one of those.
        let live: std::collections::HashSet<FileId> = tx
            .touched
            .iter()
            .filter_map(|p| match self.lookup(p).map(|e| e.kind.clone()) {
                Some(FileKind::File { id, .. }) => Some(id),
                _ => None,
            })
            .collect();
        for id in garbage.into_iter().filter(|i| !live.contains(i)) {
            store::remove_tree(&self.path, &id);
            self.drop_journals(&id);
        }
        Ok(self.tag)
    }
}

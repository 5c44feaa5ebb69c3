//! The commit protocol of a session: the queued changes become one new fspf, atomically, and the
//! run's anchor moves with the commit point.
//!
//! 1. Kernel side before the commit: files removed or renamed move to shadow names
//!    (crash-safe, [`crate::volume::moves`]).
//! 2. One `syncfs` per kernel region touched: staged shadows and those moves are durable
//!    (small new versions ride in the log record instead and need none; a few removals need
//!    only an `fsync` of their directories).
//! 3. Under the run's anchor lock and the fspf's lock file (other runs, the CLI): settle a
//!    crashed committer's announced tag (one look at the disk, which the commit then trusts
//!    instead of looking again: [`crate::volume::Volume::disk_tag_locked`]); rebase
//!    append-only versions onto what another process of the run committed meanwhile, write the
//!    new fspf to a temporary, announce its tag in the anchor, rename it into place (the
//!    commit point), publish the tag alone.
//! 4. Kernel side after the commit: shadows of moved files are renamed to their names,
//!    directories removed by the batch are removed.
//!
//! A failure before the commit point undoes the moves and removes the staged shadows: the old
//! state stays, and the caller reports the changes lost.
use super::{Anchor, AppendDelta, Session, ViewError};
use crate::format::metadata::{FileKind, RegionKind};
use crate::policy::EmbedPath;
use crate::volume::{Change, KernelPath, PreparedMove};
use crate::{Tag, Volume};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// Removals moved aside before one commit whose directories are synced one by one; more are
/// made durable with one `syncfs` per region.
const MOVES_SYNCED_BY_DIR: usize = 8;

/// What commits since the frontend last asked made of the files it may hold open.
#[derive(Debug, Default)]
pub struct Committed {
    /// At least one commit happened.
    pub any: bool,
    /// Committed file versions: path, version, size.
    pub files: Vec<(EmbedPath, crate::Version, u64)>,
    /// Versions rebased onto another process's commit: their merged plaintext.
    pub merged: BTreeMap<EmbedPath, Vec<u8>>,
}

/// Files this batch removes and then writes again under the same name (SQLite's `-journal` of
/// the next transaction, a log rotated in place): every change naming the path is a removal or
/// a new whole version, the first a removal and the last a version. Their old kernel file need
/// not move aside before the commit: the last version's shadow is renamed over it after the
/// commit point, and until then the old state (the old file at its name) stays readable.
pub(super) fn removed_then_written(changes: &[Change]) -> BTreeSet<EmbedPath> {
    // Per path named by removals and versions: is the last of them a version?
    let mut last_written: BTreeMap<&EmbedPath, bool> = BTreeMap::new();
    let mut first_removed: BTreeSet<&EmbedPath> = BTreeSet::new();
    let mut removed: BTreeSet<&EmbedPath> = BTreeSet::new();
    // Paths some other change names: they keep the general protocol.
    let mut other: BTreeSet<&EmbedPath> = BTreeSet::new();
    for c in changes {
        match c {
            Change::Remove(p) => {
                if !last_written.contains_key(p) {
                    first_removed.insert(p);
                }
                removed.insert(p);
                last_written.insert(p, false);
            }
            Change::Put(s) => {
                last_written.insert(&s.path, true);
            }
            // A rename in the batch might move the name or a directory above it.
            Change::Rename { .. } => return BTreeSet::new(),
            Change::Link { link, target, .. } => other.extend([link, target]),
            Change::PutEntry(p, _) => {
                other.insert(p);
            }
            Change::Update(u) => {
                other.insert(&u.path);
            }
            Change::Touch { .. } => {}
        }
    }
    // Nor when a directory above the name is removed (`rm -r d; mkdir d; echo > d/f`).
    let above_removed = |p: &EmbedPath| {
        std::iter::successors(p.parent(), |d| d.parent()).any(|d| removed.contains(&d))
    };
    last_written
        .iter()
        .filter(|(p, &w)| w && first_removed.contains(*p) && !other.contains(*p))
        .filter(|(p, _)| !above_removed(p))
        .map(|(p, _)| (*p).clone())
        .collect()
}

/// Remove the shadows (and outboards) of changes that will not be committed.
fn cleanup_staged(fspf: &std::path::Path, changes: &[Change]) {
    for c in changes {
        match c {
            Change::Put(s) => s.discard(fspf),
            Change::Update(u) => u.discard(),
            _ => {}
        }
    }
}

impl<A: Anchor> Session<A> {
    /// What was committed since the last call (the frontend moves its open buffers onto it).
    pub fn take_committed(&mut self) -> Committed {
        std::mem::take(&mut self.committed)
    }

    /// Commit everything queued (nothing to do when the queue is empty). See the module docs.
    pub fn commit(&mut self) -> Result<(), ViewError> {
        if self.queue.is_empty() {
            return Ok(());
        }
        let say = self.cfg.say;
        let mut changes = std::mem::take(&mut self.queue);
        self.touches.clear();
        let appends = std::mem::take(&mut self.appends);
        let updates = std::mem::take(&mut self.updates);
        self.queued.clear();
        self.staged_bytes = 0;
        let Some(vol) = self.vol.as_ref() else {
            cleanup_staged(&self.cfg.fspf, &changes);
            return Err(ViewError::Untrusted);
        };
        // Kernel side of queued removals: files move to their shadow names now, directories
        // are removed once the commit is durable.
        let mut preps = Vec::new();
        let mut gone_dirs: Vec<(EmbedPath, KernelPath)> = Vec::new();
        // Removals with nothing to make durable before the commit point: a directory (removed
        // after it), or a file moved aside whose directory is synced below.
        let mut settled: BTreeSet<EmbedPath> = BTreeSet::new();
        let rewritten = removed_then_written(&changes);
        for c in &changes {
            if let Change::Remove(p) = c {
                if self.pending.removed.get(p) == Some(&true) {
                    settled.insert(p.clone());
                    if let Some(k) = vol.kernel_path(p) {
                        gone_dirs.push((p.clone(), k));
                    }
                } else if rewritten.contains(p) {
                    // A file: the new version's shadow replaces it by its rename after the
                    // commit point, as it replaces any older version. Nothing to move aside
                    // (and no directory to sync) before it.
                    settled.insert(p.clone());
                } else if let Ok(Some(m)) = vol.prepare_remove(p) {
                    preps.push(m);
                    settled.insert(p.clone());
                }
            }
        }
        // A few moves: their directories are synced; many: one `syncfs` per region instead.
        let sync_moves = preps.len() <= MOVES_SYNCED_BY_DIR;
        if !sync_moves {
            settled.clear();
        }
        let fspf = self.cfg.fspf.clone();
        let fail = |preps: Vec<PreparedMove>, changes: &[Change], why: &str, e: ViewError| {
            for m in preps.into_iter().rev() {
                m.abort();
            }
            cleanup_staged(&fspf, changes);
            say(&format!("commit failed, changes lost: {why}"));
            Err(e)
        };
        let mut roots: BTreeSet<PathBuf> = BTreeSet::new();
        // Small new versions ride in the commit's log record instead (FORMAT.md §5b, "Files in
        // the log"): their shadows need no sync before the commit point.
        if vol.log_takes_files() {
            for c in &mut changes {
                match c {
                    Change::Put(s) if s.may_ride_in_log() => s.defer_sync(),
                    _ => {}
                }
            }
        }
        for c in &changes {
            let p = match c {
                Change::Put(s) if s.unsynced => None,
                Change::Put(s) => Some(&s.path),
                Change::Remove(p) if settled.contains(p) => None,
                // Removals and renames of files moved the kernel file to a shadow name before
                // this commit: that rename must be durable before the fspf names the new state.
                Change::Remove(p) | Change::Rename { from: p, .. } => Some(p),
                // An update's journal is fsync'd when staged, beside the fspf.
                Change::PutEntry(..)
                | Change::Touch { .. }
                | Change::Update(_)
                | Change::Link { .. } => None,
            };
            if let Some(RegionKind::Kernel(k)) = p.and_then(|p| vol.region_for(p)).map(|r| &r.kind)
            {
                roots.insert(k.clone());
            }
        }
        for r in &roots {
            if let Ok(f) = std::fs::File::open(r) {
                if let Err(e) = rustix::fs::syncfs(&f) {
                    let why = format!("{}: syncfs: {e}", r.display());
                    return fail(preps, &changes, &why, ViewError::Io);
                }
            }
        }
        if sync_moves {
            if let Some(e) = preps.iter().find_map(|m| m.sync().err()) {
                let why = format!("a removed file's directory: fsync: {e}");
                return fail(preps, &changes, &why, ViewError::Io);
            }
        }
        // The run's committers serialise on the anchor's lock (storage cannot remove it); the
        // fspf's lock file still keeps out other runs and the CLI.
        let alock = match self.anchor.lock() {
            Ok(l) => l,
            Err(e) => {
                return fail(
                    preps,
                    &changes,
                    "the run's trust anchor cannot be locked",
                    e,
                );
            }
        };
        let lock = match Volume::lock(&self.cfg.fspf) {
            Ok(l) => l,
            Err(e) => return fail(preps, &changes, &e.to_string(), ViewError::Io),
        };
        // Under both locks: one look at the disk serves the settle and the commit.
        // (A volume that follows another process's commit below no longer has the state that
        // look found: the commit then looks again, `CurrentOnDisk::log_for`.)
        let (trusted, current) = match self.settle_anchor_locked(Some(&lock)) {
            Ok(t) => t,
            Err(e) => {
                drop(lock);
                let why = "the fspf on disk is not the one this run trusts";
                return fail(preps, &changes, why, e);
            }
        };
        // Appends onto a file another process of the run changed since this one loaded it:
        // look at the run's current state and rebase them onto it.
        let mut merged = BTreeMap::new();
        if !appends.is_empty() || !updates.is_empty() {
            if self.vol.as_ref().is_some_and(|v| v.tag() != trusted) {
                let _ = self.follow(trusted);
            }
            merged = self.rebase_appends(&mut changes, &appends);
            self.rebase_updates(&mut changes, &updates, &mut merged);
        }
        let committed: Vec<(EmbedPath, crate::Version, u64)> = changes
            .iter()
            .filter_map(|c| {
                let (path, kind) = match c {
                    Change::Put(s) => (&s.path, &s.entry.kind),
                    Change::Update(u) => (&u.path, &u.entry.kind),
                    _ => return None,
                };
                match kind {
                    FileKind::File { size, .. } => Some((path.clone(), kind.version()?, *size)),
                    _ => None,
                }
            })
            .collect();
        let anchor = &self.anchor;
        let mut announce = |next: Tag| {
            anchor.announce(trusted, next).map_err(|e| {
                crate::Error::io(&fspf, std::io::Error::other(format!("anchor: {e:?}")))
            })
        };
        let Some(vol) = self.vol.as_mut() else {
            return fail(preps, &[], "no volume", ViewError::Untrusted);
        };
        match vol.commit_announced(changes, Some(trusted), current, &mut announce) {
            Ok(t) => {
                self.anchor.after_commit_point();
                if let Err(e) = self.anchor.publish(t) {
                    // The new fspf is committed and announced: a later settle promotes it.
                    say(&format!("cannot publish the new tag ({e:?})"));
                }
            }
            Err(e) => {
                // If the error came after the commit point (the directory fsync), the announced
                // tag is on disk and the next settle promotes it; otherwise it never appears.
                drop(lock);
                drop(alock);
                for m in preps.into_iter().rev() {
                    m.abort();
                }
                say(&format!("commit failed, changes lost: {e}"));
                return Err(ViewError::of_io(&e));
            }
        }
        drop(lock);
        drop(alock);
        for m in preps {
            m.finish();
        }
        // Deepest first: a directory's subdirectories go before it. One made again in the same
        // batch (`rm -r d; mkdir d`) is listed once more and stays.
        gone_dirs.sort_by_key(|(_, k)| std::cmp::Reverse(k.rel().as_os_str().len()));
        for (p, k) in gone_dirs {
            let again = self
                .vol
                .as_ref()
                .is_some_and(|v| v.lookup(&p).is_some() || v.has_below(&p));
            if !again {
                let _ = crate::volume::kernel_fs::remove_unlisted_dir(k.base(), k.rel());
            }
        }
        // Buffers whose writes went onto another process's state take the committed content.
        for path in std::mem::take(&mut self.remerge) {
            if merged.contains_key(&path) {
                continue;
            }
            if let Some(v) = self.vol.as_ref() {
                if let Ok(data) = committed_content(v, &path) {
                    merged.insert(path, data);
                }
            }
        }
        self.pending.clear();
        self.committed.any = true;
        self.committed.files.extend(committed);
        self.committed.merged.extend(merged);
        Ok(())
    }

    /// Under the commit locks, with the volume at the run's current state: a queued in-place
    /// update whose base another process changed meanwhile is made again from the current
    /// state with the same writes (as the kernel keeps both processes' writes to different
    /// ranges); onto a format-1 version, as a whole version of its content plus the writes. The
    /// update of a file another process removed is dropped, as the kernel drops writes to an
    /// unlinked file. The merged contents of whole versions go into `merged`.
    fn rebase_updates(
        &mut self,
        changes: &mut Vec<Change>,
        updates: &BTreeMap<EmbedPath, Vec<super::UpdateWrites>>,
        merged: &mut BTreeMap<EmbedPath, Vec<u8>>,
    ) {
        let mut i = 0;
        while i < changes.len() {
            let Change::Update(u) = &changes[i] else {
                i += 1;
                continue;
            };
            let Some(vol) = self.vol.as_ref() else {
                break;
            };
            let base = crate::Version {
                id: u.id,
                root: Some(u.base_root),
            };
            let current = vol.lookup(&u.path).and_then(|e| e.kind.version());
            if current == Some(base) {
                i += 1;
                continue;
            }
            u.discard();
            let path = u.path.clone();
            let Some((w, meta)) = updates.get(&path).and_then(|w| Some((w, w.last()?.meta))) else {
                changes.remove(i);
                continue;
            };
            let log = self.cfg.log;
            let Some(cur) = current else {
                log(&format!(
                    "{path}: removed by another process before this one committed its writes; they are dropped"
                ));
                changes.remove(i);
                continue;
            };
            let redone = match vol.update_file(&path) {
                Ok(Some(mut nu)) => super::apply_all(&mut nu, w)
                    .and_then(|()| nu.stage(vol))
                    .map_err(|e| e.to_string())
                    .and_then(|mut s| {
                        s.entry.mode = meta.mode & 0o7777;
                        s.entry.owner = meta.owner;
                        // The writer's buffer takes the merged content after the commit.
                        let data =
                            content_with_writes(vol, &path, w).inspect_err(|_| s.discard())?;
                        merged.insert(path.clone(), data);
                        Ok(Change::Update(s))
                    }),
                Ok(None) => self.whole_with_writes(&path, w).map(|(s, data)| {
                    merged.insert(path.clone(), data);
                    Change::Put(s)
                }),
                Err(e) => Err(e.to_string()),
            };
            match redone {
                Ok(c) => {
                    log(&format!(
                        "{path}: writes applied again onto the version another process committed ({})",
                        cur.id.to_hex()
                    ));
                    changes[i] = c;
                    i += 1;
                }
                Err(e) => {
                    (self.cfg.say)(&format!(
                        "{path}: another process changed the file and this process's writes could not be applied onto it ({e}); they are lost"
                    ));
                    changes.remove(i);
                }
            }
        }
    }

    /// The current content of `path` with `w` applied, staged as a whole version.
    fn whole_with_writes(
        &mut self,
        path: &EmbedPath,
        w: &[super::UpdateWrites],
    ) -> Result<(crate::volume::StagedFile, Vec<u8>), String> {
        let vol = self.vol.as_ref().ok_or("no volume")?;
        let data = content_with_writes(vol, path, w)?;
        let meta = w.last().map(|w| w.meta).ok_or("no writes")?;
        let mut s = self
            .stage(path, data.len() as u64, meta.mode, || &data[..])
            .map_err(|e| format!("{e:?}"))?;
        if let Some(t) = meta.mtime {
            s.entry.mtime_ns = t;
        }
        s.entry.owner = meta.owner;
        Ok((s, data))
    }

    /// Under the commit locks, with the volume at the run's current state: a queued append-only
    /// version whose base another process replaced is re-staged as that version plus the
    /// appended bytes (both writers' appends survive). Returns the merged contents by path.
    fn rebase_appends(
        &mut self,
        changes: &mut [Change],
        appends: &BTreeMap<EmbedPath, AppendDelta>,
    ) -> BTreeMap<EmbedPath, Vec<u8>> {
        let mut merged = BTreeMap::new();
        for c in changes.iter_mut() {
            let Change::Put(s) = c else { continue };
            let Some(d) = appends.get(&s.path) else {
                continue;
            };
            let Some(vol) = self.vol.as_ref() else {
                break;
            };
            let cur = match vol.lookup(&s.path).and_then(|e| e.kind.version()) {
                Some(v) if v != d.base => v.id,
                _ => continue,
            };
            let Ok(mut data) = committed_content(vol, &s.path) else {
                continue;
            };
            data.extend_from_slice(&d.delta);
            let mode = s.entry.mode;
            let path = s.path.clone();
            if let Ok(mut new) = self.stage(&path, data.len() as u64, mode, || &data[..]) {
                (self.cfg.log)(&format!(
                    "{path}: appended {} bytes onto the version another process committed ({})",
                    d.delta.len(),
                    cur.to_hex()
                ));
                new.entry.mtime_ns = s.entry.mtime_ns;
                new.entry.owner = s.entry.owner;
                let old = std::mem::replace(s, new);
                old.discard(&self.cfg.fspf);
                merged.insert(path, data);
            }
        }
        merged
    }
}

/// The committed content of `path` with the writes of `w` applied.
fn content_with_writes(
    vol: &Volume,
    path: &EmbedPath,
    steps: &[super::UpdateWrites],
) -> Result<Vec<u8>, String> {
    let mut data = committed_content(vol, path)?;
    for w in steps {
        data.truncate(w.min_len as usize);
        data.resize(w.len as usize, 0);
        for (o, b) in &w.writes {
            let o = *o as usize;
            data[o..o + b.len()].copy_from_slice(b);
        }
    }
    Ok(data)
}

/// The committed content of `path`, verified.
fn committed_content(vol: &Volume, path: &EmbedPath) -> Result<Vec<u8>, String> {
    let mut r = vol.open_file(path).map_err(|e| e.to_string())?;
    let len = usize::try_from(r.size()).map_err(|e| e.to_string())?;
    let mut data = vec![0u8; len];
    let mut off = 0;
    while off < data.len() {
        match r.read_at(&mut data[off..], off as u64) {
            Ok(0) => return Err("short read".into()),
            Ok(n) => off += n,
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(data)
}

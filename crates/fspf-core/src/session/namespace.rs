//! Namespace and metadata changes: mkdir, unlink/rmdir, rename, symlink, chmod, times.
//!
//! In ephemeral regions a change applies to the in-memory tree at once. In kernel regions it is
//! queued ([`Change`]) and shown by the view through [`super::Pending`] until the next commit;
//! its kernel side effect happens around that commit (`commit.rs`): `rm -r` of N files is one
//! commit, not N. A rename and a symlink commit at once (a rename moves kernel objects that
//! later queued changes name; a symlink is an fspf entry only).
use super::{move_tree, remove_tree, Anchor, EphNode, OpenFiles, Session, ViewError};
use crate::format::metadata::{FileEntry, FileKind, Owner, SpecialKind};
use crate::policy::EmbedPath;
use crate::view::NodeKind;
use crate::volume::{kernel_fs, Change, KernelPath};

/// `renameat2` flag: fail with [`ViewError::Exists`] if the destination exists.
pub const RENAME_NOREPLACE: u32 = 1;

/// What a rename did, for the frontend's buffers and inodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renamed {
    /// Nothing changed: `from` and `to` are one path, or two names of one file.
    Nothing,
    /// `from` moved to `to`. `kept`: the file `to` named had hard links, and moved first to
    /// this one of them, where it lives on.
    Moved { kept: Option<EmbedPath> },
}

impl<A: Anchor> Session<A> {
    /// Reload before a change when the anchor moved (kernel regions only).
    fn fresh(&mut self, ep: &EmbedPath) -> Result<bool, ViewError> {
        let eph = self.is_ephemeral(ep);
        if !eph {
            self.refresh()?;
        }
        Ok(eph)
    }

    /// An entry was made or removed at `ep`: the modification and change times of its directory
    /// move to now, as the kernel moves them (kernel regions; queued like a mode and committed
    /// at the next commit point as a [`Change::Touch`], which changes only those two times).
    pub fn touch_parent(&mut self, ep: &EmbedPath) {
        let Some(dir) = ep.parent() else { return };
        if self.is_ephemeral(&dir) || self.vol.is_none() {
            return;
        }
        let now = crate::format::metadata::now_ns();
        self.pending.times.insert(dir.clone(), now);
        self.pending.ctimes.insert(dir.clone(), now);
        if let Some(&i) = self.touches.get(&dir) {
            if let Some(Change::Touch { ns, .. }) = self.queue.get_mut(i) {
                *ns = now;
                return;
            }
        }
        self.touches.insert(dir.clone(), self.queue.len());
        self.queue.push(Change::Touch { dir, ns: now });
    }

    /// The path whose entry holds what `ep` names: a hard link's target, else `ep`. Frontends
    /// key their buffers and inodes by it.
    pub fn canonical(&self, open: &dyn OpenFiles, ep: &EmbedPath) -> EmbedPath {
        self.link_target(open, ep).unwrap_or_else(|| ep.clone())
    }

    /// The target of the hard link listed at `ep`, if one is (and not removed since).
    pub fn link_target(&self, open: &dyn OpenFiles, ep: &EmbedPath) -> Option<EmbedPath> {
        let fe = super::Joined {
            open,
            eph: &self.eph,
            queued: &self.queued,
        };
        self.view(&fe).ok()?.link_target(ep)
    }

    /// The other names of the file listed at `ep` (its hard links), committed.
    fn links_of(&self, ep: &EmbedPath) -> Vec<EmbedPath> {
        let vol = self.vol.as_ref().filter(|v| v.has_links());
        match vol.and_then(|v| v.lookup(ep)) {
            Some(e) if !self.pending.hidden(ep) => e.into_owned().links,
            _ => Vec::new(),
        }
    }

    /// A hard link at `link` to what `target` names (a regular or special file; hard links
    /// followed, symlinks not): an fspf entry only, committed at once. A directory or symlink
    /// cannot be linked ([`ViewError::NotPermitted`]), nor anything in an ephemeral region;
    /// another region is [`ViewError::CrossDevice`]. The frontend stages its buffers before,
    /// so that a file being written is listed.
    pub fn link(
        &mut self,
        open: &dyn OpenFiles,
        target: &EmbedPath,
        link: &EmbedPath,
        now: i64,
    ) -> Result<(), ViewError> {
        let (rt, rl) = (
            self.region_of(target).map(|r| r.embed_point.clone()),
            self.region_of(link).map(|r| r.embed_point.clone()),
        );
        if rt != rl {
            return Err(ViewError::CrossDevice);
        }
        if self.fresh(link)? {
            return Err(ViewError::NotPermitted);
        }
        let node = self.lookup(open, target)?;
        match node.kind {
            NodeKind::File | NodeKind::Special { .. } => {}
            NodeKind::Dir | NodeKind::Symlink(_) => return Err(ViewError::NotPermitted),
        }
        self.check_new_name(open, link)?;
        self.check_writable(link)?;
        let target = self.canonical(open, target);
        // The target's queued version and entries first: the link names a listed file.
        self.commit()?;
        self.queue.push(Change::Link {
            link: link.clone(),
            target,
            ns: now,
        });
        self.touch_parent(link);
        self.commit()
    }

    /// Remove the file (`dir == false`) or empty directory (`dir == true`) at `ep`. The
    /// frontend drops its buffers at or below `ep` after this succeeded; `Some(p)`: `ep` was
    /// a file with hard links, which now lives on at `p` (one of them, committed at once): the
    /// frontend moves its buffers from `ep` to `p` instead.
    pub fn unlink(
        &mut self,
        open: &dyn OpenFiles,
        ep: &EmbedPath,
        dir: bool,
    ) -> Result<Option<EmbedPath>, ViewError> {
        let eph = self.fresh(ep)?;
        if !dir && !eph {
            if self.link_target(open, ep).is_some() {
                // One name of a file: the link goes, the file's link count with it (at once,
                // with whatever is queued).
                self.check_writable(ep)?;
                self.queue.push(Change::Remove(ep.clone()));
                self.touch_parent(ep);
                self.commit()?;
                return Ok(None);
            }
            if let Some(next) = self.links_of(ep).first().cloned() {
                // A file with other names: it moves to the first of them.
                self.check_writable(ep)?;
                self.rename_same_file(open, ep, &next)?;
                return Ok(Some(next));
            }
        }
        let node = self.lookup(open, ep)?;
        match (&node.kind, dir) {
            (NodeKind::Dir, false) => return Err(ViewError::IsDir),
            (NodeKind::Dir, true) => {
                if self.region_of(ep).is_some_and(|r| &r.embed_point == ep) {
                    return Err(ViewError::Busy);
                }
                if !self.children(open, ep).is_empty() {
                    return Err(ViewError::NotEmpty);
                }
            }
            (_, true) => return Err(ViewError::NotDir),
            _ => {}
        }
        self.check_writable(ep)?;
        if eph {
            remove_tree(&mut self.eph, ep);
            return Ok(None);
        }
        self.pending.new_dirs.remove(ep);
        remove_tree(&mut self.queued, ep);
        // Modes, times and owners set on the removed path must not show on a new one there.
        remove_tree(&mut self.pending.modes, ep);
        remove_tree(&mut self.pending.times, ep);
        remove_tree(&mut self.pending.owners, ep);
        self.pending.removed.insert(ep.clone(), dir);
        self.queue.push(Change::Remove(ep.clone()));
        self.touch_parent(ep);
        Ok(None)
    }

    /// The owner and mode of a new object at `ep` made by `uid`/`gid`, as Linux gives them: the
    /// parent directory's group when it is set-group-ID (and a new directory inherits the
    /// bit), else the creator's group. `mode` is the requested mode after the umask;
    /// `unowned_gid` is the group of a set-group-ID parent that records no owner (whoever
    /// serves the view: the mounting user's group, the running program's).
    #[allow(clippy::too_many_arguments)]
    pub fn new_owner(
        &self,
        open: &dyn OpenFiles,
        ep: &EmbedPath,
        uid: u32,
        gid: u32,
        unowned_gid: u32,
        mode: u32,
        dir: bool,
    ) -> (Owner, u32) {
        const S_ISGID: u32 = 0o2000;
        let parent = ep.parent().and_then(|p| self.lookup(open, &p).ok());
        match parent {
            Some(p) if p.mode & S_ISGID != 0 => (
                Owner {
                    uid,
                    gid: p.owner.map_or(unowned_gid, |o| o.gid),
                },
                if dir { mode | S_ISGID } else { mode },
            ),
            _ => (Owner { uid, gid }, mode),
        }
    }

    /// A new name at `ep` may be created: nothing is there, its parent is a directory, and the
    /// region takes writes.
    pub fn check_new_name(&self, open: &dyn OpenFiles, ep: &EmbedPath) -> Result<(), ViewError> {
        if self.lookup(open, ep).is_ok() {
            return Err(ViewError::Exists);
        }
        let parent = ep.parent().ok_or(ViewError::Exists)?;
        match self.lookup(open, &parent)?.kind {
            NodeKind::Dir => {}
            _ => return Err(ViewError::NotDir),
        }
        self.check_writable(ep)
    }

    /// Make directory `ep` with `mode` (the caller applied its umask).
    pub fn mkdir(
        &mut self,
        open: &dyn OpenFiles,
        ep: &EmbedPath,
        mode: u32,
        owner: Option<Owner>,
        now: i64,
    ) -> Result<(), ViewError> {
        let eph = self.fresh(ep)?;
        self.check_new_name(open, ep)?;
        let mode = mode & 0o7777;
        if eph {
            self.eph
                .insert(ep.clone(), EphNode::Dir { mode, mtime: now });
            return Ok(());
        }
        if let Some(k) = self.region_of(ep).and_then(|r| KernelPath::of(r, ep)) {
            let _ = kernel_fs::create_dirs_like_base(k.base(), k.rel());
        }
        self.pending.new_dirs.insert(ep.clone(), mode);
        self.pending.times.insert(ep.clone(), now);
        if let Some(o) = owner {
            self.pending.owners.insert(ep.clone(), o);
        }
        self.queue.push(Change::PutEntry(
            ep.clone(),
            FileEntry {
                links: Vec::new(),
                kind: FileKind::Dir,
                mode,
                mtime_ns: now,
                ctime_ns: now,
                owner,
                ino: None,
            },
        ));
        self.touch_parent(ep);
        Ok(())
    }

    /// A fifo, device node or socket at `ep`: an fspf entry in kernel regions (nothing is made
    /// on disk), committed at once like a symlink; ephemeral regions hold none
    /// ([`ViewError::NotPermitted`]). The frontend stages its buffers before.
    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &mut self,
        open: &dyn OpenFiles,
        ep: &EmbedPath,
        kind: SpecialKind,
        rdev: u64,
        mode: u32,
        owner: Option<Owner>,
        now: i64,
    ) -> Result<(), ViewError> {
        if self.fresh(ep)? {
            return Err(ViewError::NotPermitted);
        }
        self.check_new_name(open, ep)?;
        let entry = FileEntry {
            links: Vec::new(),
            kind: FileKind::Special { kind, rdev },
            mode: mode & 0o7777,
            mtime_ns: now,
            ctime_ns: now,
            owner,
            ino: None,
        };
        self.queue.push(Change::PutEntry(ep.clone(), entry));
        self.touch_parent(ep);
        self.commit()
    }

    /// `chown` of `ep` (symlinks already followed, or not for `lchown`): recorded like a mode.
    pub fn chown(
        &mut self,
        open: &dyn OpenFiles,
        ep: &EmbedPath,
        owner: Owner,
        now: i64,
    ) -> Result<(), ViewError> {
        let ep = &self.canonical(open, ep);
        let node = self.lookup(open, ep)?;
        if self.is_ephemeral(ep) {
            return Err(ViewError::NotPermitted);
        }
        self.check_writable(ep)?;
        let staged = self.set_queued(ep, |e| {
            e.owner = Some(owner);
            e.ctime_ns = now;
        });
        if let Some(q) = self.queued.get_mut(ep) {
            q.owner = Some(owner);
        }
        if !staged && open.open_file(ep).is_none() {
            let mut e = self.current_entry(ep, node.mode, now)?;
            e.owner = Some(owner);
            e.ctime_ns = now;
            self.queue.push(Change::PutEntry(ep.clone(), e));
        }
        self.pending.owners.insert(ep.clone(), owner);
        self.pending.ctimes.insert(ep.clone(), now);
        Ok(())
    }

    /// Rename `from` to `to` (`flags`: [`RENAME_NOREPLACE`]). In kernel regions everything
    /// queued is committed first (the frontend stages its buffers before), then the rename.
    /// The frontend moves its buffers from `from` to `to` after this succeeded (first from
    /// `to` to the name the replaced file kept, if it kept one: [`Renamed::Moved`]).
    pub fn rename(
        &mut self,
        open: &dyn OpenFiles,
        from: &EmbedPath,
        to: &EmbedPath,
        flags: u32,
    ) -> Result<Renamed, ViewError> {
        if flags & !RENAME_NOREPLACE != 0 {
            return Err(ViewError::Invalid);
        }
        let (rf, rt) = (
            self.region_of(from).map(|r| r.embed_point.clone()),
            self.region_of(to).map(|r| r.embed_point.clone()),
        );
        if rf != rt {
            return Err(ViewError::CrossDevice);
        }
        let eph = self.fresh(from)?;
        let node = self.lookup(open, from)?;
        if from == to {
            return Ok(Renamed::Nothing);
        }
        let mut kept = None;
        if !eph && node.kind != NodeKind::Dir && self.lookup(open, to).is_ok() {
            let (cf, ct) = (self.canonical(open, from), self.canonical(open, to));
            if cf == ct {
                // Two names of one file: nothing happens (POSIX).
                return Ok(Renamed::Nothing);
            }
            if flags & RENAME_NOREPLACE == 0 && &ct == to {
                // A file with other names is replaced: it lives on at the first of them.
                if let Some(next) = self.links_of(&ct).first().cloned() {
                    self.check_writable(from)?;
                    self.rename_same_file(open, &ct, &next)?;
                    kept = Some(next);
                }
            }
        }
        self.rename_checked(open, from, to, flags, eph, node)?;
        Ok(Renamed::Moved { kept })
    }

    /// Move the file listed at `from` (which has hard links) to `link`, one of its links, so
    /// that `from` can go: its kernel file moves as in a rename, the link's entry is replaced,
    /// the other links name `link`.
    fn rename_same_file(
        &mut self,
        open: &dyn OpenFiles,
        from: &EmbedPath,
        link: &EmbedPath,
    ) -> Result<(), ViewError> {
        let node = self.lookup(open, from)?;
        self.rename_checked(open, from, link, 0, false, node)
    }

    /// [`Session::rename`] once hard links are dealt with (`node`: what `from` names).
    fn rename_checked(
        &mut self,
        open: &dyn OpenFiles,
        from: &EmbedPath,
        to: &EmbedPath,
        flags: u32,
        eph: bool,
        node: crate::view::Node,
    ) -> Result<(), ViewError> {
        let rf = self.region_of(from).map(|r| r.embed_point.clone());
        if to.starts_with(from) {
            return Err(ViewError::Invalid);
        }
        if rf.as_ref() == Some(from) {
            return Err(ViewError::Busy);
        }
        match self.lookup(open, to) {
            Ok(t) => {
                if flags & RENAME_NOREPLACE != 0 {
                    return Err(ViewError::Exists);
                }
                match (&node.kind, &t.kind) {
                    (NodeKind::Dir, NodeKind::Dir) if !self.children(open, to).is_empty() => {
                        return Err(ViewError::NotEmpty)
                    }
                    (NodeKind::Dir, NodeKind::Dir) => {}
                    (NodeKind::Dir, _) => return Err(ViewError::NotDir),
                    (_, NodeKind::Dir) => return Err(ViewError::IsDir),
                    _ => {}
                }
            }
            Err(ViewError::NotFound) => {
                let parent = to.parent().ok_or(ViewError::Busy)?;
                match self.lookup(open, &parent)?.kind {
                    NodeKind::Dir => {}
                    _ => return Err(ViewError::NotDir),
                }
            }
            Err(e) => return Err(e),
        }
        self.check_writable(from)?;
        if eph {
            move_tree(&mut self.eph, from, to, |_, _| {});
            return Ok(());
        }
        // A hard link has nothing on disk: a file it replaces is moved aside as in a removal.
        let from_link = self.link_target(open, from).is_some();
        // Everything queued before the rename is committed under the old names first.
        self.commit()?;
        // A file: linked to its new name's shadow and moved to its own around the commit
        // (crash-safe, `volume::moves`); a directory is renamed after the commit.
        let vol = self.vol_ok()?;
        let prep = match from_link {
            true => vol.prepare_remove(to),
            false => vol.prepare_rename(from, to),
        };
        let prep = prep.map_err(|e| {
            (self.cfg.log)(&format!("{from}: {e}"));
            ViewError::Io
        })?;
        let change = Change::Rename {
            from: from.clone(),
            to: to.clone(),
        };
        if let Some(p) = prep {
            self.queue.push(change);
            self.touch_parent(from);
            self.touch_parent(to);
            return match self.commit() {
                Ok(()) => {
                    p.finish();
                    Ok(())
                }
                Err(e) => {
                    p.abort();
                    Err(e)
                }
            };
        }
        let region = self.region_of(from).cloned();
        let (kf, kt) = match &region {
            Some(r) => (KernelPath::of(r, from), KernelPath::of(r, to)),
            None => (None, None),
        };
        self.queue.push(change);
        self.touch_parent(from);
        self.touch_parent(to);
        self.commit()?;
        if let (Some(a), Some(b), false) = (kf, kt, from_link) {
            // Same region, same base; creates b's parents; follows no symlink below the base.
            let _ = kernel_fs::rename_beneath(a.base(), a.rel(), b.rel());
        }
        Ok(())
    }

    /// A symlink at `ep` to `target`: an fspf entry in kernel regions (committed at once;
    /// nothing is written next to protected files); ephemeral regions hold none
    /// ([`ViewError::NotPermitted`]).
    pub fn symlink(
        &mut self,
        open: &dyn OpenFiles,
        target: &[u8],
        ep: &EmbedPath,
        owner: Option<Owner>,
        now: i64,
    ) -> Result<(), ViewError> {
        if self.is_ephemeral(ep) {
            return Err(ViewError::NotPermitted);
        }
        self.refresh()?;
        self.check_new_name(open, ep)?;
        let entry = FileEntry {
            links: Vec::new(),
            kind: FileKind::Symlink(target.to_vec()),
            mode: 0o777,
            mtime_ns: now,
            ctime_ns: now,
            owner,
            ino: None,
        };
        self.queue.push(Change::PutEntry(ep.clone(), entry));
        self.touch_parent(ep);
        self.commit()
    }

    /// The entry at `ep` as the view shows it, to queue with one field changed: the listed one
    /// with the queued mode and time, or, for an implied directory (only paths below it are
    /// listed), a directory entry.
    fn current_entry(&self, ep: &EmbedPath, mode: u32, now: i64) -> Result<FileEntry, ViewError> {
        let mut e = match self.vol_ok()?.lookup(ep) {
            Some(e) => e.into_owned(),
            None => FileEntry {
                links: Vec::new(),
                kind: FileKind::Dir,
                mode,
                mtime_ns: now,
                ctime_ns: now,
                owner: None,
                ino: None,
            },
        };
        if let Some(m) = self.pending.modes.get(ep) {
            e.mode = *m;
        }
        if let Some(t) = self.pending.times.get(ep) {
            e.mtime_ns = *t;
        }
        if let Some(o) = self.pending.owners.get(ep) {
            e.owner = Some(*o);
        }
        if let Some(c) = self.pending.ctimes.get(ep) {
            e.ctime_ns = *c;
        }
        Ok(e)
    }

    /// Set the entry field of a queued version or entry at `ep`; false when none is queued.
    fn set_queued(&mut self, ep: &EmbedPath, f: impl Fn(&mut FileEntry)) -> bool {
        for c in self.queue.iter_mut().rev() {
            match c {
                Change::Put(s) if &s.path == ep => {
                    f(&mut s.entry);
                    return true;
                }
                Change::PutEntry(p, e) if p == ep => {
                    f(e);
                    return true;
                }
                _ => {}
            }
        }
        false
    }

    /// `chmod` of `ep` (symlinks already followed): ephemeral nodes change at once; in kernel
    /// regions the mode is queued as an entry (or set on the queued version) and committed at
    /// the next commit point like a write. The frontend sets it on its open buffer too.
    pub fn chmod(
        &mut self,
        open: &dyn OpenFiles,
        ep: &EmbedPath,
        mode: u32,
        now: i64,
    ) -> Result<(), ViewError> {
        let ep = &self.canonical(open, ep);
        let mode = mode & 0o7777;
        let node = self.lookup(open, ep)?;
        if matches!(node.kind, NodeKind::Symlink(_)) {
            return Err(ViewError::NotSupported);
        }
        if self.is_ephemeral(ep) {
            match self.eph.get_mut(ep) {
                Some(EphNode::Dir { mode: m, .. }) => *m = mode,
                Some(EphNode::File { sealed, .. }) => sealed.entry.mode = mode,
                None => return Err(ViewError::NotPermitted),
            }
            return Ok(());
        }
        self.check_writable(ep)?;
        let staged = self.set_queued(ep, |e| {
            e.mode = mode;
            e.ctime_ns = now;
        });
        if let Some(q) = self.queued.get_mut(ep) {
            q.mode = mode;
        }
        if let Some(m) = self.pending.new_dirs.get_mut(ep) {
            *m = mode;
        }
        if !staged && open.open_file(ep).is_none() {
            let vol = self.vol_ok()?;
            let e = match vol.lookup(ep) {
                Some(e) => {
                    let mut e = e.into_owned();
                    e.mode = mode;
                    e.ctime_ns = now;
                    e
                }
                // An implied directory (only paths below it are listed): record it.
                None => FileEntry {
                    links: Vec::new(),
                    kind: FileKind::Dir,
                    mode,
                    mtime_ns: now,
                    ctime_ns: now,
                    owner: None,
                    ino: None,
                },
            };
            self.queue.push(Change::PutEntry(ep.clone(), e));
        }
        self.pending.modes.insert(ep.clone(), mode);
        self.pending.ctimes.insert(ep.clone(), now);
        Ok(())
    }

    /// The modification time of `ep` (symlinks already followed), recorded like a mode; access
    /// times are not kept. The frontend sets it on its open buffer too.
    pub fn set_mtime(
        &mut self,
        open: &dyn OpenFiles,
        ep: &EmbedPath,
        ns: i64,
    ) -> Result<(), ViewError> {
        let ep = &self.canonical(open, ep);
        let node = self.lookup(open, ep)?;
        if matches!(node.kind, NodeKind::Symlink(_)) {
            return Ok(());
        }
        if self.is_ephemeral(ep) {
            match self.eph.get_mut(ep) {
                Some(EphNode::Dir { mtime, .. }) => *mtime = ns,
                Some(EphNode::File { sealed, mtime }) => {
                    *mtime = ns;
                    sealed.entry.mtime_ns = ns;
                }
                None => {}
            }
            return Ok(());
        }
        self.check_writable(ep)?;
        // Setting times changes the status: the change time is now, whatever time is set.
        let now = crate::format::metadata::now_ns();
        let staged = self.set_queued(ep, |e| {
            e.mtime_ns = ns;
            e.ctime_ns = now;
        });
        if let Some(q) = self.queued.get_mut(ep) {
            q.mtime = ns;
        }
        if !staged && open.open_file(ep).is_none() {
            let mut e = self.current_entry(ep, node.mode, ns)?;
            e.mtime_ns = ns;
            e.ctime_ns = now;
            self.queue.push(Change::PutEntry(ep.clone(), e));
        }
        self.pending.times.insert(ep.clone(), ns);
        self.pending.ctimes.insert(ep.clone(), now);
        Ok(())
    }
}

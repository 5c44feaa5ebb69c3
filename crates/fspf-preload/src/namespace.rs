//! Namespace changes of protected paths, below the hooks: unlink/rmdir, mkdir, rename and
//! symlink. The rules (what may change, how it is queued and committed, the kernel side) are the
//! session's (`fspf_core::session`); here only this process's buffers follow: an unlinked file's
//! buffer is detached, a renamed one is re-keyed, and buffers are staged before a commit. The
//! namespace hooks and the temp-file hooks call these.
use crate::shield::{errno_of, Inner, Live, Shield};
use fspf_core::format::metadata::{Owner, SpecialKind};
use fspf_core::EmbedPath;
use libc::{c_int, c_uint, mode_t};

/// Detach live buffers at or below `ep` (unlinked: they must never be sealed again).
fn detach_live(inner: &mut Inner, ep: &EmbedPath) {
    for (_, b) in fspf_core::session::remove_tree(&mut inner.live, ep) {
        b.lock().unwrap_or_else(|e| e.into_inner()).detached = true;
    }
}

/// Before a namespace change that commits at once in a kernel region (`commits`): this
/// process's buffers staged, and the run's commit lock, held until the caller's commit ends.
fn staged_for_commit(
    sh: &Shield,
    inner: &mut Inner,
    commits: bool,
) -> Result<Option<crate::anchor::AnchorLock>, c_int> {
    if !commits {
        return Ok(None);
    }
    let (staged, lock) = sh.stage_for_commit(inner);
    staged?;
    Ok(lock)
}

/// This process's buffers (and the run's shared ones) of the file at `from` now belong to
/// `to` (a rename, or a file whose name went and which lives on at one of its hard links).
fn moved_live(inner: &mut Inner, from: &EmbedPath, to: &EmbedPath) {
    let replaced = fspf_core::session::move_tree(&mut inner.live, from, to, |dest, b| {
        b.lock().unwrap_or_else(|e| e.into_inner()).path = dest.clone();
    });
    for (_, b) in replaced {
        b.lock().unwrap_or_else(|e| e.into_inner()).detached = true;
    }
    crate::runbuf::renamed(from, to);
}

pub(crate) fn do_unlink(sh: &Shield, ep: EmbedPath, dir: bool) -> Result<(), c_int> {
    let mut g = sh.lock();
    let inner = &mut *g;
    let node = sh.lookup(inner, &ep);
    if let Ok(n) = &node {
        crate::perm::check_dir_change(sh, inner, &ep, Some(n))?;
    }
    // One name of a file with several: committed at once, under the run's commit lock, with
    // this process's buffers staged first.
    let names = !dir && node.as_ref().is_ok_and(|n| n.nlink > 1);
    let commits = names && !inner.s.is_ephemeral(&ep);
    let _run_lock = staged_for_commit(sh, inner, commits)?;
    let r = inner.s.unlink(&Live(&inner.live), &ep, dir);
    if names {
        Shield::after_commit(inner);
    }
    match r.map_err(errno_of)? {
        Some(kept) => moved_live(inner, &ep, &kept),
        None => {
            detach_live(inner, &ep);
            crate::runbuf::unlinked(&ep, dir);
        }
    }
    // Queued like writes and committed at the same points (fsync, fork/exec, exit, batches):
    // `rm -r` of N files costs one commit, not N.
    if inner.s.batch_full() {
        sh.commit(inner)?;
    }
    Ok(())
}

/// This process's effective user and group: the creator of what it makes.
pub(crate) fn creds() -> (u32, u32) {
    // SAFETY: geteuid and getegid take no arguments and cannot fail.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// Owner and mode of a new object at `ep` (`mode` after the umask), as the kernel gives them.
pub(crate) fn new_owner(inner: &Inner, ep: &EmbedPath, mode: u32, dir: bool) -> (Owner, u32) {
    let (uid, gid) = creds();
    inner
        .s
        .new_owner(&Live(&inner.live), ep, uid, gid, gid, mode, dir)
}

/// Before making an object at `ep`: the permission to make it in its directory (when nothing is
/// there yet; otherwise the session answers `EEXIST`), and its owner and mode (`mode` with the
/// umask applied when `umask`).
fn creating(
    sh: &Shield,
    inner: &Inner,
    ep: &EmbedPath,
    mode: u32,
    umask: bool,
    dir: bool,
) -> Result<(Owner, u32), c_int> {
    if sh.lookup(inner, ep).is_err() {
        crate::perm::check_dir_change(sh, inner, ep, None)?;
    }
    let mode = if umask {
        mode & 0o7777 & !crate::umask::now()
    } else {
        mode
    };
    Ok(new_owner(inner, ep, mode, dir))
}

pub(crate) fn do_mkdir(sh: &Shield, ep: EmbedPath, mode: mode_t) -> Result<(), c_int> {
    let mut g = sh.lock();
    let inner = &mut *g;
    let (owner, mode) = creating(sh, inner, &ep, mode, true, true)?;
    inner
        .s
        .mkdir(
            &Live(&inner.live),
            &ep,
            mode,
            Some(owner),
            crate::shield::now(),
        )
        .map_err(errno_of)
}

/// A FIFO, device node or socket in a kernel region: an fspf entry (committed at once), as the
/// FUSE shield records them; nothing is created on disk. Ephemeral regions hold none (`EPERM`).
pub(crate) fn do_mknod(
    sh: &Shield,
    ep: EmbedPath,
    kind: SpecialKind,
    rdev: u64,
    mode: mode_t,
) -> Result<(), c_int> {
    let mut g = sh.lock();
    let inner = &mut *g;
    if inner.s.is_ephemeral(&ep) {
        return match sh.lookup(inner, &ep) {
            Ok(_) => Err(libc::EEXIST),
            Err(libc::ENOENT) => Err(libc::EPERM),
            Err(e) => Err(e),
        };
    }
    let (owner, mode) = creating(sh, inner, &ep, mode, true, false)?;
    let _run_lock = staged_for_commit(sh, inner, true)?;
    let r = inner.s.mknod(
        &Live(&inner.live),
        &ep,
        kind,
        rdev,
        mode,
        Some(owner),
        crate::shield::now(),
    );
    Shield::after_commit(inner);
    r.map_err(errno_of)
}

pub(crate) fn do_rename(
    sh: &Shield,
    from: EmbedPath,
    to: EmbedPath,
    flags: c_uint,
) -> Result<(), c_int> {
    let mut g = sh.lock();
    let inner = &mut *g;
    if let Ok(n) = sh.lookup(inner, &from) {
        use crate::perm;
        perm::check_dir_change(sh, inner, &from, Some(&n))?;
        let replaced = sh.lookup(inner, &to).ok();
        perm::check_dir_change(sh, inner, &to, replaced.as_ref())?;
        // A directory moved to another parent rewrites its `..`: it needs write permission.
        if matches!(n.kind, fspf_core::view::NodeKind::Dir)
            && from.parent() != to.parent()
            && !perm::may(&n, perm::W)
        {
            return Err(libc::EACCES);
        }
    }
    // A rename in a kernel region commits what is queued first: this process's changed
    // buffers are part of it.
    let commits = !inner.s.is_ephemeral(&from);
    let _run_lock = staged_for_commit(sh, inner, commits)?;
    let r = inner.s.rename(&Live(&inner.live), &from, &to, flags);
    Shield::after_commit(inner);
    let kept = match r.map_err(errno_of)? {
        fspf_core::session::Renamed::Nothing => return Ok(()),
        fspf_core::session::Renamed::Moved { kept } => kept,
    };
    if let Some(k) = kept {
        // The replaced file had hard links: it lives on at one of them.
        moved_live(inner, &to, &k);
    }
    match inner.s.link_target(&Live(&inner.live), &to) {
        // A hard link moved: buffers are its file's, not the name's; a file it replaced is gone.
        Some(_) => {
            detach_live(inner, &to);
            crate::runbuf::unlinked(&to, false);
        }
        None => moved_live(inner, &from, &to),
    }
    Ok(())
}

/// A hard link at `ep` to the file `target` names (symlinks already followed or not, as the
/// caller asked): an fspf entry, committed at once with this process's buffers.
pub(crate) fn do_link(sh: &Shield, target: EmbedPath, ep: EmbedPath) -> Result<(), c_int> {
    let mut g = sh.lock();
    let inner = &mut *g;
    if sh.lookup(inner, &ep).is_err() {
        crate::perm::check_dir_change(sh, inner, &ep, None)?;
    }
    let commits = !inner.s.is_ephemeral(&ep);
    let _run_lock = staged_for_commit(sh, inner, commits)?;
    let r = inner
        .s
        .link(&Live(&inner.live), &target, &ep, crate::shield::now());
    Shield::after_commit(inner);
    r.map_err(errno_of)
}

/// A symlink in a kernel region is an fspf entry (committed at once; nothing is written next to
/// protected files); ephemeral regions do not hold symlinks (`EPERM`).
pub(crate) fn do_symlink(sh: &Shield, target: &[u8], ep: EmbedPath) -> Result<(), c_int> {
    let mut g = sh.lock();
    let inner = &mut *g;
    let (owner, _) = creating(sh, inner, &ep, 0o777, false, false)?;
    let commits = !inner.s.is_ephemeral(&ep);
    let _run_lock = staged_for_commit(sh, inner, commits)?;
    let r = inner.s.symlink(
        &Live(&inner.live),
        target,
        &ep,
        Some(owner),
        crate::shield::now(),
    );
    Shield::after_commit(inner);
    r.map_err(errno_of)
}

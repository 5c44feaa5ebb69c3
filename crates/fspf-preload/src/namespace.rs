//! Namespace changes of protected paths, below the hooks: unlink/rmdir, mkdir, rename and
//! symlink. The rules (what may change, how it is queued and committed, the kernel side) are the
//! session's (`fspf_core::session`); here only this process's buffers follow: an unlinked file's
//! buffer is detached, a renamed one is re-keyed, and buffers are staged before a commit. The
//! namespace hooks and the temp-file hooks call these.
use crate::shield::{errno_of, Inner, Live, Shield};
use fspf_core::EmbedPath;
use libc::{c_int, c_uint, mode_t};

/// Detach live buffers at or below `ep` (unlinked: they must never be sealed again).
fn detach_live(inner: &mut Inner, ep: &EmbedPath) {
    for (_, b) in fspf_core::session::remove_tree(&mut inner.live, ep) {
        b.lock().unwrap_or_else(|e| e.into_inner()).detached = true;
    }
}

pub(crate) fn do_unlink(sh: &Shield, ep: EmbedPath, dir: bool) -> Result<(), c_int> {
    let mut g = sh.lock();
    let inner = &mut *g;
    inner
        .s
        .unlink(&Live(&inner.live), &ep, dir)
        .map_err(errno_of)?;
    detach_live(inner, &ep);
    // Queued like writes and committed at the same points (fsync, fork/exec, exit, batches):
    // `rm -r` of N files costs one commit, not N.
    if inner.s.batch_full() {
        sh.commit(inner)?;
    }
    Ok(())
}

pub(crate) fn do_mkdir(sh: &Shield, ep: EmbedPath, mode: mode_t) -> Result<(), c_int> {
    let mut g = sh.lock();
    let inner = &mut *g;
    let mode = mode & 0o7777 & !crate::umask::now();
    inner
        .s
        .mkdir(&Live(&inner.live), &ep, mode, None, crate::shield::now())
        .map_err(errno_of)
}

pub(crate) fn do_rename(
    sh: &Shield,
    from: EmbedPath,
    to: EmbedPath,
    flags: c_uint,
) -> Result<(), c_int> {
    let mut g = sh.lock();
    let inner = &mut *g;
    // A rename in a kernel region commits what is queued first: this process's changed
    // buffers are part of it.
    if !inner.s.is_ephemeral(&from) {
        sh.stage_buffers(inner)?;
    }
    let r = inner.s.rename(&Live(&inner.live), &from, &to, flags);
    Shield::after_commit(inner);
    r.map_err(errno_of)?;
    if from == to {
        return Ok(());
    }
    let replaced = fspf_core::session::move_tree(&mut inner.live, &from, &to, |dest, b| {
        b.lock().unwrap_or_else(|e| e.into_inner()).path = dest.clone();
    });
    for (_, b) in replaced {
        b.lock().unwrap_or_else(|e| e.into_inner()).detached = true;
    }
    Ok(())
}

/// A symlink in a kernel region is an fspf entry (committed at once; nothing is written next to
/// protected files); ephemeral regions do not hold symlinks (`EPERM`).
pub(crate) fn do_symlink(sh: &Shield, target: &[u8], ep: EmbedPath) -> Result<(), c_int> {
    let mut g = sh.lock();
    let inner = &mut *g;
    if !inner.s.is_ephemeral(&ep) {
        sh.stage_buffers(inner)?;
    }
    let r = inner
        .s
        .symlink(&Live(&inner.live), target, &ep, None, crate::shield::now());
    Shield::after_commit(inner);
    r.map_err(errno_of)
}

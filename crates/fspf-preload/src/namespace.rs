//! Namespace changes in the shielded view, below the hooks: unlink/rmdir, mkdir, rename and
//! symlink of protected paths. In kernel regions each change is queued or committed through the
//! shield and then applied to the kernel side; in ephemeral regions it changes the in-memory
//! tree. The namespace hooks and the temp-file hooks call these.
use crate::shield::{EphNode, Inner, NodeKind, Shield};
use fspf_core::format::metadata::{FileEntry, FileKind};
use fspf_core::volume::{kernel_fs, Change, KernelPath};
use fspf_core::EmbedPath;
use libc::{c_int, c_uint, mode_t};

pub(crate) fn remove_tree<V>(
    m: &mut std::collections::BTreeMap<EmbedPath, V>,
    ep: &EmbedPath,
) -> Vec<(EmbedPath, V)> {
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

/// Detach live buffers at or below `ep` (unlinked: they must never be sealed again).
pub(crate) fn detach_live(inner: &mut Inner, ep: &EmbedPath) {
    let keys: Vec<EmbedPath> = inner
        .live
        .keys()
        .filter(|k| k.starts_with(ep))
        .cloned()
        .collect();
    for k in keys {
        if let Some(b) = inner.live.remove(&k) {
            let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
            g.detached = true;
        }
    }
}

pub(crate) fn do_unlink(sh: &Shield, ep: EmbedPath, dir: bool) -> Result<(), c_int> {
    let mut inner = sh.lock();
    let eph = sh.is_ephemeral(&inner, &ep);
    if !eph {
        sh.refresh(&mut inner)?;
    }
    let node = sh.lookup(&inner, &ep)?;
    match (&node.kind, dir) {
        (NodeKind::Dir, false) => return Err(libc::EISDIR),
        (NodeKind::Dir, true) => {
            if sh
                .region_of(&inner, &ep)
                .is_some_and(|r| r.embed_point == ep)
            {
                return Err(libc::EBUSY);
            }
            if !sh.children(&inner, &ep).is_empty() {
                return Err(libc::ENOTEMPTY);
            }
        }
        (_, true) => return Err(libc::ENOTDIR),
        _ => {}
    }
    sh.check_writable(&inner, &ep)?;
    detach_live(&mut inner, &ep);
    if eph {
        remove_tree(&mut inner.eph, &ep);
        return Ok(());
    }
    inner.pending.new_dirs.remove(&ep);
    // Queued like writes and committed at the same points (fsync, fork/exec, exit, batches):
    // `rm -r` of N files costs one commit, not N. Until then the path is hidden from this
    // process's view; the kernel side happens around the commit (`Shield::commit`).
    inner.pending.removed.insert(ep.clone(), dir);
    inner.queue.push(Change::Remove(ep));
    if inner.queue.len() >= crate::shield::commit_every_files() {
        sh.commit(&mut inner)?;
    }
    Ok(())
}

/// A new name at `ep` may be created: nothing is there, its parent is a directory, and the
/// region takes writes.
fn check_new_name(sh: &Shield, inner: &Inner, ep: &EmbedPath) -> Result<(), c_int> {
    if sh.lookup(inner, ep).is_ok() {
        return Err(libc::EEXIST);
    }
    let parent = ep.parent().ok_or(libc::EEXIST)?;
    match sh.lookup(inner, &parent)?.kind {
        NodeKind::Dir => {}
        _ => return Err(libc::ENOTDIR),
    }
    sh.check_writable(inner, ep)
}

pub(crate) fn do_mkdir(sh: &Shield, ep: EmbedPath, mode: mode_t) -> Result<(), c_int> {
    let mut inner = sh.lock();
    let eph = sh.is_ephemeral(&inner, &ep);
    if !eph {
        sh.refresh(&mut inner)?;
    }
    check_new_name(sh, &inner, &ep)?;
    let mode = mode & 0o7777 & !crate::umask::now();
    if eph {
        inner.eph.insert(
            ep,
            EphNode::Dir {
                mode,
                mtime: sh.started,
            },
        );
        return Ok(());
    }
    if let Some(k) = sh
        .region_of(&inner, &ep)
        .and_then(|r| KernelPath::of(r, &ep))
    {
        let _ = kernel_fs::create_dirs_beneath(k.base(), k.rel(), 0o755);
    }
    inner.pending.new_dirs.insert(ep.clone(), mode);
    inner.queue.push(Change::PutEntry(
        ep,
        FileEntry {
            kind: FileKind::Dir,
            mode,
            mtime_ns: crate::shield::now(),
        },
    ));
    Ok(())
}

pub(crate) const RENAME_NOREPLACE: c_uint = 1;

pub(crate) fn do_rename(
    sh: &Shield,
    from: EmbedPath,
    to: EmbedPath,
    flags: c_uint,
) -> Result<(), c_int> {
    if flags & !RENAME_NOREPLACE != 0 {
        return Err(libc::EINVAL);
    }
    let mut inner = sh.lock();
    let (rf, rt) = (
        sh.region_of(&inner, &from).map(|r| r.embed_point.clone()),
        sh.region_of(&inner, &to).map(|r| r.embed_point.clone()),
    );
    if rf != rt {
        return Err(libc::EXDEV);
    }
    let eph = sh.is_ephemeral(&inner, &from);
    if !eph {
        sh.refresh(&mut inner)?;
    }
    let node = sh.lookup(&inner, &from)?;
    if from == to {
        return Ok(());
    }
    if to.starts_with(&from) {
        return Err(libc::EINVAL);
    }
    if rf.as_ref() == Some(&from) {
        return Err(libc::EBUSY);
    }
    match sh.lookup(&inner, &to) {
        Ok(t) => {
            if flags & RENAME_NOREPLACE != 0 {
                return Err(libc::EEXIST);
            }
            match (&node.kind, &t.kind) {
                (NodeKind::Dir, NodeKind::Dir) if !sh.children(&inner, &to).is_empty() => {
                    return Err(libc::ENOTEMPTY)
                }
                (NodeKind::Dir, NodeKind::Dir) => {}
                (NodeKind::Dir, _) => return Err(libc::ENOTDIR),
                (_, NodeKind::Dir) => return Err(libc::EISDIR),
                _ => {}
            }
        }
        Err(libc::ENOENT) => {
            let parent = to.parent().ok_or(libc::EBUSY)?;
            match sh.lookup(&inner, &parent)?.kind {
                NodeKind::Dir => {}
                _ => return Err(libc::ENOTDIR),
            }
        }
        Err(e) => return Err(e),
    }
    sh.check_writable(&inner, &from)?;
    let rekey = |inner: &mut Inner| {
        detach_live(inner, &to);
        let keys: Vec<EmbedPath> = inner
            .live
            .keys()
            .filter(|k| k.starts_with(&from))
            .cloned()
            .collect();
        for k in keys {
            if let Some(b) = inner.live.remove(&k) {
                let rest = k.strip_prefix(&from).unwrap_or_default().to_vec();
                let dest = if rest.is_empty() {
                    to.clone()
                } else {
                    to.join(&rest).unwrap_or_else(|_| to.clone())
                };
                b.lock().unwrap_or_else(|e| e.into_inner()).path = dest.clone();
                inner.live.insert(dest, b);
            }
        }
    };
    if eph {
        remove_tree(&mut inner.eph, &to);
        let moved = remove_tree(&mut inner.eph, &from);
        for (k, v) in moved {
            let rest = k.strip_prefix(&from).unwrap_or_default().to_vec();
            let dest = if rest.is_empty() {
                to.clone()
            } else {
                to.join(&rest).map_err(|_| libc::EINVAL)?
            };
            inner.eph.insert(dest, v);
        }
        rekey(&mut inner);
        return Ok(());
    }
    // Everything queued before the rename is committed under the old names first.
    sh.commit(&mut inner)?;
    rekey(&mut inner);
    let moved_dirs: Vec<EmbedPath> = inner
        .pending
        .new_dirs
        .keys()
        .filter(|d| d.starts_with(&from))
        .cloned()
        .collect();
    for d in moved_dirs {
        inner.pending.new_dirs.remove(&d);
    }
    // A file: linked to its new name's shadow and moved to its own around the commit
    // (crash-safe, fspf-core `moves`); a directory is renamed after the commit.
    let prep = inner
        .vol
        .as_ref()
        .ok_or(libc::EACCES)?
        .prepare_rename(&from, &to)
        .map_err(|e| {
            crate::log(format!("{from}: {e}"));
            libc::EIO
        })?;
    if let Some(p) = prep {
        inner.queue.push(Change::Rename { from, to });
        return match sh.commit(&mut inner) {
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
    let region = sh.region_of(&inner, &from).cloned();
    let (kf, kt) = match &region {
        Some(r) => (KernelPath::of(r, &from), KernelPath::of(r, &to)),
        None => (None, None),
    };
    sh.commit_now(&mut inner, Change::Rename { from, to }, || {
        if let (Some(a), Some(b)) = (kf, kt) {
            // Same region, same base; creates b's parents; follows no symlink below the base.
            let _ = kernel_fs::rename_beneath(a.base(), a.rel(), b.rel());
        }
    })
}

/// A symlink in a kernel region is an fspf entry (committed at once; nothing is written next to
/// protected files); ephemeral regions do not hold symlinks (`EPERM`).
pub(crate) fn do_symlink(sh: &Shield, target: &[u8], ep: EmbedPath) -> Result<(), c_int> {
    let mut inner = sh.lock();
    if sh.is_ephemeral(&inner, &ep) {
        return Err(libc::EPERM);
    }
    sh.refresh(&mut inner)?;
    check_new_name(sh, &inner, &ep)?;
    let entry = FileEntry {
        kind: FileKind::Symlink(target.to_vec()),
        mode: 0o777,
        mtime_ns: crate::shield::now(),
    };
    sh.commit_now(&mut inner, Change::PutEntry(ep, entry), || {})
}

//! Permission checks of the shielded view, as the kernel makes them for its own files: the
//! kernel objects under a protected region belong to whoever wrote them, so their modes and
//! owners say nothing; the fspf's do. Root (effective uid 0) passes every check but `x` on a
//! file with no `x` bit; other users get the owner, group or other class of the mode.
use crate::shield::{Inner, Shield};
use fspf_core::view::{Node, NodeKind};
use fspf_core::EmbedPath;
use libc::{c_int, gid_t, uid_t};

pub const R: u32 = 4;
pub const W: u32 = 2;
pub const X: u32 = 1;

pub fn euid() -> uid_t {
    // SAFETY: plain id query.
    unsafe { libc::geteuid() }
}

/// Is `gid` this process's effective group or one of its supplementary groups?
pub fn in_group(gid: gid_t) -> bool {
    // SAFETY: plain id query.
    if unsafe { libc::getegid() } == gid {
        return true;
    }
    let mut groups = vec![0 as gid_t; 256];
    // SAFETY: `groups` has room for the count passed.
    let n = unsafe { libc::getgroups(groups.len() as c_int, groups.as_mut_ptr()) };
    n > 0 && groups[..n as usize].contains(&gid)
}

/// The owner a node shows: recorded in the fspf, else its kernel object's, else this process's
/// real ids (what `stat` reports).
pub fn owner_of(n: &Node) -> (uid_t, gid_t) {
    if let Some(o) = n.owner {
        return (o.uid, o.gid);
    }
    if let Some(m) = n
        .kernel
        .as_ref()
        .and_then(|k| fspf_core::volume::kernel_fs::stat_beneath(k.base(), k.rel()).ok())
    {
        return (m.st_uid, m.st_gid);
    }
    // SAFETY: plain id queries.
    unsafe { (libc::getuid(), libc::getgid()) }
}

/// May this process access `n` for `want` (a mask of [`R`], [`W`], [`X`])?
pub fn may(n: &Node, want: u32) -> bool {
    let uid = euid();
    if uid == 0 {
        // Root reads and writes anything, searches any directory, and executes a file only
        // when one of its `x` bits is set.
        return want & X == 0 || matches!(n.kind, NodeKind::Dir) || n.mode & 0o111 != 0;
    }
    // The same answer for owner, group and others (0755 directories, 0644 files read): the
    // owner need not be known, which may cost a `stat` of the kernel object.
    let classes = [(n.mode >> 6) & 7, (n.mode >> 3) & 7, n.mode & 7];
    if classes.iter().all(|c| c & want == want) {
        return true;
    }
    if classes.iter().all(|c| c & want != want) {
        return false;
    }
    let (ou, og) = owner_of(n);
    let bits = if uid == ou {
        n.mode >> 6
    } else if in_group(og) {
        n.mode >> 3
    } else {
        n.mode
    } & 7;
    bits & want == want
}

/// Only the owner (or root) may change a node's mode, times or owner: else `EPERM`.
pub fn check_owner(n: &Node) -> Result<(), c_int> {
    let uid = euid();
    if uid == 0 || uid == owner_of(n).0 {
        Ok(())
    } else {
        Err(libc::EPERM)
    }
}

/// Search permission on every directory from the region's embed point down to `ep`'s parent
/// (`EACCES` otherwise), as the kernel checks each component of a path.
///
/// A component that is not a directory gives `ENOTDIR` (for every user), as the kernel's path
/// walk does; a missing one ends the walk (the operation reports `ENOENT` itself).
pub fn check_search(sh: &Shield, inner: &Inner, ep: &EmbedPath) -> Result<(), c_int> {
    let root = euid() == 0;
    if root {
        // Root searches every directory: only a file in the parent's place matters, one lookup
        // (a file further up makes the lookup fail with ENOENT, as the walk would not).
        return match ep.parent().map(|p| sh.lookup(inner, &p)) {
            Some(Ok(n)) if matches!(n.kind, NodeKind::File | NodeKind::Special { .. }) => {
                Err(libc::ENOTDIR)
            }
            _ => Ok(()),
        };
    }
    let Some(top) = sh.region_of(inner, ep).map(|r| r.embed_point.clone()) else {
        return Ok(());
    };
    let mut dirs = Vec::new();
    let mut cur = ep.parent();
    while let Some(d) = cur {
        if !d.starts_with(&top) {
            break;
        }
        cur = d.parent();
        dirs.push(d);
    }
    for d in dirs.iter().rev() {
        match sh.lookup(inner, d) {
            Ok(n) => match n.kind {
                NodeKind::Dir if !may(&n, X) => return Err(libc::EACCES),
                NodeKind::Dir => {}
                // A symlink in a directory position was resolved by the route already.
                NodeKind::Symlink(_) => return Ok(()),
                NodeKind::File | NodeKind::Special { .. } => return Err(libc::ENOTDIR),
            },
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

/// May this process add or remove a name in `ep`'s parent directory (write and search)?
/// And, when `victim` is an existing node being removed or replaced there, the sticky-bit
/// rule: in a sticky directory only the owner of the directory or of the node (or root) may.
pub fn check_dir_change(
    sh: &Shield,
    inner: &Inner,
    ep: &EmbedPath,
    victim: Option<&Node>,
) -> Result<(), c_int> {
    let uid = euid();
    if uid == 0 {
        return Ok(());
    }
    let Some(parent) = ep.parent() else {
        return Ok(());
    };
    let Ok(p) = sh.lookup(inner, &parent) else {
        return Ok(());
    };
    if !matches!(p.kind, NodeKind::Dir) {
        return Ok(());
    }
    if !may(&p, W | X) {
        return Err(libc::EACCES);
    }
    if let Some(v) = victim {
        if p.mode & libc::S_ISVTX != 0 && uid != owner_of(&p).0 && uid != owner_of(v).0 {
            return Err(libc::EPERM);
        }
    }
    Ok(())
}

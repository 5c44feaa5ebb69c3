//! Calls that change what the fspf records besides content (ownership), or what it does not
//! hold in this shield: extended attribute writes, FIFOs and device nodes (the FUSE shield holds
//! them), Unix socket names. In a protected region the latter are refused with an errno (before, they acted on the kernel directory behind the shield:
//! an xattr set through a relative path landed in plaintext on the ciphertext file); elsewhere
//! they pass through, translated in not-protected regions whose kernel path differs.
use super::{by_route, fail};
use crate::shield::{self, Shield};
use crate::{enter, files, real};
use fspf_core::EmbedPath;
use libc::{c_char, c_int, c_void, gid_t, mode_t, size_t, uid_t};

/// Owner and group `stat` shows for a shielded node (see `files::fill_stat`): the recorded
/// owner, else the kernel file's, else this process's.
fn shown_owner(sh: &Shield, ep: &EmbedPath) -> Result<(uid_t, gid_t), c_int> {
    let inner = sh.lock();
    let n = sh.lookup(&inner, ep)?;
    if let Some(o) = n.owner {
        return Ok((o.uid, o.gid));
    }
    if let Some(m) = n
        .kernel
        .as_ref()
        .and_then(|k| fspf_core::volume::kernel_fs::stat_beneath(k.base(), k.rel()).ok())
    {
        return Ok((m.st_uid, m.st_gid));
    }
    // SAFETY: plain id queries.
    Ok(unsafe { (libc::getuid(), libc::getgid()) })
}

use crate::perm::in_group;

/// `chown` of a shielded node, recorded in the fspf like a mode (committed at the next commit
/// point), with the kernel's rules: root changes anything; the owner may only change the group,
/// to one of its own groups; ids of -1 are kept, and a change to what is already there succeeds.
fn chown_shielded(sh: &Shield, ep: EmbedPath, uid: uid_t, gid: gid_t, follow: bool) -> c_int {
    // `chown` and `fchownat` without AT_SYMLINK_NOFOLLOW change what a symlink names.
    let ep = match super::stat::resolve(ep, follow) {
        Ok((ep, Ok(_))) => ep,
        Ok((_, Err(crate::shield::Route::Kernel(k, _)))) => {
            // SAFETY: a NUL-terminated kernel path (a symlink out of the shield).
            return unsafe { real::chown(k.as_ptr(), uid, gid) };
        }
        Ok((_, Err(crate::shield::Route::Deny(e)))) | Err(e) => return fail(e),
        Ok((_, Err(_))) => return fail(libc::EACCES),
    };
    let (cu, cg) = match shown_owner(sh, &ep) {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let nu = if uid == uid_t::MAX { cu } else { uid };
    let ng = if gid == gid_t::MAX { cg } else { gid };
    // As Linux (`chown_ok`, `chgrp_ok`): an id that is given, even unchanged, needs the owner
    // (keeping the uid, or choosing one of its own groups) or root.
    let euid = crate::perm::euid();
    if euid != 0
        && ((uid != uid_t::MAX && (euid != cu || nu != cu))
            || (gid != gid_t::MAX && (euid != cu || (ng != cg && !in_group(ng)))))
    {
        return fail(libc::EPERM);
    }
    if uid == uid_t::MAX && gid == gid_t::MAX {
        return 0;
    }
    let mut inner = sh.lock();
    let owner = fspf_core::format::metadata::Owner { uid: nu, gid: ng };
    if let Err(e) = sh.chown(&mut inner, &ep, owner) {
        return fail(e);
    }
    // As Linux: a chown of a non-directory drops the set-user-ID bit, and the set-group-ID bit
    // of a group-executable file, whoever makes it.
    if let Ok(n) = sh.lookup(&inner, &ep) {
        let dir = matches!(n.kind, fspf_core::view::NodeKind::Dir);
        let mut m = n.mode & !libc::S_ISUID;
        if m & 0o010 != 0 {
            m &= !libc::S_ISGID;
        }
        if !dir && m != n.mode {
            if let Err(e) = sh.chmod(&mut inner, &ep, m) {
                return fail(e);
            }
        }
    }
    0
}

#[no_mangle]
pub unsafe extern "C" fn chown(p: *const c_char, uid: uid_t, gid: gid_t) -> c_int {
    // SAFETY: the program's path.
    unsafe {
        by_route(
            libc::AT_FDCWD,
            p,
            |_, pp| real::chown(pp, uid, gid),
            |sh, ep| chown_shielded(sh, ep, uid, gid, true),
        )
    }
}
#[no_mangle]
pub unsafe extern "C" fn lchown(p: *const c_char, uid: uid_t, gid: gid_t) -> c_int {
    // SAFETY: the program's path.
    unsafe {
        by_route(
            libc::AT_FDCWD,
            p,
            |_, pp| real::lchown(pp, uid, gid),
            |sh, ep| chown_shielded(sh, ep, uid, gid, false),
        )
    }
}
#[no_mangle]
pub unsafe extern "C" fn fchownat(
    d: c_int,
    p: *const c_char,
    uid: uid_t,
    gid: gid_t,
    fl: c_int,
) -> c_int {
    if fl & libc::AT_EMPTY_PATH != 0 {
        // SAFETY: the program's path (an empty path names `d` itself).
        if !p.is_null() && unsafe { *p } == 0 {
            // SAFETY: our `fchown` hook takes only integers; `d` is the descriptor the empty path
            // names.
            return unsafe { fchown(d, uid, gid) };
        }
    }
    // SAFETY: the program's path.
    unsafe {
        by_route(
            d,
            p,
            |dd, pp| real::fchownat(dd, pp, uid, gid, fl),
            |sh, ep| chown_shielded(sh, ep, uid, gid, fl & libc::AT_SYMLINK_NOFOLLOW == 0),
        )
    }
}
#[no_mangle]
pub unsafe extern "C" fn fchown(fd: c_int, uid: uid_t, gid: gid_t) -> c_int {
    if let Some(_g) = enter() {
        if let Some(h) = files::get(fd) {
            let ep = h.lock().unwrap_or_else(|e| e.into_inner()).path.clone();
            return chown_shielded(shield::get(), ep, uid, gid, false);
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `fchown` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::fchown(fd, uid, gid) }
}

/// xattr writes on shielded files: the fspf holds no attributes, and the kernel file's would
/// be plaintext beside the ciphertext (and unauthenticated).
fn xattr_shielded(sh: &Shield, ep: EmbedPath) -> c_int {
    let inner = sh.lock();
    match sh.lookup(&inner, &ep) {
        Ok(_) => fail(libc::ENOTSUP),
        Err(e) => fail(e),
    }
}

macro_rules! xattr_path_hook {
    ($name:ident, ($($a:ident : $t:ty),*)) => {
        #[no_mangle]
        pub unsafe extern "C" fn $name(p: *const c_char, $($a: $t),*) -> c_int {
            // SAFETY: the program's path.
            unsafe {
                by_route(libc::AT_FDCWD, p, |_, pp| real::$name(pp, $($a),*), xattr_shielded)
            }
        }
    };
}
xattr_path_hook!(setxattr, (n: *const c_char, v: *const c_void, s: size_t, f: c_int));
xattr_path_hook!(lsetxattr, (n: *const c_char, v: *const c_void, s: size_t, f: c_int));
xattr_path_hook!(removexattr, (n: *const c_char));
xattr_path_hook!(lremovexattr, (n: *const c_char));

#[no_mangle]
pub unsafe extern "C" fn fsetxattr(
    fd: c_int,
    n: *const c_char,
    v: *const c_void,
    s: size_t,
    f: c_int,
) -> c_int {
    if let Some(_g) = enter() {
        if files::is_shielded(fd) {
            return fail(libc::ENOTSUP);
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `fsetxattr` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::fsetxattr(fd, n, v, s, f) }
}
#[no_mangle]
pub unsafe extern "C" fn fremovexattr(fd: c_int, n: *const c_char) -> c_int {
    if let Some(_g) = enter() {
        if files::is_shielded(fd) {
            return fail(libc::ENOTSUP);
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `fremovexattr` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::fremovexattr(fd, n) }
}

/// A FIFO, device node or socket in a protected region: recorded in the fspf
/// (`namespace::do_mknod`); a regular file or an unknown type: `EPERM`/`EINVAL`.
fn special_shielded(sh: &Shield, ep: EmbedPath, m: mode_t, dev: libc::dev_t) -> c_int {
    use fspf_core::format::metadata::SpecialKind;
    let kind = match (SpecialKind::from_mode(m), m & libc::S_IFMT) {
        (Some(k), _) => k,
        (None, 0 | libc::S_IFREG) => return fail(libc::EPERM),
        (None, _) => return fail(libc::EINVAL),
    };
    let rdev = if matches!(kind, SpecialKind::Char | SpecialKind::Block) {
        dev
    } else {
        0
    };
    match crate::namespace::do_mknod(sh, ep, kind, rdev, m & 0o7777) {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

#[no_mangle]
pub unsafe extern "C" fn mkfifo(p: *const c_char, m: mode_t) -> c_int {
    // SAFETY: the program's path.
    unsafe {
        by_route(
            libc::AT_FDCWD,
            p,
            |_, pp| real::mkfifo(pp, m),
            |sh, ep| special_shielded(sh, ep, libc::S_IFIFO | (m & 0o7777), 0),
        )
    }
}
#[no_mangle]
pub unsafe extern "C" fn mkfifoat(d: c_int, p: *const c_char, m: mode_t) -> c_int {
    // SAFETY: the program's path.
    unsafe {
        by_route(
            d,
            p,
            |dd, pp| real::mkfifoat(dd, pp, m),
            |sh, ep| special_shielded(sh, ep, libc::S_IFIFO | (m & 0o7777), 0),
        )
    }
}
#[no_mangle]
pub unsafe extern "C" fn mknod(p: *const c_char, m: mode_t, dev: libc::dev_t) -> c_int {
    // SAFETY: the program's path.
    unsafe {
        by_route(
            libc::AT_FDCWD,
            p,
            |_, pp| real::mknod(pp, m, dev),
            |sh, ep| special_shielded(sh, ep, m, dev),
        )
    }
}
#[no_mangle]
pub unsafe extern "C" fn mknodat(d: c_int, p: *const c_char, m: mode_t, dev: libc::dev_t) -> c_int {
    // SAFETY: the program's path.
    unsafe {
        by_route(
            d,
            p,
            |dd, pp| real::mknodat(dd, pp, m, dev),
            |sh, ep| special_shielded(sh, ep, m, dev),
        )
    }
}

/// `bind` of a Unix socket to a path: refused in protected regions, translated in not-protected
/// regions with another kernel path; abstract and unnamed sockets and other families pass.
#[no_mangle]
pub unsafe extern "C" fn bind(
    fd: c_int,
    addr: *const libc::sockaddr,
    len: libc::socklen_t,
) -> c_int {
    let Some(_g) = enter() else {
        // SAFETY: the caller's arguments, unchanged, to glibc's own `bind` (resolved
        // with RTLD_NEXT): the caller's contract for this call is that function's contract.
        return unsafe { real::bind(fd, addr, len) };
    };
    let path_off = std::mem::offset_of!(libc::sockaddr_un, sun_path);
    // SAFETY: the program's address of `len` bytes; only read when it is AF_UNIX with a path.
    let is_named_unix = !addr.is_null()
        && len as usize > path_off
        && unsafe { (*addr).sa_family } == libc::AF_UNIX as libc::sa_family_t
        && unsafe { *(addr as *const u8).add(path_off) } != 0;
    if !is_named_unix {
        // SAFETY: the caller's arguments, unchanged, to glibc's own `bind` (resolved
        // with RTLD_NEXT): the caller's contract for this call is that function's contract.
        return unsafe { real::bind(fd, addr, len) };
    }
    // SAFETY: a NUL-terminated path inside the program's sockaddr_un (copied, bounded by len).
    let path: Vec<u8> = unsafe {
        std::slice::from_raw_parts((addr as *const u8).add(path_off), len as usize - path_off)
    }
    .iter()
    .copied()
    .take_while(|&c| c != 0)
    .collect();
    let Ok(cpath) = std::ffi::CString::new(path) else {
        return fail(libc::EINVAL);
    };
    let sh = shield::get();
    match sh.route(libc::AT_FDCWD, cpath.as_ptr()) {
        // SAFETY: the caller's arguments, unchanged, to glibc's own `bind` (resolved
        // with RTLD_NEXT): the caller's contract for this call is that function's contract.
        shield::Route::Pass => unsafe { real::bind(fd, addr, len) },
        shield::Route::Deny(e) => fail(e),
        // The socket is recorded (stat shows it, unlink removes it); it is not reachable by
        // `connect` through the protected path (docs/SHIELD.md).
        shield::Route::Shield(ep) => {
            let r = special_shielded(sh, ep, libc::S_IFSOCK | 0o777, 0);
            if r == 0 {
                // The program's socket is bound to a name only the shield knows: an autobound
                // abstract address makes `listen` and `getsockname` behave.
                // SAFETY: a zeroed sockaddr_un with only the family set is an autobind request.
                let mut un: libc::sockaddr_un = unsafe { std::mem::zeroed() };
                un.sun_family = libc::AF_UNIX as libc::sa_family_t;
                // SAFETY: our own sockaddr of the size of its family field (autobind).
                let _ = unsafe {
                    real::bind(
                        fd,
                        &un as *const libc::sockaddr_un as *const libc::sockaddr,
                        std::mem::size_of::<libc::sa_family_t>() as libc::socklen_t,
                    )
                };
            }
            r
        }
        shield::Route::Kernel(k, _) => {
            // SAFETY: a zeroed sockaddr_un is valid; we fill family and path.
            let mut un: libc::sockaddr_un = unsafe { std::mem::zeroed() };
            un.sun_family = libc::AF_UNIX as libc::sa_family_t;
            let kb = k.as_bytes();
            if kb.len() >= un.sun_path.len() {
                return fail(libc::ENAMETOOLONG);
            }
            for (d, s) in un.sun_path.iter_mut().zip(kb) {
                *d = *s as c_char;
            }
            let l = (path_off + kb.len() + 1) as libc::socklen_t;
            // SAFETY: binding the program's socket to the translated path.
            unsafe { real::bind(fd, (&un as *const libc::sockaddr_un).cast(), l) }
        }
    }
}

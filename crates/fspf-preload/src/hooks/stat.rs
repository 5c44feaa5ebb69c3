//! stat family (sizes are plaintext sizes), access, readlink, realpath, xattrs, chmod/utimens.
use super::{fail, fail_isize, fail_ptr};
use crate::files::{self, fill_stat, fill_statx};
use crate::shield::{self, Node, NodeKind, Route};
use crate::{enter, real};
use fspf_core::EmbedPath;
use libc::{c_char, c_int, c_uint, c_void, mode_t, size_t, ssize_t};

enum Out {
    Stat(*mut libc::stat),
    Statx(*mut libc::statx),
}

fn put(ep: &EmbedPath, node: &Node, out: &Out) -> c_int {
    let started = shield::get().started;
    match *out {
        // SAFETY: the program passed a valid stat buffer.
        Out::Stat(p) => fill_stat(ep, node, started, unsafe { &mut *p }),
        // SAFETY: the program passed a valid statx buffer.
        Out::Statx(p) => fill_statx(ep, node, started, unsafe { &mut *p }),
    }
    0
}

/// Follow symlinks in the shielded view (at most 8) and return what `ep` names.
pub(crate) fn resolve(
    ep: EmbedPath,
    follow: bool,
) -> Result<(EmbedPath, Result<Node, Route>), c_int> {
    let sh = shield::get();
    let mut inner = sh.lock();
    if !sh.is_ephemeral(&inner, &ep) {
        sh.refresh(&mut inner)?;
    }
    // A hard link made by another process since the route was taken names its file.
    let mut ep = inner.s.canonical(&crate::shield::Live(&inner.live), &ep);
    for _ in 0..crate::shield::MAX_SYMLINKS {
        let n = sh.lookup(&inner, &ep)?;
        match (&n.kind, follow) {
            (NodeKind::Symlink(t), true) => {
                let target = shield::link_target(&ep, t);
                match sh.route_bytes(&inner, libc::AT_FDCWD, &target) {
                    Route::Shield(e2) => ep = e2,
                    Route::Pass => {
                        let c = std::ffi::CString::new(target).map_err(|_| libc::EINVAL)?;
                        return Ok((ep, Err(Route::Kernel(c, EmbedPath::root()))));
                    }
                    r => return Ok((ep, Err(r))),
                }
            }
            _ => return Ok((ep, Ok(n))),
        }
    }
    Err(libc::ELOOP)
}

unsafe fn stat_common(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    out: Out,
    real_stat: impl Fn(c_int, *const c_char) -> c_int,
) -> c_int {
    let Some(g) = enter() else {
        return real_stat(dirfd, path);
    };
    // SAFETY: path is null or NUL-terminated.
    let empty = path.is_null() || unsafe { *path } == 0;
    if empty && flags & libc::AT_EMPTY_PATH != 0 {
        if let Some(h) = files::get(dirfd) {
            let (path, node) = fd_node(&h);
            return put(&path, &node, &out);
        }
        drop(g);
        return real_stat(dirfd, path);
    }
    let sh = shield::get();
    match sh.route(dirfd, path) {
        Route::Pass => {
            drop(g);
            real_stat(dirfd, path)
        }
        Route::Kernel(k, _) => real_stat(libc::AT_FDCWD, k.as_ptr()),
        Route::Deny(e) => fail(e),
        Route::Shield(ep) => match resolve(ep, flags & libc::AT_SYMLINK_NOFOLLOW == 0) {
            Ok((ep, Ok(node))) => put(&ep, &node, &out),
            Ok((_, Err(Route::Kernel(k, _)))) => real_stat(libc::AT_FDCWD, k.as_ptr()),
            Ok((_, Err(Route::Deny(e)))) => fail(e),
            Ok(_) => fail(libc::ENOENT),
            Err(e) => fail(e),
        },
    }
}

/// What an open description shows, with the inode number the fspf records for its path (so
/// that `fstat` and `stat` agree after a rename).
fn fd_node(h: &files::Handle) -> (EmbedPath, Node) {
    let (path, mut node) = {
        let f = h.lock().unwrap_or_else(|e| e.into_inner());
        (f.path.clone(), f.node())
    };
    let sh = shield::get();
    let inner = sh.lock();
    match sh.lookup(&inner, &path) {
        Ok(n) => {
            node.ino = n.ino;
            node.ctime = n.ctime;
            node.nlink = n.nlink;
        }
        // Its last name went while it was open (`fstat` after `unlink`): no links.
        Err(libc::ENOENT) => node.nlink = 0,
        Err(_) => {}
    }
    (path, node)
}

fn fd_stat(fd: c_int, out: Out, real_stat: impl Fn() -> c_int) -> c_int {
    if let Some(_g) = enter() {
        if let Some(h) = files::get(fd) {
            let (path, node) = fd_node(&h);
            return put(&path, &node, &out);
        }
    }
    real_stat()
}

#[no_mangle]
pub unsafe extern "C" fn stat(p: *const c_char, s: *mut libc::stat) -> c_int {
    // SAFETY: `stat_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe {
        stat_common(libc::AT_FDCWD, p, 0, Out::Stat(s), |d, p| {
            real::fstatat(d, p, s, 0)
        })
    }
}
#[no_mangle]
pub unsafe extern "C" fn stat64(p: *const c_char, s: *mut libc::stat) -> c_int {
    // SAFETY: `stat` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { stat(p, s) }
}
#[no_mangle]
pub unsafe extern "C" fn lstat(p: *const c_char, s: *mut libc::stat) -> c_int {
    let nf = libc::AT_SYMLINK_NOFOLLOW;
    // SAFETY: `stat_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe {
        stat_common(libc::AT_FDCWD, p, nf, Out::Stat(s), |d, p| {
            real::fstatat(d, p, s, nf)
        })
    }
}
#[no_mangle]
pub unsafe extern "C" fn lstat64(p: *const c_char, s: *mut libc::stat) -> c_int {
    // SAFETY: `lstat` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { lstat(p, s) }
}
#[no_mangle]
pub unsafe extern "C" fn fstat(fd: c_int, s: *mut libc::stat) -> c_int {
    // SAFETY: the caller's arguments, unchanged, to glibc's own `fstat` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    fd_stat(fd, Out::Stat(s), || unsafe { real::fstat(fd, s) })
}
#[no_mangle]
pub unsafe extern "C" fn fstat64(fd: c_int, s: *mut libc::stat) -> c_int {
    // SAFETY: `fstat` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { fstat(fd, s) }
}
#[no_mangle]
pub unsafe extern "C" fn fstatat(
    d: c_int,
    p: *const c_char,
    s: *mut libc::stat,
    f: c_int,
) -> c_int {
    // SAFETY: `stat_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { stat_common(d, p, f, Out::Stat(s), |d, p| real::fstatat(d, p, s, f)) }
}
#[no_mangle]
pub unsafe extern "C" fn fstatat64(
    d: c_int,
    p: *const c_char,
    s: *mut libc::stat,
    f: c_int,
) -> c_int {
    // SAFETY: `fstatat` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { fstatat(d, p, s, f) }
}
#[no_mangle]
pub unsafe extern "C" fn newfstatat(
    d: c_int,
    p: *const c_char,
    s: *mut libc::stat,
    f: c_int,
) -> c_int {
    // SAFETY: `fstatat` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { fstatat(d, p, s, f) }
}
#[no_mangle]
pub unsafe extern "C" fn statx(
    d: c_int,
    p: *const c_char,
    f: c_int,
    m: c_uint,
    s: *mut libc::statx,
) -> c_int {
    // SAFETY: `stat_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { stat_common(d, p, f, Out::Statx(s), |d, p| real::statx(d, p, f, m, s)) }
}
// Pre-2.33 glibc entry points (old binaries): implemented on top of the modern ones.
#[no_mangle]
pub unsafe extern "C" fn __xstat(_v: c_int, p: *const c_char, s: *mut libc::stat) -> c_int {
    // SAFETY: `stat` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { stat(p, s) }
}
#[no_mangle]
pub unsafe extern "C" fn __xstat64(_v: c_int, p: *const c_char, s: *mut libc::stat) -> c_int {
    // SAFETY: `stat` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { stat(p, s) }
}
#[no_mangle]
pub unsafe extern "C" fn __lxstat(_v: c_int, p: *const c_char, s: *mut libc::stat) -> c_int {
    // SAFETY: `lstat` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { lstat(p, s) }
}
#[no_mangle]
pub unsafe extern "C" fn __lxstat64(_v: c_int, p: *const c_char, s: *mut libc::stat) -> c_int {
    // SAFETY: `lstat` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { lstat(p, s) }
}
#[no_mangle]
pub unsafe extern "C" fn __fxstat(_v: c_int, fd: c_int, s: *mut libc::stat) -> c_int {
    // SAFETY: `fstat` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { fstat(fd, s) }
}
#[no_mangle]
pub unsafe extern "C" fn __fxstat64(_v: c_int, fd: c_int, s: *mut libc::stat) -> c_int {
    // SAFETY: `fstat` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { fstat(fd, s) }
}
#[no_mangle]
pub unsafe extern "C" fn __fxstatat(
    _v: c_int,
    d: c_int,
    p: *const c_char,
    s: *mut libc::stat,
    f: c_int,
) -> c_int {
    // SAFETY: `fstatat` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { fstatat(d, p, s, f) }
}
#[no_mangle]
pub unsafe extern "C" fn __fxstatat64(
    _v: c_int,
    d: c_int,
    p: *const c_char,
    s: *mut libc::stat,
    f: c_int,
) -> c_int {
    // SAFETY: `fstatat` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { fstatat(d, p, s, f) }
}

unsafe fn access_common(
    d: c_int,
    p: *const c_char,
    mode: c_int,
    flags: c_int,
    real_access: impl Fn(c_int, *const c_char) -> c_int,
) -> c_int {
    let real_kernel = |k: &std::ffi::CStr| real_access(libc::AT_FDCWD, k.as_ptr());
    // SAFETY: `p` is the program's argument.
    unsafe {
        super::by_route(d, p, &real_access, |sh, ep| {
            match resolve(ep, flags & libc::AT_SYMLINK_NOFOLLOW == 0) {
                Ok((ep, Ok(node))) => {
                    if mode & libc::W_OK != 0 {
                        let inner = sh.lock();
                        if let Err(e) = sh.check_writable(&inner, &ep) {
                            return fail(e);
                        }
                    }
                    if mode & libc::X_OK != 0 && node.mode & 0o111 == 0 {
                        return fail(libc::EACCES);
                    }
                    0
                }
                Ok((_, Err(Route::Kernel(k, _)))) => real_kernel(&k),
                Ok(_) => fail(libc::ENOENT),
                Err(e) => fail(e),
            }
        })
    }
}

#[no_mangle]
pub unsafe extern "C" fn access(p: *const c_char, m: c_int) -> c_int {
    // SAFETY: `access_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { access_common(libc::AT_FDCWD, p, m, 0, |d, p| real::faccessat(d, p, m, 0)) }
}
#[no_mangle]
pub unsafe extern "C" fn euidaccess(p: *const c_char, m: c_int) -> c_int {
    // SAFETY: `access_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe {
        access_common(libc::AT_FDCWD, p, m, 0, |d, p| {
            real::faccessat(d, p, m, libc::AT_EACCESS)
        })
    }
}
#[no_mangle]
pub unsafe extern "C" fn eaccess(p: *const c_char, m: c_int) -> c_int {
    // SAFETY: `euidaccess` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { euidaccess(p, m) }
}
#[no_mangle]
pub unsafe extern "C" fn faccessat(d: c_int, p: *const c_char, m: c_int, f: c_int) -> c_int {
    // SAFETY: `access_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { access_common(d, p, m, f, |d, p| real::faccessat(d, p, m, f)) }
}

unsafe fn readlink_common(d: c_int, p: *const c_char, buf: *mut c_char, n: size_t) -> ssize_t {
    let Some(g) = enter() else {
        // SAFETY: the caller's arguments, unchanged, to glibc's own `readlinkat` (resolved
        // with RTLD_NEXT): the caller's contract for this call is that function's contract.
        return unsafe { real::readlinkat(d, p, buf, n) };
    };
    let sh = shield::get();
    match sh.route(d, p) {
        Route::Pass => {
            drop(g);
            // SAFETY: the caller's arguments, unchanged, to glibc's own `readlinkat` (resolved
            // with RTLD_NEXT): the caller's contract for this call is that function's contract.
            unsafe { real::readlinkat(d, p, buf, n) }
        }
        // SAFETY: glibc's own function with the caller's other arguments and a NUL-terminated
        // kernel path (`k`) that lives until the call returns.
        Route::Kernel(k, _) => unsafe { real::readlinkat(libc::AT_FDCWD, k.as_ptr(), buf, n) },
        Route::Deny(e) => fail_isize(e),
        Route::Shield(ep) => {
            let inner = sh.lock();
            match sh.lookup(&inner, &ep) {
                Ok(Node {
                    kind: NodeKind::Symlink(t),
                    ..
                }) => {
                    let k = t.len().min(n);
                    // SAFETY: the program's buffer holds n bytes; k <= n.
                    unsafe { std::ptr::copy_nonoverlapping(t.as_ptr(), buf.cast(), k) };
                    k as ssize_t
                }
                Ok(_) => fail_isize(libc::EINVAL),
                Err(e) => fail_isize(e),
            }
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn readlink(p: *const c_char, b: *mut c_char, n: size_t) -> ssize_t {
    // SAFETY: `readlink_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { readlink_common(libc::AT_FDCWD, p, b, n) }
}
#[no_mangle]
pub unsafe extern "C" fn readlinkat(
    d: c_int,
    p: *const c_char,
    b: *mut c_char,
    n: size_t,
) -> ssize_t {
    // SAFETY: `readlink_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { readlink_common(d, p, b, n) }
}

/// realpath of an embed path in a translated or shielded region is its lexical normal form
/// (glibc's realpath calls readlink internally, bypassing the hooks, and would see the host).
#[no_mangle]
pub unsafe extern "C" fn realpath(p: *const c_char, r: *mut c_char) -> *mut c_char {
    let Some(g) = enter() else {
        // SAFETY: the caller's arguments, unchanged, to glibc's own `realpath` (resolved
        // with RTLD_NEXT): the caller's contract for this call is that function's contract.
        return unsafe { real::realpath(p, r) };
    };
    if p.is_null() {
        return fail_ptr(libc::EINVAL);
    }
    let sh = shield::get();
    let ep = match sh.route(libc::AT_FDCWD, p) {
        Route::Pass => {
            drop(g);
            // SAFETY: the caller's arguments, unchanged, to glibc's own `realpath` (resolved
            // with RTLD_NEXT): the caller's contract for this call is that function's contract.
            return unsafe { real::realpath(p, r) };
        }
        Route::Deny(e) => return fail_ptr(e),
        Route::Kernel(k, ep) => {
            // SAFETY: k is NUL-terminated; st is a local buffer.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            if unsafe { real::fstatat(libc::AT_FDCWD, k.as_ptr(), &mut st, 0) } != 0 {
                return std::ptr::null_mut();
            }
            ep
        }
        Route::Shield(ep) => match resolve(ep, true) {
            Ok((ep, Ok(_))) => ep,
            Ok(_) => return fail_ptr(libc::ENOENT),
            Err(e) => return fail_ptr(e),
        },
    };
    let b = ep.as_bytes();
    if b.len() >= libc::PATH_MAX as usize {
        return fail_ptr(libc::ENAMETOOLONG);
    }
    let out = if r.is_null() {
        // SAFETY: malloc for the caller to free, as realpath(NULL) specifies.
        unsafe { libc::malloc(b.len() + 1) }.cast::<c_char>()
    } else {
        r
    };
    if out.is_null() {
        return fail_ptr(libc::ENOMEM);
    }
    // SAFETY: out holds at least PATH_MAX (caller) or b.len()+1 (malloc) bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), out.cast(), b.len());
        *out.add(b.len()) = 0;
    }
    out
}
#[no_mangle]
pub unsafe extern "C" fn canonicalize_file_name(p: *const c_char) -> *mut c_char {
    // SAFETY: `realpath` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { realpath(p, std::ptr::null_mut()) }
}

/// Path-based call that shielded paths answer with `shielded(errno-or-value)`.
unsafe fn xattr_path(
    p: *const c_char,
    shielded_ret: ssize_t,
    shielded_errno: c_int,
    real_call: impl Fn(*const c_char) -> ssize_t,
) -> ssize_t {
    let Some(g) = enter() else {
        return real_call(p);
    };
    match shield::get().route(libc::AT_FDCWD, p) {
        Route::Pass => {
            drop(g);
            real_call(p)
        }
        Route::Kernel(k, _) => real_call(k.as_ptr()),
        Route::Deny(e) => fail_isize(e),
        Route::Shield(_) => {
            if shielded_errno != 0 {
                fail_isize(shielded_errno)
            } else {
                shielded_ret
            }
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn getxattr(
    p: *const c_char,
    n: *const c_char,
    v: *mut c_void,
    s: size_t,
) -> ssize_t {
    // SAFETY: `xattr_path` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { xattr_path(p, 0, libc::ENODATA, |p| real::getxattr(p, n, v, s)) }
}
#[no_mangle]
pub unsafe extern "C" fn lgetxattr(
    p: *const c_char,
    n: *const c_char,
    v: *mut c_void,
    s: size_t,
) -> ssize_t {
    // SAFETY: `xattr_path` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { xattr_path(p, 0, libc::ENODATA, |p| real::lgetxattr(p, n, v, s)) }
}
#[no_mangle]
pub unsafe extern "C" fn listxattr(p: *const c_char, l: *mut c_char, s: size_t) -> ssize_t {
    // SAFETY: `xattr_path` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { xattr_path(p, 0, 0, |p| real::listxattr(p, l, s)) }
}
#[no_mangle]
pub unsafe extern "C" fn llistxattr(p: *const c_char, l: *mut c_char, s: size_t) -> ssize_t {
    // SAFETY: `xattr_path` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { xattr_path(p, 0, 0, |p| real::llistxattr(p, l, s)) }
}
#[no_mangle]
pub unsafe extern "C" fn fgetxattr(
    fd: c_int,
    n: *const c_char,
    v: *mut c_void,
    s: size_t,
) -> ssize_t {
    if let Some(_g) = enter() {
        if files::is_shielded(fd) {
            return fail_isize(libc::ENODATA);
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `fgetxattr` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::fgetxattr(fd, n, v, s) }
}
#[no_mangle]
pub unsafe extern "C" fn flistxattr(fd: c_int, l: *mut c_char, s: size_t) -> ssize_t {
    if let Some(_g) = enter() {
        if files::is_shielded(fd) {
            return 0;
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `flistxattr` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::flistxattr(fd, l, s) }
}

/// `chmod` in the shielded view: follows symlinks (unless `nofollow`, which a symlink refuses
/// with `EOPNOTSUPP`, as Linux does), then records the mode (`Shield::chmod`).
fn chmod_shielded(ep: EmbedPath, m: mode_t, nofollow: bool) -> c_int {
    let target = match resolve(ep, !nofollow) {
        Ok((ep, Ok(_))) => ep,
        // A symlink out of the shield: the kernel object is not protected.
        Ok((_, Err(Route::Kernel(k, _)))) => {
            // SAFETY: a NUL-terminated kernel path.
            return unsafe { real::fchmodat(libc::AT_FDCWD, k.as_ptr(), m, 0) };
        }
        Ok((_, Err(Route::Deny(e)))) | Err(e) => return fail(e),
        Ok((_, Err(_))) => return fail(libc::EACCES),
    };
    let sh = shield::get();
    let mut inner = sh.lock();
    let m = match chmod_allowed(sh, &inner, &target, m) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    match sh.chmod(&mut inner, &target, m) {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

/// The kernel's rules for `chmod`: only the owner or root (`EPERM`); a user outside the file's
/// group cannot set its set-group-ID bit (it is dropped, not refused). Returns the mode to set.
fn chmod_allowed(
    sh: &shield::Shield,
    inner: &shield::Inner,
    ep: &EmbedPath,
    m: mode_t,
) -> Result<mode_t, c_int> {
    let n = sh.lookup(inner, ep)?;
    crate::perm::check_owner(&n)?;
    let mut m = m;
    if crate::perm::euid() != 0 && !crate::perm::in_group(crate::perm::owner_of(&n).1) {
        m &= !libc::S_ISGID;
    }
    Ok(m)
}

/// The kernel's rules for `utimensat`: explicit times only by the owner or root (`EPERM`); the
/// current time also by a user who may write the file (`EACCES` otherwise).
fn utimes_allowed(
    sh: &shield::Shield,
    inner: &shield::Inner,
    ep: &EmbedPath,
    explicit: bool,
) -> Result<(), c_int> {
    let n = sh.lookup(inner, ep)?;
    match crate::perm::check_owner(&n) {
        Ok(()) => Ok(()),
        Err(e) if explicit => Err(e),
        Err(_) if crate::perm::may(&n, crate::perm::W) => Ok(()),
        Err(_) => Err(libc::EACCES),
    }
}

/// Does `times` set an explicit time (not NULL, not both `UTIME_NOW`/`UTIME_OMIT`)?
///
/// # Safety
/// `t` is NULL or points at two `timespec`s (the program's argument).
unsafe fn explicit_times(t: *const libc::timespec) -> bool {
    if t.is_null() {
        return false;
    }
    // SAFETY: utimensat's contract: two timespecs.
    let (a, m) = unsafe { (*t, *t.add(1)) };
    [a, m]
        .iter()
        .any(|x| x.tv_nsec != libc::UTIME_NOW && x.tv_nsec != libc::UTIME_OMIT)
}

#[no_mangle]
pub unsafe extern "C" fn chmod(p: *const c_char, m: mode_t) -> c_int {
    // SAFETY: the program's path.
    unsafe {
        super::by_route(
            libc::AT_FDCWD,
            p,
            |d, p| real::fchmodat(d, p, m, 0),
            |_, ep| chmod_shielded(ep, m, false),
        )
    }
}
#[no_mangle]
pub unsafe extern "C" fn fchmodat(d: c_int, p: *const c_char, m: mode_t, f: c_int) -> c_int {
    // SAFETY: the program's path.
    unsafe {
        super::by_route(
            d,
            p,
            |d, p| real::fchmodat(d, p, m, f),
            |_, ep| chmod_shielded(ep, m, f & libc::AT_SYMLINK_NOFOLLOW != 0),
        )
    }
}
#[no_mangle]
pub unsafe extern "C" fn fchmod(fd: c_int, m: mode_t) -> c_int {
    if let Some(_g) = enter() {
        if let Some(h) = files::get(fd) {
            let ep = h.lock().unwrap_or_else(|e| e.into_inner()).path.clone();
            let sh = shield::get();
            let mut inner = sh.lock();
            let m = match chmod_allowed(sh, &inner, &ep, m) {
                Ok(m) => m,
                Err(e) => return fail(e),
            };
            h.lock().unwrap_or_else(|e| e.into_inner()).mode = m & 0o7777;
            return match sh.chmod(&mut inner, &ep, m) {
                Ok(()) => 0,
                Err(e) => fail(e),
            };
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `fchmod` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::fchmod(fd, m) }
}
#[no_mangle]
pub unsafe extern "C" fn utimensat(
    d: c_int,
    p: *const c_char,
    t: *const libc::timespec,
    f: c_int,
) -> c_int {
    if p.is_null() {
        // futimens form.
        // SAFETY: `futimens` has this function's contract and gets the caller's pointers
        // unchanged (other arguments are constants or values we made valid).
        return unsafe { futimens(d, t) };
    }
    // SAFETY: the program's path and times.
    let mtime = unsafe { requested_mtime(t) };
    // SAFETY: the program's times.
    let explicit = unsafe { explicit_times(t) };
    // SAFETY: the program's path.
    unsafe {
        super::by_route(
            d,
            p,
            |d, p| real::utimensat(d, p, t, f),
            |_, ep| {
                let Some(ns) = mtime else { return 0 };
                let target = match resolve(ep, f & libc::AT_SYMLINK_NOFOLLOW == 0) {
                    Ok((ep, Ok(_))) => ep,
                    Ok((_, Err(Route::Kernel(k, _)))) => {
                        return real::utimensat(libc::AT_FDCWD, k.as_ptr(), t, 0);
                    }
                    Ok((_, Err(Route::Deny(e)))) | Err(e) => return fail(e),
                    Ok((_, Err(_))) => return fail(libc::EACCES),
                };
                let sh = shield::get();
                let mut inner = sh.lock();
                if let Err(e) = utimes_allowed(sh, &inner, &target, explicit) {
                    return fail(e);
                }
                match sh.set_mtime(&mut inner, &target, ns) {
                    Ok(()) => 0,
                    Err(e) => fail(e),
                }
            },
        )
    }
}

/// The modification time `times` asks for (ns): `None` for `UTIME_OMIT`, now for a NULL
/// `times` or `UTIME_NOW`. Access times are not recorded.
///
/// # Safety
/// `t` is NULL or points at two `timespec`s (the program's argument).
unsafe fn requested_mtime(t: *const libc::timespec) -> Option<i64> {
    if t.is_null() {
        return Some(shield::now());
    }
    // SAFETY: utimensat's contract: two timespecs.
    let m = unsafe { *t.add(1) };
    match m.tv_nsec {
        libc::UTIME_OMIT => None,
        libc::UTIME_NOW => Some(shield::now()),
        n => Some(m.tv_sec.saturating_mul(1_000_000_000).saturating_add(n)),
    }
}

#[no_mangle]
pub unsafe extern "C" fn futimens(fd: c_int, t: *const libc::timespec) -> c_int {
    if let Some(_g) = enter() {
        if let Some(h) = files::get(fd) {
            // SAFETY: the program's times.
            let Some(ns) = (unsafe { requested_mtime(t) }) else {
                return 0;
            };
            let ep = h.lock().unwrap_or_else(|e| e.into_inner()).path.clone();
            let sh = shield::get();
            let mut inner = sh.lock();
            // SAFETY: the program's times.
            let explicit = unsafe { explicit_times(t) };
            if let Err(e) = utimes_allowed(sh, &inner, &ep, explicit) {
                return fail(e);
            }
            return match sh.set_mtime(&mut inner, &ep, ns) {
                Ok(()) => 0,
                Err(e) => fail(e),
            };
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `futimens` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::futimens(fd, t) }
}

/// statfs/statvfs of a shielded path describe the file system holding the region's kernel
/// directory (ephemeral regions: the one holding the fspf).
unsafe fn fs_common(p: *const c_char, real_call: impl Fn(*const c_char) -> c_int) -> c_int {
    let Some(g) = enter() else {
        return real_call(p);
    };
    let sh = shield::get();
    match sh.route(libc::AT_FDCWD, p) {
        Route::Pass => {
            drop(g);
            real_call(p)
        }
        Route::Kernel(k, _) => real_call(k.as_ptr()),
        Route::Deny(e) => fail(e),
        Route::Shield(ep) => {
            let base = {
                let inner = sh.lock();
                if let Err(e) = sh.lookup(&inner, &ep) {
                    return fail(e);
                }
                match sh.region_of(&inner, &ep).map(|r| &r.kind) {
                    Some(fspf_core::RegionKind::Kernel(k)) => k.clone(),
                    _ => sh
                        .fspf
                        .parent()
                        .map(|d| d.to_path_buf())
                        .unwrap_or_default(),
                }
            };
            use std::os::unix::ffi::OsStrExt;
            let mut b = base;
            while !b.exists() {
                match b.parent() {
                    Some(p) => b = p.to_path_buf(),
                    None => break,
                }
            }
            match std::ffi::CString::new(b.as_os_str().as_bytes()) {
                Ok(c) => real_call(c.as_ptr()),
                Err(_) => fail(libc::EINVAL),
            }
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn statfs(p: *const c_char, b: *mut libc::statfs) -> c_int {
    // SAFETY: `fs_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { fs_common(p, |p| real::statfs(p, b)) }
}
#[no_mangle]
pub unsafe extern "C" fn statfs64(p: *const c_char, b: *mut libc::statfs) -> c_int {
    // SAFETY: `fs_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { fs_common(p, |p| real::statfs64(p, b)) }
}
#[no_mangle]
pub unsafe extern "C" fn statvfs(p: *const c_char, b: *mut libc::statvfs) -> c_int {
    // SAFETY: `fs_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { fs_common(p, |p| real::statvfs(p, b)) }
}
#[no_mangle]
pub unsafe extern "C" fn statvfs64(p: *const c_char, b: *mut libc::statvfs) -> c_int {
    // SAFETY: `fs_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { fs_common(p, |p| real::statvfs64(p, b)) }
}

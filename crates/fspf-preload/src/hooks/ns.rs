//! Namespace hooks (unlink, rename, mkdir, rmdir, symlink, link, truncate by path) and the
//! current directory. The changes themselves are [`crate::namespace`].
use super::{fail, fail_ptr};
use crate::files;
use crate::namespace::{do_mkdir, do_rename, do_symlink, do_unlink};
use crate::opening::{release, shield_open};
use crate::shield::{self, Inner, NodeKind, Route};
use crate::{enter, real};
use fspf_core::volume::kernel_fs;
use fspf_core::EmbedPath;
use libc::{c_char, c_int, c_uint, mode_t, off_t, size_t};

/// The last component of a path as the program wrote it, when it is `.` or `..` (the shield
/// resolves paths lexically, so `d/.` would otherwise name `d` itself).
///
/// # Safety
/// `p` is null or a NUL-terminated string.
unsafe fn dot_last(p: *const c_char) -> Option<&'static [u8]> {
    if p.is_null() {
        return None;
    }
    // SAFETY: the caller's NUL-terminated path.
    let b = unsafe { std::ffi::CStr::from_ptr(p) }.to_bytes();
    let b = b.strip_suffix(b"/").unwrap_or(b);
    let last = b.rsplit(|&c| c == b'/').next()?;
    match last {
        b"." => Some(b"."),
        b".." => Some(b".."),
        _ => None,
    }
}

unsafe fn unlink_common(
    d: c_int,
    p: *const c_char,
    flags: c_int,
    real_call: impl Fn(c_int, *const c_char) -> c_int,
) -> c_int {
    let dir = flags & libc::AT_REMOVEDIR != 0;
    // SAFETY: `p` is the program's argument.
    unsafe {
        super::by_route_as(true, d, p, real_call, |sh, ep| {
            // As the kernel: `rmdir("d/.")` is EINVAL, `rmdir("d/..")` ENOTEMPTY (never a
            // removal of `d` or of its parent); `unlink` of either names a directory.
            match (dot_last(p), dir) {
                (Some(b"."), true) => return fail(libc::EINVAL),
                (Some(_), true) => return fail(libc::ENOTEMPTY),
                (Some(_), false) => return fail(libc::EISDIR),
                _ => {}
            }
            match do_unlink(sh, ep, dir) {
                Ok(()) => 0,
                Err(e) => fail(e),
            }
        })
    }
}

#[no_mangle]
pub unsafe extern "C" fn unlink(p: *const c_char) -> c_int {
    // SAFETY: `unlink_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { unlink_common(libc::AT_FDCWD, p, 0, |d, p| real::unlinkat(d, p, 0)) }
}
#[no_mangle]
pub unsafe extern "C" fn unlinkat(d: c_int, p: *const c_char, f: c_int) -> c_int {
    // SAFETY: `unlink_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { unlink_common(d, p, f, |d, p| real::unlinkat(d, p, f)) }
}
#[no_mangle]
pub unsafe extern "C" fn rmdir(p: *const c_char) -> c_int {
    let f = libc::AT_REMOVEDIR;
    // SAFETY: `unlink_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { unlink_common(libc::AT_FDCWD, p, f, |d, p| real::unlinkat(d, p, f)) }
}
#[no_mangle]
pub unsafe extern "C" fn remove(p: *const c_char) -> c_int {
    let Some(g) = enter() else {
        // SAFETY: the caller's arguments, unchanged, to glibc's own `remove` (resolved
        // with RTLD_NEXT): the caller's contract for this call is that function's contract.
        return unsafe { real::remove(p) };
    };
    let sh = shield::get();
    match sh.route_name(libc::AT_FDCWD, p) {
        Route::Pass => {
            drop(g);
            // SAFETY: the caller's arguments, unchanged, to glibc's own `remove` (resolved
            // with RTLD_NEXT): the caller's contract for this call is that function's contract.
            unsafe { real::remove(p) }
        }
        // SAFETY: translated path.
        Route::Kernel(k, _) => unsafe { real::remove(k.as_ptr()) },
        Route::Deny(e) => fail(e),
        Route::Shield(ep) => {
            let r = match do_unlink(sh, ep.clone(), false) {
                Err(libc::EISDIR) => do_unlink(sh, ep, true),
                r => r,
            };
            match r {
                Ok(()) => 0,
                Err(e) => fail(e),
            }
        }
    }
}

unsafe fn mkdir_common(
    d: c_int,
    p: *const c_char,
    mode: mode_t,
    real_call: impl Fn(c_int, *const c_char) -> c_int,
) -> c_int {
    // SAFETY: `p` is the program's argument.
    unsafe {
        super::by_route(d, p, real_call, |sh, ep| match do_mkdir(sh, ep, mode) {
            Ok(()) => 0,
            Err(e) => fail(e),
        })
    }
}

#[no_mangle]
pub unsafe extern "C" fn mkdir(p: *const c_char, m: mode_t) -> c_int {
    // SAFETY: `mkdir_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { mkdir_common(libc::AT_FDCWD, p, m, |d, p| real::mkdirat(d, p, m)) }
}
#[no_mangle]
pub unsafe extern "C" fn mkdirat(d: c_int, p: *const c_char, m: mode_t) -> c_int {
    // SAFETY: `mkdir_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { mkdir_common(d, p, m, |d, p| real::mkdirat(d, p, m)) }
}

unsafe fn rename_common(
    da: c_int,
    a: *const c_char,
    db: c_int,
    b: *const c_char,
    flags: c_uint,
) -> c_int {
    let call = |da, a, db, b| {
        if flags == 0 {
            // SAFETY: the caller's arguments, unchanged, to glibc's own `renameat` (resolved
            // with RTLD_NEXT): the caller's contract for this call is that function's contract.
            unsafe { real::renameat(da, a, db, b) }
        } else {
            // SAFETY: the caller's arguments, unchanged, to glibc's own `renameat2` (resolved
            // with RTLD_NEXT): the caller's contract for this call is that function's contract.
            unsafe { real::renameat2(da, a, db, b, flags) }
        }
    };
    let Some(g) = enter() else {
        return call(da, a, db, b);
    };
    let sh = shield::get();
    if a.is_null() {
        // The kernel answers EFAULT before it reads the other path (which may be unmapped).
        drop(g);
        return call(da, a, db, b);
    }
    if b.is_null() {
        // The kernel looks the source up first: ENOENT if it is missing, else EFAULT.
        return match sh.route(da, a) {
            Route::Shield(ep) => {
                let inner = sh.lock();
                match sh.lookup(&inner, &ep) {
                    Ok(_) => fail(libc::EFAULT),
                    Err(e) => fail(e),
                }
            }
            Route::Deny(e) => fail(e),
            Route::Kernel(k, _) => call(libc::AT_FDCWD, k.as_ptr(), db, b),
            Route::Pass => {
                drop(g);
                call(da, a, db, b)
            }
        };
    }
    let (ra, rb) = (sh.route_name(da, a), sh.route_name(db, b));
    // SAFETY: the program's path arguments (routed above, so NUL-terminated strings).
    let dots = unsafe { dot_last(a).is_some() || dot_last(b).is_some() };
    match (ra, rb) {
        (Route::Deny(e), _) | (_, Route::Deny(e)) => fail(e),
        (Route::Shield(_), Route::Shield(_)) if dots => {
            // As the kernel: `.` and `..` are never renamed (nor renamed over).
            fail(libc::EINVAL)
        }
        (Route::Shield(x), Route::Shield(y)) => match do_rename(sh, x, y, flags) {
            Ok(()) => 0,
            Err(e) => fail(e),
        },
        (Route::Shield(_), _) | (_, Route::Shield(_)) => fail(libc::EXDEV),
        (Route::Pass, Route::Pass) => {
            drop(g);
            call(da, a, db, b)
        }
        (x, y) => {
            let (da, a) = match &x {
                Route::Kernel(k, _) => (libc::AT_FDCWD, k.as_ptr()),
                _ => (da, a),
            };
            let (db, b) = match &y {
                Route::Kernel(k, _) => (libc::AT_FDCWD, k.as_ptr()),
                _ => (db, b),
            };
            call(da, a, db, b)
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn rename(a: *const c_char, b: *const c_char) -> c_int {
    // SAFETY: `rename_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { rename_common(libc::AT_FDCWD, a, libc::AT_FDCWD, b, 0) }
}
#[no_mangle]
pub unsafe extern "C" fn renameat(
    da: c_int,
    a: *const c_char,
    db: c_int,
    b: *const c_char,
) -> c_int {
    // SAFETY: `rename_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { rename_common(da, a, db, b, 0) }
}
#[no_mangle]
pub unsafe extern "C" fn renameat2(
    da: c_int,
    a: *const c_char,
    db: c_int,
    b: *const c_char,
    f: c_uint,
) -> c_int {
    // SAFETY: `rename_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { rename_common(da, a, db, b, f) }
}

unsafe fn truncate_common(
    p: *const c_char,
    len: off_t,
    real_call: impl Fn(*const c_char) -> c_int,
) -> c_int {
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
        Route::Shield(_) if len < 0 => fail(libc::EINVAL),
        Route::Shield(ep) => {
            let fd = match shield_open(sh, ep, libc::O_WRONLY | libc::O_CLOEXEC, 0) {
                Ok(fd) => fd,
                Err(e) => return fail(e),
            };
            let r = match files::get(fd) {
                Some(h) => crate::fdio::truncate_handle(&h, len.max(0) as u64),
                None => Err(libc::EBADF),
            };
            if let Some(h) = files::remove(fd) {
                let _ = release(h);
            }
            // SAFETY: closing our placeholder.
            unsafe { real::close(fd) };
            match r {
                Ok(()) => 0,
                Err(e) => fail(e),
            }
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn truncate(p: *const c_char, l: off_t) -> c_int {
    // SAFETY: `truncate_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { truncate_common(p, l, |p| real::truncate(p, l)) }
}
#[no_mangle]
pub unsafe extern "C" fn truncate64(p: *const c_char, l: off_t) -> c_int {
    // SAFETY: `truncate_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { truncate_common(p, l, |p| real::truncate64(p, l)) }
}

fn refresh_real_cwd(inner: &mut Inner) {
    if let Ok(p) = std::env::current_dir() {
        if let Ok(ep) = EmbedPath::from_path(&p) {
            inner.cwd = ep;
            inner.cwd_virtual = false;
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn chdir(p: *const c_char) -> c_int {
    let Some(_g) = enter() else {
        // SAFETY: the caller's arguments, unchanged, to glibc's own `chdir` (resolved
        // with RTLD_NEXT): the caller's contract for this call is that function's contract.
        return unsafe { real::chdir(p) };
    };
    let sh = shield::get();
    match sh.route(libc::AT_FDCWD, p) {
        Route::Pass => {
            // SAFETY: the caller's arguments, unchanged, to glibc's own `chdir` (resolved
            // with RTLD_NEXT): the caller's contract for this call is that function's contract.
            let r = unsafe { real::chdir(p) };
            if r == 0 {
                refresh_real_cwd(&mut sh.lock());
            }
            r
        }
        Route::Kernel(k, ep) => {
            // SAFETY: translated path.
            let r = unsafe { real::chdir(k.as_ptr()) };
            if r == 0 {
                let mut inner = sh.lock();
                inner.cwd = ep;
                inner.cwd_virtual = true;
            }
            r
        }
        Route::Deny(e) => fail(e),
        Route::Shield(ep) => {
            let mut inner = sh.lock();
            // Another process of the run may just have committed this directory (`mkdir d &&
            // cd d` under dash runs mkdir as a child): look at the run's current state.
            if !sh.is_ephemeral(&inner, &ep) {
                if let Err(e) = sh.refresh(&mut inner) {
                    return fail(e);
                }
            }
            match sh.lookup(&inner, &ep) {
                Ok(n) if matches!(n.kind, NodeKind::Dir) => {
                    if let Some(k) = &n.kernel {
                        // The kernel cwd follows, without following a symlink below the region.
                        if let Ok(d) = kernel_fs::open_dir_beneath(k.base(), k.rel()) {
                            use std::os::fd::AsRawFd;
                            // SAFETY: fchdir to a directory fd we own for this call.
                            unsafe { real::fchdir(d.as_raw_fd()) };
                        }
                    }
                    inner.cwd = ep;
                    inner.cwd_virtual = true;
                    0
                }
                Ok(_) => fail(libc::ENOTDIR),
                Err(e) => fail(e),
            }
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn fchdir(fd: c_int) -> c_int {
    let Some(_g) = enter() else {
        // SAFETY: the caller's arguments, unchanged, to glibc's own `fchdir` (resolved
        // with RTLD_NEXT): the caller's contract for this call is that function's contract.
        return unsafe { real::fchdir(fd) };
    };
    let sh = shield::get();
    if let Some(ep) = files::dir_path(fd).or_else(|| files::translated_path(fd)) {
        // SAFETY: the placeholder may be the kernel directory; ignore failure (memfd).
        unsafe { real::fchdir(fd) };
        let mut inner = sh.lock();
        inner.cwd = ep;
        inner.cwd_virtual = true;
        return 0;
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `fchdir` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    let r = unsafe { real::fchdir(fd) };
    if r == 0 {
        refresh_real_cwd(&mut sh.lock());
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn getcwd(buf: *mut c_char, size: size_t) -> *mut c_char {
    let Some(_g) = enter() else {
        // SAFETY: the caller's arguments, unchanged, to glibc's own `getcwd` (resolved
        // with RTLD_NEXT): the caller's contract for this call is that function's contract.
        return unsafe { real::getcwd(buf, size) };
    };
    let sh = shield::get();
    let cwd = {
        let inner = sh.lock();
        if !inner.cwd_virtual {
            None
        } else {
            Some(inner.cwd.as_bytes().to_vec())
        }
    };
    let Some(c) = cwd else {
        // SAFETY: the caller's arguments, unchanged, to glibc's own `getcwd` (resolved
        // with RTLD_NEXT): the caller's contract for this call is that function's contract.
        return unsafe { real::getcwd(buf, size) };
    };
    let need = c.len() + 1;
    let out = if buf.is_null() {
        // SAFETY: malloc for the caller to free (glibc extension getcwd(NULL, n)).
        unsafe { libc::malloc(need.max(size)) }.cast::<c_char>()
    } else {
        if size < need {
            return fail_ptr(libc::ERANGE);
        }
        buf
    };
    if out.is_null() {
        return fail_ptr(libc::ENOMEM);
    }
    // SAFETY: out has room for need bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(c.as_ptr(), out.cast(), c.len());
        *out.add(c.len()) = 0;
    }
    out
}

/// A hard link between protected paths is an fspf entry (`namespace::do_link`); between a
/// protected path and any other, `EXDEV`.
unsafe fn link_common(da: c_int, a: *const c_char, db: c_int, b: *const c_char, f: c_int) -> c_int {
    let Some(g) = enter() else {
        // SAFETY: the caller's arguments, unchanged, to glibc's own `linkat` (resolved
        // with RTLD_NEXT): the caller's contract for this call is that function's contract.
        return unsafe { real::linkat(da, a, db, b, f) };
    };
    let sh = shield::get();
    if a.is_null() || b.is_null() {
        drop(g);
        // SAFETY: glibc's own `linkat` with the caller's arguments: the kernel answers EFAULT
        // for the null path without reading anything.
        return unsafe { real::linkat(da, a, db, b, f) };
    }
    if f & !(libc::AT_SYMLINK_FOLLOW | libc::AT_EMPTY_PATH) != 0 {
        return fail(libc::EINVAL);
    }
    match (sh.route(da, a), sh.route_name(db, b)) {
        (Route::Deny(e), _) | (_, Route::Deny(e)) => fail(e),
        (Route::Shield(x), Route::Shield(y)) => {
            // A prefix that is not a directory, or that denies search: as the kernel.
            for ep in [&x, &y] {
                if let Err(e) = crate::perm::check_search(sh, &sh.lock(), ep) {
                    return fail(e);
                }
            }
            let follow = f & libc::AT_SYMLINK_FOLLOW != 0;
            let x = match super::stat::resolve(x, follow) {
                Ok((x, Ok(_))) => x,
                // A symlink leading out of the protected regions.
                Ok((_, Err(_))) => return fail(libc::EXDEV),
                Err(e) => return fail(e),
            };
            match crate::namespace::do_link(sh, x, y) {
                Ok(()) => 0,
                Err(e) => fail(e),
            }
        }
        (Route::Shield(_), _) | (_, Route::Shield(_)) => fail(libc::EXDEV),
        (Route::Pass, Route::Pass) => {
            drop(g);
            // SAFETY: the caller's arguments, unchanged, to glibc's own `linkat` (resolved
            // with RTLD_NEXT): the caller's contract for this call is that function's contract.
            unsafe { real::linkat(da, a, db, b, f) }
        }
        (x, y) => {
            let (da, a) = match &x {
                Route::Kernel(k, _) => (libc::AT_FDCWD, k.as_ptr()),
                _ => (da, a),
            };
            let (db, b) = match &y {
                Route::Kernel(k, _) => (libc::AT_FDCWD, k.as_ptr()),
                _ => (db, b),
            };
            // SAFETY: glibc's own `linkat`; each path is the caller's or a NUL-terminated kernel
            // path (`k`) that lives until the call returns; the buffers are the caller's.
            unsafe { real::linkat(da, a, db, b, f) }
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn link(a: *const c_char, b: *const c_char) -> c_int {
    // SAFETY: `link_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { link_common(libc::AT_FDCWD, a, libc::AT_FDCWD, b, 0) }
}
#[no_mangle]
pub unsafe extern "C" fn linkat(
    da: c_int,
    a: *const c_char,
    db: c_int,
    b: *const c_char,
    f: c_int,
) -> c_int {
    // SAFETY: `link_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { link_common(da, a, db, b, f) }
}

unsafe fn symlink_common(t: *const c_char, d: c_int, p: *const c_char) -> c_int {
    let Some(g) = enter() else {
        // SAFETY: the caller's arguments, unchanged, to glibc's own `symlinkat` (resolved
        // with RTLD_NEXT): the caller's contract for this call is that function's contract.
        return unsafe { real::symlinkat(t, d, p) };
    };
    if t.is_null() {
        return fail(libc::EFAULT);
    }
    let sh = shield::get();
    match sh.route(d, p) {
        Route::Pass => {
            drop(g);
            // SAFETY: the caller's arguments, unchanged, to glibc's own `symlinkat` (resolved
            // with RTLD_NEXT): the caller's contract for this call is that function's contract.
            unsafe { real::symlinkat(t, d, p) }
        }
        // SAFETY: glibc's own function with the caller's other arguments and a NUL-terminated
        // kernel path (`k`) that lives until the call returns.
        Route::Kernel(k, _) => unsafe { real::symlinkat(t, libc::AT_FDCWD, k.as_ptr()) },
        Route::Deny(e) => fail(e),
        Route::Shield(ep) => {
            // SAFETY: the program's NUL-terminated target (non-null checked).
            let target = unsafe { std::ffi::CStr::from_ptr(t) }.to_bytes();
            match do_symlink(sh, target, ep) {
                Ok(()) => 0,
                Err(e) => fail(e),
            }
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn symlink(t: *const c_char, p: *const c_char) -> c_int {
    // SAFETY: `symlink_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { symlink_common(t, libc::AT_FDCWD, p) }
}
#[no_mangle]
pub unsafe extern "C" fn symlinkat(t: *const c_char, d: c_int, p: *const c_char) -> c_int {
    // SAFETY: `symlink_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { symlink_common(t, d, p) }
}

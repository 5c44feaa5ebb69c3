//! open family and fopen family (FILE* over fopencookie: glibc's stdio bypasses the PLT); the
//! shielded open itself is [`crate::opening`].
use super::{fail, fail_ptr, ret};
use crate::files;
use crate::opening::{shield_open, shield_open_stdio};
use crate::shield::{self, Route};
use crate::stdio::{cookie_file, mode_flags};
use crate::{enter, log, real};
use libc::{c_char, c_int, mode_t, FILE};
use std::ffi::CStr;

#[no_mangle]
pub unsafe extern "C" fn umask(m: mode_t) -> mode_t {
    // SAFETY: the caller's arguments, unchanged, to glibc's own `umask` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    let old = unsafe { real::umask(m) };
    crate::umask::set(m);
    old
}

/// Shared body of every open variant. `real_open` is called with the (possibly translated) path.
unsafe fn open_common(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: mode_t,
    real_open: impl Fn(*const c_char) -> c_int,
) -> c_int {
    let Some(g) = enter() else {
        return real_open(path);
    };
    let sh = shield::get();
    match sh.route(dirfd, path) {
        Route::Pass => {
            drop(g);
            real_open(path)
        }
        Route::Kernel(k, ep) => {
            let fd = real_open(k.as_ptr());
            if fd >= 0 {
                files::track_translated(fd, ep);
            }
            fd
        }
        Route::Deny(e) => fail(e),
        Route::Shield(ep) => {
            // SAFETY: route() returned Shield, so `path` is a non-null C string.
            let slash = unsafe { CStr::from_ptr(path) }.to_bytes().ends_with(b"/");
            if slash && flags & libc::O_CREAT != 0 {
                // Only a directory takes a trailing slash, and O_CREAT makes files.
                return fail(libc::EISDIR);
            }
            ret(shield_open(sh, ep, flags, mode))
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
    // SAFETY: `open_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe {
        open_common(libc::AT_FDCWD, path, flags, mode, |p| {
            real::open(p, flags, mode)
        })
    }
}
#[no_mangle]
pub unsafe extern "C" fn open64(path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
    // SAFETY: `open_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe {
        open_common(libc::AT_FDCWD, path, flags, mode, |p| {
            real::open64(p, flags, mode)
        })
    }
}
#[no_mangle]
pub unsafe extern "C" fn __open_2(path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: `open_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { open_common(libc::AT_FDCWD, path, flags, 0, |p| real::__open_2(p, flags)) }
}
#[no_mangle]
pub unsafe extern "C" fn __open64_2(path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: `open_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe {
        open_common(libc::AT_FDCWD, path, flags, 0, |p| {
            real::__open64_2(p, flags)
        })
    }
}
#[no_mangle]
pub unsafe extern "C" fn openat(
    d: c_int,
    path: *const c_char,
    flags: c_int,
    mode: mode_t,
) -> c_int {
    // SAFETY: `open_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { open_common(d, path, flags, mode, |p| real::openat(d, p, flags, mode)) }
}
#[no_mangle]
pub unsafe extern "C" fn openat64(
    d: c_int,
    path: *const c_char,
    flags: c_int,
    mode: mode_t,
) -> c_int {
    // SAFETY: `open_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { open_common(d, path, flags, mode, |p| real::openat64(d, p, flags, mode)) }
}
#[no_mangle]
pub unsafe extern "C" fn __openat_2(d: c_int, path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: `open_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { open_common(d, path, flags, 0, |p| real::__openat_2(d, p, flags)) }
}
#[no_mangle]
pub unsafe extern "C" fn __openat64_2(d: c_int, path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: `open_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { open_common(d, path, flags, 0, |p| real::__openat64_2(d, p, flags)) }
}
#[no_mangle]
pub unsafe extern "C" fn creat(path: *const c_char, mode: mode_t) -> c_int {
    let fl = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC;
    // SAFETY: `open_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { open_common(libc::AT_FDCWD, path, fl, mode, |p| real::creat(p, mode)) }
}
#[no_mangle]
pub unsafe extern "C" fn creat64(path: *const c_char, mode: mode_t) -> c_int {
    let fl = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC;
    // SAFETY: `open_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { open_common(libc::AT_FDCWD, path, fl, mode, |p| real::creat64(p, mode)) }
}

unsafe fn fopen_common(
    path: *const c_char,
    mode: *const c_char,
    real_fopen: impl Fn(*const c_char) -> *mut FILE,
) -> *mut FILE {
    let Some(g) = enter() else {
        return real_fopen(path);
    };
    let sh = shield::get();
    match sh.route(libc::AT_FDCWD, path) {
        Route::Pass => {
            drop(g);
            real_fopen(path)
        }
        Route::Kernel(k, _) => real_fopen(k.as_ptr()),
        Route::Deny(e) => fail_ptr(e),
        Route::Shield(ep) => {
            if mode.is_null() {
                return fail_ptr(libc::EINVAL);
            }
            // SAFETY: non-null NUL-terminated mode string from the program.
            let m = unsafe { std::ffi::CStr::from_ptr(mode) }.to_bytes();
            let Some(flags) = mode_flags(m) else {
                return fail_ptr(libc::EINVAL);
            };
            match shield_open_stdio(sh, ep, flags, 0o666) {
                // SAFETY: fd is our fresh placeholder; mode is valid.
                Ok(fd) => unsafe { cookie_file(fd, mode) },
                Err(e) => fail_ptr(e),
            }
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn fopen(path: *const c_char, mode: *const c_char) -> *mut FILE {
    // SAFETY: `fopen_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { fopen_common(path, mode, |p| real::fopen(p, mode)) }
}
#[no_mangle]
pub unsafe extern "C" fn fopen64(path: *const c_char, mode: *const c_char) -> *mut FILE {
    // SAFETY: `fopen_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { fopen_common(path, mode, |p| real::fopen64(p, mode)) }
}

unsafe fn freopen_common(
    path: *const c_char,
    real_freopen: impl Fn(*const c_char) -> *mut FILE,
) -> *mut FILE {
    let Some(g) = enter() else {
        return real_freopen(path);
    };
    if path.is_null() {
        drop(g);
        return real_freopen(path);
    }
    match shield::get().route(libc::AT_FDCWD, path) {
        Route::Pass => {
            drop(g);
            real_freopen(path)
        }
        Route::Kernel(k, _) => real_freopen(k.as_ptr()),
        Route::Deny(e) => fail_ptr(e),
        Route::Shield(ep) => {
            log(format!(
                "{ep}: freopen onto a protected file is not supported"
            ));
            fail_ptr(libc::ENOTSUP)
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn freopen(p: *const c_char, m: *const c_char, s: *mut FILE) -> *mut FILE {
    // SAFETY: `freopen_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { freopen_common(p, |p| real::freopen(p, m, s)) }
}
#[no_mangle]
pub unsafe extern "C" fn freopen64(p: *const c_char, m: *const c_char, s: *mut FILE) -> *mut FILE {
    // SAFETY: `freopen_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { freopen_common(p, |p| real::freopen64(p, m, s)) }
}

#[no_mangle]
pub unsafe extern "C" fn fdopen(fd: c_int, mode: *const c_char) -> *mut FILE {
    if let Some(_g) = enter() {
        if files::is_shielded(fd) {
            // SAFETY: fd is a registered shielded fd; the stream takes it over.
            return unsafe { cookie_file(fd, mode) };
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `fdopen` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::fdopen(fd, mode) }
}

//! open family and fopen family (FILE* over fopencookie: glibc's stdio bypasses the PLT); the
//! shielded open itself is [`crate::opening`].
use super::{fail, fail_ptr, ret};
use crate::files;
use crate::opening::{release, shield_open, shield_open_stdio};
use crate::shield::{self, Route};
use crate::{enter, enter_always, log, real};
use libc::{c_char, c_int, c_void, mode_t, size_t, ssize_t, FILE};
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

/// open(2) flags for an fopen mode string.
fn mode_flags(mode: &[u8]) -> Option<c_int> {
    let mut f = match mode.first()? {
        b'r' => libc::O_RDONLY,
        b'w' => libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
        b'a' => libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
        _ => return None,
    };
    for c in &mode[1..] {
        match c {
            b'+' => f = (f & !libc::O_ACCMODE) | libc::O_RDWR,
            b'x' => f |= libc::O_EXCL,
            b'e' => f |= libc::O_CLOEXEC,
            b',' => break,
            _ => {}
        }
    }
    Some(f)
}

#[repr(C)]
struct CookieIo {
    read: Option<unsafe extern "C" fn(*mut c_void, *mut c_char, size_t) -> ssize_t>,
    write: Option<unsafe extern "C" fn(*mut c_void, *const c_char, size_t) -> ssize_t>,
    seek: Option<unsafe extern "C" fn(*mut c_void, *mut i64, c_int) -> c_int>,
    close: Option<unsafe extern "C" fn(*mut c_void) -> c_int>,
}

extern "C" {
    fn fopencookie(cookie: *mut c_void, mode: *const c_char, io: CookieIo) -> *mut FILE;
}

unsafe extern "C" fn ck_read(c: *mut c_void, buf: *mut c_char, n: size_t) -> ssize_t {
    let _g = enter_always();
    let fd = c as usize as c_int;
    let Some(h) = files::get(fd) else {
        // The fd was re-pointed (dup2 onto it): the stream now reads the kernel fd.
        // SAFETY: stdio's buffer of n bytes.
        return unsafe { real::read(fd, buf.cast(), n) };
    };
    // SAFETY: stdio hands us its buffer of n bytes.
    unsafe { super::io::do_read(fd, &h, buf.cast(), n, None) }
}
unsafe extern "C" fn ck_write(c: *mut c_void, buf: *const c_char, n: size_t) -> ssize_t {
    let _g = enter_always();
    let fd = c as usize as c_int;
    let r = match files::get(fd) {
        // SAFETY: stdio hands us n bytes of its buffer.
        Some(h) => unsafe { super::io::do_write(fd, &h, buf.cast(), n, None) },
        // SAFETY: as above; the fd was re-pointed at a kernel file.
        None => unsafe { real::write(fd, buf.cast(), n) },
    };
    // stdio treats a 0 return as an error; short writes cannot happen on buffers.
    if r < 0 {
        0
    } else {
        r
    }
}
unsafe extern "C" fn ck_seek(c: *mut c_void, off: *mut i64, whence: c_int) -> c_int {
    let _g = enter_always();
    let fd = c as usize as c_int;
    // SAFETY: stdio passes a valid pointer to the requested offset.
    let o = unsafe { *off };
    let r = match files::get(fd) {
        Some(h) => super::io::do_seek(fd, &h, o, whence),
        // SAFETY: plain lseek on the re-pointed kernel fd.
        None => unsafe { real::lseek(fd, o, whence) },
    };
    if r < 0 {
        return -1;
    }
    // SAFETY: as above.
    unsafe { *off = r };
    0
}
unsafe extern "C" fn ck_close(c: *mut c_void) -> c_int {
    let _g = enter_always();
    let fd = c as usize as c_int;
    let sealed = files::remove(fd).map_or(Ok(()), release);
    // SAFETY: closing the placeholder fd this stream owned.
    let r = unsafe { real::close(fd) };
    match sealed {
        Ok(()) => r,
        Err(e) => fail(e),
    }
}

/// A read stream over fd 0 through the shield that does not own fd 0's table entry: closing it
/// closes fd 0 like `fclose(stdin)` does.
pub(crate) unsafe fn stdin_cookie() -> *mut FILE {
    let io = CookieIo {
        read: Some(ck_read),
        write: None,
        seek: Some(ck_seek),
        close: Some(ck_close),
    };
    // SAFETY: literal NUL-terminated mode; the cookie is fd number 0.
    let f = unsafe { fopencookie(std::ptr::null_mut(), c"r".as_ptr(), io) };
    if !f.is_null() {
        // SAFETY: as in cookie_file: `_fileno` of glibc's FILE on x86_64.
        unsafe { *f.cast::<u8>().add(FILENO_OFFSET).cast::<c_int>() = 0 };
    }
    f
}

/// Offset of `_fileno` in glibc's `struct _IO_FILE` on x86_64.
#[cfg(all(target_arch = "x86_64", target_env = "gnu"))]
const FILENO_OFFSET: usize = 112;

/// A FILE* whose I/O goes through the shield (fopencookie), owning `fd`.
pub(crate) unsafe fn cookie_file(fd: c_int, mode: *const c_char) -> *mut FILE {
    let io = CookieIo {
        read: Some(ck_read),
        write: Some(ck_write),
        seek: Some(ck_seek),
        close: Some(ck_close),
    };
    // SAFETY: mode is the program's NUL-terminated mode string; the cookie is the fd number.
    let f = unsafe { fopencookie(fd as usize as *mut c_void, mode, io) };
    if !f.is_null() {
        // fileno() of a cookie stream is -1, and programs (Python's fopen wrapper, fstat of
        // fileno) fail on that. Store the placeholder fd in the public `_fileno` field of glibc's
        // `struct _IO_FILE` (offset 112 on x86_64, part of the ABI): stdio still does all I/O
        // through the cookie functions, while fileno/fstat/fcntl reach the shielded fd.
        // SAFETY: f is a valid FILE*; _fileno is an int at FILENO_OFFSET in glibc's layout.
        unsafe { *f.cast::<u8>().add(FILENO_OFFSET).cast::<c_int>() = fd };
    }
    if f.is_null() {
        if let Some(h) = files::remove(fd) {
            let _ = release(h);
        }
        // SAFETY: closing our own placeholder.
        unsafe { real::close(fd) };
    }
    f
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

//! Stdio streams over shielded descriptors, below the hooks: glibc's stdio reads and writes
//! through internal calls the hooks never see, so a FILE* of a shielded file is a
//! `fopencookie` stream whose callbacks go through [`crate::fdio`].
use crate::files;
use crate::opening::release;
use crate::{enter_always, fail, real};
use libc::{c_char, c_int, c_void, size_t, ssize_t, FILE};
/// open(2) flags for an fopen mode string.
pub(crate) fn mode_flags(mode: &[u8]) -> Option<c_int> {
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
    unsafe { crate::fdio::do_read(fd, &h, buf.cast(), n, None) }
}
unsafe extern "C" fn ck_write(c: *mut c_void, buf: *const c_char, n: size_t) -> ssize_t {
    let _g = enter_always();
    let fd = c as usize as c_int;
    let r = match files::get(fd) {
        // SAFETY: stdio hands us n bytes of its buffer.
        Some(h) => unsafe { crate::fdio::do_write(fd, &h, buf.cast(), n, None) },
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
        Some(h) => crate::fdio::do_seek(fd, &h, o, whence),
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

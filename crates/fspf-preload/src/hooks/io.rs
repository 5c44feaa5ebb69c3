//! fd-based hooks: read/write families, lseek, close/dup/fcntl, truncate, fsync, copies
//! between fds (sendfile, copy_file_range, splice: emulated when a side is shielded) and mmap.
use super::{fail, fail_isize};
use crate::fdio::{do_read, do_seek, do_write, materialise_placeholder};
use crate::files::{self, Body, Handle};
use crate::opening::release;
use crate::{enter, log, real, set_errno, shield};
use libc::{c_int, c_uint, c_ulong, c_void, off_t, size_t, ssize_t};
use std::sync::atomic::Ordering;

macro_rules! shielded {
    ($fd:expr) => {
        match enter() {
            Some(g) => files::get($fd).map(|h| (g, h)),
            None => None,
        }
    };
}

#[no_mangle]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    if let Some((_g, h)) = shielded!(fd) {
        // SAFETY: the program's buffer.
        return unsafe { do_read(fd, &h, buf.cast(), n, None) };
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `read` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::read(fd, buf, n) }
}
#[no_mangle]
pub unsafe extern "C" fn __read_chk(fd: c_int, buf: *mut c_void, n: size_t, bl: size_t) -> ssize_t {
    if let Some((_g, h)) = shielded!(fd) {
        if n > bl {
            // SAFETY: fortify contract: abort on overflow like glibc.
            unsafe { libc::abort() };
        }
        // SAFETY: the program's buffer.
        return unsafe { do_read(fd, &h, buf.cast(), n, None) };
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `__read_chk` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::__read_chk(fd, buf, n, bl) }
}
#[no_mangle]
pub unsafe extern "C" fn pread(fd: c_int, buf: *mut c_void, n: size_t, o: off_t) -> ssize_t {
    if let Some((_g, h)) = shielded!(fd) {
        if o < 0 {
            return fail_isize(libc::EINVAL);
        }
        // SAFETY: the program's buffer.
        return unsafe { do_read(fd, &h, buf.cast(), n, Some(o as u64)) };
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `pread` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::pread(fd, buf, n, o) }
}
#[no_mangle]
pub unsafe extern "C" fn pread64(fd: c_int, buf: *mut c_void, n: size_t, o: off_t) -> ssize_t {
    if let Some((_g, h)) = shielded!(fd) {
        if o < 0 {
            return fail_isize(libc::EINVAL);
        }
        // SAFETY: the program's buffer.
        return unsafe { do_read(fd, &h, buf.cast(), n, Some(o as u64)) };
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `pread64` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::pread64(fd, buf, n, o) }
}

unsafe fn vec_io(
    fd: c_int,
    h: &Handle,
    v: *const libc::iovec,
    cnt: c_int,
    off: Option<u64>,
    write: bool,
) -> ssize_t {
    if cnt < 0 {
        return fail_isize(libc::EINVAL);
    }
    let mut total: ssize_t = 0;
    for i in 0..cnt as usize {
        // SAFETY: the program passed cnt iovecs.
        let io = unsafe { *v.add(i) };
        let o = off.map(|o| o + total as u64);
        let r = if write {
            // SAFETY: iovec describes the program's buffer.
            unsafe { do_write(fd, h, io.iov_base.cast(), io.iov_len, o) }
        } else {
            // SAFETY: iovec describes the program's buffer.
            unsafe { do_read(fd, h, io.iov_base.cast(), io.iov_len, o) }
        };
        if r < 0 {
            return if total > 0 { total } else { r };
        }
        total += r;
        if (r as usize) < io.iov_len {
            break;
        }
    }
    total
}

#[no_mangle]
pub unsafe extern "C" fn readv(fd: c_int, v: *const libc::iovec, n: c_int) -> ssize_t {
    if let Some((_g, h)) = shielded!(fd) {
        // SAFETY: program-provided iovecs.
        return unsafe { vec_io(fd, &h, v, n, None, false) };
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `readv` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::readv(fd, v, n) }
}
#[no_mangle]
pub unsafe extern "C" fn preadv(fd: c_int, v: *const libc::iovec, n: c_int, o: off_t) -> ssize_t {
    if let Some((_g, h)) = shielded!(fd) {
        // SAFETY: program-provided iovecs.
        return unsafe { vec_io(fd, &h, v, n, Some(o.max(0) as u64), false) };
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `preadv` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::preadv(fd, v, n, o) }
}
#[no_mangle]
pub unsafe extern "C" fn preadv64(fd: c_int, v: *const libc::iovec, n: c_int, o: off_t) -> ssize_t {
    if let Some((_g, h)) = shielded!(fd) {
        // SAFETY: program-provided iovecs.
        return unsafe { vec_io(fd, &h, v, n, Some(o.max(0) as u64), false) };
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `preadv64` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::preadv64(fd, v, n, o) }
}
#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    if let Some((_g, h)) = shielded!(fd) {
        // SAFETY: the program's buffer.
        return unsafe { do_write(fd, &h, buf.cast(), n, None) };
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `write` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::write(fd, buf, n) }
}
#[no_mangle]
pub unsafe extern "C" fn pwrite(fd: c_int, buf: *const c_void, n: size_t, o: off_t) -> ssize_t {
    if let Some((_g, h)) = shielded!(fd) {
        // SAFETY: the program's buffer.
        return unsafe { do_write(fd, &h, buf.cast(), n, Some(o.max(0) as u64)) };
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `pwrite` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::pwrite(fd, buf, n, o) }
}
#[no_mangle]
pub unsafe extern "C" fn pwrite64(fd: c_int, buf: *const c_void, n: size_t, o: off_t) -> ssize_t {
    if let Some((_g, h)) = shielded!(fd) {
        // SAFETY: the program's buffer.
        return unsafe { do_write(fd, &h, buf.cast(), n, Some(o.max(0) as u64)) };
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `pwrite64` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::pwrite64(fd, buf, n, o) }
}
#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, v: *const libc::iovec, n: c_int) -> ssize_t {
    if let Some((_g, h)) = shielded!(fd) {
        // SAFETY: program-provided iovecs.
        return unsafe { vec_io(fd, &h, v, n, None, true) };
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `writev` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::writev(fd, v, n) }
}
#[no_mangle]
pub unsafe extern "C" fn pwritev(fd: c_int, v: *const libc::iovec, n: c_int, o: off_t) -> ssize_t {
    if let Some((_g, h)) = shielded!(fd) {
        // SAFETY: program-provided iovecs.
        return unsafe { vec_io(fd, &h, v, n, Some(o.max(0) as u64), true) };
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `pwritev` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::pwritev(fd, v, n, o) }
}
#[no_mangle]
pub unsafe extern "C" fn pwritev64(
    fd: c_int,
    v: *const libc::iovec,
    n: c_int,
    o: off_t,
) -> ssize_t {
    if let Some((_g, h)) = shielded!(fd) {
        // SAFETY: program-provided iovecs.
        return unsafe { vec_io(fd, &h, v, n, Some(o.max(0) as u64), true) };
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `pwritev64` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::pwritev64(fd, v, n, o) }
}
#[no_mangle]
pub unsafe extern "C" fn lseek(fd: c_int, o: off_t, w: c_int) -> off_t {
    if let Some((_g, h)) = shielded!(fd) {
        return do_seek(fd, &h, o, w);
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `lseek` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::lseek(fd, o, w) }
}
#[no_mangle]
pub unsafe extern "C" fn lseek64(fd: c_int, o: off_t, w: c_int) -> off_t {
    if let Some((_g, h)) = shielded!(fd) {
        return do_seek(fd, &h, o, w);
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `lseek64` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::lseek64(fd, o, w) }
}

/// The shield's own fds (anchor, key, buffers, and fspf-core's writer locks held while staged
/// versions await their commit) survive programs that close "all other" fds.
fn is_own_fd(fd: c_int) -> bool {
    let sh = shield::get();
    fd >= 0
        && (fd == sh.anchor_fd()
            || fd == sh.key_fd()
            || fd == sh.index_fd()
            || fd == crate::index_fd::paged_fd()
            || files::is_own(fd)
            || crate::locks::is_own(fd)
            || fd == crate::runbuf::dir_fd()
            || (fd >= fspf_core::volume::WRITER_FD_BASE
                && fspf_core::volume::held_fds().contains(&fd))
            || fspf_core::volume::kernel_fs::is_tracked(fd))
}

#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if let Some(_g) = enter() {
        if is_own_fd(fd) {
            return 0;
        }
        files::forget_translated(fd);
        let h = files::remove(fd);
        if let Some(h) = &h {
            // POSIX: closing any fd of a file drops the process's record locks on it.
            crate::locks::closed(h);
        }
        let sealed = h.map_or(Ok(()), release);
        // SAFETY: closing the placeholder.
        let r = unsafe { real::close(fd) };
        // A version that could not be sealed is reported by close, like a failed write-back.
        return match sealed {
            Ok(()) => r,
            Err(e) => fail(e),
        };
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `close` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::close(fd) }
}

#[no_mangle]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    let Some(_g) = enter() else {
        // SAFETY: the caller's arguments, unchanged, to glibc's own `close_range` (resolved
        // with RTLD_NEXT): the caller's contract for this call is that function's contract.
        return unsafe { real::close_range(first, last, flags) };
    };
    let sh = shield::get();
    let hi = c_int::try_from(last).unwrap_or(c_int::MAX);
    let lo = c_int::try_from(first).unwrap_or(c_int::MAX);
    let mut own: Vec<c_uint> = [sh.anchor_fd(), sh.key_fd(), sh.index_fd()]
        .into_iter()
        .chain(files::own_in(lo, hi))
        .chain(crate::locks::own_in(lo, hi))
        .chain([crate::runbuf::dir_fd()])
        .chain(fspf_core::volume::held_fds())
        .chain(fspf_core::volume::kernel_fs::tracked_fds())
        .filter(|&f| f >= 0 && (first..=last).contains(&(f as c_uint)))
        .map(|f| f as c_uint)
        .collect();
    own.sort_unstable();
    own.dedup();
    if flags & libc::CLOSE_RANGE_CLOEXEC as c_int == 0 {
        for fd in files::all_fds() {
            if (first..=last).contains(&(fd as c_uint)) && !is_own_fd(fd) {
                if let Some(h) = files::remove(fd) {
                    let _ = release(h);
                }
            }
        }
    }
    // Close around the shield's own fds.
    let mut lo = first;
    let mut r = 0;
    for o in own {
        if o > lo {
            // SAFETY: closing a range of the program's fds.
            r |= unsafe { real::close_range(lo, o - 1, flags) };
        }
        lo = o.saturating_add(1);
        if o == c_uint::MAX {
            return r;
        }
    }
    if lo <= last {
        // SAFETY: as above.
        r |= unsafe { real::close_range(lo, last, flags) };
    }
    r
}

/// Track `new` as a duplicate of `old` after the kernel duplicated it. Err(errno) when `new`
/// is a standard stream whose plaintext failed verification: `new` is then closed, so the
/// program reads neither an empty file nor anything else from it (a tampered file redirected
/// to stdin must not read as empty with exit status 0).
fn dup_into(old: c_int, new: c_int) -> Result<(), c_int> {
    if let Some(h) = files::remove(new) {
        // dup2 closes `new` silently, as the kernel does (and, as any close of the file, drops
        // the process's record locks on it).
        crate::locks::closed(&h);
        let _ = release(h);
    }
    files::forget_translated(new);
    if let Some(h) = files::get(old) {
        if new == 0 && lazy_stdin(&h) {
            // `dd if=F`, `prog < F` handled in-process: reads stay lazy and verified.
        } else if (0..=2).contains(&new) {
            // stdin/stdout/stderr are read by glibc's stdio with internal calls that bypass
            // the hooks: give a read-only placeholder the verified plaintext and let the
            // kernel serve it from now on.
            let mut f = h.lock().unwrap_or_else(|e| e.into_inner());
            if f.touched.is_none()
                && !matches!(f.body, Body::Dir)
                && !materialise_placeholder(new, &mut f)
            {
                drop(f);
                // SAFETY: closing the program's duplicate, which holds no verified bytes.
                unsafe { real::close(new) };
                return Err(libc::EIO);
            }
        }
        files::insert(new, h);
    } else if let Some(ep) = files::translated_path(old) {
        files::track_translated(new, ep);
    }
    Ok(())
}

extern "C" {
    static mut stdin: *mut libc::FILE;
}

/// A read-only shielded file becomes fd 0: instead of filling its placeholder with the whole
/// plaintext (1 GiB for `dd if=` of a 1 GiB file, before the first byte is read), point glibc's
/// `stdin` at a stream whose reads go through the shield (the same cookie stream `fopen` uses),
/// so hooked `read(0)` and stdio both read verified chunks on demand. An `exec` still fills the
/// placeholder for the new program (`materialise_inherited`). False when not applicable.
fn lazy_stdin(h: &Handle) -> bool {
    static SWAPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    {
        let f = h.lock().unwrap_or_else(|e| e.into_inner());
        if f.touched.is_some() || f.write || matches!(f.body, Body::Dir) {
            return false;
        }
    }
    if SWAPPED.load(Ordering::Relaxed) {
        return true;
    }
    // SAFETY: reading glibc's `stdin` pointer (written only here and by the program).
    let old = unsafe { stdin };
    // SAFETY: a NUL-terminated mode; the stream reads fd 0 through the shield's hooks and, if fd
    // 0 later stops being shielded, through the kernel.
    let f = unsafe { crate::stdio::stdin_cookie() };
    if f.is_null() {
        return false;
    }
    if !old.is_null() {
        // Anything already buffered in the old stream belonged to the previous fd 0.
        // SAFETY: the program's own stdin stream.
        unsafe { libc::fflush(old) };
    }
    // SAFETY: replacing glibc's `stdin` pointer, as `freopen` would.
    unsafe { stdin = f };
    SWAPPED.store(true, Ordering::Relaxed);
    true
}

/// The end of a successful dup: track it, or fail the call as a whole.
fn dup_result(old: c_int, new: c_int) -> c_int {
    match dup_into(old, new) {
        Ok(()) => new,
        Err(e) => fail(e),
    }
}

#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    // SAFETY: the caller's arguments, unchanged, to glibc's own `dup` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    let r = unsafe { real::dup(fd) };
    if r >= 0 {
        if let Some(_g) = enter() {
            return dup_result(fd, r);
        }
    }
    r
}
#[no_mangle]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    if let Some(_g) = enter() {
        shield::get().protect_own_fd(new);
        files::protect_own(new);
        crate::locks::protect(new);
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `dup2` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    let r = unsafe { real::dup2(old, new) };
    if r >= 0 && old != new {
        if let Some(_g) = enter() {
            return dup_result(old, new);
        }
    }
    r
}
#[no_mangle]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, fl: c_int) -> c_int {
    if let Some(_g) = enter() {
        shield::get().protect_own_fd(new);
        files::protect_own(new);
        crate::locks::protect(new);
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `dup3` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    let r = unsafe { real::dup3(old, new, fl) };
    if r >= 0 {
        if let Some(_g) = enter() {
            return dup_result(old, new);
        }
    }
    r
}

unsafe fn fcntl_common(fd: c_int, cmd: c_int, arg: c_ulong, is64: bool) -> c_int {
    let call = |fd, cmd, arg| {
        if is64 {
            // SAFETY: the caller's arguments, unchanged, to glibc's own `fcntl64` (resolved
            // with RTLD_NEXT): the caller's contract for this call is that function's contract.
            unsafe { real::fcntl64(fd, cmd, arg) }
        } else {
            // SAFETY: the caller's arguments, unchanged, to glibc's own `fcntl` (resolved
            // with RTLD_NEXT): the caller's contract for this call is that function's contract.
            unsafe { real::fcntl(fd, cmd, arg) }
        }
    };
    let Some(_g) = enter() else {
        return call(fd, cmd, arg);
    };
    match cmd {
        libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => {
            let r = call(fd, cmd, arg);
            if r >= 0 {
                return dup_result(fd, r);
            }
            r
        }
        libc::F_GETFL => match files::get(fd) {
            Some(h) => {
                let f = h.lock().unwrap_or_else(|e| e.into_inner());
                let acc = match (f.read, f.write) {
                    (true, true) => libc::O_RDWR,
                    (false, true) => libc::O_WRONLY,
                    _ => libc::O_RDONLY,
                };
                acc | if f.append { libc::O_APPEND } else { 0 } | libc::O_LARGEFILE
            }
            None => call(fd, cmd, arg),
        },
        libc::F_SETLK
        | libc::F_SETLKW
        | libc::F_GETLK
        | libc::F_OFD_SETLK
        | libc::F_OFD_SETLKW
        | libc::F_OFD_GETLK => match files::get(fd).filter(crate::locks::applies) {
            // SAFETY: `arg` is the program's struct flock for this lock command.
            Some(h) => match unsafe { crate::locks::fcntl(&h, cmd, arg) } {
                Ok(r) => r,
                Err(e) => fail(e),
            },
            None => call(fd, cmd, arg),
        },
        libc::F_SETFL => {
            if let Some(h) = files::get(fd) {
                h.lock().unwrap_or_else(|e| e.into_inner()).append =
                    arg as c_int & libc::O_APPEND != 0;
            }
            call(fd, cmd, arg)
        }
        _ => call(fd, cmd, arg),
    }
}

#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    // SAFETY: `fcntl_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { fcntl_common(fd, cmd, arg, false) }
}
#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    // SAFETY: `fcntl_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { fcntl_common(fd, cmd, arg, true) }
}

/// `flock` of a shielded file locks it for every process of the run (`locks.rs`).
#[no_mangle]
pub unsafe extern "C" fn flock(fd: c_int, op: c_int) -> c_int {
    if let Some((_g, h)) = shielded!(fd) {
        if crate::locks::applies(&h) {
            return match crate::locks::flock(&h, op) {
                Ok(()) => 0,
                Err(e) => fail(e),
            };
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `flock` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::flock(fd, op) }
}

/// `lockf` (glibc's calls its internal fcntl, which no hook sees): record locks of the process.
#[no_mangle]
pub unsafe extern "C" fn lockf(fd: c_int, cmd: c_int, len: off_t) -> c_int {
    if let Some((_g, h)) = shielded!(fd) {
        if crate::locks::applies(&h) {
            return match crate::locks::lockf(&h, cmd, len) {
                Ok(()) => 0,
                Err(e) => fail(e),
            };
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `lockf` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::lockf(fd, cmd, len) }
}
#[no_mangle]
pub unsafe extern "C" fn lockf64(fd: c_int, cmd: c_int, len: off_t) -> c_int {
    // SAFETY: same function (off_t is 64 bits on x86_64).
    unsafe { lockf(fd, cmd, len) }
}

const FICLONE: c_ulong = 0x4004_9409;
const FICLONERANGE: c_ulong = 0x4020_940d;

#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, req: c_ulong, arg: c_ulong) -> c_int {
    if let Some(_g) = enter() {
        let src_shielded = req == FICLONE && files::is_shielded(arg as c_int);
        if (req == FICLONE || req == FICLONERANGE) && (files::is_shielded(fd) || src_shielded) {
            // Reflinking would copy ciphertext (or unverified bytes): make the caller copy.
            return fail(libc::EOPNOTSUPP);
        }
        if req == libc::FIONREAD as c_ulong {
            if let Some(h) = files::get(fd) {
                let f = h.lock().unwrap_or_else(|e| e.into_inner());
                let n = f.size().saturating_sub(f.offset).min(c_int::MAX as u64) as c_int;
                // SAFETY: FIONREAD's argument is an int*.
                unsafe { *(arg as *mut c_int) = n };
                return 0;
            }
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `ioctl` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::ioctl(fd, req, arg) }
}

fn truncate_fd(h: &Handle, len: off_t) -> c_int {
    if len < 0 {
        return fail(libc::EINVAL);
    }
    match crate::fdio::truncate_handle(h, len as u64) {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

#[no_mangle]
pub unsafe extern "C" fn ftruncate(fd: c_int, len: off_t) -> c_int {
    if let Some((_g, h)) = shielded!(fd) {
        return truncate_fd(&h, len);
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `ftruncate` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::ftruncate(fd, len) }
}
#[no_mangle]
pub unsafe extern "C" fn ftruncate64(fd: c_int, len: off_t) -> c_int {
    if let Some((_g, h)) = shielded!(fd) {
        return truncate_fd(&h, len);
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `ftruncate64` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::ftruncate64(fd, len) }
}

fn allocate(h: &Handle, off: off_t, len: off_t) -> c_int {
    if off < 0 || len <= 0 {
        return libc::EINVAL;
    }
    let end = (off + len) as u64;
    let size = h.lock().unwrap_or_else(|e| e.into_inner()).size();
    if size < end {
        if let Err(e) = crate::fdio::truncate_handle(h, end) {
            return e;
        }
    }
    0
}

#[no_mangle]
pub unsafe extern "C" fn fallocate(fd: c_int, mode: c_int, off: off_t, len: off_t) -> c_int {
    if let Some((_g, h)) = shielded!(fd) {
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return fail(libc::EOPNOTSUPP);
        }
        if mode != 0 {
            return 0;
        }
        let e = allocate(&h, off, len);
        return if e == 0 { 0 } else { fail(e) };
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `fallocate` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::fallocate(fd, mode, off, len) }
}
#[no_mangle]
pub unsafe extern "C" fn fallocate64(fd: c_int, mode: c_int, off: off_t, len: off_t) -> c_int {
    // SAFETY: same function.
    unsafe { fallocate(fd, mode, off, len) }
}
#[no_mangle]
pub unsafe extern "C" fn posix_fallocate(fd: c_int, off: off_t, len: off_t) -> c_int {
    if let Some((_g, h)) = shielded!(fd) {
        return allocate(&h, off, len);
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `posix_fallocate` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::posix_fallocate(fd, off, len) }
}
#[no_mangle]
pub unsafe extern "C" fn posix_fallocate64(fd: c_int, off: off_t, len: off_t) -> c_int {
    // SAFETY: same function.
    unsafe { posix_fallocate(fd, off, len) }
}

/// fsync of a shielded fd is a commit point: stage dirty buffers, commit, publish the tag.
/// fsync/fdatasync of any shielded fd, read-only ones included, commits everything queued:
/// POSIX makes the file's data durable whichever descriptor is synced, and a writer that closed
/// its fd may have left the file's new version queued (only staged, not committed).
/// The commit is the process's, but the answer is this file's: another file that found no
/// room (a large one that stays in its buffer) fails its own `fsync`, not this one's. (For a
/// descriptor without a buffer of its own, any stage's failure is reported.)
fn sync_fd(h: &Handle) -> c_int {
    let sh = shield::get();
    let mut inner = sh.lock();
    let (committed, staged) = sh.commit_parts(&mut inner);
    let mine = || {
        crate::files::buffer_of(h)
            .is_none_or(|b| b.lock().unwrap_or_else(|e| e.into_inner()).needs_seal())
    };
    match committed.and(staged.or_else(|e| if mine() { Err(e) } else { Ok(()) })) {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

#[no_mangle]
pub unsafe extern "C" fn fsync(fd: c_int) -> c_int {
    if let Some((_g, h)) = shielded!(fd) {
        return sync_fd(&h);
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `fsync` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::fsync(fd) }
}
#[no_mangle]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    if let Some((_g, h)) = shielded!(fd) {
        return sync_fd(&h);
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `fdatasync` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::fdatasync(fd) }
}
#[no_mangle]
pub unsafe extern "C" fn syncfs(fd: c_int) -> c_int {
    if let Some(_g) = enter() {
        let sh = shield::get();
        let mut inner = sh.lock();
        if let Err(e) = sh.commit(&mut inner) {
            return fail(e);
        }
        if files::is_shielded(fd) {
            return 0;
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `syncfs` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::syncfs(fd) }
}

#[no_mangle]
pub unsafe extern "C" fn posix_fadvise(fd: c_int, o: off_t, l: off_t, a: c_int) -> c_int {
    if let Some((_g, _h)) = shielded!(fd) {
        return 0;
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `posix_fadvise` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::posix_fadvise(fd, o, l, a) }
}
#[no_mangle]
pub unsafe extern "C" fn posix_fadvise64(fd: c_int, o: off_t, l: off_t, a: c_int) -> c_int {
    if let Some((_g, _h)) = shielded!(fd) {
        return 0;
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `posix_fadvise64` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::posix_fadvise64(fd, o, l, a) }
}

/// Read from any fd (shielded or not); `off` = positional.
unsafe fn any_read(fd: c_int, buf: &mut [u8], off: Option<u64>) -> ssize_t {
    match files::get(fd) {
        // SAFETY: our own buffer.
        Some(h) => unsafe { do_read(fd, &h, buf.as_mut_ptr(), buf.len(), off) },
        None => match off {
            // SAFETY: our own buffer.
            Some(o) => unsafe { real::pread(fd, buf.as_mut_ptr().cast(), buf.len(), o as off_t) },
            // SAFETY: our own buffer.
            None => unsafe { real::read(fd, buf.as_mut_ptr().cast(), buf.len()) },
        },
    }
}

unsafe fn any_write_all(fd: c_int, mut buf: &[u8], mut off: Option<u64>) -> Result<(), c_int> {
    while !buf.is_empty() {
        let r = match files::get(fd) {
            // SAFETY: our own buffer.
            Some(h) => unsafe { do_write(fd, &h, buf.as_ptr(), buf.len(), off) },
            None => match off {
                // SAFETY: our own buffer.
                Some(o) => unsafe { real::pwrite(fd, buf.as_ptr().cast(), buf.len(), o as off_t) },
                // SAFETY: our own buffer.
                None => unsafe { real::write(fd, buf.as_ptr().cast(), buf.len()) },
            },
        };
        if r < 0 {
            let e = crate::errno();
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        buf = &buf[r as usize..];
        off = off.map(|o| o + r as u64);
    }
    Ok(())
}

/// Copy up to `n` bytes from `i` to `o` through the shield; offsets as in copy_file_range.
unsafe fn emulate_copy(i: c_int, io: *mut off_t, o: c_int, oo: *mut off_t, n: size_t) -> ssize_t {
    // Small at first (`cp` asks for far more than a small file holds, and a zeroed 1 MiB per
    // call cost more than the copy), doubled while reads fill it, up to 1 MiB.
    let mut buf = vec![0u8; n.clamp(1, 64 << 10)];
    let mut total: usize = 0;
    while total < n {
        if total > 0 && total >= buf.len() && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
        }
        let want = (n - total).min(buf.len());
        // SAFETY: io/oo are null or valid pointers provided by the program.
        let in_off = (!io.is_null()).then(|| unsafe { *io } as u64);
        // SAFETY: our own buffer.
        let r = unsafe { any_read(i, &mut buf[..want], in_off) };
        if r < 0 {
            return if total > 0 { total as ssize_t } else { -1 };
        }
        if r == 0 {
            break;
        }
        // SAFETY: as above.
        let out_off = (!oo.is_null()).then(|| unsafe { *oo } as u64);
        // SAFETY: our own buffer.
        if let Err(e) = unsafe { any_write_all(o, &buf[..r as usize], out_off) } {
            set_errno(e);
            return if total > 0 { total as ssize_t } else { -1 };
        }
        if !io.is_null() {
            // SAFETY: valid pointer (checked).
            unsafe { *io += r as off_t };
        }
        if !oo.is_null() {
            // SAFETY: valid pointer (checked).
            unsafe { *oo += r as off_t };
        }
        total += r as usize;
        if (r as usize) < want {
            break;
        }
    }
    total as ssize_t
}

#[no_mangle]
pub unsafe extern "C" fn sendfile(o: c_int, i: c_int, off: *mut off_t, n: size_t) -> ssize_t {
    if let Some(_g) = enter() {
        if files::is_shielded(o) || files::is_shielded(i) {
            // SAFETY: program-provided pointers.
            return unsafe { emulate_copy(i, off, o, std::ptr::null_mut(), n) };
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `sendfile` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::sendfile(o, i, off, n) }
}
#[no_mangle]
pub unsafe extern "C" fn sendfile64(o: c_int, i: c_int, off: *mut off_t, n: size_t) -> ssize_t {
    // SAFETY: same function.
    unsafe { sendfile(o, i, off, n) }
}
#[no_mangle]
pub unsafe extern "C" fn copy_file_range(
    i: c_int,
    io: *mut off_t,
    o: c_int,
    oo: *mut off_t,
    n: size_t,
    f: c_uint,
) -> ssize_t {
    if let Some(_g) = enter() {
        if files::is_shielded(o) || files::is_shielded(i) {
            // SAFETY: program-provided pointers.
            return unsafe { emulate_copy(i, io, o, oo, n) };
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `copy_file_range` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::copy_file_range(i, io, o, oo, n, f) }
}
#[no_mangle]
pub unsafe extern "C" fn splice(
    i: c_int,
    io: *mut off_t,
    o: c_int,
    oo: *mut off_t,
    n: size_t,
    f: c_uint,
) -> ssize_t {
    if let Some(_g) = enter() {
        if files::is_shielded(o) || files::is_shielded(i) {
            // SAFETY: program-provided pointers.
            return unsafe { emulate_copy(i, io, o, oo, n.min(1 << 16)) };
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `splice` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::splice(i, io, o, oo, n, f) }
}

/// mmap reports failure as MAP_FAILED, not NULL.
fn map_failed(e: c_int) -> *mut c_void {
    set_errno(e);
    libc::MAP_FAILED
}

unsafe fn mmap_shielded(
    h: &Handle,
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    off: off_t,
) -> *mut c_void {
    // A map reads (or is) the buffer's memory.
    if let Err(e) = files::load_unloaded_for(h, true) {
        return map_failed(e);
    }
    if flags & libc::MAP_SHARED != 0 && prot & libc::PROT_WRITE != 0 {
        // A description open for writing has a buffer (a memfd holding the plaintext): map it.
        // Its writes reach the buffer, which is sealed at the next commit point like any write
        // (SQLite's WAL index, LMDB-style readers and writers in one process).
        let f = h.lock().unwrap_or_else(|e| e.into_inner());
        if let (Body::Buf(b), true) = (&f.body, f.write) {
            let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
            g.touched.store(true, Ordering::Relaxed);
            g.mapped_shared = true;
            g.track = None;
            g.append_only.store(false, Ordering::Relaxed);
            // SAFETY: mapping our own buffer memfd with the program's arguments.
            return unsafe { real::mmap(addr, len, prot, flags, g.fd, off) };
        }
        log(format!(
            "{}: writable shared mmap of a protected file opened read-only (EACCES)",
            f.path
        ));
        return map_failed(libc::EACCES);
    }
    if off < 0 || len == 0 {
        return map_failed(libc::EINVAL);
    }
    let fl = libc::MAP_PRIVATE
        | libc::MAP_ANONYMOUS
        | (flags & (libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE));
    // SAFETY: an anonymous private mapping; addr/len come from the program.
    let p = unsafe { real::mmap(addr, len, libc::PROT_READ | libc::PROT_WRITE, fl, -1, 0) };
    if p == libc::MAP_FAILED {
        return p;
    }
    let mut f = h.lock().unwrap_or_else(|e| e.into_inner());
    let avail = f.size().saturating_sub(off as u64).min(len as u64) as usize;
    // SAFETY: p is a fresh writable mapping of len >= avail bytes.
    let dst = unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), avail) };
    let mut done = 0;
    while done < avail {
        match f.read_at(&mut dst[done..], off as u64 + done as u64) {
            Ok(0) => break,
            Ok(k) => done += k,
            Err(e) => {
                let e = if e == files::STALE {
                    crate::fdio::stale_is_tampering(&f.path)
                } else {
                    e
                };
                // SAFETY: unmapping the mapping we just made.
                unsafe { libc::munmap(p, len) };
                return map_failed(e);
            }
        }
    }
    // SAFETY: restoring the requested protection on our mapping.
    unsafe { libc::mprotect(p, len, prot) };
    p
}

#[no_mangle]
pub unsafe extern "C" fn mmap(
    a: *mut c_void,
    l: size_t,
    p: c_int,
    f: c_int,
    fd: c_int,
    o: off_t,
) -> *mut c_void {
    if f & libc::MAP_ANONYMOUS == 0 {
        if let Some((_g, h)) = shielded!(fd) {
            // SAFETY: program-provided arguments.
            return unsafe { mmap_shielded(&h, a, l, p, f, o) };
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `mmap` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::mmap(a, l, p, f, fd, o) }
}
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    a: *mut c_void,
    l: size_t,
    p: c_int,
    f: c_int,
    fd: c_int,
    o: off_t,
) -> *mut c_void {
    // SAFETY: same function.
    unsafe { mmap(a, l, p, f, fd, o) }
}

/// glibc's closefrom issues close_range itself (not through the PLT); route it through ours so
/// the shield's own fds survive.
#[no_mangle]
pub unsafe extern "C" fn closefrom(low: c_int) {
    // SAFETY: same contract as close_range over [low, max].
    unsafe { close_range(low.max(0) as c_uint, c_uint::MAX, 0) };
}

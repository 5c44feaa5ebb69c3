//! Reading, writing and seeking a shielded descriptor, below the hooks: the read/write/lseek
//! hooks and the stdio cookies both call these.
use crate::files::{self, Body, Handle};
use crate::{fail_isize, real, set_errno};
use libc::{c_int, off_t, size_t, ssize_t};
use std::sync::atomic::Ordering;

/// Read at `off` (or the shared offset, advancing it). Buffers are read by the kernel.
pub unsafe fn do_read(fd: c_int, h: &Handle, buf: *mut u8, n: size_t, off: Option<u64>) -> ssize_t {
    let mut f = h.lock().unwrap_or_else(|e| e.into_inner());
    if f.touched.is_some() {
        drop(f);
        return match off {
            // SAFETY: the program's buffer of n bytes; fd is a description of the buffer.
            Some(o) => unsafe { real::pread(fd, buf.cast(), n, o as off_t) },
            // SAFETY: as above.
            None => unsafe { real::read(fd, buf.cast(), n) },
        };
    }
    let pos = off.unwrap_or(f.offset);
    if n == 0 {
        return 0;
    }
    // SAFETY: the program passed a buffer of n writable bytes.
    let out = unsafe { std::slice::from_raw_parts_mut(buf, n) };
    match f.read_at(out, pos) {
        Ok(k) => {
            if off.is_none() {
                f.offset = pos + k as u64;
            }
            k as ssize_t
        }
        Err(e) => fail_isize(e),
    }
}

/// Write through a buffer's description (the kernel keeps offset and O_APPEND).
pub unsafe fn do_write(
    fd: c_int,
    h: &Handle,
    buf: *const u8,
    n: size_t,
    off: Option<u64>,
) -> ssize_t {
    let touched = {
        let f = h.lock().unwrap_or_else(|e| e.into_inner());
        if !f.write {
            return fail_isize(libc::EBADF);
        }
        if let Body::Buf(b) = &f.body {
            // Only writes through O_APPEND descriptions keep a buffer append-only (they land
            // at the end whatever the offset); any other write may change what was loaded.
            if !f.append {
                b.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .append_only
                    .store(false, Ordering::Relaxed);
            }
        }
        f.touched.clone()
    };
    let Some(t) = touched else {
        return fail_isize(libc::EBADF);
    };
    if off.is_some_and(|o| o.saturating_add(n as u64) > files::MAX_BUFFER_LEN) {
        return fail_isize(libc::EFBIG);
    }
    t.store(true, Ordering::Relaxed);
    match off {
        // SAFETY: the program's n bytes; fd is a description of the buffer.
        Some(o) => unsafe { real::pwrite(fd, buf.cast(), n, o as off_t) },
        // SAFETY: as above.
        None => unsafe { real::write(fd, buf.cast(), n) },
    }
}

pub fn do_seek(fd: c_int, h: &Handle, off: i64, whence: c_int) -> i64 {
    let mut f = h.lock().unwrap_or_else(|e| e.into_inner());
    if f.touched.is_some() {
        drop(f);
        // SAFETY: seeking the program's description of the buffer.
        let r = unsafe { real::lseek(fd, off, whence) };
        if r > files::MAX_BUFFER_LEN as i64 {
            // Past the largest file the shield writes: nothing may be written there.
            // SAFETY: moving back to the end of our buffer.
            unsafe { real::lseek(fd, 0, libc::SEEK_END) };
            set_errno(libc::EFBIG);
            return -1;
        }
        return r;
    }
    let size = f.size() as i64;
    let new = match whence {
        libc::SEEK_SET => off,
        libc::SEEK_CUR => f.offset as i64 + off,
        libc::SEEK_END => size + off,
        libc::SEEK_DATA => {
            if off >= size {
                set_errno(libc::ENXIO);
                return -1;
            }
            off
        }
        libc::SEEK_HOLE => {
            if off > size {
                set_errno(libc::ENXIO);
                return -1;
            }
            size
        }
        _ => {
            set_errno(libc::EINVAL);
            return -1;
        }
    };
    if new < 0 {
        set_errno(libc::EINVAL);
        return -1;
    }
    f.offset = new as u64;
    new
}

//! Reading, writing and seeking a shielded descriptor, below the hooks: the read/write/lseek
//! hooks and the stdio cookies both call these; and filling a placeholder memfd with verified
//! plaintext (dup onto a standard stream, exec, fork).
use crate::files::{self, Body, Handle};
use crate::{fail_isize, log, real, set_errno};
use libc::{c_int, off_t, size_t, ssize_t};
use std::sync::atomic::Ordering;

/// Read at `off` (or the shared offset, advancing it). Buffers are read by the kernel.
pub unsafe fn do_read(fd: c_int, h: &Handle, buf: *mut u8, n: size_t, off: Option<u64>) -> ssize_t {
    let f = h.lock().unwrap_or_else(|e| e.into_inner());
    if f.touched.is_some() {
        drop(f);
        // What this read covers is loaded first (a buffer may hold parts unloaded); a
        // streamable buffer is read under its locks (a stream's piece makes holes).
        let b = files::buffer_of(h);
        let locks = match &b {
            Some(b) => match access_offset(fd, off)
                .and_then(|at| crate::opening::before_read(b, at, n as u64))
            {
                Ok(l) => l,
                Err(e) => return fail_isize(e),
            },
            None => None,
        };
        let r = match off {
            // SAFETY: the program's buffer of n bytes; fd is a description of the buffer.
            Some(o) => unsafe { real::pread(fd, buf.cast(), n, o as off_t) },
            // SAFETY: as above.
            None => unsafe { real::read(fd, buf.cast(), n) },
        };
        drop(locks);
        return r;
    }
    let pos = off.unwrap_or(f.offset);
    if n == 0 {
        return 0;
    }
    drop(f);
    // SAFETY: the program passed a buffer of n writable bytes.
    let out = unsafe { std::slice::from_raw_parts_mut(buf, n) };
    match read_fresh(h, out, pos) {
        Ok(k) => {
            if off.is_none() {
                h.lock().unwrap_or_else(|e| e.into_inner()).offset = pos + k as u64;
            }
            k as ssize_t
        }
        Err(e) => fail_isize(e),
    }
}

/// Read at `pos`; when the file's format-2 state moved on under the reader ([`files::STALE`]:
/// another process of the run updated it in place), reopen it at the run's current state and
/// read once more. What fails then is tampering: `EIO`, and the process is marked.
pub fn read_fresh(h: &Handle, out: &mut [u8], pos: u64) -> Result<usize, libc::c_int> {
    let path = {
        let mut f = h.lock().unwrap_or_else(|e| e.into_inner());
        match f.read_at(out, pos) {
            Err(files::STALE) => f.path.clone(),
            r => return r,
        }
    };
    // Without the description's lock: the shield's lock is never taken under it.
    let fresh = crate::shield::get().reopen_current(&path);
    let mut f = h.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = fresh {
        f.body = Body::Kernel(Box::new(r));
    }
    match f.read_at(out, pos) {
        Err(files::STALE) => Err(stale_is_tampering(&path)),
        r => r,
    }
}

/// A format-2 file that fails verification at the run's current state too.
pub fn stale_is_tampering(path: &fspf_core::EmbedPath) -> libc::c_int {
    let m = format!("{path}: failed verification at the run's current state (file modified, swapped or rolled back)");
    log(format!("read refused: {m}"));
    crate::integrity_failure(&m);
    libc::EIO
}

/// Write through a buffer's description (the kernel keeps offset and O_APPEND).
pub unsafe fn do_write(
    fd: c_int,
    h: &Handle,
    buf: *const u8,
    n: size_t,
    off: Option<u64>,
) -> ssize_t {
    let mut kill_suid = None;
    let mut buffer = None;
    let append;
    let touched = {
        let mut f = h.lock().unwrap_or_else(|e| e.into_inner());
        if !f.write {
            return fail_isize(libc::EBADF);
        }
        // A write by anyone but root drops the set-user-ID bit, and the set-group-ID bit of
        // a group-executable file, as the kernel does (`file_remove_privs`).
        if f.mode & (libc::S_ISUID | libc::S_ISGID) != 0 && crate::perm::euid() != 0 {
            let mut m = f.mode & !libc::S_ISUID;
            if m & 0o010 != 0 {
                m &= !libc::S_ISGID;
            }
            if m != f.mode {
                f.mode = m;
                kill_suid = Some((f.path.clone(), m));
            }
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
            buffer = Some(b.clone());
        }
        append = f.append;
        f.touched.clone()
    };
    let Some(t) = touched else {
        return fail_isize(libc::EBADF);
    };
    if let Some((ep, m)) = kill_suid {
        let sh = crate::shield::get();
        let mut inner = sh.lock();
        if let Err(e) = sh.chmod(&mut inner, &ep, m) {
            return fail_isize(e);
        }
    }
    if off.is_some_and(|o| o.saturating_add(n as u64) > files::MAX_BUFFER_LEN) {
        return fail_isize(libc::EFBIG);
    }
    // A buffer is written under its lock: the offset read back after the write of a tracked
    // one is where this write ended (no other hooked write in between), and no load of an
    // unloaded part runs in between. With unloaded parts, what the write covers only partly
    // is loaded first, and the write lands under the buffer's unloaded lock too, recorded as
    // seen (`opening::before_write`, which takes both in the lock order).
    let (mut g, lazy, streaming) = match &buffer {
        Some(b) => loop {
            match crate::opening::before_write(b, fd, off, n as u64, append) {
                Ok(Some(l)) => break (Some(l.g), Some((l.lock, l.range)), l.inner),
                Ok(None) => {
                    let g = b.lock().unwrap_or_else(|e| e.into_inner());
                    // (Another thread may have made it streamable meanwhile: then its locks.)
                    if !g.streamable {
                        break (Some(g), None, None);
                    }
                }
                Err(e) => return fail_isize(e),
            }
        },
        None => (None, None, None),
    };
    t.store(true, Ordering::Relaxed);
    if let Some(g) = g.as_mut().filter(|g| g.track.is_some()) {
        // Something wrote the buffer unseen since the last tracked change: the record is
        // incomplete from now on (not only until this write's stat).
        if g.tracked().is_none() {
            g.track = None;
        }
    }
    // The whole pages of a partly unloaded buffer that this write fills (counted under the
    // buffer's mutex: no other thread's write lands in between).
    let filled: u64 = match (&lazy, g.as_ref()) {
        (Some((_, r)), Some(g)) => g.holes_in(r.start, r.end).iter().map(|(h, d)| d - h).sum(),
        _ => 0,
    };
    let w = match off {
        // SAFETY: the program's n bytes; fd is a description of the buffer.
        Some(o) => unsafe { real::pwrite(fd, buf.cast(), n, o as off_t) },
        // SAFETY: as above.
        None => unsafe { real::write(fd, buf.cast(), n) },
    };
    if let (Some(_), Some(g)) = (&lazy, g.as_ref()) {
        // (A short write filled an unknown part: counted again.)
        g.record_seen(match w {
            w if w as usize == n => Some(filled),
            w if w <= 0 => Some(0),
            _ => None,
        });
    }
    if let Some(g) = g.as_mut().filter(|g| g.track.is_some()) {
        if w > 0 {
            let at = match off {
                // (Linux's pwrite on an O_APPEND description appends, whatever the offset.)
                Some(o) if !append => Some(o),
                Some(_) => g.stat_now().map(|(end, _)| end.saturating_sub(w as u64)),
                // SAFETY: reading the description's offset, which this write just moved.
                None => match unsafe { real::lseek(fd, 0, libc::SEEK_CUR) } {
                    end if end >= w as i64 => Some(end as u64 - w as u64),
                    _ => None,
                },
            };
            match at {
                Some(at) => g.note_write(at, w as u64),
                None => g.track = None,
            }
        }
    }
    match (streaming, g, lazy, buffer.as_ref()) {
        (Some((inner, r)), Some(g), Some((lock, _)), Some(b)) if w > 0 => {
            // Seal what is buffered past a stream's end, or commit what is buffered past the
            // unloaded part, if enough (`stream.rs`).
            crate::opening::after_write(b, inner, g, lock, r, w as u64);
        }
        (None, Some(mut g), lazy, Some(b)) if w > 0 && (g.mirror || !g.shared) => {
            // A buffer that is not streamable yet: every MiB, is it large now?
            g.stream_unchecked += w as u64;
            if g.stream_unchecked >= crate::stream::CHECK_EVERY {
                g.stream_unchecked = 0;
                drop(lazy);
                drop(g);
                crate::opening::maybe_stream(b);
            }
        }
        _ => {}
    }
    w
}

/// Where an access through the program's description `fd` of a buffer lands: `off`, or the
/// description's offset.
pub fn access_offset(fd: c_int, off: Option<u64>) -> Result<u64, c_int> {
    match off {
        Some(o) => Ok(o),
        // SAFETY: reading the offset of the program's description of the buffer.
        None => match unsafe { real::lseek(fd, 0, libc::SEEK_CUR) } {
            o if o >= 0 => Ok(o as u64),
            _ => Err(crate::errno()),
        },
    }
}

/// Truncate (or extend) the file behind `h` to `len` (`ftruncate`, `truncate`, an allocation
/// past the end). What stays in the block of the new end is loaded first when parts of the
/// buffer are unloaded (`opening::before_truncate`; to 0 nothing stays).
pub fn truncate_handle(h: &Handle, len: u64) -> Result<(), c_int> {
    let (buffer, write) = {
        let f = h.lock().unwrap_or_else(|e| e.into_inner());
        (files::buffer_of_body(&f.body), f.write)
    };
    if let (Some(b), true) = (buffer, write) {
        if let Some((mut g, _lock)) = crate::opening::before_truncate(&b, len)? {
            return files::set_len_locked(&mut g, len);
        }
    }
    h.lock().unwrap_or_else(|e| e.into_inner()).set_len(len)
}

pub fn do_seek(fd: c_int, h: &Handle, off: i64, whence: c_int) -> i64 {
    let mut f = h.lock().unwrap_or_else(|e| e.into_inner());
    if f.touched.is_some() {
        drop(f);
        if matches!(whence, libc::SEEK_DATA | libc::SEEK_HOLE) {
            // The kernel would report unloaded parts as holes.
            if let Err(e) = files::load_unloaded_for(h, false) {
                set_errno(e);
                return -1;
            }
        }
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

/// Fill the read-only placeholder behind `fd` with the verified plaintext of `f`, position it
/// at `f`'s offset and switch `f` to kernel reads. Returns false (placeholder left empty) when
/// the plaintext does not verify.
///
/// Verified readers fill it in 1 MiB blocks, the two halves of a large file on two threads at
/// once (`ProtectedReader::for_each_verified`): filling the memfd's pages costs more than
/// decrypting them (bench/RESULTS.md), and both parallelise. Each block is verified in a private
/// buffer before it is written, so the memfd never holds an unverified byte.
pub fn materialise_placeholder(fd: c_int, f: &mut crate::files::OpenFile) -> bool {
    let size = f.size();
    // SAFETY: emptying our placeholder before refilling it.
    unsafe { real::ftruncate(fd, 0) };
    let short = std::sync::atomic::AtomicBool::new(false);
    let sink = |off: u64, b: &[u8]| {
        // SAFETY: writing a verified block into our placeholder memfd.
        let w = unsafe { real::pwrite(fd, b.as_ptr().cast(), b.len(), off as off_t) };
        if w == b.len() as isize {
            Ok(())
        } else {
            short.store(true, Ordering::Relaxed);
            Err(std::io::Error::other("short write to the placeholder"))
        }
    };
    let filled = match f.for_each_verified(FILL_BLOCK, sink) {
        Some(Ok(())) => true,
        Some(Err(e)) => {
            if !short.load(Ordering::Relaxed) {
                let m = e.to_string();
                log(format!("read refused: {m}"));
                crate::integrity_failure(&m);
            }
            false
        }
        None => fill_written(fd, f, size),
    };
    if !filled {
        // SAFETY: never leave a prefix of a file that failed verification.
        unsafe { real::ftruncate(fd, 0) };
        return false;
    }
    // SAFETY: positioning our placeholder at the shared offset.
    unsafe { real::lseek(fd, f.offset as i64, libc::SEEK_SET) };
    f.touched = Some(std::sync::Arc::new(std::sync::atomic::AtomicBool::new(
        false,
    )));
    true
}

const FILL_BLOCK: usize = 1 << 20;

fn fill_written(fd: c_int, f: &mut crate::files::OpenFile, size: u64) -> bool {
    let mut off = 0u64;
    let mut buf = vec![0u8; FILL_BLOCK];
    while off < size {
        match f.read_at(&mut buf, off) {
            Err(files::STALE) => {
                stale_is_tampering(&f.path);
                return false;
            }
            Ok(0) | Err(_) => return false,
            Ok(k) => {
                // SAFETY: writing our buffer into our placeholder memfd.
                let w = unsafe { real::pwrite(fd, buf.as_ptr().cast(), k, off as i64) };
                if w != k as isize {
                    return false;
                }
                off += k as u64;
            }
        }
    }
    true
}

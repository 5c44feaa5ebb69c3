//! open family, fopen family (FILE* over fopencookie: glibc's stdio bypasses the PLT) and
//! the shielded open itself.
use super::{fail, fail_ptr, ret};
use crate::files::{self, Body, Handle, OpenFile, WriteBuf};
use crate::shield::{self, EphNode, Inner, NodeKind, Route, Shield};
use crate::{enter, enter_always, log, real};
use fspf_core::format::metadata::{FileKind, Protection, RegionKind};
use fspf_core::volume::memory;
use fspf_core::EmbedPath;
use libc::{c_char, c_int, c_void, mode_t, size_t, ssize_t, FILE};
use std::ffi::CStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

static UMASK: AtomicU32 = AtomicU32::new(0o022);

/// The process's umask as the shield tracks it (the `umask` hook keeps it current).
pub fn umask_now() -> u32 {
    UMASK.load(Ordering::Relaxed)
}

#[no_mangle]
pub unsafe extern "C" fn umask(m: mode_t) -> mode_t {
    // SAFETY: the caller's arguments, unchanged, to glibc's own `umask` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    let old = unsafe { real::umask(m) };
    UMASK.store(m & 0o777, Ordering::Relaxed);
    old
}

pub fn init_umask() {
    // SAFETY: umask is always safe; we restore the value immediately (constructor, one thread).
    let m = unsafe { libc::umask(0o022) };
    // SAFETY: as above.
    unsafe { libc::umask(m) };
    UMASK.store(m, Ordering::Relaxed);
}

/// The errno for a core error while opening or reading `ep`. Only data that failed
/// verification marks the process (it then cannot exit 0); a machine error keeps its errno.
fn map_core(ep: &EmbedPath, e: fspf_core::Error) -> c_int {
    use fspf_core::Error as E;
    let m = format!("{ep}: {e}");
    log(&m);
    if e.is_integrity() {
        crate::integrity_failure(&m);
        return libc::EIO;
    }
    match e {
        E::NotListed { .. } => libc::ENOENT,
        E::Io { source, .. } => match source.raw_os_error() {
            Some(n) => n,
            None if source.kind() == std::io::ErrorKind::PermissionDenied => libc::EACCES,
            None => libc::EIO,
        },
        _ => libc::EIO,
    }
}

/// Files opened through stdio up to this size are verified completely at open: a program
/// reading through a FILE* may take a read error for end of file (Python parsing its script)
/// and must not act on a verified prefix of a tampered file.
const VERIFY_AT_OPEN_MAX: u64 = 4 << 20;

/// Verified plaintext of the current version of `ep` (for opening it for writing).
pub(crate) fn load_plain(inner: &Inner, ep: &EmbedPath) -> Result<Vec<u8>, c_int> {
    let vol = inner.vol.as_ref().ok_or(libc::EACCES)?;
    let region = vol.region_for(ep).ok_or(libc::ENOENT)?;
    if region.kind == RegionKind::Ephemeral {
        let Some(EphNode::File { sealed, .. }) = inner.eph.get(ep) else {
            return Err(libc::ENOENT);
        };
        if region.protection == Protection::NotProtected {
            return Ok((*sealed.data).clone());
        }
        let mut r = memory::open_in_memory(vol.options().threads, region, ep, sealed)
            .map_err(|e| map_core(ep, e))?;
        return read_all(ep, r.size(), |b, o| r.read_at(b, o));
    }
    let mut r = vol.open_file(ep).map_err(|e| map_core(ep, e))?;
    read_all(ep, r.size(), |b, o| r.read_at(b, o))
}

fn read_all(
    ep: &EmbedPath,
    size: u64,
    mut f: impl FnMut(&mut [u8], u64) -> fspf_core::Result<usize>,
) -> Result<Vec<u8>, c_int> {
    let mut v = vec![0u8; usize::try_from(size).map_err(|_| libc::EFBIG)?];
    let mut done = 0;
    while done < v.len() {
        let n = f(&mut v[done..], done as u64).map_err(|e| map_core(ep, e))?;
        if n == 0 {
            return Err(libc::EIO);
        }
        done += n;
    }
    Ok(v)
}

/// A live buffer is authoritative while someone writes it or its version is not committed;
/// a clean, committed one may be older than what another process of the run committed since.
fn live_is_current(b: &Arc<Mutex<WriteBuf>>) -> bool {
    let g = b.lock().unwrap_or_else(|e| e.into_inner());
    g.writers > 0 || g.pending || g.touched.load(Ordering::Relaxed)
}

/// Fill a new buffer for `ep` with its current verified plaintext (streamed chunk by chunk).
fn load_buffer(inner: &Inner, ep: &EmbedPath, b: &WriteBuf) -> Result<(), c_int> {
    let vol = inner.vol.as_ref().ok_or(libc::EACCES)?;
    let region = vol.region_for(ep).ok_or(libc::ENOENT)?;
    if region.kind == RegionKind::Ephemeral || region.protection == Protection::NotProtected {
        let data = load_plain(inner, ep)?;
        return b.write_all_at(&data, 0);
    }
    let mut r = vol.open_file(ep).map_err(|e| map_core(ep, e))?;
    let mut chunk = vec![0u8; r.chunk_len() as usize];
    let mut off = 0u64;
    while off < r.size() {
        let n = r.read_at(&mut chunk, off).map_err(|e| map_core(ep, e))?;
        if n == 0 {
            return Err(libc::EIO);
        }
        b.write_all_at(&chunk[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Read-only body for `ep`; `verify` checks every chunk now (small files only).
fn read_body(inner: &Inner, ep: &EmbedPath, verify: bool) -> Result<Body, c_int> {
    if let Some(b) = inner.live.get(ep).filter(|b| live_is_current(b)) {
        return Ok(Body::Buf(b.clone()));
    }
    let vol = inner.vol.as_ref().ok_or(libc::EACCES)?;
    let region = vol.region_for(ep).ok_or(libc::ENOENT)?;
    if region.kind == RegionKind::Ephemeral {
        let Some(EphNode::File { sealed, .. }) = inner.eph.get(ep) else {
            return Err(libc::ENOENT);
        };
        if region.protection == Protection::NotProtected {
            return Ok(Body::Plain(sealed.data.clone()));
        }
        let mut r = memory::open_in_memory(vol.options().threads, region, ep, sealed)
            .map_err(|e| map_core(ep, e))?;
        if verify && r.size() <= VERIFY_AT_OPEN_MAX {
            r.verify_all().map_err(|e| map_core(ep, e))?;
        }
        return Ok(Body::Mem(Box::new(r)));
    }
    let mut r = vol.open_file(ep).map_err(|e| map_core(ep, e))?;
    if verify && r.size() <= VERIFY_AT_OPEN_MAX {
        r.verify_all().map_err(|e| map_core(ep, e))?;
    }
    Ok(Body::Kernel(Box::new(r)))
}

/// A real fd standing in for a shielded file: an empty memfd (never holds protected bytes, so
/// anything bypassing the hooks reads nothing rather than ciphertext or unverified data).
pub fn placeholder(ep: &EmbedPath, cloexec: bool) -> Result<c_int, c_int> {
    let mut name = b"fspf:".to_vec();
    name.extend_from_slice(&ep.file_name()[..ep.file_name().len().min(200)]);
    name.retain(|&c| c != 0);
    name.push(0);
    let flags = if cloexec { libc::MFD_CLOEXEC } else { 0 };
    // SAFETY: `name` is NUL-terminated.
    let fd = unsafe { libc::memfd_create(name.as_ptr().cast(), flags) };
    if fd < 0 {
        Err(crate::errno())
    } else {
        Ok(fd)
    }
}

fn dir_placeholder(
    kernel: Option<&fspf_core::volume::KernelPath>,
    ep: &EmbedPath,
    cloexec: bool,
) -> Result<c_int, c_int> {
    if let Some(k) = kernel {
        use std::os::fd::IntoRawFd;
        let fl = libc::O_RDONLY | libc::O_DIRECTORY;
        // No symlink below the region's directory is followed (a swapped-in link to a victim
        // directory must not become the program's directory fd).
        if let Ok(fd) = fspf_core::volume::kernel_fs::open_beneath(k.base(), k.rel(), fl, 0) {
            let fd = fd.into_raw_fd();
            if !cloexec {
                // SAFETY: clearing FD_CLOEXEC on the fd we just opened.
                unsafe { real::fcntl(fd, libc::F_SETFD, 0) };
            }
            return Ok(fd);
        }
    }
    placeholder(ep, cloexec)
}

/// Open `ep` in the shielded view; returns a real fd registered in the fd table.
pub fn shield_open(sh: &Shield, ep: EmbedPath, flags: c_int, mode: mode_t) -> Result<c_int, c_int> {
    shield_open_depth(sh, ep, flags, mode, 0, false)
}

/// As [`shield_open`], for a stdio stream (small files verified completely at open).
pub fn shield_open_stdio(
    sh: &Shield,
    ep: EmbedPath,
    flags: c_int,
    mode: mode_t,
) -> Result<c_int, c_int> {
    shield_open_depth(sh, ep, flags, mode, 0, true)
}

fn shield_open_depth(
    sh: &Shield,
    ep: EmbedPath,
    flags: c_int,
    mode: mode_t,
    depth: u32,
    stdio: bool,
) -> Result<c_int, c_int> {
    if flags & libc::O_TMPFILE == libc::O_TMPFILE {
        // Unnamed temporary files cannot be listed in the fspf; callers fall back to a name.
        return Err(libc::EOPNOTSUPP);
    }
    let mut inner = sh.lock();
    let acc = flags & libc::O_ACCMODE;
    let wants_write = acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
    let cloexec = flags & libc::O_CLOEXEC != 0;
    if !sh.is_ephemeral(&inner, &ep) {
        sh.refresh(&mut inner)?;
    }
    let found = sh.lookup(&inner, &ep);
    let (body, node_mode, kernel, write) = match found {
        Ok(n) => {
            if flags & libc::O_CREAT != 0 && flags & libc::O_EXCL != 0 {
                return Err(libc::EEXIST);
            }
            match n.kind {
                NodeKind::Dir => {
                    if wants_write {
                        return Err(libc::EISDIR);
                    }
                    let fd = dir_placeholder(n.kernel.as_ref(), &ep, cloexec)?;
                    let f = OpenFile {
                        path: ep,
                        offset: 0,
                        read: true,
                        write: false,
                        append: false,
                        body: Body::Dir,
                        mode: n.mode,
                        kernel: n.kernel,
                        touched: None,
                    };
                    files::insert(fd, Arc::new(Mutex::new(f)));
                    return Ok(fd);
                }
                NodeKind::Symlink(t) => {
                    if flags & libc::O_NOFOLLOW != 0 {
                        return Err(libc::ELOOP);
                    }
                    if depth > crate::shield::MAX_SYMLINKS {
                        return Err(libc::ELOOP);
                    }
                    let target = crate::shield::link_target(&ep, &t);
                    let r = sh.route_bytes(&inner, libc::AT_FDCWD, &target);
                    drop(inner);
                    return match r {
                        Route::Shield(ep2) => {
                            shield_open_depth(sh, ep2, flags, mode, depth + 1, stdio)
                        }
                        Route::Kernel(c, _) => {
                            // SAFETY: NUL-terminated path.
                            let fd = unsafe { real::open(c.as_ptr(), flags, mode) };
                            if fd < 0 {
                                Err(crate::errno())
                            } else {
                                Ok(fd)
                            }
                        }
                        Route::Pass => {
                            let c = std::ffi::CString::new(target).map_err(|_| libc::EINVAL)?;
                            // SAFETY: NUL-terminated path.
                            let fd = unsafe { real::open(c.as_ptr(), flags, mode) };
                            if fd < 0 {
                                Err(crate::errno())
                            } else {
                                Ok(fd)
                            }
                        }
                        Route::Deny(e) => Err(e),
                    };
                }
                NodeKind::File => {}
            }
            if flags & libc::O_DIRECTORY != 0 {
                return Err(libc::ENOTDIR);
            }
            if wants_write {
                sh.check_writable(&inner, &ep)?;
                let buf = match inner.live.get(&ep).filter(|b| live_is_current(b)) {
                    Some(b) => b.clone(),
                    None => {
                        let b =
                            WriteBuf::create(ep.clone(), n.mode, n.mtime.unwrap_or(sh.started))?;
                        let mut b = b;
                        if flags & libc::O_TRUNC == 0 {
                            load_buffer(&inner, &ep, &b)?;
                            // The version it starts from: appends to it can be rebased onto a
                            // version another process of the run commits meanwhile.
                            if let Some(FileKind::File { id, size, .. }) = inner
                                .vol
                                .as_ref()
                                .and_then(|v| v.lookup(&ep))
                                .map(|e| e.into_owned().kind)
                            {
                                b.base = Some((id, size));
                                b.append_only.store(true, Ordering::Relaxed);
                            }
                        }
                        let c = b.contents()?;
                        b.mark_sealed(&c);
                        let b = Arc::new(Mutex::new(b));
                        files::register_own(&b);
                        inner.live.insert(ep.clone(), b.clone());
                        b
                    }
                };
                {
                    let mut g = buf.lock().unwrap_or_else(|e| e.into_inner());
                    if flags & libc::O_TRUNC != 0 {
                        g.set_len(0)?;
                    }
                    g.writers += 1;
                }
                (Body::Buf(buf), n.mode, n.kernel, true)
            } else {
                (read_body(&inner, &ep, stdio)?, n.mode, n.kernel, false)
            }
        }
        Err(libc::ENOENT) if flags & libc::O_CREAT != 0 => {
            let parent = ep.parent().ok_or(libc::EISDIR)?;
            match sh.lookup(&inner, &parent) {
                Ok(p) if matches!(p.kind, NodeKind::Dir) => {}
                Ok(_) => return Err(libc::ENOTDIR),
                Err(e) => return Err(e),
            }
            sh.check_writable(&inner, &ep)?;
            let m = mode & 0o7777 & !UMASK.load(Ordering::Relaxed);
            let mut b = WriteBuf::create(ep.clone(), m, crate::shield::now())?;
            // A new file exists (empty) once it is closed, even if nothing was written.
            b.touched.store(true, Ordering::Relaxed);
            b.writers = 1;
            let b = Arc::new(Mutex::new(b));
            files::register_own(&b);
            inner.live.insert(ep.clone(), b.clone());
            (Body::Buf(b), m, None, true)
        }
        Err(e) => return Err(e),
    };
    drop(inner);
    // Buffers: the program's fd is a description of the buffer's memfd. Everything else: an
    // empty memfd placeholder.
    let (fd, touched) = match &body {
        Body::Buf(b) => {
            let g = b.lock().unwrap_or_else(|e| e.into_inner());
            let access = if write { acc } else { libc::O_RDONLY };
            let fl = access | (flags & (libc::O_APPEND | libc::O_CLOEXEC));
            (g.reopen(fl), Some(g.touched.clone()))
        }
        _ => (placeholder(&ep, cloexec), None),
    };
    let fd = match fd {
        Ok(fd) => fd,
        Err(e) => {
            if let Body::Buf(b) = &body {
                if write {
                    b.lock().unwrap_or_else(|e| e.into_inner()).writers -= 1;
                }
            }
            return Err(e);
        }
    };
    let f = OpenFile {
        path: ep,
        offset: 0,
        read: acc != libc::O_WRONLY,
        write,
        append: flags & libc::O_APPEND != 0,
        body,
        mode: node_mode,
        kernel,
        touched,
    };
    files::insert(fd, Arc::new(Mutex::new(f)));
    Ok(fd)
}

/// Drop one fd's reference to its open file description; seal when the last writer goes.
/// An error (the new version could not be sealed) is what `close` reports.
pub fn release(h: Handle) -> Result<(), c_int> {
    if Arc::strong_count(&h) != 1 {
        return Ok(());
    }
    let buf = {
        let f = h.lock().unwrap_or_else(|e| e.into_inner());
        match (&f.body, f.write) {
            (Body::Buf(b), true) => Some(b.clone()),
            _ => None,
        }
    };
    // Drop the description first: its reference to the buffer must not count as a holder.
    drop(h);
    if let Some(b) = buf {
        let last = {
            let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
            g.writers = g.writers.saturating_sub(1);
            g.writers == 0
        };
        if last {
            return shield::get().last_writer_closed(&b);
        }
    }
    Ok(())
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

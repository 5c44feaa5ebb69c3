//! Directory streams: listings of protected regions come from the fspf (plus this process's
//! uncommitted changes), ephemeral ones from memory; unlisted kernel files are never shown.
use super::fail_ptr;
use super::open::{release, shield_open};
use crate::files::{self, Body};
use crate::shield::{self, Route};
use crate::{enter, real};
use fspf_core::EmbedPath;
use libc::{c_char, c_int, c_long};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

struct DirStream {
    fd: c_int,
    path: EmbedPath,
    entries: Vec<(Vec<u8>, u8)>,
    pos: usize,
    ent: libc::dirent64,
}

static STREAMS: Mutex<BTreeMap<usize, Box<DirStream>>> = Mutex::new(BTreeMap::new());
static N_STREAMS: AtomicUsize = AtomicUsize::new(0);

fn streams() -> std::sync::MutexGuard<'static, BTreeMap<usize, Box<DirStream>>> {
    STREAMS.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_ours(d: *mut libc::DIR) -> bool {
    N_STREAMS.load(Ordering::Relaxed) > 0 && streams().contains_key(&(d as usize))
}

fn make_stream(fd: c_int, path: EmbedPath) -> *mut libc::DIR {
    let sh = shield::get();
    let mut entries = vec![
        (b".".to_vec(), libc::DT_DIR),
        (b"..".to_vec(), libc::DT_DIR),
    ];
    {
        let inner = sh.lock();
        entries.extend(sh.children(&inner, &path));
    }
    let s = Box::new(DirStream {
        fd,
        path,
        entries,
        pos: 0,
        // SAFETY: dirent64 is plain old data.
        ent: unsafe { std::mem::zeroed() },
    });
    let p = &*s as *const DirStream as usize;
    streams().insert(p, s);
    N_STREAMS.fetch_add(1, Ordering::Relaxed);
    p as *mut libc::DIR
}

#[no_mangle]
pub unsafe extern "C" fn opendir(p: *const c_char) -> *mut libc::DIR {
    let Some(g) = enter() else {
        // SAFETY: forwarding.
        return unsafe { real::opendir(p) };
    };
    let sh = shield::get();
    match sh.route(libc::AT_FDCWD, p) {
        Route::Pass => {
            drop(g);
            // SAFETY: forwarding.
            unsafe { real::opendir(p) }
        }
        Route::Kernel(k, ep) => {
            // SAFETY: translated NUL-terminated path.
            let d = unsafe { real::opendir(k.as_ptr()) };
            if !d.is_null() {
                // SAFETY: d is a valid DIR*.
                files::track_translated(unsafe { real::dirfd(d) }, ep);
            }
            d
        }
        Route::Deny(e) => fail_ptr(e),
        Route::Shield(ep) => {
            match shield_open(
                sh,
                ep.clone(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
                0,
            ) {
                Ok(fd) => make_stream(fd, ep),
                Err(e) => fail_ptr(e),
            }
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn fdopendir(fd: c_int) -> *mut libc::DIR {
    if let Some(_g) = enter() {
        if let Some(h) = files::get(fd) {
            let (is_dir, path) = {
                let f = h.lock().unwrap_or_else(|e| e.into_inner());
                (matches!(f.body, Body::Dir), f.path.clone())
            };
            if !is_dir {
                return fail_ptr(libc::ENOTDIR);
            }
            return make_stream(fd, path);
        }
    }
    // SAFETY: forwarding.
    unsafe { real::fdopendir(fd) }
}

unsafe fn next(d: *mut libc::DIR) -> *mut libc::dirent64 {
    let mut m = streams();
    let Some(s) = m.get_mut(&(d as usize)) else {
        return std::ptr::null_mut();
    };
    let Some((name, ty)) = s.entries.get(s.pos).cloned() else {
        return std::ptr::null_mut();
    };
    s.pos += 1;
    let ino = match name.as_slice() {
        b"." => files::ino_of(&s.path),
        b".." => files::ino_of(&s.path.parent().unwrap_or_else(EmbedPath::root)),
        n => s.path.join(n).map(|p| files::ino_of(&p)).unwrap_or(1),
    };
    s.ent.d_ino = ino;
    s.ent.d_off = s.pos as i64;
    s.ent.d_reclen = std::mem::size_of::<libc::dirent64>() as u16;
    s.ent.d_type = ty;
    let k = name.len().min(255);
    for (i, b) in name[..k].iter().enumerate() {
        s.ent.d_name[i] = *b as c_char;
    }
    s.ent.d_name[k] = 0;
    &mut s.ent
}

#[no_mangle]
pub unsafe extern "C" fn readdir(d: *mut libc::DIR) -> *mut libc::dirent64 {
    if let Some(_g) = enter() {
        if is_ours(d) {
            // SAFETY: d is one of our streams.
            return unsafe { next(d) };
        }
    }
    // SAFETY: forwarding.
    unsafe { real::readdir(d) }
}
#[no_mangle]
pub unsafe extern "C" fn readdir64(d: *mut libc::DIR) -> *mut libc::dirent64 {
    if let Some(_g) = enter() {
        if is_ours(d) {
            // SAFETY: d is one of our streams.
            return unsafe { next(d) };
        }
    }
    // SAFETY: forwarding.
    unsafe { real::readdir64(d) }
}

#[no_mangle]
pub unsafe extern "C" fn closedir(d: *mut libc::DIR) -> c_int {
    if let Some(_g) = enter() {
        if is_ours(d) {
            let s = streams().remove(&(d as usize));
            N_STREAMS.fetch_sub(1, Ordering::Relaxed);
            if let Some(s) = s {
                if let Some(h) = files::remove(s.fd) {
                    let _ = release(h);
                }
                // SAFETY: the stream owned this placeholder fd.
                unsafe { real::close(s.fd) };
            }
            return 0;
        }
        if N_STREAMS.load(Ordering::Relaxed) == 0 || !is_ours(d) {
            // SAFETY: d is a glibc DIR*.
            let fd = unsafe { real::dirfd(d) };
            files::forget_translated(fd);
        }
    }
    // SAFETY: forwarding.
    unsafe { real::closedir(d) }
}

#[no_mangle]
pub unsafe extern "C" fn dirfd(d: *mut libc::DIR) -> c_int {
    if let Some(_g) = enter() {
        if let Some(s) = streams().get(&(d as usize)) {
            return s.fd;
        }
    }
    // SAFETY: forwarding.
    unsafe { real::dirfd(d) }
}

#[no_mangle]
pub unsafe extern "C" fn rewinddir(d: *mut libc::DIR) {
    if let Some(_g) = enter() {
        if let Some(s) = streams().get_mut(&(d as usize)) {
            s.pos = 0;
            return;
        }
    }
    // SAFETY: forwarding.
    unsafe { real::rewinddir(d) };
}

#[no_mangle]
pub unsafe extern "C" fn telldir(d: *mut libc::DIR) -> c_long {
    if let Some(_g) = enter() {
        if let Some(s) = streams().get(&(d as usize)) {
            return s.pos as c_long;
        }
    }
    // SAFETY: forwarding.
    unsafe { real::telldir(d) }
}

#[no_mangle]
pub unsafe extern "C" fn seekdir(d: *mut libc::DIR, pos: c_long) {
    if let Some(_g) = enter() {
        if let Some(s) = streams().get_mut(&(d as usize)) {
            s.pos = pos.max(0) as usize;
            return;
        }
    }
    // SAFETY: forwarding.
    unsafe { real::seekdir(d, pos) };
}

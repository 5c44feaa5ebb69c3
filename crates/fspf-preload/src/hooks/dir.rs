//! Directory streams: listings of protected regions come from the fspf (plus this process's
//! uncommitted changes), ephemeral ones from memory; unlisted kernel files are never shown.
use super::fail_ptr;
use crate::dirstream::{streams, DirStream, N_STREAMS};
use crate::files::{self, Body};
use crate::opening::{release, shield_open};
use crate::shield::{self, Route};
use crate::{enter, real};
use fspf_core::EmbedPath;
use libc::{c_char, c_int, c_long};
use std::sync::atomic::Ordering;

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
        // SAFETY: the caller's arguments, unchanged, to glibc's own `opendir` (resolved
        // with RTLD_NEXT): the caller's contract for this call is that function's contract.
        return unsafe { real::opendir(p) };
    };
    let sh = shield::get();
    match sh.route(libc::AT_FDCWD, p) {
        Route::Pass => {
            drop(g);
            // SAFETY: the caller's arguments, unchanged, to glibc's own `opendir` (resolved
            // with RTLD_NEXT): the caller's contract for this call is that function's contract.
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
                Ok(fd) => {
                    // List what the fd names: a symlink to a directory was followed.
                    let path = files::get(fd)
                        .map(|h| h.lock().unwrap_or_else(|e| e.into_inner()).path.clone())
                        .unwrap_or(ep);
                    make_stream(fd, path)
                }
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
    // SAFETY: the caller's arguments, unchanged, to glibc's own `fdopendir` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
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
    // SAFETY: the caller's arguments, unchanged, to glibc's own `readdir` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
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
    // SAFETY: the caller's arguments, unchanged, to glibc's own `readdir64` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
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
    // SAFETY: the caller's arguments, unchanged, to glibc's own `closedir` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::closedir(d) }
}

#[no_mangle]
pub unsafe extern "C" fn dirfd(d: *mut libc::DIR) -> c_int {
    if let Some(_g) = enter() {
        if let Some(s) = streams().get(&(d as usize)) {
            return s.fd;
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `dirfd` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
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
    // SAFETY: the caller's arguments, unchanged, to glibc's own `rewinddir` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::rewinddir(d) };
}

#[no_mangle]
pub unsafe extern "C" fn telldir(d: *mut libc::DIR) -> c_long {
    if let Some(_g) = enter() {
        if let Some(s) = streams().get(&(d as usize)) {
            return s.pos as c_long;
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `telldir` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
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
    // SAFETY: the caller's arguments, unchanged, to glibc's own `seekdir` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::seekdir(d, pos) };
}

type DirFilter = Option<unsafe extern "C" fn(*const libc::dirent64) -> c_int>;
type DirCompar =
    Option<unsafe extern "C" fn(*mut *const libc::dirent64, *mut *const libc::dirent64) -> c_int>;

/// scandir: glibc's uses internal opendir/readdir, so shielded directories are listed here.
unsafe fn scandir_common(
    p: *const c_char,
    list: *mut *mut *mut libc::dirent64,
    filter: DirFilter,
    compar: DirCompar,
    real_call: impl Fn(*const c_char) -> c_int,
) -> c_int {
    let Some(g) = enter() else {
        return real_call(p);
    };
    let sh = shield::get();
    let ep = match sh.route(libc::AT_FDCWD, p) {
        Route::Pass => {
            drop(g);
            return real_call(p);
        }
        Route::Kernel(k, _) => return real_call(k.as_ptr()),
        Route::Deny(e) => return super::fail(e),
        Route::Shield(ep) => ep,
    };
    let fd = match shield_open(
        sh,
        ep.clone(),
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        0,
    ) {
        Ok(fd) => fd,
        Err(e) => return super::fail(e),
    };
    let d = make_stream(fd, ep);
    // The filter and comparator are the program's code: run them outside the shield.
    drop(g);
    let mut out: Vec<*mut libc::dirent64> = Vec::new();
    loop {
        // SAFETY: d is our stream.
        let e = unsafe { next(d) };
        if e.is_null() {
            break;
        }
        let size = std::mem::size_of::<libc::dirent64>();
        // SAFETY: malloc'd copies are handed to the caller, who frees them (scandir contract).
        let copy = unsafe { libc::malloc(size) }.cast::<libc::dirent64>();
        if copy.is_null() {
            break;
        }
        // SAFETY: both point at a dirent64.
        unsafe { std::ptr::copy_nonoverlapping(e, copy, 1) };
        let keep = match filter {
            Some(f) => {
                // SAFETY: calling the program's filter on our entry.
                unsafe { f(copy) != 0 }
            }
            None => true,
        };
        if keep {
            out.push(copy);
        } else {
            // SAFETY: freeing our own copy.
            unsafe { libc::free(copy.cast()) };
        }
    }
    // SAFETY: d is our stream; closedir releases its fd.
    unsafe { closedir(d) };
    let n = out.len();
    let bytes = std::mem::size_of::<*mut libc::dirent64>() * n.max(1);
    // SAFETY: malloc'd array handed to the caller (scandir contract).
    let arr = unsafe { libc::malloc(bytes) }.cast::<*mut libc::dirent64>();
    if arr.is_null() {
        return super::fail(libc::ENOMEM);
    }
    // SAFETY: arr has room for n pointers.
    unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), arr, n) };
    if let Some(c) = compar {
        // SAFETY: qsort over n pointers with the program's comparator, whose arguments are
        // pointers to the elements (const struct dirent **), as scandir specifies.
        unsafe {
            libc::qsort(
                arr.cast(),
                n,
                std::mem::size_of::<*mut libc::dirent64>(),
                Some(std::mem::transmute::<
                    unsafe extern "C" fn(
                        *mut *const libc::dirent64,
                        *mut *const libc::dirent64,
                    ) -> c_int,
                    unsafe extern "C" fn(*const libc::c_void, *const libc::c_void) -> c_int,
                >(c)),
            )
        };
    }
    // SAFETY: list is the program's out-pointer.
    unsafe { *list = arr };
    n as c_int
}

#[no_mangle]
pub unsafe extern "C" fn scandir(
    p: *const c_char,
    list: *mut *mut *mut libc::dirent64,
    f: DirFilter,
    c: DirCompar,
) -> c_int {
    // SAFETY: `scandir_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { scandir_common(p, list, f, c, |p| real::scandir(p, list, f, c)) }
}
#[no_mangle]
pub unsafe extern "C" fn scandir64(
    p: *const c_char,
    list: *mut *mut *mut libc::dirent64,
    f: DirFilter,
    c: DirCompar,
) -> c_int {
    // SAFETY: `scandir_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { scandir_common(p, list, f, c, |p| real::scandir64(p, list, f, c)) }
}

/// glibc's `glob_t` (x86_64): the GLOB_ALTDIRFUNC callbacks follow the public fields.
#[repr(C)]
struct GlobT {
    pathc: usize,
    pathv: *mut *mut c_char,
    offs: usize,
    flags: c_int,
    closedir: *mut libc::c_void,
    readdir: *mut libc::c_void,
    opendir: *mut libc::c_void,
    lstat: *mut libc::c_void,
    stat: *mut libc::c_void,
}

/// glob: glibc's walks directories with internal calls; GLOB_ALTDIRFUNC routes them through
/// the shield's hooks (which pass unprotected paths through unchanged).
unsafe fn glob_common(
    pat: *const c_char,
    flags: c_int,
    errf: *mut libc::c_void,
    g: *mut libc::c_void,
    real_call: impl Fn(c_int) -> c_int,
) -> c_int {
    let _ = (pat, errf);
    if enter().is_none() || g.is_null() || flags & libc::GLOB_ALTDIRFUNC != 0 {
        return real_call(flags);
    }
    let g = g.cast::<GlobT>();
    // SAFETY: g is the program's glob_t; we fill the callback fields GLOB_ALTDIRFUNC reads.
    unsafe {
        (*g).closedir = closedir as *mut libc::c_void;
        (*g).readdir = readdir64 as *mut libc::c_void;
        (*g).opendir = opendir as *mut libc::c_void;
        (*g).lstat = super::stat::lstat as *mut libc::c_void;
        (*g).stat = super::stat::stat as *mut libc::c_void;
    }
    real_call(flags | libc::GLOB_ALTDIRFUNC)
}

#[no_mangle]
pub unsafe extern "C" fn glob(
    p: *const c_char,
    f: c_int,
    e: *mut libc::c_void,
    g: *mut libc::c_void,
) -> c_int {
    // SAFETY: `glob_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { glob_common(p, f, e, g, |f| real::glob(p, f, e, g)) }
}
#[no_mangle]
pub unsafe extern "C" fn glob64(
    p: *const c_char,
    f: c_int,
    e: *mut libc::c_void,
    g: *mut libc::c_void,
) -> c_int {
    // SAFETY: `glob_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { glob_common(p, f, e, g, |f| real::glob64(p, f, e, g)) }
}

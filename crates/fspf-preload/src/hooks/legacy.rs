//! Older and fortified entry points that glibc implements with internal calls to the modern
//! ones (which bypass the hooks): `utime`, `utimes`, `lutimes`, `futimesat`, `lchmod`,
//! `__readlink_chk`, `__readlinkat_chk`, `pathconf`, `scandirat`, `execveat`. Each is expressed
//! through the hook it stands for, so it means the same in a protected region; the rest pass
//! through unchanged (docs/SHIELD.md, "Path-taking libc functions").
use super::{by_route, fail};
use crate::{enter, files, real};
use libc::{c_char, c_int, c_long, size_t, ssize_t};

/// `timeval[2]` → `timespec[2]` (NULL stays NULL: "now").
///
/// # Safety
/// `tv` is NULL or points at two `timeval`s.
unsafe fn timespecs(tv: *const libc::timeval) -> Option<[libc::timespec; 2]> {
    if tv.is_null() {
        return None;
    }
    // SAFETY: the caller's two timevals.
    let (a, m) = unsafe { (*tv, *tv.add(1)) };
    let ts = |t: libc::timeval| libc::timespec {
        tv_sec: t.tv_sec,
        tv_nsec: t.tv_usec * 1000,
    };
    Some([ts(a), ts(m)])
}

/// # Safety
/// The program's arguments.
unsafe fn utimes_common(
    d: c_int,
    p: *const c_char,
    tv: *const libc::timeval,
    flags: c_int,
) -> c_int {
    // SAFETY: the program's times.
    let ts = unsafe { timespecs(tv) };
    let tp = ts.as_ref().map_or(std::ptr::null(), |t| t.as_ptr());
    // SAFETY: our utimensat hook with the converted times.
    unsafe { super::stat::utimensat(d, p, tp, flags) }
}

#[no_mangle]
pub unsafe extern "C" fn utimes(p: *const c_char, tv: *const libc::timeval) -> c_int {
    // SAFETY: the program's arguments.
    unsafe { utimes_common(libc::AT_FDCWD, p, tv, 0) }
}
#[no_mangle]
pub unsafe extern "C" fn lutimes(p: *const c_char, tv: *const libc::timeval) -> c_int {
    // SAFETY: the program's arguments.
    unsafe { utimes_common(libc::AT_FDCWD, p, tv, libc::AT_SYMLINK_NOFOLLOW) }
}
#[no_mangle]
pub unsafe extern "C" fn futimesat(d: c_int, p: *const c_char, tv: *const libc::timeval) -> c_int {
    if p.is_null() {
        // SAFETY: the program's times; futimesat(fd, NULL, ...) changes the fd.
        let ts = unsafe { timespecs(tv) };
        let tp = ts.as_ref().map_or(std::ptr::null(), |t| t.as_ptr());
        // SAFETY: our futimens hook.
        return unsafe { super::stat::futimens(d, tp) };
    }
    // SAFETY: the program's arguments.
    unsafe { utimes_common(d, p, tv, 0) }
}
#[no_mangle]
pub unsafe extern "C" fn utime(p: *const c_char, t: *const libc::utimbuf) -> c_int {
    let ts = if t.is_null() {
        None
    } else {
        // SAFETY: the program's utimbuf.
        let u = unsafe { *t };
        Some([
            libc::timespec {
                tv_sec: u.actime,
                tv_nsec: 0,
            },
            libc::timespec {
                tv_sec: u.modtime,
                tv_nsec: 0,
            },
        ])
    };
    let tp = ts.as_ref().map_or(std::ptr::null(), |t| t.as_ptr());
    // SAFETY: our utimensat hook.
    unsafe { super::stat::utimensat(libc::AT_FDCWD, p, tp, 0) }
}

#[no_mangle]
pub unsafe extern "C" fn lchmod(p: *const c_char, m: libc::mode_t) -> c_int {
    // SAFETY: our fchmodat hook (a symlink refuses, as on Linux).
    unsafe { super::stat::fchmodat(libc::AT_FDCWD, p, m, libc::AT_SYMLINK_NOFOLLOW) }
}

#[no_mangle]
pub unsafe extern "C" fn __readlink_chk(
    p: *const c_char,
    b: *mut c_char,
    n: size_t,
    bl: size_t,
) -> ssize_t {
    if n > bl {
        // SAFETY: fortify contract: abort on overflow like glibc.
        unsafe { libc::abort() };
    }
    // SAFETY: our readlink hook.
    unsafe { super::stat::readlink(p, b, n) }
}
#[no_mangle]
pub unsafe extern "C" fn __readlinkat_chk(
    d: c_int,
    p: *const c_char,
    b: *mut c_char,
    n: size_t,
    bl: size_t,
) -> ssize_t {
    if n > bl {
        // SAFETY: as above.
        unsafe { libc::abort() };
    }
    // SAFETY: our readlinkat hook.
    unsafe { super::stat::readlinkat(d, p, b, n) }
}

/// `pathconf` of a shielded path: the limits of the file system holding its kernel directory
/// do not describe the shield; answer the Linux defaults every local file system has.
#[no_mangle]
pub unsafe extern "C" fn pathconf(p: *const c_char, name: c_int) -> c_long {
    let shielded = |_: &'static crate::shield::Shield, _: fspf_core::EmbedPath| -> c_int {
        match name {
            libc::_PC_NAME_MAX => 255,
            libc::_PC_PATH_MAX => 4096,
            libc::_PC_LINK_MAX => 1,
            libc::_PC_PIPE_BUF => 4096,
            libc::_PC_NO_TRUNC | libc::_PC_CHOWN_RESTRICTED => 1,
            _ => -1,
        }
    };
    // SAFETY: the program's path.
    unsafe {
        by_route(
            libc::AT_FDCWD,
            p,
            |_, pp| real::pathconf(pp, name) as c_int,
            shielded,
        ) as c_long
    }
}

/// `execveat` of a shielded program is refused (`EACCES`): a verified copy is run only by
/// `execve` and friends; an `execveat` of an fd or path of a protected region would run the
/// bytes on disk. Everything else passes through.
#[no_mangle]
pub unsafe extern "C" fn execveat(
    d: c_int,
    p: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    flags: c_int,
) -> c_int {
    if let Some(_g) = enter() {
        if files::is_shielded(d)
            && (p.is_null() || {
                // SAFETY: the program's NUL-terminated path (non-null checked).
                unsafe { *p == 0 }
            })
        {
            return fail(libc::EACCES);
        }
        let sh = crate::shield::get();
        if matches!(sh.route(d, p), crate::shield::Route::Shield(_)) {
            crate::log("execveat of a protected program refused (use execve)");
            return fail(libc::EACCES);
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `execveat` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::execveat(d, p, argv, envp, flags) }
}

/// `scandirat` in a shielded directory is served like `scandir` of the same path.
#[no_mangle]
pub unsafe extern "C" fn scandirat(
    d: c_int,
    p: *const c_char,
    list: *mut *mut *mut libc::dirent64,
    f: crate::real::DirFilter,
    c: crate::real::DirCompar,
) -> c_int {
    if let Some(_g) = enter() {
        let sh = crate::shield::get();
        if let crate::shield::Route::Shield(ep) = sh.route(d, p) {
            drop(_g);
            let Ok(abs) = std::ffi::CString::new(ep.as_bytes().to_vec()) else {
                return fail(libc::EINVAL);
            };
            // SAFETY: our scandir hook on the absolute embed path.
            return unsafe { super::dir::scandir(abs.as_ptr(), list, f, c) };
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `scandirat` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::scandirat(d, p, list, f, c) }
}

#[no_mangle]
pub unsafe extern "C" fn scandirat64(
    d: c_int,
    p: *const c_char,
    list: *mut *mut *mut libc::dirent64,
    f: crate::real::DirFilter,
    c: crate::real::DirCompar,
) -> c_int {
    // SAFETY: same contract as scandirat (dirent64 is dirent on x86_64).
    unsafe { scandirat(d, p, list, f, c) }
}

/// Fortified `realpath` (`_FORTIFY_SOURCE`): glibc's calls `realpath` internally.
#[no_mangle]
pub unsafe extern "C" fn __realpath_chk(
    p: *const c_char,
    r: *mut c_char,
    rl: size_t,
) -> *mut c_char {
    if !r.is_null() && rl < libc::PATH_MAX as size_t {
        // SAFETY: fortify contract: the buffer must hold PATH_MAX bytes.
        unsafe { libc::abort() };
    }
    // SAFETY: our realpath hook.
    unsafe { super::stat::realpath(p, r) }
}

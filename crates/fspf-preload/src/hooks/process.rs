//! Process hooks: commit before fork/exec/spawn so children see this process's changes, hand
//! the trust anchor and key fd to exec'd children, and give exec'd programs the plaintext of
//! shielded fds they inherit (redirections such as `cmd < /data/file`).
use super::fail;
use crate::files::{self, Body};
use crate::shield::{self, Route};
use crate::{enter, enter_always, log, real};
use libc::{c_char, c_int, c_void, pid_t, FILE};
use std::ffi::{CStr, CString};

/// Commit everything queued (children must see it), logging failures.
fn commit_for_child() {
    let sh = shield::get();
    let mut inner = sh.lock();
    if let Err(e) = sh.commit(&mut inner) {
        log(format!("commit before fork/exec failed (errno {e})"));
    }
}

/// Fill the placeholder memfd of every inherited (non-CLOEXEC) shielded fd with its verified
/// plaintext and offset, so a program exec'd without the shield's table still reads the right
/// bytes. Writes the child makes through such an fd are not captured (docs/SHIELD.md).
fn materialise_inherited() {
    for fd in files::all_fds() {
        // SAFETY: querying fd flags.
        let fl = unsafe { real::fcntl(fd, libc::F_GETFD, 0) };
        if fl < 0 || fl & libc::FD_CLOEXEC != 0 {
            continue;
        }
        let Some(h) = files::get(fd) else { continue };
        let mut f = h.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(f.body, Body::Dir) || !f.read {
            continue;
        }
        let size = f.size();
        let mut off = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        let mut ok = true;
        while off < size {
            match f.read_at(&mut buf, off) {
                Ok(0) => break,
                Ok(k) => {
                    // SAFETY: writing our buffer into our placeholder memfd.
                    let w = unsafe { real::pwrite(fd, buf.as_ptr().cast(), k, off as i64) };
                    if w != k as isize {
                        ok = false;
                        break;
                    }
                    off += k as u64;
                }
                Err(_) => {
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            // SAFETY: positioning our placeholder at the shared offset.
            unsafe { real::lseek(fd, f.offset as i64, libc::SEEK_SET) };
        } else {
            // Never hand a child a prefix of a file that failed verification.
            // SAFETY: truncating our placeholder.
            unsafe { real::ftruncate(fd, 0) };
        }
    }
}

/// The environment for an exec'd child: `envp` plus the anchor and key fds (only when the
/// child is shielded, i.e. `SCONE_FSPF` is in `envp`). Clears CLOEXEC on the key fd.
unsafe fn child_env(envp: *const *const c_char) -> (Vec<CString>, Vec<*const c_char>) {
    let sh = shield::get();
    let mut out: Vec<CString> = Vec::new();
    let mut shielded = false;
    if !envp.is_null() {
        let mut i = 0;
        loop {
            // SAFETY: envp is a NULL-terminated array of C strings.
            let p = unsafe { *envp.add(i) };
            if p.is_null() {
                break;
            }
            // SAFETY: each entry is NUL-terminated.
            let s = unsafe { CStr::from_ptr(p) };
            let b = s.to_bytes();
            if b.starts_with(b"SCONE_FSPF=") {
                shielded = true;
            }
            if !b.starts_with(b"FSPF_KEY_FD=") && !b.starts_with(b"FSPF_ANCHOR_FD=") {
                out.push(s.to_owned());
            }
            i += 1;
        }
    }
    if shielded {
        if sh.anchor_fd >= 0 {
            out.extend(CString::new(format!("FSPF_ANCHOR_FD={}", sh.anchor_fd)));
        }
        if sh.key_fd >= 0 {
            // SAFETY: clearing CLOEXEC on our key fd for the child.
            unsafe { real::fcntl(sh.key_fd, libc::F_SETFD, 0) };
            out.extend(CString::new(format!("FSPF_KEY_FD={}", sh.key_fd)));
        }
    }
    let mut ptrs: Vec<*const c_char> = out.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    (out, ptrs)
}

fn restore_key_cloexec() {
    let sh = shield::get();
    if sh.key_fd >= 0 {
        // SAFETY: setting CLOEXEC on our key fd.
        unsafe { real::fcntl(sh.key_fd, libc::F_SETFD, libc::FD_CLOEXEC as libc::c_ulong) };
    }
}

extern "C" {
    static environ: *const *const c_char;
}

fn current_env() -> *const *const c_char {
    // SAFETY: reading the process's environ pointer.
    unsafe { environ }
}

#[no_mangle]
pub unsafe extern "C" fn fork() -> pid_t {
    let Some(_g) = enter() else {
        // SAFETY: forwarding.
        return unsafe { real::fork() };
    };
    commit_for_child();
    let sh = shield::get();
    // Hold the shield's locks across fork so the child never inherits them mid-update.
    let inner = sh.lock();
    let table = files::table_write();
    // SAFETY: plain fork.
    let pid = unsafe { real::fork() };
    drop(table);
    drop(inner);
    pid
}

/// vfork is served by fork: a vfork child would run shield code (commit, env set-up) on the
/// parent's memory and stack.
#[no_mangle]
pub unsafe extern "C" fn vfork() -> pid_t {
    // SAFETY: as fork.
    unsafe { fork() }
}

/// Exec of a file inside a protected region is refused: the kernel would run the unverified
/// (or encrypted) bytes. Run interpreters on protected scripts instead.
fn exec_route(path: *const c_char) -> Result<Option<CString>, c_int> {
    match shield::get().route(libc::AT_FDCWD, path) {
        Route::Pass => Ok(None),
        Route::Kernel(k, _) => Ok(Some(k)),
        Route::Deny(e) => Err(e),
        Route::Shield(ep) => {
            log(format!(
                "{ep}: executing a file of a protected region is not supported"
            ));
            Err(libc::EACCES)
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn execve(
    p: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    let Some(_g) = enter() else {
        // SAFETY: forwarding.
        return unsafe { real::execve(p, argv, envp) };
    };
    let path = match exec_route(p) {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    commit_for_child();
    materialise_inherited();
    // SAFETY: envp from the program.
    let (_keep, env) = unsafe { child_env(envp) };
    let pp = path.as_ref().map_or(p, |c| c.as_ptr());
    // SAFETY: forwarding with our environment copy.
    let r = unsafe { real::execve(pp, argv, env.as_ptr()) };
    restore_key_cloexec();
    r
}
#[no_mangle]
pub unsafe extern "C" fn execv(p: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: forwarding.
    unsafe { execve(p, argv, current_env()) }
}
#[no_mangle]
pub unsafe extern "C" fn execvpe(
    p: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    let Some(_g) = enter() else {
        // SAFETY: forwarding.
        return unsafe { real::execvpe(p, argv, envp) };
    };
    // SAFETY: p is the program's NUL-terminated file name.
    let has_slash = !p.is_null() && unsafe { CStr::from_ptr(p) }.to_bytes().contains(&b'/');
    let path = if has_slash {
        match exec_route(p) {
            Ok(k) => k,
            Err(e) => return fail(e),
        }
    } else {
        None
    };
    commit_for_child();
    materialise_inherited();
    // SAFETY: envp from the program.
    let (_keep, env) = unsafe { child_env(envp) };
    let pp = path.as_ref().map_or(p, |c| c.as_ptr());
    // SAFETY: forwarding with our environment copy.
    let r = unsafe { real::execvpe(pp, argv, env.as_ptr()) };
    restore_key_cloexec();
    r
}
#[no_mangle]
pub unsafe extern "C" fn execvp(p: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: forwarding.
    unsafe { execvpe(p, argv, current_env()) }
}

unsafe fn spawn_common(
    envp: *const *mut c_char,
    call: impl Fn(*const *mut c_char) -> c_int,
) -> c_int {
    let Some(_g) = enter() else {
        return call(envp);
    };
    commit_for_child();
    materialise_inherited();
    let e = if envp.is_null() {
        current_env()
    } else {
        envp.cast()
    };
    // SAFETY: envp from the program.
    let (_keep, env) = unsafe { child_env(e) };
    let r = call(env.as_ptr().cast());
    restore_key_cloexec();
    r
}

#[no_mangle]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut pid_t,
    p: *const c_char,
    fa: *const c_void,
    at: *const c_void,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    // SAFETY: forwarding.
    unsafe { spawn_common(envp, |e| real::posix_spawn(pid, p, fa, at, argv, e)) }
}
#[no_mangle]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut pid_t,
    p: *const c_char,
    fa: *const c_void,
    at: *const c_void,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    // SAFETY: forwarding.
    unsafe { spawn_common(envp, |e| real::posix_spawnp(pid, p, fa, at, argv, e)) }
}

/// system/popen run `/bin/sh` with `environ`: publish the key fd there for the duration.
fn with_key_env<T>(f: impl FnOnce() -> T) -> T {
    let sh = shield::get();
    if sh.key_fd >= 0 {
        // SAFETY: clearing CLOEXEC on our key fd for the child.
        unsafe { real::fcntl(sh.key_fd, libc::F_SETFD, 0) };
        std::env::set_var("FSPF_KEY_FD", sh.key_fd.to_string());
    }
    let r = f();
    if sh.key_fd >= 0 {
        std::env::remove_var("FSPF_KEY_FD");
        restore_key_cloexec();
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn system(c: *const c_char) -> c_int {
    let Some(_g) = enter() else {
        // SAFETY: forwarding.
        return unsafe { real::system(c) };
    };
    commit_for_child();
    // SAFETY: forwarding.
    with_key_env(|| unsafe { real::system(c) })
}
#[no_mangle]
pub unsafe extern "C" fn popen(c: *const c_char, m: *const c_char) -> *mut FILE {
    let Some(_g) = enter() else {
        // SAFETY: forwarding.
        return unsafe { real::popen(c, m) };
    };
    commit_for_child();
    // SAFETY: forwarding.
    with_key_env(|| unsafe { real::popen(c, m) })
}

#[allow(dead_code)]
fn _unused() {
    let _ = enter_always;
}

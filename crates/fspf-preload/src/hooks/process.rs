//! Process hooks: commit before fork/exec/spawn so children see this process's changes, hand
//! the trust anchor and key fd to exec'd children, and give exec'd programs the plaintext of
//! shielded fds they inherit (redirections such as `cmd < /data/file`).
use super::fail;
use crate::files::{self, Body};
use crate::shield::{self, NodeKind, Route};
use crate::{enter, log, real, say, set_errno};
use fspf_core::EmbedPath;
use libc::{c_char, c_int, c_void, pid_t, FILE};
use std::ffi::{CStr, CString};

/// Commit everything queued (children must see it). A failure fails the fork/exec/spawn that
/// asked for it and marks this process as failed: its changes are lost, so neither its children
/// nor its exit status may pretend otherwise.
fn commit_for_child() -> Result<(), c_int> {
    crate::locks::before_children();
    let sh = shield::get();
    let mut inner = sh.lock();
    shield::Shield::share_buffers(&inner);
    sh.commit(&mut inner).inspect_err(|e| {
        let m = format!("commit before fork/exec failed (errno {e}); changes were lost");
        say(&m);
        crate::commit_failure(&m);
    })
}

/// Hand every inherited (non-CLOEXEC) shielded fd over to the exec'd program. Buffers already
/// are memfds holding the plaintext at the right offset; read-only placeholders are filled with
/// the verified plaintext now (so even a program without the shield reads the right bytes).
/// `FSPF_INHERIT` (`fd:mode:hex-embed-path[:lock-fd]`, `;`-separated) tells a shielded program to adopt
/// them as shielded files, including writes (`sh -c 'cmd > /data/f'`).
fn materialise_inherited() -> Result<Option<CString>, c_int> {
    let mut desc: Vec<String> = Vec::new();
    for fd in files::all_fds() {
        // SAFETY: querying fd flags.
        let fl = unsafe { real::fcntl(fd, libc::F_GETFD, 0) };
        if fl < 0 || fl & libc::FD_CLOEXEC != 0 {
            continue;
        }
        let Some(h) = files::get(fd) else { continue };
        let mut f = h.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(f.body, Body::Dir) {
            continue;
        }
        let mode = format!(
            "{}{}{}",
            if f.read { "r" } else { "" },
            if f.write { "w" } else { "" },
            if f.append { "a" } else { "" }
        );
        let hex: String = f
            .path
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if f.touched.is_none() && !crate::fdio::materialise_placeholder(fd, &mut f) {
            // An empty placeholder would read as an empty file (`wc -c < tampered` = 0 with
            // exit status 0): refuse the exec instead.
            return Err(libc::EIO);
        }
        match crate::locks::for_exec(&f) {
            Some(l) => desc.push(format!("{fd}:{mode}:{hex}:{l}")),
            None => desc.push(format!("{fd}:{mode}:{hex}")),
        }
    }
    if desc.is_empty() {
        return Ok(None);
    }
    Ok(CString::new(format!("FSPF_INHERIT={}", desc.join(";"))).ok())
}

/// In a freshly exec'd shielded program: adopt the shielded fds described in `FSPF_INHERIT`.
/// Each is a memfd holding the plaintext (a buffer of the parent, or a filled placeholder); it
/// becomes a buffer of this process, sealed at its last close if it was opened for writing.
pub fn adopt_inherited() {
    let Ok(v) = std::env::var("FSPF_INHERIT") else {
        return;
    };
    std::env::remove_var("FSPF_INHERIT");
    let sh = shield::get();
    for item in v.split(';') {
        let mut it = item.splitn(4, ':');
        let (Some(fd), Some(mode), Some(hex)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let lock_fd = it.next().and_then(|l| l.parse::<c_int>().ok());
        let Ok(fd) = fd.parse::<c_int>() else {
            continue;
        };
        let bytes: Option<Vec<u8>> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
            .collect();
        let Some(ep) = bytes.and_then(|b| fspf_core::EmbedPath::from_bytes(&b).ok()) else {
            continue;
        };
        let write = mode.contains('w');
        let mut inner = sh.lock();
        let m = sh.lookup(&inner, &ep).map(|n| n.mode).unwrap_or(0o644);
        let Ok(mut b) = files::WriteBuf::adopt(ep.clone(), fd, m, sh.started) else {
            continue;
        };
        if mode != "wa" {
            // A description that can read the buffer, or write into it, needs all of it.
            // (If that fails, the hooked reads try again and fail with it.)
            if let Err(e) = crate::opening::load_unloaded(&mut inner, &mut b) {
                log(format!("{ep}: inherited buffer not loaded (errno {e})"));
            }
        }
        let touched = b.touched.clone();
        if write {
            b.writers = 1;
        }
        let b = std::sync::Arc::new(std::sync::Mutex::new(b));
        files::register_own(&b);
        if write {
            inner.live.insert(ep.clone(), b.clone());
        }
        drop(inner);
        let f = files::OpenFile {
            path: ep,
            // The position the parent left in the shared description (`>>` or a partly
            // written file); 0 when it cannot be read.
            // SAFETY: querying the position of an inherited fd.
            offset: unsafe { real::lseek(fd, 0, libc::SEEK_CUR) }.max(0) as u64,
            read: mode.contains('r'),
            write,
            append: mode.contains('a'),
            body: Body::Buf(b),
            mode: m,
            kernel: None,
            touched: Some(touched),
            lock: lock_fd.and_then(crate::locks::LockFd::adopt),
        };
        files::insert(fd, std::sync::Arc::new(std::sync::Mutex::new(f)));
    }
}

/// The environment for an exec'd child: `envp` plus the anchor and key fds (only when the
/// child is shielded, i.e. `SCONE_FSPF` is in `envp`). Clears CLOEXEC on the key fd.
unsafe fn child_env(
    envp: *const *const c_char,
    inherit: Option<CString>,
) -> (Vec<CString>, Vec<*const c_char>) {
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
            if !b.starts_with(b"FSPF_KEY_FD=")
                && !b.starts_with(b"FSPF_ANCHOR_FD=")
                && !b.starts_with(b"FSPF_LOCKS_FD=")
                && !b.starts_with(b"FSPF_INDEX_FD=")
                && !b.starts_with(b"FSPF_INHERIT=")
                && !b.starts_with(b"FSPF_CWD=")
            {
                out.push(s.to_owned());
            }
            i += 1;
        }
    }
    if shielded {
        if sh.anchor_fd() >= 0 {
            out.extend(CString::new(format!("FSPF_ANCHOR_FD={}", sh.anchor_fd())));
        }
        if let Some(l) = crate::locks::base_for_child() {
            out.extend(CString::new(format!("FSPF_LOCKS_FD={l}")));
        }
        let ix = sh.index_fd_for_child(&sh.lock());
        if ix >= 0 {
            out.extend(CString::new(format!("FSPF_INDEX_FD={ix}")));
        }
        if sh.key_fd_for_child() >= 0 {
            // SAFETY: clearing CLOEXEC on our key fd for the child.
            unsafe { real::fcntl(sh.key_fd(), libc::F_SETFD, 0) };
            out.extend(CString::new(format!("FSPF_KEY_FD={}", sh.key_fd())));
        }
        out.extend(inherit);
        if let Some(c) = shield::cwd_for_child(&sh.lock()) {
            out.extend(CString::new(format!("FSPF_CWD={c}")));
        }
    }
    let mut ptrs: Vec<*const c_char> = out.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    (out, ptrs)
}

fn restore_key_cloexec() {
    let sh = shield::get();
    if sh.key_fd() >= 0 {
        // SAFETY: setting CLOEXEC on our key fd.
        unsafe {
            real::fcntl(
                sh.key_fd(),
                libc::F_SETFD,
                libc::FD_CLOEXEC as libc::c_ulong,
            )
        };
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
        // SAFETY: the caller's arguments, unchanged, to glibc's own `fork` (resolved
        // with RTLD_NEXT): the caller's contract for this call is that function's contract.
        return unsafe { real::fork() };
    };
    if let Err(e) = commit_for_child() {
        return fail(e);
    }
    let sh = shield::get();
    // Hold the shield's locks across fork so the child never inherits them mid-update.
    let inner = sh.lock();
    // The run's shared buffers: the child gets descriptions of its own, holding them from
    // before the fork (so the parent, exiting at once, never takes itself for the last holder).
    let mirrors: Vec<c_int> = inner
        .live
        .values()
        .filter_map(|b| {
            let g = b.lock().unwrap_or_else(|e| e.into_inner());
            g.mirror.then_some(g.fd)
        })
        .collect();
    let spares = crate::runbuf::fork_spares(&mirrors);
    let tables = files::fork_guards();
    let streams = crate::dirstream::streams();
    // SAFETY: plain fork.
    let pid = unsafe { real::fork() };
    drop(streams);
    drop(tables);
    drop(inner);
    crate::runbuf::after_fork(&spares, pid == 0);
    if pid == 0 {
        // The child starts with a clean verdict: data refused to its parent was never handed to
        // it (a `multiprocessing` worker forked after a caught EIO may exit 0).
        crate::forget_failures();
        // Record locks are per process: the child holds none of its parent's.
        crate::locks::after_fork_child();
    }
    pid
}

/// vfork is served by fork: a vfork child would run shield code (commit, env set-up) on the
/// parent's memory and stack.
#[no_mangle]
pub unsafe extern "C" fn vfork() -> pid_t {
    // SAFETY: as fork.
    unsafe { fork() }
}

/// How to exec a resolved program.
pub struct ExecPlan {
    /// What to hand to the kernel: a kernel path or `/proc/self/fd/N` of a verified copy.
    path: CString,
    /// Replaces the program's `argv[0]` (the rest follows): set when the shield resolved a
    /// `#!` line itself, as the kernel would (`interpreter [arg] script`).
    argv_prefix: Option<Vec<CString>>,
    /// The memfds of verified copies, closed if the exec fails.
    fds: Vec<c_int>,
}

impl ExecPlan {
    fn kernel(path: CString) -> ExecPlan {
        ExecPlan {
            path,
            argv_prefix: None,
            fds: Vec::new(),
        }
    }

    /// After a failed exec (a successful one never returns): close the verified copies.
    fn discard(&self) {
        for &fd in &self.fds {
            // SAFETY: closing a memfd exec_shielded created for this exec.
            unsafe { real::close(fd) };
        }
    }

    /// The argv to exec with: the program's own, or the `#!` expansion followed by its
    /// arguments after `argv[0]`.
    ///
    /// # Safety
    /// `argv` is NULL or a NULL-terminated array of C strings.
    unsafe fn argv<T>(&self, argv: *const *const T) -> Option<Vec<*const T>> {
        let prefix = self.argv_prefix.as_ref()?;
        let mut out: Vec<*const T> = prefix.iter().map(|c| c.as_ptr().cast()).collect();
        if !argv.is_null() {
            let mut i = 1;
            // SAFETY: argv[0] exists when argv is non-NULL and not empty; the list is
            // NULL-terminated.
            if !unsafe { *argv }.is_null() {
                loop {
                    // SAFETY: as above.
                    let a = unsafe { *argv.add(i) };
                    if a.is_null() {
                        break;
                    }
                    out.push(a);
                    i += 1;
                }
            }
        }
        out.push(std::ptr::null());
        Some(out)
    }
}

/// The interpreter and optional argument of a `#!` line, split as the kernel does
/// (`binfmt_script`: the first line, at most 256 bytes; one optional argument, not split).
fn parse_shebang(data: &[u8]) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
    let head = data.strip_prefix(b"#!")?;
    let head = &head[..head.len().min(254)];
    let line = head.split(|&c| c == b'\n').next().unwrap_or(head);
    let is_ws = |c: &u8| *c == b' ' || *c == b'\t';
    let start = line.iter().position(|c| !is_ws(c))?;
    let line = &line[start..];
    let end = line.iter().rposition(|c| !is_ws(c)).map_or(0, |e| e + 1);
    let line = &line[..end];
    let split = line.iter().position(is_ws).unwrap_or(line.len());
    let interp = line[..split].to_vec();
    let rest = &line[split..];
    let arg = rest
        .iter()
        .position(|c| !is_ws(c))
        .map(|i| rest[i..].to_vec());
    (!interp.is_empty()).then_some((interp, arg))
}

/// A program file of a protected or ephemeral region is executed from a sealed memfd holding
/// its verified plaintext, named `/proc/self/fd/N` (inherited, so `#!` scripts can read it):
/// the kernel never runs the unverified (or encrypted) bytes on disk, and nothing can change
/// them between verification and exec. A `#!` script whose interpreter lies in a protected
/// region is expanded here, not by the kernel, so that the interpreter is verified as well
/// (the kernel would load it from disk by path); chains are followed up to 4 levels (ELOOP).
fn exec_shielded(ep: EmbedPath, depth: u32) -> Result<ExecPlan, c_int> {
    let sh = shield::get();
    let mut inner = sh.lock();
    if !sh.is_ephemeral(&inner, &ep) {
        sh.refresh(&mut inner)?;
    }
    let node = sh.lookup(&inner, &ep)?;
    match node.kind {
        NodeKind::File => {}
        NodeKind::Dir | NodeKind::Special { .. } => return Err(libc::EACCES),
        NodeKind::Symlink(t) => {
            if depth > crate::shield::MAX_SYMLINKS {
                return Err(libc::ELOOP);
            }
            let target = shield::link_target(&ep, &t);
            let r = sh.route_bytes(&inner, libc::AT_FDCWD, &target);
            drop(inner);
            return match r {
                Route::Shield(e2) => exec_shielded(e2, depth + 1),
                Route::Kernel(k, _) => Ok(ExecPlan::kernel(k)),
                Route::Pass => CString::new(target)
                    .map(ExecPlan::kernel)
                    .map_err(|_| libc::EINVAL),
                Route::Deny(e) => Err(e),
            };
        }
    }
    if node.mode & 0o111 == 0 {
        return Err(libc::EACCES);
    }
    let data = crate::opening::load_plain(&mut inner, &ep)?;
    drop(inner);
    let mut name = b"fspf-exec:".to_vec();
    name.extend(ep.file_name().iter().copied().filter(|&c| c != 0).take(200));
    let name = CString::new(name).map_err(|_| libc::EINVAL)?;
    // SAFETY: NUL-terminated name; the fd is ours (inherited by the exec'd program on purpose).
    let fd = crate::index_fd::sealed_memfd(&name, &data)?;
    let own = ExecPlan {
        path: CString::new(format!("/proc/self/fd/{fd}")).map_err(|_| libc::EINVAL)?,
        argv_prefix: None,
        fds: vec![fd],
    };
    let Some((interp, arg)) = parse_shebang(&data) else {
        return Ok(own);
    };
    let route = {
        let inner = sh.lock();
        sh.route_bytes(&inner, libc::AT_FDCWD, &interp)
    };
    let ip = match route {
        // Not protected: the kernel loads it by path, as it would without the shield.
        Route::Pass | Route::Kernel(..) => return Ok(own),
        Route::Deny(e) => {
            own.discard();
            return Err(e);
        }
        Route::Shield(iep) if depth < 4 => match exec_shielded(iep, depth + 1) {
            Ok(ip) => ip,
            Err(e) => {
                own.discard();
                return Err(e);
            }
        },
        Route::Shield(_) => {
            own.discard();
            return Err(libc::ELOOP);
        }
    };
    interpreted_by(ip, interp, arg, own.path, own.fds)
}

/// The plan that runs `script` (named `script_ref` in the interpreter's argv) with the verified
/// interpreter `ip`, as `binfmt_script` would: `interpreter [arg] script_ref args...`.
fn interpreted_by(
    ip: ExecPlan,
    interp: Vec<u8>,
    arg: Option<Vec<u8>>,
    script_ref: CString,
    script_fds: Vec<c_int>,
) -> Result<ExecPlan, c_int> {
    let as_c = |b: Vec<u8>| CString::new(b).map_err(|_| libc::ENOEXEC);
    let mut prefix = match ip.argv_prefix {
        Some(p) => p,
        None => vec![as_c(interp)?],
    };
    if let Some(a) = arg {
        prefix.push(as_c(a)?);
    }
    prefix.push(script_ref);
    let mut fds = ip.fds;
    fds.extend(script_fds);
    Ok(ExecPlan {
        path: ip.path,
        argv_prefix: Some(prefix),
        fds,
    })
}

/// Where to exec `path` from: `None` = as given; a translated kernel path; or a verified copy.
fn exec_route(path: *const c_char) -> Result<Option<ExecPlan>, c_int> {
    match shield::get().route(libc::AT_FDCWD, path) {
        Route::Pass => {
            // SAFETY: the program's NUL-terminated path (route() refused NULL).
            let p = unsafe { CStr::from_ptr(path) };
            Ok(expand_script(p.to_owned(), p.to_owned())?)
        }
        Route::Kernel(k, _) => Ok(Some(
            expand_script(k.clone(), k.clone())?.unwrap_or(ExecPlan::kernel(k)),
        )),
        Route::Deny(e) => Err(e),
        Route::Shield(ep) => exec_shielded(ep, 0).map(Some).inspect_err(|e| {
            log(format!("exec refused (errno {e})"));
        }),
    }
}

/// An unprotected script whose `#!` interpreter lies in a protected region: expand the `#!`
/// here so that the interpreter runs from a verified copy (the kernel would load it from disk).
/// `None`: not such a script, let the kernel run `exec_path` as it is.
fn expand_script(kernel: CString, exec_path: CString) -> Result<Option<ExecPlan>, c_int> {
    let mut head = [0u8; 256];
    // SAFETY: opening a NUL-terminated kernel path read-only; closed below.
    let fd = unsafe {
        real::open(
            kernel.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Ok(None);
    }
    // SAFETY: reading into a local buffer from our own fd.
    let n = unsafe { real::pread(fd, head.as_mut_ptr().cast(), head.len(), 0) };
    // SAFETY: closing our own fd.
    unsafe { real::close(fd) };
    let Some((interp, arg)) = parse_shebang(&head[..n.max(0) as usize]) else {
        return Ok(None);
    };
    let sh = shield::get();
    let route = {
        let inner = sh.lock();
        sh.route_bytes(&inner, libc::AT_FDCWD, &interp)
    };
    let Route::Shield(iep) = route else {
        return Ok(None);
    };
    let ip = exec_shielded(iep, 1)?;
    interpreted_by(ip, interp, arg, exec_path, Vec::new()).map(Some)
}

/// PATH search for execvp/posix_spawnp done here, so that program files found in protected
/// regions are run from verified copies (glibc's own search would exec them directly).
fn search_path(file: &CStr) -> Result<Option<ExecPlan>, c_int> {
    let name = file.to_bytes();
    if name.is_empty() {
        return Err(libc::ENOENT);
    }
    if name.contains(&b'/') {
        return exec_route(file.as_ptr());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/bin:/usr/bin".into());
    let mut last = libc::ENOENT;
    for dir in path.as_encoded_bytes().split(|&c| c == b':') {
        let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
        let mut cand = dir.to_vec();
        cand.push(b'/');
        cand.extend_from_slice(name);
        let Ok(c) = CString::new(cand) else { continue };
        let sh = shield::get();
        match sh.route(libc::AT_FDCWD, c.as_ptr()) {
            Route::Shield(ep) => {
                let found = {
                    let inner = sh.lock();
                    sh.lookup(&inner, &ep).is_ok()
                };
                if found {
                    return exec_shielded(ep, 0).map(Some);
                }
            }
            Route::Deny(e) => last = e,
            r => {
                let k = match &r {
                    Route::Kernel(k, _) => k.as_c_str(),
                    _ => c.as_c_str(),
                };
                // SAFETY: NUL-terminated candidate path.
                if unsafe {
                    real::faccessat(libc::AT_FDCWD, k.as_ptr(), libc::X_OK, libc::AT_EACCESS)
                } == 0
                {
                    let plan = expand_script(k.to_owned(), c.clone())?;
                    return Ok(Some(plan.unwrap_or(ExecPlan::kernel(k.to_owned()))));
                }
                let e = crate::errno();
                if e == libc::EACCES {
                    last = e;
                }
            }
        }
    }
    Err(last)
}

#[no_mangle]
pub unsafe extern "C" fn execve(
    p: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    let Some(_g) = enter() else {
        // SAFETY: the caller's arguments, unchanged, to glibc's own `execve` (resolved
        // with RTLD_NEXT): the caller's contract for this call is that function's contract.
        return unsafe { real::execve(p, argv, envp) };
    };
    let path = match exec_route(p) {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    // SAFETY: the program's arguments.
    unsafe { exec_resolved(p, path, argv, envp, |pp, a, e| real::execve(pp, a, e)) }
}
#[no_mangle]
pub unsafe extern "C" fn execv(p: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: `execve` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { execve(p, argv, current_env()) }
}
#[no_mangle]
pub unsafe extern "C" fn execvpe(
    p: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    let Some(_g) = enter() else {
        // SAFETY: the caller's arguments, unchanged, to glibc's own `execvpe` (resolved
        // with RTLD_NEXT): the caller's contract for this call is that function's contract.
        return unsafe { real::execvpe(p, argv, envp) };
    };
    if p.is_null() {
        return fail(libc::EFAULT);
    }
    // SAFETY: p is the program's NUL-terminated file name (non-null checked).
    let path = match search_path(unsafe { CStr::from_ptr(p) }) {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    // SAFETY: the program's arguments.
    unsafe { exec_resolved(p, path, argv, envp, |pp, a, e| real::execvpe(pp, a, e)) }
}
#[no_mangle]
pub unsafe extern "C" fn execvp(p: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: `execvpe` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { execvpe(p, argv, current_env()) }
}

/// The common end of `execve`/`execvpe` once the program is resolved (`path`: a kernel path or a
/// verified copy, `None` = the program's own): commit, hand shielded fds and the anchor/key to
/// the child's environment, exec, and undo what a failed exec leaves behind.
unsafe fn exec_resolved(
    p: *const c_char,
    plan: Option<ExecPlan>,
    argv: *const *const c_char,
    envp: *const *const c_char,
    real_exec: impl Fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int,
) -> c_int {
    let discard = || plan.as_ref().inspect(|p| p.discard());
    if let Err(e) = commit_for_child() {
        discard();
        return fail(e);
    }
    let inherit = match materialise_inherited() {
        Ok(i) => i,
        Err(e) => {
            discard();
            return fail(e);
        }
    };
    // SAFETY: envp from the program.
    let (_keep, env) = unsafe { child_env(envp, inherit) };
    let pp = plan.as_ref().map_or(p, |c| c.path.as_ptr());
    // SAFETY: argv from the program.
    let expanded = plan.as_ref().and_then(|c| unsafe { c.argv(argv) });
    let av = expanded.as_ref().map_or(argv, |v| v.as_ptr());
    let r = real_exec(pp, av, env.as_ptr());
    discard();
    restore_key_cloexec();
    r
}

/// posix_spawn[p]: commit, resolve the program (verified copy for protected files), pass the
/// anchor/key/cwd in the environment. `search` = posix_spawnp's PATH search.
unsafe fn spawn_common(
    p: *const c_char,
    search: bool,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
    call: impl Fn(*const c_char, bool, *const *mut c_char, *const *mut c_char) -> c_int,
) -> c_int {
    let Some(_g) = enter() else {
        return call(p, search, argv, envp);
    };
    if p.is_null() {
        return libc::EFAULT;
    }
    // SAFETY: the program's NUL-terminated path (non-null checked).
    let file = unsafe { CStr::from_ptr(p) };
    let resolved = if search {
        search_path(file)
    } else {
        exec_route(p)
    };
    let resolved = match resolved {
        Ok(r) => r,
        // posix_spawn reports errors as its return value.
        Err(e) => return e,
    };
    // The spawning process keeps its fds: the child gets the plaintext, not ownership.
    if let Err(e) = commit_for_child().and_then(|_| materialise_inherited()) {
        resolved.as_ref().inspect(|p| p.discard());
        return e;
    }
    let e = if envp.is_null() {
        current_env()
    } else {
        envp.cast()
    };
    // SAFETY: envp from the program.
    let (_keep, env) = unsafe { child_env(e, None) };
    let r = match &resolved {
        Some(k) => {
            // SAFETY: argv from the program.
            let expanded = unsafe { k.argv(argv.cast::<*const c_char>()) };
            let av = expanded
                .as_ref()
                .map_or(argv, |v| v.as_ptr().cast::<*mut c_char>());
            call(k.path.as_ptr(), false, av, env.as_ptr().cast())
        }
        None => call(p, search, argv, env.as_ptr().cast()),
    };
    // The spawned child has its own copies of the fds (or failed); ours are not needed.
    resolved.as_ref().inspect(|p| p.discard());
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
    // SAFETY: `spawn_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe {
        spawn_common(p, false, argv, envp, |p, search, av, e| {
            if search {
                real::posix_spawnp(pid, p, fa, at, av, e)
            } else {
                real::posix_spawn(pid, p, fa, at, av, e)
            }
        })
    }
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
    // SAFETY: `spawn_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe {
        spawn_common(p, true, argv, envp, |p, search, av, e| {
            if search {
                real::posix_spawnp(pid, p, fa, at, av, e)
            } else {
                real::posix_spawn(pid, p, fa, at, av, e)
            }
        })
    }
}

/// system/popen run `/bin/sh` with `environ`: publish the key fd there for the duration.
fn with_key_env<T>(f: impl FnOnce() -> T) -> T {
    let sh = shield::get();
    if sh.key_fd_for_child() >= 0 {
        // SAFETY: clearing CLOEXEC on our key fd for the child.
        unsafe { real::fcntl(sh.key_fd(), libc::F_SETFD, 0) };
        std::env::set_var("FSPF_KEY_FD", sh.key_fd().to_string());
    }
    let cwd = shield::cwd_for_child(&sh.lock());
    if let Some(c) = &cwd {
        std::env::set_var("FSPF_CWD", c);
    }
    // Sets FSPF_INDEX_FD in this process's environment, which /bin/sh inherits.
    let _ = sh.index_fd_for_child(&sh.lock());
    let r = f();
    if cwd.is_some() {
        std::env::remove_var("FSPF_CWD");
    }
    if sh.key_fd() >= 0 {
        std::env::remove_var("FSPF_KEY_FD");
        restore_key_cloexec();
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn system(c: *const c_char) -> c_int {
    let Some(_g) = enter() else {
        // SAFETY: the caller's arguments, unchanged, to glibc's own `system` (resolved
        // with RTLD_NEXT): the caller's contract for this call is that function's contract.
        return unsafe { real::system(c) };
    };
    if let Err(e) = commit_for_child() {
        set_errno(e);
        return -1;
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `system` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    with_key_env(|| unsafe { real::system(c) })
}
#[no_mangle]
pub unsafe extern "C" fn popen(c: *const c_char, m: *const c_char) -> *mut FILE {
    let Some(_g) = enter() else {
        // SAFETY: the caller's arguments, unchanged, to glibc's own `popen` (resolved
        // with RTLD_NEXT): the caller's contract for this call is that function's contract.
        return unsafe { real::popen(c, m) };
    };
    if let Err(e) = commit_for_child() {
        set_errno(e);
        return std::ptr::null_mut();
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `popen` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    with_key_env(|| unsafe { real::popen(c, m) })
}

// --- execl, execlp, execle -------------------------------------------------------------------
// glibc builds their argv and calls execve internally (not through the PLT), so without these
// hooks the child would lose the trust anchor, the key fd and the virtual cwd. They are
// C-variadic, which stable Rust cannot define; a naked trampoline lays the variadic arguments
// out as an argv array on the stack (x86_64 SysV: arg0..arg4 arrive in rsi, rdx, rcx, r8, r9,
// the rest on the stack right above the return address) and calls a Rust function with it.

/// Build the argv slice starting at `argv` (NULL-terminated); returns its length.
///
/// # Safety
/// `argv` points at the NULL-terminated variadic argument list laid out by the trampoline.
unsafe fn argv_len(argv: *const *const c_char) -> usize {
    let mut n = 0;
    // SAFETY: the caller of execl* terminates the list with NULL (required by POSIX).
    while !unsafe { *argv.add(n) }.is_null() {
        n += 1;
    }
    n
}

unsafe extern "C" fn fspf_execl(path: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: argv laid out by the trampoline; execve is our own hook.
    unsafe { execve(path, argv, current_env()) }
}

unsafe extern "C" fn fspf_execlp(file: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: argv laid out by the trampoline; execvpe is our own hook.
    unsafe { execvpe(file, argv, current_env()) }
}

unsafe extern "C" fn fspf_execle(path: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: execle passes envp right after the terminating NULL of the argument list.
    let envp = unsafe { *argv.add(argv_len(argv) + 1) } as *const *const c_char;
    // SAFETY: argv laid out by the trampoline; execve is our own hook.
    unsafe { execve(path, argv, envp) }
}

macro_rules! variadic_exec {
    ($name:ident, $target:ident) => {
        #[unsafe(naked)]
        #[no_mangle]
        pub unsafe extern "C" fn $name() {
            core::arch::naked_asm!(
                "pop r11",
                "push r9",
                "push r8",
                "push rcx",
                "push rdx",
                "push rsi",
                "mov rsi, rsp",
                "push r11",
                "call {f}",
                "pop r11",
                "add rsp, 40",
                "push r11",
                "ret",
                f = sym $target,
            )
        }
    };
}

variadic_exec!(execl, fspf_execl);
variadic_exec!(execlp, fspf_execlp);
variadic_exec!(execle, fspf_execle);

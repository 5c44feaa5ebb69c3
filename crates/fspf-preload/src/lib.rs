//! `libfspf_preload.so`: the in-process file-protection shield (LD_PRELOAD).
//!
//! Inert unless `SCONE_FSPF` is set. Then the constructor opens the fspf with the key and tag
//! (or the run's trust anchor), and the hooks in [`hooks`] translate the program's paths (embed
//! paths) to regions: pass-through, translated kernel paths, or shielded files whose verified
//! plaintext is served from [`files`]. All crypto and format work is fspf-core's; this crate only
//! interposes libc. Semantics, errno choices and limits: `docs/SHIELD.md`.
#![allow(clippy::missing_safety_doc)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod anchor;
mod dirstream;
mod fdio;
mod files;
mod helper;
mod hooks;
mod index_fd;
mod locks;
mod namespace;
mod opening;
mod perm;
mod real;
mod runbuf;
mod shield;
mod stdio;
mod stream;
mod umask;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once the constructor loaded a shield; every hook checks it first (one relaxed load).
pub(crate) static ACTIVE: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// True while this thread runs shield code: libc calls made by std / fspf-core from inside a
    /// hook must reach the real functions, not the hooks again.
    static IN_SHIELD: Cell<bool> = const { Cell::new(false) };
}

/// Proof that this thread is inside the shield; leaving the scope re-arms the hooks.
pub(crate) struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        IN_SHIELD.with(|c| c.set(false));
    }
}

/// `Some` when the hooks should act: the shield is active and this thread is not already in it.
#[inline]
pub(crate) fn enter() -> Option<Guard> {
    if !ACTIVE.load(Ordering::Relaxed) {
        return None;
    }
    IN_SHIELD.with(|c| {
        if c.get() {
            None
        } else {
            c.set(true);
            Some(Guard(()))
        }
    })
}

/// Enter the shield unconditionally (constructor, exit handler, stdio cookies).
pub(crate) fn enter_always() -> Option<Guard> {
    IN_SHIELD.with(|c| {
        if c.get() {
            None
        } else {
            c.set(true);
            Some(Guard(()))
        }
    })
}

pub(crate) fn set_errno(e: libc::c_int) {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() = e };
}

pub(crate) fn errno() -> libc::c_int {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() }
}

static LOG: AtomicBool = AtomicBool::new(false);

/// Set when the shield refused data that failed verification. Such a process never exits 0:
/// programs that treat a read error as end of file (Python reading its script through stdio)
/// must not report success on a tampered input.
static INTEGRITY_FAILED: AtomicBool = AtomicBool::new(false);
static FIRST_FAILURE: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

pub(crate) fn integrity_failure(reason: &str) {
    if !INTEGRITY_FAILED.swap(true, Ordering::Relaxed) {
        if let Ok(mut g) = FIRST_FAILURE.lock() {
            *g = Some(reason.to_string());
        }
    }
}

/// Set when a commit failed and this process's changes were lost (e.g. before a fork or exec,
/// where the error could only fail that call). Such a process never exits 0 either.
static COMMIT_FAILED: AtomicBool = AtomicBool::new(false);

pub(crate) fn commit_failure(reason: &str) {
    COMMIT_FAILED.store(true, Ordering::Relaxed);
    log(reason);
}

/// In a forked child: failures of the parent are the parent's (its exit status reports them).
pub(crate) fn forget_failures() {
    INTEGRITY_FAILED.store(false, Ordering::Relaxed);
    COMMIT_FAILED.store(false, Ordering::Relaxed);
    if let Ok(mut g) = FIRST_FAILURE.lock() {
        *g = None;
    }
}

/// One line to stderr when `FSPF_LOG=1` (reasons for EIO/EACCES; never key material).
pub(crate) fn log(msg: impl std::fmt::Display) {
    if LOG.load(Ordering::Relaxed) {
        say(msg);
    }
}

/// Fault injection for the tests: wait as many milliseconds as the environment variable `name`
/// says (read once per process into `ms`; unset or 0: no wait). The variables widen a race's
/// window so that its regression test fails without the fix every time.
pub(crate) fn pause_for_tests(name: &str, ms: &std::sync::OnceLock<u64>) {
    let ms = *ms.get_or_init(|| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    });
    if ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// One line to stderr, always (fatal setup problems).
pub(crate) fn say(msg: impl std::fmt::Display) {
    let line = format!("fspf-preload[{}]: {msg}\n", std::process::id());
    // SAFETY: writing an owned buffer to fd 2; errors are ignored (nowhere to report them).
    unsafe { real::write(2, line.as_ptr().cast(), line.len()) };
}

extern "C" {
    /// aws-lc's CPU feature detection (`crypto/fipsmodule/cpucap`), under aws-lc-sys's symbol
    /// prefix: linking fails, rather than the shield silently running slow, if an upgrade of
    /// aws-lc-sys renames it.
    fn aws_lc_0_47_0_OPENSSL_cpuid_setup();
}

extern "C" fn constructor(
    _argc: libc::c_int,
    _argv: *mut *mut libc::c_char,
    _env: *mut *mut libc::c_char,
) {
    if std::env::var_os("SCONE_FSPF").is_none() {
        return;
    }
    // aws-lc records the CPU's features (AES-NI, VAES, PCLMUL) in its own constructor, which
    // the dynamic linker may run after this one: keys set up before it (the shield's, below)
    // took the portable code, many times slower (found in a profile of a shielded process
    // decrypting log records with `aes_nohw_*`). Recording them twice is harmless.
    // SAFETY: aws-lc's `OPENSSL_cpuid_setup` takes no arguments, only executes `cpuid`/`xgetbv`
    // and writes aws-lc's own capability words; nothing else runs in this process yet.
    unsafe { aws_lc_0_47_0_OPENSSL_cpuid_setup() };
    let Some(_g) = enter_always() else { return };
    LOG.store(
        std::env::var_os("FSPF_LOG").is_some_and(|v| v == "1"),
        Ordering::Relaxed,
    );
    if shield::init() {
        // Descriptors inherited from a shielded parent join this process's fd table before
        // the program runs (the hooks layer, above the shield).
        hooks::process::adopt_inherited();
        ACTIVE.store(true, Ordering::Release);
    }
}

type MainFn = unsafe extern "C" fn(
    libc::c_int,
    *mut *mut libc::c_char,
    *mut *mut libc::c_char,
) -> libc::c_int;
type StartMainFn = unsafe extern "C" fn(
    MainFn,
    libc::c_int,
    *mut *mut libc::c_char,
    *mut libc::c_void,
    *mut libc::c_void,
    *mut libc::c_void,
    *mut libc::c_void,
) -> libc::c_int;

static REAL_MAIN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs as the program's `main`: registers the exit handler now, after `__libc_start_main`
/// registered the dynamic linker's finaliser, so the final commit runs before any library
/// (including the crypto library linked into this one) is finalised.
unsafe extern "C" fn main_trampoline(
    argc: libc::c_int,
    argv: *mut *mut libc::c_char,
    envp: *mut *mut libc::c_char,
) -> libc::c_int {
    if ACTIVE.load(Ordering::Acquire) {
        // SAFETY: registering a plain extern "C" fn with no arguments.
        unsafe { libc::atexit(at_exit) };
    }
    // SAFETY: REAL_MAIN holds the program's main, stored just before this call.
    let m: MainFn = unsafe { std::mem::transmute(REAL_MAIN.load(Ordering::Relaxed)) };
    // SAFETY: calling the program's main with its own arguments.
    unsafe { m(argc, argv, envp) }
}

#[no_mangle]
pub unsafe extern "C" fn __libc_start_main(
    main: MainFn,
    argc: libc::c_int,
    argv: *mut *mut libc::c_char,
    init: *mut libc::c_void,
    fini: *mut libc::c_void,
    rtld_fini: *mut libc::c_void,
    stack_end: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: dlsym with a NUL-terminated literal.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, c"__libc_start_main".as_ptr()) };
    if p.is_null() {
        // SAFETY: nothing sensible can run without libc's start routine.
        unsafe { libc::abort() };
    }
    // SAFETY: glibc's __libc_start_main has this signature on x86_64.
    let real: StartMainFn = unsafe { std::mem::transmute(p) };
    REAL_MAIN.store(main as usize, Ordering::Relaxed);
    // SAFETY: glibc's `__libc_start_main` with the start-up arguments the loader gave us,
    // unchanged, except `main`, which is our trampoline of the same signature.
    unsafe {
        real(
            main_trampoline,
            argc,
            argv,
            init,
            fini,
            rtld_fini,
            stack_end,
        )
    }
}

/// The final commit and the integrity verdict. Returns false when the process must not report
/// success (its changes could not be committed, or it was handed data that failed verification).
fn finish_process() -> bool {
    let committed = shield::at_exit();
    if INTEGRITY_FAILED.load(Ordering::Relaxed) {
        let reason = FIRST_FAILURE
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .unwrap_or_default();
        say(format!(
            "integrity violation detected ({reason}); exit status forced to 1"
        ));
        return false;
    }
    if COMMIT_FAILED.load(Ordering::Relaxed) {
        say("a commit of this process failed earlier, its changes were lost; exit status forced to 1");
        return false;
    }
    committed
}

extern "C" fn at_exit() {
    // Flush stdio first: glibc flushes streams only after the atexit handlers, and unflushed
    // data of a protected FILE* (fopencookie) would otherwise miss the final commit.
    // SAFETY: fflush(NULL) flushes all streams; it is called outside any stream lock.
    unsafe { libc::fflush(std::ptr::null_mut()) };
    let Some(_g) = enter_always() else { return };
    if !finish_process() {
        // SAFETY: terminating the process; stdio was flushed above.
        unsafe { real::_exit(1) };
    }
}

/// `_exit` skips atexit handlers (dash ends this way), so the final commit happens here too.
/// stdio is not flushed, as `_exit` specifies.
#[no_mangle]
pub unsafe extern "C" fn _exit(status: libc::c_int) -> ! {
    let mut status = status;
    if let Some(_g) = enter() {
        if !finish_process() && status == 0 {
            status = 1;
        }
    }
    // SAFETY: terminating the process.
    unsafe { real::_exit(status) };
    // SAFETY: unreachable unless glibc's _exit is missing; never return from _exit.
    unsafe { libc::abort() }
}

#[no_mangle]
pub unsafe extern "C" fn _Exit(status: libc::c_int) -> ! {
    // SAFETY: same contract as _exit.
    unsafe { _exit(status) }
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn(libc::c_int, *mut *mut libc::c_char, *mut *mut libc::c_char) =
    constructor;

/// Return -1 with `errno = e` (the failure value of an int-returning call).
pub(crate) fn fail(e: libc::c_int) -> libc::c_int {
    set_errno(e);
    -1
}

/// Set errno to `e`; the failure value of a call returning `ssize_t`.
pub(crate) fn fail_isize(e: libc::c_int) -> isize {
    set_errno(e);
    -1
}

/// Set errno to `e`; the failure value of a call returning a pointer.
pub(crate) fn fail_ptr<T>(e: libc::c_int) -> *mut T {
    set_errno(e);
    std::ptr::null_mut()
}

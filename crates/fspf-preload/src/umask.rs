//! The process's umask as the shield tracks it: read once at start, kept current by the `umask`
//! hook, applied to the modes of files and directories the shield creates.
use std::sync::atomic::{AtomicU32, Ordering};

static UMASK: AtomicU32 = AtomicU32::new(0o022);

/// The current umask.
pub fn now() -> u32 {
    UMASK.load(Ordering::Relaxed)
}

/// Record a umask the program just set.
pub fn set(m: u32) {
    UMASK.store(m & 0o777, Ordering::Relaxed);
}

/// Read the process's umask (at start, before the program runs).
pub fn init() {
    // SAFETY: umask only swaps an integer of the process; the old value is restored at once
    // (library constructor, before the program's threads exist).
    let m = unsafe { libc::umask(0o022) };
    // SAFETY: as above.
    unsafe { libc::umask(m) };
    set(m);
}

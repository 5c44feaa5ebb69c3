//! Write buffers shared by the processes of one mutable run: one buffer per protected file, as a
//! kernel file system has one page cache per inode.
//!
//! `fspf run --mutable` makes a private directory in RAM (`/dev/shm/fspf-run-*`, mode 0700,
//! named by `FSPF_BUFDIR`, removed when the run ends). A process that opens a protected file for
//! writing keeps its plaintext buffer there, at the file's embed path (`/data/db` is
//! `BUFDIR/data/db`), instead of in a memfd of its own; a second process of the run that opens the
//! file (for writing, or for reading while the buffer exists) opens the same file. So the
//! processes see each other's writes at once and their `MAP_SHARED` maps are one memory: SQLite
//! in WAL mode with several processes (its `-shm` index is a shared map), two writers of one log,
//! a reader of a file another process is writing.
//!
//! * The first opener creates the file unnamed (`O_TMPFILE`), takes an exclusive `flock` on it,
//!   links it into place (failing if another opener was first) and fills it with the verified
//!   plaintext (mode 0 until it is complete, then 0600), then holds it shared; later openers
//!   take it shared, so they wait until it is complete. A named buffer is thus never unlocked
//!   before it is complete unless its creator died: a creator that fails to load removes it;
//!   one killed while loading leaves it incomplete and unlocked, and the next opener removes it.
//! * The last holder (its exclusive `flock` succeeds) removes it when it drops its buffer, after
//!   sealing what needs sealing; a holder killed with `kill -9` leaves it, and the next opener
//!   joins it with the killed process's writes, as a page cache keeps a killed writer's writes.
//! * `unlink` and `rename` in the shield do the same to the mirror, so a name always leads to the
//!   buffer of the file it names; a removed file's buffer lives on for its holders, detached.
//! * Any failure (no directory, another user's process that may not open it, an ephemeral
//!   region) falls back to a private memfd: the behaviour without sharing (docs/SHIELD.md).
//!
//! The directory holds plaintext, like the memfds it replaces: RAM (or swap), readable only by the
//! run's user, gone with the run.
use crate::real;
use fspf_core::EmbedPath;
use libc::c_int;
use std::ffi::CString;
use std::sync::atomic::{AtomicI32, Ordering};

/// Directory fd of the run's buffer directory; -1 when there is none.
static DIR: AtomicI32 = AtomicI32::new(-1);
/// Its path, with a trailing `/` (to recognise its files among inherited fds).
static DIR_PATH: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
/// Directory fds live from here up (the shield's own numbers).
const DIR_FD_BASE: c_int = 860;

/// At start: open the run's buffer directory, if the run has one and it is this user's and
/// private.
pub fn init() {
    let Some(dir) = std::env::var_os("FSPF_BUFDIR").filter(|d| !d.is_empty()) else {
        return;
    };
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = CString::new(dir.as_bytes()) else {
        return;
    };
    let fl = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW;
    // SAFETY: NUL-terminated path.
    let fd = unsafe { real::open(c.as_ptr(), fl, 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: fstat of our own fd into a local buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let ok = unsafe { real::fstat(fd, &mut st) } == 0
        // SAFETY: geteuid takes no arguments and cannot fail.
        && st.st_uid == unsafe { libc::geteuid() }
        && st.st_mode & 0o077 == 0;
    if !ok {
        // SAFETY: closing our own fd.
        unsafe { real::close(fd) };
        return;
    }
    // SAFETY: moving our fd to a high number.
    let high = unsafe { real::fcntl(fd, libc::F_DUPFD_CLOEXEC, DIR_FD_BASE as libc::c_ulong) };
    if high >= 0 {
        // SAFETY: closing the low number.
        unsafe { real::close(fd) };
        DIR.store(high, Ordering::Relaxed);
    } else {
        DIR.store(fd, Ordering::Relaxed);
    }
    let mut p = dir.as_bytes().to_vec();
    if !p.ends_with(b"/") {
        p.push(b'/');
    }
    let _ = DIR_PATH.set(p);
}

/// Is `fd` a file of the run's buffer directory (an inherited shared buffer)?
pub fn is_buffer_file(fd: c_int) -> bool {
    let Some(dir) = DIR_PATH.get() else {
        return false;
    };
    use std::os::unix::ffi::OsStrExt;
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .is_ok_and(|t| t.as_os_str().as_bytes().starts_with(dir))
}

/// Hold the shared buffer behind our own description `fd` like any other holder.
pub fn hold(fd: c_int) -> bool {
    mark_holder(fd);
    flock(fd, libc::LOCK_SH)
}

/// Before a `fork`: a second description of each shared buffer `fds` names, held shared, for
/// the child (the parent's own description, with its `flock`, would otherwise be the child's
/// too: a parent exiting at once would take itself for the last holder).
pub fn fork_spares(fds: &[c_int]) -> Vec<(c_int, c_int)> {
    let mut out = Vec::new();
    for &fd in fds {
        let Ok(p) = CString::new(format!("/proc/self/fd/{fd}")) else {
            continue;
        };
        // SAFETY: NUL-terminated path naming our own fd.
        let spare = unsafe { real::open(p.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC, 0) };
        if spare < 0 {
            continue;
        }
        if !flock(spare, libc::LOCK_SH | libc::LOCK_NB) {
            // SAFETY: closing our own fd.
            unsafe { real::close(spare) };
            continue;
        }
        mark_holder(spare);
        out.push((fd, spare));
    }
    out
}

/// After a `fork`: the child puts the spare descriptions in place of the parent's; the parent
/// closes them.
pub fn after_fork(spares: &[(c_int, c_int)], child: bool) {
    for &(fd, spare) in spares {
        if child {
            // SAFETY: replacing our own fd number with the spare description (the parent's
            // description, and its lock, stay the parent's).
            unsafe { real::dup3(spare, fd, libc::O_CLOEXEC) };
        }
        // SAFETY: closing the spare number.
        unsafe { real::close(spare) };
    }
}

/// The buffer directory's fd (the shield's own), -1 when there is none.
pub fn dir_fd() -> c_int {
    DIR.load(Ordering::Relaxed)
}

/// `ep` relative to the directory ("data/db"); None for `/`.
fn rel(ep: &EmbedPath) -> Option<CString> {
    let b = ep.as_bytes().strip_prefix(b"/")?;
    if b.is_empty() {
        return None;
    }
    CString::new(b).ok()
}

/// Make the directories above `rel` (each 0700).
fn make_parents(dir: c_int, rel: &[u8]) {
    let mut i = 0;
    while let Some(p) = rel[i..].iter().position(|&c| c == b'/') {
        let end = i + p;
        if let Ok(c) = CString::new(&rel[..end]) {
            // SAFETY: NUL-terminated relative path below our directory fd.
            unsafe { real::mkdirat(dir, c.as_ptr(), 0o700) };
        }
        i = end + 1;
    }
}

/// Every holder of a buffer also holds an OFD read lock on this byte through its own
/// description: a process that finds no other description holding it ([`sole_holder`]) is the
/// buffer's only holder (`stream.rs` starts a stream only then).
const HOLD_AT: i64 = i64::MAX - 2;

/// Mark our description `fd` of a buffer as a holder's ([`HOLD_AT`]).
fn mark_holder(fd: c_int) {
    let mut fl = crate::files::byte_lock(libc::F_RDLCK, HOLD_AT);
    // SAFETY: F_OFD_SETLK with a pointer to a local struct flock, on our own fd.
    unsafe {
        real::fcntl(
            fd,
            libc::F_OFD_SETLK,
            &mut fl as *mut libc::flock as libc::c_ulong,
        )
    };
}

/// Does no description but our `fd` hold the buffer (no other process of the run has it)?
pub fn sole_holder(fd: c_int) -> bool {
    let mut fl = crate::files::byte_lock(libc::F_WRLCK, HOLD_AT);
    // SAFETY: F_OFD_GETLK with a pointer to a local struct flock, on our own fd.
    let r = unsafe {
        real::fcntl(
            fd,
            libc::F_OFD_GETLK,
            &mut fl as *mut libc::flock as libc::c_ulong,
        )
    };
    r == 0 && fl.l_type == libc::F_UNLCK as libc::c_short
}

fn flock(fd: c_int, op: c_int) -> bool {
    loop {
        // SAFETY: flock on our own fd.
        if unsafe { real::flock(fd, op) } == 0 {
            return true;
        }
        if crate::errno() != libc::EINTR {
            return false;
        }
    }
}

/// What `open` found.
pub enum Opened {
    /// This process created the buffer: fill it, then call [`loaded`] (or [`release`] it: a
    /// creator that could not fill it is its only holder, and removes it).
    Created(c_int),
    /// Another process of the run holds it, complete: use it as it is.
    Joined(c_int),
}

/// Open (or create) the run's buffer of `ep`. None: no sharing (use a private memfd).
pub fn open(ep: &EmbedPath) -> Option<Opened> {
    let dir = dir_fd();
    if dir < 0 {
        return None;
    }
    let rel = rel(ep)?;
    let fl = libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // A few rounds: the buffer may go (its last holder removed it) or be incomplete (a user
    // other than root cannot open it before its creator made it 0600) while we look.
    let mut waits = 0u64;
    for _ in 0..64 {
        match create_locked(dir, &rel) {
            Ok(fd) => {
                mark_holder(fd);
                return Some(Opened::Created(fd));
            }
            Err(libc::ENOENT) => make_parents(dir, rel.as_bytes()),
            Err(libc::EEXIST) => {
                if let Some(fd) = join(dir, &rel, fl) {
                    return Some(Opened::Joined(fd));
                }
                remove_incomplete(dir, &rel);
                waits += 1;
                std::thread::sleep(std::time::Duration::from_millis(waits.min(20)));
            }
            Err(_) => return None,
        }
    }
    None
}

/// A new buffer file at `rel`, locked exclusively before it has a name: an unnamed file
/// (`O_TMPFILE`, mode 0: incomplete until [`loaded`] makes it 0600), locked, then linked into
/// place (`EEXIST`: another process made it first). A process that finds a buffer unlocked and
/// incomplete may therefore take it for the remains of a creator that died while filling it
/// and remove it; a buffer created with its name first and locked next could be removed that
/// way by a second opener before its creator locked it, and the two then wrote two buffers of
/// one file (regression `a_second_process_removed_the_buffer_its_creator_had_not_locked_yet`).
fn create_locked(dir: c_int, rel: &CString) -> Result<c_int, c_int> {
    let bytes = rel.as_bytes();
    let parent = match bytes.iter().rposition(|&c| c == b'/') {
        Some(i) => CString::new(&bytes[..i]).map_err(|_| libc::EINVAL)?,
        None => c".".to_owned(),
    };
    // SAFETY: NUL-terminated relative directory path below our directory fd.
    let fd = unsafe {
        real::openat(
            dir,
            parent.as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(crate::errno());
    }
    pause_creating_for_tests();
    let named = flock(fd, libc::LOCK_EX)
        && CString::new(format!("/proc/self/fd/{fd}")).is_ok_and(|p| {
            // SAFETY: NUL-terminated paths: our own unnamed file (through /proc) and a relative
            // name below our directory fd.
            unsafe {
                real::linkat(
                    libc::AT_FDCWD,
                    p.as_ptr(),
                    dir,
                    rel.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                ) == 0
            }
        });
    if named {
        return Ok(fd);
    }
    let e = crate::errno();
    // SAFETY: closing our own unnamed file (it goes with its last fd).
    unsafe { real::close(fd) };
    Err(if e == 0 { libc::EIO } else { e })
}

/// `FSPF_TEST_PAUSE_CREATING_BUFFER=MS`: this process waits MS milliseconds while it creates a
/// buffer of the run (the window in which another process used to find the buffer before its
/// creator locked it).
fn pause_creating_for_tests() {
    static MS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    crate::pause_for_tests("FSPF_TEST_PAUSE_CREATING_BUFFER", &MS);
}

/// Join an existing buffer: wait for its creator to finish loading. None when it went away
/// meanwhile (its last holder removed it) or cannot be opened.
fn join(dir: c_int, rel: &CString, fl: c_int) -> Option<c_int> {
    // SAFETY: NUL-terminated relative path below our directory fd.
    let fd = unsafe { real::openat(dir, rel.as_ptr(), fl, 0) };
    if fd < 0 {
        return None;
    }
    if !wait_shared(fd) || !still_named(dir, rel, fd) || !complete(fd) {
        // SAFETY: closing our own fd.
        unsafe { real::close(fd) };
        return None;
    }
    mark_holder(fd);
    Some(fd)
}

/// Was the buffer filled completely (`loaded` made it 0600)?
fn complete(fd: c_int) -> bool {
    // SAFETY: fstat of our own fd into a local buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { real::fstat(fd, &mut st) == 0 && st.st_mode & 0o777 == 0o600 }
}

/// A buffer that could not be joined because its creator died while filling it (mode still 0,
/// no lock held): remove it, so that the next attempt creates it anew.
fn remove_incomplete(dir: c_int, rel: &CString) {
    let fl = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: NUL-terminated relative path below our directory fd.
    let fd = unsafe { real::openat(dir, rel.as_ptr(), fl, 0) };
    if fd < 0 {
        return;
    }
    if flock(fd, libc::LOCK_EX | libc::LOCK_NB) && !complete(fd) && still_named(dir, rel, fd) {
        // SAFETY: as above.
        unsafe { real::unlinkat(dir, rel.as_ptr(), 0) };
    }
    // SAFETY: closing our own fd (drops its lock).
    unsafe { real::close(fd) };
}

/// Take `fd` shared, waiting while its creator loads it, but not forever: a holder that keeps
/// it exclusive longer than a load takes (it should not exist) makes this process use a private
/// buffer instead of hanging.
fn wait_shared(fd: c_int) -> bool {
    let mut pause = std::time::Duration::from_micros(200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if flock(fd, libc::LOCK_SH | libc::LOCK_NB) {
            return true;
        }
        if crate::errno() != libc::EWOULDBLOCK || std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(20));
    }
}

/// Is `fd` still the file at `rel` (not removed by its last holder, or a creator that failed,
/// while this process waited for the lock)?
fn still_named(dir: c_int, rel: &CString, fd: c_int) -> bool {
    // SAFETY: fstat/fstatat into local buffers.
    let mut a: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut b: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; NUL-terminated relative path below our directory fd.
    let both = unsafe {
        real::fstat(fd, &mut a) == 0
            && real::fstatat(dir, rel.as_ptr(), &mut b, libc::AT_SYMLINK_NOFOLLOW) == 0
    };
    both && a.st_ino == b.st_ino && a.st_dev == b.st_dev && a.st_nlink > 0
}

/// Is `fd` still the run's buffer of `ep`? False once another process unlinked the file or
/// renamed it away (its buffer then went with it, or is gone): this process's copy is detached,
/// like an fd of an unlinked file, and must never be sealed under `ep` again.
pub fn still_current(ep: &EmbedPath, fd: c_int) -> bool {
    match rel(ep) {
        Some(rel) => still_named(dir_fd(), &rel, fd),
        None => false,
    }
}

/// The buffer of `ep`, when some process of the run has one (for a read-only open, or a lock
/// taken by a process without one).
pub fn existing(ep: &EmbedPath) -> Option<c_int> {
    let dir = dir_fd();
    if dir < 0 {
        return None;
    }
    let rel = rel(ep)?;
    join(dir, &rel, libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC)
}

/// The creator filled the buffer: mark it complete and let the others in.
pub fn loaded(fd: c_int) {
    // SAFETY: fchmod of our own fd.
    unsafe { real::fchmod(fd, 0o600) };
    flock(fd, libc::LOCK_SH);
}

/// This process drops its buffer of `ep`: the last holder removes it.
pub fn release(ep: &EmbedPath, fd: c_int) {
    leave(ep, fd);
    // SAFETY: closing our own fd (drops its lock).
    unsafe { real::close(fd) };
}

/// Remove the buffer of `ep` if this process is its last holder (`fd` stays open).
pub fn leave(ep: &EmbedPath, fd: c_int) {
    let dir = dir_fd();
    if let Some(rel) = rel(ep) {
        if flock(fd, libc::LOCK_EX | libc::LOCK_NB) && still_named(dir, &rel, fd) {
            // SAFETY: NUL-terminated relative path below our directory fd.
            unsafe { real::unlinkat(dir, rel.as_ptr(), 0) };
        }
    }
}

/// `ep` was unlinked (a file) or removed (a directory) in the shield.
pub fn unlinked(ep: &EmbedPath, dir_entry: bool) {
    let dir = dir_fd();
    if dir < 0 {
        return;
    }
    let Some(rel) = rel(ep) else { return };
    let fl = if dir_entry { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: NUL-terminated relative path below our directory fd.
    unsafe { real::unlinkat(dir, rel.as_ptr(), fl) };
}

/// `from` was renamed to `to` in the shield: the buffers follow (one that `to` had is removed).
pub fn renamed(from: &EmbedPath, to: &EmbedPath) {
    let dir = dir_fd();
    if dir < 0 {
        return;
    }
    let (Some(a), Some(b)) = (rel(from), rel(to)) else {
        return;
    };
    make_parents(dir, b.as_bytes());
    // SAFETY: NUL-terminated relative paths below our directory fd.
    if unsafe { real::renameat(dir, a.as_ptr(), dir, b.as_ptr()) } != 0 {
        // Nothing buffered under `from`: a buffer `to` had belongs to the replaced file.
        // SAFETY: as above.
        if unsafe { real::unlinkat(dir, b.as_ptr(), 0) } != 0 {
            // SAFETY: as above (a directory of buffers below a replaced directory).
            unsafe { real::unlinkat(dir, b.as_ptr(), libc::AT_REMOVEDIR) };
        }
    }
}

/// The side file of a stream (`stream.rs`: the tags of its sealed chunks) in the run's buffer
/// directory, by the stream's name; made new with `create`. `None`: no directory, or no such
/// file.
pub fn side_file(name: &str, create: bool) -> Option<c_int> {
    let dir = dir_fd();
    if dir < 0 {
        return None;
    }
    let c = CString::new(name).ok()?;
    let fl = libc::O_RDWR
        | libc::O_NOFOLLOW
        | libc::O_CLOEXEC
        | if create {
            libc::O_CREAT | libc::O_EXCL
        } else {
            0
        };
    // SAFETY: NUL-terminated relative name below our directory fd.
    let fd = unsafe { real::openat(dir, c.as_ptr(), fl, 0o600) };
    if fd < 0 {
        return None;
    }
    // SAFETY: moving our fd out of the program's way (close-on-exec, as opened).
    let high = unsafe { real::fcntl(fd, libc::F_DUPFD_CLOEXEC, DIR_FD_BASE as libc::c_ulong) };
    if high < 0 {
        return Some(fd);
    }
    // SAFETY: closing the low number of our own fd.
    unsafe { real::close(fd) };
    Some(high)
}

/// Remove the side file `name` ([`side_file`]).
pub fn remove_side_file(name: &str) {
    let dir = dir_fd();
    let Ok(c) = CString::new(name) else { return };
    if dir >= 0 {
        // SAFETY: NUL-terminated relative name below our directory fd.
        unsafe { real::unlinkat(dir, c.as_ptr(), 0) };
    }
}

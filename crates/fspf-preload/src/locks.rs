//! Advisory locks on shielded files (`fcntl` record locks, OFD locks, `flock`, `lockf`), shared
//! by every process of one run.
//!
//! A shielded fd is a memfd of its own process (a write buffer or an empty placeholder): a lock
//! taken on it would exclude nobody else. So every lock on a shielded file is taken on one memfd
//! that all processes of the run share, `fspf-locks` (made by the first shielded process of the
//! run and inherited through `FSPF_LOCKS_FD`), at a range that stands for the file:
//!
//! * each embed path hashes to a **slot** of 2^34 bytes; file offset `o` of the file is byte
//!   `slot + o` (offsets from 2^33 on share the slot's last byte of that half); the byte at
//!   `slot + 2^33` is the file's `flock` lock;
//! * every lock is an OFD lock (`F_OFD_SETLK*`), owned by an open file description of the
//!   memfd: **POSIX record locks** (`F_SETLK*`, `lockf`) on the process's own description
//!   ([`PROC`], opened at its first record lock, again in a forked child, never inherited), so they are
//!   per process, not inherited by `fork`, and released when the process dies or closes any fd
//!   of the file (the close hook does that, as POSIX says); **OFD locks and `flock`** on a
//!   description made for the shielded open file description ([`LockFd`], shared by its `dup`s
//!   and `fork`s and handed across `exec`), released when its last fd is closed.
//!
//! Visibility follows the lock, as on a local file system: before a lock is released (`F_UNLCK`,
//! `LOCK_UN`, a downgrade, or the close that drops it) the process commits what it wrote, and
//! after it acquires one it reloads what another process committed since (`refresh_path`). Two
//! `sqlite3` processes updating one database, or two shells serialised by `flock`, see each
//! other's writes.
//!
//! Limits: two paths whose hashes share a slot (1 in 2^29 per pair) lock each other; locks
//! follow the path, not the file, across a `rename`; `F_GETLK` reports `l_pid` -1 (the holder of
//! an OFD lock); OFD and POSIX locks of one process on one file do conflict with each other,
//! as on Linux.
use crate::files::{self, Body, Handle};
use crate::{real, shield};
use fspf_core::EmbedPath;
use libc::c_int;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

const SLOT_SHIFT: u32 = 34;
/// Slot numbers 1..=SLOTS (slot 0 is not used).
const SLOTS: u64 = (1 << (63 - SLOT_SHIFT)) - 1;
/// File offsets a slot represents exactly.
const RANGE: i64 = 1 << (SLOT_SHIFT - 1);
/// Slot-relative byte of the file's `flock` lock.
const FLOCK_BYTE: i64 = RANGE;
/// Lock fds live from here up (the shield's own numbers).
const LOCK_FD_BASE: c_int = 850;

/// The run's shared `fspf-locks` memfd (inherited; -1 when there is none).
static BASE: AtomicI32 = AtomicI32::new(-1);
/// This process's own description of it: POSIX-style record locks.
static PROC: AtomicI32 = AtomicI32::new(-1);
/// Serialises the first opening of [`PROC`] between threads.
static PROC_OPEN: Mutex<()> = Mutex::new(());
/// Slots where this process holds record locks (released when it closes an fd of the file).
static HELD: Mutex<BTreeSet<i64>> = Mutex::new(BTreeSet::new());
/// Every lock fd of this process (the shield's own: `close`, `close_range`, `dup2` spare them).
static FDS: Mutex<BTreeSet<c_int>> = Mutex::new(BTreeSet::new());

fn fds() -> std::sync::MutexGuard<'static, BTreeSet<c_int>> {
    FDS.lock().unwrap_or_else(|e| e.into_inner())
}

fn held() -> std::sync::MutexGuard<'static, BTreeSet<i64>> {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

/// Is `fd` the run's `fspf-locks` memfd (not a file that reused the number)?
fn is_locks_memfd(fd: c_int) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok_and(|t| {
        use std::os::unix::ffi::OsStrExt;
        t.as_os_str().as_bytes().starts_with(b"/memfd:fspf-locks")
    })
}

/// A new description of the shared memfd at a high number (close-on-exec); -1 on failure.
fn reopen(cloexec: bool) -> c_int {
    let base = BASE.load(Ordering::Relaxed);
    if base < 0 {
        return -1;
    }
    let Ok(p) = std::ffi::CString::new(format!("/proc/self/fd/{base}")) else {
        return -1;
    };
    // SAFETY: NUL-terminated path naming our own memfd.
    let fd = unsafe { real::open(p.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC, 0) };
    if fd < 0 {
        return -1;
    }
    let cmd = if cloexec {
        libc::F_DUPFD_CLOEXEC
    } else {
        libc::F_DUPFD
    };
    // SAFETY: duplicating our fresh fd to a high number.
    let high = unsafe { real::fcntl(fd, cmd, LOCK_FD_BASE as libc::c_ulong) };
    // SAFETY: closing the low number (the description lives on in `high`).
    unsafe { real::close(fd) };
    if high >= 0 {
        fds().insert(high);
    }
    high
}

/// At start: join the run's lock memfd (or make it, as the run's first shielded process, and
/// export it to the children), and open this process's own description.
pub fn init() {
    let inherited = std::env::var("FSPF_LOCKS_FD")
        .ok()
        .and_then(|v| v.trim().parse::<c_int>().ok())
        .filter(|&fd| is_locks_memfd(fd));
    let base = match inherited {
        Some(fd) => fd,
        None => {
            // SAFETY: NUL-terminated literal name; the fd is ours.
            let fd = unsafe { libc::memfd_create(c"fspf-locks".as_ptr(), 0) };
            if fd < 0 {
                return;
            }
            // SAFETY: moving our new fd to a high number (inheritable: the run shares it).
            let high = unsafe { real::fcntl(fd, libc::F_DUPFD, LOCK_FD_BASE as libc::c_ulong) };
            let fd = if high >= 0 {
                // SAFETY: closing the low number of our own fd.
                unsafe { real::close(fd) };
                high
            } else {
                fd
            };
            std::env::set_var("FSPF_LOCKS_FD", fd.to_string());
            fd
        }
    };
    BASE.store(base, Ordering::Relaxed);
    fds().insert(base);
}

/// This process's own description, opened at its first record lock (most processes take none,
/// and a process start should cost no more opens than it needs).
fn proc_fd() -> c_int {
    let p = PROC.load(Ordering::Relaxed);
    if p >= 0 {
        return p;
    }
    let _one = PROC_OPEN.lock().unwrap_or_else(|e| e.into_inner());
    let p = PROC.load(Ordering::Relaxed);
    if p >= 0 {
        return p;
    }
    let n = reopen(true);
    PROC.store(n, Ordering::Relaxed);
    n
}

/// In a forked child: record locks are not inherited, so the child gets a description of its
/// own at its first record lock (the parent's stays the parent's).
pub fn after_fork_child() {
    // try_lock: another thread of the parent may have held these at the fork (a stale entry
    // only costs an unlock that finds nothing, or a spared fd number).
    if let Ok(mut h) = HELD.try_lock() {
        h.clear();
    }
    let old = PROC.swap(-1, Ordering::Relaxed);
    if old >= 0 {
        if let Ok(mut f) = FDS.try_lock() {
            f.remove(&old);
        }
        // SAFETY: closing the child's copy of the parent's description (the parent keeps its
        // own fd, so none of the parent's locks is released).
        unsafe { real::close(old) };
    }
}

/// The shared memfd's number for an exec'd shielded child (`FSPF_LOCKS_FD`).
pub fn base_for_child() -> Option<c_int> {
    let b = BASE.load(Ordering::Relaxed);
    (b >= 0).then_some(b)
}

/// Is `fd` one of the shield's lock fds?
pub fn is_own(fd: c_int) -> bool {
    fd >= 0 && BASE.load(Ordering::Relaxed) >= 0 && fds().contains(&fd)
}

/// Lock fds in `first..=last` (kept by `close_range`).
pub fn own_in(first: c_int, last: c_int) -> Vec<c_int> {
    fds().range(first..=last).copied().collect()
}

/// Before the program `dup2`s onto `target`: move a lock fd that has that number (a moved
/// description keeps its locks; the old number is then replaced by the program's dup2).
pub fn protect(target: c_int) {
    if !is_own(target) {
        return;
    }
    // SAFETY: duplicating our own fd to a number above the target (close-on-exec: the run's
    // shared memfd is made inheritable again below; descriptions are handed over at exec).
    let n = unsafe { real::fcntl(target, libc::F_DUPFD_CLOEXEC, (target + 1) as libc::c_ulong) };
    if n < 0 {
        return;
    }
    fds().remove(&target);
    fds().insert(n);
    if target == BASE.load(Ordering::Relaxed) {
        // SAFETY: the shared memfd must stay inheritable.
        unsafe { real::fcntl(n, libc::F_SETFD, 0) };
        BASE.store(n, Ordering::Relaxed);
        std::env::set_var("FSPF_LOCKS_FD", n.to_string());
    } else if target == PROC.load(Ordering::Relaxed) {
        PROC.store(n, Ordering::Relaxed);
    } else {
        files::renumber_lock_fd(target, n);
    }
}

/// The lock description of one shielded open file description (OFD locks and `flock`). Shared
/// by the description's `dup`s; a forked child shares it (the fd is inherited); closed when the
/// description's last fd is.
pub struct LockFd {
    fd: AtomicI32,
}

impl LockFd {
    /// A new description, or None when the run has no lock memfd.
    pub fn new() -> Option<Arc<LockFd>> {
        let fd = reopen(true);
        (fd >= 0).then(|| {
            Arc::new(LockFd {
                fd: AtomicI32::new(fd),
            })
        })
    }

    /// Adopt an inherited lock fd (from `FSPF_INHERIT`).
    pub fn adopt(fd: c_int) -> Option<Arc<LockFd>> {
        if !is_locks_memfd(fd) {
            return None;
        }
        // SAFETY: re-setting close-on-exec on the inherited fd we now own.
        unsafe { real::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC as libc::c_ulong) };
        fds().insert(fd);
        Some(Arc::new(LockFd {
            fd: AtomicI32::new(fd),
        }))
    }

    pub fn fd(&self) -> c_int {
        self.fd.load(Ordering::Relaxed)
    }

    pub fn set_fd(&self, fd: c_int) {
        self.fd.store(fd, Ordering::Relaxed);
    }
}

impl Drop for LockFd {
    fn drop(&mut self) {
        let fd = self.fd();
        fds().remove(&fd);
        // SAFETY: closing the description this LockFd owns (releases its OFD locks unless a
        // forked process still holds it, as for the kernel's own descriptions).
        unsafe { real::close(fd) };
    }
}

fn slot(ep: &EmbedPath) -> i64 {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same slot in every process of the run (one library build).
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ep.as_bytes().hash(&mut h);
    ((1 + h.finish() % SLOTS) << SLOT_SHIFT) as i64
}

/// The shared memfd's range for the file range `[start, start + len)` (`len` 0: to the end).
fn map(slot: i64, start: i64, len: i64) -> (i64, i64) {
    let s = start.min(RANGE - 1);
    let e = if len == 0 {
        RANGE
    } else {
        start.saturating_add(len).min(RANGE).max(s + 1)
    };
    (slot + s, e - s)
}

/// A record lock request made absolute (`l_whence` resolved, negative length turned round).
fn absolute(h: &Handle, fl: &libc::flock) -> Result<(i64, i64), c_int> {
    let origin = match fl.l_whence as c_int {
        libc::SEEK_SET => 0,
        libc::SEEK_CUR => h.lock().unwrap_or_else(|e| e.into_inner()).offset as i64,
        libc::SEEK_END => h.lock().unwrap_or_else(|e| e.into_inner()).size() as i64,
        _ => return Err(libc::EINVAL),
    };
    let mut start = origin.checked_add(fl.l_start).ok_or(libc::EOVERFLOW)?;
    let mut len = fl.l_len;
    if len < 0 {
        start = start.checked_add(len).ok_or(libc::EINVAL)?;
        len = -len;
    }
    if start < 0 {
        return Err(libc::EINVAL);
    }
    Ok((start, len))
}

/// Who owns a lock request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// POSIX record locks and `lockf`: the process.
    Process,
    /// OFD locks and `flock`: the open file description.
    Description,
}

/// The fd that carries `owner`'s locks for the file behind `h`.
fn carrier(h: &Handle, owner: Owner) -> Result<c_int, c_int> {
    match owner {
        Owner::Process => {
            let fd = proc_fd();
            if fd < 0 {
                Err(libc::ENOLCK)
            } else {
                Ok(fd)
            }
        }
        Owner::Description => {
            let mut f = h.lock().unwrap_or_else(|e| e.into_inner());
            if f.lock.is_none() {
                f.lock = LockFd::new();
            }
            f.lock.as_ref().map(|l| l.fd()).ok_or(libc::ENOLCK)
        }
    }
}

fn path_of(h: &Handle) -> EmbedPath {
    h.lock().unwrap_or_else(|e| e.into_inner()).path.clone()
}

/// Before a lock is given up: what this process wrote becomes visible to the next holder. The
/// run's shared buffers are visible already; a commit is needed only for queued changes
/// (removals, renames, staged versions) and writes to private buffers.
fn publish() -> Result<(), c_int> {
    let sh = shield::get();
    let mut inner = sh.lock();
    let private_dirty = inner.live.values().any(|b| {
        let g = b.lock().unwrap_or_else(|e| e.into_inner());
        !g.mirror && g.needs_seal() && !inner.s.is_ephemeral(&g.path)
    });
    if inner.s.has_queued() || private_dirty {
        sh.commit(&mut inner)?;
    }
    Ok(())
}

/// After a lock is acquired: what another process committed meanwhile becomes visible here.
fn acquired(h: &Handle) -> Result<(), c_int> {
    let ep = path_of(h);
    let sh = shield::get();
    let mut inner = sh.lock();
    sh.refresh(&mut inner)?;
    crate::opening::refresh_path(&mut inner, &ep)
}

/// `fcntl` lock commands (`F_SETLK[W]`, `F_GETLK`, their OFD forms) on a shielded fd.
///
/// # Safety
/// `arg` is the program's `struct flock *` for `cmd`.
pub unsafe fn fcntl(h: &Handle, cmd: c_int, arg: libc::c_ulong) -> Result<c_int, c_int> {
    let owner = match cmd {
        libc::F_SETLK | libc::F_SETLKW | libc::F_GETLK => Owner::Process,
        _ => Owner::Description,
    };
    let p = arg as *mut libc::flock;
    if p.is_null() {
        return Err(libc::EFAULT);
    }
    // SAFETY: the caller passes a valid struct flock for a lock command.
    let mut fl = unsafe { std::ptr::read(p) };
    if owner == Owner::Description && fl.l_pid != 0 {
        return Err(libc::EINVAL);
    }
    let (start, len) = absolute(h, &fl)?;
    match cmd {
        libc::F_GETLK | libc::F_OFD_GETLK => {
            let base = slot(&path_of(h));
            let q = conflict(h, owner, fl.l_type as c_int, base, start, len)?;
            if q.l_type as c_int != libc::F_UNLCK {
                fl.l_type = q.l_type;
                fl.l_whence = libc::SEEK_SET as libc::c_short;
                fl.l_start = q.l_start - base;
                fl.l_len = if q.l_start + q.l_len >= base + RANGE {
                    0
                } else {
                    q.l_len
                };
                fl.l_pid = q.l_pid;
            } else {
                fl.l_type = libc::F_UNLCK as libc::c_short;
            }
            // SAFETY: writing the answer back into the program's struct flock.
            unsafe { std::ptr::write(p, fl) };
            Ok(0)
        }
        _ => {
            let wait = matches!(cmd, libc::F_SETLKW | libc::F_OFD_SETLKW);
            set(h, owner, fl.l_type as c_int, start, len, wait)?;
            Ok(0)
        }
    }
}

/// The lock of another owner that a `kind` lock on `[start, start + len)` of the file at slot
/// `base` would conflict with (`l_type` `F_UNLCK`: none), in the shared memfd's offsets.
fn conflict(
    h: &Handle,
    owner: Owner,
    kind: c_int,
    base: i64,
    start: i64,
    len: i64,
) -> Result<libc::flock, c_int> {
    let (s, l) = map(base, start, len);
    let mut q = lock_req(kind, s, l);
    ofd(carrier(h, owner)?, libc::F_OFD_GETLK, &mut q)?;
    Ok(q)
}

/// Take, change or release a lock on `[start, start + len)` of the file behind `h`.
pub fn set(
    h: &Handle,
    owner: Owner,
    kind: c_int,
    start: i64,
    len: i64,
    wait: bool,
) -> Result<(), c_int> {
    if !matches!(kind, libc::F_RDLCK | libc::F_WRLCK | libc::F_UNLCK) {
        return Err(libc::EINVAL);
    }
    let base = slot(&path_of(h));
    let (s, l) = map(base, start, len);
    lock_range(h, owner, kind, s, l, wait)?;
    if owner == Owner::Process && kind != libc::F_UNLCK {
        held().insert(base);
    }
    Ok(())
}

/// `flock(2)` on a shielded fd: the file's `flock` byte, owned by the open description.
pub fn flock(h: &Handle, op: c_int) -> Result<(), c_int> {
    let kind = match op & !libc::LOCK_NB {
        libc::LOCK_SH => libc::F_RDLCK,
        libc::LOCK_EX => libc::F_WRLCK,
        libc::LOCK_UN => libc::F_UNLCK,
        _ => return Err(libc::EINVAL),
    };
    let base = slot(&path_of(h));
    let wait = op & libc::LOCK_NB == 0;
    lock_range(h, Owner::Description, kind, base + FLOCK_BYTE, 1, wait)
}

/// Lock, relock or unlock `[s, s + l)` of the shared memfd for `owner`: what this process
/// wrote is published before a lock is given up or weakened, and what others committed is
/// loaded after one is taken.
fn lock_range(
    h: &Handle,
    owner: Owner,
    kind: c_int,
    s: i64,
    l: i64,
    wait: bool,
) -> Result<(), c_int> {
    let fd = carrier(h, owner)?;
    if kind != libc::F_WRLCK {
        publish()?;
    }
    let mut q = lock_req(kind, s, l);
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    ofd(fd, cmd, &mut q)?;
    if kind != libc::F_UNLCK {
        after_acquire(h, fd, s, l)?;
    }
    Ok(())
}

/// `lockf(3)` on a shielded fd: record locks from the current offset.
pub fn lockf(h: &Handle, cmd: c_int, len: i64) -> Result<(), c_int> {
    let off = h.lock().unwrap_or_else(|e| e.into_inner()).offset as i64;
    let (start, len) = if len < 0 {
        (off.checked_add(len).ok_or(libc::EINVAL)?, -len)
    } else {
        (off, len)
    };
    if start < 0 {
        return Err(libc::EINVAL);
    }
    match cmd {
        libc::F_LOCK => set(h, Owner::Process, libc::F_WRLCK, start, len, true),
        libc::F_TLOCK => set(h, Owner::Process, libc::F_WRLCK, start, len, false),
        libc::F_ULOCK => set(h, Owner::Process, libc::F_UNLCK, start, len, false),
        libc::F_TEST => {
            let base = slot(&path_of(h));
            let q = conflict(h, Owner::Process, libc::F_WRLCK, base, start, len)?;
            if q.l_type as c_int == libc::F_UNLCK {
                Ok(())
            } else {
                Err(libc::EACCES)
            }
        }
        _ => Err(libc::EINVAL),
    }
}

/// The program closed (or `dup2`ed over) an fd of the file behind `h`: as POSIX says, the
/// process's record locks on the file go (after what it wrote is committed). Nothing to do, and
/// no path hashed, when the process holds no record lock.
pub fn closed(h: &Handle) {
    if held().is_empty() {
        return;
    }
    let base = slot(&h.lock().unwrap_or_else(|e| e.into_inner()).path);
    if !held().contains(&base) {
        return;
    }
    let _ = publish();
    let fd = proc_fd();
    let mut q = lock_req(libc::F_UNLCK, base, RANGE);
    if ofd(fd, libc::F_OFD_SETLK, &mut q).is_ok() {
        held().remove(&base);
    }
}

fn lock_req(kind: c_int, start: i64, len: i64) -> libc::flock {
    // SAFETY: struct flock is plain old data; all-zero is a valid value.
    let mut q: libc::flock = unsafe { std::mem::zeroed() };
    q.l_type = kind as libc::c_short;
    q.l_whence = libc::SEEK_SET as libc::c_short;
    q.l_start = start;
    q.l_len = len;
    q
}

/// One OFD lock command; a wait interrupted by a signal is `EINTR` for the program, as from the
/// kernel (programs time lock waits out with `alarm`).
fn ofd(fd: c_int, cmd: c_int, q: &mut libc::flock) -> Result<(), c_int> {
    // SAFETY: an OFD lock command on our own lock fd with a local struct flock.
    let r = unsafe { real::fcntl(fd, cmd, q as *mut libc::flock as libc::c_ulong) };
    if r == 0 {
        Ok(())
    } else {
        Err(crate::errno())
    }
}

/// Lock taken: load what the previous holder committed, or give the lock back and fail (a
/// holder must never work on a stale copy).
fn after_acquire(h: &Handle, fd: c_int, s: i64, l: i64) -> Result<(), c_int> {
    if let Err(e) = acquired(h) {
        let mut q = lock_req(libc::F_UNLCK, s, l);
        let _ = ofd(fd, libc::F_OFD_SETLK, &mut q);
        return Err(e);
    }
    Ok(())
}

/// Before a `fork`, `exec` or `posix_spawn`: every shielded description gets its lock
/// description now, so that a child that inherits it locks the same one as this process (made
/// at the open, this cost three system calls per open file, most never locked).
pub fn before_children() {
    for h in files::all_handles() {
        let mut f = h.lock().unwrap_or_else(|e| e.into_inner());
        if f.lock.is_none() && !matches!(f.body, Body::Dir) {
            f.lock = LockFd::new();
        }
    }
}

/// Lock fds of shielded files that an `exec` hands over (`FSPF_INHERIT`): inheritable now.
pub fn for_exec(f: &files::OpenFile) -> Option<c_int> {
    let fd = f.lock.as_ref()?.fd();
    // SAFETY: clearing close-on-exec on our own lock fd so the exec'd program inherits it.
    unsafe { real::fcntl(fd, libc::F_SETFD, 0) };
    Some(fd)
}

/// Does this open file take locks through this module (a regular file's body)?
pub fn applies(h: &Handle) -> bool {
    !matches!(h.lock().unwrap_or_else(|e| e.into_inner()).body, Body::Dir)
}

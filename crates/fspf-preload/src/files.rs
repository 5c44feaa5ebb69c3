//! Open shielded files: the fd table (fd → shared open-file description), verified readers,
//! write buffers, and the stat structures the shield synthesises.
use crate::{log, real};
use fspf_core::view::{Node, NodeKind};
use fspf_core::volume::memory::MemReader;
use fspf_core::volume::KernelReader;
use fspf_core::EmbedPath;
use libc::c_int;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

/// Plaintext of a file being written (or written but not yet committed), held in a memfd.
///
/// Every fd of the program that has the file open is a separate open description of this memfd
/// (reopened through `/proc/self/fd`), so the kernel keeps offsets, `O_APPEND`, and sharing
/// across `dup`/`fork` exactly as for a real file, and writes that bypass the hooks (glibc
/// stdio writing a redirected stdout with internal calls) land in it too. At the last close the
/// content is sealed as a new version.
pub struct WriteBuf {
    pub path: EmbedPath,
    /// Backing memfd (close-on-exec, owned).
    pub fd: c_int,
    pub mode: u32,
    /// Set by every hooked write/truncate: the content may differ from the last sealed version.
    pub touched: Arc<AtomicBool>,
    /// Open write descriptions; the version is sealed when this drops to 0.
    pub writers: usize,
    /// Modification time (ns since the epoch).
    pub mtime: i64,
    /// `mtime` was set by `futimens`/`utimensat` and is what the sealed version records.
    pub mtime_set: bool,
    /// The committed version this buffer was loaded from (file id, length), when it was; with
    /// `append_only`, what another process of the run committed meanwhile can be kept (the
    /// appended bytes are rebased onto it at commit: two processes appending to one log).
    pub base: Option<(fspf_core::Version, u64)>,
    /// No hooked write or truncation touched the first `base` bytes since the load.
    pub append_only: AtomicBool,
    /// The memfd is mapped `MAP_SHARED` writable: writes through the mapping bypass every hook
    /// and may not update the memfd's times, so the buffer is always compared when sealed.
    pub mapped_shared: bool,
    /// Another process may write this buffer's memfd (it was inherited across `fork`, `exec`
    /// or `posix_spawn`): writes no longer all pass this process's hooks, so appends are not
    /// tracked (and never rebased) for it.
    pub shared: bool,
    /// Unlinked or replaced while open: never sealed again.
    pub detached: bool,
    /// Its latest version is staged but not committed: reads must come from this buffer.
    pub pending: bool,
    /// (size, hash) of the content when last loaded or sealed; catches writes that bypassed
    /// the hooks.
    pub print: (u64, u64),
    /// The owner the fspf records for the file (kept by every new version).
    pub owner: Option<fspf_core::format::metadata::Owner>,
    /// The committed version the content equals (loaded from it, or sealed and committed as
    /// it), whatever the append tracking: a clean buffer whose path has a newer version is
    /// reloaded when the process takes a lock on it.
    pub version: Option<fspf_core::Version>,
    /// The buffer is the run's shared buffer of the file (`runbuf.rs`), not a private memfd:
    /// other processes of the run write it too, and it is always current.
    pub mirror: bool,
    /// What this process's hooks changed since the buffer equalled `version` (loaded, or
    /// staged): the next seal of a format-2 file is then an in-place update of those bytes
    /// (FORMAT.md §5b). Valid only while the buffer's size and times are those after the last
    /// tracked change ([`WriteBuf::tracked`]): any other writer (another process of the run on
    /// a shared buffer, a child that inherited it, a raw system call) changes them, and the
    /// shield then compares the buffer with the committed state instead. `None` once the
    /// buffer is mapped writable and shared (writes through a map need not move the times).
    pub track: Option<Track>,
    /// This process's view of the buffer's unloaded offset: below `n`, the holes of the memfd
    /// were never loaded and equal the committed file (`opening::leave_unloaded`); `0`: the
    /// whole content is in the buffer. The buffer file's [`UNLOADED_XATTR`] is the truth every
    /// process of the run shares: a process that loads everything removes it, so this hint can
    /// only be stale in the safe direction (checked again before use).
    pub unloaded: AtomicU64,
    /// Ranges of the buffer this process found not to be holes: holes only ever shrink (they
    /// are loaded or written, never made again while the buffer lives), so a range found once
    /// stays so, and [`WriteBuf::hole_in`] asks the kernel (whose `SEEK_HOLE` walks every page
    /// of a data run) once per range and process.
    known_data: Mutex<BTreeMap<u64, u64>>,
    /// The verified reader of the committed version holes are loaded from, kept while that
    /// version is the committed one (`opening::load_holes`).
    pub hole_reader: Option<(fspf_core::Version, KernelReader)>,
    /// This process's own open description of the buffer file for [`UnloadedLock`] (pid, fd):
    /// see [`WriteBuf::lock_fd`].
    lock_desc: Mutex<LockDesc>,
    /// A stream may seal this buffer while it is written (`stream.rs`; the buffer file carries
    /// its record): every hooked access takes the buffer's [`UnloadedLock`], and holes may be
    /// made again (by a stream's pieces), so what this process knew of them is checked against
    /// the record's generation.
    pub streamable: bool,
    /// This process's handle on the buffer's stream, when it sealed or resumed it.
    pub stream: Option<fspf_core::volume::StreamStage>,
    /// The record generation [`WriteBuf::known_data`] and the `unloaded` hint are valid for
    /// (the unloaded offset only rises with a new generation).
    pub stream_gen: u64,
    /// Bytes this process wrote since it last looked whether a piece is due.
    pub stream_unchecked: u64,
    /// The stream was finished and staged (its sealed end, and the lock held until the commit
    /// that makes its holes committed content).
    pub stream_staged: Option<(u64, UnloadedLock)>,
}

/// Extended attribute on a buffer's file (memfd or the run's shared buffer) with parts not
/// loaded: the offset below which its holes are unloaded content, in decimal. Set before the
/// buffer is complete (`runbuf::loaded`), moved down by a truncation below it, removed under
/// [`UnloadedLock`] by whoever loads everything.
const UNLOADED_XATTR: &std::ffi::CStr = c"user.fspf.unloaded";

/// While part of a buffer is unloaded: the buffer file's size, its modification time (ns) and
/// the bytes below the unloaded offset that are not holes (3 x u64, little-endian), after the
/// last change the shield made or saw (a hooked write or truncation, a load), in every process
/// of the run. A change by anything else (a raw system call) moves the first two; if it also
/// filled a hole (the third no longer matches), the hole's other bytes are zeros the shield
/// cannot tell from content, and the buffer is refused from then on ([`UNSEEN_XATTR`]).
/// (The change time is left out: setting this attribute moves it.)
const SEEN_XATTR: &std::ffi::CStr = c"user.fspf.seen";
/// Set once a change the shield did not see was found while part of the buffer is unloaded.
const UNSEEN_XATTR: &std::ffi::CStr = c"user.fspf.unseen";

/// An OFD write lock on one byte far past any buffer's end, serialising the loads of a
/// buffer's unloaded parts (and the changes while there are some) between the processes and
/// threads holding it (independent of the `flock` that `runbuf` holds shared on the same
/// file, and of the program's own locks, which the shield takes elsewhere: `locks.rs`). An OFD
/// lock belongs to an open description, which every thread of a process shares (and one
/// thread's unlock would release it for all): within a process the threads take turns here
/// first. A thread that holds it may take it again (the truncation paths do).
/// Lock order: the shield's lock, then a buffer's mutex, then this.
pub struct UnloadedLock(c_int);

/// Per lock description of this process: the thread holding it and how many times.
static HOLDS: Mutex<BTreeMap<c_int, (std::thread::ThreadId, usize)>> = Mutex::new(BTreeMap::new());
static FREED: std::sync::Condvar = std::sync::Condvar::new();

impl UnloadedLock {
    const AT: i64 = i64::MAX - 1;

    fn flock(kind: c_int) -> libc::flock {
        byte_lock(kind, Self::AT)
    }

    pub fn take(fd: c_int) -> Result<UnloadedLock, c_int> {
        let me = std::thread::current().id();
        let mut holds = HOLDS.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match holds.get_mut(&fd) {
                Some((t, n)) if *t == me => {
                    *n += 1;
                    return Ok(UnloadedLock(fd));
                }
                Some(_) => holds = FREED.wait(holds).unwrap_or_else(|e| e.into_inner()),
                None => break,
            }
        }
        holds.insert(fd, (me, 1));
        drop(holds);
        let mut fl = Self::flock(libc::F_WRLCK);
        loop {
            // SAFETY: F_OFD_SETLKW with a pointer to a local struct flock.
            let r = unsafe {
                real::fcntl(
                    fd,
                    libc::F_OFD_SETLKW,
                    &mut fl as *mut libc::flock as libc::c_ulong,
                )
            };
            if r == 0 {
                return Ok(UnloadedLock(fd));
            }
            let e = crate::errno();
            if e != libc::EINTR {
                let mut holds = HOLDS.lock().unwrap_or_else(|e| e.into_inner());
                holds.remove(&fd);
                FREED.notify_all();
                return Err(e);
            }
        }
    }
}

impl Drop for UnloadedLock {
    fn drop(&mut self) {
        let mut holds = HOLDS.lock().unwrap_or_else(|e| e.into_inner());
        let Some((_, n)) = holds.get_mut(&self.0) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        holds.remove(&self.0);
        let mut fl = Self::flock(libc::F_UNLCK);
        // SAFETY: F_OFD_SETLK with a pointer to a local struct flock, on the fd we locked.
        unsafe {
            real::fcntl(
                self.0,
                libc::F_OFD_SETLK,
                &mut fl as *mut libc::flock as libc::c_ulong,
            )
        };
        FREED.notify_all();
    }
}

/// The unloaded offset recorded on buffer file `fd` ([`UNLOADED_XATTR`]); 0 when none.
pub fn unloaded_on_file(fd: c_int) -> u64 {
    let mut v = [0u8; 24];
    // SAFETY: reading an attribute of our own fd into a local buffer of that length.
    let n = unsafe { real::fgetxattr(fd, UNLOADED_XATTR.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    if n <= 0 {
        return 0;
    }
    std::str::from_utf8(&v[..n as usize])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// What the hooks wrote since the buffer last equalled a committed or staged state.
#[derive(Debug, Clone)]
pub struct Track {
    pub written: fspf_core::session::Written,
    /// The memfd's size and times after the last tracked change: a differing print when the
    /// buffer is sealed means a write this process's hooks did not see.
    pub print: (u64, u64),
}

impl WriteBuf {
    /// A buffer on `fd` (owned from now on) that holds nothing this process wrote yet.
    /// `shared`: other processes may write the file without this process's hooks.
    fn on_fd(path: EmbedPath, fd: c_int, mode: u32, mtime: i64, shared: bool) -> WriteBuf {
        WriteBuf {
            path,
            fd,
            mode,
            touched: Arc::new(AtomicBool::new(false)),
            writers: 0,
            mtime,
            mtime_set: false,
            base: None,
            append_only: AtomicBool::new(false),
            shared,
            mapped_shared: false,
            detached: false,
            pending: false,
            print: (0, fingerprint_bytes(&[])),
            owner: None,
            version: None,
            mirror: false,
            track: None,
            unloaded: AtomicU64::new(0),
            known_data: Mutex::new(BTreeMap::new()),
            hole_reader: None,
            lock_desc: Mutex::new(LockDesc::default()),
            streamable: false,
            stream: None,
            stream_gen: 0,
            stream_unchecked: 0,
            stream_staged: None,
        }
    }

    /// Forget the ranges found to be data (a stream's piece made holes again).
    pub fn forget_known_data(&self) {
        self.known_data
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The offset below which this buffer's holes are unloaded (0: none), after checking the
    /// buffer file when this process's hint says there may be some.
    pub fn unloaded(&self) -> u64 {
        if self.unloaded.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        let n = unloaded_on_file(self.fd);
        self.unloaded.store(n, Ordering::Relaxed);
        n
    }

    /// This process's view of the unloaded offset without reading the buffer file again: what
    /// [`WriteBuf::unloaded`] last read, or this process set. For the helpers below, called
    /// under [`UnloadedLock`] after the caller read [`WriteBuf::unloaded`] (which changes only
    /// under that lock, and only downwards once the buffer is made).
    fn unloaded_hint(&self) -> u64 {
        self.unloaded.load(Ordering::Relaxed)
    }

    /// Leave the holes below `n` unloaded (equal to the committed file): recorded on the
    /// buffer file for every process that shares it. False when the file system cannot record it
    /// (user extended attributes on tmpfs need Linux 6.6): the caller loads everything.
    pub fn mark_unloaded(&self, n: u64) -> bool {
        let v = n.to_string();
        // SAFETY: setting an attribute on our own fd from a local string.
        let r = unsafe {
            real::fsetxattr(
                self.fd,
                UNLOADED_XATTR.as_ptr(),
                v.as_ptr().cast(),
                v.len(),
                0,
            )
        };
        if r != 0 {
            return false;
        }
        self.unloaded.store(n, Ordering::Relaxed);
        true
    }

    /// The whole content is in the buffer now (loaded, or rewritten whole).
    pub fn mark_loaded(&self) {
        if self.unloaded.swap(0, Ordering::Relaxed) != 0 {
            // SAFETY: removing attributes of our own fd.
            unsafe {
                real::fremovexattr(self.fd, UNLOADED_XATTR.as_ptr());
                real::fremovexattr(self.fd, SEEN_XATTR.as_ptr());
                real::fremovexattr(self.fd, UNSEEN_XATTR.as_ptr());
            }
        }
    }

    /// An open description of the buffer file that is this process's own, for
    /// [`UnloadedLock`]: OFD locks exclude other descriptions only, and a child made by `fork`
    /// shares its parent's description of `fd` (their locks would not exclude each other). Made
    /// at a process's first lock, and again when the program closed or replaced its number.
    pub fn lock_fd(&self) -> Result<c_int, c_int> {
        let pid = std::process::id();
        let mut d = self.lock_desc.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = d.ours(pid) {
            return Ok(fd);
        }
        // (A number the program closed or replaced, or inherited from the parent's process, is
        // left to the program.)
        let fd = move_high(self.reopen(libc::O_RDWR | libc::O_CLOEXEC)?, true);
        *d = LockDesc {
            pid,
            fd,
            file: file_id(fd),
        };
        Ok(fd)
    }

    /// The unit the buffer file allocates in (`st_blksize`: the page, or a huge page).
    pub fn page_size(&self) -> Option<u64> {
        fstat_of(self.fd).map(|st| st.st_blksize as u64)
    }

    /// The buffer file's size and modification time now ([`SEEN_XATTR`]).
    fn stat_seen(&self) -> Option<(u64, u64)> {
        let st = fstat_of(self.fd)?;
        let t = (st.st_mtime as u64)
            .wrapping_mul(1_000_000_000)
            .wrapping_add(st.st_mtime_nsec as u64);
        Some((st.st_size as u64, t))
    }

    /// What [`WriteBuf::record_seen`] recorded last: size, modification time, loaded bytes below
    /// the unloaded end.
    fn recorded_seen(&self) -> Option<(u64, u64, u64)> {
        let mut v = [0u8; 24];
        // SAFETY: reading an attribute of our own fd into a local buffer of its length.
        let n = unsafe {
            real::fgetxattr(self.fd, SEEN_XATTR.as_ptr(), v.as_mut_ptr().cast(), v.len())
        };
        if n != 24 {
            return None;
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&v[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        Some((word(0), word(1), word(2)))
    }

    /// Bytes of `[0, n)` that are not holes (loaded or written).
    fn data_below(&self, n: u64) -> u64 {
        n - self.holes_in(0, n).iter().map(|(h, d)| d - h).sum::<u64>()
    }

    /// Record the buffer file as it is now as seen, while part of it is unloaded (under
    /// [`UnloadedLock`], after a change the shield made that filled `filled` bytes of holes
    /// below the unloaded end; `None`: count them again, after the end moved).
    pub fn record_seen(&self, filled: Option<u64>) {
        let n = self.unloaded_hint();
        if n == 0 {
            return;
        }
        let below = match (filled, self.recorded_seen()) {
            (Some(f), Some((_, _, b))) => (b + f).min(n),
            _ => self.data_below(n),
        };
        if let Some((size, t)) = self.stat_seen() {
            let mut v = [0u8; 24];
            v[..8].copy_from_slice(&size.to_le_bytes());
            v[8..16].copy_from_slice(&t.to_le_bytes());
            v[16..].copy_from_slice(&below.to_le_bytes());
            // SAFETY: setting an attribute on our own fd from a local buffer.
            unsafe { real::fsetxattr(self.fd, SEEN_XATTR.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
        }
    }

    /// Something changed the buffer unseen while part of it is unloaded, and wrote into an
    /// unloaded hole (now, or earlier: the finding is recorded on the buffer file for every
    /// process). A change the shield did not see that filled no hole (a raw write appended, or
    /// over loaded bytes) is accepted and recorded as seen. Under [`UnloadedLock`].
    pub fn changed_unseen(&self) -> bool {
        let n = self.unloaded_hint();
        if n == 0 {
            return false;
        }
        // SAFETY: asking for an attribute's presence on our own fd.
        if unsafe { real::fgetxattr(self.fd, UNSEEN_XATTR.as_ptr(), std::ptr::null_mut(), 0) } >= 0
        {
            return true;
        }
        let recorded = self.recorded_seen();
        let now = self.stat_seen();
        match (recorded, now) {
            (Some((size, t, _)), Some(now)) if (size, t) == now => return false,
            (Some((_, _, below)), Some(_)) if self.data_below(n) == below => {
                self.record_seen(Some(0));
                return false;
            }
            _ => {}
        }
        // SAFETY: setting an attribute on our own fd.
        unsafe { real::fsetxattr(self.fd, UNSEEN_XATTR.as_ptr(), c"1".as_ptr().cast(), 1, 0) };
        // Said once (the attribute above marks it), always: changes are lost because of it.
        crate::say(format!(
            "{}: written into a part the shield had not loaded by a write it did not see (a raw system call?): the file can no longer be read or committed from this run (FSPF_LAZY_RDWR=0 loads such files whole at their open)",
            self.path
        ));
        true
    }

    /// The unloaded holes of the buffer within `[from, to)` (page-aligned, in order).
    pub fn holes_in(&self, from: u64, to: u64) -> Vec<(u64, u64)> {
        let to = to.min(self.unloaded_hint());
        let mut out = Vec::new();
        let mut at = from;
        while at < to {
            let h = self.next_hole(at);
            if h >= to {
                break;
            }
            // SAFETY: seeking our own fd (the buffer's own description: its offset is ours).
            let d = unsafe { real::lseek(self.fd, h as i64, libc::SEEK_DATA) };
            let end = if d < 0 { to } else { (d as u64).min(to) };
            out.push((h, end));
            at = end;
        }
        out
    }

    /// Is any of `[from, to)` an unloaded hole?
    pub fn hole_in(&self, from: u64, to: u64) -> bool {
        let to = to.min(self.unloaded());
        from < to && self.next_hole(from) < to
    }

    /// The first hole of the memfd at or after `at` (its length when there is none). What lies
    /// before it is recorded in [`WriteBuf::known_data`] and not asked again.
    fn next_hole(&self, at: u64) -> u64 {
        let mut known = self.known_data.lock().unwrap_or_else(|e| e.into_inner());
        let at = match known.range(..=at).next_back() {
            Some((_, &end)) if end > at => end,
            _ => at,
        };
        // SAFETY: seeking our own fd (the buffer's own description: its offset is ours).
        let h = unsafe { real::lseek(self.fd, at as i64, libc::SEEK_HOLE) };
        if h < 0 {
            return at;
        }
        let h = h as u64;
        if h > at {
            // [at, h) is data, and stays so; joined with the known ranges it touches.
            let start = match known.range(..=at).next_back() {
                Some((&s, &e)) if e >= at => s,
                _ => at,
            };
            let inside: Vec<(u64, u64)> = known.range(start..=h).map(|(&s, &e)| (s, e)).collect();
            let end = inside.iter().map(|&(_, e)| e).fold(h, u64::max);
            for (s, _) in inside {
                known.remove(&s);
            }
            known.insert(start, end);
        }
        h
    }

    /// The memfd's size and times now (see [`Track::print`]).
    pub fn stat_now(&self) -> Option<(u64, u64)> {
        fstat_of(self.fd).map(|st| (st.st_size as u64, stat_print(&st)))
    }

    /// The buffer now equals a committed or staged state: track changes from here, if this
    /// process sees every write to it.
    pub fn start_tracking(&mut self) {
        let now = self.stat_now();
        self.start_tracking_from(now);
    }

    /// [`WriteBuf::start_tracking`] from the state `print` ([`WriteBuf::stat_now`]) that was
    /// taken before the content was read for staging: a write since then changed the memfd's
    /// times, so [`WriteBuf::tracked`] refuses the record and nothing is missed.
    pub fn start_tracking_from(&mut self, print: Option<(u64, u64)>) {
        // Buffers of at most TRACK_MIN bytes are never format 2 when sealed: no record (and
        // no `fstat` per write) for them. One that grows past it is sealed whole once, and
        // tracked from that seal on.
        self.track = if self.mapped_shared {
            None
        } else {
            print.filter(|p| p.0 > TRACK_MIN).map(|print| Track {
                written: fspf_core::session::Written::new(print.0),
                print,
            })
        };
    }

    /// A hooked write put `len` bytes at `off`.
    pub fn note_write(&mut self, off: u64, len: u64) {
        let now = self.stat_now();
        match (&mut self.track, now) {
            (Some(t), Some(p)) => {
                t.written.add(off, len);
                t.print = p;
            }
            _ => self.track = None,
        }
    }

    /// A hooked truncation set the length to `len`.
    pub fn note_len(&mut self, len: u64) {
        let now = self.stat_now();
        match (&mut self.track, now) {
            (Some(t), Some(p)) => {
                t.written.set_len(len);
                t.print = p;
            }
            _ => self.track = None,
        }
    }

    /// The tracked changes, if they are all the changes (nothing wrote the buffer unseen).
    pub fn tracked(&self) -> Option<&Track> {
        let t = self.track.as_ref()?;
        (self.stat_now() == Some(t.print) && !self.mapped_shared).then_some(t)
    }

    /// An empty buffer for `path`.
    pub fn create(path: EmbedPath, mode: u32, mtime: i64) -> Result<WriteBuf, c_int> {
        let mut name = b"fspf-buf:".to_vec();
        name.extend(
            path.file_name()
                .iter()
                .copied()
                .filter(|&c| c != 0)
                .take(200),
        );
        name.push(0);
        // SAFETY: `name` is NUL-terminated; the fd is owned by the new WriteBuf.
        let fd = unsafe { libc::memfd_create(name.as_ptr().cast(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(crate::errno());
        }
        Ok(WriteBuf::on_fd(
            path,
            move_high(fd, true),
            mode,
            mtime,
            false,
        ))
    }

    /// A buffer on the run's shared buffer file `fd` (`runbuf::open`/`existing`; owned from now
    /// on). `joined`: another process made it, its content is current (a fresh one is empty).
    pub fn shared_file(
        path: EmbedPath,
        fd: c_int,
        mode: u32,
        mtime: i64,
        joined: bool,
    ) -> Result<WriteBuf, c_int> {
        let mut b = WriteBuf::on_fd(path, move_high(fd, true), mode, mtime, true);
        b.mirror = true;
        if joined {
            b.unloaded.store(unloaded_on_file(b.fd), Ordering::Relaxed);
            b.streamable = crate::stream::is_streamable(b.fd);
            b.print = b.fingerprint()?;
        }
        Ok(b)
    }

    /// Adopt an inherited memfd. The buffer keeps its own read-write open of it: the inherited
    /// fd may be write-only (`cmd > /data/f` hands the program an `O_WRONLY` stdout), and the
    /// final seal must read the plaintext back.
    pub fn adopt(path: EmbedPath, fd: c_int, mode: u32, mtime: i64) -> Result<WriteBuf, c_int> {
        let proc_path =
            std::ffi::CString::new(format!("/proc/self/fd/{fd}")).map_err(|_| libc::EINVAL)?;
        // SAFETY: reopening the inherited memfd by its /proc name; NUL-terminated path.
        let rw = unsafe { real::open(proc_path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC, 0) };
        if rw < 0 {
            return Err(crate::errno());
        }
        // SAFETY: moving our fresh descriptor out of the program's way.
        let own = unsafe { real::fcntl(rw, libc::F_DUPFD_CLOEXEC, OWN_FD_BASE as libc::c_ulong) };
        // SAFETY: closing the temporary descriptor we just opened.
        unsafe { real::close(rw) };
        if own < 0 {
            return Err(crate::errno());
        }
        let mut b = WriteBuf::on_fd(path, own, mode, mtime, true);
        if crate::runbuf::is_buffer_file(own) {
            // The run's shared buffer, handed over by exec: hold it like its other holders.
            b.mirror = crate::runbuf::hold(own);
        }
        b.unloaded.store(unloaded_on_file(own), Ordering::Relaxed);
        b.streamable = b.mirror && crate::stream::is_streamable(own);
        b.print = b.fingerprint()?;
        Ok(b)
    }

    pub fn len(&self) -> u64 {
        // SAFETY: fstat of our own fd into a local buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { real::fstat(self.fd, &mut st) } == 0 {
            st.st_size as u64
        } else {
            0
        }
    }

    /// Read exactly `out.len()` bytes at `off` (`EIO` at the end of the buffer).
    pub fn read_exact_at(&self, out: &mut [u8], off: u64) -> Result<(), c_int> {
        let mut done = 0;
        while done < out.len() {
            match self.read_at(&mut out[done..], off + done as u64)? {
                0 => return Err(libc::EIO),
                n => done += n,
            }
        }
        Ok(())
    }

    pub fn read_at(&self, out: &mut [u8], off: u64) -> Result<usize, c_int> {
        if !out.is_empty() && self.hole_in(off, off.saturating_add(out.len() as u64)) {
            // Every path that reads the content loads what it reads first
            // (`opening::load_holes`): this would return zeros for committed bytes.
            log(format!(
                "{}: read of an unloaded part of the buffer at {off} refused",
                self.path
            ));
            return Err(libc::EIO);
        }
        if self.streamable && !out.is_empty() && off < crate::stream::sealed_end(self.fd) {
            // Likewise below a stream's sealed part (its pages are punched out): every path
            // that reads there commits the stream or reads it back first.
            log(format!(
                "{}: read below the part sealed while written at {off} refused",
                self.path
            ));
            return Err(libc::EIO);
        }
        // SAFETY: reading into the caller's buffer from our own fd.
        let n = unsafe { real::pread(self.fd, out.as_mut_ptr().cast(), out.len(), off as i64) };
        if n < 0 {
            Err(crate::errno())
        } else {
            Ok(n as usize)
        }
    }

    /// Write `data` at `off`: content the shield loads or replaces, never a program's write
    /// (those go through the program's descriptions), so the append tracking is left alone.
    pub fn write_all_at(&self, data: &[u8], off: u64) -> Result<(), c_int> {
        if off.saturating_add(data.len() as u64) > MAX_BUFFER_LEN {
            return Err(libc::EFBIG);
        }
        pwrite_all(self.fd, data, off)
    }

    pub fn set_len(&self, len: u64) -> Result<(), c_int> {
        if len > MAX_BUFFER_LEN {
            return Err(libc::EFBIG);
        }
        if self.base.is_some_and(|(_, base)| len < base) {
            self.append_only.store(false, Ordering::Relaxed);
        }
        // SAFETY: truncating our own fd.
        if unsafe { real::ftruncate(self.fd, len as i64) } != 0 {
            return Err(crate::errno());
        }
        if len == 0 {
            // Nothing is left unloaded.
            self.mark_loaded();
        }
        self.touched.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The whole plaintext.
    pub fn contents(&self) -> Result<Vec<u8>, c_int> {
        let len = usize::try_from(self.len()).map_err(|_| libc::EFBIG)?;
        let mut v = vec![0u8; len];
        let mut done = 0;
        while done < len {
            let n = self.read_at(&mut v[done..], done as u64)?;
            if n == 0 {
                v.truncate(done);
                break;
            }
            done += n;
        }
        Ok(v)
    }

    /// (size, hash) identifying the current content. Buffers up to [`HASH_MAX`] bytes hash
    /// their content; larger ones their size and the memfd's modification and change times,
    /// O(1) instead of a read and hash of the whole buffer at every close and commit. Every
    /// write to a memfd, also one that bypasses the hooks, updates those times, and the kernel
    /// hands out fine-grained times to files whose times were queried (multigrain timestamps),
    /// so a write after a fingerprint changes it.
    pub fn fingerprint(&self) -> Result<(u64, u64), c_int> {
        let st = fstat_of(self.fd).ok_or_else(crate::errno)?;
        let size = st.st_size as u64;
        if size <= HASH_MAX {
            let c = self.contents()?;
            return Ok((c.len() as u64, fingerprint_bytes(&c)));
        }
        Ok((size, stat_print(&st)))
    }

    /// Does the content need sealing (changed since it was loaded or last sealed)?
    pub fn needs_seal(&self) -> bool {
        if self.detached {
            return false;
        }
        if self.touched.load(Ordering::Relaxed) || self.mapped_shared {
            return true;
        }
        self.fingerprint().ok().is_none_or(|p| p != self.print)
    }

    /// Record `content` as the sealed (or loaded) state.
    pub fn mark_sealed(&mut self, content: &[u8]) {
        self.touched.store(false, Ordering::Relaxed);
        if content.len() as u64 <= HASH_MAX {
            self.print = (content.len() as u64, fingerprint_bytes(content));
        } else {
            self.print = self.fingerprint().unwrap_or((u64::MAX, 0));
        }
    }

    /// Record `print` (taken before the content was read for sealing) as the sealed state.
    pub fn mark_sealed_print(&mut self, print: (u64, u64)) {
        self.touched.store(false, Ordering::Relaxed);
        self.print = print;
    }

    /// A reader of the buffer's content from offset 0 (pread on the memfd: no copy of the
    /// whole file in memory).
    pub fn reader(&self) -> BufReader {
        BufReader {
            fd: self.fd,
            off: 0,
        }
    }

    /// A new open description of the buffer for the program (`flags`: access mode, O_APPEND,
    /// O_CLOEXEC).
    pub fn reopen(&self, flags: c_int) -> Result<c_int, c_int> {
        let p = std::ffi::CString::new(format!("/proc/self/fd/{}", self.fd))
            .map_err(|_| libc::EINVAL)?;
        let fl = flags & (libc::O_ACCMODE | libc::O_APPEND | libc::O_CLOEXEC);
        // SAFETY: NUL-terminated path to our own memfd.
        let fd = unsafe { real::open(p.as_ptr(), fl, 0) };
        if fd < 0 {
            Err(crate::errno())
        } else {
            Ok(fd)
        }
    }
}

/// A process's own open description of a buffer file ([`WriteBuf::lock_fd`]).
#[derive(Default)]
struct LockDesc {
    pid: u32,
    fd: c_int,
    /// The file it was opened on (device, inode).
    file: Option<(u64, u64)>,
}

impl LockDesc {
    /// The description's fd, if this process made it and the number still names it.
    fn ours(&self, pid: u32) -> Option<c_int> {
        (self.pid == pid && self.file.is_some() && file_id(self.fd) == self.file).then_some(self.fd)
    }
}

/// `fstat` of `fd` (the shield's own), unseen by the hooks.
/// Write all of `data` at `off` to our own `fd` (glibc's `pwrite`, not the hook), again after
/// a short write or `EINTR`.
pub fn pwrite_all(fd: c_int, mut data: &[u8], mut off: u64) -> Result<(), c_int> {
    while !data.is_empty() {
        // SAFETY: writing the caller's bytes to our own fd.
        let n = unsafe { real::pwrite(fd, data.as_ptr().cast(), data.len(), off as i64) };
        match n {
            n if n > 0 => {
                data = &data[n as usize..];
                off += n as u64;
            }
            0 => return Err(libc::EIO),
            _ if crate::errno() == libc::EINTR => {}
            _ => return Err(crate::errno()),
        }
    }
    Ok(())
}

/// Fill `out` from `off` of our own `fd` (glibc's `pread`); `EIO` at its end.
pub fn pread_exact(fd: c_int, out: &mut [u8], mut off: u64) -> Result<(), c_int> {
    let mut done = 0;
    while done < out.len() {
        // SAFETY: reading into the rest of the caller's buffer from our own fd.
        let n = unsafe {
            real::pread(
                fd,
                out[done..].as_mut_ptr().cast(),
                out.len() - done,
                off as i64,
            )
        };
        match n {
            n if n > 0 => {
                done += n as usize;
                off += n as u64;
            }
            0 => return Err(libc::EIO),
            _ if crate::errno() == libc::EINTR => {}
            _ => return Err(crate::errno()),
        }
    }
    Ok(())
}

/// A one-byte `struct flock` of type `kind` at `at` (the OFD locks on a buffer's file).
pub fn byte_lock(kind: c_int, at: i64) -> libc::flock {
    // SAFETY: a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = at;
    fl.l_len = 1;
    fl
}

fn fstat_of(fd: c_int) -> Option<libc::stat> {
    // SAFETY: a plain C struct; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat into the local buffer above.
    (unsafe { real::fstat(fd, &mut st) } == 0).then_some(st)
}

/// The file `fd` names (device, inode).
fn file_id(fd: c_int) -> Option<(u64, u64)> {
    fstat_of(fd).map(|st| (st.st_dev, st.st_ino))
}

impl Drop for WriteBuf {
    fn drop(&mut self) {
        let d = self.lock_desc.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = d.ours(std::process::id()) {
            // SAFETY: closing this process's lock description of the buffer.
            unsafe { real::close(fd) };
        }
        forget_own(self.fd);
        if self.mirror {
            crate::runbuf::release(&self.path, self.fd);
            return;
        }
        // SAFETY: closing the memfd this buffer owns.
        unsafe { real::close(self.fd) };
    }
}

/// Buffers' backing fds live from here up, out of the way of programs (and protected from
/// their `close`, `close_range` and `dup2`).
const OWN_FD_BASE: c_int = 800;

static OWN: Mutex<BTreeMap<c_int, Weak<Mutex<WriteBuf>>>> = Mutex::new(BTreeMap::new());
static N_OWN: AtomicUsize = AtomicUsize::new(0);

fn own_map() -> std::sync::MutexGuard<'static, BTreeMap<c_int, Weak<Mutex<WriteBuf>>>> {
    OWN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Move `fd` to a free number >= OWN_FD_BASE (the original is closed). Keeps `fd` on failure.
fn move_high(fd: c_int, cloexec: bool) -> c_int {
    let cmd = if cloexec {
        libc::F_DUPFD_CLOEXEC
    } else {
        libc::F_DUPFD
    };
    // SAFETY: duplicating our own fd.
    let n = unsafe { real::fcntl(fd, cmd, OWN_FD_BASE as libc::c_ulong) };
    if n < 0 {
        return fd;
    }
    // SAFETY: closing the low number of our own fd.
    unsafe { real::close(fd) };
    n
}

/// Register a buffer's backing fd as the shield's own.
pub fn register_own(b: &Arc<Mutex<WriteBuf>>) {
    let fd = b.lock().unwrap_or_else(|e| e.into_inner()).fd;
    if own_map().insert(fd, Arc::downgrade(b)).is_none() {
        N_OWN.fetch_add(1, Ordering::Relaxed);
    }
}

fn forget_own(fd: c_int) {
    if own_map().remove(&fd).is_some() {
        N_OWN.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Is `fd` the backing fd of a buffer?
pub fn is_own(fd: c_int) -> bool {
    N_OWN.load(Ordering::Relaxed) > 0 && own_map().contains_key(&fd)
}

/// Backing fds in `first..=last`.
pub fn own_in(first: c_int, last: c_int) -> Vec<c_int> {
    if N_OWN.load(Ordering::Relaxed) == 0 {
        return Vec::new();
    }
    own_map().range(first..=last).map(|(k, _)| *k).collect()
}

/// Before the program dup2()s onto `target`: if it is a buffer's backing fd, move the buffer
/// to another number first.
pub fn protect_own(target: c_int) {
    if !is_own(target) {
        return;
    }
    let Some(b) = own_map().get(&target).and_then(Weak::upgrade) else {
        return;
    };
    let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: duplicating our own fd to a new high number.
    let n = unsafe { real::fcntl(g.fd, libc::F_DUPFD_CLOEXEC, (target + 1) as libc::c_ulong) };
    if n < 0 {
        return;
    }
    forget_own(target);
    g.fd = n;
    drop(g);
    register_own(&b);
    // The old number is about to be replaced by the program's dup2.
}

/// The largest file the shield writes (`fspf_core::session::MAX_FILE_LEN`).
pub const MAX_BUFFER_LEN: u64 = fspf_core::session::MAX_FILE_LEN;

/// Buffers up to this size are fingerprinted by content, larger ones by their times.
pub const HASH_MAX: u64 = 1 << 20;

/// Smallest buffer whose writes are recorded for an in-place update: format 2 starts above 16
/// chunks (`FORMAT2_MIN_CHUNKS`), and chunks are at least 512 bytes.
const TRACK_MIN: u64 =
    fspf_core::format::tree::FORMAT2_MIN_CHUNKS * fspf_core::format::layout::MIN_CHUNK_LEN as u64;

/// Sequential reader over a buffer's memfd.
pub struct BufReader {
    fd: c_int,
    off: u64,
}

impl std::io::Read for BufReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: reading into the caller's buffer from the buffer's own fd.
        let n =
            unsafe { real::pread(self.fd, out.as_mut_ptr().cast(), out.len(), self.off as i64) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.off += n as u64;
        Ok(n as usize)
    }
}

fn stat_print(st: &libc::stat) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        st.st_mtime,
        st.st_mtime_nsec,
        st.st_ctime,
        st.st_ctime_nsec,
        st.st_ino,
    )
        .hash(&mut h);
    h.finish()
}

fn fingerprint_bytes(b: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

pub enum Body {
    /// Read-only, lazily verified chunk by chunk.
    Kernel(Box<KernelReader>),
    Mem(Box<MemReader>),
    /// Ephemeral not-protected file (read-only snapshot).
    Plain(Arc<Vec<u8>>),
    Buf(Arc<Mutex<WriteBuf>>),
    Dir,
}

/// One open file description (shared across dup'd fds, like the kernel's).
pub struct OpenFile {
    pub path: EmbedPath,
    pub offset: u64,
    pub read: bool,
    pub write: bool,
    pub append: bool,
    pub body: Body,
    pub mode: u32,
    pub kernel: Option<fspf_core::volume::KernelPath>,
    /// For buffers (`Body::Buf`): I/O on the program's fd goes straight to the kernel (it is a
    /// description of the buffer's memfd); writes set this flag.
    pub touched: Option<Arc<AtomicBool>>,
    /// The description's own lock fd (OFD locks, `flock`; `locks.rs`): made at a writable
    /// open, else at the first such lock.
    pub lock: Option<Arc<crate::locks::LockFd>>,
}

pub type Handle = Arc<Mutex<OpenFile>>;

/// Set the length of buffer `g` (whose mutex the caller holds) for a description that may
/// write it: a hooked truncation or allocation.
pub fn set_len_locked(g: &mut WriteBuf, len: u64) -> Result<(), c_int> {
    if g.track.is_some() && g.tracked().is_none() {
        // Written unseen since the last tracked change (see `fdio::do_write`).
        g.track = None;
    }
    // Parts unloaded: changed and recorded as seen under the buffer's unloaded lock (taken
    // again by the thread that holds it for `opening::before_truncate`).
    let _lazy = if g.unloaded() > 0 {
        Some(UnloadedLock::take(g.lock_fd()?)?)
    } else {
        None
    };
    g.set_len(len)?;
    g.record_seen(None);
    g.note_len(len);
    Ok(())
}

/// The write buffer of a description's body, if it has one.
pub fn buffer_of_body(body: &Body) -> Option<Arc<Mutex<WriteBuf>>> {
    match body {
        Body::Buf(b) => Some(b.clone()),
        _ => None,
    }
}

/// The write buffer behind a description, if it has one.
pub fn buffer_of(h: &Handle) -> Option<Arc<Mutex<WriteBuf>>> {
    buffer_of_body(&h.lock().unwrap_or_else(|e| e.into_inner()).body)
}

/// Before the content of `h`'s buffer is read, or written other than by appending: load what it
/// left unloaded (`opening::load_unloaded`). Takes the shield's lock: call it without the
/// description's. `map`: for a map, after which no stream seals the buffer again (`stream.rs`).
pub fn load_unloaded_for(h: &Handle, map: bool) -> Result<(), c_int> {
    match buffer_of(h) {
        Some(b) => crate::opening::load_unloaded_of(&b, map),
        None => Ok(()),
    }
}

/// [`OpenFile::read_at`] of a format-2 file that failed verification: the file may have been
/// updated in place by another process of the run since it was opened (`fdio::read_fresh`
/// reopens it at the run's current state and reads again before calling it tampered).
pub const STALE: c_int = libc::ESTALE;

static TABLE: RwLock<BTreeMap<c_int, Handle>> = RwLock::new(BTreeMap::new());
static BITS: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];
static TRANSLATED: RwLock<BTreeMap<c_int, EmbedPath>> = RwLock::new(BTreeMap::new());
static N_TRANSLATED: AtomicUsize = AtomicUsize::new(0);

fn bit(fd: c_int) -> Option<(usize, u64)> {
    let fd = usize::try_from(fd).ok()?;
    (fd < 64 * 64).then(|| (fd / 64, 1u64 << (fd % 64)))
}

/// Fast check used by every fd hook.
#[inline]
pub fn is_shielded(fd: c_int) -> bool {
    match bit(fd) {
        Some((i, m)) => BITS[i].load(Ordering::Relaxed) & m != 0,
        None => fd >= 0 && table_read().contains_key(&fd),
    }
}

fn table_read() -> std::sync::RwLockReadGuard<'static, BTreeMap<c_int, Handle>> {
    TABLE.read().unwrap_or_else(|e| e.into_inner())
}
pub fn table_write() -> std::sync::RwLockWriteGuard<'static, BTreeMap<c_int, Handle>> {
    TABLE.write().unwrap_or_else(|e| e.into_inner())
}

pub fn get(fd: c_int) -> Option<Handle> {
    if !is_shielded(fd) {
        return None;
    }
    table_read().get(&fd).cloned()
}

pub fn insert(fd: c_int, h: Handle) {
    table_write().insert(fd, h);
    if let Some((i, m)) = bit(fd) {
        BITS[i].fetch_or(m, Ordering::Relaxed);
    }
}

pub fn remove(fd: c_int) -> Option<Handle> {
    if let Some((i, m)) = bit(fd) {
        BITS[i].fetch_and(!m, Ordering::Relaxed);
    }
    table_write().remove(&fd)
}

pub fn all_handles() -> Vec<Handle> {
    table_read().values().cloned().collect()
}

pub fn all_fds() -> Vec<c_int> {
    table_read().keys().copied().collect()
}

/// A lock fd moved from `old` to `new` (the program dup2()ed onto its number).
pub fn renumber_lock_fd(old: c_int, new: c_int) {
    for h in all_handles() {
        let f = h.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = f.lock.as_ref().filter(|l| l.fd() == old) {
            l.set_fd(new);
        }
    }
}

/// Embed path of a shielded directory fd.
pub fn dir_path(fd: c_int) -> Option<EmbedPath> {
    let h = get(fd)?;
    let f = h.lock().unwrap_or_else(|e| e.into_inner());
    Some(f.path.clone())
}

/// Remember the embed path of an fd opened on a translated kernel path (for `*at` calls).
pub fn track_translated(fd: c_int, ep: EmbedPath) {
    TRANSLATED
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(fd, ep);
    N_TRANSLATED.fetch_add(1, Ordering::Relaxed);
}

pub fn translated_path(fd: c_int) -> Option<EmbedPath> {
    if N_TRANSLATED.load(Ordering::Relaxed) == 0 {
        return None;
    }
    TRANSLATED
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&fd)
        .cloned()
}

pub fn forget_translated(fd: c_int) {
    if N_TRANSLATED.load(Ordering::Relaxed) == 0 {
        return;
    }
    if TRANSLATED
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&fd)
        .is_some()
    {
        N_TRANSLATED.fetch_sub(1, Ordering::Relaxed);
    }
}

impl OpenFile {
    pub fn size(&self) -> u64 {
        match &self.body {
            Body::Kernel(r) => r.size(),
            Body::Mem(r) => r.size(),
            Body::Plain(v) => v.len() as u64,
            Body::Buf(b) => b.lock().map(|g| g.len()).unwrap_or(0),
            Body::Dir => 0,
        }
    }

    /// The whole verified plaintext handed to `sink` block by block (see
    /// `ProtectedReader::for_each_verified`); `None` for bodies that are not verified readers.
    pub fn for_each_verified(
        &mut self,
        block: usize,
        sink: impl Fn(u64, &[u8]) -> std::io::Result<()> + Sync,
    ) -> Option<fspf_core::Result<()>> {
        if !self.read {
            return None;
        }
        match &mut self.body {
            Body::Kernel(r) => Some(r.for_each_verified(block, sink)),
            Body::Mem(r) => Some(r.for_each_verified(block, sink)),
            _ => None,
        }
    }

    /// Verified plaintext at `off`; EIO (and a log line) when verification fails.
    pub fn read_at(&mut self, out: &mut [u8], off: u64) -> Result<usize, c_int> {
        if !self.read {
            return Err(libc::EBADF);
        }
        let r = match &mut self.body {
            Body::Kernel(r) => match r.read_at(out, off) {
                // A format-2 file changes in place: the run may have moved on (`fdio::read`).
                Err(e) if e.is_integrity() && r.tree_mut().is_some() => return Err(STALE),
                r => r,
            },
            Body::Mem(r) => r.read_at(out, off),
            Body::Plain(v) => Ok(copy_from(v, out, off)),
            Body::Buf(b) => {
                return b
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read_at(out, off)
            }
            Body::Dir => return Err(libc::EISDIR),
        };
        r.map_err(|e| {
            let m = e.to_string();
            log(format!("read refused: {m}"));
            crate::integrity_failure(&m);
            libc::EIO
        })
    }

    pub fn set_len(&mut self, len: u64) -> Result<(), c_int> {
        let Body::Buf(b) = &self.body else {
            return Err(libc::EINVAL);
        };
        if !self.write {
            return Err(libc::EINVAL);
        }
        let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
        set_len_locked(&mut g, len)
    }

    pub fn node(&self) -> Node {
        Node {
            nlink: 1,
            kind: if matches!(self.body, Body::Dir) {
                NodeKind::Dir
            } else {
                NodeKind::File
            },
            size: self.size(),
            mode: self.mode,
            owner: None,
            ino: None,
            kernel: self.kernel.clone(),
            mtime: match &self.body {
                Body::Buf(b) => b.lock().ok().map(|g| g.mtime),
                _ => None,
            },
            ctime: None,
        }
    }
}

fn copy_from(v: &[u8], out: &mut [u8], off: u64) -> usize {
    let Ok(off) = usize::try_from(off) else {
        return 0;
    };
    if off >= v.len() {
        return 0;
    }
    let n = out.len().min(v.len() - off);
    out[..n].copy_from_slice(&v[off..off + n]);
    n
}

/// Inode number of a shielded path that records none (the kernel's changes on every committed
/// rewrite, which programs such as sqlite would take for "the database was replaced"); an entry
/// that moved records the number it showed (FORMAT.md §2).
pub fn ino_of(ep: &EmbedPath) -> u64 {
    ep.default_ino()
}

/// Device number reported for shielded files.
pub const SHIELD_DEV: u64 = 0xf5f0;

/// Fill a `struct stat` for `node` at `ep`; times nothing records are `started` (ns).
pub fn fill_stat(ep: &EmbedPath, node: &Node, started: i64, st: &mut libc::stat) {
    // SAFETY: libc::stat is plain old data; all-zero is a valid value.
    *st = unsafe { std::mem::zeroed() };
    let mut times = None;
    if let Some(k) = &node.kernel {
        if let Ok(m) = fspf_core::volume::kernel_fs::stat_beneath(k.base(), k.rel()) {
            st.st_uid = m.st_uid;
            st.st_gid = m.st_gid;
            times = Some((
                (m.st_atime, m.st_atime_nsec as i64),
                (m.st_mtime, m.st_mtime_nsec as i64),
                (m.st_ctime, m.st_ctime_nsec as i64),
            ));
        }
    }
    if times.is_none() {
        // SAFETY: getuid/getgid cannot fail.
        unsafe {
            st.st_uid = libc::getuid();
            st.st_gid = libc::getgid();
        }
    }
    // Times the fspf (or a buffer) records are nanoseconds; the kernel object's are the fallback.
    let ns = |t: i64| (t.div_euclid(1_000_000_000), t.rem_euclid(1_000_000_000));
    let (ks, ksn) = ns(started);
    let (a, m, c) = times.unwrap_or(((ks, ksn), (ks, ksn), (ks, ksn)));
    let m = node.mtime.map(ns).unwrap_or(m);
    st.st_atime = a.0;
    st.st_atime_nsec = a.1;
    st.st_mtime = m.0;
    st.st_mtime_nsec = m.1;
    // The recorded change time (sealed in the fspf), else the kernel object's; never before
    // the modification time.
    let c = node.ctime.map(ns).unwrap_or(c).max(m);
    st.st_ctime = c.0;
    st.st_ctime_nsec = c.1;
    st.st_dev = SHIELD_DEV;
    st.st_ino = node.ino.unwrap_or_else(|| ino_of(ep));
    let (ty, nlink) = match node.kind {
        NodeKind::File => (libc::S_IFREG, node.nlink),
        NodeKind::Dir => (libc::S_IFDIR, 2),
        NodeKind::Symlink(_) => (libc::S_IFLNK, 1),
        NodeKind::Special { kind, rdev } => {
            st.st_rdev = rdev;
            (kind.file_type(), node.nlink)
        }
    };
    if let Some(o) = node.owner {
        st.st_uid = o.uid;
        st.st_gid = o.gid;
    }
    st.st_mode = ty | (node.mode & 0o7777);
    st.st_nlink = nlink;
    st.st_size = node.size as i64;
    st.st_blksize = 4096;
    st.st_blocks = node.size.div_ceil(512) as i64;
}

pub fn fill_statx(ep: &EmbedPath, node: &Node, started: i64, sx: &mut libc::statx) {
    // SAFETY: libc::stat is plain old data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    fill_stat(ep, node, started, &mut st);
    // SAFETY: libc::statx is plain old data; all-zero is a valid value.
    *sx = unsafe { std::mem::zeroed() };
    sx.stx_mask = libc::STATX_BASIC_STATS;
    sx.stx_blksize = st.st_blksize as u32;
    sx.stx_nlink = st.st_nlink as u32;
    sx.stx_uid = st.st_uid;
    sx.stx_gid = st.st_gid;
    sx.stx_mode = st.st_mode as u16;
    sx.stx_ino = st.st_ino;
    sx.stx_size = st.st_size as u64;
    sx.stx_blocks = st.st_blocks as u64;
    let ts = |s: i64, n: i64| {
        // SAFETY: statx_timestamp is plain old data; all-zero is valid.
        let mut t: libc::statx_timestamp = unsafe { std::mem::zeroed() };
        t.tv_sec = s;
        t.tv_nsec = n as u32;
        t
    };
    sx.stx_atime = ts(st.st_atime, st.st_atime_nsec);
    sx.stx_mtime = ts(st.st_mtime, st.st_mtime_nsec);
    sx.stx_ctime = ts(st.st_ctime, st.st_ctime_nsec);
    sx.stx_btime = ts(st.st_ctime, st.st_ctime_nsec);
    sx.stx_dev_major = (SHIELD_DEV >> 8) as u32;
    sx.stx_dev_minor = (SHIELD_DEV & 0xff) as u32;
}

/// Hold every fd-table lock across `fork` (after the shield lock), so the child never inherits
/// one mid-update.
pub struct ForkGuards {
    _table: std::sync::RwLockWriteGuard<'static, BTreeMap<c_int, Handle>>,
    _translated: std::sync::RwLockWriteGuard<'static, BTreeMap<c_int, EmbedPath>>,
    _own: std::sync::MutexGuard<'static, BTreeMap<c_int, Weak<Mutex<WriteBuf>>>>,
}

pub fn fork_guards() -> ForkGuards {
    ForkGuards {
        _table: table_write(),
        _translated: TRANSLATED.write().unwrap_or_else(|e| e.into_inner()),
        _own: own_map(),
    }
}

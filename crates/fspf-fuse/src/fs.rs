//! The FUSE adapter: inode numbers ↔ embed paths, file handles ↔ readers and write buffers,
//! `ViewError` → errno. Every rule (what a path is, what may change, how a change is queued and
//! committed) is the session's.
use crate::DaemonAnchor;
use fspf_core::format::metadata::{Owner, SpecialKind};
use fspf_core::session::{
    move_tree, EphemeralContent, OpenFiles, Renamed, Session, VersionMeta, Written, MAX_FILE_LEN,
};
use fspf_core::view::{Node, NodeKind, OpenFile, ViewError};
use fspf_core::volume::{KernelReader, StreamStage};
use fspf_core::{ChildKind, EmbedPath, Tag};
use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};
use libc::c_int;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may cache attributes and names: only this daemon changes the namespace,
/// but a short TTL keeps `stat` after a commit honest about sizes of files staged by others.
const TTL: Duration = Duration::from_secs(1);

/// A new file's buffer that holds this many bytes not sealed yet seals its whole chunks
/// ([`Buf::stream`]).
const STREAM_PIECE: u64 = 32 << 20;

/// How long the commit interval leaves a file that is being sealed as a stream open (its close,
/// `fsync` or the unmount make its version at once): a writer that never syncs loses at most
/// this plus the interval in a crash. `FSPF_FUSE_STREAM_GRACE_MS` in the daemon's environment
/// sets it (default 30 s).
fn stream_grace() -> Duration {
    static GRACE: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *GRACE.get_or_init(|| {
        let ms = std::env::var("FSPF_FUSE_STREAM_GRACE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30_000);
        Duration::from_millis(ms)
    })
}

/// Buffers of files larger than this are not loaded when opened for writing ([`Buf::under`]).
const UNLOADED_MIN: u64 = 1 << 20;

/// Plaintext of a file open for writing (or staged and not yet committed), in a memfd.
struct Buf {
    path: EmbedPath,
    file: File,
    len: u64,
    mode: u32,
    mtime: i64,
    mtime_set: bool,
    /// Changed since it was last staged.
    dirty: bool,
    /// Bytes written since it was last staged.
    unstaged: u64,
    /// Open write handles.
    writers: usize,
    /// Unlinked: never staged again.
    detached: bool,
    /// Recorded owner of the file.
    owner: Option<Owner>,
    /// The committed version the content was loaded from (or last committed as), and what
    /// was written since: a format-2 file is then staged as an in-place update of just that
    /// (every write reaches the buffer through this daemon, so the record is complete).
    base: Option<fspf_core::Version>,
    written: Option<Written>,
    /// A buffer that was not loaded: the committed version its unwritten bytes still equal
    /// (a verified reader of it), and what the memfd holds relative to that version (every
    /// write since, and the shortest length since: bytes past it that were not written are
    /// zeros). `None`: the memfd holds the whole content. Every read and write of a buffer
    /// goes through this daemon, so the record is complete; a writer of a 4 GiB file holds
    /// what it wrote since the last commit, not the file.
    under: Option<Under>,
    /// A new file written in order: its first whole chunks sealed already to the shadow of its
    /// next version (`StreamStage`) and punched out of the memfd, which holds only the rest.
    /// Kept after the version is staged (it reads the sealed part back) until the commit moves
    /// the buffer onto the committed version.
    stream: Option<Stream>,
    /// The ranges written to a new (or emptied) buffer, while they are few: its first range,
    /// when it starts at 0, is what a stream may seal ([`Buf::filled`]). Writes that the
    /// kernel sent in order may be served out of order by the session threads, and a range
    /// not written yet must not be sealed as zeros. `None`: written out of order (held whole
    /// until it is committed).
    order: Option<Written>,
}

/// A new buffer written with more gaps than this is not written in order.
const ORDER_GAPS: usize = 64;

/// The thread sealing a piece of a stream: it hands the stream back with the piece's outcome.
type PieceJob = std::thread::JoinHandle<Option<(StreamStage, Result<(), c_int>)>>;

/// A stream, and the piece of it being sealed on a thread of its own (so that the daemon takes
/// the next writes meanwhile).
struct Stream {
    /// `None` while a piece is being sealed (the thread has it).
    stage: Option<StreamStage>,
    /// When it started: the commit interval leaves it open for [`stream_grace`] at most.
    started: std::time::Instant,
    /// The piece being sealed: the offset it seals to, and its thread (which hands the stream
    /// back with the piece's outcome).
    job: Option<(u64, PieceJob)>,
}

impl Stream {
    /// The end of what is sealed or being sealed.
    fn end(&self) -> u64 {
        match (&self.job, &self.stage) {
            (Some((t, _)), _) => *t,
            (None, Some(s)) => s.sealed(),
            (None, None) => 0,
        }
    }

    fn finished(&self) -> bool {
        self.job.is_none() && self.stage.as_ref().is_some_and(|s| s.finished())
    }

    /// Wait for the piece being sealed. `Err`: the stream is lost (its thread panicked).
    fn settle(&mut self) -> Result<&mut StreamStage, c_int> {
        if let Some((_, h)) = self.job.take() {
            match h.join() {
                Ok(Some((st, r))) => {
                    self.stage = Some(st);
                    if let Err(e) = r {
                        eprintln!("fspf mount: sealing a piece of a stream failed (errno {e}); its bytes stay in memory");
                    }
                }
                Ok(None) | Err(_) => return Err(libc::EIO),
            }
        }
        self.stage.as_mut().ok_or(libc::EIO)
    }
}

/// What staging does with a new file that is being sealed as a stream and is still open for
/// writing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Streams {
    /// Make its version (a close, `fsync`, a rename, the unmount).
    Finish,
    /// Leave it open, within [`stream_grace`] (the commit interval).
    LeaveOpen,
}

/// Give back the memory of bytes `[off, off + len)` of a buffer's memfd (best effort: a hole
/// that stays holds bytes nobody reads).
fn punch(file: &File, off: u64, len: u64) {
    let _ = rustix::fs::fallocate(
        file,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        off,
        len,
    );
}

/// Seal `file`'s bytes from `s`'s end to `target` (whole chunks) into `s`, and punch what was
/// sealed out of `file` (a piece of a stream, on its own thread).
fn seal_piece(mut s: StreamStage, file: File, target: u64) -> (StreamStage, Result<(), c_int>) {
    let c = u64::from(s.chunk_len());
    let start = s.sealed();
    let cap = ((1 << 20) / c).max(1) as usize * c as usize;
    // Each block lies in memory as it lies in the shadow (`piece_in`): its whole pages are
    // written with direct I/O straight from it.
    let mut raw = vec![0u8; cap + fspf_core::volume::PIECE_SLACK];
    let mut r = Ok(());
    while s.sealed() < target {
        let off = s.sealed();
        let n = (cap as u64).min(target - off) as usize;
        let block = fspf_core::volume::piece_in(&mut raw, s.chunk_len(), off / c, n);
        if file.read_exact_at(block, off).is_err() {
            r = Err(libc::EIO);
            break;
        }
        if let Err(e) = s.push(block) {
            eprintln!("fspf mount: {e}");
            r = Err(libc::EIO);
            break;
        }
    }
    // What is sealed is read back from the shadow: its memory goes.
    punch(&file, start, s.sealed() - start);
    (s, r)
}

struct Under {
    reader: Box<KernelReader>,
    holds: Written,
}

impl Buf {
    fn new(path: EmbedPath, mode: u32, mtime: i64) -> std::io::Result<Buf> {
        let fd = rustix::fs::memfd_create("fspf-fuse", rustix::fs::MemfdFlags::CLOEXEC)?;
        Ok(Buf {
            path,
            file: File::from(fd),
            len: 0,
            mode,
            mtime,
            mtime_set: false,
            dirty: false,
            unstaged: 0,
            writers: 0,
            detached: false,
            owner: None,
            base: None,
            written: None,
            under: None,
            stream: None,
            order: Some(Written::new(0)),
        })
    }

    /// The end of the bytes written from 0 without a gap (a new file's sealable part).
    fn filled(&self) -> u64 {
        let first = self.order.as_ref().and_then(|o| o.ranges.first());
        first.filter(|r| r.0 == 0).map_or(0, |r| r.1).min(self.len)
    }

    /// Bring the sealed part of a stream back into the memfd and drop the stream (a write or
    /// truncation below its end, or a seal that must read everything).
    fn unstream(&mut self) -> std::io::Result<()> {
        let Some(st) = self.stream.as_mut() else {
            return Ok(());
        };
        let sealed = st
            .settle()
            .map_err(std::io::Error::from_raw_os_error)?
            .sealed();
        self.fill_memfd(sealed)?;
        self.stream = None;
        Ok(())
    }

    /// Copy the content's bytes `[0, end)` into the memfd, from wherever it does not hold them
    /// (the stream's shadow, the committed version).
    fn fill_memfd(&mut self, end: u64) -> std::io::Result<()> {
        let mut block = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < end {
            let n = block.len().min((end - off) as usize);
            self.read_under(&mut block[..n], off)?;
            self.file.write_all_at(&block[..n], off)?;
            off += n as u64;
        }
        Ok(())
    }

    /// Bytes `[off, off + out.len())` of the content, all below `self.len`: from the memfd
    /// where it holds them, else from the committed version (verified), else zeros.
    fn read_under(&mut self, out: &mut [u8], off: u64) -> std::io::Result<()> {
        if let Some(st) = &mut self.stream {
            let s = st.settle().map_err(std::io::Error::from_raw_os_error)?;
            let k = s.sealed().saturating_sub(off).min(out.len() as u64) as usize;
            if k > 0 {
                s.read_at(&mut out[..k], off).map_err(|e| {
                    eprintln!("fspf mount: {}: {e}", self.path);
                    std::io::Error::from_raw_os_error(libc::EIO)
                })?;
            }
            return self.file.read_exact_at(&mut out[k..], off + k as u64);
        }
        let Some(u) = &mut self.under else {
            return self.file.read_exact_at(out, off);
        };
        let end = off + out.len() as u64;
        let mut pos = off;
        let first = u.holds.ranges.partition_point(|&(o, l)| o + l <= off);
        let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
        for &(o, l) in &u.holds.ranges[first..] {
            if o >= end {
                break;
            }
            if o > pos {
                pieces.push((pos, o, false));
            }
            let (a, b) = (o.max(pos), (o + l).min(end));
            pieces.push((a, b, true));
            pos = b;
        }
        if pos < end {
            pieces.push((pos, end, false));
        }
        for (a, b, held) in pieces {
            let dst = &mut out[(a - off) as usize..(b - off) as usize];
            if held {
                self.file.read_exact_at(dst, a)?;
                continue;
            }
            // Not written since the committed version: its bytes below the shortest length
            // since, zeros past it.
            let committed_end = b.min(u.holds.min_len).max(a);
            let (old, zero) = dst.split_at_mut((committed_end - a) as usize);
            zero.fill(0);
            u.reader.read_exact_at(old, a).map_err(|e| {
                eprintln!("fspf mount: {}: {e}", self.path);
                std::io::Error::from_raw_os_error(libc::EIO)
            })?;
        }
        Ok(())
    }

    /// Load what the memfd does not hold yet (before it is sealed whole).
    fn load_all(&mut self) -> std::io::Result<()> {
        self.unstream()?;
        if self.under.is_some() {
            self.fill_memfd(self.len)?;
            self.under = None;
        }
        Ok(())
    }

    /// The committed version is `reader` now, and it equals the content but for what was
    /// written since it was staged (`written`): the memfd keeps only that, and gives the rest
    /// of its memory back.
    fn rebase_under(&mut self, reader: KernelReader) {
        let holds = match &self.written {
            Some(w) => w.clone(),
            None => return,
        };
        let mut pos = 0u64;
        let mut gaps = Vec::new();
        for &(o, l) in &holds.ranges {
            if o > pos {
                gaps.push((pos, o - pos));
            }
            pos = o + l;
        }
        if pos < self.len {
            gaps.push((pos, self.len - pos));
        }
        for (o, l) in gaps {
            punch(&self.file, o, l);
        }
        self.under = Some(Under {
            reader: Box::new(reader),
            holds,
        });
        if let Some(mut st) = self.stream.take() {
            let _ = st.settle();
        }
    }

    fn write_at(&mut self, data: &[u8], off: u64) -> std::io::Result<()> {
        if off.saturating_add(data.len() as u64) > MAX_FILE_LEN {
            return Err(std::io::Error::from_raw_os_error(libc::EFBIG));
        }
        if self.stream.as_ref().is_some_and(|s| off < s.end()) {
            self.unstream()?;
        }
        self.file.write_all_at(data, off)?;
        self.len = self.len.max(off + data.len() as u64);
        self.dirty = true;
        self.unstaged += data.len() as u64;
        if let Some(w) = &mut self.written {
            w.add(off, data.len() as u64);
        }
        if let Some(u) = &mut self.under {
            u.holds.add(off, data.len() as u64);
        }
        if let Some(o) = &mut self.order {
            o.add(off, data.len() as u64);
            if o.ranges.len() > ORDER_GAPS {
                self.order = None;
            }
        }
        Ok(())
    }

    fn read_at(&mut self, out: &mut [u8], off: u64) -> std::io::Result<usize> {
        if off >= self.len {
            return Ok(0);
        }
        let n = out.len().min((self.len - off) as usize);
        self.read_under(&mut out[..n], off)?;
        Ok(n)
    }

    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        if len > MAX_FILE_LEN {
            return Err(std::io::Error::from_raw_os_error(libc::EFBIG));
        }
        if self.stream.as_ref().is_some_and(|s| len < s.end()) {
            self.unstream()?;
        }
        self.file.set_len(len)?;
        self.len = len;
        self.dirty = true;
        if let Some(w) = &mut self.written {
            w.set_len(len);
        }
        if let Some(u) = &mut self.under {
            u.holds.set_len(len);
        }
        if let Some(o) = &mut self.order {
            o.set_len(len);
        }
        // A size change moves the modification time, as a write does.
        self.mtime = now_ns();
        self.mtime_set = false;
        Ok(())
    }

    /// What a version staged from this buffer records besides its content.
    fn meta(&self) -> VersionMeta {
        VersionMeta {
            mode: self.mode,
            mtime: self.mtime_set.then_some(self.mtime),
            owner: self.owner,
        }
    }

    /// The buffer's content is staged now, as a version recorded at time `t`: what is written
    /// from here on is relative to it.
    fn staged_as(&mut self, t: i64) {
        self.mtime = t;
        self.written = Some(Written::new(self.len));
        self.unstaged = 0;
        self.dirty = false;
    }

    fn contents(&mut self) -> std::io::Result<Vec<u8>> {
        let mut v = vec![0u8; self.len as usize];
        self.read_under(&mut v, 0)?;
        Ok(v)
    }
}

/// Sequential reader over a buffer's memfd (what `stage_put` seals).
struct BufReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl std::io::Read for BufReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = out.len().min((self.end - self.pos) as usize);
        if n == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut out[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

type Shared = Arc<Mutex<Buf>>;

/// A buffer's (or a reader's) lock; a panic of another holder does not make it unusable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The daemon's buffers as the session's view sees them.
struct Live<'a>(&'a BTreeMap<EmbedPath, Shared>);

impl OpenFiles for Live<'_> {
    fn open_file(&self, ep: &EmbedPath) -> Option<OpenFile> {
        let b = lock(self.0.get(ep)?);
        Some(OpenFile {
            size: b.len,
            mode: b.mode,
            mtime: b.mtime,
            owner: b.owner,
        })
    }
    fn open_below(&self, dir: &EmbedPath) -> Vec<EmbedPath> {
        fspf_core::session::below(self.0, dir)
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// An open file. Cloned out of the handle table ([`Handles`]) by the request that uses it, so
/// that a `read` runs without holding the table or the [`State`] lock: a reader is locked on
/// its own (two reads of one handle take turns; reads of different handles run at once).
#[derive(Clone)]
enum Handle {
    Kernel(Arc<Mutex<KernelReader>>),
    Mem(Arc<Mutex<fspf_core::volume::memory::MemReader>>),
    Plain(Arc<Vec<u8>>),
    /// A buffer: written through this handle when `write`, else read from it.
    Buf {
        buf: Shared,
        write: bool,
    },
}

/// Open file handles by number: apart from [`State`] so that a `read` of a verified reader
/// finds its handle without the State lock (and so is not held up by a commit).
#[derive(Default)]
struct Handles {
    map: HashMap<u64, Handle>,
    next: u64,
}

/// Inode numbers for embed paths (stable for the life of the mount; renames move them).
#[derive(Default)]
struct Inodes {
    by_path: BTreeMap<EmbedPath, u64>,
    by_ino: HashMap<u64, EmbedPath>,
    next: u64,
}

impl Inodes {
    fn ino(&mut self, p: &EmbedPath) -> u64 {
        if let Some(&i) = self.by_path.get(p) {
            return i;
        }
        self.next += 1;
        let i = self.next;
        self.by_path.insert(p.clone(), i);
        self.by_ino.insert(i, p.clone());
        i
    }

    fn path(&self, ino: u64) -> Option<&EmbedPath> {
        self.by_ino.get(&ino)
    }

    /// The entry at `p` is gone (removed): its number names nothing any more. Returns it.
    fn forget(&mut self, p: &EmbedPath) -> Option<u64> {
        let i = self.by_path.remove(p)?;
        self.by_ino.remove(&i);
        Some(i)
    }

    /// `from` (and everything below it) is now `to`; what was at `to` is gone.
    fn rename(&mut self, from: &EmbedPath, to: &EmbedPath) {
        let by_ino = &mut self.by_ino;
        let replaced = move_tree(&mut self.by_path, from, to, |dest, i| {
            by_ino.insert(*i, dest.clone());
        });
        for (_, i) in replaced {
            self.by_ino.remove(&i);
        }
    }
}

struct State {
    s: Session<Arc<DaemonAnchor>>,
    live: BTreeMap<EmbedPath, Shared>,
    inodes: Inodes,
    /// When the oldest uncommitted change was made.
    since: Option<std::time::Instant>,
    /// Times the fspf does not record, by inode, for the life of the mount: status changes
    /// (`ctime`), access times set by `utimensat`, and directory modification times moved by
    /// entries made or removed in them.
    times: HashMap<u64, Times>,
    /// The committed version each inode was last opened for reading at: a read open of the
    /// same version keeps the kernel's page cache of it (`FOPEN_KEEP_CACHE`, pages this daemon
    /// verified); any other open invalidates it, and an open for writing forgets the entry.
    cached: HashMap<u64, fspf_core::Version>,
    /// Open handles by inode.
    opens: HashMap<u64, u32>,
    /// Inodes whose last name went while they were open: their attributes as `fstat` shows
    /// them until the last handle closes (no links).
    gone: HashMap<u64, FileAttr>,
    /// Small new files closed since the last commit and left for it to stage ([`small_new`]).
    closed_small: usize,
    /// Descriptors held in reserve ([`State::new_buffer`]).
    reserve: Vec<File>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Times {
    atime: Option<i64>,
    mtime: Option<i64>,
    ctime: i64,
}

/// The filesystem fuser drives, from several session threads at once.
///
/// Locks, always taken in this order (a thread holding one never waits for one above it):
/// 1. [`State`] (`st`): the session, the inode table, the buffers' map; held by every request
///    but a `read`, for its whole duration (the committer thread takes it too);
/// 2. the handle table (`handles`): held only to add, remove or clone out a handle;
/// 3. a handle's reader (`Handle::Kernel`, `Handle::Mem`);
/// 4. a buffer ([`Buf`]), taken after the State lock; a `read` or `write` of it may let the
///    State lock go while it keeps the buffer's (see [`FspfFs::read`], [`FspfFs::write`]).
pub(crate) struct FspfFs {
    st: Arc<Mutex<State>>,
    handles: Mutex<Handles>,
    anchor: Arc<DaemonAnchor>,
    root: EmbedPath,
    uid: u32,
    gid: u32,
    started: i64,
    ready: Mutex<Option<Ready>>,
    /// Keeps a session thread polling between close requests (`spin.rs`).
    spin: Arc<crate::spin::Spin>,
}

/// What runs once the mount is in place (`mount_foreground`'s `ready`).
type Ready = Box<dyn FnOnce(Tag) + Send>;

thread_local! {
    /// Where this session thread serves `read` requests from (grown, never cleared: only what
    /// was read is sent).
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Descriptors kept open (on `/dev/null`) so that a commit can still run when buffers have used
/// up the limit on open files: a commit opens the log, lock files, directories and shadows.
const FD_RESERVE: usize = 16;

fn reserve() -> Vec<File> {
    (0..FD_RESERVE)
        .map_while(|_| File::open("/dev/null").ok())
        .collect()
}

/// The errno of a failed system call of the daemon's own (no descriptor or memory left for a
/// buffer: `EMFILE`, `ENFILE`, `ENOMEM`, which the program should see as such), else `EIO`.
fn os_errno(e: &std::io::Error) -> c_int {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// A libc errno as fuser's.
fn eno(e: c_int) -> Errno {
    Errno::from_i32(e)
}

fn now_ns() -> i64 {
    fspf_core::session::now_ns()
}

fn time_of(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH
    }
}

fn ns_of(t: TimeOrNow) -> i64 {
    match t {
        TimeOrNow::Now => now_ns(),
        TimeOrNow::SpecificTime(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_nanos().min(i64::MAX as u128) as i64,
            Err(_) => 0,
        },
    }
}

/// A core error as an errno: data that failed verification is `EIO`, never garbage.
fn core_errno(ep: &dyn std::fmt::Display, e: &fspf_core::Error) -> c_int {
    if crate::debug() || e.is_integrity() {
        eprintln!("fspf mount: {ep}: {e}");
    }
    if e.is_integrity() {
        return libc::EIO;
    }
    match e {
        fspf_core::Error::NotListed { .. } => libc::ENOENT,
        _ => e.raw_os_error().unwrap_or(libc::EIO),
    }
}

impl State {
    /// The inode's status changed now (`ctime`).
    fn changed(&mut self, ino: u64) {
        self.times.entry(ino).or_default().ctime = now_ns();
    }

    /// An entry was made in or removed from the directory `ino`: its `mtime` and `ctime` move.
    fn dir_changed(&mut self, ino: u64) {
        let now = now_ns();
        let t = self.times.entry(ino).or_default();
        t.mtime = Some(now);
        t.ctime = now;
    }

    fn mark(&mut self) {
        self.since.get_or_insert_with(std::time::Instant::now);
    }

    /// Stage one buffer if it changed: into memory for ephemeral regions, as a version beside
    /// the kernel file otherwise (queued for the next commit).
    fn stage(&mut self, b: &Shared) -> Result<(), c_int> {
        self.stage_with(b, Streams::Finish)
    }

    fn stage_with(&mut self, b: &Shared, streams: Streams) -> Result<(), c_int> {
        let r = self.stage_one(b, streams);
        if let Err(e) = r {
            eprintln!(
                "fspf mount: {}: cannot stage the new version (errno {e}); it stays in memory",
                lock(b).path
            );
        }
        r
    }

    fn stage_one(&mut self, b: &Shared, streams: Streams) -> Result<(), c_int> {
        let mut g = lock(b);
        if !g.dirty || g.detached {
            return Ok(());
        }
        if streams == Streams::LeaveOpen
            && g.writers > 0
            && g.stream
                .as_ref()
                .is_some_and(|s| !s.finished() && s.started.elapsed() < stream_grace())
        {
            return Ok(());
        }
        let path = g.path.clone();
        if self.s.is_ephemeral(&path) {
            let data = g.contents().map_err(|_| libc::EIO)?;
            self.s
                .put_ephemeral(&path, g.mode, g.mtime, &data)
                .map_err(ViewError::errno)?;
            g.dirty = false;
            // Sealed in the session's memory now: an idle buffer would only be a second copy.
            if g.writers == 0 {
                drop(g);
                if self.live.get(&path).is_some_and(|x| Arc::ptr_eq(x, b)) {
                    self.live.remove(&path);
                }
            }
            return Ok(());
        } else {
            let meta = g.meta();
            let len = g.len;
            // A stream: the rest of the file is its tail, and the version is made.
            let mut streamed = None;
            let b = &mut *g;
            let open = match b.stream.as_mut().filter(|s| !s.finished()) {
                Some(st) => Some(st.settle()?),
                None => None,
            };
            if let Some(s) = open {
                let sealed = s.sealed();
                let mut tail = vec![0u8; len.saturating_sub(sealed) as usize];
                b.file
                    .read_exact_at(&mut tail, sealed)
                    .map_err(|_| libc::EIO)?;
                match self.s.stage_streamed(&path, s, &mut tail, meta) {
                    Ok(t) => streamed = Some(t),
                    Err(e) => {
                        eprintln!(
                            "fspf mount: {path}: the sealed stream could not be staged ({e:?}); sealing it whole"
                        );
                        b.unstream().map_err(|_| libc::EIO)?;
                    }
                }
            }
            let update = match (g.base, &g.written) {
                _ if streamed.is_some() => streamed,
                (Some(base), Some(w)) => {
                    let file = &g.file;
                    let read = |out: &mut [u8], off: u64| file.read_exact_at(out, off);
                    self.s
                        .stage_update(&path, base, len, w, meta, read)
                        .map_err(ViewError::errno)?
                }
                _ => None,
            };
            let t = match update {
                Some(t) => t,
                None => {
                    g.load_all().map_err(|_| libc::EIO)?;
                    let file = &g.file;
                    self.s
                        .stage_put(&path, len, meta, None, || BufReader {
                            file,
                            pos: 0,
                            end: len,
                        })
                        .map_err(ViewError::errno)?
                }
            };
            g.staged_as(t);
            self.mark();
        }
        Ok(())
    }

    /// Seal the whole chunks of `g` past its stream's end (starting the stream first) and give
    /// their memory back.
    fn stream_more(&mut self, g: &mut Buf) -> Result<(), c_int> {
        if g.stream.is_none() {
            match self.s.stream_file(&g.path).map_err(ViewError::errno)? {
                Some(s) => {
                    g.stream = Some(Stream {
                        stage: Some(s),
                        started: std::time::Instant::now(),
                        job: None,
                    })
                }
                None => return Ok(()),
            }
        }
        let filled = g.filled();
        let Buf {
            stream: Some(st),
            file,
            ..
        } = g
        else {
            return Ok(());
        };
        // One piece at a time: the one before it is done first.
        let s = st.settle()?;
        let c = u64::from(s.chunk_len());
        let target = filled / c * c;
        if target <= s.sealed() {
            return Ok(());
        }
        let f = file.try_clone().map_err(|_| libc::EIO)?;
        let s = st.stage.take().ok_or(libc::EIO)?;
        // The stream goes to the thread only once it runs: if it cannot start, or is gone,
        // the piece is sealed here instead and the stream is never lost.
        let (tx, rx) = std::sync::mpsc::channel::<(StreamStage, File)>();
        let spawned = std::thread::Builder::new()
            .name("fspf-seal".into())
            .spawn(move || {
                // (The stream is sent right after the spawn; without it there is nothing to do.)
                let (s, f) = rx.recv().ok()?;
                Some(seal_piece(s, f, target))
            });
        let back = match spawned {
            Ok(h) => match tx.send((s, f)) {
                Ok(()) => {
                    st.job = Some((target, h));
                    return Ok(());
                }
                Err(std::sync::mpsc::SendError(back)) => back,
            },
            Err(_) => (s, f),
        };
        let (s, r) = seal_piece(back.0, back.1, target);
        st.stage = Some(s);
        r
    }

    fn stage_all(&mut self) -> Result<(), c_int> {
        self.stage_all_with(Streams::Finish)
    }

    fn stage_all_with(&mut self, streams: Streams) -> Result<(), c_int> {
        let mut r = self.stage_small();
        let bufs: Vec<Shared> = self.live.values().cloned().collect();
        for b in bufs {
            if let Err(e) = self.stage_with(&b, streams) {
                r = Err(e);
            }
        }
        r
    }

    /// A new, empty buffer for `ep`. Out of descriptors (each buffer holds a memfd), the
    /// reserve is let go and what is staged or waiting is committed, which drops the buffers
    /// nobody writes; then once more. Still none: `EMFILE` (or `ENFILE`) for the program.
    fn new_buffer(&mut self, ep: &EmbedPath, mode: u32, mtime: i64) -> Result<Buf, c_int> {
        match Buf::new(ep.clone(), mode, mtime) {
            Ok(b) => Ok(b),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                self.reserve.clear();
                let committed = self.commit();
                self.reserve = reserve();
                if let Err(c) = committed {
                    eprintln!("fspf mount: out of descriptors, and the commit that would free some failed (errno {c})");
                }
                Buf::new(ep.clone(), mode, mtime).map_err(|e| os_errno(&e))
            }
            Err(e) => Err(os_errno(&e)),
        }
    }

    /// Stage the small new files nobody holds open ([`small_new`]) in one call, which seals
    /// them and writes their shadows on the pool.
    fn stage_small(&mut self) -> Result<(), c_int> {
        self.closed_small = 0;
        let mut small = Vec::new();
        for b in self.live.values() {
            let mut g = lock(b);
            if self.waits_for_commit(&g) {
                // (Nobody writes it meanwhile: a write needs an open handle, and an open the
                // State lock this holds.) A content that cannot be read is left to
                // `stage_one`, which reports it.
                if let Ok(data) = g.contents() {
                    small.push((b.clone(), g.path.clone(), g.meta(), data));
                }
            }
        }
        if small.is_empty() {
            return Ok(());
        }
        let files: Vec<(&EmbedPath, VersionMeta, &[u8])> =
            small.iter().map(|(_, p, m, d)| (p, *m, &d[..])).collect();
        let staged = self.s.stage_puts(&files);
        let mut r = Ok(());
        for ((b, path, _, _), t) in small.iter().zip(staged) {
            let mut g = lock(b);
            match t {
                Ok(t) => g.staged_as(t),
                Err(e) => {
                    let e = e.errno();
                    eprintln!(
                        "fspf mount: {path}: cannot stage the new version (errno {e}); it stays in memory"
                    );
                    r = Err(e);
                }
            }
        }
        self.mark();
        r
    }

    /// After the session committed: buffers nobody writes any more are dropped (their content
    /// is the committed version now).
    fn after_commit(&mut self) {
        let c = self.s.take_committed();
        if c.any {
            self.since = None;
        }
        for (path, version, _) in &c.files {
            if let Some(b) = self.live.get(path) {
                let mut g = lock(b);
                g.base = Some(*version);
                if g.under.is_some() || g.len > UNLOADED_MIN {
                    // Reads of what was not written since come from the committed file now.
                    match self.s.vol().map(|v| v.open_file(path)) {
                        Some(Ok(r)) if !c.merged.contains_key(path) => g.rebase_under(r),
                        _ => {
                            if g.load_all().is_err() {
                                g.base = None;
                            }
                        }
                    }
                }
            }
            // Written through the mount, the kernel's pages of the file are the version just
            // committed (an open for writing invalidated the older ones), unless the session
            // merged another writer's bytes into it below, behind the kernel's back.
            if !c.merged.contains_key(path) {
                if let Some(&ino) = self.inodes.by_path.get(path) {
                    self.cached.insert(ino, *version);
                }
            }
        }
        for (path, data) in c.merged {
            if let Some(b) = self.live.get(&path) {
                let mut g = lock(b);
                let ok = g.file.set_len(0).is_ok() && g.file.write_all_at(&data, 0).is_ok();
                g.under = None;
                g.len = data.len() as u64;
                g.written = ok.then(|| Written::new(data.len() as u64));
                if !ok {
                    g.base = None;
                }
            }
        }
        self.drop_idle();
    }

    /// With nothing queued for the next commit, buffers that nobody writes and that hold no
    /// unstaged change equal their committed versions: drop them (reads then come from the
    /// kernel files, and the kernel's page cache of them can be kept).
    fn drop_idle(&mut self) {
        if !self.s.has_queued() {
            self.live.retain(|_, b| {
                let g = lock(b);
                g.writers > 0 || g.dirty
            });
        }
    }

    /// After a session call that may have committed (rename, symlink, mknod): buffers follow the
    /// commit, then the call's own result.
    fn committed<T>(&mut self, r: Result<T, ViewError>) -> Result<T, c_int> {
        self.after_commit();
        r.map_err(ViewError::errno)
    }

    /// The file at `from` now lives at `to` (a rename, or a file with hard links whose name
    /// went): its buffers and inode move; whatever was at `to` is gone.
    fn moved(&mut self, from: &EmbedPath, to: &EmbedPath) {
        let replaced = move_tree(&mut self.live, from, to, |dest, b| {
            lock(b).path = dest.clone();
        });
        for (_, b) in replaced {
            lock(&b).detached = true;
        }
        if let Some(&i) = self.inodes.by_path.get(from) {
            self.changed(i);
        }
        self.inodes.rename(from, to);
    }

    fn commit(&mut self) -> Result<(), c_int> {
        self.commit_with(Streams::Finish)
    }

    fn commit_with(&mut self, streams: Streams) -> Result<(), c_int> {
        let (committed, staged) = self.commit_parts(streams);
        committed?;
        staged
    }

    /// Stage every changed buffer and commit: the commit's own outcome, and the stages' (a
    /// buffer that could not be staged stays in memory, changed, for the next commit).
    fn commit_parts(&mut self, streams: Streams) -> (Result<(), c_int>, Result<(), c_int>) {
        let staged = self.stage_all_with(streams);
        let frees_room = self.s.removes_anything();
        if let Err(e) = self.commit_queue() {
            return (Err(e), staged);
        }
        if frees_room && matches!(staged, Err(libc::ENOSPC | libc::EDQUOT)) {
            // A file that found no room may find it now: the commit just removed what the
            // program removed to make room (`rm` of a large file, then `fsync` again, as on a
            // plain file system, where the removal frees its blocks at once). Once more.
            let again = self.stage_all_with(streams);
            return (self.commit_queue(), again);
        }
        (Ok(()), staged)
    }

    /// Commit what is queued.
    fn commit_queue(&mut self) -> Result<(), c_int> {
        let r = self.s.commit().map_err(ViewError::errno);
        if r.is_err() {
            // What was staged is lost: no record of writes is relative to a committed state.
            for b in self.live.values() {
                lock(b).written = None;
            }
        }
        self.after_commit();
        r
    }

    /// Does the buffer `g` wait for the commit to stage it ([`small_new`], not ephemeral)?
    fn waits_for_commit(&self, g: &Buf) -> bool {
        small_new(g) && !self.s.is_ephemeral(&g.path)
    }

    /// Does inode `ino` have changes no commit holds yet (its buffer's stage failed)?
    fn unstaged(&self, ino: u64) -> bool {
        self.inodes
            .path(ino)
            .and_then(|p| self.live.get(p))
            .is_some_and(|b| {
                let g = lock(b);
                g.dirty && !g.detached
            })
    }

    fn detach(&mut self, ep: &EmbedPath) {
        for (_, b) in fspf_core::session::remove_tree(&mut self.live, ep) {
            lock(&b).detached = true;
        }
    }
}

impl FspfFs {
    pub(crate) fn new(
        s: Session<Arc<DaemonAnchor>>,
        anchor: Arc<DaemonAnchor>,
        root: EmbedPath,
    ) -> FspfFs {
        let mut inodes = Inodes::default();
        // FUSE's root inode is 1.
        inodes.ino(&root);
        FspfFs {
            st: Arc::new(Mutex::new(State {
                s,
                live: BTreeMap::new(),
                inodes,
                since: None,
                times: HashMap::new(),
                cached: HashMap::new(),
                opens: HashMap::new(),
                gone: HashMap::new(),
                closed_small: 0,
                reserve: reserve(),
            })),
            handles: Mutex::new(Handles {
                map: HashMap::new(),
                next: 1,
            }),
            anchor,
            root,
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            started: now_ns(),
            ready: Mutex::new(None),
            spin: crate::spin::Spin::new(),
        }
    }

    pub(crate) fn spin(&self) -> Arc<crate::spin::Spin> {
        self.spin.clone()
    }

    pub(crate) fn anchor(&self) -> Arc<DaemonAnchor> {
        self.anchor.clone()
    }

    pub(crate) fn on_init(&mut self, f: Ready) {
        *self.ready.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// A thread that commits staged changes at most `every` after they were made.
    pub(crate) fn spawn_committer(
        &self,
        every: Duration,
    ) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
        let stop = Arc::new(AtomicBool::new(false));
        let st = self.st.clone();
        let flag = stop.clone();
        let tick = every
            .min(Duration::from_millis(200))
            .max(Duration::from_millis(10));
        let h = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                let mut g = st.lock().unwrap_or_else(|e| e.into_inner());
                if g.since.is_some_and(|t| t.elapsed() >= every) {
                    // A file still being written in order stays a stream: cutting it into a
                    // version now would make every later byte an update, or the file sealed
                    // whole again (its close, `fsync` or the unmount commits it).
                    if let Err(e) = g.commit_with(Streams::LeaveOpen) {
                        // Reported once; the next change, fsync or the unmount tries again.
                        eprintln!("fspf mount: commit failed (errno {e})");
                        g.since = None;
                    }
                }
            }
        });
        (stop, h)
    }

    /// The state, for a request (which keeps the session thread polling for the next one).
    fn state(&self) -> MutexGuard<'_, State> {
        self.spin.touch();
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The handle table (after the State lock, when both are held).
    fn handles(&self) -> MutexGuard<'_, Handles> {
        self.handles.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The handle `fh` (cloned out of the table).
    fn handle(&self, fh: u64) -> Option<Handle> {
        self.handles().map.get(&fh).cloned()
    }

    fn attr(&self, st: &State, ino: u64, n: &Node) -> FileAttr {
        let mut rdev = 0;
        let nlink = u32::try_from(n.nlink).unwrap_or(u32::MAX);
        let (kind, nlink) = match n.kind {
            NodeKind::File => (FileType::RegularFile, nlink),
            NodeKind::Dir => (FileType::Directory, 2),
            NodeKind::Symlink(_) => (FileType::Symlink, 1),
            NodeKind::Special { kind, rdev: r } => {
                rdev = r as u32;
                (file_type(kind), nlink)
            }
        };
        let times = st.times.get(&ino).copied().unwrap_or_default();
        let m = times.mtime.or(n.mtime).unwrap_or(self.started);
        let t = time_of(m);
        FileAttr {
            ino: INodeNo(ino),
            size: n.size,
            blocks: n.size.div_ceil(512),
            atime: time_of(times.atime.unwrap_or(m)),
            mtime: t,
            // The daemon's own record of this mount's changes, the fspf's recorded change time
            // (which survives a remount), never before the modification time.
            ctime: time_of(times.ctime.max(n.ctime.unwrap_or(0)).max(m)),
            crtime: t,
            kind,
            perm: (n.mode & 0o7777) as u16,
            nlink,
            uid: n.owner.map_or(self.uid, |o| o.uid),
            gid: n.owner.map_or(self.gid, |o| o.gid),
            rdev,
            blksize: 4096,
            flags: 0,
        }
    }

    fn child(st: &State, parent: u64, name: &OsStr) -> Result<EmbedPath, c_int> {
        if name.len() > 255 {
            return Err(libc::ENAMETOOLONG);
        }
        let p = st.inodes.path(parent).ok_or(libc::ENOENT)?;
        p.join(name.as_bytes()).map_err(|_| libc::EINVAL)
    }

    /// Lookup of `ep` and its attributes. A hard link is its target's inode.
    fn entry(&self, st: &mut State, ep: &EmbedPath) -> Result<FileAttr, c_int> {
        let (target, n) =
            st.s.lookup_at(&Live(&st.live), ep)
                .map_err(ViewError::errno)?;
        let ino = st.inodes.ino(target.as_ref().unwrap_or(ep));
        Ok(self.attr(st, ino, &n))
    }

    /// The buffer of `ep` (made from its current content if none), for writing.
    fn buffer(&self, st: &mut State, ep: &EmbedPath, truncate: bool) -> Result<Shared, c_int> {
        if let Some(b) = st.live.get(ep) {
            let b = b.clone();
            if truncate {
                lock(&b).set_len(0).map_err(|_| libc::EIO)?;
            }
            return Ok(b);
        }
        let n = st.s.lookup(&Live(&st.live), ep).map_err(ViewError::errno)?;
        if n.kind != NodeKind::File {
            return Err(libc::EISDIR);
        }
        let mut b = st.new_buffer(ep, n.mode, n.mtime.unwrap_or(self.started))?;
        b.owner = n.owner;
        if truncate {
            // O_TRUNC of an existing file moves its modification time (POSIX), even when empty.
            b.dirty = true;
            b.mtime = now_ns();
        } else if let Some(r) = self.unloaded(st, ep) {
            // Nothing is loaded: reads of what is not written come from the committed file.
            b.len = r.size();
            b.file.set_len(b.len).map_err(|_| libc::EIO)?;
            b.base =
                st.s.vol()
                    .and_then(|v| v.lookup(ep))
                    .and_then(|e| e.kind.version());
            b.written = Some(Written::new(b.len));
            b.under = Some(Under {
                reader: Box::new(r),
                holds: Written::new(b.len),
            });
        } else {
            let h = self.reader(st, ep)?;
            let mut chunk = vec![0u8; 1 << 20];
            let mut off = 0u64;
            loop {
                let k = read_handle(&h, ep, &mut chunk, off)?;
                if k == 0 {
                    break;
                }
                b.write_at(&chunk[..k], off).map_err(|_| libc::EIO)?;
                off += k as u64;
            }
            b.dirty = false;
            b.base =
                st.s.vol()
                    .and_then(|v| v.lookup(ep))
                    .and_then(|e| e.kind.version());
            b.written = Some(Written::new(b.len));
        }
        let b = Arc::new(Mutex::new(b));
        st.live.insert(ep.clone(), b.clone());
        Ok(b)
    }

    /// A verified reader of `ep`'s committed state, for a buffer that is not loaded: a kernel
    /// file of more than [`UNLOADED_MIN`] bytes (a small one is cheaper to load than to read
    /// around). `FSPF_FUSE_LOAD=1` loads every buffer whole.
    fn unloaded(&self, st: &State, ep: &EmbedPath) -> Option<KernelReader> {
        if st.s.is_ephemeral(ep) || std::env::var_os("FSPF_FUSE_LOAD").is_some_and(|v| v == "1") {
            return None;
        }
        let r = st.s.vol()?.open_file(ep).ok()?;
        (r.size() > UNLOADED_MIN).then_some(r)
    }

    /// A read-only handle on the current content of `ep`.
    fn reader(&self, st: &State, ep: &EmbedPath) -> Result<Handle, c_int> {
        if let Some(b) = st.live.get(ep) {
            return Ok(Handle::Buf {
                buf: b.clone(),
                write: false,
            });
        }
        if st.s.is_ephemeral(ep) {
            return match st.s.open_ephemeral(ep).map_err(ViewError::errno)? {
                EphemeralContent::Plain(d) => Ok(Handle::Plain(d)),
                EphemeralContent::Sealed(r) => Ok(Handle::Mem(Arc::new(Mutex::new(*r)))),
            };
        }
        let vol = st.s.vol().ok_or(libc::EACCES)?;
        let r = vol.open_file(ep).map_err(|e| core_errno(ep, &e))?;
        Ok(Handle::Kernel(Arc::new(Mutex::new(r))))
    }

    fn add_handle(&self, st: &mut State, ino: u64, h: Handle) -> u64 {
        *st.opens.entry(ino).or_default() += 1;
        let mut hs = self.handles();
        let fh = hs.next;
        hs.next += 1;
        hs.map.insert(fh, h);
        fh
    }

    fn release_handle(&self, st: &mut State, ino: u64, fh: u64) -> Result<(), c_int> {
        if let Some(n) = st.opens.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                st.opens.remove(&ino);
                st.gone.remove(&ino);
            }
        }
        let removed = self.handles().map.remove(&fh);
        let Some(Handle::Buf { buf, write: true }) = removed else {
            return Ok(());
        };
        let last = {
            let mut g = lock(&buf);
            g.writers = g.writers.saturating_sub(1);
            g.writers == 0
        };
        if last {
            // A small new file is staged with the others at the commit (`stage_all_with`),
            // which writes their shadows together (on the pool), not one at a time while the
            // program waits for its next request.
            if st.waits_for_commit(&lock(&buf)) {
                st.closed_small += 1;
                st.mark();
                if st.s.batch_full_with(st.closed_small) {
                    st.commit()?;
                }
                return Ok(());
            }
            st.stage(&buf)?;
            if st.s.batch_full() {
                st.commit()?;
            }
            // A writer that synced before closing (`dd conv=fsync`) committed already: its
            // buffer is idle now, and would otherwise hold the file until the next commit.
            st.drop_idle();
        }
        Ok(())
    }
}

/// Largest new file a close leaves for the commit to stage with the others ([`small_new`]):
/// the size of files that ride in a commit's log record (FORMAT.md §5b).
const SMALL_NEW_MAX: u64 = 32 << 10;

/// A new file nobody holds open, not staged yet, of at most [`SMALL_NEW_MAX`] bytes, all in
/// its memfd: staged at the commit, with the others ([`State::stage_small`]).
fn small_new(g: &Buf) -> bool {
    g.dirty
        && !g.detached
        && g.writers == 0
        && g.base.is_none()
        && g.under.is_none()
        && g.stream.is_none()
        && g.len <= SMALL_NEW_MAX
}

/// Fill `out` from `off` with `read` (a reader's `read_at`), up to the end of the file.
fn fill<E>(
    out: &mut [u8],
    off: u64,
    mut read: impl FnMut(&mut [u8], u64) -> Result<usize, E>,
) -> Result<usize, E> {
    let mut done = 0;
    while done < out.len() {
        let n = read(&mut out[done..], off + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// Bytes `[off, off + out.len())` of what `h` reads (fewer at its end); a core error is
/// reported ([`core_errno`]) under the name `ep`.
fn read_handle(
    h: &Handle,
    ep: &dyn std::fmt::Display,
    out: &mut [u8],
    off: u64,
) -> Result<usize, c_int> {
    match h {
        Handle::Kernel(r) => read_kernel(&mut lock(r), out, off).map_err(|e| core_errno(ep, &e)),
        Handle::Mem(r) => {
            let mut r = lock(r);
            fill(out, off, |b, o| r.read_at(b, o)).map_err(|e| core_errno(ep, &e))
        }
        Handle::Plain(d) => {
            let start = (off.min(d.len() as u64)) as usize;
            let n = (d.len() - start).min(out.len());
            out[..n].copy_from_slice(&d[start..start + n]);
            Ok(n)
        }
        Handle::Buf { buf, .. } => {
            let mut g = lock(buf);
            fill(out, off, |b, o| g.read_at(b, o)).map_err(|_| libc::EIO)
        }
    }
}

fn read_kernel(r: &mut KernelReader, out: &mut [u8], off: u64) -> fspf_core::Result<usize> {
    fill(out, off, |b, o| r.read_at(b, o))
}

/// What a write into a buffer leaves to do, under the State lock (neither in an ephemeral
/// region, which the caller checks).
enum AfterWrite {
    /// A new file written in order holds [`STREAM_PIECE`] not sealed yet: seal its whole
    /// chunks, so that the daemon holds at most about that much of it.
    Stream,
    /// A committed file had [`STREAM_PIECE`] written since it was staged: commit them.
    Commit,
}

impl FspfFs {
    fn after_write(g: &Buf) -> Option<AfterWrite> {
        let unsealed = g
            .filled()
            .saturating_sub(g.stream.as_ref().map_or(0, |s| s.end()));
        if unsealed >= STREAM_PIECE
            && g.under.is_none()
            && g.base.is_none()
            && !g.stream.as_ref().is_some_and(|s| s.finished())
        {
            Some(AfterWrite::Stream)
        } else if g.unstaged >= STREAM_PIECE && g.under.is_some() {
            Some(AfterWrite::Commit)
        } else {
            None
        }
    }

    /// Bytes of an open file for a `read` request (see [`Filesystem::read`] for the locks).
    fn read_at(&self, ino: u64, h: &Handle, out: &mut [u8], off: u64) -> Result<usize, c_int> {
        let first = match h {
            Handle::Kernel(r) => read_kernel(&mut lock(r), out, off),
            Handle::Mem(r) => {
                let mut r = lock(r);
                fill(out, off, |b, o| r.read_at(b, o))
            }
            Handle::Plain(_) => return read_handle(h, &"", out, off),
            Handle::Buf { buf, .. } => {
                let st = self.state();
                let mut g = lock(buf);
                drop(st);
                return fill(out, off, |b, o| g.read_at(b, o)).map_err(|_| libc::EIO);
            }
        };
        let e = match first {
            Ok(n) => return Ok(n),
            Err(e) => e,
        };
        // A failure is looked at under the State lock: a commit that was under way is over.
        let st = self.state();
        let ep = st.inodes.path(ino);
        let name: &dyn std::fmt::Display = match ep {
            Some(ep) => ep,
            None => &"an open file whose name is gone",
        };
        if let Handle::Kernel(r) = h {
            let mut r = lock(r);
            // A format-2 file this daemon updated in place since the handle was opened (or
            // while this read ran without the State lock): the handle's reader knows the old
            // root. Read the committed state, once, here under the State lock (no update can
            // run meanwhile); the handle keeps the fresh reader.
            if r.tree_mut().is_some() {
                if let Some(fresh) = ep.and_then(|ep| st.s.vol()?.open_file(ep).ok()) {
                    *r = fresh;
                    return read_kernel(&mut r, out, off).map_err(|e| core_errno(name, &e));
                }
            }
        }
        Err(core_errno(name, &e))
    }
}

impl Filesystem for FspfFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        // The kernel keeps written pages and sends them in large writes (at close, fsync, or
        // when it writes back), not one request per `write(2)`. FSPF_FUSE_WRITEBACK=0: off.
        if std::env::var_os("FSPF_FUSE_WRITEBACK").is_none_or(|v| v != "0") {
            let _ = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE);
        }
        let ready = self
            .ready
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(f) = ready {
            f(self.anchor.current());
        }
        Ok(())
    }

    fn destroy(&mut self) {
        let mut st = self.state();
        if let Err(e) = st.commit() {
            eprintln!("fspf mount: final commit failed (errno {e}): changes since the last commit are lost");
        }
        if let Err(e) = st.s.settle_journals() {
            eprintln!(
                "fspf mount: could not settle update journals ({e:?}): the next open applies them"
            );
        }
        self.anchor.settle();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let parent = parent.0;
        let mut st = self.state();
        let r = Self::child(&st, parent, name).and_then(|ep| self.entry(&mut st, &ep));
        reply_entry(reply, r)
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let ino = ino.0;
        let mut st = self.state();
        let r = match st.inodes.path(ino).cloned() {
            Some(ep) => self.entry(&mut st, &ep),
            None => Err(libc::ENOENT),
        };
        match (r, st.gone.get(&ino).copied()) {
            (Ok(a), _) => reply.attr(&TTL, &a),
            // An open file without a name (`fstat` after `unlink`): no links, and the size its
            // handle sees.
            (Err(libc::ENOENT), Some(mut a)) => {
                if let Some(Handle::Buf { buf, .. }) = fh.and_then(|f| self.handle(f.0)) {
                    a.size = lock(&buf).len;
                    a.blocks = a.size.div_ceil(512);
                }
                reply.attr(&TTL, &a)
            }
            (Err(e), _) => reply.error(eno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ino = ino.0;
        let mut guard = self.state();
        let st = &mut *guard;
        let Some(ep) = st.inodes.path(ino).cloned() else {
            // An open file whose last name went: `fsync`, `ftruncate`, `fchmod` of it, and the
            // times the kernel sends when it is synced or closed, change what `fstat` shows.
            let Some(mut a) = st.gone.get(&ino).copied() else {
                return reply.error(Errno::ENOENT);
            };
            let buf = match fh.and_then(|f| self.handle(f.0)) {
                Some(Handle::Buf { buf, .. }) => Some(buf),
                _ => None,
            };
            if let Some(len) = size {
                if let Some(b) = &buf {
                    if let Err(e) = lock(b).set_len(len) {
                        return reply.error(eno(os_errno(&e)));
                    }
                }
                a.size = len;
            }
            if let Some(m) = mode {
                a.perm = (m & 0o7777) as u16;
            }
            a.uid = uid.unwrap_or(a.uid);
            a.gid = gid.unwrap_or(a.gid);
            if let Some(t) = mtime {
                a.mtime = time_of(ns_of(t));
            }
            if let Some(t) = atime {
                a.atime = time_of(ns_of(t));
            }
            a.ctime = SystemTime::now();
            if let Some(b) = &buf {
                a.size = lock(b).len;
            }
            a.blocks = a.size.div_ceil(512);
            st.gone.insert(ino, a);
            return reply.attr(&TTL, &a);
        };
        let r = (|| -> Result<FileAttr, c_int> {
            if uid.is_some() || gid.is_some() {
                // The kernel checked who may change owners (`default_permissions`).
                let cur =
                    st.s.lookup(&Live(&st.live), &ep)
                        .map_err(ViewError::errno)?
                        .owner
                        .unwrap_or(Owner {
                            uid: self.uid,
                            gid: self.gid,
                        });
                let owner = Owner {
                    uid: uid.unwrap_or(cur.uid),
                    gid: gid.unwrap_or(cur.gid),
                };
                st.s.chown(&Live(&st.live), &ep, owner, now_ns())
                    .map_err(ViewError::errno)?;
                if let Some(b) = st.live.get(&ep) {
                    lock(b).owner = Some(owner);
                }
                st.mark();
            }
            if let Some(len) = size {
                st.s.check_writable(&ep).map_err(ViewError::errno)?;
                let b = self.buffer(st, &ep, false)?;
                let idle = {
                    let mut g = lock(&b);
                    g.set_len(len).map_err(|e| os_errno(&e))?;
                    g.writers == 0
                };
                if idle {
                    st.stage(&b)?;
                }
            }
            if let Some(m) = mode {
                st.s.chmod(&Live(&st.live), &ep, m, now_ns())
                    .map_err(ViewError::errno)?;
                if let Some(b) = st.live.get(&ep) {
                    lock(b).mode = m & 0o7777;
                }
                st.mark();
            }
            if let Some(t) = mtime {
                let ns = ns_of(t);
                let link = matches!(
                    st.s.lookup(&Live(&st.live), &ep).map(|n| n.kind),
                    Ok(NodeKind::Symlink(_))
                );
                if link {
                    // A symlink's own times (`utimensat` with AT_SYMLINK_NOFOLLOW): the fspf
                    // records none; kept for the life of the mount like ctime.
                    st.times.entry(ino).or_default().mtime = Some(ns);
                } else {
                    st.s.set_mtime(&Live(&st.live), &ep, ns)
                        .map_err(ViewError::errno)?;
                    if let Some(b) = st.live.get(&ep) {
                        let mut g = lock(b);
                        g.mtime = ns;
                        g.mtime_set = true;
                    }
                    st.times.entry(ino).or_default().mtime = None;
                    st.mark();
                }
            }
            if let Some(t) = atime {
                st.times.entry(ino).or_default().atime = Some(ns_of(t));
            }
            st.changed(ino);
            self.entry(st, &ep)
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(eno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let st = self.state();
        let Some(ep) = st.inodes.path(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        match st.s.lookup(&Live(&st.live), ep).map(|n| n.kind) {
            Ok(NodeKind::Symlink(t)) => reply.data(&t),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(eno(e.errno())),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let special = match (SpecialKind::from_mode(mode), mode & libc::S_IFMT) {
            (None, libc::S_IFREG) => None,
            (Some(k), _) => Some(k),
            (None, _) => return reply.error(Errno::EINVAL),
        };
        let parent = parent.0;
        let mut guard = self.state();
        let st = &mut *guard;
        let r = Self::child(st, parent, name).and_then(|ep| {
            let (owner, mode) = self.new_owner(st, req, &ep, mode & !umask, false);
            match special {
                None => {
                    let b = self.new_file(st, &ep, mode, owner)?;
                    st.stage(&b)?;
                }
                Some(kind) => {
                    st.stage_all()?;
                    let r = st.s.mknod(
                        &Live(&st.live),
                        &ep,
                        kind,
                        u64::from(rdev),
                        mode,
                        Some(owner),
                        now_ns(),
                    );
                    st.committed(r)?;
                }
            }
            st.dir_changed(parent);
            self.entry(st, &ep)
        });
        reply_entry(reply, r)
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let parent = parent.0;
        let mut guard = self.state();
        let st = &mut *guard;
        let r = Self::child(st, parent, name).and_then(|ep| {
            let (owner, mode) = self.new_owner(st, req, &ep, mode & !umask & 0o7777, true);
            st.s.mkdir(&Live(&st.live), &ep, mode, Some(owner), now_ns())
                .map_err(ViewError::errno)?;
            st.mark();
            st.dir_changed(parent);
            self.entry(st, &ep)
        });
        reply_entry(reply, r)
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent.0, name, false, reply)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent.0, name, true, reply)
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let (ino, newparent) = (ino.0, newparent.0);
        let mut guard = self.state();
        let st = &mut *guard;
        let r = (|| -> Result<FileAttr, c_int> {
            let target = st.inodes.path(ino).cloned().ok_or(libc::ENOENT)?;
            let ep = Self::child(st, newparent, newname)?;
            if !st.s.is_ephemeral(&ep) {
                // The file's written bytes are staged, so the link names a listed version.
                st.stage_all()?;
            }
            let r = st.s.link(&Live(&st.live), &target, &ep, now_ns());
            st.committed(r)?;
            st.changed(ino);
            st.dir_changed(newparent);
            self.entry(st, &ep)
        })();
        reply_entry(reply, r)
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let parent = parent.0;
        let mut guard = self.state();
        let st = &mut *guard;
        let r = Self::child(st, parent, link_name).and_then(|ep| {
            if !st.s.is_ephemeral(&ep) {
                st.stage_all()?;
            }
            let (owner, _) = self.new_owner(st, req, &ep, 0o777, false);
            let r = st.s.symlink(
                &Live(&st.live),
                target.as_os_str().as_bytes(),
                &ep,
                Some(owner),
                now_ns(),
            );
            st.committed(r)?;
            st.dir_changed(parent);
            self.entry(st, &ep)
        });
        reply_entry(reply, r)
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (parent, newparent, flags) = (parent.0, newparent.0, flags.bits());
        let mut guard = self.state();
        let st = &mut *guard;
        let r = (|| -> Result<(), c_int> {
            let from = Self::child(st, parent, name)?;
            let to = Self::child(st, newparent, newname)?;
            if !st.s.is_ephemeral(&from) {
                st.stage_all()?;
            }
            let r = st.s.rename(&Live(&st.live), &from, &to, flags);
            let kept = match st.committed(r)? {
                Renamed::Nothing => return Ok(()),
                Renamed::Moved { kept } => kept,
            };
            if let Some(k) = kept {
                // The replaced file had hard links: it lives on at one of them.
                st.moved(&to, &k);
            }
            let target = st.s.canonical(&Live(&st.live), &to);
            if target != to {
                // A hard link moved: the file it names changed status. (Nothing is keyed by
                // the link's name, so the move below only drops what `to` held.)
                if let Some(&i) = st.inodes.by_path.get(&target) {
                    st.changed(i);
                }
            }
            st.moved(&from, &to);
            st.dir_changed(parent);
            st.dir_changed(newparent);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(eno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (ino, flags) = (ino.0, flags.0);
        let mut guard = self.state();
        let st = &mut *guard;
        let r = (|| -> Result<(u64, FopenFlags), c_int> {
            let ep = st.inodes.path(ino).cloned().ok_or(libc::ENOENT)?;
            let n =
                st.s.lookup(&Live(&st.live), &ep)
                    .map_err(ViewError::errno)?;
            if n.kind == NodeKind::Dir {
                return Err(libc::EISDIR);
            }
            let acc = flags & libc::O_ACCMODE;
            let write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
            let trunc = flags & libc::O_TRUNC != 0;
            if write || trunc {
                st.s.check_writable(&ep).map_err(ViewError::errno)?;
                st.cached.remove(&ino);
                if trunc {
                    st.changed(ino);
                }
                let b = self.buffer(st, &ep, trunc)?;
                if write {
                    lock(&b).writers += 1;
                    let fh = self.add_handle(
                        st,
                        ino,
                        Handle::Buf {
                            buf: b,
                            write: true,
                        },
                    );
                    return Ok((fh, FopenFlags::empty()));
                }
                st.stage(&b)?;
            }
            let h = self.reader(st, &ep)?;
            // A committed version read before through this mount: the kernel's pages of it are
            // still its verified plaintext (every change through the mount goes through them).
            let mut keep = FopenFlags::empty();
            if let Handle::Kernel(_) = &h {
                let v = st.s.vol().and_then(|v| v.lookup(&ep)?.kind.version());
                match v {
                    Some(v) => {
                        if st.cached.insert(ino, v) == Some(v) {
                            keep = FopenFlags::FOPEN_KEEP_CACHE;
                        }
                    }
                    None => {
                        st.cached.remove(&ino);
                    }
                }
            } else {
                st.cached.remove(&ino);
            }
            Ok((self.add_handle(st, ino, h), keep))
        })();
        match r {
            Ok((fh, keep)) => reply.opened(FileHandle(fh), keep),
            Err(e) => reply.error(eno(e)),
        }
    }

    /// Served without the State lock wherever it can be: a verified reader (a kernel file, a
    /// sealed ephemeral file) or an ephemeral plaintext is read holding only its own lock, so
    /// that reads of different files decrypt at once on different session threads, and a
    /// commit does not hold them up. A buffer is locked under the State lock (no commit is then
    /// under way: its committed part, read through `Buf::under`, may be updated in place only
    /// by a commit, which stages the buffer under its lock first) and read after the State lock
    /// is let go.
    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.spin.touch();
        let Some(h) = self.handle(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        READ_BUF.with_borrow_mut(|buf| {
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            let out = &mut buf[..size as usize];
            match self.read_at(ino.0, &h, out, offset) {
                Ok(n) => reply.data(&out[..n]),
                Err(e) => reply.error(eno(e)),
            }
        })
    }

    /// The State lock is held to find the buffer, to move the inode's change time and to lock
    /// the buffer; the bytes are written into it after the State lock is let go (with the
    /// buffer's lock held: no commit can stage it meanwhile). What may follow, sealing a piece
    /// of a stream or committing a large writer's bytes, takes the State lock again first.
    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut st = self.state();
        st.changed(ino.0);
        let Some(Handle::Buf { buf, write: true }) = self.handle(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let mut g = lock(&buf);
        drop(st);
        // A write moves the modification time, also past one a program set before it.
        g.mtime = now_ns();
        g.mtime_set = false;
        if let Err(e) = g.write_at(data, offset) {
            return reply.error(eno(os_errno(&e)));
        }
        let next = Self::after_write(&g);
        drop(g);
        if next.is_some() {
            // In lock order: the State, then the buffer; what the write left is looked at again.
            let mut st = self.state();
            let (next, ephemeral) = {
                let g = lock(&buf);
                (Self::after_write(&g), st.s.is_ephemeral(&g.path))
            };
            match next {
                _ if ephemeral => {}
                Some(AfterWrite::Stream) => {
                    let mut g = lock(&buf);
                    if let Err(e) = st.stream_more(&mut g) {
                        eprintln!(
                            "fspf mount: {}: sealing while written failed (errno {e}); it stays in memory",
                            g.path
                        );
                    }
                }
                Some(AfterWrite::Commit) => {
                    // A committed file written on (a large file across a commit): what was
                    // written is committed now as an in-place update (appended chunks are
                    // written once), so the buffer holds at most about this much and no commit
                    // has to seal the file whole again.
                    let r = st.stage(&buf).and_then(|()| st.commit());
                    if let Err(e) = r {
                        eprintln!("fspf mount: committing a large writer's bytes failed (errno {e}); they stay in memory");
                    }
                }
                None => {}
            }
        }
        reply.written(data.len() as u32);
    }

    /// Nothing to do at `close`: a file is staged when its last writer releases it, and the
    /// kernel has written its dirty pages back before it sends `FLUSH`. `ENOSYS` tells the kernel
    /// so once: it stops sending `FLUSH` (one request less per `close`; it still writes the
    /// pages back first).
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.state();
        match self.release_handle(&mut st, ino.0, fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(eno(e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.state();
        let (committed, staged) = st.commit_parts(Streams::Finish);
        // The commit is the whole daemon's, but the answer is this file's: another file that
        // found no room (a large one that stays in memory) fails its own `fsync`, not this one's.
        let r = committed.and_then(|()| match staged {
            Err(e) if st.unstaged(ino.0) => Err(e),
            _ => Ok(()),
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(eno(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut guard = self.state();
        let st = &mut *guard;
        let Some(ep) = st.inodes.path(ino.0).cloned() else {
            return reply.error(Errno::ENOENT);
        };
        match st.s.lookup(&Live(&st.live), &ep) {
            Ok(n) if n.kind == NodeKind::Dir => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(eno(e.errno())),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let ino = ino.0;
        let mut guard = self.state();
        let st = &mut *guard;
        let Some(ep) = st.inodes.path(ino).cloned() else {
            return reply.error(Errno::ENOENT);
        };
        let parent = if ep == self.root {
            1
        } else {
            let p = ep.parent().unwrap_or_else(EmbedPath::root);
            st.inodes.ino(&p)
        };
        let mut entries: Vec<(u64, FileType, Vec<u8>)> = vec![
            (ino, FileType::Directory, b".".to_vec()),
            (parent, FileType::Directory, b"..".to_vec()),
        ];
        for (name, kind) in st.s.children(&Live(&st.live), &ep) {
            let Ok(p) = ep.join(&name) else { continue };
            let t = match kind {
                ChildKind::Dir => FileType::Directory,
                ChildKind::File => FileType::RegularFile,
                ChildKind::Symlink => FileType::Symlink,
                // The listing does not say which kind; `lookup` does.
                ChildKind::Special => FileType::NamedPipe,
            };
            let p = match kind {
                ChildKind::File | ChildKind::Special => st.s.canonical(&Live(&st.live), &p),
                _ => p,
            };
            entries.push((st.inodes.ino(&p), t, name));
        }
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, t, name)) in entries.into_iter().enumerate().skip(skip) {
            if reply.add(INodeNo(ino), (i + 1) as u64, t, OsStr::from_bytes(&name)) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ds: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.state();
        match st.commit() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(eno(e)),
        }
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let st = self.state();
        let dir = st
            .inodes
            .path(ino.0)
            .and_then(|ep| st.s.region_of(ep))
            .and_then(|r| match &r.kind {
                fspf_core::RegionKind::Kernel(k) => Some(k.clone()),
                fspf_core::RegionKind::Ephemeral => None,
            })
            .or_else(|| {
                st.s.vol()
                    .and_then(|v| v.path().parent().map(Path::to_path_buf))
            });
        // The kernel directory's figures, read without the State lock.
        drop(st);
        match dir.map(rustix::fs::statvfs) {
            Some(Ok(v)) => reply.statfs(
                v.f_blocks,
                v.f_bfree,
                v.f_bavail,
                v.f_files,
                v.f_ffree,
                v.f_bsize as u32,
                255,
                v.f_frsize as u32,
            ),
            _ => reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let parent = parent.0;
        let mut guard = self.state();
        let st = &mut *guard;
        let r = (|| -> Result<(FileAttr, u64), c_int> {
            let ep = Self::child(st, parent, name)?;
            let (owner, mode) = self.new_owner(st, req, &ep, mode & !umask, false);
            let b = self.new_file(st, &ep, mode, owner)?;
            let acc = flags & libc::O_ACCMODE;
            let h = if acc == libc::O_RDONLY {
                st.stage(&b)?;
                Handle::Buf {
                    buf: b,
                    write: false,
                }
            } else {
                lock(&b).writers += 1;
                Handle::Buf {
                    buf: b,
                    write: true,
                }
            };
            let ino = st.inodes.ino(&ep);
            let fh = self.add_handle(st, ino, h);
            st.dir_changed(parent);
            Ok((self.entry(st, &ep)?, fh))
        })();
        match r {
            Ok((a, fh)) => {
                reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(eno(e)),
        }
    }
}

impl FspfFs {
    /// A new, empty regular file at `ep` (its buffer, dirty so that it is staged even empty).
    fn new_file(
        &self,
        st: &mut State,
        ep: &EmbedPath,
        mode: u32,
        owner: Owner,
    ) -> Result<Shared, c_int> {
        st.s.check_new_name(&Live(&st.live), ep)
            .map_err(ViewError::errno)?;
        let mut b = st.new_buffer(ep, mode & 0o7777, now_ns())?;
        b.dirty = true;
        b.owner = Some(owner);
        let b = Arc::new(Mutex::new(b));
        st.live.insert(ep.clone(), b.clone());
        Ok(b)
    }

    /// The owner of a new entry at `ep` made by `req`, and its mode: the caller's user, and the
    /// parent directory's group when that has the set-group-id bit (which a new directory
    /// inherits), else the caller's group, as Linux does.
    fn new_owner(
        &self,
        st: &State,
        req: &Request,
        ep: &EmbedPath,
        mode: u32,
        dir: bool,
    ) -> (Owner, u32) {
        // A parent without a recorded owner belongs to the mounting user.
        st.s.new_owner(
            &Live(&st.live),
            ep,
            req.uid(),
            req.gid(),
            self.gid,
            mode,
            dir,
        )
    }

    fn remove(&self, parent: u64, name: &OsStr, dir: bool, reply: ReplyEmpty) {
        let mut guard = self.state();
        let st = &mut *guard;
        let r = (|| -> Result<(), c_int> {
            let ep = Self::child(st, parent, name)?;
            let target = st.s.link_target(&Live(&st.live), &ep);
            // An open file losing its last name: `fstat` of its handles still answers.
            let before = match st.inodes.by_path.get(target.as_ref().unwrap_or(&ep)) {
                Some(i) if st.opens.contains_key(i) => self.entry(st, &ep).ok(),
                _ => None,
            };
            let kept = st.s.unlink(&Live(&st.live), &ep, dir);
            let gone = match st.committed(kept)? {
                // The file had hard links: it lives on at one of them.
                Some(k) => {
                    st.moved(&ep, &k);
                    false
                }
                None => {
                    st.detach(&ep);
                    // Not a name of a file that lives on under another.
                    target.is_none()
                }
            };
            // The file lost a name (its link count, its status change time).
            if let Some(&i) = st.inodes.by_path.get(target.as_ref().unwrap_or(&ep)) {
                st.changed(i);
            }
            if let Some(mut a) = before.filter(|a| a.nlink <= 1) {
                a.nlink = 0;
                a.ctime = SystemTime::now();
                st.gone.insert(a.ino.0, a);
            }
            if gone {
                // Its inode number goes with it: a file made at the same path gets a new one,
                // never the number (and so the kernel inode and page cache) of the removed file
                // that is still open (SQLite's WAL, removed by one process and made again by
                // another while a third still holds the old one).
                if let Some(i) = st.inodes.forget(&ep) {
                    st.cached.remove(&i);
                }
            }
            if gone {
                // Its inode number goes with it: a file made at the same path gets a new one,
                // never the number (and so the kernel inode and page cache) of the removed file
                // that is still open (SQLite's WAL, removed by one process and made again by
                // another while a third still holds the old one).
                if let Some(i) = st.inodes.forget(&ep) {
                    st.cached.remove(&i);
                }
            }
            st.dir_changed(parent);
            st.mark();
            if st.s.batch_full() {
                st.commit()?;
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(eno(e)),
        }
    }
}

/// The FUSE file type of a special entry.
fn file_type(k: SpecialKind) -> FileType {
    match k {
        SpecialKind::Fifo => FileType::NamedPipe,
        SpecialKind::Char => FileType::CharDevice,
        SpecialKind::Block => FileType::BlockDevice,
        SpecialKind::Socket => FileType::Socket,
    }
}

fn reply_entry(reply: ReplyEntry, r: Result<FileAttr, c_int>) {
    match r {
        Ok(a) => reply.entry(&TTL, &a, Generation(0)),
        Err(e) => reply.error(eno(e)),
    }
}

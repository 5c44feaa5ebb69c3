//! The shielded open itself, below the hooks: what a path of a protected region opens to (a
//! verified read-only body, a write buffer, a directory placeholder), registering it in the fd
//! table, and releasing an fd table entry. The open, fopen, temp-file, directory, namespace and
//! process hooks all call this layer; it calls no hook.
use crate::files::{self, Body, Handle, OpenFile, WriteBuf};
use crate::shield::{self, errno_of, Inner, NodeKind, Route, Shield};
use crate::{log, real};
use fspf_core::format::metadata::{FileKind, Protection, RegionKind};
use fspf_core::session::EphemeralContent;
use fspf_core::EmbedPath;
use libc::{c_int, mode_t};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// The errno for a core error while opening or reading `ep`. Only data that failed
/// verification marks the process (it then cannot exit 0); a machine error keeps its errno.
fn map_core(ep: &EmbedPath, e: fspf_core::Error) -> c_int {
    use fspf_core::Error as E;
    let m = format!("{ep}: {e}");
    log(&m);
    if e.is_integrity() {
        crate::integrity_failure(&m);
        return libc::EIO;
    }
    match e {
        E::NotListed { .. } => libc::ENOENT,
        E::Io { source, .. } => match source.raw_os_error() {
            Some(n) => n,
            None if source.kind() == std::io::ErrorKind::PermissionDenied => libc::EACCES,
            None => libc::EIO,
        },
        _ => libc::EIO,
    }
}

/// Files opened through stdio up to this size are verified completely at open: a program
/// reading through a FILE* may take a read error for end of file (Python parsing its script)
/// and must not act on a verified prefix of a tampered file.
const VERIFY_AT_OPEN_MAX: u64 = 4 << 20;

/// A verified reader of `ep`'s kernel file. When it fails verification at this process's state
/// of the run, another process may have committed a new version since (replacing the kernel
/// file between this process's last look at the run and the open): it is opened once more at the
/// run's current state, under the fspf's lock. What fails then is tampering.
fn open_kernel(
    inner: &mut Inner,
    ep: &EmbedPath,
) -> Result<fspf_core::volume::KernelReader, c_int> {
    let vol = inner.s.vol().ok_or(libc::EACCES)?;
    match vol.open_file(ep) {
        Ok(r) => Ok(r),
        Err(e) if e.is_integrity() => match inner.s.open_current(ep) {
            Ok(r) => Ok(r),
            Err(fspf_core::view::ViewError::Io) => Err(map_core(ep, e)),
            Err(v) => Err(errno_of(v)),
        },
        Err(e) => Err(map_core(ep, e)),
    }
}

/// Verified plaintext of the current version of `ep` (for opening it for writing).
pub(crate) fn load_plain(inner: &mut Inner, ep: &EmbedPath) -> Result<Vec<u8>, c_int> {
    let vol = inner.s.vol().ok_or(libc::EACCES)?;
    let region = vol.region_for(ep).ok_or(libc::ENOENT)?;
    if region.kind == RegionKind::Ephemeral {
        return match inner.s.open_ephemeral(ep).map_err(errno_of)? {
            EphemeralContent::Plain(d) => Ok((*d).clone()),
            EphemeralContent::Sealed(mut r) => read_all(ep, r.size(), |b, o| r.read_at(b, o)),
        };
    }
    let mut r = open_kernel(inner, ep)?;
    read_all(ep, r.size(), |b, o| r.read_at(b, o))
}

fn read_all(
    ep: &EmbedPath,
    size: u64,
    mut f: impl FnMut(&mut [u8], u64) -> fspf_core::Result<usize>,
) -> Result<Vec<u8>, c_int> {
    let mut v = vec![0u8; usize::try_from(size).map_err(|_| libc::EFBIG)?];
    let mut done = 0;
    while done < v.len() {
        let n = f(&mut v[done..], done as u64).map_err(|e| map_core(ep, e))?;
        if n == 0 {
            return Err(libc::EIO);
        }
        done += n;
    }
    Ok(v)
}

/// A live buffer is authoritative while someone writes it or its version is not committed;
/// a clean, committed one may be older than what another process of the run committed since.
fn live_is_current(b: &Arc<Mutex<WriteBuf>>) -> bool {
    let g = b.lock().unwrap_or_else(|e| e.into_inner());
    g.mirror || g.writers > 0 || g.pending || g.touched.load(Ordering::Relaxed)
}

/// A new buffer for `ep`: the run's shared one (`runbuf.rs`) when the run has a buffer
/// directory and the file is in a kernel region, else a private memfd. `true`: joined, another
/// process of the run holds it and its content is current (nothing to load).
fn new_buffer(
    inner: &Inner,
    ep: &EmbedPath,
    mode: u32,
    mtime: i64,
) -> Result<(WriteBuf, bool), c_int> {
    if !inner.s.is_ephemeral(ep) {
        match crate::runbuf::open(ep) {
            Some(crate::runbuf::Opened::Joined(fd)) => {
                return Ok((
                    WriteBuf::shared_file(ep.clone(), fd, mode, mtime, true)?,
                    true,
                ))
            }
            Some(crate::runbuf::Opened::Created(fd)) => {
                return Ok((
                    WriteBuf::shared_file(ep.clone(), fd, mode, mtime, false)?,
                    false,
                ))
            }
            None => {}
        }
    }
    Ok((WriteBuf::create(ep.clone(), mode, mtime)?, false))
}

/// This process's buffer of `ep` joined from the run's shared one, when another process of the
/// run has one (it may hold writes not sealed yet): reads see them, as on a kernel file system.
fn join_existing(
    inner: &mut Inner,
    ep: &EmbedPath,
    mode: u32,
    mtime: i64,
) -> Option<Arc<Mutex<WriteBuf>>> {
    if inner.s.is_ephemeral(ep) {
        return None;
    }
    let fd = crate::runbuf::existing(ep)?;
    let b = WriteBuf::shared_file(ep.clone(), fd, mode, mtime, true).ok()?;
    Some(keep_live(inner, b))
}

/// Make `b` this process's live buffer of its path (its fd the shield's own).
fn keep_live(inner: &mut Inner, b: WriteBuf) -> Arc<Mutex<WriteBuf>> {
    let ep = b.path.clone();
    let b = Arc::new(Mutex::new(b));
    files::register_own(&b);
    inner.live.insert(ep, b.clone());
    b
}

/// Fill a new buffer for `ep` with its current verified plaintext (streamed chunk by chunk).
fn load_buffer(inner: &mut Inner, ep: &EmbedPath, b: &WriteBuf) -> Result<(), c_int> {
    let vol = inner.s.vol().ok_or(libc::EACCES)?;
    let region = vol.region_for(ep).ok_or(libc::ENOENT)?;
    if region.kind == RegionKind::Ephemeral || region.protection == Protection::NotProtected {
        let data = load_plain(inner, ep)?;
        return b.write_all_at(&data, 0);
    }
    let mut r = open_kernel(inner, ep)?;
    // Verified in 1 MiB blocks (the two halves of a large file on two threads), each written
    // into the buffer once it verified: no copy of the whole file in memory.
    let sink = |off: u64, block: &[u8]| {
        b.write_all_at(block, off)
            .map_err(std::io::Error::from_raw_os_error)
    };
    r.for_each_verified(LOAD_BLOCK, sink)
        .map_err(|e| map_core(ep, e))
}

/// Block size of [`load_buffer`].
const LOAD_BLOCK: usize = 1 << 20;

/// Fill `b`, a new buffer of `ep` opened `O_WRONLY | O_APPEND`, with only the end of the file
/// ([`leave_unloaded`]), so appending to a large log costs what is appended, not a load of the
/// file into memory. `false`: not such a case (the caller tries [`load_lazily`], then loads
/// everything). Safe when the file is format 2 (its updates are tracked byte ranges or a diff
/// that skips the holes) and large (buffers of at most `HASH_MAX` are hashed whole).
fn load_tail(inner: &mut Inner, ep: &EmbedPath, b: &WriteBuf, flags: c_int) -> Result<bool, c_int> {
    if flags & libc::O_ACCMODE != libc::O_WRONLY
        || flags & libc::O_APPEND == 0
        || std::env::var_os("FSPF_LAZY_APPEND").is_some_and(|v| v == "0")
    {
        return Ok(false);
    }
    leave_unloaded(inner, ep, b)
}

/// Leave the content of `ep`, a format-2 file larger than `HASH_MAX` (its updates are tracked
/// byte ranges or a diff that skips holes; smaller buffers are hashed whole), unloaded but for
/// its last block: the buffer gets the file's length, the blocks below the last are a hole
/// recorded as unloaded, and whatever reads or partly overwrites a part loads that part first
/// ([`load_holes`]). Every hole is then equal to the committed file; every loaded or written
/// page holds content. `false`: not such a file, or the buffer file cannot record it (the
/// caller loads everything).
fn leave_unloaded(inner: &mut Inner, ep: &EmbedPath, b: &WriteBuf) -> Result<bool, c_int> {
    let chunk = chunk_of(inner, ep);
    let Some(vol) = inner.s.vol() else {
        return Ok(false);
    };
    // (A format-2 file: its entry has a tree root.)
    let size = match vol.lookup(ep).map(|e| e.into_owned().kind) {
        Some(FileKind::File {
            size,
            root: Some(_),
            ..
        }) => size,
        _ => return Ok(false),
    };
    if chunk == 0 || size <= files::HASH_MAX {
        return Ok(false);
    }
    let from = size / block_of(chunk) * block_of(chunk);
    // Holes must be page-sized: on a tmpfs with huge pages a small write would allocate (and
    // zero) a 2 MiB page around it, and zeros would pass for content.
    if b.page_size() != Some(PAGE) {
        return Ok(false);
    }
    b.set_len(size)?;
    if from == 0 || !b.mark_unloaded(from) {
        b.set_len(0)?;
        return Ok(false);
    }
    let mut r = open_kernel(inner, ep)?;
    load_range(ep, &mut r, b, from, size)?;
    b.record_seen(None);
    Ok(true)
}

/// What the shield loads at least at a time: whole pages (a hole is page-sized) of whole
/// chunks (a chunk is sealed from the buffer whole).
fn block_of(chunk: u64) -> u64 {
    chunk.max(PAGE)
}
const PAGE: u64 = 4096;

/// [`leave_unloaded`] for a buffer opened to read and write, or to write without appending
/// (unless `FSPF_LAZY_RDWR` is `0`): opening a 1 GiB database no longer loads 1 GiB into memory
/// (issue 8, bounded memory).
fn load_lazily(inner: &mut Inner, ep: &EmbedPath, b: &WriteBuf) -> Result<bool, c_int> {
    if std::env::var_os("FSPF_LAZY_RDWR").is_some_and(|v| v == "0") {
        return Ok(false);
    }
    leave_unloaded(inner, ep, b)
}

/// Copy the verified plaintext `[from, to)` of `r` into `b`.
fn load_range(
    ep: &EmbedPath,
    r: &mut fspf_core::volume::KernelReader,
    b: &WriteBuf,
    from: u64,
    to: u64,
) -> Result<(), c_int> {
    if r.size() < to {
        log(format!(
            "{ep}: the committed file is shorter ({} bytes) than the buffer's unloaded part ending at {to}",
            r.size()
        ));
        return Err(libc::EIO);
    }
    let mut block = vec![0u8; LOAD_BLOCK.min((to - from) as usize)];
    let mut off = from;
    while off < to {
        let n = ((to - off) as usize).min(block.len());
        r.read_exact_at(&mut block[..n], off)
            .map_err(|e| map_core(ep, e))?;
        b.write_all_at(&block[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Load everything a buffer left unloaded ([`leave_unloaded`]): before a whole-version seal,
/// a map, an `exec` that may run a program the hooks do not see, `SEEK_DATA`/`SEEK_HOLE`.
pub fn load_unloaded(inner: &mut Inner, b: &mut WriteBuf) -> Result<(), c_int> {
    load_all(inner, b, false)
}

/// [`load_unloaded`]; a stream sealing the buffer while written is read back and given up
/// (`never`: for good, a shared map reads the buffer's memory without the hooks).
fn load_all(inner: &mut Inner, b: &mut WriteBuf, never: bool) -> Result<(), c_int> {
    if b.streamable {
        let _lock = files::UnloadedLock::take(b.lock_fd()?)?;
        crate::stream::load_back(inner, b, never)?;
    }
    load_holes(inner, b, 0, u64::MAX)
}

/// Load the unloaded holes of `b` within `[from, to)` from the committed file (verified), once
/// for every process that shares the buffer: under the buffer's [`files::UnloadedLock`], each
/// hole found anew under it (another holder may have loaded it, and written it since). A
/// buffer changed unseen while holes remain is refused (`EIO`, `WriteBuf::changed_unseen`).
pub fn load_holes(inner: &mut Inner, b: &mut WriteBuf, from: u64, to: u64) -> Result<(), c_int> {
    if b.unloaded() == 0 {
        return Ok(());
    }
    let _lock = files::UnloadedLock::take(b.lock_fd()?)?;
    load_holes_locked(inner, b, from, to)
}

/// [`load_holes`] under the buffer's lock, which the caller holds.
fn load_holes_locked(inner: &mut Inner, b: &mut WriteBuf, from: u64, to: u64) -> Result<(), c_int> {
    let n = b.unloaded();
    if n == 0 {
        return Ok(());
    }
    if b.changed_unseen() {
        return Err(libc::EIO);
    }
    let holes = b.holes_in(from, to.min(n));
    if !holes.is_empty() {
        // Loading changes the buffer file's times, not its content: what was clean or
        // tracked before stays so.
        let tracked = b.tracked().is_some();
        let clean = b.fingerprint().ok() == Some(b.print);
        // One reader per committed version: its verified tree pages serve every later load.
        let current = inner
            .s
            .vol()
            .and_then(|v| v.lookup(&b.path))
            .and_then(|e| e.kind.version());
        let mut r = match (b.hole_reader.take(), current) {
            (Some((v, r)), Some(c)) if v == c => (v, r),
            (_, Some(c)) => (c, open_kernel(inner, &b.path)?),
            (_, None) => return Err(libc::EIO),
        };
        let filled = holes.iter().map(|(h, d)| d - h).sum();
        for (h, d) in holes {
            load_range(&b.path, &mut r.1, b, h, d)?;
        }
        b.hole_reader = Some(r);
        b.record_seen(Some(filled));
        let now = b.stat_now();
        if let (true, Some(t), Some(p)) = (tracked, b.track.as_mut(), now) {
            t.print = p;
        } else {
            b.track = None;
        }
        if clean {
            b.print = b.fingerprint()?;
        }
    }
    if from == 0 && to >= n && !b.hole_in(0, n) {
        b.mark_loaded();
    }
    Ok(())
}

/// The loads a hooked write needs before it lands (the caller then writes holding the returned
/// buffer mutex and lock, and records the write as seen with the hole bytes it fills in the
/// returned range): the unloaded parts of the
/// blocks the write of `len` bytes at `off` (the description's offset when `None`, the end
/// when `append`) covers only partly. `None`: nothing is unloaded.
#[allow(clippy::type_complexity)]
pub fn before_write(
    b: &Arc<Mutex<WriteBuf>>,
    fd: c_int,
    off: Option<u64>,
    len: u64,
    append: bool,
) -> Result<Option<WriteLocks<'_>>, c_int> {
    // (An append lands at the end, never below a stream's sealed part.)
    let at_of = |g: &WriteBuf| {
        if append {
            Ok(g.len())
        } else {
            crate::fdio::access_offset(fd, off)
        }
    };
    let Some((mut inner, mut g, lock, record)) = lock_access(b, &at_of, None)? else {
        return Ok(None);
    };
    let mut range = 0..0;
    if g.unloaded() > 0 {
        let at = at_of(&g)?;
        let end = at.saturating_add(len);
        range = at..end;
        let a = block_of(chunk_of(&inner, &g.path));
        let edges: Vec<u64> = [at, end]
            .into_iter()
            .filter(|p| !p.is_multiple_of(a))
            .collect();
        // (Each load checks for a change unseen first.)
        if edges.is_empty() && g.changed_unseen() {
            return Err(libc::EIO);
        }
        for p in edges {
            load_holes_locked(&mut inner, &mut g, p / a * a, p / a * a + a)?;
        }
    }
    // A streamable buffer keeps the shield's lock for what follows the write (`stream.rs`).
    let inner = record.map(|r| (inner, r));
    Ok(Some(WriteLocks {
        inner,
        g,
        lock,
        range,
    }))
}

/// After a hooked write of `n` bytes to a streamable buffer, with what it held while it wrote:
/// a stream's next pieces are sealed, or, when the buffer holds more than the stream threshold
/// above a committed part left unloaded, the buffer is committed (a commit point) and what it
/// committed punched out, so appending to a large file, or going on writing one after a commit
/// point, holds at most about the threshold too.
pub fn after_write<'a>(
    b: &'a Arc<Mutex<WriteBuf>>,
    mut inner: std::sync::MutexGuard<'static, Inner>,
    mut g: std::sync::MutexGuard<'a, WriteBuf>,
    lock: files::UnloadedLock,
    r: crate::stream::Record,
    n: u64,
) {
    if !crate::stream::after_write(&mut inner, &mut g, r, n) {
        return;
    }
    let block = block_of(chunk_of(&inner, &g.path));
    let Ok(Some(r)) = crate::stream::current(&mut g) else {
        return;
    };
    let Some(end) = crate::stream::commit_due(&g, &r, block) else {
        return;
    };
    let u = g.unloaded();
    let path = g.path.clone();
    // (The buffer's lock stays held: nothing writes it between the commit and the punch.)
    drop(g);
    if let Err(e) = shield::get().commit(&mut inner) {
        log(format!(
            "{path}: the commit of a buffer past its threshold failed (errno {e})"
        ));
        return;
    }
    let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
    crate::stream::punch_committed(&inner, &mut g, u, end);
    drop(g);
    drop(lock);
}

/// What a hooked write holds while it writes a buffer with unloaded parts, or a streamable
/// one: the buffer's mutex and lock, and for a streamable one the shield's lock (taken first).
pub struct WriteLocks<'a> {
    /// With the stream record read under the locks.
    pub inner: Option<(std::sync::MutexGuard<'static, Inner>, crate::stream::Record)>,
    pub g: std::sync::MutexGuard<'a, WriteBuf>,
    pub lock: files::UnloadedLock,
    pub range: std::ops::Range<u64>,
}

/// Before a hooked truncation to `len`: the unloaded part of the block that will hold the new
/// end is loaded, and a cut below the unloaded part leaves only what lies below the new end's
/// block unloaded. The caller truncates holding the returned buffer mutex and lock. `None`:
/// nothing is unloaded.
pub fn before_truncate(
    b: &Arc<Mutex<WriteBuf>>,
    len: u64,
) -> Result<Option<(std::sync::MutexGuard<'_, WriteBuf>, files::UnloadedLock)>, c_int> {
    let Some((mut inner, mut g, lock, _)) = lock_access(b, &|_: &WriteBuf| Ok(0), Some(len))?
    else {
        return Ok(None);
    };
    let n = g.unloaded();
    if len < n {
        let a = block_of(chunk_of(&inner, &g.path));
        // (A buffer of at most HASH_MAX bytes is hashed whole: it keeps no hole.)
        let from = if len <= files::HASH_MAX {
            0
        } else {
            len / a * a
        };
        load_holes_locked(&mut inner, &mut g, from, len)?;
        if from == 0 {
            g.mark_loaded();
        } else if !g.mark_unloaded(from) {
            return Err(libc::EIO);
        }
    } else if g.changed_unseen() {
        return Err(libc::EIO);
    }
    drop(inner);
    Ok(Some((g, lock)))
}

/// The shield's lock, `b`'s mutex and its unloaded lock, in that order, if part of `b` is
/// unloaded or `b` is streamable (`None`: neither, and nothing is held). An access from `from`
/// on (or a cut to `cut`) that reaches below a stream's sealed part commits it first.
#[allow(clippy::type_complexity)]
fn lock_access<'a>(
    b: &'a Arc<Mutex<WriteBuf>>,
    from: &dyn Fn(&WriteBuf) -> Result<u64, c_int>,
    cut: Option<u64>,
) -> Result<
    Option<(
        std::sync::MutexGuard<'static, Inner>,
        std::sync::MutexGuard<'a, WriteBuf>,
        files::UnloadedLock,
        Option<crate::stream::Record>,
    )>,
    c_int,
> {
    if unloaded_hint(b) {
        return Ok(None);
    }
    let sh = shield::get();
    let mut inner = sh.lock();
    // (Once committed, the stream's part is committed content: the second round holds.)
    for _ in 0..3 {
        let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
        if !g.streamable {
            if g.unloaded() == 0 {
                return Ok(None);
            }
            let lock = files::UnloadedLock::take(g.lock_fd()?)?;
            return Ok(Some((inner, g, lock, None)));
        }
        let lock = files::UnloadedLock::take(g.lock_fd()?)?;
        let r = crate::stream::current(&mut g)?;
        let first = match cut {
            Some(len) => crate::stream::before_cut(&mut inner, &mut g, len)?,
            // (Where the access lands is asked only when a stream has sealed a part.)
            None => match crate::stream::sealed_part(&r) {
                Some(end) => from(&g)? < end,
                None => false,
            },
        };
        if !first {
            let r = match cut {
                Some(_) => crate::stream::current(&mut g)?,
                None => r,
            };
            return Ok(Some((inner, g, lock, r)));
        }
        drop(lock);
        drop(g);
        settle(sh, &mut inner, b)?;
    }
    Err(libc::EIO)
}

/// Commit the stream of `b` (a commit point of this process: every changed buffer is staged
/// and committed), so its sealed part becomes committed content the holes load from; one that
/// this process cannot commit (not its live buffer of the path) is read back into the buffer.
fn settle(sh: &Shield, inner: &mut Inner, b: &Arc<Mutex<WriteBuf>>) -> Result<(), c_int> {
    let live = {
        let g = b.lock().unwrap_or_else(|e| e.into_inner());
        inner.live.get(&g.path).is_some_and(|x| Arc::ptr_eq(x, b))
    };
    if live {
        sh.commit(inner)?;
    }
    let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
    let _lock = files::UnloadedLock::take(g.lock_fd()?)?;
    crate::stream::load_back(inner, &mut g, false)
}

/// Before a hooked read of `n` bytes at `at`: the unloaded holes it covers are loaded; for a
/// streamable buffer (whose holes a stream's piece may make again) the returned locks are held
/// while the read runs.
pub fn before_read(
    b: &Arc<Mutex<WriteBuf>>,
    at: u64,
    n: u64,
) -> Result<Option<ReadLocks<'_>>, c_int> {
    // (Read under its mutex: a thread that makes it streamable, and then punches pieces out
    // of it, waits for the read.)
    let g = b.lock().unwrap_or_else(|e| e.into_inner());
    if !g.streamable {
        if g.unloaded.load(Ordering::Relaxed) == 0 {
            return Ok(Some(ReadLocks::Buf(g)));
        }
        drop(g);
        load_holes_of(b, at, at.saturating_add(n))?;
        let g = b.lock().unwrap_or_else(|e| e.into_inner());
        if !g.streamable {
            return Ok(Some(ReadLocks::Buf(g)));
        }
    } else {
        drop(g);
    }
    let Some((mut inner, mut g, lock, _)) = lock_access(b, &|_: &WriteBuf| Ok(at), None)? else {
        return Ok(None);
    };
    if g.unloaded() > 0 {
        let a = block_of(chunk_of(&inner, &g.path));
        let w = READ_WINDOW.max(a);
        let to = at.saturating_add(n).div_ceil(a).saturating_mul(a);
        if g.hole_in(at / a * a, to) {
            load_holes_locked(
                &mut inner,
                &mut g,
                at / w * w,
                to.div_ceil(w).saturating_mul(w),
            )?;
        }
    }
    Ok(Some(ReadLocks::All(inner, g, lock)))
}

/// What a hooked read of a buffer holds while it reads: its mutex, or for a streamable one all
/// its locks (held, never read: dropping them releases them).
#[allow(dead_code)]
pub enum ReadLocks<'a> {
    Buf(std::sync::MutexGuard<'a, WriteBuf>),
    All(
        std::sync::MutexGuard<'static, Inner>,
        std::sync::MutexGuard<'a, WriteBuf>,
        files::UnloadedLock,
    ),
}

/// A hooked write to a buffer of the run that is not streamable (yet) saw this process write
/// another [`crate::stream::CHECK_EVERY`] bytes: if it is now large (past the stream threshold,
/// or past it above a committed part left unloaded) and this process is its only holder, make
/// it streamable and start a stream or commit and punch (`stream.rs`).
pub fn maybe_stream(b: &Arc<Mutex<WriteBuf>>) {
    let sh = shield::get();
    let inner = sh.lock();
    let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
    let t = crate::stream::threshold();
    if g.streamable || t == 0 || g.len() < g.unloaded().saturating_add(t) {
        return;
    }
    let Ok(lock) = g.lock_fd().and_then(files::UnloadedLock::take) else {
        return;
    };
    if !crate::stream::make_streamable(&inner, &mut g) {
        return;
    }
    let Ok(Some(r)) = crate::stream::current(&mut g) else {
        return;
    };
    g.stream_unchecked = crate::stream::CHECK_EVERY;
    after_write(b, inner, g, lock, r, 0);
}

/// Load the unloaded holes of `[from, to)` of `b` (a hooked read's range).
pub fn load_holes_of(b: &Arc<Mutex<WriteBuf>>, from: u64, to: u64) -> Result<(), c_int> {
    if unloaded_hint(b) {
        return Ok(());
    }
    let sh = shield::get();
    let mut inner = sh.lock();
    let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
    // Whole blocks: every hole then starts and ends on a block (chunk) boundary, so a diff
    // skips holes as whole chunks.
    let a = block_of(chunk_of(&inner, &g.path));
    let (from, to) = (from / a * a, to.div_ceil(a).saturating_mul(a));
    // Holes only ever shrink: none in the range now, none later (loaded bytes are content
    // whatever happened elsewhere, so a read needs no lock then).
    if !g.hole_in(from, to) {
        return Ok(());
    }
    // A hole is loaded in windows of at least READ_WINDOW: reading a file in small pieces
    // costs one verified read per window, not per piece.
    let w = READ_WINDOW.max(a);
    load_holes(
        &mut inner,
        &mut g,
        from / w * w,
        to.div_ceil(w).saturating_mul(w),
    )
}

/// The least a hooked read loads of a hole around what it reads (a multiple of every block).
const READ_WINDOW: u64 = 64 << 10;

/// This process's hint says nothing is unloaded (stale only in the safe direction).
fn unloaded_hint(b: &Arc<Mutex<WriteBuf>>) -> bool {
    let g = b.lock().unwrap_or_else(|e| e.into_inner());
    g.unloaded.load(Ordering::Relaxed) == 0 && !g.streamable
}

/// The chunk length of `ep`'s region (0 when unknown).
fn chunk_of(inner: &Inner, ep: &EmbedPath) -> u64 {
    inner
        .s
        .vol()
        .and_then(|v| v.region_for(ep).map(|r| r.chunk_len as u64))
        .unwrap_or(0)
}

/// [`load_unloaded`] for a buffer the caller holds no lock of (the shield's lock is taken
/// first, as everywhere). Cheap when the buffer is loaded.
pub fn load_unloaded_of(b: &Arc<Mutex<WriteBuf>>, never: bool) -> Result<(), c_int> {
    if unloaded_hint(b) {
        return Ok(());
    }
    let sh = shield::get();
    let mut inner = sh.lock();
    let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
    load_all(&mut inner, &mut g, never)
}

/// Read-only body for `ep`; `verify` checks every chunk now (small files only).
fn read_body(
    inner: &mut Inner,
    ep: &EmbedPath,
    verify: bool,
    mode: u32,
    mtime: i64,
) -> Result<Body, c_int> {
    // (A description that reads a buffer loads what it reads, when it reads it: `fdio`.)
    if let Some(b) = inner.live.get(ep).filter(|b| live_is_current(b)).cloned() {
        return Ok(Body::Buf(b));
    }
    if let Some(b) = join_existing(inner, ep, mode, mtime) {
        return Ok(Body::Buf(b));
    }
    let vol = inner.s.vol().ok_or(libc::EACCES)?;
    let region = vol.region_for(ep).ok_or(libc::ENOENT)?;
    if region.kind == RegionKind::Ephemeral {
        let mut r = match inner.s.open_ephemeral(ep).map_err(errno_of)? {
            EphemeralContent::Plain(d) => return Ok(Body::Plain(d)),
            EphemeralContent::Sealed(r) => r,
        };
        if verify && r.size() <= VERIFY_AT_OPEN_MAX {
            r.verify_all().map_err(|e| map_core(ep, e))?;
        }
        return Ok(Body::Mem(r));
    }
    let mut r = open_kernel(inner, ep)?;
    if verify && r.size() <= VERIFY_AT_OPEN_MAX {
        r.verify_all().map_err(|e| map_core(ep, e))?;
    }
    Ok(Body::Kernel(Box::new(r)))
}

/// A real fd standing in for a shielded file: an empty memfd (never holds protected bytes, so
/// anything bypassing the hooks reads nothing rather than ciphertext or unverified data).
pub fn placeholder(ep: &EmbedPath, cloexec: bool) -> Result<c_int, c_int> {
    let mut name = b"fspf:".to_vec();
    name.extend_from_slice(&ep.file_name()[..ep.file_name().len().min(200)]);
    name.retain(|&c| c != 0);
    name.push(0);
    let flags = if cloexec { libc::MFD_CLOEXEC } else { 0 };
    // SAFETY: `name` is NUL-terminated.
    let fd = unsafe { libc::memfd_create(name.as_ptr().cast(), flags) };
    if fd < 0 {
        Err(crate::errno())
    } else {
        Ok(fd)
    }
}

fn dir_placeholder(
    kernel: Option<&fspf_core::volume::KernelPath>,
    ep: &EmbedPath,
    cloexec: bool,
) -> Result<c_int, c_int> {
    if let Some(k) = kernel {
        use std::os::fd::IntoRawFd;
        let fl = libc::O_RDONLY | libc::O_DIRECTORY;
        // No symlink below the region's directory is followed (a swapped-in link to a victim
        // directory must not become the program's directory fd).
        if let Ok(fd) = fspf_core::volume::kernel_fs::open_beneath(k.base(), k.rel(), fl, 0) {
            let fd = fd.into_raw_fd();
            if !cloexec {
                // SAFETY: clearing FD_CLOEXEC on the fd we just opened.
                unsafe { real::fcntl(fd, libc::F_SETFD, 0) };
            }
            return Ok(fd);
        }
    }
    placeholder(ep, cloexec)
}

/// Open `ep` in the shielded view; returns a real fd registered in the fd table.
pub fn shield_open(sh: &Shield, ep: EmbedPath, flags: c_int, mode: mode_t) -> Result<c_int, c_int> {
    shield_open_depth(sh, ep, flags, mode, 0, false)
}

/// As [`shield_open`], for a stdio stream (small files verified completely at open).
pub fn shield_open_stdio(
    sh: &Shield,
    ep: EmbedPath,
    flags: c_int,
    mode: mode_t,
) -> Result<c_int, c_int> {
    shield_open_depth(sh, ep, flags, mode, 0, true)
}

fn shield_open_depth(
    sh: &Shield,
    ep: EmbedPath,
    flags: c_int,
    mode: mode_t,
    depth: u32,
    stdio: bool,
) -> Result<c_int, c_int> {
    if flags & libc::O_TMPFILE == libc::O_TMPFILE {
        // Unnamed temporary files cannot be listed in the fspf; callers fall back to a name.
        return Err(libc::EOPNOTSUPP);
    }
    let mut inner = sh.lock();
    let acc = flags & libc::O_ACCMODE;
    let wants_write = acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
    let cloexec = flags & libc::O_CLOEXEC != 0;
    if !sh.is_ephemeral(&inner, &ep) {
        sh.refresh(&mut inner)?;
    }
    // The route named the file as this process knew it before following the anchor: a hard
    // link another process made since names its file, which buffers are keyed by.
    let ep = inner.s.canonical(&shield::Live(&inner.live), &ep);
    crate::perm::check_search(sh, &inner, &ep)?;
    let found = sh.lookup(&inner, &ep);
    let (body, node_mode, kernel, write) = match found {
        Ok(n) => {
            if flags & libc::O_CREAT != 0 && flags & libc::O_EXCL != 0 {
                return Err(libc::EEXIST);
            }
            // The mode of the fspf decides, not the kernel object's (symlinks are followed
            // below, and checked as what they name).
            if !matches!(n.kind, NodeKind::Symlink(_)) {
                let want = match acc {
                    libc::O_WRONLY => crate::perm::W,
                    libc::O_RDWR => crate::perm::R | crate::perm::W,
                    _ => crate::perm::R,
                } | if flags & libc::O_TRUNC != 0 {
                    crate::perm::W
                } else {
                    0
                };
                if !crate::perm::may(&n, want) {
                    return Err(libc::EACCES);
                }
            }
            match n.kind {
                NodeKind::Dir => {
                    if wants_write {
                        return Err(libc::EISDIR);
                    }
                    let fd = dir_placeholder(n.kernel.as_ref(), &ep, cloexec)?;
                    let f = OpenFile {
                        path: ep,
                        offset: 0,
                        read: true,
                        write: false,
                        append: false,
                        body: Body::Dir,
                        mode: n.mode,
                        kernel: n.kernel,
                        touched: None,
                        lock: None,
                    };
                    files::insert(fd, Arc::new(Mutex::new(f)));
                    return Ok(fd);
                }
                // A fifo, device or socket listed in the fspf: nothing is behind it on disk, and
                // the in-process shield cannot stand in for it (the FUSE shield can).
                NodeKind::Special { .. } => return Err(libc::ENXIO),
                NodeKind::Symlink(t) => {
                    if flags & libc::O_NOFOLLOW != 0 {
                        return Err(libc::ELOOP);
                    }
                    if depth > crate::shield::MAX_SYMLINKS {
                        return Err(libc::ELOOP);
                    }
                    let target = crate::shield::link_target(&ep, &t);
                    let r = sh.route_bytes(&inner, libc::AT_FDCWD, &target);
                    drop(inner);
                    return match r {
                        Route::Shield(ep2) => {
                            shield_open_depth(sh, ep2, flags, mode, depth + 1, stdio)
                        }
                        Route::Kernel(c, _) => {
                            // SAFETY: NUL-terminated path.
                            let fd = unsafe { real::open(c.as_ptr(), flags, mode) };
                            if fd < 0 {
                                Err(crate::errno())
                            } else {
                                Ok(fd)
                            }
                        }
                        Route::Pass => {
                            let c = std::ffi::CString::new(target).map_err(|_| libc::EINVAL)?;
                            // SAFETY: NUL-terminated path.
                            let fd = unsafe { real::open(c.as_ptr(), flags, mode) };
                            if fd < 0 {
                                Err(crate::errno())
                            } else {
                                Ok(fd)
                            }
                        }
                        Route::Deny(e) => Err(e),
                    };
                }
                NodeKind::File => {}
            }
            if flags & libc::O_DIRECTORY != 0 {
                return Err(libc::ENOTDIR);
            }
            if wants_write {
                sh.check_writable(&inner, &ep)?;
                let buf = match inner.live.get(&ep).filter(|b| live_is_current(b)) {
                    Some(b) => b.clone(),
                    None => {
                        let (mut b, joined) =
                            new_buffer(&inner, &ep, n.mode, n.mtime.unwrap_or(sh.started))?;
                        b.owner = n.owner;
                        // A joined buffer is current as it is; a new one is filled first.
                        if !joined {
                            if flags & libc::O_TRUNC == 0 {
                                if !load_tail(&mut inner, &ep, &b, flags)?
                                    && !load_lazily(&mut inner, &ep, &b)?
                                {
                                    load_buffer(&mut inner, &ep, &b)?;
                                }
                                // The version it starts from: appends to it can be rebased onto a
                                // version another process of the run commits meanwhile.
                                if let Some((v, size)) = inner
                                    .s
                                    .vol()
                                    .and_then(|v| v.lookup(&ep))
                                    .and_then(|e| Some((e.kind.version()?, file_size(&e.kind))))
                                {
                                    b.base = Some((v, size));
                                    b.version = Some(v);
                                    b.append_only.store(true, Ordering::Relaxed);
                                }
                            }
                            // (A large buffer is fingerprinted by its size and times: reading
                            // it back whole would cost a copy of the file in memory.)
                            let print = b.fingerprint()?;
                            b.mark_sealed_print(print);
                            b.start_tracking();
                            if b.mirror {
                                crate::runbuf::loaded(b.fd);
                            }
                        }
                        keep_live(&mut inner, b)
                    }
                };
                {
                    let mut g = buf.lock().unwrap_or_else(|e| e.into_inner());
                    // (A description that can read the buffer or write into it loads what it
                    // reads or partly overwrites when it does: `fdio`.)
                    if flags & libc::O_TRUNC != 0 {
                        // (Another holder's stream of it is dropped: nothing of it stays.)
                        let _lock = if g.streamable {
                            let l = files::UnloadedLock::take(g.lock_fd()?)?;
                            crate::stream::before_cut(&mut inner, &mut g, 0)?;
                            Some(l)
                        } else {
                            None
                        };
                        g.set_len(0)?;
                    }
                    g.writers += 1;
                }
                (Body::Buf(buf), n.mode, n.kernel, true)
            } else {
                let mtime = n.mtime.unwrap_or(sh.started);
                (
                    read_body(&mut inner, &ep, stdio, n.mode, mtime)?,
                    n.mode,
                    n.kernel,
                    false,
                )
            }
        }
        Err(libc::ENOENT) if flags & libc::O_CREAT != 0 => {
            let parent = ep.parent().ok_or(libc::EISDIR)?;
            match sh.lookup(&inner, &parent) {
                Ok(p) if matches!(p.kind, NodeKind::Dir) => {}
                Ok(_) => return Err(libc::ENOTDIR),
                Err(e) => return Err(e),
            }
            sh.check_writable(&inner, &ep)?;
            crate::perm::check_dir_change(sh, &inner, &ep, None)?;
            let m = mode & 0o7777 & !crate::umask::now();
            let (owner, m) = crate::namespace::new_owner(&inner, &ep, m, false);
            let (mut b, joined) = new_buffer(&inner, &ep, m, crate::shield::now())?;
            if joined && flags & libc::O_EXCL != 0 {
                // Another process of the run created it a moment ago (not committed yet).
                return Err(libc::EEXIST);
            }
            if b.mirror && !joined {
                crate::runbuf::loaded(b.fd);
            }
            b.owner = Some(owner);
            // The directory's times move now, as the kernel moves them at the create.
            inner.s.touch_parent(&ep);
            // A new file exists (empty) once it is closed, even if nothing was written.
            b.touched.store(true, Ordering::Relaxed);
            b.writers = 1;
            (Body::Buf(keep_live(&mut inner, b)), m, None, true)
        }
        Err(e) => return Err(e),
    };
    drop(inner);
    // Buffers: the program's fd is a description of the buffer's memfd. Everything else: an
    // empty memfd placeholder.
    let (fd, touched) = match &body {
        Body::Buf(b) => {
            let g = b.lock().unwrap_or_else(|e| e.into_inner());
            let access = if write { acc } else { libc::O_RDONLY };
            let fl = access | (flags & (libc::O_APPEND | libc::O_CLOEXEC));
            (g.reopen(fl), Some(g.touched.clone()))
        }
        _ => (placeholder(&ep, cloexec), None),
    };
    let fd = match fd {
        Ok(fd) => fd,
        Err(e) => {
            if let Body::Buf(b) = &body {
                if write {
                    b.lock().unwrap_or_else(|e| e.into_inner()).writers -= 1;
                }
            }
            return Err(e);
        }
    };
    let f = OpenFile {
        path: ep,
        offset: 0,
        read: acc != libc::O_WRONLY,
        write,
        append: flags & libc::O_APPEND != 0,
        body,
        mode: node_mode,
        kernel,
        touched,
        // Made at its first lock, or before a child can inherit the description
        // (`locks::before_children`: a shell's `9>/data/lock` is opened by the shell, and
        // `flock 9` in a child must lock the shell's description).
        lock: None,
    };
    files::insert(fd, Arc::new(Mutex::new(f)));
    Ok(fd)
}

/// After this process took a lock on `ep`: what another process of the run committed since
/// this process loaded the file becomes what it reads. A clean buffer (nothing written since it
/// was loaded or sealed) is reloaded in place (the program's fds and maps are descriptions of
/// its memfd); read-only bodies reopen the current version. A buffer with unsealed writes keeps
/// them (they were made without the lock, and the next commit decides).
pub fn refresh_path(inner: &mut Inner, ep: &EmbedPath) -> Result<(), c_int> {
    let current = match inner
        .s
        .vol()
        .and_then(|v| v.lookup(ep))
        .map(|e| e.into_owned().kind)
    {
        Some(k @ FileKind::File { size, .. }) => k.version().map(|v| (v, size)),
        _ => None,
    };
    let Some((id, size)) = current else {
        return Ok(());
    };
    if let Some(b) = inner.live.get(ep).cloned() {
        let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
        if g.mirror {
            // The run's shared buffer: always current.
            return Ok(());
        }
        if g.version != Some(id) && !g.detached && !g.pending && !g.needs_seal() {
            let fresh = WriteBuf::create(ep.clone(), g.mode, g.mtime)?;
            load_buffer(inner, ep, &fresh)?;
            copy_buffer(&fresh, &g)?;
            g.mark_loaded();
            g.version = Some(id);
            if !g.shared {
                g.base = Some((id, size));
                g.append_only.store(true, Ordering::Relaxed);
            }
            let print = g.fingerprint()?;
            g.mark_sealed_print(print);
            g.start_tracking();
        }
        return Ok(());
    }
    let (mode, mtime) = match crate::shield::get().lookup(inner, ep) {
        Ok(n) => (n.mode, n.mtime.unwrap_or(0)),
        Err(_) => return Ok(()),
    };
    // Another process of the run may be writing it in the run's shared buffer: read that.
    // (It replaces readable bodies, which load what they read: `fdio`.)
    let joined = join_existing(inner, ep, mode, mtime);
    for h in files::all_handles() {
        let mut f = h.lock().unwrap_or_else(|e| e.into_inner());
        if &f.path == ep && matches!(f.body, Body::Kernel(_) | Body::Mem(_)) {
            f.body = match &joined {
                Some(b) => Body::Buf(b.clone()),
                None => read_body(inner, ep, false, mode, mtime)?,
            };
        }
    }
    Ok(())
}

/// Replace `to`'s content with `from`'s (the caller then records what `to` holds).
fn copy_buffer(from: &WriteBuf, to: &WriteBuf) -> Result<(), c_int> {
    let len = from.len();
    to.set_len(len)?;
    let mut chunk = vec![0u8; (1 << 20).min(len as usize)];
    let mut off = 0u64;
    while off < len {
        let n = from.read_at(&mut chunk, off)?;
        if n == 0 {
            return Err(libc::EIO);
        }
        to.write_all_at(&chunk[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Drop one fd's reference to its open file description; seal when the last writer goes.
/// An error (the new version could not be sealed) is what `close` reports.
pub fn release(h: Handle) -> Result<(), c_int> {
    if Arc::strong_count(&h) != 1 {
        return Ok(());
    }
    let buf = {
        let f = h.lock().unwrap_or_else(|e| e.into_inner());
        match (&f.body, f.write) {
            (Body::Buf(b), true) => Some(b.clone()),
            _ => None,
        }
    };
    // Drop the description first: its reference to the buffer must not count as a holder.
    drop(h);
    if let Some(b) = buf {
        let last = {
            let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
            g.writers = g.writers.saturating_sub(1);
            g.writers == 0
        };
        if last {
            return shield::get().last_writer_closed(&b);
        }
    }
    Ok(())
}

/// Size of a regular file's entry (0 for other kinds).
fn file_size(k: &FileKind) -> u64 {
    match k {
        FileKind::File { size, .. } => *size,
        _ => 0,
    }
}

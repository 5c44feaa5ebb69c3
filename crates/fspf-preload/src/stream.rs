//! Large files sealed while they are written (issue 8: a writer holds what it touched, not the
//! file). The FUSE daemon seals a new file in pieces as it is written (`fspf_core::volume::
//! StreamStage`); this is the same for the in-process shield, whose buffers several processes
//! of a run share (`runbuf.rs`), so the stream's state lives with the buffer, not in one
//! process:
//!
//! * A buffer of the run's shared directory for a file of an encrypted kernel region, made
//!   empty or filled whole, is *streamable*: its file carries a record ([`XATTR`]) from before
//!   any other process can hold it, and every hooked access to it, in every process, takes its
//!   lock ([`UnloadedLock`]).
//! * When a hooked write leaves more than [`threshold`] bytes past the stream's end, the whole
//!   blocks up to the buffer's end are sealed (in pieces of [`PIECE`]) into the shadow of the
//!   file's next version, their tags are written to a side file in the run's directory, the
//!   record moves its end, and the pieces are punched out of the buffer. The buffer holds at
//!   most about [`threshold`] bytes of the file.
//! * The record names the stream (file id, epoch: the key) and how far it is sealed; any
//!   process of the run goes on with it from there (`Volume::resume_stream`), also after the
//!   one that started it exited or was killed. Before a piece is sealed, the record says how
//!   far sealing may have gone (`high`): a stream whose sealing may have gone further than its
//!   recorded end is never sealed again (a chunk index is sealed at most once per key), only
//!   read back.
//! * The stream is finished at a commit point (the last close, `fsync`, `fork`/`exec`, exit, a
//!   batch, a rename): the rest of the buffer is its tail, and the version is committed. Its
//!   sealed part then is committed content: the buffer goes on with those holes unloaded
//!   (`opening::leave_unloaded`'s state). A read, write or truncation below the sealed end
//!   commits first (the holes then load from the committed file); a map, `SEEK_DATA`, or
//!   adoption after `exec` reads the stream back into the buffer and gives it up.
//! * A write the hooks did not see (a raw system call) while a piece is sealed gives the stream
//!   up; one below the sealed end is found at the finish, and the buffer is refused (`EIO`),
//!   never committed with zeros.
use crate::files::{UnloadedLock, WriteBuf};
use crate::shield::{errno_of, Inner};
use crate::{log, real};
use fspf_core::crypto::{EPOCH_LEN, TAG_LEN};
use fspf_core::session::VersionMeta;
use fspf_core::volume::StreamState;
use fspf_core::FileId;
use libc::c_int;
use std::sync::atomic::Ordering;

/// The stream record on a streamable buffer's file: phase (1 byte), generation, file id, epoch,
/// chunk length, sealed end, how far sealing may have gone (little-endian).
const XATTR: &std::ffi::CStr = c"user.fspf.stream";
const RECORD_LEN: usize = 1 + 8 + 16 + EPOCH_LEN + 4 + 8 + 8;

/// Bytes sealed at a time (the memory a piece costs beside the buffer).
pub const PIECE: u64 = 8 << 20;

/// Buffered bytes past the stream's end that start the sealing of a piece: `FSPF_STREAM_MB`
/// (0 turns streams off), 64 MiB by default, at least 2 MiB (a sealed part then always exceeds
/// `files::HASH_MAX`: buffers up to that are hashed whole, and have no unloaded holes).
pub fn threshold() -> u64 {
    static T: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        match std::env::var("FSPF_STREAM_MB")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            Some(0) => 0,
            Some(m) => (m << 20).max(2 * crate::files::HASH_MAX),
            None => 64 << 20,
        }
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No stream; one may start.
    Idle,
    /// A stream holds the buffer's bytes below its sealed end.
    Active,
    /// Never again (the buffer is mapped, or something wrote it unseen).
    Off,
    /// The sealed part could not be read back: the buffer is refused.
    Lost,
}

#[derive(Clone, Copy, Debug)]
pub struct Record {
    pub phase: Phase,
    pub gen: u64,
    pub state: StreamState,
    /// How far sealing may have gone: equal to `state.sealed` unless a piece or the finish was
    /// interrupted.
    pub high: u64,
}

impl Record {
    fn idle(gen: u64) -> Record {
        Record {
            phase: Phase::Idle,
            gen,
            state: StreamState {
                id: FileId([0; 16]),
                epoch: [0; EPOCH_LEN],
                chunk_len: 0,
                sealed: 0,
            },
            high: 0,
        }
    }

    fn with_phase(gen: u64, phase: Phase) -> Record {
        Record {
            phase,
            ..Record::idle(gen)
        }
    }

    fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[0] = match self.phase {
            Phase::Idle => 0,
            Phase::Active => 1,
            Phase::Off => 2,
            Phase::Lost => 3,
        };
        b[1..9].copy_from_slice(&self.gen.to_le_bytes());
        b[9..25].copy_from_slice(&self.state.id.0);
        b[25..25 + EPOCH_LEN].copy_from_slice(&self.state.epoch);
        let o = 25 + EPOCH_LEN;
        b[o..o + 4].copy_from_slice(&self.state.chunk_len.to_le_bytes());
        b[o + 4..o + 12].copy_from_slice(&self.state.sealed.to_le_bytes());
        b[o + 12..o + 20].copy_from_slice(&self.high.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Record> {
        if b.len() != RECORD_LEN {
            return None;
        }
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let phase = match b[0] {
            0 => Phase::Idle,
            1 => Phase::Active,
            2 => Phase::Off,
            3 => Phase::Lost,
            _ => return None,
        };
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[9..25]);
        let mut epoch = [0u8; EPOCH_LEN];
        epoch.copy_from_slice(&b[25..25 + EPOCH_LEN]);
        let o = 25 + EPOCH_LEN;
        let mut c = [0u8; 4];
        c.copy_from_slice(&b[o..o + 4]);
        Some(Record {
            phase,
            gen: u64_at(1),
            state: StreamState {
                id: FileId(id),
                epoch,
                chunk_len: u32::from_le_bytes(c),
                sealed: u64_at(o + 4),
            },
            high: u64_at(o + 12),
        })
    }

    /// The side file holding the tags of this stream's sealed chunks.
    fn side_name(&self) -> String {
        format!(".fspf-stream-{}", self.state.id.to_hex())
    }
}

/// The record on buffer file `fd` (`None`: not streamable).
pub fn read(fd: c_int) -> Option<Record> {
    let mut v = [0u8; RECORD_LEN];
    // SAFETY: reading an attribute of our own fd into a local buffer of its length.
    let n = unsafe { real::fgetxattr(fd, XATTR.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    if n != RECORD_LEN as isize {
        return None;
    }
    Record::decode(&v)
}

fn write(fd: c_int, r: &Record) -> Result<(), c_int> {
    let v = r.encode();
    // SAFETY: setting an attribute on our own fd from a local buffer.
    if unsafe { real::fsetxattr(fd, XATTR.as_ptr(), v.as_ptr().cast(), v.len(), 0) } != 0 {
        return Err(crate::errno());
    }
    Ok(())
}

/// Does buffer file `fd` carry a stream record (a process joining or adopting it)?
pub fn is_streamable(fd: c_int) -> bool {
    read(fd).is_some()
}

/// Where the sealed part of buffer file `fd`'s stream ends (0: no stream holds any of it).
pub fn sealed_end(fd: c_int) -> u64 {
    read(fd)
        .filter(|r| r.phase == Phase::Active)
        .map_or(0, |r| r.state.sealed)
}

/// Does a stream hold part of buffer file `fd` (which must be committed even when this process
/// did not write it: its writer may be gone)?
pub fn is_active(fd: c_int) -> bool {
    read(fd).is_some_and(|r| r.phase == Phase::Active)
}

/// Make a buffer of the run streamable (under its lock): a file of an encrypted kernel region,
/// in a buffer file with page-sized holes that records extended attributes, held by this
/// process alone. The record is set first, then the holders are counted: a process that joins
/// meanwhile either is counted (and the record removed again) or finds the record, and takes
/// the buffer's lock at every access from then on, as this one does.
pub fn make_streamable(inner: &Inner, g: &mut WriteBuf) -> bool {
    // (A private buffer never inherited by another process is this process's alone.)
    let alone = if g.mirror { true } else { !g.shared };
    if !alone || threshold() == 0 || g.mapped_shared || g.detached || read(g.fd).is_some() {
        return false;
    }
    let fits = inner.s.vol().is_some_and(|v| v.can_stream(&g.path));
    if !fits || g.page_size() != Some(4096) || write(g.fd, &Record::idle(0)).is_err() {
        return false;
    }
    if g.mirror && !crate::runbuf::sole_holder(g.fd) {
        // SAFETY: removing an attribute of our own fd.
        unsafe { real::fremovexattr(g.fd, XATTR.as_ptr()) };
        return false;
    }
    g.streamable = true;
    g.stream_gen = 0;
    true
}

/// Called under the buffer's lock at every access: the record, with what this process knew
/// of the buffer's holes forgotten if a piece made holes since. `Ok(None)`: not streamable.
pub fn current(g: &mut WriteBuf) -> Result<Option<Record>, c_int> {
    if !g.streamable {
        return Ok(None);
    }
    let Some(r) = read(g.fd) else {
        return Ok(None);
    };
    if r.gen != g.stream_gen {
        g.forget_known_data();
        g.unloaded
            .store(crate::files::unloaded_on_file(g.fd), Ordering::Relaxed);
        g.stream_gen = r.gen;
    }
    if r.phase == Phase::Lost {
        return Err(libc::EIO);
    }
    Ok(Some(r))
}

fn put(g: &mut WriteBuf, r: &mut Record) -> Result<(), c_int> {
    r.gen += 1;
    write(g.fd, r)?;
    g.stream_gen = r.gen;
    g.forget_known_data();
    Ok(())
}

fn read_tags(r: &Record, from: u64, to: u64) -> Result<Vec<[u8; TAG_LEN]>, c_int> {
    let n = to.saturating_sub(from) as usize;
    let mut raw = vec![0u8; n * TAG_LEN];
    if n > 0 {
        let fd = crate::runbuf::side_file(&r.side_name(), false).ok_or(libc::EIO)?;
        let res = crate::files::pread_exact(fd, &mut raw, from * TAG_LEN as u64);
        // SAFETY: closing our own fd.
        unsafe { real::close(fd) };
        res?;
    }
    Ok(raw
        .chunks_exact(TAG_LEN)
        .map(|c| {
            let mut t = [0u8; TAG_LEN];
            t.copy_from_slice(c);
            t
        })
        .collect())
}

fn write_tags(r: &Record, first: u64, tags: &[[u8; TAG_LEN]]) -> Result<(), c_int> {
    let fd = crate::runbuf::side_file(&r.side_name(), false).ok_or(libc::EIO)?;
    let raw: Vec<u8> = tags.iter().flatten().copied().collect();
    let res = crate::files::pwrite_all(fd, &raw, first * TAG_LEN as u64);
    // SAFETY: closing our own fd.
    unsafe { real::close(fd) };
    res
}

/// This process's handle on the stream `r` names, brought up to its sealed end (resumed from
/// the record and the side file, or caught up with what another process sealed).
fn handle<'a>(
    inner: &Inner,
    g: &'a mut WriteBuf,
    r: &Record,
) -> Result<&'a mut fspf_core::volume::StreamStage, c_int> {
    let c = u64::from(r.state.chunk_len).max(1);
    let fits = g.stream.as_ref().is_some_and(|s| {
        let st = s.state();
        st.id == r.state.id && !s.finished() && st.sealed <= r.state.sealed
    });
    if fits {
        let s = g.stream.as_mut().ok_or(libc::EIO)?;
        if s.sealed() < r.state.sealed {
            let tags = read_tags(r, s.sealed() / c, r.state.sealed / c)?;
            s.caught_up(r.state.sealed, &tags).map_err(|e| {
                log(format!("{}: stream: {e}", g.path));
                libc::EIO
            })?;
        }
    } else {
        let tags = read_tags(r, 0, r.state.sealed / c)?;
        let vol = inner.s.vol().ok_or(libc::EIO)?;
        let s = vol.resume_stream(&g.path, &r.state, tags).map_err(|e| {
            log(format!("{}: stream not resumed: {e}", g.path));
            libc::EIO
        })?;
        g.stream = Some(s);
    }
    g.stream.as_mut().ok_or(libc::EIO)
}

/// After a hooked write of `n` bytes, under the shield's lock, the buffer's mutex and its lock
/// (`r`: the record read under them): start the stream, or seal the next pieces, when the
/// buffer holds more than [`threshold`] bytes past its end (looked at once per [`CHECK_EVERY`]
/// bytes this process writes). A failure gives the stream up (the buffer holds everything
/// again) and is logged: the write itself succeeded.
/// `false`: not looked at this time.
pub fn after_write(inner: &mut Inner, g: &mut WriteBuf, r: Record, n: u64) -> bool {
    g.stream_unchecked += n;
    if g.stream_unchecked < CHECK_EVERY {
        return false;
    }
    g.stream_unchecked = 0;
    if let Err(e) = grow(inner, g, r) {
        log(format!(
            "{}: sealing while written stopped (errno {e})",
            g.path
        ));
        if let Ok(Some(mut r)) = current(g) {
            if r.phase == Phase::Active {
                let _ = give_up(inner, g, &mut r, Phase::Off);
            }
        }
    }
    true
}

/// A buffer without a stream whose part below its unloaded offset is committed content (a
/// stream committed at a commit point, or a large file opened to append or to read and write)
/// and which holds more than [`threshold`] bytes above that offset: the end (whole blocks of
/// `block` bytes) up to which a commit now, then a punch, would leave it holding nothing of
/// them (`punch_committed`).
pub fn commit_due(g: &WriteBuf, r: &Record, block: u64) -> Option<u64> {
    let t = threshold();
    if r.phase != Phase::Idle || t == 0 || g.mapped_shared || g.detached || block == 0 {
        return None;
    }
    let u = g.unloaded();
    let len = g.len();
    if u == 0 || len < u.saturating_add(t) {
        return None;
    }
    Some(len / block * block).filter(|&e| e > u)
}

/// After the commit that [`commit_due`] asked for (under the buffer's lock, held across it):
/// if the buffer is what was committed (nothing wrote it since, seen or unseen) and its
/// unloaded offset is still `u`, punch `[u, end)` out and leave it unloaded, committed content
/// the holes load from.
pub fn punch_committed(inner: &Inner, g: &mut WriteBuf, u: u64, end: u64) {
    let committed = inner
        .s
        .vol()
        .and_then(|v| v.lookup(&g.path))
        .and_then(|e| match e.kind {
            fspf_core::FileKind::File { size, .. } => Some(size),
            _ => None,
        });
    if g.unloaded() != u
        || end <= u
        || g.pending
        || g.needs_seal()
        || g.changed_unseen()
        || committed.is_none_or(|size| size < end)
    {
        return;
    }
    let Some(mut r) = read(g.fd) else { return };
    if punch(g.fd, u, end - u).is_err() || !g.mark_unloaded(end) {
        return;
    }
    g.record_seen(None);
    if let Ok(p) = g.fingerprint() {
        g.print = p;
    }
    if let (Some(now), Some(t)) = (g.stat_now(), g.track.as_mut()) {
        t.print = now;
    }
    let _ = put(g, &mut r);
}

/// How much a process writes between two looks at whether a piece is due.
pub const CHECK_EVERY: u64 = 1 << 20;

fn grow(inner: &mut Inner, g: &mut WriteBuf, mut r: Record) -> Result<(), c_int> {
    let len = g.len();
    let t = threshold();
    match r.phase {
        Phase::Idle => {
            if t == 0 || len < t || g.mapped_shared || g.detached || g.unloaded() > 0 {
                return Ok(());
            }
            let Some(s) = inner.s.stream_file_shared(&g.path).map_err(errno_of)? else {
                return put(g, &mut Record::with_phase(r.gen, Phase::Off));
            };
            let mut next = Record {
                phase: Phase::Active,
                gen: r.gen,
                state: s.state(),
                high: 0,
            };
            let mut s = s;
            // (A private buffer's stream is this process's alone: its tags stay in its handle.)
            if g.mirror {
                let Some(fd) = crate::runbuf::side_file(&next.side_name(), true) else {
                    s.discard();
                    return put(g, &mut Record::with_phase(r.gen, Phase::Off));
                };
                // SAFETY: closing our own fd.
                unsafe { real::close(fd) };
            }
            g.stream = Some(s);
            put(g, &mut next)?;
            r = next;
        }
        Phase::Active if r.high == r.state.sealed && len >= r.state.sealed + t => {}
        _ => return Ok(()),
    }
    let c = u64::from(r.state.chunk_len).max(1);
    let block = c.max(4096);
    let end = len / block * block;
    if end <= r.state.sealed {
        return Ok(());
    }
    r.high = end;
    put(g, &mut r)?;
    let mut seen = g.stat_now();
    // (Placed in memory as the piece lies in the shadow, so its whole blocks go to the device
    // straight from it: `piece_in`.)
    let mut raw =
        vec![0u8; PIECE.min(end - r.state.sealed) as usize + fspf_core::volume::PIECE_SLACK];
    while r.state.sealed < end {
        let at = r.state.sealed;
        let n = (end - at).min(PIECE) as usize;
        let piece = fspf_core::volume::piece_in(&mut raw, r.state.chunk_len, at / c, n);
        g.read_exact_at(piece, at)?;
        let s = handle(inner, g, &r)?;
        s.push(piece).map_err(|e| {
            log(format!("stream: {e}"));
            libc::EIO
        })?;
        let tags = s.tags_from(at / c).to_vec();
        if g.mirror {
            write_tags(&r, at / c, &tags)?;
        }
        // Nothing wrote the buffer meanwhile (hooked writers wait for the lock): a change
        // now is a write the hooks did not see, which the piece would lose.
        if g.stat_now() != seen {
            log(format!(
                "{}: written unseen while a piece was sealed: sealing while written stops",
                g.path
            ));
            return give_up(inner, g, &mut r, Phase::Off);
        }
        r.state.sealed = at + n as u64;
        put(g, &mut r)?;
        punch(g.fd, at, n as u64)?;
        seen = g.stat_now();
    }
    Ok(())
}

fn punch(fd: c_int, at: u64, len: u64) -> Result<(), c_int> {
    // SAFETY: punching a range of our own buffer file (its size is kept).
    let r = unsafe {
        real::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            at as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        return Err(crate::errno());
    }
    Ok(())
}

/// Read the stream's sealed part back into the buffer and give the stream up (`then`: the
/// phase the record takes; a stream that cannot be read back is lost, and the buffer refused).
fn give_up(inner: &mut Inner, g: &mut WriteBuf, r: &mut Record, then: Phase) -> Result<(), c_int> {
    match read_back(inner, g, r) {
        Ok(()) => drop_stream(inner, g, r, then),
        Err(e) => {
            crate::say(format!(
                "{}: the part sealed while it was written could not be read back: the file can no longer be read or committed from this run",
                g.path
            ));
            let _ = drop_stream(inner, g, r, Phase::Lost);
            Err(e)
        }
    }
}

/// Copy the sealed part of the stream `r` names back into the buffer (authenticated).
fn read_back(inner: &mut Inner, g: &mut WriteBuf, r: &Record) -> Result<(), c_int> {
    let sealed = r.state.sealed;
    handle(inner, g, r)?;
    let s = g.stream.take().ok_or(libc::EIO)?;
    let mut block = vec![0u8; PIECE.min(sealed) as usize];
    let mut off = 0;
    let mut res = Ok(());
    while off < sealed && res.is_ok() {
        let n = (sealed - off).min(PIECE) as usize;
        res = match s.read_at(&mut block[..n], off) {
            Ok(()) => g.write_all_at(&block[..n], off),
            Err(e) => {
                log(format!("{}: stream read back: {e}", g.path));
                Err(libc::EIO)
            }
        };
        off += n as u64;
    }
    g.stream = Some(s);
    res
}

/// Give the stream `r` names up: its shadow and tags go (whichever process started it), and the
/// record takes the phase `then`.
fn drop_stream(
    inner: &mut Inner,
    g: &mut WriteBuf,
    r: &mut Record,
    then: Phase,
) -> Result<(), c_int> {
    // (Another process's stream, or one this process's handle is behind on: resumed to find
    // its shadow; one that cannot be resumed has no shadow left to remove.)
    let _ = handle(inner, g, r);
    // (Only a handle on this stream: one left from an earlier stream may name a version that
    // another process committed.)
    if let Some(mut s) = g.stream.take().filter(|s| s.state().id == r.state.id) {
        s.discard();
    }
    crate::runbuf::remove_side_file(&r.side_name());
    *r = Record::with_phase(r.gen, then);
    put(g, r)
}

/// Where the sealed part of the stream `r` names ends, if it has one (an access below it must
/// commit the stream first).
pub fn sealed_part(r: &Option<Record>) -> Option<u64> {
    r.filter(|r| r.phase == Phase::Active && r.state.sealed > 0)
        .map(|r| r.state.sealed)
}

/// A cut to `len` of a buffer whose stream is active: to 0 the stream is dropped (nothing of
/// it stays); below its end otherwise it must be committed first (`true`).
pub fn before_cut(inner: &mut Inner, g: &mut WriteBuf, len: u64) -> Result<bool, c_int> {
    let Some(mut r) = current(g)? else {
        return Ok(false);
    };
    if r.phase != Phase::Active || len >= r.state.sealed {
        return Ok(false);
    }
    if len > 0 {
        return Ok(true);
    }
    drop_stream(inner, g, &mut r, Phase::Idle)?;
    Ok(false)
}

/// The buffer's file is gone (unlinked or replaced while written): its stream, if any, goes
/// too (shadow and tags).
pub fn discard(inner: &mut Inner, g: &mut WriteBuf) {
    if !g.streamable {
        return;
    }
    if let Ok(fd) = g.lock_fd() {
        if let Ok(_lock) = UnloadedLock::take(fd) {
            let _ = before_cut(inner, g, 0);
        }
    }
}

/// Everything in the buffer (a map, `SEEK_DATA`, adoption after `exec`, a whole seal): an
/// active stream is read back and given up; `never`: no stream starts again (a shared map
/// reads the buffer's memory without the hooks).
pub fn load_back(inner: &mut Inner, g: &mut WriteBuf, never: bool) -> Result<(), c_int> {
    let Some(mut r) = current(g)? else {
        return Ok(());
    };
    let then = if never { Phase::Off } else { Phase::Idle };
    match r.phase {
        Phase::Active => give_up(inner, g, &mut r, then),
        Phase::Idle if never => put(g, &mut Record::with_phase(r.gen, Phase::Off)),
        _ => Ok(()),
    }
}

/// At a commit point, in `Shield::finish` (under the shield's lock and the buffer's mutex):
/// finish an active stream with the rest of the buffer as its tail and stage its version.
/// `Ok(true)`: staged (the buffer's lock is held until the commit: `committed`); `Ok(false)`:
/// no stream (or one given up: the buffer holds everything, the caller seals it whole).
pub fn finish(inner: &mut Inner, g: &mut WriteBuf, meta: VersionMeta) -> Result<bool, c_int> {
    if !g.streamable || g.stream_staged.is_some() {
        return Ok(g.stream_staged.is_some());
    }
    let lock = UnloadedLock::take(g.lock_fd()?)?;
    let Some(mut r) = current(g)? else {
        return Ok(false);
    };
    if r.phase != Phase::Active {
        return Ok(false);
    }
    if g.detached {
        // Unlinked or replaced while written: nothing of it is committed.
        return drop_stream(inner, g, &mut r, Phase::Off).map(|_| false);
    }
    if r.high != r.state.sealed {
        // Sealing was interrupted: what it may have sealed is never sealed again.
        give_up(inner, g, &mut r, Phase::Idle)?;
        return Ok(false);
    }
    let sealed = r.state.sealed;
    let len = g.len();
    // SAFETY: seeking our own description of the buffer.
    let data = unsafe { real::lseek(g.fd, 0, libc::SEEK_DATA) };
    if len < sealed || (data >= 0 && (data as u64) < sealed) {
        crate::say(format!(
            "{}: written below the part sealed while it was written by a write the shield did not see (a raw system call?): the file can no longer be committed from this run",
            g.path
        ));
        let _ = drop_stream(inner, g, &mut r, Phase::Lost);
        return Err(libc::EIO);
    }
    let before = g.stat_now();
    let print = g.fingerprint()?;
    let mut tail = vec![0u8; (len - sealed) as usize];
    g.read_exact_at(&mut tail, sealed)?;
    r.high = u64::MAX;
    handle(inner, g, &r)?;
    put(g, &mut r)?;
    let path = g.path.clone();
    let staged = match g.stream.as_mut() {
        Some(s) => inner.s.stage_streamed(&path, s, &mut tail, meta),
        None => return Err(libc::EIO),
    };
    match staged {
        Ok(t) => {
            g.mtime = t;
            g.mark_sealed_print(print);
            g.pending = true;
            g.start_tracking_from(before);
            g.stream_staged = Some((sealed, lock));
            Ok(true)
        }
        Err(e) => {
            log(format!(
                "{path}: the stream could not be staged ({e:?}); sealing it whole"
            ));
            give_up(inner, g, &mut r, Phase::Idle)?;
            Ok(false)
        }
    }
}

/// After the commit of a staged stream: its sealed part is committed content, left unloaded
/// in the buffer (the lock taken at the finish is released).
pub fn committed(g: &mut WriteBuf) {
    let Some((sealed, lock)) = g.stream_staged.take() else {
        return;
    };
    let Some(mut r) = read(g.fd) else {
        return;
    };
    crate::runbuf::remove_side_file(&r.side_name());
    g.stream = None;
    let ok = sealed == 0 || g.mark_unloaded(sealed);
    r = Record::with_phase(r.gen, if ok { Phase::Idle } else { Phase::Lost });
    let _ = put(g, &mut r);
    g.record_seen(None);
    drop(lock);
}

/// The commit of a staged stream failed: its version is not committed; the stream is read back
/// (its shadow stays readable through this process's handle) and given up.
pub fn not_committed(inner: &mut Inner, g: &mut WriteBuf) {
    let Some((_, lock)) = g.stream_staged.take() else {
        return;
    };
    if let Some(mut r) = read(g.fd) {
        let _ = give_up(inner, g, &mut r, Phase::Idle);
    }
    g.track = None;
    g.touched.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(lock);
}

//! Chunked file codec: seals and verifies file contents chunk by chunk over positioned I/O.
//!
//! * encrypted: AES-GCM per chunk under a per-file-version key; nonce = chunk index and a
//!   last-chunk flag (each key seals each index once: a rewrite gets a new file id and key).
//! * authenticated: plaintext stays; keyed-BLAKE3 leaf per chunk, a binary Merkle tree whose root
//!   is committed by the fspf and whose other levels live in an untrusted outboard.
//!
//! Readers verify every chunk before returning a byte of it; nothing here knows about paths on
//! disk beyond the label used in error messages.
mod merkle;
mod readat;
pub mod tree;

pub use merkle::{merkle_root_and_outboard, verify_leaf};
pub use readat::ReadAt;

use crate::crypto::{AeadKey, FileId, MacKey, NONCE_LEN, TAG_LEN};
use crate::error::{Error, Result};
use crate::format::layout::{self, ENC_HEADER_LEN, ENC_MAGIC};
use crate::format::tree as layout_tree;
use rayon::prelude::*;
use std::io::{Read, Write};

/// Which threads sealing and verifying may use. An option of each call (and of
/// [`crate::Volume`], see [`crate::VolumeOptions`]), never process-wide state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threads {
    /// Seal batches on rayon's global pool. An interposed process must not: a pool does not
    /// survive `fork`, and a forked child that seals would hang. Without it, a batch is split
    /// in two halves, the second sealed on a scoped thread joined before the call returns.
    pub pool: bool,
    /// Verify large reads with a second thread (only on machines with more than one core):
    /// the lent [`Threads::helper`], else a [`ScopedThread`], which lives only for the duration
    /// of one call and so is safe across `fork`.
    pub read_helper: bool,
    /// A thread that outlives one call, lent for the second half of a read of at least
    /// `HELPER_MIN` bytes (the shield's, which it re-creates after `fork`). Without one, or
    /// when it is busy, reads of at least `PARALLEL_MIN` bytes start a scoped thread.
    pub helper: Option<HelperRef>,
}

/// A thread that outlives one call (starting one costs about 45 us here, a fifth of a 1 MiB
/// read). See [`Threads::helper`].
pub trait Helper: Sync {
    /// Run `job` on the helper thread and `own` on this one, and return when both are done;
    /// `false`, with neither run, when no helper thread is free.
    fn run_beside(&self, job: &mut (dyn FnMut() + Send), own: &mut dyn FnMut()) -> bool;
}

/// A [`Helper`] for [`Threads`]: compared by address.
#[derive(Clone, Copy)]
pub struct HelperRef(pub &'static dyn Helper);

impl PartialEq for HelperRef {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::addr_eq(self.0, other.0)
    }
}

impl Eq for HelperRef {}

impl std::fmt::Debug for HelperRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HelperRef({:p})",
            self.0 as *const dyn Helper as *const ()
        )
    }
}

/// The [`Helper`] of a reader lent none: a thread started for the call and joined before it
/// returns (nothing is left running across `fork`). `false` when no thread can start.
pub struct ScopedThread;

impl Helper for ScopedThread {
    fn run_beside(&self, job: &mut (dyn FnMut() + Send), own: &mut dyn FnMut()) -> bool {
        std::thread::scope(|s| {
            let Ok(h) = std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn_scoped(s, job)
            else {
                return false;
            };
            own();
            // A job that panicked leaves its result unset; the caller does its part again.
            let _ = h.join();
            true
        })
    }
}

impl Default for Threads {
    /// Pool and read helper: the fastest choice for a process that does not fork mid-call.
    fn default() -> Self {
        Threads {
            pool: true,
            read_helper: true,
            helper: None,
        }
    }
}

impl Threads {
    /// What an interposed process (the preload shield) uses: no pool; scoped helpers only.
    pub const FORK_SAFE: Threads = Threads {
        pool: false,
        read_helper: true,
        helper: None,
    };
}

/// Plaintext bytes sealed per parallel batch when importing (64 × 64 KiB, 1024 × 4 KiB).
const BATCH_BYTES: usize = 4 << 20;

/// Chunks per batch: 4 MiB worth, at least one.
fn batch_chunks(chunk_len: u32) -> usize {
    (BATCH_BYTES / chunk_len as usize).max(1)
}
/// Batches of at least this many bytes are sealed (or hashed) in parallel: on two scoped threads
/// without a pool, on the pool with one. Below it, handing work to another thread costs more
/// than the work: a pool job sent from a thread outside the pool wakes a sleeping worker and
/// waits for it (up to a millisecond on an idle core of a VM), which a small file's commit in
/// the FUSE daemon paid at every `fsync` (bench/RESULTS.md, session 27).
const PAR_MIN_BYTES: usize = 512 << 10;

/// Nonce of chunk `index`: 8-byte big-endian index at bytes 3..11, last-chunk flag in byte 11.
pub fn chunk_nonce(index: u64, last: bool) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[3..11].copy_from_slice(&index.to_be_bytes());
    n[11] = last as u8;
    n
}

/// Header of an encrypted file.
pub fn enc_header(id: &FileId) -> [u8; ENC_HEADER_LEN as usize] {
    let mut h = [0u8; ENC_HEADER_LEN as usize];
    h[..8].copy_from_slice(&ENC_MAGIC);
    h[8..].copy_from_slice(&id.0);
    h
}

fn read_full(src: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn changed(label: &str) -> Error {
    Error::Invalid {
        path: label.into(),
        reason: "file changed size while it was being read".into(),
    }
}

/// Encrypt exactly `size` bytes of `src` into `dst` (header + chunks), sealing chunks in parallel.
///
/// Files of more than one batch are pipelined: a writer thread writes batch k while this thread
/// reads and seals batch k+1 into a second buffer. Writing new pages costs more than sealing them
/// on the machines we measured (bench/addf.sh), so overlapping the two is what makes large imports
/// fast; single-batch files (the common small-file case) stay on the calling thread.
pub fn seal_encrypted<W: Write + Send>(
    key: &AeadKey,
    id: &FileId,
    chunk_len: u32,
    size: u64,
    src: &mut impl Read,
    dst: &mut W,
    label: &str,
) -> Result<()> {
    seal_encrypted_with(
        Threads::default(),
        key,
        id,
        chunk_len,
        size,
        src,
        dst,
        label,
    )
}

/// [`seal_encrypted`] with explicit [`Threads`].
#[allow(clippy::too_many_arguments)]
pub fn seal_encrypted_with<W: Write + Send>(
    threads: Threads,
    key: &AeadKey,
    id: &FileId,
    chunk_len: u32,
    size: u64,
    src: &mut impl Read,
    dst: &mut W,
    label: &str,
) -> Result<()> {
    let io = |e| Error::Io {
        path: label.into(),
        source: e,
    };
    dst.write_all(&enc_header(id)).map_err(io)?;
    let n = layout::chunk_count(size, chunk_len);
    let slot = chunk_len as usize + TAG_LEN;
    let batch_n = batch_chunks(chunk_len);
    let sealer = BatchSealer {
        key,
        id,
        chunk_len,
        size,
        n,
        label,
        threads,
    };
    if n <= batch_n as u64 {
        // Exactly the bytes to write: small files must not pay for zeroing a whole chunk.
        // At most one batch of chunks (a few MiB): the length fits, and so does the buffer.
        let total = layout::enc_file_len(size, chunk_len).ok_or_else(|| Error::FileTooLarge {
            path: label.into(),
            size,
        })?;
        let mut out = vec![0u8; (total - ENC_HEADER_LEN) as usize];
        let len = sealer.fill(src, &mut out, 0, n)?;
        dst.write_all(&out[..len]).map_err(io)?;
    } else {
        // Scoped threads (also in sequential mode): they are joined before this returns, so
        // unlike a pool they leave nothing behind that a later `fork` could lose.
        std::thread::scope(|s| -> Result<()> {
            let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(1);
            let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
            let writer = s.spawn(move || -> std::io::Result<()> {
                for (buf, len) in full_rx {
                    dst.write_all(&buf[..len])?;
                    // The receiver is gone only when sealing stopped early; the error is reported there.
                    let _ = empty_tx.send(buf);
                }
                Ok(())
            });
            let mut spare = vec![vec![0u8; slot * batch_n]; 2];
            let mut sealed = Ok(());
            let mut first = 0u64;
            while first < n {
                let Some(mut buf) = spare.pop().or_else(|| empty_rx.recv().ok()) else {
                    break; // writer failed; its error is returned below
                };
                let batch = (n - first).min(batch_n as u64);
                match sealer.fill(src, &mut buf, first, batch) {
                    Ok(len) => {
                        if full_tx.send((buf, len)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        sealed = Err(e);
                        break;
                    }
                }
                first += batch_n as u64;
            }
            drop(full_tx);
            let written = writer
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("writer thread panicked")));
            sealed?;
            written.map_err(io)
        })?;
    }
    let mut probe = [0u8; 1];
    if read_full(src, &mut probe).map_err(io)? != 0 {
        return Err(changed(label));
    }
    Ok(())
}

/// Reads and seals one batch of chunks of one file version.
struct BatchSealer<'a> {
    key: &'a AeadKey,
    id: &'a FileId,
    chunk_len: u32,
    size: u64,
    n: u64,
    label: &'a str,
    threads: Threads,
}

impl BatchSealer<'_> {
    /// Read chunks `first .. first + batch` straight into their slots of `out` (`chunk_len +
    /// TAG_LEN` bytes each, the last one possibly shorter), seal them in parallel, and return the
    /// number of bytes to write.
    fn fill(&self, src: &mut impl Read, out: &mut [u8], first: u64, batch: u64) -> Result<usize> {
        let slot = self.chunk_len as usize + TAG_LEN;
        let mut len = 0usize;
        for i in 0..batch {
            let plen = layout::chunk_plain_len(self.size, self.chunk_len, first + i) as usize;
            let body = &mut out[len..len + plen];
            let got = read_full(src, body).map_err(|e| Error::Io {
                path: self.label.into(),
                source: e,
            })?;
            if got != plen {
                return Err(changed(self.label));
            }
            len += plen + TAG_LEN;
        }
        let seal = |(i, s): (usize, &mut [u8])| -> Result<()> {
            let idx = first + i as u64;
            let (body, tag) = s.split_at_mut(s.len() - TAG_LEN);
            let t = self
                .key
                .seal(chunk_nonce(idx, idx + 1 == self.n), &self.id.0, body)?;
            tag.copy_from_slice(&t);
            Ok(())
        };
        if !self.threads.pool || len < PAR_MIN_BYTES {
            // No pool (see [`Threads::pool`]): a batch of several chunks is split in two halves,
            // the second sealed on a scoped thread (joined here, so nothing survives a fork).
            // A small batch is sealed here, pool or not.
            let chunks = len.div_ceil(slot);
            if chunks >= 2 && len >= PAR_MIN_BYTES {
                let mid = chunks / 2 * slot;
                let (a, b) = out[..len].split_at_mut(mid);
                let half = chunks / 2;
                let rb = std::thread::scope(|s| {
                    let h = s.spawn(|| {
                        b.chunks_mut(slot)
                            .enumerate()
                            .try_for_each(|(i, c)| seal((i + half, c)))
                    });
                    let ra = a.chunks_mut(slot).enumerate().try_for_each(seal);
                    let rb = h
                        .join()
                        .unwrap_or_else(|_| Err(changed("sealing thread panicked")));
                    ra.and(rb)
                });
                rb?;
            } else {
                out[..len].chunks_mut(slot).enumerate().try_for_each(seal)?;
            }
        } else {
            out[..len]
                .par_chunks_mut(slot)
                .enumerate()
                .try_for_each(seal)?;
        }
        Ok(len)
    }
}

/// Hash exactly `size` bytes of `src` into leaves (in parallel), optionally copying the plaintext
/// to `copy`. Returns the Merkle root and the outboard (empty for single-chunk files).
pub fn seal_authenticated(
    key: &MacKey,
    chunk_len: u32,
    size: u64,
    src: &mut impl Read,
    copy: Option<&mut dyn Write>,
    label: &str,
) -> Result<([u8; 32], Vec<u8>)> {
    seal_authenticated_with(Threads::default(), key, chunk_len, size, src, copy, label)
}

/// [`seal_authenticated`] with explicit [`Threads`] (without the pool, leaves are hashed on the
/// calling thread).
pub fn seal_authenticated_with(
    threads: Threads,
    key: &MacKey,
    chunk_len: u32,
    size: u64,
    src: &mut impl Read,
    mut copy: Option<&mut dyn Write>,
    label: &str,
) -> Result<([u8; 32], Vec<u8>)> {
    let io = |e| Error::Io {
        path: label.into(),
        source: e,
    };
    let c = chunk_len as usize;
    let n = layout::chunk_count(size, chunk_len);
    let mut leaves: Vec<[u8; 32]> = Vec::with_capacity(n as usize);
    let batch_n = batch_chunks(chunk_len);
    let mut plain = vec![0u8; c * batch_n.min(n as usize)];
    let mut index = 0u64;
    while index < n {
        let batch = (n - index).min(batch_n as u64) as usize;
        let want: u64 = (0..batch as u64)
            .map(|i| layout::chunk_plain_len(size, chunk_len, index + i))
            .sum();
        let got = read_full(src, &mut plain[..want as usize]).map_err(io)?;
        if got as u64 != want {
            return Err(changed(label));
        }
        let first = index;
        let mut batch_leaves: Vec<[u8; 32]> = if want == 0 {
            vec![key.leaf(first, true, &[])]
        } else {
            let leaf = |(i, p): (usize, &[u8])| {
                let idx = first + i as u64;
                key.leaf(idx, idx + 1 == n, p)
            };
            if !threads.pool || (want as usize) < PAR_MIN_BYTES {
                plain[..want as usize]
                    .chunks(c)
                    .enumerate()
                    .map(leaf)
                    .collect()
            } else {
                plain[..want as usize]
                    .par_chunks(c)
                    .enumerate()
                    .map(leaf)
                    .collect()
            }
        };
        leaves.append(&mut batch_leaves);
        if let Some(w) = copy.as_mut() {
            w.write_all(&plain[..want as usize]).map_err(io)?;
        }
        index += batch as u64;
    }
    let mut probe = [0u8; 1];
    if read_full(src, &mut probe).map_err(io)? != 0 {
        return Err(changed(label));
    }
    Ok(merkle_root_and_outboard(key, &leaves))
}

/// How the chunks of one file are checked.
pub enum FileCodec<R: ReadAt, O: ReadAt> {
    Encrypted {
        key: AeadKey,
        id: FileId,
        data: R,
    },
    Authenticated {
        key: MacKey,
        root: [u8; 32],
        data: R,
        outboard: Option<O>,
    },
    /// Encrypted-file format 2: chunk entries in a verified page tree (`tree.rs`).
    Tree {
        keys: tree::EpochKeys,
        data: R,
        tree: tree::TreeReader<O>,
    },
}

/// Sequential readahead starts with a window of this many plaintext bytes (at least one chunk)...
const WINDOW_MIN: u64 = 128 * 1024;
/// ...and doubles on every sequential miss up to this many, read with one `pread`.
const WINDOW_MAX: u64 = 1024 * 1024;
/// Authenticated files: windows stop growing at 128 KiB, and sequential requests of 128 KiB are
/// read straight into the caller's buffer and hashed there. A 1 MiB window (plaintext read into
/// it, hashed, copied out: it leaves the core's L2 between the steps) made warm `cat` of a 1 GiB
/// file 10 % slower than the old one-chunk reader; this is as fast as it.
const WINDOW_MAX_AUTHENTICATED: u64 = 128 * 1024;
/// Spans of at least this many bytes are verified on two threads (scoped, joined before return).
/// AES-GCM runs at about 5 GB/s on one core here, so a 1 MiB window costs about 200 us; a second
/// thread saved less than its start and, on a shared machine, its wait for a core (measured with
/// `cat`, bench/RESULTS.md), so only larger requests are split.
const PARALLEL_MIN: usize = 2 << 20;
/// Spans of at least this many bytes are split with a [`Helper`] (no thread start to pay for).
const HELPER_MIN: usize = 256 << 10;
/// A sequential request covering at least this many bytes of whole chunks is decrypted straight
/// into the caller's buffer; smaller sequential requests (`cat` reads 128 KiB) are served from
/// the readahead window.
const DIRECT_MIN: u64 = 1024 * 1024;

/// Does this machine have more than one core (a read helper thread can help)? Asked once: the
/// answer is a fact about the machine, not an option.
fn several_cores() -> bool {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get())) > 1
}

/// Check an encrypted file's header (its format and file id) and its length (`expected`, for a
/// plaintext of `size` bytes; `None`: too large to store) before any chunk is read.
fn check_encrypted<R: ReadAt>(
    data: &R,
    header: &[u8; ENC_HEADER_LEN as usize],
    expected: Option<u64>,
    size: u64,
    longer_ok: bool,
    label: &str,
) -> Result<()> {
    let io = |e| Error::Io {
        path: label.into(),
        source: e,
    };
    let expected = expected.ok_or_else(|| Error::FileTooLarge {
        path: label.into(),
        size,
    })?;
    let actual = data.len().map_err(io)?;
    let mut h = [0u8; ENC_HEADER_LEN as usize];
    if actual >= ENC_HEADER_LEN {
        data.read_exact_at(&mut h, 0).map_err(io)?;
        if &h != header {
            return Err(Error::HeaderMismatch { path: label.into() });
        }
    }
    // A format-2 data file may be longer: chunks an interrupted commit appended past the
    // committed end (FORMAT.md §5b). Reads never go past the committed size.
    if actual != expected && !(longer_ok && actual > expected) {
        return Err(Error::SizeMismatch {
            path: label.into(),
            expected,
            actual,
        });
    }
    Ok(())
}

/// Outcome of loading a span of chunks: how many (from its first) verified, and the error of the
/// first one that did not.
struct Span {
    ok: u64,
    err: Option<Error>,
}

/// Verified random-access reader over one protected file version.
///
/// It caches a *window* of consecutive verified chunks (their plaintext, contiguous). A miss on
/// the chunk right after the last one served is sequential access: the reader then loads a window
/// of many chunks with one `pread` (128 KiB, doubling up to 1 MiB, like kernel readahead); any
/// other miss loads only the chunks the request touches. A request that covers whole chunks
/// worth at least 1 MiB (or any whole chunk on random access) is decrypted straight into the
/// caller's buffer. Every chunk is verified before any of its bytes are returned; a chunk that
/// fails is zeroed in the destination, and the window keeps only the chunks before it.
pub struct ProtectedReader<R: ReadAt, O: ReadAt> {
    codec: FileCodec<R, O>,
    size: u64,
    chunk_len: u32,
    label: String,
    /// Window: verified plaintext of chunks `win_first .. win_first + win_count` in `buf`.
    win_first: u64,
    win_count: u64,
    buf: Vec<u8>,
    /// Ciphertext staging, one per thread.
    scratch: [Vec<u8>; 2],
    /// Chunk after the last one served (sequential detection); current readahead in chunks.
    next: u64,
    ra: u64,
    /// May large reads use a second thread ([`Threads::read_helper`]), and which lent one?
    read_helper: bool,
    helper: Option<HelperRef>,
}

impl<R: ReadAt, O: ReadAt> ProtectedReader<R, O> {
    /// Checks the on-disk length (and, for encrypted files, the header) before any read.
    pub fn new(codec: FileCodec<R, O>, size: u64, chunk_len: u32, label: String) -> Result<Self> {
        // Keeps every length and offset below in range (parsing refuses such values too).
        if size > layout::MAX_FILE_SIZE {
            return Err(Error::FileTooLarge { path: label, size });
        }
        if !(layout::MIN_CHUNK_LEN..=layout::MAX_CHUNK_LEN).contains(&chunk_len) {
            return Err(Error::Invalid {
                path: label,
                reason: format!("chunk length {chunk_len} out of range"),
            });
        }
        match &codec {
            FileCodec::Encrypted { id, data, .. } => {
                let expected = layout::enc_file_len(size, chunk_len);
                check_encrypted(data, &enc_header(id), expected, size, false, &label)?;
            }
            FileCodec::Tree { keys, data, .. } => {
                let expected = layout_tree::data_len(size);
                check_encrypted(
                    data,
                    &tree::header2(keys.id()),
                    expected,
                    size,
                    true,
                    &label,
                )?;
            }
            FileCodec::Authenticated { data, outboard, .. } => {
                let actual = data.len().map_err(|e| Error::Io {
                    path: label.clone().into(),
                    source: e,
                })?;
                if actual != size {
                    return Err(Error::SizeMismatch {
                        path: label,
                        expected: size,
                        actual,
                    });
                }
                let leaves = layout::chunk_count(size, chunk_len);
                let need = layout::outboard_len(leaves).ok_or_else(|| Error::FileTooLarge {
                    path: label.clone(),
                    size,
                })?;
                let have = match outboard {
                    Some(o) => o.len().map_err(|e| Error::Io {
                        path: label.clone().into(),
                        source: e,
                    })?,
                    None => 0,
                };
                if have != need {
                    return Err(Error::Invalid {
                        path: label,
                        reason: format!("integrity tree is {have} bytes, expected {need} (tree missing or modified)"),
                    });
                }
            }
        }
        Ok(ProtectedReader {
            codec,
            size,
            chunk_len,
            label,
            win_first: 0,
            win_count: 0,
            buf: Vec::new(),
            scratch: [Vec::new(), Vec::new()],
            next: 0,
            ra: 0,
            read_helper: Threads::default().read_helper,
            helper: None,
        })
    }

    /// Use these [`Threads`] for later reads ([`Threads::read_helper`] and
    /// [`Threads::helper`] apply).
    pub fn set_threads(&mut self, threads: Threads) {
        self.read_helper = threads.read_helper;
        self.helper = threads.helper;
    }

    /// Builder form of [`ProtectedReader::set_threads`].
    pub fn with_threads(mut self, threads: Threads) -> Self {
        self.set_threads(threads);
        self
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Hint that bytes `offset .. offset + len` of the data file are needed soon
    /// ([`ReadAt::will_need`]).
    pub fn will_need_data(&self, offset: u64, len: u64) {
        match &self.codec {
            FileCodec::Encrypted { data, .. }
            | FileCodec::Authenticated { data, .. }
            | FileCodec::Tree { data, .. } => data.will_need(offset, len),
        }
    }

    /// The verified chunk tree of a format-2 file (an update reads its pages through it).
    pub fn tree_mut(&mut self) -> Option<&mut tree::TreeReader<O>> {
        match &mut self.codec {
            FileCodec::Tree { tree, .. } => Some(tree),
            _ => None,
        }
    }

    pub fn chunk_len(&self) -> u32 {
        self.chunk_len
    }

    fn chunks(&self) -> u64 {
        layout::chunk_count(self.size, self.chunk_len)
    }

    /// Plaintext bytes of chunks `first .. first + count`.
    fn span_bytes(&self, first: u64, count: u64) -> u64 {
        let c = self.chunk_len as u64;
        ((first + count) * c).min(self.size) - (first * c).min(self.size)
    }

    /// Verify chunks `first .. first + count` into `dest` (exactly their plaintext length) with
    /// one positioned read, on two threads when the span is large. Authenticated leaves are
    /// appended to `leaves` when given.
    fn load_span(
        &mut self,
        first: u64,
        count: u64,
        dest: &mut [u8],
        leaves: Option<&mut Vec<[u8; 32]>>,
    ) -> Span {
        // Format 2: verify the tree pages and derive the keys first; chunks past a page that
        // fails are not read.
        let (prep, tree_err) = match &mut self.codec {
            FileCodec::Tree { keys, tree, .. } => {
                let mut v = Vec::with_capacity(count as usize);
                let mut err = None;
                for i in first..first + count {
                    match tree
                        .entry(i)
                        .and_then(|e| keys.key(&e.epoch).map(|k| (k, e.tag)))
                    {
                        Ok(x) => v.push(x),
                        Err(e) => {
                            err = Some(e);
                            break;
                        }
                    }
                }
                (Some(v), err)
            }
            _ => (None, None),
        };
        if let Some(e) = tree_err {
            let ok = prep.as_ref().map_or(0, |v| v.len() as u64);
            let cut = self.span_bytes(first, ok) as usize;
            let (head, tail) = dest.split_at_mut(cut);
            tail.fill(0);
            let span = self.load_span_prepared(first, ok, head, leaves, prep.as_deref());
            return match span.err {
                Some(_) => span,
                None => Span { ok, err: Some(e) },
            };
        }
        self.load_span_prepared(first, count, dest, leaves, prep.as_deref())
    }

    fn load_span_prepared(
        &mut self,
        first: u64,
        count: u64,
        dest: &mut [u8],
        leaves: Option<&mut Vec<[u8; 32]>>,
        prep: Option<&[(std::sync::Arc<AeadKey>, [u8; TAG_LEN])]>,
    ) -> Span {
        if count == 0 {
            return Span { ok: 0, err: None };
        }
        let [mut s0, mut s1] = std::mem::take(&mut self.scratch);
        let split = count >= 2 && self.read_helper && several_cores();
        let helper: Option<&dyn Helper> = match self.helper {
            Some(h) if split && dest.len() >= HELPER_MIN => Some(h.0),
            _ if split && dest.len() >= PARALLEL_MIN => Some(&ScopedThread),
            _ => None,
        };
        let mut halves = None;
        if let Some(h) = helper {
            let half = count / 2;
            let (d0, d1) = dest.split_at_mut(self.span_bytes(first, half) as usize);
            let (mut l0, mut l1) = (Vec::new(), Vec::new());
            let (mut a, mut b) = (None, None);
            let this = &*self;
            let lent = h.run_beside(
                &mut || {
                    let p = prep.map(|p| &p[half as usize..]);
                    b = Some(this.load_part(
                        first + half,
                        count - half,
                        d1,
                        &mut s1,
                        Some(&mut l1),
                        p,
                    ));
                },
                &mut || a = Some(this.load_part(first, half, d0, &mut s0, Some(&mut l0), prep)),
            );
            if let (true, Some(a), Some(b)) = (lent, a, b) {
                halves = Some((half, a, b, l0, l1));
            }
        }
        // No thread for the second half (none free, none could start, or it panicked): the
        // whole span on this thread.
        let span = match halves {
            Some((half, a, b, l0, l1)) => Self::join_halves(half, a, b, leaves, l0, l1),
            None => self.load_part(first, count, dest, &mut s0, leaves, prep),
        };
        self.scratch = [s0, s1];
        span
    }

    /// The span of two halves read side by side (the second counts only if the first is whole),
    /// with their authenticated leaves appended in order.
    fn join_halves(
        half: u64,
        a: Span,
        b: Span,
        leaves: Option<&mut Vec<[u8; 32]>>,
        l0: Vec<[u8; 32]>,
        l1: Vec<[u8; 32]>,
    ) -> Span {
        if let Some(v) = leaves {
            v.extend_from_slice(&l0);
            if a.ok == half {
                v.extend_from_slice(&l1);
            }
        }
        if a.ok < half {
            a
        } else {
            Span {
                ok: half + b.ok,
                err: b.err,
            }
        }
    }

    /// One thread's part of `load_span`.
    fn load_part(
        &self,
        first: u64,
        count: u64,
        dest: &mut [u8],
        scratch: &mut Vec<u8>,
        mut leaves: Option<&mut Vec<[u8; 32]>>,
        prep: Option<&[(std::sync::Arc<AeadKey>, [u8; TAG_LEN])]>,
    ) -> Span {
        if count == 0 {
            return Span { ok: 0, err: None };
        }
        let n = self.chunks();
        let c = self.chunk_len as usize;
        let io = |e| Span {
            ok: 0,
            err: Some(Error::Io {
                path: self.label.clone().into(),
                source: e,
            }),
        };
        let fail = |i: u64| Span {
            ok: i - first,
            err: Some(Error::ChunkAuth {
                path: self.label.clone(),
                chunk: i,
            }),
        };
        match &self.codec {
            FileCodec::Encrypted { key, id, data } => {
                let ct_len = dest.len() + count as usize * TAG_LEN;
                scratch.resize(ct_len, 0);
                // `first` is a chunk of a file whose whole length was checked in `new`.
                let at = layout::enc_chunk_offset(self.chunk_len, first).unwrap_or(u64::MAX);
                if let Err(e) = data.read_exact_at(scratch, at) {
                    return io(e);
                }
                let mut off = 0;
                for (k, out) in dest.chunks_mut(c.max(1)).enumerate() {
                    let i = first + k as u64;
                    let ct = &scratch[off..off + out.len()];
                    let tag = &scratch[off + out.len()..off + out.len() + TAG_LEN];
                    if !key.open_to(chunk_nonce(i, i + 1 == n), &id.0, ct, tag, out) {
                        return fail(i);
                    }
                    off += out.len() + TAG_LEN;
                }
                if dest.is_empty() {
                    // the empty last chunk of an empty file: only a tag
                    if !key.open_to(
                        chunk_nonce(first, true),
                        &id.0,
                        &[],
                        &scratch[..TAG_LEN],
                        &mut [],
                    ) {
                        return fail(first);
                    }
                }
            }
            FileCodec::Tree { keys, data, .. } => {
                let Some(prep) = prep.filter(|p| p.len() as u64 >= count) else {
                    return Span {
                        ok: 0,
                        err: Some(Error::Other("chunk entries not prepared".into())),
                    };
                };
                let id = keys.id();
                // The ciphertext is as long as the plaintext (the tags are in the tree): read it
                // into `dest` and open it there, one copy fewer than through `scratch`. A chunk
                // that fails is zeroed by `open_in_place_to`, the chunks after it here.
                // `first` is a chunk of a file whose whole length was checked in `new`.
                let at = layout_tree::chunk_offset(self.chunk_len, first).unwrap_or(u64::MAX);
                if let Err(e) = data.read_exact_at(dest, at) {
                    dest.fill(0);
                    return io(e);
                }
                let mut rest = &mut dest[..];
                let mut k = 0;
                while !rest.is_empty() {
                    let (out, tail) = rest.split_at_mut(rest.len().min(c.max(1)));
                    let i = first + k as u64;
                    let (key, tag) = &prep[k];
                    if !key.open_in_place_to(tree::nonce2(i), &tree::aad2(id, i), tag, out) {
                        tail.fill(0);
                        return fail(i);
                    }
                    rest = tail;
                    k += 1;
                }
                if dest.is_empty() {
                    let (key, tag) = &prep[0];
                    if !key.open_to(
                        tree::nonce2(first),
                        &tree::aad2(id, first),
                        &[],
                        tag,
                        &mut [],
                    ) {
                        return fail(first);
                    }
                }
            }
            FileCodec::Authenticated {
                key,
                root,
                data,
                outboard,
            } => {
                if let Err(e) = data.read_exact_at(dest, first * c as u64) {
                    dest.fill(0);
                    return io(e);
                }
                let mut check = |i: u64, p: &mut [u8]| -> std::result::Result<bool, Span> {
                    let leaf = key.leaf(i, i + 1 == n, p);
                    match verify_leaf(key, root, n, i, leaf, outboard.as_ref()) {
                        Ok(true) => {
                            if let Some(v) = leaves.as_deref_mut() {
                                v.push(leaf);
                            }
                            Ok(true)
                        }
                        Ok(false) => {
                            p.fill(0);
                            Ok(false)
                        }
                        Err(e) => {
                            p.fill(0);
                            Err(io(e))
                        }
                    }
                };
                let mut i = first;
                let mut rest = &mut dest[..];
                loop {
                    let take = rest.len().min(c);
                    let (p, tail) = rest.split_at_mut(take);
                    match check(i, p) {
                        Ok(true) => {}
                        Ok(false) => {
                            tail.fill(0);
                            return fail(i);
                        }
                        Err(mut s) => {
                            tail.fill(0);
                            s.ok = i - first;
                            return s;
                        }
                    }
                    i += 1;
                    rest = tail;
                    if rest.is_empty() || i >= first + count {
                        break;
                    }
                }
            }
        }
        Span {
            ok: count,
            err: None,
        }
    }

    /// Make the window hold chunks `first .. first + count` (clipped to the file); keeps the
    /// verified prefix when a chunk fails, and returns that chunk's error if `first` itself failed.
    fn load_window(&mut self, first: u64, count: u64) -> Result<()> {
        let count = count.min(self.chunks().saturating_sub(first));
        self.win_count = 0;
        let bytes = self.span_bytes(first, count) as usize;
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(bytes, 0);
        let span = self.load_span(first, count, &mut buf, None);
        buf.truncate(self.span_bytes(first, span.ok) as usize);
        self.buf = buf;
        self.win_first = first;
        self.win_count = span.ok;
        match span.err {
            Some(e) if span.ok == 0 => Err(e),
            _ => Ok(()),
        }
    }

    /// Verified plaintext of chunk `index` (empty past the end).
    pub fn chunk(&mut self, index: u64) -> Result<&[u8]> {
        if index >= self.chunks() {
            return Ok(&[]);
        }
        if !(self.win_first..self.win_first + self.win_count).contains(&index) {
            self.load_window(index, 1)?;
        }
        let c = self.chunk_len as u64;
        let start = ((index - self.win_first) * c) as usize;
        let end = (start + c as usize).min(self.buf.len());
        Ok(&self.buf[start..end])
    }

    /// Fill `out` with the verified plaintext at `offset`; a range past the end of the file is
    /// [`Error::SizeMismatch`] (the file is shorter than the caller knows it to be).
    pub fn read_exact_at(&mut self, out: &mut [u8], offset: u64) -> Result<()> {
        let n = self.read_at(out, offset)?;
        if n < out.len() {
            return Err(Error::SizeMismatch {
                path: self.label.clone(),
                expected: offset + out.len() as u64,
                actual: self.size,
            });
        }
        Ok(())
    }

    /// Read verified plaintext at `offset` into `out`; returns bytes read (0 at end of file).
    /// It reads all of `out` that lies within the file.
    pub fn read_at(&mut self, out: &mut [u8], offset: u64) -> Result<usize> {
        // An empty file still has one (empty) chunk; no read below touches it, so check it here,
        // or a modified tag of an empty encrypted file would pass every read.
        if self.size == 0 && self.win_count == 0 {
            self.load_window(0, 1)?;
        }
        let c = self.chunk_len as u64;
        let want = (out.len() as u64).min(self.size.saturating_sub(offset)) as usize;
        let mut done = 0usize;
        while done < want {
            let pos = offset + done as u64;
            let index = pos / c;
            let rest = (want - done) as u64;
            // Served from the window?
            if self.win_count > 0
                && (self.win_first..self.win_first + self.win_count).contains(&index)
            {
                let start = (pos - self.win_first * c) as usize;
                let k = (self.buf.len() - start).min(want - done);
                out[done..done + k].copy_from_slice(&self.buf[start..start + k]);
                done += k;
                self.next = (pos + k as u64 - 1) / c + 1;
                continue;
            }
            let sequential = index == self.next;
            // Whole chunks the request covers from here (the last chunk may be short at EOF).
            let whole = if !pos.is_multiple_of(c) {
                0
            } else if pos + rest == self.size {
                self.chunks() - index
            } else {
                rest / c
            };
            let direct_min = match self.codec {
                FileCodec::Encrypted { .. } | FileCodec::Tree { .. } => DIRECT_MIN,
                FileCodec::Authenticated { .. } => WINDOW_MAX_AUTHENTICATED,
            };
            if whole > 0 && (!sequential || whole * c >= direct_min) {
                let bytes = self.span_bytes(index, whole) as usize;
                let span = self.load_span(index, whole, &mut out[done..done + bytes], None);
                if let Some(e) = span.err {
                    return Err(e);
                }
                done += bytes;
                self.next = index + whole;
                continue;
            }
            let needed = (pos % c + rest).div_ceil(c);
            let count = if sequential {
                let max = match self.codec {
                    FileCodec::Encrypted { .. } | FileCodec::Tree { .. } => WINDOW_MAX,
                    FileCodec::Authenticated { .. } => WINDOW_MAX_AUTHENTICATED,
                };
                let (lo, hi) = ((WINDOW_MIN.min(max) / c).max(1), (max / c).max(1));
                self.ra = if self.ra == 0 {
                    lo
                } else {
                    (self.ra * 2).min(hi)
                };
                self.ra.max(needed)
            } else {
                self.ra = 0;
                needed
            };
            self.load_window(index, count)?;
        }
        Ok(done)
    }

    /// The whole plaintext, read from the start in reads of `step` bytes (tests).
    #[cfg(test)]
    pub(crate) fn read_in_steps(&mut self, step: usize) -> Result<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; step];
        loop {
            let n = self.read_at(&mut buf, got.len() as u64)?;
            if n == 0 {
                return Ok(got);
            }
            got.extend_from_slice(&buf[..n]);
        }
    }

    /// Verify every chunk (for `fspf verify`), in order, and for authenticated files every byte of
    /// the outboard: the last node of an odd-width level is never read as a sibling, so random
    /// reads cannot notice a change there, but a full verification must.
    pub fn verify_all(&mut self) -> Result<()> {
        let n = self.chunks();
        let per = (WINDOW_MAX / self.chunk_len as u64).max(1);
        let mut leaves = Vec::new();
        let mut buf = std::mem::take(&mut self.buf);
        self.win_count = 0;
        let mut first = 0;
        let mut result = Ok(());
        while first < n {
            let count = per.min(n - first);
            buf.resize(self.span_bytes(first, count) as usize, 0);
            let span = self.load_span(first, count, &mut buf, Some(&mut leaves));
            if let Some(e) = span.err {
                result = Err(e);
                break;
            }
            first += count;
        }
        buf.clear();
        self.buf = buf;
        result?;
        if let FileCodec::Authenticated {
            key,
            outboard: Some(o),
            ..
        } = &self.codec
        {
            let (_, expected) = merkle_root_and_outboard(key, &leaves);
            let mut stored = vec![0u8; expected.len()];
            o.read_exact_at(&mut stored, 0).map_err(|e| Error::Io {
                path: self.label.clone().into(),
                source: e,
            })?;
            if !crate::crypto::ct_eq(&stored, &expected) {
                return Err(Error::Invalid {
                    path: self.label.clone(),
                    reason: "integrity tree does not match the verified contents (tree modified)"
                        .into(),
                });
            }
        }
        Ok(())
    }

    /// Verify the whole file in blocks of about `block` bytes and hand each verified block to
    /// `sink(offset, plaintext)`; with read threads allowed and a file of at least two blocks, the
    /// two halves of the file are done on two threads at once (each half in order), so a sink
    /// that copies into the page cache runs in parallel too. Stops at the first chunk that fails
    /// or the first sink error and returns it; every block handed out before was verified.
    pub fn for_each_verified(
        &mut self,
        block: usize,
        sink: impl Fn(u64, &[u8]) -> std::io::Result<()> + Sync,
    ) -> Result<()> {
        let n = self.chunks();
        let c = self.chunk_len as u64;
        let per = (block as u64 / c).max(1);
        if matches!(self.codec, FileCodec::Tree { .. }) {
            // Tree pages are verified through `&mut self`: one block after the other (a large
            // block is still verified on two threads by `load_span`).
            let mut buf = Vec::new();
            let mut i = 0;
            while i < n {
                let count = per.min(n - i);
                buf.resize(self.span_bytes(i, count) as usize, 0);
                let span = self.load_span(i, count, &mut buf, None);
                if let Some(e) = span.err {
                    return Err(e);
                }
                sink(i * c, &buf).map_err(|e| Error::Io {
                    path: self.label.clone().into(),
                    source: e,
                })?;
                i += count;
            }
            return Ok(());
        }
        let stop = std::sync::atomic::AtomicBool::new(false);
        let part = |first: u64, end: u64, scratch: &mut Vec<u8>| -> Result<()> {
            let mut buf = vec![0u8; self.span_bytes(first, per.min(end - first)) as usize];
            let mut i = first;
            while i < end && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let count = per.min(end - i);
                let bytes = self.span_bytes(i, count) as usize;
                let span = self.load_part(i, count, &mut buf[..bytes], scratch, None, None);
                let r = match span.err {
                    Some(e) => Err(e),
                    None => sink(i * c, &buf[..bytes]).map_err(|e| Error::Io {
                        path: self.label.clone().into(),
                        source: e,
                    }),
                };
                if r.is_err() {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    return r;
                }
                i += count;
            }
            Ok(())
        };
        let (mut s0, mut s1) = (Vec::new(), Vec::new());
        if n >= 2 * per && self.read_helper && several_cores() {
            let half = n / 2;
            let helper: &dyn Helper = self.helper.map_or(&ScopedThread, |h| h.0);
            let (mut a, mut b) = (None, None);
            let lent = helper.run_beside(&mut || b = Some(part(half, n, &mut s1)), &mut || {
                a = Some(part(0, half, &mut s0))
            });
            match (lent, a, b) {
                (true, Some(a), Some(b)) => a.and(b),
                // No thread for the second half: this thread does it too.
                (true, Some(a), None) => a.and_then(|()| part(half, n, &mut s0)),
                _ => part(0, n, &mut s0),
            }
        } else {
            part(0, n, &mut s0)
        }
    }

    /// Stream the whole verified plaintext to `w`.
    pub fn copy_to(&mut self, w: &mut impl Write) -> Result<()> {
        let n = self.chunks();
        let per = (WINDOW_MAX / self.chunk_len as u64).max(1);
        let mut first = 0;
        while first < n {
            let count = per.min(n - first);
            self.load_window(first, count)?;
            if self.win_count < count {
                // a chunk inside failed: report it
                self.load_window(first + self.win_count, 1)?;
            }
            w.write_all(&self.buf).map_err(|e| Error::Io {
                path: self.label.clone().into(),
                source: e,
            })?;
            first += count;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

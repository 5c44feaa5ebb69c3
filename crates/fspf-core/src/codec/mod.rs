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

pub use merkle::{merkle_root_and_outboard, verify_leaf};
pub use readat::ReadAt;

use crate::crypto::{AeadKey, FileId, MacKey, NONCE_LEN, TAG_LEN};
use crate::error::{Error, Result};
use crate::format::layout::{self, ENC_HEADER_LEN, ENC_MAGIC};
use rayon::prelude::*;
use std::io::{Read, Write};

static SEQUENTIAL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Seal on the calling thread only (no rayon pool). The preload shield sets this: a thread pool
/// in an interposed process does not survive `fork`, and a forked child that seals would hang.
pub fn set_sequential(on: bool) {
    SEQUENTIAL.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub(crate) fn sequential() -> bool {
    SEQUENTIAL.load(std::sync::atomic::Ordering::Relaxed)
}

/// Chunks sealed per parallel batch when importing (64 × 64 KiB = 4 MiB).
const BATCH_CHUNKS: usize = 64;
/// In sequential mode, batches of at least this many chunks are sealed on two scoped threads.
const PAR_MIN_CHUNKS: usize = 8;

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
    let io = |e| Error::Io {
        path: label.into(),
        source: e,
    };
    dst.write_all(&enc_header(id)).map_err(io)?;
    let n = layout::chunk_count(size, chunk_len);
    let slot = chunk_len as usize + TAG_LEN;
    let sealer = BatchSealer {
        key,
        id,
        chunk_len,
        size,
        n,
        label,
    };
    if n <= BATCH_CHUNKS as u64 {
        // Exactly the bytes to write: small files must not pay for zeroing a whole chunk.
        let mut out = vec![0u8; (layout::enc_file_len(size, chunk_len) - ENC_HEADER_LEN) as usize];
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
            let mut spare = vec![vec![0u8; slot * BATCH_CHUNKS]; 2];
            let mut sealed = Ok(());
            let mut first = 0u64;
            while first < n {
                let Some(mut buf) = spare.pop().or_else(|| empty_rx.recv().ok()) else {
                    break; // writer failed; its error is returned below
                };
                let batch = (n - first).min(BATCH_CHUNKS as u64);
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
                first += BATCH_CHUNKS as u64;
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
        if sequential() {
            // No pool (see `set_sequential`): a batch of several chunks is split in two halves,
            // the second sealed on a scoped thread (joined here, so nothing survives a fork).
            let chunks = len.div_ceil(slot);
            if chunks >= PAR_MIN_CHUNKS {
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
    let mut plain = vec![0u8; c * BATCH_CHUNKS.min(n as usize)];
    let mut index = 0u64;
    while index < n {
        let batch = (n - index).min(BATCH_CHUNKS as u64) as usize;
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
            if sequential() {
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
}

/// Verified random-access reader over one protected file version, with a one-chunk cache.
pub struct ProtectedReader<R: ReadAt, O: ReadAt> {
    codec: FileCodec<R, O>,
    size: u64,
    chunk_len: u32,
    label: String,
    cached: Option<u64>,
    buf: Vec<u8>,
    /// Leaf of the chunk last loaded (authenticated files), collected by `verify_all`.
    last_leaf: Option<[u8; 32]>,
}

impl<R: ReadAt, O: ReadAt> ProtectedReader<R, O> {
    /// Checks the on-disk length (and, for encrypted files, the header) before any read.
    pub fn new(codec: FileCodec<R, O>, size: u64, chunk_len: u32, label: String) -> Result<Self> {
        match &codec {
            FileCodec::Encrypted { id, data, .. } => {
                let expected = layout::enc_file_len(size, chunk_len);
                let actual = data.len().map_err(|e| Error::Io {
                    path: label.clone().into(),
                    source: e,
                })?;
                let mut h = [0u8; ENC_HEADER_LEN as usize];
                if actual >= ENC_HEADER_LEN {
                    data.read_exact_at(&mut h, 0).map_err(|e| Error::Io {
                        path: label.clone().into(),
                        source: e,
                    })?;
                    if h != enc_header(id) {
                        return Err(Error::HeaderMismatch { path: label });
                    }
                }
                if actual != expected {
                    return Err(Error::SizeMismatch {
                        path: label,
                        expected,
                        actual,
                    });
                }
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
                let need = layout::outboard_len(leaves);
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
            cached: None,
            buf: Vec::new(),
            last_leaf: None,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunk_len(&self) -> u32 {
        self.chunk_len
    }

    /// Verified plaintext of chunk `index`.
    pub fn chunk(&mut self, index: u64) -> Result<&[u8]> {
        if self.cached != Some(index) {
            self.cached = None;
            let n = layout::chunk_count(self.size, self.chunk_len);
            if index >= n {
                return Ok(&[]);
            }
            let plen = layout::chunk_plain_len(self.size, self.chunk_len, index) as usize;
            let last = index + 1 == n;
            let io = |e| Error::Io {
                path: self.label.clone().into(),
                source: e,
            };
            match &self.codec {
                FileCodec::Encrypted { key, id, data } => {
                    self.buf.resize(plen + TAG_LEN, 0);
                    data.read_exact_at(
                        &mut self.buf,
                        layout::enc_chunk_offset(self.chunk_len, index),
                    )
                    .map_err(io)?;
                    if key.open(chunk_nonce(index, last), &id.0, &mut self.buf) != Some(plen) {
                        self.buf.clear();
                        return Err(Error::ChunkAuth {
                            path: self.label.clone(),
                            chunk: index,
                        });
                    }
                    self.buf.truncate(plen);
                }
                FileCodec::Authenticated {
                    key,
                    root,
                    data,
                    outboard,
                } => {
                    self.buf.resize(plen, 0);
                    data.read_exact_at(&mut self.buf, index * self.chunk_len as u64)
                        .map_err(io)?;
                    let leaf = key.leaf(index, last, &self.buf);
                    self.last_leaf = Some(leaf);
                    let ok =
                        verify_leaf(key, root, n, index, leaf, outboard.as_ref()).map_err(io)?;
                    if !ok {
                        self.buf.clear();
                        return Err(Error::ChunkAuth {
                            path: self.label.clone(),
                            chunk: index,
                        });
                    }
                }
            }
            self.cached = Some(index);
        }
        Ok(&self.buf)
    }

    /// Read verified plaintext at `offset` into `out`; returns bytes read (0 at end of file).
    pub fn read_at(&mut self, out: &mut [u8], offset: u64) -> Result<usize> {
        let mut done = 0;
        let c = self.chunk_len as u64;
        while done < out.len() {
            let pos = offset + done as u64;
            if pos >= self.size {
                break;
            }
            let index = pos / c;
            let within = (pos % c) as usize;
            let chunk = self.chunk(index)?;
            let k = (chunk.len() - within).min(out.len() - done);
            out[done..done + k].copy_from_slice(&chunk[within..within + k]);
            done += k;
        }
        Ok(done)
    }

    /// Verify every chunk (for `fspf verify`), in order, and for authenticated files every byte of
    /// the outboard: the last node of an odd-width level is never read as a sibling, so random
    /// reads cannot notice a change there, but a full verification must.
    pub fn verify_all(&mut self) -> Result<()> {
        let n = layout::chunk_count(self.size, self.chunk_len);
        self.cached = None;
        let mut leaves = Vec::new();
        for i in 0..n {
            self.chunk(i)?;
            leaves.extend(self.last_leaf.take());
        }
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

    /// Stream the whole verified plaintext to `w`.
    pub fn copy_to(&mut self, w: &mut impl Write) -> Result<()> {
        let n = layout::chunk_count(self.size, self.chunk_len);
        for i in 0..n {
            let label = self.label.clone();
            let c = self.chunk(i)?;
            w.write_all(c).map_err(|e| Error::Io {
                path: label.into(),
                source: e,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

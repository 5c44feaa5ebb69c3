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

fn sequential() -> bool {
    SEQUENTIAL.load(std::sync::atomic::Ordering::Relaxed)
}

/// Chunks sealed per parallel batch when importing (64 × 64 KiB = 4 MiB).
const BATCH_CHUNKS: usize = 64;

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
pub fn seal_encrypted(
    key: &AeadKey,
    id: &FileId,
    chunk_len: u32,
    size: u64,
    src: &mut impl Read,
    dst: &mut impl Write,
    label: &str,
) -> Result<()> {
    let io = |e| Error::Io {
        path: label.into(),
        source: e,
    };
    dst.write_all(&enc_header(id)).map_err(io)?;
    let c = chunk_len as usize;
    let n = layout::chunk_count(size, chunk_len);
    let mut plain = vec![0u8; c * BATCH_CHUNKS.min(n as usize)];
    let mut out = vec![0u8; (c + TAG_LEN) * BATCH_CHUNKS.min(n as usize)];
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
        let out_len = want as usize + batch * TAG_LEN;
        let seal = |(i, (slot, p)): (usize, (&mut [u8], &[u8]))| -> Result<()> {
            let idx = first + i as u64;
            let (body, tag) = slot.split_at_mut(p.len());
            body.copy_from_slice(p);
            let t = key.seal(chunk_nonce(idx, idx + 1 == n), &id.0, body)?;
            tag[..TAG_LEN].copy_from_slice(&t);
            Ok(())
        };
        let plain_chunks = || {
            plain[..want as usize]
                .chunks(c.max(1))
                .chain(std::iter::once(&[][..]))
                .take(batch)
        };
        if sequential() {
            out[..out_len]
                .chunks_mut(c + TAG_LEN)
                .zip(plain_chunks())
                .enumerate()
                .try_for_each(seal)?;
        } else {
            out[..out_len]
                .par_chunks_mut(c + TAG_LEN)
                .zip(
                    plain[..want as usize]
                        .par_chunks(c.max(1))
                        .chain(rayon::iter::once(&[][..]))
                        .take(batch),
                )
                .enumerate()
                .try_for_each(seal)?;
        }
        dst.write_all(&out[..out_len]).map_err(io)?;
        index += batch as u64;
    }
    let mut probe = [0u8; 1];
    if read_full(src, &mut probe).map_err(io)? != 0 {
        return Err(changed(label));
    }
    Ok(())
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

    /// Verify every chunk (for `fspf verify`), in order.
    pub fn verify_all(&mut self) -> Result<()> {
        let n = layout::chunk_count(self.size, self.chunk_len);
        for i in 0..n {
            self.chunk(i)?;
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

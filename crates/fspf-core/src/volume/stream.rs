//! A new format-2 version sealed while it is written (FORMAT.md §4a): a frontend that receives a
//! large file in order hands over its whole chunks as they complete ([`StreamStage::push`]),
//! they are sealed under one fresh epoch and written to the shadow at once, and the frontend
//! keeps only what is not sealed yet. The version is the same as [`Volume::stage_file`] of the
//! whole content would make (same layout, one epoch, the tree built at [`StreamStage::finish`]),
//! and nothing is visible until it is committed. Reads of the sealed part come back from the
//! shadow, authenticated with the tags kept in memory (16 + 8 bytes per chunk).
use super::commit::{Output, StagedFile};
use super::direct::DirectWriter;
use super::{kernel_fs, store, KernelPath, Volume};
use crate::codec::tree::{self as ct, ChunkEntry, TreeBuilder};
use crate::crypto::{self, AeadKey, FileId, MacKey, EPOCH_LEN};
use crate::error::{Error, Result};
use crate::format::layout::chunk_count;
use crate::format::metadata::{FileEntry, Protection};
use crate::format::tree as ft;
use crate::policy::EmbedPath;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// A version being sealed as it is written.
pub struct StreamStage {
    path: EmbedPath,
    label: String,
    id: FileId,
    chunk_len: u32,
    epoch: [u8; EPOCH_LEN],
    key: AeadKey,
    tree_key: MacKey,
    out: Output,
    /// The shadow, written in order (direct I/O where the file system takes it, as
    /// `stage_file` writes large versions), and a second description to read it back.
    file: Option<DirectWriter>,
    reader: File,
    loc: KernelPath,
    tags: Vec<[u8; crypto::TAG_LEN]>,
    /// Plaintext bytes sealed so far (whole chunks).
    sealed: u64,
    /// Set once the shadow is finished or removed.
    done: bool,
    writer: Arc<store::WriterGuard>,
}

impl Volume {
    /// Start a new version of the encrypted kernel-region file `path`, sealed as it is
    /// written. `Ok(None)`: not an encrypted kernel region (the caller stages it whole).
    pub fn stream_file(&self, path: &EmbedPath) -> Result<Option<StreamStage>> {
        let Some(region) = self.region_for(path) else {
            return Ok(None);
        };
        let (Protection::Encrypted, Some(rkey)) = (region.protection, region.key.as_ref()) else {
            return Ok(None);
        };
        let Some(loc) = KernelPath::of(region, path) else {
            return Ok(None);
        };
        let id = FileId::random()?;
        let mut epoch = [0u8; EPOCH_LEN];
        crypto::random_bytes(&mut epoch)?;
        let key = crypto::epoch_chunk_key(rkey, &id, &epoch)?;
        let tree_key = crypto::tree_key(rkey, &id)?;
        let writer = self.writer_guard()?;
        let out = Output::shadow(&loc, &id, path)?;
        let direct = super::direct::worthwhile_at(&out.dir);
        let open = |d: bool| {
            let extra = if d && direct {
                rustix::fs::OFlags::DIRECT
            } else {
                // A refused O_DIRECT open may have created the file already.
                let _ = rustix::fs::unlinkat(&out.dir, &out.name, rustix::fs::AtFlags::empty());
                rustix::fs::OFlags::empty()
            };
            kernel_fs::create_new_at(&out.dir, &out.name, 0o600, extra)
        };
        let made = DirectWriter::create_with(open).and_then(|mut w| {
            w.write_all(&ct::header2(&id))?;
            let r = kernel_fs::open_regular_at(&out.dir, &out.name).map_err(|e| match e {
                kernel_fs::OpenError::Io(e) => e,
                kernel_fs::OpenError::NotRegular(_) => std::io::ErrorKind::InvalidData.into(),
            })?;
            Ok((w, r))
        });
        let (file, reader) = match made {
            Ok(x) => x,
            Err(e) => {
                out.remove();
                return Err(Error::io(&out.label, e));
            }
        };
        let label = path.to_string();
        Ok(Some(StreamStage {
            path: path.clone(),
            label,
            id,
            chunk_len: region.chunk_len,
            epoch,
            key,
            tree_key,
            out,
            file: Some(file),
            reader,
            loc,
            tags: Vec::new(),
            sealed: 0,
            done: false,
            writer,
        }))
    }
}

impl StreamStage {
    /// Plaintext bytes sealed so far: the file's bytes `[0, sealed)`, a multiple of the chunk
    /// length.
    pub fn sealed(&self) -> u64 {
        self.sealed
    }

    pub fn chunk_len(&self) -> u32 {
        self.chunk_len
    }

    /// [`StreamStage::finish`] made its version.
    pub fn finished(&self) -> bool {
        self.done
    }

    /// Seal the next bytes of the file, `data` (whole chunks: a multiple of the chunk length;
    /// it is encrypted in place) and write them to the shadow.
    pub fn push(&mut self, data: &mut [u8]) -> Result<()> {
        let c = self.chunk_len as usize;
        if !data.len().is_multiple_of(c) {
            return Err(Error::Invalid {
                path: self.label.clone(),
                reason: format!("{} bytes is not a whole number of chunks", data.len()),
            });
        }
        self.seal_write(data)
    }

    /// Seal `data` as the chunks after the sealed ones (the last may be partial: the file's
    /// end) and write them to the shadow.
    fn seal_write(&mut self, data: &mut [u8]) -> Result<()> {
        if self.file.is_none() {
            return Err(self.finished_already());
        }
        let c = self.chunk_len as usize;
        let first = self.sealed / c as u64;
        for (k, chunk) in data.chunks_mut(c).enumerate() {
            let tag = ct::seal_chunk2(&self.key, &self.id, first + k as u64, chunk)?;
            self.tags.push(tag);
        }
        if let Some(w) = self.file.as_mut() {
            w.write_all(data)
                .map_err(|e| Error::io(&self.out.label, e))?;
        }
        self.sealed += data.len() as u64;
        Ok(())
    }

    fn finished_already(&self) -> Error {
        Error::Invalid {
            path: self.label.clone(),
            reason: "the stream is finished already".into(),
        }
    }

    /// Ciphertext at shadow offset `at`: from the file, or from the writer's buffer for what
    /// it has not written yet.
    fn read_sealed(&self, out: &mut [u8], at: u64) -> std::io::Result<()> {
        let Some((pos, pending)) = self.file.as_ref().map(|w| w.unwritten()) else {
            return self.reader.read_exact_at(out, at);
        };
        let end = at + out.len() as u64;
        let on_disk = (pos.saturating_sub(at) as usize).min(out.len());
        if on_disk > 0 {
            self.reader.read_exact_at(&mut out[..on_disk], at)?;
        }
        if end > pos {
            let from = (at.max(pos) - pos) as usize;
            let need = out.len() - on_disk;
            let src = pending
                .get(from..from + need)
                .ok_or(std::io::ErrorKind::UnexpectedEof)?;
            out[on_disk..].copy_from_slice(src);
        }
        Ok(())
    }

    /// The sealed plaintext at `off` (`out` must lie within [`StreamStage::sealed`]), read back
    /// from the shadow and authenticated chunk by chunk: what storage changed fails.
    pub fn read_at(&self, out: &mut [u8], off: u64) -> Result<()> {
        let end = off.saturating_add(out.len() as u64);
        if end > self.sealed {
            return Err(Error::Invalid {
                path: self.label.clone(),
                reason: format!("read to {end} past the {} bytes sealed", self.sealed),
            });
        }
        let c = u64::from(self.chunk_len);
        let mut chunk = vec![0u8; c as usize];
        let mut pos = off;
        while pos < end {
            let i = pos / c;
            let at = ft::chunk_offset(self.chunk_len, i).unwrap_or(u64::MAX);
            let clen = (self.sealed - i * c).min(c) as usize;
            self.read_sealed(&mut chunk[..clen], at)
                .map_err(|e| Error::io(&self.out.label, e))?;
            let ok = self.key.open_in_place_to(
                ct::nonce2(i),
                &ct::aad2(&self.id, i),
                &self.tags[i as usize],
                &mut chunk[..clen],
            );
            if !ok {
                return Err(Error::ChunkAuth {
                    path: self.label.clone(),
                    chunk: i,
                });
            }
            let s = (pos - i * c) as usize;
            let take = ((end - pos) as usize).min(c as usize - s);
            let o = (pos - off) as usize;
            out[o..o + take].copy_from_slice(&chunk[s..s + take]);
            pos += take as u64;
        }
        Ok(())
    }

    /// Seal `tail` (the rest of the file, any length) and the tree: the version of `size`
    /// bytes, ready for [`crate::volume::Change::Put`]. A file of 16 chunks or fewer is
    /// refused (format 1 is for those: stage it whole). The stream stays readable (its shadow
    /// is the version's until the commit renames it, and the open file follows the rename).
    /// On an error it is left unfinished, its sealed part readable.
    pub fn finish(&mut self, vol: &Volume, tail: &mut [u8], mode: u32) -> Result<StagedFile> {
        if self.done {
            return Err(self.finished_already());
        }
        let size = self.sealed + tail.len() as u64;
        let n = chunk_count(size, self.chunk_len);
        if n <= ft::FORMAT2_MIN_CHUNKS {
            return Err(Error::Invalid {
                path: self.label.clone(),
                reason: format!("{size} bytes are format 1: stage the file whole"),
            });
        }
        self.seal_write(tail)?;
        // Everything to the file (the unaligned end through the page cache): the writer is
        // done, reads come from the file from now on.
        let w = self.file.take().ok_or_else(|| self.finished_already())?;
        let written = w.finish().map_err(|e| Error::io(&self.out.label, e))?;
        debug_assert_eq!(self.tags.len() as u64, n);
        // The kernel file's permissions, as `stage_file` gives a shadow.
        let file_mode = match mode & 0o777 {
            0 => 0o600,
            m => m,
        };
        use std::os::unix::fs::PermissionsExt;
        written
            .set_permissions(std::fs::Permissions::from_mode(file_mode))
            .map_err(|e| Error::io(&self.out.label, e))?;
        let (tf, tree_path) = store::create_tree(&vol.path, &self.id)?;
        let built = (|| {
            let mut b = TreeBuilder::new(&self.tree_key, n, BufWriter::with_capacity(1 << 20, tf));
            for tag in &self.tags {
                b.push(&ChunkEntry {
                    epoch: self.epoch,
                    tag: *tag,
                })?;
            }
            let (root, w) = b.finish()?;
            let t = w.into_inner().map_err(|e| e.into_error())?;
            if vol.opts.sync_each_file {
                t.sync_all()?;
                written.sync_all()?;
            }
            Ok::<_, std::io::Error>(root)
        })();
        let root = match built {
            Ok(r) => r,
            Err(e) => {
                store::remove_tree(&vol.path, &self.id);
                return Err(Error::io(&tree_path, e));
            }
        };
        self.done = true;
        Ok(StagedFile {
            path: self.path.clone(),
            entry: FileEntry::new_file(self.id, size, Some(root), mode),
            shadow: self.out.label.clone(),
            kernel: self.loc.full(),
            loc: self.loc.clone(),
            outboard: Some(tree_path),
            _writer: self.writer.clone(),
        })
    }
}

impl Drop for StreamStage {
    /// A stream that was not finished leaves nothing: its shadow is removed.
    fn drop(&mut self) {
        if !self.done {
            self.out.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::{test_volume, Change};

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    fn read_all(v: &Volume, p: &EmbedPath) -> Vec<u8> {
        let mut r = v.open_file(p).unwrap();
        let mut out = vec![0u8; r.size() as usize];
        let mut off = 0;
        while off < out.len() {
            let n = r.read_at(&mut out[off..], off as u64).unwrap();
            assert!(n > 0);
            off += n;
        }
        out
    }

    /// Pushed in pieces, read back while open, finished with a partial tail: the committed
    /// version reads as the bytes written, in format 2 (updatable in place).
    #[test]
    fn a_streamed_version_reads_back_as_written_and_is_format_2() {
        let (_d, _p, mut v) = test_volume(&[("/a", b"a")]);
        let ep = EmbedPath::parse("/s").unwrap();
        let data = pattern(300_000);
        let mut s = v.stream_file(&ep).unwrap().unwrap();
        let c = s.chunk_len() as usize;
        let mut first = data[..10 * c].to_vec();
        s.push(&mut first).unwrap();
        let mut second = data[10 * c..40 * c].to_vec();
        s.push(&mut second).unwrap();
        assert_eq!(s.sealed(), 40 * c as u64);
        let mut back = vec![0u8; 5000];
        s.read_at(&mut back, 12_345).unwrap();
        assert!(back == data[12_345..17_345]);
        assert!(
            s.read_at(&mut back, s.sealed() - 10).is_err(),
            "past the sealed part"
        );
        let mut tail = data[40 * c..].to_vec();
        let staged = s.finish(&v, &mut tail, 0o640).unwrap();
        let mut again = data[..5000].to_vec();
        s.read_at(&mut again, 0).unwrap();
        assert!(again == data[..5000], "readable after finish");
        let tag = v.tag();
        v.commit(vec![Change::Put(staged)], Some(tag)).unwrap();
        assert!(read_all(&v, &ep) == data);
        assert!(v.update_file(&ep).unwrap().is_some(), "format 2");
    }

    /// The sealed part is read back authenticated: a chunk changed on storage meanwhile fails.
    /// A stream dropped unfinished leaves no shadow.
    #[test]
    fn a_streamed_chunk_changed_on_storage_fails_and_an_unfinished_stream_leaves_nothing() {
        let (d, _p, v) = test_volume(&[("/a", b"a")]);
        let ep = EmbedPath::parse("/s").unwrap();
        let mut s = v.stream_file(&ep).unwrap().unwrap();
        let c = s.chunk_len() as usize;
        // (More than the writer's 4 MiB buffer: the first chunks are in the file.)
        let buf_plain = pattern(2000 * c);
        let mut buf = buf_plain.clone();
        s.push(&mut buf).unwrap();
        let shadow = s.out.label.clone();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&shadow)
            .unwrap();
        f.write_all_at(&[0x55], ft::chunk_offset(s.chunk_len, 3).unwrap() + 7)
            .unwrap();
        let mut out = vec![0u8; c];
        assert!(matches!(
            s.read_at(&mut out, 3 * c as u64),
            Err(Error::ChunkAuth { chunk: 3, .. })
        ));
        s.read_at(&mut out, 4 * c as u64).unwrap();
        // The chunk split between the file and the writer's buffer reads back whole.
        let pos = s.file.as_ref().unwrap().unwritten().0;
        let i = (pos - 24) / c as u64;
        s.read_at(&mut out, i * c as u64).unwrap();
        assert!(out[..] == buf_plain[i as usize * c..(i as usize + 1) * c]);
        drop(s);
        assert!(!shadow.exists(), "the shadow is removed");
        assert!(std::fs::read_dir(d.path().join("vol"))
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains(".fspf-")));
    }
}

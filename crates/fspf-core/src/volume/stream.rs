//! A new format-2 version sealed while it is written (FORMAT.md §4a): a frontend that receives a
//! large file in order hands over its whole chunks as they complete ([`StreamStage::push`]),
//! they are sealed under one fresh epoch and written to the shadow at once, and the frontend
//! keeps only what is not sealed yet. The version is the same as [`Volume::stage_file`] of the
//! whole content would make (same layout, one epoch, the tree built at [`StreamStage::finish`]),
//! and nothing is visible until it is committed. Reads of the sealed part come back from the
//! shadow, authenticated with the tags kept in memory (16 + 8 bytes per chunk).
//!
//! A *shared* stream ([`Volume::stream_file_shared`]) serves frontends whose writers are several
//! processes (the in-process shield): its shadow is written in place at each chunk's offset
//! (nothing is held back in a writer's buffer), dropping one leaves its shadow, and another
//! process goes on with it from its [`StreamState`] and its tags ([`Volume::resume_stream`]).
//! Every chunk index is sealed at most once per stream (one random epoch per stream), whoever
//! seals it: the caller records how far sealing went before it seals, and never resumes a
//! stream whose record is past what it knows was sealed.
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

/// Where a stream writes its shadow.
enum Sink {
    /// Appended in order through a buffered (direct I/O where possible) writer.
    Direct(DirectWriter),
    /// Written in place at each chunk's offset (shared streams); the whole aligned blocks of a
    /// piece through a second description opened with `O_DIRECT` where the file system takes
    /// it (as a whole-version seal writes a large file), the unaligned edges through the page
    /// cache (the blocks direct writes touch are never in it).
    At(File, Option<File>),
}

/// `O_DIRECT` writes need offsets, lengths and memory aligned to this (512 B or 4 KiB sectors).
const DIRECT_ALIGN: u64 = 4096;

/// Open the shadow a second time with `O_DIRECT` for a shared stream's aligned writes, when
/// that is worthwhile and allowed.
fn open_direct(out: &Output) -> Option<File> {
    if !super::direct::worthwhile_at(&out.dir) {
        return None;
    }
    rustix::fs::openat(
        &out.dir,
        &out.name,
        rustix::fs::OFlags::WRONLY
            | rustix::fs::OFlags::DIRECT
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()
    .map(File::from)
}

/// Write `data` at `at`: its whole aligned blocks with `direct` (from `data` itself when its
/// memory is aligned like the file offsets, else from an aligned copy), the edges with `file`.
/// A direct write the file system refuses (`EINVAL`) goes through the page cache, and `direct`
/// is dropped for the writes after it.
fn write_at(file: &File, direct: &mut Option<File>, data: &[u8], at: u64) -> std::io::Result<()> {
    let end = at + data.len() as u64;
    let lo = at.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    let hi = end / DIRECT_ALIGN * DIRECT_ALIGN;
    let Some(d) = direct.as_ref().filter(|_| hi > lo) else {
        return file.write_all_at(data, at);
    };
    let (a, b) = ((lo - at) as usize, (hi - at) as usize);
    let mid = &data[a..b];
    let wrote = if (mid.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN as usize) {
        d.write_all_at(mid, lo)
    } else {
        let mut raw = vec![0u8; mid.len() + DIRECT_ALIGN as usize];
        let o = raw.as_ptr().align_offset(DIRECT_ALIGN as usize);
        raw[o..o + mid.len()].copy_from_slice(mid);
        d.write_all_at(&raw[o..o + mid.len()], lo)
    };
    match wrote {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc_einval()) => {
            *direct = None;
            file.write_all_at(mid, lo)?
        }
        Err(e) => return Err(e),
    }
    file.write_all_at(&data[..a], at)?;
    file.write_all_at(&data[b..], hi)
}

fn libc_einval() -> i32 {
    rustix::io::Errno::INVAL.raw_os_error()
}

/// Where the memory of a stream's piece of chunks from `first` on should start, modulo
/// [`DIRECT_ALIGN`], for its whole blocks to be written straight from it: the offset of chunk
/// `first` in the file, modulo the alignment.
fn piece_misalignment(chunk_len: u32, first: u64) -> usize {
    (ft::chunk_offset(chunk_len, first).unwrap_or(0) % DIRECT_ALIGN) as usize
}

/// Bytes a buffer of pieces needs beyond the longest piece it holds ([`piece_in`]).
pub const PIECE_SLACK: usize = 2 * DIRECT_ALIGN as usize;

/// The `n` bytes of `raw` (at least `n + PIECE_SLACK` long) where a piece of chunks from `first`
/// on is to be read before [`StreamStage::push`]: its memory lines up with its offset in the
/// shadow ([`piece_misalignment`]), so that its whole blocks are written with direct I/O
/// straight from it rather than from an aligned copy.
pub fn piece_in(raw: &mut [u8], chunk_len: u32, first: u64, n: usize) -> &mut [u8] {
    let a = DIRECT_ALIGN as usize;
    let o = (a - raw.as_ptr() as usize % a) % a + piece_misalignment(chunk_len, first);
    &mut raw[o..o + n]
}

/// What another process needs to go on with a shared stream, beside its tags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamState {
    pub id: FileId,
    pub epoch: [u8; EPOCH_LEN],
    pub chunk_len: u32,
    /// Plaintext bytes sealed (whole chunks).
    pub sealed: u64,
}

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
    file: Option<Sink>,
    reader: File,
    loc: KernelPath,
    tags: Vec<[u8; crypto::TAG_LEN]>,
    /// Plaintext bytes sealed so far (whole chunks).
    sealed: u64,
    /// Set once the shadow is finished or removed.
    done: bool,
    /// A shared stream: dropping it leaves the shadow (another process may go on with it).
    shared: bool,
    writer: Arc<store::WriterGuard>,
}

impl Volume {
    /// Start a new version of the encrypted kernel-region file `path`, sealed as it is
    /// written. `Ok(None)`: not an encrypted kernel region (the caller stages it whole).
    pub fn stream_file(&self, path: &EmbedPath) -> Result<Option<StreamStage>> {
        self.start_stream(path, false)
    }

    /// [`Volume::stream_file`] for a stream that several processes write
    /// ([`StreamState`], [`Volume::resume_stream`]).
    pub fn stream_file_shared(&self, path: &EmbedPath) -> Result<Option<StreamStage>> {
        self.start_stream(path, true)
    }

    /// Can `path` be sealed while it is written (a file of an encrypted kernel region)?
    pub fn can_stream(&self, path: &EmbedPath) -> bool {
        self.stream_target(path).is_some()
    }

    /// The region key and kernel location of `path`, if it is in an encrypted kernel region.
    fn stream_target(&self, path: &EmbedPath) -> Option<(&crypto::RegionKey, KernelPath, u32)> {
        let region = self.region_for(path)?;
        let (Protection::Encrypted, Some(rkey)) = (region.protection, region.key.as_ref()) else {
            return None;
        };
        Some((rkey, KernelPath::of(region, path)?, region.chunk_len))
    }

    fn start_stream(&self, path: &EmbedPath, shared: bool) -> Result<Option<StreamStage>> {
        let Some((rkey, loc, chunk_len)) = self.stream_target(path) else {
            return Ok(None);
        };
        let id = FileId::random()?;
        let mut epoch = [0u8; EPOCH_LEN];
        crypto::random_bytes(&mut epoch)?;
        let key = crypto::epoch_chunk_key(rkey, &id, &epoch)?;
        let tree_key = crypto::tree_key(rkey, &id)?;
        let writer = self.writer_guard()?;
        let out = Output::shadow(&loc, &id, path)?;
        if shared {
            let made = (|| {
                let mut w = kernel_fs::create_new_at(
                    &out.dir,
                    &out.name,
                    0o600,
                    rustix::fs::OFlags::empty(),
                )?;
                w.write_all(&ct::header2(&id))?;
                let r = reopen_shadow(&out)?;
                let d = open_direct(&out);
                Ok::<_, std::io::Error>((w, r, d))
            })();
            let (w, reader, direct) = match made {
                Ok(x) => x,
                Err(e) => {
                    out.remove();
                    return Err(Error::io(&out.label, e));
                }
            };
            return Ok(Some(StreamStage {
                label: path.to_string(),
                path: path.clone(),
                id,
                chunk_len,
                epoch,
                key,
                tree_key,
                out,
                file: Some(Sink::At(w, direct)),
                reader,
                loc,
                tags: Vec::new(),
                sealed: 0,
                done: false,
                shared: true,
                writer,
            }));
        }
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
            Ok((w, reopen_shadow(&out)?))
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
            chunk_len,
            epoch,
            key,
            tree_key,
            out,
            file: Some(Sink::Direct(file)),
            reader,
            loc,
            tags: Vec::new(),
            sealed: 0,
            done: false,
            shared: false,
            writer,
        }))
    }

    /// Go on with the shared stream of `path` that another process started
    /// ([`Volume::stream_file_shared`]), from its `state` and the tags of its sealed chunks.
    /// The shadow must be there (a regular file, never through a symlink).
    pub fn resume_stream(
        &self,
        path: &EmbedPath,
        state: &StreamState,
        tags: Vec<[u8; crypto::TAG_LEN]>,
    ) -> Result<StreamStage> {
        let label = path.to_string();
        let invalid = |reason: String| Error::Invalid {
            path: label.clone(),
            reason,
        };
        let (rkey, loc, chunk_len) = self
            .stream_target(path)
            .ok_or_else(|| invalid("not in an encrypted kernel region".into()))?;
        let c = u64::from(chunk_len);
        if state.chunk_len != chunk_len
            || !state.sealed.is_multiple_of(c)
            || tags.len() as u64 != state.sealed / c
        {
            return Err(invalid(format!(
                "a stream record of {} bytes in {}-byte chunks with {} tags does not fit the region",
                state.sealed,
                state.chunk_len,
                tags.len()
            )));
        }
        let key = crypto::epoch_chunk_key(rkey, &state.id, &state.epoch)?;
        let tree_key = crypto::tree_key(rkey, &state.id)?;
        let writer = self.writer_guard()?;
        let out = Output::shadow(&loc, &state.id, path)?;
        let open = kernel_fs::open_regular_rw_at(&out.dir, &out.name)
            .map_err(kernel_fs::OpenError::into_io)
            .and_then(|w| Ok((w, reopen_shadow(&out)?)));
        let (w, reader) = open.map_err(|e| Error::io(&out.label, e))?;
        let direct = open_direct(&out);
        Ok(StreamStage {
            path: path.clone(),
            label,
            id: state.id,
            chunk_len,
            epoch: state.epoch,
            key,
            tree_key,
            out,
            file: Some(Sink::At(w, direct)),
            reader,
            loc,
            tags,
            sealed: state.sealed,
            done: false,
            shared: true,
            writer,
        })
    }
}

/// A second, read-only description of a shadow, to read it back.
fn reopen_shadow(out: &Output) -> std::io::Result<File> {
    kernel_fs::open_regular_at(&out.dir, &out.name).map_err(kernel_fs::OpenError::into_io)
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

    /// What another process needs to go on with this (shared) stream, beside its tags.
    pub fn state(&self) -> StreamState {
        StreamState {
            id: self.id,
            epoch: self.epoch,
            chunk_len: self.chunk_len,
            sealed: self.sealed,
        }
    }

    /// The tags of the sealed chunks from chunk `first` on.
    pub fn tags_from(&self, first: u64) -> &[[u8; crypto::TAG_LEN]] {
        self.tags.get(first as usize..).unwrap_or(&[])
    }

    /// Another process sealed the chunks after this one's (a shared stream): take their tags,
    /// `sealed` being the new end.
    pub fn caught_up(&mut self, sealed: u64, tags: &[[u8; crypto::TAG_LEN]]) -> Result<()> {
        let c = u64::from(self.chunk_len);
        if sealed != self.sealed + tags.len() as u64 * c {
            return Err(Error::Invalid {
                path: self.label.clone(),
                reason: format!(
                    "{} new tags do not take the stream from {} to {sealed} bytes",
                    tags.len(),
                    self.sealed
                ),
            });
        }
        self.tags.extend_from_slice(tags);
        self.sealed = sealed;
        Ok(())
    }

    /// Remove the shadow: the stream is given up (for a shared one, by every process).
    pub fn discard(&mut self) {
        self.file = None;
        if !self.done {
            self.out.remove();
        }
        self.done = true;
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
        let at = ft::chunk_offset(self.chunk_len, first).unwrap_or(u64::MAX);
        let wrote = match self.file.as_mut() {
            Some(Sink::Direct(w)) => w.write_all(data),
            Some(Sink::At(f, d)) => write_at(f, d, data, at),
            None => Ok(()),
        };
        wrote.map_err(|e| Error::io(&self.out.label, e))?;
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
        let Some(Sink::Direct(w)) = self.file.as_ref() else {
            return self.reader.read_exact_at(out, at);
        };
        let (pos, pending) = w.unwritten();
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
        let written = match self.file.take().ok_or_else(|| self.finished_already())? {
            Sink::Direct(w) => w.finish().map_err(|e| Error::io(&self.out.label, e))?,
            Sink::At(f, _) => f,
        };
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
            whole_len: None,
            unsynced: false,
            _writer: self.writer.clone(),
        })
    }
}

impl Drop for StreamStage {
    /// A stream that was not finished leaves nothing: its shadow is removed.
    fn drop(&mut self) {
        if !self.done && !self.shared {
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
        let Some(Sink::Direct(w)) = s.file.as_ref() else {
            panic!("a stream_file stream writes through a DirectWriter");
        };
        let pos = w.unwritten().0;
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

    /// A shared stream survives the drop of the process's handle: another goes on from its
    /// state and tags, a third catches up with what the second sealed, and the version made
    /// reads back as written. A stream record that does not fit is refused, and a discarded
    /// stream leaves no shadow.
    #[test]
    fn a_shared_stream_is_taken_over_from_its_state_and_tags() {
        let (d, _p, mut v) = test_volume(&[("/a", b"a")]);
        let ep = EmbedPath::parse("/s").unwrap();
        let data = pattern(500_000);
        let mut s = v.stream_file_shared(&ep).unwrap().unwrap();
        let c = s.chunk_len() as usize;
        s.push(&mut data[..20 * c].to_vec()).unwrap();
        let st = s.state();
        let tags = s.tags_from(0).to_vec();
        let shadow = s.out.label.clone();
        drop(s);
        assert!(shadow.exists(), "a shared stream's shadow stays");
        let mut bad = st;
        bad.sealed += 1;
        assert!(v.resume_stream(&ep, &bad, tags.clone()).is_err());
        let mut b = v.resume_stream(&ep, &st, tags.clone()).unwrap();
        let mut c3 = v.resume_stream(&ep, &st, tags).unwrap();
        b.push(&mut data[20 * c..50 * c].to_vec()).unwrap();
        let new_tags = b.tags_from(20).to_vec();
        assert!(c3.caught_up(b.sealed() - c as u64, &new_tags).is_err());
        c3.caught_up(b.sealed(), &new_tags).unwrap();
        drop(b);
        let mut back = vec![0u8; 3 * c];
        c3.read_at(&mut back, 19 * c as u64).unwrap();
        assert!(back == data[19 * c..22 * c]);
        let mut tail = data[50 * c..].to_vec();
        let staged = c3.finish(&v, &mut tail, 0o600).unwrap();
        let tag = v.tag();
        v.commit(vec![Change::Put(staged)], Some(tag)).unwrap();
        assert!(read_all(&v, &ep) == data);

        let mut gone = v.stream_file_shared(&ep).unwrap().unwrap();
        gone.push(&mut data[..c].to_vec()).unwrap();
        let shadow = gone.out.label.clone();
        gone.discard();
        assert!(!shadow.exists());
        drop(d);
    }
}

//! `addf`: record a source tree under an embed point, sealing files in parallel.
//!
//! Decisions (docs/FORMAT.md §addf): regular files are sealed; directories are recorded (so empty
//! ones survive and listings come from the fspf); symlinks are recorded with their target, never
//! followed; hard links are recorded as independent files; FIFOs, sockets and devices are skipped
//! and reported; names are bytes (non-UTF-8 is fine); permission bits are recorded.
use super::commit::{seal_version, shadow_name, Change, Output, StagedFile};
use super::kernel_fs::{self, KernelPath};
use super::{store, Volume};
use crate::crypto::FileId;
use crate::error::{Error, Result};
use crate::format::metadata::{FileEntry, FileKind, Protection, RegionKind};
use crate::policy::EmbedPath;
use rayon::prelude::*;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub embed_point: EmbedPath,
    pub source: PathBuf,
    pub output: Option<PathBuf>,
}

#[derive(Debug, Default, Clone)]
pub struct ImportReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Names recorded as hard links of a file recorded in the same import.
    pub links: u64,
    pub bytes: u64,
    /// Source paths not recorded, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

enum Job {
    File {
        rel: PathBuf,
        path: EmbedPath,
        size: u64,
        mode: u32,
    },
    Dir {
        rel: PathBuf,
        path: EmbedPath,
        mode: u32,
    },
    Symlink {
        rel: PathBuf,
        path: EmbedPath,
        target: Vec<u8>,
    },
    /// Another name of a file recorded by this import (a hard link in the source).
    Link { path: EmbedPath, target: EmbedPath },
}

/// Modification time of `m` in nanoseconds since the epoch.
fn mtime_ns_of(m: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    m.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.mtime_nsec())
}

/// Modification time of the source object at `p` (not following a symlink); 0 if unknown.
fn source_mtime(p: &Path) -> i64 {
    fs::symlink_metadata(p)
        .map(|m| mtime_ns_of(&m))
        .unwrap_or(0)
}

impl Volume {
    /// Plan what `addf` would record: total bytes and the number of files (for progress bars).
    pub fn import_size(source: &Path) -> (u64, u64) {
        walkdir::WalkDir::new(source)
            .into_iter()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_file())
            .fold((0, 0), |(b, n), e| {
                (b + e.metadata().map(|m| m.len()).unwrap_or(0), n + 1)
            })
    }

    /// Record every file below `opts.source` at `opts.embed_point/REL` and commit the fspf.
    pub fn import(
        &mut self,
        opts: &ImportOptions,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<ImportReport> {
        self.ensure_loaded()?;
        self.meta.check_usable()?;
        let src_meta = fs::metadata(&opts.source).map_err(|e| Error::io(&opts.source, e))?;
        if !src_meta.is_dir() {
            return Err(Error::Invalid {
                path: opts.source.display().to_string(),
                reason: "source is not a directory".into(),
            });
        }
        if let Some(out) = &opts.output {
            fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
            let (a, b) = (fs::canonicalize(&opts.source), fs::canonicalize(out));
            if let (Ok(a), Ok(b)) = (a, b) {
                if a == b {
                    return Err(Error::Invalid {
                        path: out.display().to_string(),
                        reason: "the output directory must differ from the source directory (it would overwrite the plaintext)".into(),
                    });
                }
            }
        }
        let mut report = ImportReport::default();
        let mut jobs = Vec::new();
        // The first name recorded of each source file with several (device, inode).
        let mut first_names: std::collections::HashMap<(u64, u64), EmbedPath> =
            std::collections::HashMap::new();
        for ent in walkdir::WalkDir::new(&opts.source)
            .follow_links(false)
            .sort_by_file_name()
        {
            let ent = ent.map_err(|e| Error::Other(format!("{}: {e}", opts.source.display())))?;
            let rel = ent
                .path()
                .strip_prefix(&opts.source)
                .unwrap_or(Path::new(""))
                .to_path_buf();
            let path = opts.embed_point.join(rel.as_os_str().as_encoded_bytes())?;
            let md = ent
                .metadata()
                .map_err(|e| Error::Other(format!("{}: {e}", ent.path().display())))?;
            let ft = ent.file_type();
            let mode = md.mode() & 0o7777;
            if ft.is_dir() {
                jobs.push(Job::Dir { rel, path, mode });
            } else if ft.is_file() {
                // A source hard link of a file recorded here becomes a hard link (FORMAT.md §2,
                // kind 5) when the ciphertext goes to OUTPUT_DIR (nothing is written for it
                // there), the name is free in the fspf and on disk, and both lie in one region;
                // otherwise it is recorded as a file of its own, as before.
                let key = (md.dev(), md.ino());
                let first = (md.nlink() > 1)
                    .then(|| first_names.get(&key))
                    .flatten()
                    .filter(|t| self.meta.region_index(t) == self.meta.region_index(&path))
                    .cloned();
                // Only a further name of a source file is looked up.
                let link_to = match first {
                    None => None,
                    Some(target) => match self.lookup(&path).map(|e| e.into_owned().kind) {
                        // Recorded by an earlier `addf` of the same tree: nothing changes.
                        Some(FileKind::Link(t)) if t == target => continue,
                        Some(_) => None,
                        None => opts
                            .output
                            .as_ref()
                            .is_some_and(|o| kernel_fs::stat_beneath(o, &rel).is_err())
                            .then_some(target),
                    },
                };
                match link_to {
                    Some(target) => jobs.push(Job::Link { path, target }),
                    None => {
                        if md.nlink() > 1 {
                            first_names.entry(key).or_insert_with(|| path.clone());
                        }
                        jobs.push(Job::File {
                            rel,
                            path,
                            size: md.len(),
                            mode,
                        });
                    }
                }
            } else if ft.is_symlink() {
                let t = fs::read_link(ent.path()).map_err(|e| Error::io(ent.path(), e))?;
                jobs.push(Job::Symlink {
                    rel,
                    path,
                    target: t.into_os_string().into_encoded_bytes(),
                });
            } else {
                report.skipped.push((
                    ent.path().to_path_buf(),
                    "special file (FIFO, socket or device) not recorded".into(),
                ));
            }
        }
        // Every path must land in a protected kernel region.
        let mut any_protected = false;
        for j in &jobs {
            let (Job::File { path, .. }
            | Job::Dir { path, .. }
            | Job::Symlink { path, .. }
            | Job::Link { path, .. }) = j;
            let region = self.region_for(path).ok_or_else(|| Error::NoRegion {
                path: path.to_string(),
            })?;
            if matches!(region.kind, RegionKind::Ephemeral) {
                return Err(Error::Ephemeral {
                    path: path.to_string(),
                    region: region.embed_point.to_string(),
                });
            }
            match region.protection {
                Protection::NotProtected => {}
                Protection::Encrypted if opts.output.is_none() && matches!(j, Job::File { .. }) => {
                    return Err(Error::Invalid {
                        path: path.to_string(),
                        reason: format!(
                            "region {} is encrypted: give OUTPUT_DIR for the ciphertext",
                            region.embed_point
                        ),
                    });
                }
                _ => any_protected = true,
            }
        }
        if !any_protected {
            let region = self
                .region_for(&opts.embed_point)
                .map(|r| r.embed_point.to_string())
                .unwrap_or_default();
            return Err(Error::NotProtected {
                path: opts.embed_point.to_string(),
                region,
            });
        }
        // Output directories first (sequential), then files in parallel. Nothing below the
        // output directory is reached through a symlink (kernel_fs).
        if let Some(out) = &opts.output {
            for j in &jobs {
                if let Job::Dir { rel, mode, path } = j {
                    let d = kernel_fs::create_dirs_beneath(out, rel, 0o700)
                        .map_err(|e| Error::kernel(&path.to_string(), out.join(rel), e))?;
                    let _ = kernel_fs::chmod_dir(&d, *mode | 0o700);
                }
            }
        }
        let writer = self.writer_guard()?;
        // One syncfs per file system after staging instead of one fsync per file: on ext4 each
        // fsync waits for its own journal commit (about 1 000 small files/s on this VM's disk).
        let durable = std::mem::replace(&mut self.opts.sync_each_file, false);
        let job = |j: &Job| -> Result<Option<Change>> {
            match j {
                Job::Dir { rel, path, mode } => {
                    let r = self.region_for(path).map(|r| r.protection);
                    if r == Some(Protection::NotProtected)
                        || self.meta.regions.iter().any(|r| &r.embed_point == path)
                    {
                        return Ok(None);
                    }
                    Ok(Some(Change::PutEntry(
                        path.clone(),
                        FileEntry {
                            links: Vec::new(),
                            kind: FileKind::Dir,
                            mode: *mode,
                            mtime_ns: source_mtime(&opts.source.join(rel)),
                            ctime_ns: 0,
                            owner: None,
                            ino: None,
                        },
                    )))
                }
                Job::Link { path, target } => {
                    if self.region_for(path).map(|r| r.protection) == Some(Protection::NotProtected)
                    {
                        return Ok(None);
                    }
                    Ok(Some(Change::Link {
                        link: path.clone(),
                        target: target.clone(),
                        ns: 0,
                    }))
                }
                Job::Symlink { rel, path, target } => {
                    if self.region_for(path).map(|r| r.protection) == Some(Protection::NotProtected)
                    {
                        return Ok(None);
                    }
                    if let Some(out) = &opts.output {
                        let l = KernelPath::new(out, rel);
                        let label = path.to_string();
                        let (dir, name) =
                            l.parent().map_err(|e| Error::kernel(&label, l.full(), e))?;
                        let current = rustix::fs::readlinkat(&dir, &name, Vec::new()).ok();
                        let same = current.is_some_and(|c| c.as_bytes() == &target[..]);
                        if !same {
                            // A new link under a shadow name, renamed over whatever was
                            // there (an older link, or a file): re-adding a changed link
                            // must update it.
                            let tmp = shadow_name(&name, &FileId::random()?);
                            rustix::fs::symlinkat(&target[..], &dir, &tmp)
                                .map_err(|e| Error::io(l.with_file_name(&tmp).full(), e.into()))?;
                            kernel_fs::rename_at(&dir, &tmp, &name).map_err(|e| {
                                let _ =
                                    rustix::fs::unlinkat(&dir, &tmp, rustix::fs::AtFlags::empty());
                                Error::kernel(&label, l.full(), e)
                            })?;
                        }
                    }
                    Ok(Some(Change::PutEntry(
                        path.clone(),
                        FileEntry {
                            links: Vec::new(),
                            kind: FileKind::Symlink(target.clone()),
                            mode: 0o777,
                            mtime_ns: source_mtime(&opts.source.join(rel)),
                            ctime_ns: 0,
                            owner: None,
                            ino: None,
                        },
                    )))
                }
                Job::File {
                    rel,
                    path,
                    size,
                    mode,
                } => {
                    let Some(region) = self.region_for(path) else {
                        return Ok(None);
                    };
                    if region.protection == Protection::NotProtected {
                        return Ok(None);
                    }
                    let src_path = opts.source.join(rel);
                    let mut src = File::open(&src_path).map_err(|e| Error::io(&src_path, e))?;
                    let id = FileId::random()?;
                    // The source's modification time is what programs compare (Python's
                    // .pyc check, make): `addf` records it, not the time of the import.
                    let mtime = src.metadata().map(|m| mtime_ns_of(&m)).unwrap_or(0);
                    let Some(out) = &opts.output else {
                        let (mut entry, _) = seal_version(
                            self, region, path, id, *size, *mode, &mut src, None, false,
                        )?;
                        entry.mtime_ns = mtime;
                        progress(*size);
                        return Ok(Some(Change::PutEntry(path.clone(), entry)));
                    };
                    let loc = KernelPath::new(out, rel);
                    let target = Output::shadow(&loc, &id, path)?;
                    let (mut entry, outboard) = seal_version(
                        self,
                        region,
                        path,
                        id,
                        *size,
                        *mode,
                        &mut src,
                        Some(&target),
                        false,
                    )
                    .inspect_err(|_| target.remove())?;
                    entry.mtime_ns = mtime;
                    progress(*size);
                    Ok(Some(Change::Put(StagedFile {
                        path: path.clone(),
                        entry,
                        shadow: target.label,
                        kernel: loc.full(),
                        loc,
                        outboard,
                        whole_len: None,
                        unsynced: false,
                        _writer: writer.clone(),
                    })))
                }
            }
        };
        // Without the pool (an interposed process), the jobs run on this thread.
        let results: Vec<Result<Option<Change>>> = if self.opts.threads.pool {
            jobs.par_iter().map(job).collect()
        } else {
            jobs.iter().map(job).collect()
        };
        self.opts.sync_each_file = durable;
        let mut changes = Vec::new();
        let mut first_err = None;
        for r in results {
            match r {
                Ok(Some(c)) => changes.push(c),
                Ok(None) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            for c in &changes {
                if let Change::Put(s) = c {
                    s.discard(self.path());
                }
            }
            return Err(e);
        }
        for c in &changes {
            match c {
                Change::Put(StagedFile { entry, .. }) | Change::PutEntry(_, entry) => {
                    match &entry.kind {
                        FileKind::File { size, .. } => {
                            report.files += 1;
                            report.bytes += size;
                        }
                        FileKind::Dir => report.dirs += 1,
                        FileKind::Symlink(_) => report.symlinks += 1,
                        FileKind::Special { .. } | FileKind::Link(_) => {}
                    }
                }
                Change::Link { .. } => report.links += 1,
                _ => {}
            }
        }
        if durable {
            let mut dirs: Vec<&Path> = changes
                .iter()
                .filter_map(|c| match c {
                    Change::Put(s) => s.shadow.parent(),
                    _ => None,
                })
                .collect();
            let trees = self.tree_dir();
            if trees.is_dir() {
                dirs.push(&trees);
            }
            if let Err(e) = store::sync_filesystems(dirs) {
                for c in &changes {
                    if let Change::Put(s) = c {
                        s.discard(self.path());
                    }
                }
                return Err(e);
            }
        }
        let tag = self.tag();
        self.commit(changes, Some(tag))?;
        Ok(report)
    }
}

/// Streamed import: for a frontend that reads files from a stream (an image layer's members) and
/// places the bytes on disk itself. [`Volume::seal_stream`] seals one file, [`Volume::record`]
/// commits the entries, [`Volume::check_stored`] verifies a stored copy against its entry.
impl Volume {
    /// The protected kernel region of `path`, or the error a streamed import reports for it.
    fn stream_region(&self, path: &EmbedPath) -> Result<&crate::format::metadata::Region> {
        let region = self.region_for(path).ok_or_else(|| Error::NoRegion {
            path: path.to_string(),
        })?;
        if matches!(region.kind, RegionKind::Ephemeral) {
            return Err(Error::Ephemeral {
                path: path.to_string(),
                region: region.embed_point.to_string(),
            });
        }
        if region.protection == Protection::NotProtected {
            return Err(Error::NotProtected {
                path: path.to_string(),
                region: region.embed_point.to_string(),
            });
        }
        Ok(region)
    }

    /// How many bytes a `size`-byte file at `path` occupies on disk once sealed: the ciphertext
    /// in an encrypted region, the plaintext itself in an authenticated one.
    pub fn sealed_len(&self, path: &EmbedPath, size: u64) -> Result<u64> {
        let region = self.stream_region(path)?;
        match region.protection {
            Protection::Encrypted => crate::format::layout::enc_file_len(size, region.chunk_len)
                .ok_or_else(|| Error::FileTooLarge {
                    path: path.to_string(),
                    size,
                }),
            _ => Ok(size),
        }
    }

    /// Seal exactly `size` bytes of `src` as the file at `path` and return its entry (recorded
    /// later by [`Volume::record`]). Encrypted region: the ciphertext, [`Volume::sealed_len`]
    /// bytes, goes to `ciphertext`; authenticated region: the plaintext is the file on disk, so
    /// nothing is written there, and a large file's Merkle tree goes beside the fspf.
    pub fn seal_stream(
        &self,
        path: &EmbedPath,
        size: u64,
        mode: u32,
        src: &mut dyn Read,
        ciphertext: &mut (dyn Write + Send),
    ) -> Result<FileEntry> {
        let region = self.stream_region(path)?;
        let id = FileId::random()?;
        let mut src = src;
        if region.protection == Protection::Encrypted {
            let key = region.key.as_ref().ok_or_else(|| Error::NotProtected {
                path: path.to_string(),
                region: region.embed_point.to_string(),
            })?;
            let k = crate::crypto::file_chunk_key(key, &id)?;
            let mut w = ciphertext;
            crate::codec::seal_encrypted_with(
                self.opts.threads,
                &k,
                &id,
                region.chunk_len,
                size,
                &mut src,
                &mut w,
                &path.to_string(),
            )?;
            return Ok(FileEntry::new_file(id, size, None, mode));
        }
        let (entry, _tree) =
            seal_version(self, region, path, id, size, mode, &mut src, None, false)?;
        Ok(entry)
    }

    /// Record `entries` (from [`Volume::seal_stream`], and directories, symlinks and special
    /// files) in one commit, replacing whatever was at their paths. Returns the new tag.
    ///
    /// A hard link is given as its entry (`FileKind::Link(target)`, the target among `entries`
    /// or listed already): it is recorded after every other entry, and its target lists it
    /// (FORMAT.md §2); a target's own `links` are ignored.
    pub fn record(&mut self, entries: Vec<(EmbedPath, FileEntry)>) -> Result<crate::Tag> {
        self.ensure_loaded()?;
        self.meta.check_usable()?;
        let tag = self.tag();
        let mut links = Vec::new();
        let mut changes: Vec<Change> = Vec::with_capacity(entries.len());
        for (p, mut e) in entries {
            match e.kind {
                FileKind::Link(target) => links.push(Change::Link {
                    link: p,
                    target,
                    ns: 0,
                }),
                _ => {
                    e.links.clear();
                    changes.push(Change::PutEntry(p, e));
                }
            }
        }
        changes.extend(links);
        // A checkpoint: an image carries the fspf file alone.
        let log = std::mem::replace(&mut self.opts.log, false);
        let t = self.commit(changes, Some(tag));
        self.opts.log = log;
        t
    }

    /// Verify `data`, the bytes stored for the listed regular file `path` (e.g. an image layer's
    /// member), against its entry: every chunk, and for authenticated files the Merkle tree.
    pub fn check_stored<R: crate::codec::ReadAt>(&self, path: &EmbedPath, data: R) -> Result<()> {
        let region = self.stream_region(path)?;
        let (id, size, root) = self.listed_file(path)?;
        let label = path.to_string();
        let codec = super::codec_for(region, path, &id, root.as_ref(), size, data, || {
            store::open_tree(&self.path, &id, &label)
        })?;
        crate::codec::ProtectedReader::new(codec, size, region.chunk_len, label.clone())?
            .with_threads(self.opts.threads)
            .verify_all()
    }
}

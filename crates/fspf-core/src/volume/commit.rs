//! Staging new file versions and committing them with the fspf (P8, P9).
//!
//! A new version is written to a *shadow* beside its kernel path (`.NAME.fspf-<file id>`), fsync'd,
//! then the fspf is replaced atomically (the commit point), then the shadow is renamed over the
//! kernel path. A crash before the commit leaves the old fspf and an ignored shadow; a crash after
//! it leaves a shadow whose name is the committed file id, which `roll_forward` renames into place
//! on the next open. Every version has a fresh file id, hence a fresh key: no nonce is ever reused.
use super::direct::DirectWriter;
use super::{store, Volume};
use crate::codec;
use crate::crypto::{self, FileId, Tag};
use crate::error::{Error, Result};
use crate::format::metadata::{FileEntry, FileKind, Protection, Region};
use crate::policy::EmbedPath;
use rayon::prelude::*;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Encrypted versions of at least this size are written with direct I/O ([`DirectWriter`]).
pub const DIRECT_MIN: u64 = 8 << 20;

/// A file version written to disk but not yet committed.
#[derive(Debug, Clone)]
pub struct StagedFile {
    pub path: EmbedPath,
    pub entry: FileEntry,
    /// Shadow to rename onto `kernel` after the commit.
    pub shadow: PathBuf,
    pub kernel: PathBuf,
    /// Outboard written for this version (removed again if the commit fails).
    pub outboard: Option<PathBuf>,
}

/// One change to the fspf.
#[derive(Debug, Clone)]
pub enum Change {
    /// A staged regular file replaces whatever was at its path.
    Put(StagedFile),
    /// A directory or symlink entry (the caller made the kernel-side object).
    PutEntry(EmbedPath, FileEntry),
    /// Remove the entry at a path (and everything below it). The caller removes the kernel file
    /// after the commit: until then the old state must stay readable (P9).
    Remove(EmbedPath),
    /// Move an entry (and, for a directory, everything below it). The file id, hence the key,
    /// is kept: a rename re-encrypts nothing. The caller renames the kernel object after the commit.
    Rename { from: EmbedPath, to: EmbedPath },
}

/// Shadow path of file version `id` for kernel path `kernel`.
pub fn shadow_path(kernel: &Path, id: &FileId) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(kernel.file_name().unwrap_or_default());
    name.push(format!(".fspf-{}", id.to_hex()));
    kernel.with_file_name(name)
}

/// If a committed shadow for `id` is still beside `kernel`, rename it into place (crash recovery).
pub fn roll_forward(kernel: &Path, id: &FileId) {
    let sh = shadow_path(kernel, id);
    if sh.exists() && fs::rename(&sh, kernel).is_ok() {
        let _ = store::sync_dir(kernel);
    }
}

fn create_file(p: &Path, mode: u32) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(p)
        .map_err(|e| Error::io(p, e))
}

/// Seal `size` bytes of `src` as a new version of `path` in `region`, writing the on-disk form to
/// `out` (ciphertext for encrypted regions; a plaintext copy for authenticated ones when given).
#[allow(clippy::too_many_arguments)]
pub(crate) fn seal_version(
    vol: &Volume,
    region: &Region,
    path: &EmbedPath,
    id: FileId,
    size: u64,
    mode: u32,
    src: &mut impl Read,
    out: Option<&Path>,
) -> Result<(FileEntry, Option<PathBuf>)> {
    let label = path.to_string();
    let key = region.key.as_ref().ok_or_else(|| Error::NotProtected {
        path: label.clone(),
        region: region.embed_point.to_string(),
    })?;
    let file_mode = if mode & 0o777 == 0 {
        0o600
    } else {
        mode & 0o777
    };
    match region.protection {
        Protection::Encrypted => {
            let out = out.ok_or_else(|| Error::Invalid {
                path: label.clone(),
                reason: "encrypted files need an output directory for the ciphertext".into(),
            })?;
            let k = crypto::file_chunk_key(key, &id)?;
            let f = if size >= DIRECT_MIN && super::direct::worthwhile(out) {
                let mut w = DirectWriter::create(out, file_mode).map_err(|e| Error::io(out, e))?;
                codec::seal_encrypted(&k, &id, region.chunk_len, size, src, &mut w, &label)?;
                w.finish().map_err(|e| Error::io(out, e))?
            } else {
                let f = create_file(out, file_mode)?;
                let mut w = BufWriter::with_capacity(1 << 20, f);
                codec::seal_encrypted(&k, &id, region.chunk_len, size, src, &mut w, &label)?;
                w.into_inner().map_err(|e| Error::io(out, e.into_error()))?
            };
            if vol.sync_each_file {
                f.sync_all().map_err(|e| Error::io(out, e))?;
            }
            Ok((
                FileEntry {
                    kind: FileKind::File {
                        id,
                        size,
                        root: None,
                    },
                    mode: mode & 0o7777,
                },
                None,
            ))
        }
        Protection::Authenticated => {
            let k = crypto::file_mac_key(key, &id)?;
            let (root, outboard) = match out {
                Some(o) => {
                    let f = create_file(o, file_mode)?;
                    let mut w = BufWriter::with_capacity(1 << 20, f);
                    let r = codec::seal_authenticated(
                        &k,
                        region.chunk_len,
                        size,
                        src,
                        Some(&mut w),
                        &label,
                    )?;
                    let f = w.into_inner().map_err(|e| Error::io(o, e.into_error()))?;
                    if vol.sync_each_file {
                        f.sync_all().map_err(|e| Error::io(o, e))?;
                    }
                    r
                }
                None => codec::seal_authenticated(&k, region.chunk_len, size, src, None, &label)?,
            };
            let tree = if outboard.is_empty() {
                None
            } else {
                let dir = vol.tree_dir();
                fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                let p = dir.join(id.to_hex());
                let mut f = create_file(&p, 0o600)?;
                f.write_all(&outboard)
                    .and_then(|_| {
                        if vol.sync_each_file {
                            f.sync_all()
                        } else {
                            Ok(())
                        }
                    })
                    .map_err(|e| Error::io(&p, e))?;
                Some(p)
            };
            Ok((
                FileEntry {
                    kind: FileKind::File {
                        id,
                        size,
                        root: Some(root),
                    },
                    mode: mode & 0o7777,
                },
                tree,
            ))
        }
        Protection::NotProtected => Err(Error::NotProtected {
            path: label,
            region: region.embed_point.to_string(),
        }),
    }
}

impl Volume {
    /// Write a new version of the kernel-region file `path` (contents: `size` bytes of `src`) to
    /// its shadow. Nothing is visible until [`Volume::commit`].
    pub fn stage_file(
        &self,
        path: &EmbedPath,
        size: u64,
        mode: u32,
        src: &mut impl Read,
    ) -> Result<StagedFile> {
        let region = self.region_for(path).ok_or_else(|| Error::NoRegion {
            path: path.to_string(),
        })?;
        let kernel = path.kernel_path(region).ok_or_else(|| Error::Ephemeral {
            path: path.to_string(),
            region: region.embed_point.to_string(),
        })?;
        let id = FileId::random()?;
        let shadow = shadow_path(&kernel, &id);
        let (entry, outboard) =
            seal_version(self, region, path, id, size, mode, src, Some(&shadow)).inspect_err(
                |_| {
                    let _ = fs::remove_file(&shadow);
                },
            )?;
        Ok(StagedFile {
            path: path.clone(),
            entry,
            shadow,
            kernel,
            outboard,
        })
    }

    /// Apply `changes` to the fspf and commit it (caller holds [`Volume::lock`]).
    ///
    /// If another process committed since this volume was opened, the on-disk fspf is accepted only
    /// when its tag equals `trusted_tag` (the run's trust anchor); changes are merged onto it.
    pub fn commit(&mut self, changes: Vec<Change>, trusted_tag: Option<Tag>) -> Result<Tag> {
        let cleanup = |changes: &[Change]| {
            for c in changes {
                if let Change::Put(s) = c {
                    let _ = fs::remove_file(&s.shadow);
                    if let Some(o) = &s.outboard {
                        let _ = fs::remove_file(o);
                    }
                }
            }
        };
        let disk = match store::read_tag(&self.path) {
            Ok(t) => t,
            Err(e) => {
                cleanup(&changes);
                return Err(e);
            }
        };
        if disk != self.tag {
            let Some(trusted) = trusted_tag.filter(|t| *t == disk) else {
                cleanup(&changes);
                return Err(Error::TagMismatch {
                    path: self.path.clone(),
                    expected: self.tag.to_hex(),
                    actual: disk.to_hex(),
                });
            };
            match store::open(&self.path, self.key.clone(), Some(trusted)) {
                Ok(v) => {
                    let sync = self.sync_each_file;
                    *self = v;
                    self.sync_each_file = sync;
                }
                Err(e) => {
                    cleanup(&changes);
                    return Err(e);
                }
            }
        }
        let before = self.meta.clone();
        let mut garbage: Vec<FileId> = Vec::new();
        // Shadows to move into place once the commit is durable: (shadow, kernel path).
        let mut post: Vec<(&Path, &Path)> = Vec::new();
        // Index into `post` by kernel path, and the shadows of versions that a later version of
        // the same path in this batch superseded: the renames below run in parallel, in no
        // order, so only the last version of a path may be among them.
        let mut post_index: std::collections::HashMap<&Path, usize> =
            std::collections::HashMap::new();
        let mut superseded: Vec<&Path> = Vec::new();
        for c in &changes {
            match c {
                Change::Put(s) => {
                    if let Some(FileEntry {
                        kind: FileKind::File { id, .. },
                        ..
                    }) = self.meta.files.insert(s.path.clone(), s.entry.clone())
                    {
                        garbage.push(id);
                    }
                    match post_index.entry(&s.kernel) {
                        std::collections::hash_map::Entry::Occupied(o) => {
                            let slot = &mut post[*o.get()];
                            superseded.push(slot.0);
                            slot.0 = &s.shadow;
                        }
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(post.len());
                            post.push((&s.shadow, &s.kernel));
                        }
                    }
                }
                Change::PutEntry(p, e) => {
                    if let Some(FileEntry {
                        kind: FileKind::File { id, .. },
                        ..
                    }) = self.meta.files.insert(p.clone(), e.clone())
                    {
                        garbage.push(id);
                    }
                }
                Change::Remove(p) => {
                    for k in self.meta.paths_below(p) {
                        if let Some(FileEntry {
                            kind: FileKind::File { id, .. },
                            ..
                        }) = self.meta.files.remove(&k)
                        {
                            garbage.push(id);
                        }
                    }
                }
                Change::Rename { from, to } => {
                    for k in self.meta.paths_below(from) {
                        let rest = k.strip_prefix(from).unwrap_or_default().to_vec();
                        let dest = if rest.is_empty() {
                            to.clone()
                        } else {
                            to.join(&rest)?
                        };
                        if let Some(e) = self.meta.files.remove(&k) {
                            if let Some(FileEntry {
                                kind: FileKind::File { id, .. },
                                ..
                            }) = self.meta.files.insert(dest, e)
                            {
                                garbage.push(id);
                            }
                        }
                    }
                }
            }
        }
        if let Err(e) = self.save() {
            self.meta = before;
            cleanup(&changes);
            return Err(e);
        }
        // Independent renames; in parallel because a large `addf` moves tens of thousands of
        // shadows and this is otherwise its longest serial step. A failed rename is harmless:
        // the committed shadow stays and `roll_forward` moves it on the next open.
        // Not in the preload shield: its processes fork, and a rayon pool does not survive fork.
        let rename = |(sh, k): &(&Path, &Path)| {
            let _ = fs::rename(sh, k);
        };
        if crate::codec::sequential() {
            post.iter().for_each(rename);
        } else {
            post.par_iter().for_each(rename);
        }
        for sh in superseded {
            let _ = fs::remove_file(sh);
        }
        // Outboards of versions no longer referenced are garbage now that the commit is durable.
        let live: std::collections::HashSet<FileId> = self
            .meta
            .files
            .values()
            .filter_map(|e| {
                if let FileKind::File { id, .. } = &e.kind {
                    Some(*id)
                } else {
                    None
                }
            })
            .collect();
        for id in garbage.into_iter().filter(|i| !live.contains(i)) {
            let _ = fs::remove_file(self.tree_dir().join(id.to_hex()));
        }
        Ok(self.tag)
    }
}

//! Orphans of interrupted writers (FORMAT.md §5): shadows `.NAME.fspf-<id>` beside the files of
//! protected kernel regions, commit temporaries `FSPF.tmp-<12 hex>` beside the fspf, and outboards
//! `FSPF.trees/<id>` that no committed entry names. Readers ignore them; they only take space.
//!
//! Rule (also in FORMAT.md §5), applied under the update lock `FSPF.lock`:
//! * a shadow whose id is the committed id of its file is the committed version not yet renamed
//!   into place: it is rolled forward, never removed;
//! * temporaries are removed (they exist only while a committer holds `FSPF.lock`);
//! * other shadows and unreferenced outboards are removed only when `FSPF.writers.lock` can be
//!   taken exclusively: every process holds it shared from before it writes a shadow or outboard
//!   until that version is committed or discarded, so no live writer has one. Otherwise they are
//!   kept and reported.
use super::kernel_fs::{self, KernelPath};
use super::store::{self, FspfLock};
use super::verify::parse_shadow;
use super::Volume;
use crate::crypto::FileId;
use crate::error::{Error, Result};
use crate::format::metadata::{FileEntry, FileKind};
use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrphanKind {
    /// A shadow of a version that was never committed.
    Shadow,
    /// A shadow of the committed version, not yet renamed into place (rolled forward).
    Committed,
    /// An fspf commit temporary.
    Temp,
    /// An outboard that no committed entry references.
    Tree,
    /// An update journal whose (file id, root) no committed entry has (FORMAT.md §5b).
    Journal,
}

impl OrphanKind {
    pub fn name(self) -> &'static str {
        match self {
            OrphanKind::Shadow => "uncommitted shadow",
            OrphanKind::Committed => "committed shadow not yet in place",
            OrphanKind::Temp => "fspf temporary",
            OrphanKind::Tree => "unreferenced integrity tree",
            OrphanKind::Journal => "uncommitted update journal",
        }
    }
}

/// One leftover on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub kind: OrphanKind,
    pub disk: KernelPath,
}

/// What [`Volume::clean_orphans`] did.
#[derive(Debug, Default)]
pub struct CleanReport {
    pub removed: Vec<PathBuf>,
    pub rolled_forward: Vec<PathBuf>,
    /// Uncommitted shadows and outboards kept because a writer of this fspf is active.
    pub kept: Vec<PathBuf>,
    pub failed: Vec<(PathBuf, String)>,
}

/// `<id hex>.<root hex>.journal`: the file id and root a journal is for.
fn journal_name(name: &[u8]) -> Option<(FileId, [u8; 32])> {
    let rest = name.strip_suffix(b".journal")?;
    let (id, root) = (rest.get(..32)?, rest.get(32..)?);
    let root = root.strip_prefix(b".")?;
    if root.len() != 64 || !root.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut r = [0u8; 32];
    hex::decode_to_slice(root, &mut r).ok()?;
    Some((is_id_hex(id)?, r))
}

fn is_id_hex(name: &[u8]) -> Option<FileId> {
    if name.len() != crate::crypto::FILE_ID_LEN * 2
        || !name.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    let mut id = [0u8; crate::crypto::FILE_ID_LEN];
    hex::decode_to_slice(name, &mut id).ok()?;
    Some(FileId(id))
}

impl Volume {
    /// Leftovers of interrupted writers (see the module documentation). Read-only.
    pub fn orphans(&self) -> Vec<Orphan> {
        if let Ok(Some(v)) = self.parsed_copy() {
            return v.orphans();
        }
        let mut out = Vec::new();
        for e in self.region_entries() {
            if e.is_dir {
                continue;
            }
            let Some((target, id)) = parse_shadow(e.name()) else {
                continue;
            };
            let file = match (e.path.parent(), target) {
                (_, b"" | b"." | b"..") | (None, _) => None,
                (Some(dir), t) => dir.join(t).ok(),
            };
            let is_id = |f: &FileEntry| matches!(f, FileEntry { kind: FileKind::File { id: c, .. }, .. } if *c == id);
            let mut committed = file
                .as_ref()
                .and_then(|f| self.meta.files.get(f))
                .is_some_and(is_id);
            if !committed && target.len() == super::commit::SHADOW_NAME_KEEP {
                // A long name, cut in the shadow name: any listed file of this directory whose
                // name starts with it and whose version is `id`.
                if let Some(f) = &file {
                    committed = self
                        .meta
                        .files
                        .range(f.clone()..)
                        .take_while(|(k, _)| k.as_bytes().starts_with(f.as_bytes()))
                        .any(|(k, e)| k.parent() == f.parent() && is_id(e));
                }
            }
            out.push(Orphan {
                kind: if committed {
                    OrphanKind::Committed
                } else {
                    OrphanKind::Shadow
                },
                disk: e.disk,
            });
        }
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let name = e.file_name();
                if store::is_temp_name(&self.path, name.as_encoded_bytes()) {
                    out.push(Orphan {
                        kind: OrphanKind::Temp,
                        disk: KernelPath::new(dir, name),
                    });
                }
            }
        }
        let live: HashSet<FileId> = self
            .meta
            .files
            .values()
            .filter_map(|e| match &e.kind {
                FileKind::File { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        // A committed entry's journal, and the applied ones its chain continues, are kept
        // (FORMAT.md §5b).
        let journals: HashSet<(FileId, [u8; 32])> = self
            .meta
            .files
            .values()
            .filter_map(|e| match &e.kind {
                FileKind::File {
                    id, root: Some(r), ..
                } => Some((*id, *r)),
                _ => None,
            })
            .flat_map(|(id, r)| {
                let mut roots = super::update::chain_roots(&self.path, &self.logj, &id, &r);
                roots.push(r);
                roots.into_iter().map(move |x| (id, x))
            })
            .collect();
        let trees = self.tree_dir();
        if let (Ok(rd), Some(tname)) = (std::fs::read_dir(&trees), trees.file_name()) {
            for e in rd.flatten() {
                let name = e.file_name();
                if let Some(j) = journal_name(name.as_encoded_bytes()) {
                    if !journals.contains(&j) {
                        out.push(Orphan {
                            kind: OrphanKind::Journal,
                            disk: KernelPath::new(dir, Path::new(tname).join(name)),
                        });
                    }
                    continue;
                }
                if is_id_hex(name.as_encoded_bytes()).is_some_and(|id| !live.contains(&id)) {
                    out.push(Orphan {
                        kind: OrphanKind::Tree,
                        disk: KernelPath::new(dir, Path::new(tname).join(name)),
                    });
                }
            }
        }
        out.sort_by_key(|o| o.disk.full());
        out
    }

    /// Remove the leftovers of interrupted writers and roll committed shadows forward, by the
    /// rule in the module documentation. The caller holds the update lock (`lock`), and this
    /// volume must be the fspf on disk (else [`Error::TagMismatch`]: open it again).
    pub fn clean_orphans(&self, _lock: &FspfLock) -> Result<CleanReport> {
        let disk = store::read_tag(&self.path)?;
        if disk != self.tag {
            return Err(Error::TagMismatch {
                path: self.path.clone(),
                expected: self.tag.to_hex(),
                actual: disk.to_hex(),
            });
        }
        // Held until the end: no writer can stage a new version while shadows are removed.
        let no_writers = store::no_writers(&self.path)?;
        let mut report = CleanReport::default();
        for o in self.orphans() {
            let full = o.disk.full();
            let res = match o.kind {
                OrphanKind::Committed => o.disk.parent().and_then(|(dir, sh)| {
                    let (target, _) = parse_shadow(sh.as_encoded_bytes()).unwrap_or_default();
                    kernel_fs::rename_at(&dir, &sh, std::ffi::OsStr::from_bytes(target))
                        .and_then(|()| kernel_fs::sync_dir_fd(&dir))
                }),
                OrphanKind::Shadow | OrphanKind::Tree | OrphanKind::Journal
                    if no_writers.is_none() =>
                {
                    report.kept.push(full);
                    continue;
                }
                _ => kernel_fs::remove_beneath(o.disk.base(), o.disk.rel(), false),
            };
            match res {
                Ok(()) if o.kind == OrphanKind::Committed => report.rolled_forward.push(full),
                Ok(()) => report.removed.push(full),
                Err(e) => report.failed.push((full, e.to_string())),
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::metadata::{Protection, RegionKind};
    use crate::policy::EmbedPath;
    use crate::volume::{Change, RegionSpec};

    /// A staged, uncommitted version of a live writer is never taken for an orphan; once the
    /// writer is gone it is.
    #[test]
    fn shadows_of_a_live_writer_are_kept_and_orphans_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fspf.pb");
        let vol = d.path().join("vol");
        std::fs::create_dir_all(&vol).unwrap();
        Volume::create(&p, false).unwrap();
        let lock = Volume::lock(&p).unwrap();
        let mut v = Volume::open(&p, None, None).unwrap();
        v.add_region(RegionSpec {
            embed_point: EmbedPath::root(),
            kind: RegionKind::Kernel(vol.clone()),
            protection: Protection::Authenticated,
            key_len: None,
            chunk_len: Some(512),
        })
        .unwrap();
        v.save().unwrap();
        let a = EmbedPath::parse("/a").unwrap();
        let data = vec![7u8; 2000];
        let s = v.stage_file(&a, 2000, 0o644, &mut &data[..]).unwrap();
        let tag = v.tag();
        v.commit(vec![Change::Put(s)], Some(tag)).unwrap();
        // A crashed commit: its temporary; a crashed writer: a shadow and an outboard.
        std::fs::write(d.path().join("fspf.pb.tmp-0123456789ab"), "t").unwrap();
        let staged = v.stage_file(&a, 2000, 0o644, &mut &data[..]).unwrap();
        let shadow = staged.shadow.clone();
        let tree = staged.outboard.clone().unwrap();
        let kinds = |v: &Volume| v.orphans().iter().map(|o| o.kind).collect::<Vec<_>>();
        assert_eq!(
            kinds(&v),
            [OrphanKind::Temp, OrphanKind::Tree, OrphanKind::Shadow]
        );
        // The writer is alive: only the temporary goes.
        let r = v.clean_orphans(&lock).unwrap();
        assert_eq!(r.removed.len(), 1, "{r:?}");
        assert_eq!(r.kept.len(), 2, "{r:?}");
        assert!(shadow.exists() && tree.exists());
        // The writer is gone (crashed: its lock went with it).
        drop(staged);
        let r = v.clean_orphans(&lock).unwrap();
        assert_eq!(r.removed.len(), 2, "{r:?}");
        assert!(!shadow.exists() && !tree.exists());
        assert!(v.orphans().is_empty());
        assert!(v.open_file(&a).is_ok());
    }
}

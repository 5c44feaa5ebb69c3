//! The kernel side of removing or renaming a listed file, done in two steps around the commit
//! that records it, so that a crash at any point leaves the old or the new state readable (P9).
//!
//! Before the commit, [`Volume::prepare_remove`] renames the kernel file `a` (version `X`) to
//! its shadow name `.a.fspf-X`: if the commit never happens, the fspf still lists `a` as `X` and
//! opening it rolls the shadow forward (the same recovery as for new versions); if it happens,
//! no stray `a` is left that `fspf verify` would report as unlisted. [`Volume::prepare_rename`]
//! also hard-links the file as `.b.fspf-X` beside its new name `b`, which the commit then names
//! and roll-forward moves into place. After the commit, [`PreparedMove::finish`] completes the
//! move (publish `.b.fspf-X` as `b`, delete `.a.fspf-X`); if the commit failed,
//! [`PreparedMove::abort`] puts `a` back. What a crash leaves behind has a shadow name that no
//! committed entry claims, which the orphan cleanup removes. Directories are moved after the
//! commit in one `rename` (no links for directories); see docs/FORMAT.md §5.
use super::commit::shadow_name;
use super::kernel_fs::{self, KernelPath};
use super::store::WriterGuard;
use super::Volume;
use crate::error::{Error, Result};
use crate::format::metadata::FileKind;
use crate::policy::EmbedPath;
use rustix::fs::AtFlags;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// A kernel file moved aside for a removal or rename that is about to be committed.
#[must_use = "finish() after the commit, abort() if it failed"]
#[derive(Debug)]
pub struct PreparedMove {
    /// Directory, name and shadow name of the source (`a` now lives at `.a.fspf-X`).
    from: (OwnedFd, OsString, OsString),
    /// Directory, name and shadow name of the destination of a rename (`.b.fspf-X` links `a`).
    to: Option<(OwnedFd, OsString, OsString)>,
    _writer: Arc<WriterGuard>,
}

impl PreparedMove {
    /// After the commit: the destination takes its name, the source's shadow is deleted.
    pub fn finish(self) {
        if let Some((dir, name, shadow)) = &self.to {
            if kernel_fs::rename_at(dir, shadow, name).is_err() {
                let _ = rustix::fs::unlinkat(dir, shadow, AtFlags::empty());
            }
        }
        let (dir, _, shadow) = &self.from;
        let _ = rustix::fs::unlinkat(dir, shadow, AtFlags::empty());
    }

    /// Make the move durable before the commit point: `fsync` of the directories it changed
    /// (cheaper than a `syncfs`, which also writes back whatever else is dirty on the file
    /// system).
    pub fn sync(&self) -> std::io::Result<()> {
        if let Some((dir, ..)) = &self.to {
            kernel_fs::sync_dir_fd(dir)?;
        }
        kernel_fs::sync_dir_fd(&self.from.0)
    }

    /// The commit failed: put the source back under its name, drop the destination's link.
    pub fn abort(self) {
        if let Some((dir, _, shadow)) = &self.to {
            let _ = rustix::fs::unlinkat(dir, shadow, AtFlags::empty());
        }
        let (dir, name, shadow) = &self.from;
        let _ = kernel_fs::rename_at(dir, shadow, name);
    }
}

impl Volume {
    /// The listed regular file at `path`: its kernel location (directory and name) and version.
    fn kernel_file(&self, path: &EmbedPath) -> Option<(KernelPath, crate::crypto::FileId)> {
        let region = self.region_for(path)?;
        let FileKind::File { id, .. } = &self.lookup(path)?.kind else {
            return None;
        };
        Some((KernelPath::of(region, path)?, *id))
    }

    /// Move the kernel file of `path` to its shadow name before a commit that removes `path`.
    /// `Ok(None)`: nothing to move (not a listed file of a kernel region, or already gone).
    pub fn prepare_remove(&self, path: &EmbedPath) -> Result<Option<PreparedMove>> {
        let Some((loc, id)) = self.kernel_file(path) else {
            return Ok(None);
        };
        let writer = self.writer_guard()?;
        let Ok((dir, name)) = loc.parent() else {
            return Ok(None);
        };
        let shadow = shadow_name(&name, &id);
        match kernel_fs::rename_at(&dir, &name, &shadow) {
            Ok(()) => Ok(Some(PreparedMove {
                from: (dir, name, shadow),
                to: None,
                _writer: writer,
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::kernel(&path.to_string(), loc.full(), e)),
        }
    }

    /// Link the kernel file of `from` as the shadow of `to` and move it to its own shadow name,
    /// before a commit that renames `from` to `to` (same region). `Ok(None)`: not a listed file
    /// of a kernel region, or the file system has no hard links; the caller then renames the
    /// kernel file after the commit.
    pub fn prepare_rename(&self, from: &EmbedPath, to: &EmbedPath) -> Result<Option<PreparedMove>> {
        let Some((floc, id)) = self.kernel_file(from) else {
            return Ok(None);
        };
        let Some(tloc) = self.kernel_path(to).filter(|t| t.base() == floc.base()) else {
            return Ok(None);
        };
        let writer = self.writer_guard()?;
        let label = from.to_string();
        let (fdir, fname) = match floc.parent() {
            Ok(p) => p,
            Err(_) => return Ok(None),
        };
        if let Some(p) = tloc.rel().parent() {
            kernel_fs::create_dirs_like_base(tloc.base(), p)
                .map_err(|e| Error::kernel(&to.to_string(), tloc.full(), e))?;
        }
        let (tdir, tname) = tloc
            .parent()
            .map_err(|e| Error::kernel(&to.to_string(), tloc.full(), e))?;
        let tshadow = shadow_name(&tname, &id);
        let _ = rustix::fs::unlinkat(&tdir, &tshadow, AtFlags::empty());
        if rustix::fs::linkat(&fdir, &fname, &tdir, &tshadow, AtFlags::empty()).is_err() {
            return Ok(None);
        }
        let fshadow = shadow_name(&fname, &id);
        if let Err(e) = kernel_fs::rename_at(&fdir, &fname, &fshadow) {
            let _ = rustix::fs::unlinkat(&tdir, &tshadow, AtFlags::empty());
            return Err(Error::kernel(&label, floc.full(), e));
        }
        Ok(Some(PreparedMove {
            from: (fdir, fname, fshadow),
            to: Some((tdir, tname, tshadow)),
            _writer: writer,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Change;

    fn world() -> (tempfile::TempDir, std::path::PathBuf, Volume) {
        crate::volume::test_volume(&[("/a", b"abc")])
    }

    fn read(v: &Volume, p: &str) -> Result<Vec<u8>> {
        let mut r = v.open_file(&EmbedPath::parse(p).unwrap())?;
        let mut out = vec![0u8; 64];
        let n = r.read_at(&mut out, 0)?;
        out.truncate(n);
        Ok(out)
    }

    #[test]
    fn a_crash_between_the_kernel_move_and_the_commit_keeps_the_old_state_readable() {
        let (_d, p, v) = world();
        let a = EmbedPath::parse("/a").unwrap();
        // Killed right after the prepare: neither finish nor abort ran, the commit never came.
        std::mem::forget(v.prepare_remove(&a).unwrap().expect("moved"));
        let v2 = Volume::open(&p, None, Some(v.tag())).unwrap();
        assert_eq!(
            read(&v2, "/a").unwrap(),
            b"abc",
            "rolled forward from its shadow"
        );
        let b = EmbedPath::parse("/dir/b").unwrap();
        std::mem::forget(v2.prepare_rename(&a, &b).unwrap().expect("moved"));
        let v3 = Volume::open(&p, None, Some(v2.tag())).unwrap();
        assert_eq!(read(&v3, "/a").unwrap(), b"abc");
    }

    #[test]
    fn a_crash_between_the_commit_and_finish_leaves_the_new_state_readable_and_no_stray_file() {
        let (d, p, mut v) = world();
        let a = EmbedPath::parse("/a").unwrap();
        let b = EmbedPath::parse("/dir/b").unwrap();
        let prep = v.prepare_rename(&a, &b).unwrap().expect("moved");
        let tag = v.tag();
        v.commit(
            vec![Change::Rename {
                from: a.clone(),
                to: b.clone(),
            }],
            Some(tag),
        )
        .unwrap();
        std::mem::forget(prep);
        let v2 = Volume::open(&p, None, Some(v.tag())).unwrap();
        assert_eq!(
            read(&v2, "/dir/b").unwrap(),
            b"abc",
            "rolled forward to its new name"
        );
        assert!(
            !d.path().join("vol/a").exists(),
            "no stray file at the old name"
        );
        assert!(v2.verify().is_empty(), "{:?}", v2.verify());
        // Removal: committed, then killed before finish.
        let prep = v2.prepare_remove(&b).unwrap().expect("moved");
        let mut v2 = v2;
        let tag = v2.tag();
        v2.commit(vec![Change::Remove(b.clone())], Some(tag))
            .unwrap();
        std::mem::forget(prep);
        let v3 = Volume::open(&p, None, Some(v2.tag())).unwrap();
        assert!(!d.path().join("vol/dir/b").exists());
        assert!(v3.verify().is_empty(), "{:?}", v3.verify());
    }

    #[test]
    fn a_failed_commit_is_undone_by_abort() {
        let (d, _p, v) = world();
        let a = EmbedPath::parse("/a").unwrap();
        let b = EmbedPath::parse("/b").unwrap();
        v.prepare_rename(&a, &b).unwrap().expect("moved").abort();
        assert!(d.path().join("vol/a").exists());
        assert!(!d.path().join("vol/b").exists());
        assert_eq!(read(&v, "/a").unwrap(), b"abc");
        let names: Vec<_> = std::fs::read_dir(d.path().join("vol")).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}

//! `verify`: check every listed file against the fspf and find unlisted files on disk.
use super::kernel_fs::{self, KernelPath};
use super::{store, Volume};
use crate::crypto::FileId;
use crate::error::{Error, Result};
use crate::format::metadata::{FileEntry, FileKind, Protection, RegionKind};
use crate::policy::EmbedPath;
use rayon::prelude::*;
use rustix::fs::FileType;

/// One problem found by [`Volume::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub path: String,
    pub problem: String,
}

/// Exactly the names `commit::shadow_name` writes, `.NAME.fspf-<32 lowercase hex>`: leftovers of
/// an interrupted commit are not findings (`fspf verify` warns about them separately). Any other
/// name is reported (it could hide a planted file).
pub(crate) fn is_shadow(name: &[u8]) -> bool {
    parse_shadow(name).is_some()
}

/// `NAME` and the file id of the shadow name `.NAME.fspf-<32 lowercase hex>`.
pub(crate) fn parse_shadow(name: &[u8]) -> Option<(&[u8], FileId)> {
    let rest = name.strip_prefix(b".")?;
    let id_hex = crate::crypto::FILE_ID_LEN * 2;
    if rest.len() <= b".fspf-".len() + id_hex {
        return None;
    }
    let (head, id) = rest.split_at(rest.len() - id_hex);
    let target = head.strip_suffix(b".fspf-")?;
    if !id.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut bytes = [0u8; crate::crypto::FILE_ID_LEN];
    hex::decode_to_slice(id, &mut bytes).ok()?;
    Some((target, FileId(bytes)))
}

/// One entry on disk below the kernel directory of a protected kernel region.
pub(crate) struct RegionEntry {
    /// Index of the region in `meta.regions`.
    pub region: usize,
    /// Its embed path.
    pub path: EmbedPath,
    /// Where it is: the region's kernel directory (canonicalised) and the part below it.
    pub disk: KernelPath,
    pub is_dir: bool,
}

impl RegionEntry {
    pub fn name(&self) -> &[u8] {
        self.disk
            .rel()
            .file_name()
            .unwrap_or_default()
            .as_encoded_bytes()
    }
}

impl Volume {
    /// Every entry below the kernel directories of the protected kernel regions that belongs to
    /// that region: not the fspf's own files, not the storage of another (nested) region.
    /// Symlinks are listed, never followed.
    pub(crate) fn region_entries(&self) -> Vec<RegionEntry> {
        let mut out = Vec::new();
        for (ri, region) in self.meta.regions.iter().enumerate() {
            let RegionKind::Kernel(base) = &region.kind else {
                continue;
            };
            if region.protection == Protection::NotProtected {
                continue;
            }
            // Walk the real directory: a symlinked kernel path would otherwise show up as an
            // unlisted file itself, and the fspf's own files (known by their canonical path)
            // would not be recognised below it.
            let base = &std::fs::canonicalize(base).unwrap_or_else(|_| base.clone());
            // Kernel directories of other regions that lie below this one hold *their* files
            // (e.g. `/` authenticated at `/`, `/data` encrypted at `/srv/vol`): not this one's.
            let other_storage: Vec<std::path::PathBuf> = self
                .meta
                .regions
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != ri)
                .filter_map(|(_, r)| match &r.kind {
                    RegionKind::Kernel(k) => {
                        Some(std::fs::canonicalize(k).unwrap_or_else(|_| k.clone()))
                    }
                    RegionKind::Ephemeral => None,
                })
                .collect();
            let walker = walkdir::WalkDir::new(base)
                .follow_links(false)
                .sort_by_file_name()
                .into_iter();
            let walker = walker.filter_entry(|e| {
                let rel = e.path().strip_prefix(base).unwrap_or(e.path());
                let Ok(p) = region.embed_point.join(rel.as_os_str().as_encoded_bytes()) else {
                    return false;
                };
                self.meta.region_index(&p) == Some(ri)
                    && !store::is_fspf_internal(self.path(), e.path())
                    && (e.depth() == 0 || !other_storage.iter().any(|o| o == e.path()))
            });
            for e in walker.flatten() {
                let rel = e.path().strip_prefix(base).unwrap_or(e.path());
                let Ok(p) = region.embed_point.join(rel.as_os_str().as_encoded_bytes()) else {
                    continue;
                };
                out.push(RegionEntry {
                    region: ri,
                    path: p,
                    disk: KernelPath::new(base, rel),
                    is_dir: e.file_type().is_dir(),
                });
            }
        }
        out
    }

    /// Check the kernel-side object of the listed directory or symlink `path`: a directory must
    /// be a directory (not a symlink to one), a symlink must have the recorded target, and no
    /// directory on the way below the region's kernel directory may be a symlink. Regular files
    /// are checked by opening them ([`Volume::open_file`]).
    pub fn check_kernel_node(&self, path: &EmbedPath, entry: &FileEntry) -> Result<()> {
        let Some(region) = self.region_for(path) else {
            return Ok(());
        };
        let Some(kp) = KernelPath::of(region, path) else {
            return Ok(());
        };
        let label = path.to_string();
        let problem = |reason: &str| Error::Invalid {
            path: label.clone(),
            reason: reason.into(),
        };
        let refused = |e: std::io::Error, missing: &str| {
            if e.kind() == std::io::ErrorKind::NotFound {
                problem(missing)
            } else {
                Error::kernel(&label, kp.full(), e)
            }
        };
        match &entry.kind {
            FileKind::File { .. } => Ok(()),
            FileKind::Dir => match kernel_fs::file_type_beneath(kp.base(), kp.rel()) {
                Ok(FileType::Directory) => Ok(()),
                Ok(FileType::Symlink) => Err(Error::SymlinkInPath {
                    path: label.clone(),
                }),
                Ok(_) => Err(problem("listed directory is not a directory on disk")),
                Err(e) => Err(refused(e, "listed directory is missing on disk")),
            },
            FileKind::Symlink(t) => match kernel_fs::read_link_beneath(kp.base(), kp.rel()) {
                Ok(l) if l == *t => Ok(()),
                Ok(_) => Err(problem("symlink target changed on disk")),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    Err(problem("listed symlink is not a symlink on disk"))
                }
                Err(e) => Err(refused(e, "listed symlink is missing on disk")),
            },
            // Entries only: nothing is kept on disk for them (a hard link reads its target's
            // file, which is checked at the target's path), so anything there was put there
            // behind the fspf's back (it is never read, but it is not what the fspf lists).
            FileKind::Special { .. } | FileKind::Link(_) => {
                match kernel_fs::stat_beneath(kp.base(), kp.rel()) {
                    Ok(_) => Err(problem(
                        "an object on disk where the fspf lists an entry that has none",
                    )),
                    Err(_) => Ok(()),
                }
            }
        }
    }

    /// Verify every listed file of every protected kernel region, chunk by chunk, and report files
    /// on disk that the fspf does not list. Empty result = everything verified.
    pub fn verify(&self) -> Vec<Finding> {
        match self.parsed_copy() {
            Ok(Some(v)) => return v.verify(),
            Ok(None) => {}
            Err(e) => {
                return vec![Finding {
                    path: self.path().display().to_string(),
                    problem: e.to_string(),
                }]
            }
        }
        let mut findings: Vec<Finding> = Vec::new();
        if let Err(e) = self.meta.check_usable() {
            findings.push(Finding {
                path: self.path().display().to_string(),
                problem: e.to_string(),
            });
            return findings;
        }
        let listed: Vec<(&EmbedPath, &crate::FileEntry)> = self.meta.files.iter().collect();
        let check = |(path, entry): &(&EmbedPath, &crate::FileEntry)| -> Option<Finding> {
            let region = self.region_for(path)?;
            if region.protection == Protection::NotProtected {
                return None;
            }
            region.kind.kernel_dir()?;
            let res = match &entry.kind {
                FileKind::File { .. } => self.open_file(path).and_then(|mut r| r.verify_all()),
                _ => self.check_kernel_node(path, entry),
            };
            res.err().map(|e| Finding {
                path: path.to_string(),
                problem: e.to_string(),
            })
        };
        let mut per_file: Vec<Finding> = if self.opts.threads.pool {
            listed.par_iter().filter_map(check).collect()
        } else {
            listed.iter().filter_map(check).collect()
        };
        findings.append(&mut per_file);
        // Unlisted files in protected kernel regions.
        for e in self.region_entries() {
            if e.is_dir || is_shadow(e.name()) {
                continue;
            }
            if !self.meta.files.contains_key(&e.path) {
                let region = &self.meta.regions[e.region].embed_point;
                findings.push(Finding {
                    path: e.path.to_string(),
                    problem: format!(
                        "{}: unlisted file in protected region {region} (added on disk, not in the fspf)",
                        e.path
                    ),
                });
            }
        }
        findings.sort_by(|a, b| a.path.cmp(&b.path));
        findings
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::commit::{shadow_name, SHADOW_NAME_KEEP};
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn shadow_names_of_long_names_fit_name_max_and_parse_back() {
        let id = FileId([0xab; 16]);
        for len in [1, SHADOW_NAME_KEEP, SHADOW_NAME_KEEP + 1, 255] {
            let name = "x".repeat(len);
            let sh = shadow_name(std::ffi::OsStr::new(&name), &id);
            assert!(sh.len() <= 255, "{len}: {}", sh.len());
            let (target, got) = parse_shadow(sh.as_bytes()).unwrap();
            assert_eq!(got, id);
            assert_eq!(target, &name.as_bytes()[..len.min(SHADOW_NAME_KEEP)]);
        }
    }
}

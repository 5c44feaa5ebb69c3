//! Reading, authenticating and atomically replacing `fspf.pb`, and the update lock.
use super::Volume;
use crate::crypto::{AeadKey, Tag, VolumeKey, NONCE_LEN, TAG_LEN};
use crate::error::{Error, Result};
use crate::format::header::{self, Header, HeaderError, CURRENT_VERSION, HEADER_LEN, PUBLIC_KEY};
use crate::format::metadata::{Metadata, MetadataPb};
use prost::Message;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub(crate) fn tree_dir(fspf: &Path) -> PathBuf {
    let mut name = fspf
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".trees");
    fspf.with_file_name(name)
}

fn sibling(fspf: &Path, suffix: &str) -> PathBuf {
    let mut name = fspf
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    fspf.with_file_name(name)
}

/// Is `p` one of the files fspf keeps beside `fspf` (the fspf itself, its lock, temp files, trees)?
pub fn is_fspf_internal(fspf: &Path, p: &Path) -> bool {
    if p == fspf || p.starts_with(tree_dir(fspf)) {
        return true;
    }
    let (Some(dir), Some(name)) = (fspf.parent(), fspf.file_name()) else {
        return false;
    };
    if p.parent() != Some(dir) {
        return false;
    }
    let n = p
        .file_name()
        .map(|n| n.as_encoded_bytes())
        .unwrap_or_default();
    n.starts_with(name.as_encoded_bytes())
        && (n.ends_with(b".lock") || n.windows(5).any(|w| w == b".tmp-"))
}

fn header_err(path: &Path, e: HeaderError) -> Error {
    match e {
        HeaderError::BadMagic | HeaderError::UnknownFlags(_) => {
            Error::BadMagic { path: path.into() }
        }
        HeaderError::Truncated(len) => Error::TruncatedFspf {
            path: path.into(),
            len,
        },
        HeaderError::UnsupportedVersion(v) => Error::UnsupportedVersion {
            path: path.into(),
            version: v,
            supported: CURRENT_VERSION,
        },
    }
}

pub(crate) fn read_tag(path: &Path) -> Result<Tag> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    header::tag_of(&bytes)
        .map(Tag)
        .map_err(|e| header_err(path, e))
}

/// Absolute form of an fspf path (parent canonicalised), so internal files are recognised on disk.
pub(crate) fn absolute(path: &Path) -> PathBuf {
    let parent = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match (fs::canonicalize(parent), path.file_name()) {
        (Ok(d), Some(n)) => d.join(n),
        _ => path.to_path_buf(),
    }
}

pub(crate) fn open(path: &Path, key: Option<VolumeKey>, expected: Option<Tag>) -> Result<Volume> {
    let path = &absolute(path);
    let mut bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let h = Header::decode(&bytes).map_err(|e| header_err(path, e))?;
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&bytes[bytes.len() - TAG_LEN..]);
    let tag = Tag(tag);
    if let Some(exp) = expected {
        if !crate::crypto::ct_eq(&exp.0, &tag.0) {
            return Err(Error::TagMismatch {
                path: path.into(),
                expected: exp.to_hex(),
                actual: tag.to_hex(),
            });
        }
    }
    // A caller holding a key expects a sealed fspf: an unsealed one uses the public key, so its
    // tag (even one equal to the expected tag) proves nothing and must not be accepted.
    let key = match (h.sealed, key) {
        (true, Some(k)) => Some(k),
        (true, None) => return Err(Error::KeyRequired { path: path.into() }),
        (false, Some(_)) => return Err(Error::NotEncrypted { path: path.into() }),
        (false, None) => None,
    };
    let aead = AeadKey::new(key.as_ref().map_or(&PUBLIC_KEY[..], |k| k.as_bytes()))?;
    // Decrypted in place: no second copy of the (possibly multi-MB) metadata, one buffer to wipe.
    let mut aad = [0u8; HEADER_LEN];
    aad.copy_from_slice(&bytes[..HEADER_LEN]);
    let opened = aead.open(h.nonce, &aad, &mut bytes[HEADER_LEN..]);
    let pb = opened.map(|n| MetadataPb::decode(&bytes[HEADER_LEN..HEADER_LEN + n]));
    zeroize::Zeroize::zeroize(&mut bytes);
    let pb = pb.ok_or_else(|| Error::WrongKeyOrCorrupt { path: path.into() })?;
    let pb = pb.map_err(|e| Error::MalformedMetadata {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let meta = Metadata::from_pb(pb).map_err(|reason| Error::MalformedMetadata {
        path: path.into(),
        reason,
    })?;
    Ok(Volume {
        path: path.into(),
        key,
        tag,
        meta,
        sync_each_file: true,
    })
}

fn seal(v: &Volume) -> Result<(Vec<u8>, Tag)> {
    let mut nonce = [0u8; NONCE_LEN];
    crate::crypto::random_bytes(&mut nonce)?;
    let h = Header {
        version: CURRENT_VERSION,
        sealed: v.key.is_some(),
        nonce,
    };
    let hb = h.encode();
    let aead = AeadKey::new(v.key.as_ref().map_or(&PUBLIC_KEY[..], |k| k.as_bytes()))?;
    let mut pb = v.meta.to_pb();
    // `body` holds the region keys only until it is encrypted in place below; `pb` holds copies.
    let mut body = pb.encode_to_vec();
    for r in &mut pb.regions {
        zeroize::Zeroize::zeroize(&mut r.key);
    }
    let tag = aead.seal(nonce, &hb, &mut body)?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TAG_LEN);
    out.extend_from_slice(&hb);
    out.extend_from_slice(&body);
    out.extend_from_slice(&tag);
    Ok((out, Tag(tag)))
}

/// fsync the directory holding `p` so a rename in it is durable.
pub(crate) fn sync_dir(p: &Path) -> Result<()> {
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Make everything written below `dirs` durable: one `syncfs` per distinct file system (data,
/// inodes and directory entries alike), however many files were written there.
pub fn sync_filesystems<'a>(dirs: impl IntoIterator<Item = &'a Path>) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut seen_dirs = std::collections::HashSet::new();
    let mut seen_devs = std::collections::HashSet::new();
    for d in dirs {
        if !seen_dirs.insert(d) {
            continue;
        }
        let dev = fs::metadata(d).map_err(|e| Error::io(d, e))?.dev();
        if seen_devs.insert(dev) {
            let f = File::open(d).map_err(|e| Error::io(d, e))?;
            rustix::fs::syncfs(&f).map_err(|e| Error::io(d, e.into()))?;
        }
    }
    Ok(())
}

fn write_temp(v: &Volume) -> Result<(PathBuf, Tag)> {
    let (bytes, tag) = seal(v)?;
    let mut rnd = [0u8; 6];
    crate::crypto::random_bytes(&mut rnd)?;
    let tmp = sibling(&v.path, &format!(".tmp-{}", hex::encode(rnd)));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    Ok((tmp, tag))
}

/// Replace `path` atomically and durably by `content` (temp file beside it, fsync, rename,
/// directory fsync), created with `mode`. For small trusted files such as a tag file.
pub fn write_file_durably(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    let mut rnd = [0u8; 6];
    crate::crypto::random_bytes(&mut rnd)?;
    let tmp = sibling(path, &format!(".tmp-{}", hex::encode(rnd)));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(content)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    sync_dir(path)
}

/// Atomically replace the fspf: temp file, fsync, rename, fsync directory. `announce` learns
/// the new tag after the temp file is durable and before the rename (the commit point), so a
/// trust anchor can hold both tags across a crash in the window; if it fails, nothing changes.
pub(crate) fn write(v: &mut Volume, announce: &mut dyn FnMut(Tag) -> Result<()>) -> Result<()> {
    let (tmp, tag) = write_temp(v)?;
    if let Err(e) = announce(tag) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = fs::rename(&tmp, &v.path) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(&v.path, e));
    }
    sync_dir(&v.path)?;
    v.tag = tag;
    Ok(())
}

/// Write a new fspf; without `force` an existing file is never replaced (link fails on EEXIST).
pub(crate) fn write_new(v: &mut Volume, force: bool) -> Result<()> {
    if force {
        return write(v, &mut |_| Ok(()));
    }
    let (tmp, tag) = write_temp(v)?;
    let r = fs::hard_link(&tmp, &v.path);
    let _ = fs::remove_file(&tmp);
    match r {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Error::Invalid {
                path: v.path.display().to_string(),
                reason: "already exists; use --force to replace it".into(),
            })
        }
        Err(e) => return Err(Error::io(&v.path, e)),
    }
    sync_dir(&v.path)?;
    v.tag = tag;
    Ok(())
}

/// Exclusive lock on `FSPF.lock` (flock), released on drop. Serialises updaters across processes
/// and threads (each acquisition opens its own file description).
#[derive(Debug)]
pub struct FspfLock {
    _file: File,
}

impl FspfLock {
    pub fn acquire(fspf: &Path) -> Result<FspfLock> {
        let lp = sibling(fspf, ".lock");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lp)
            .map_err(|e| Error::io(&lp, e))?;
        f.lock().map_err(|e| Error::io(&lp, e))?;
        Ok(FspfLock { _file: f })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn sync_filesystems_syncs_each_dir_once_and_names_a_missing_one() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        fs::create_dir(&a).unwrap();
        sync_filesystems([d.path(), a.as_path(), d.path()]).unwrap();
        let missing = d.path().join("missing");
        let e = sync_filesystems([missing.as_path()]).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}

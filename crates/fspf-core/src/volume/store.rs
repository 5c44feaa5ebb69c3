//! Reading, authenticating and atomically replacing `fspf.pb`, and the update lock.
use super::kernel_fs::{self, KernelPath};
use super::Volume;
use crate::crypto::{AeadKey, FileId, Tag, VolumeKey, NONCE_LEN, TAG_LEN};
use crate::error::{Error, Result};
use crate::format::header::{
    self, Header, HeaderError, CURRENT_VERSION, HEADER_LEN, MAX_FSPF_LEN, PUBLIC_KEY,
};
use crate::format::metadata::{Metadata, MetadataPb};
use prost::Message;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub(crate) fn tree_dir(fspf: &Path) -> PathBuf {
    sibling(fspf, ".trees")
}

/// Outboard `FSPF.trees/<id hex>` of file version `id`, below the fspf's directory.
pub(crate) fn tree_path(fspf: &Path, id: &FileId) -> KernelPath {
    let mut name = fspf
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".trees");
    let dir = match fspf.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    KernelPath::new(dir, Path::new(&name).join(id.to_hex()))
}

/// Journal `FSPF.trees/<id hex>.<root hex>.journal` of the update of file `id` whose committed
/// state has chunk-tree root `root` (FORMAT.md §5b).
pub(crate) fn journal_path(fspf: &Path, id: &FileId, root: &[u8; 32]) -> KernelPath {
    let t = tree_path(fspf, id);
    let mut name = t.rel().as_os_str().to_os_string();
    name.push(".");
    name.push(hex::encode(root));
    name.push(".journal");
    KernelPath::new(t.base(), PathBuf::from(name))
}

/// Open the chunk tree of format-2 file `id` for writing (applying a journal).
pub(crate) fn open_tree_rw(fspf: &Path, id: &FileId, label: &str) -> Result<File> {
    let t = tree_path(fspf, id);
    kernel_fs::open_regular_rw(t.base(), t.rel()).map_err(|e| match e {
        kernel_fs::OpenError::NotRegular(kind) => Error::NotRegular {
            path: format!("{label}: chunk tree {}", t.full().display()),
            kind,
        },
        kernel_fs::OpenError::Io(e) => Error::kernel(label, t.full(), e),
    })
}

/// Open the outboard of version `id` (none yet: `Ok(None)`); only a regular file is accepted.
pub(crate) fn open_tree(fspf: &Path, id: &FileId, label: &str) -> Result<Option<File>> {
    let t = tree_path(fspf, id);
    match kernel_fs::open_regular(t.base(), t.rel()) {
        Ok(f) => Ok(Some(f)),
        Err(kernel_fs::OpenError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(kernel_fs::OpenError::NotRegular(kind)) => Err(Error::NotRegular {
            path: format!("{label}: integrity tree {}", t.full().display()),
            kind,
        }),
        Err(kernel_fs::OpenError::Io(e)) => Err(Error::kernel(label, t.full(), e)),
    }
}

/// Create the outboard of version `id` (`FSPF.trees/` made if needed; no symlinks followed).
pub(crate) fn create_tree(fspf: &Path, id: &FileId) -> Result<(File, PathBuf)> {
    let t = tree_path(fspf, id);
    let full = t.full();
    let trees = t.rel().parent().unwrap_or(Path::new(""));
    let dir = kernel_fs::create_dirs_beneath(t.base(), trees, 0o700)
        .map_err(|e| Error::io(t.base().join(trees), e))?;
    let name = t.rel().file_name().unwrap_or_default();
    let f = kernel_fs::create_new_at(&dir, name, 0o600, rustix::fs::OFlags::empty())
        .map_err(|e| Error::io(&full, e))?;
    Ok((f, full))
}

/// Remove the outboard of version `id`, if any.
pub(crate) fn remove_tree(fspf: &Path, id: &FileId) {
    let t = tree_path(fspf, id);
    let _ = kernel_fs::remove_beneath(t.base(), t.rel(), false);
}

/// `FSPF<suffix>` beside `fspf` (its lock, log, index cache, temporaries).
pub(crate) fn sibling(fspf: &Path, suffix: &str) -> PathBuf {
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
        && (n.ends_with(b".lock")
            || n.ends_with(b".index")
            || n.ends_with(b".log")
            || n.windows(5).any(|w| w == b".tmp-"))
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

/// The error for a refused open of `path`, one of the fspf's own files: something other than
/// a regular file in its place (a symlink, a FIFO, a device) is named as such.
pub(crate) fn open_error(path: &Path, e: kernel_fs::OpenError) -> Error {
    match e {
        kernel_fs::OpenError::NotRegular(kind) => Error::NotRegular {
            path: path.display().to_string(),
            kind,
        },
        kernel_fs::OpenError::Io(e) if kernel_fs::is_symlink_refusal(&e) => Error::NotRegular {
            path: path.display().to_string(),
            kind: "symbolic link",
        },
        kernel_fs::OpenError::Io(e) => Error::io(path, e),
    }
}

/// Open the fspf itself: a regular file (no FIFO, device or symlink in its place) of at most
/// [`MAX_FSPF_LEN`] bytes. Returns the file and its length.
fn open_fspf(path: &Path) -> Result<(File, u64)> {
    let f = kernel_fs::open_regular_path(path).map_err(|e| open_error(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > MAX_FSPF_LEN {
        return Err(Error::FspfTooLarge {
            path: path.into(),
            len,
            max: MAX_FSPF_LEN,
        });
    }
    Ok((f, len))
}

/// Read the whole fspf, at most the length `open_fspf` saw (a file that grows meanwhile is
/// not read past it; one that shrinks is read short and fails authentication).
fn read_fspf(path: &Path) -> Result<Vec<u8>> {
    let (f, len) = open_fspf(path)?;
    // `len` <= MAX_FSPF_LEN (1 GiB) fits in usize on every target fspf builds for.
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(len)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// The tag of the current state on disk: the checkpoint's, or the last complete record's of a
/// metadata log that continues it (keyless: nothing is authenticated, FORMAT.md §5c).
pub(crate) fn read_tag(path: &Path) -> Result<Tag> {
    Ok(super::log::DiskState::read(path)?.tag())
}

/// The checkpoint's tag (the fspf file's: its header and last 16 bytes, not the whole file),
/// the file's length and its format version.
pub(crate) fn read_checkpoint_tag(path: &Path) -> Result<(Tag, u64, u16)> {
    let (f, len) = open_fspf(path)?;
    let short = (HEADER_LEN + TAG_LEN) as u64;
    let mut bytes = vec![0u8; len.min(short) as usize];
    let res = if len <= short {
        f.read_exact_at(&mut bytes, 0)
    } else {
        f.read_exact_at(&mut bytes[..HEADER_LEN], 0)
            .and_then(|()| f.read_exact_at(&mut bytes[HEADER_LEN..], len - TAG_LEN as u64))
    };
    res.map_err(|e| Error::io(path, e))?;
    let version = Header::decode(&bytes)
        .map_err(|e| header_err(path, e))?
        .version;
    header::tag_of(&bytes)
        .map(|t| (Tag(t), len, version))
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
    let mismatch = |exp: Tag, actual: Tag| Error::TagMismatch {
        path: path.into(),
        expected: exp.to_hex(),
        actual: actual.to_hex(),
    };
    // A checkpoint written by another process between reading the fspf and its log leaves a
    // log that no longer continues what was read: read both again.
    for _ in 0..16 {
        let st = super::log::DiskState::read(path)?;
        if let Some(exp) = expected {
            // Before any decryption, as before the log existed: the keyless current tag.
            let disk = st.tag();
            if !crate::crypto::ct_eq(&exp.0, &disk.0) {
                return Err(mismatch(exp, disk));
            }
        }
        let mut v = open_checkpoint(path, key.clone())?;
        // The log read above continues the checkpoint just opened, or one was written since.
        if v.tag != st.checkpoint() || !v.catch_up_to(st)? {
            continue;
        }
        if let Some(exp) = expected {
            if !crate::crypto::ct_eq(&exp.0, &v.tag.0) {
                return Err(mismatch(exp, v.tag));
            }
        }
        return Ok(v);
    }
    Err(Error::Other(format!(
        "{}: the fspf kept changing while it was read",
        path.display()
    )))
}

/// The checkpoint alone (the fspf file), authenticated; its log is not read.
fn open_checkpoint(path: &Path, key: Option<VolumeKey>) -> Result<Volume> {
    let mut bytes = read_fspf(path)?;
    let h = Header::decode(&bytes).map_err(|e| header_err(path, e))?;
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&bytes[bytes.len() - TAG_LEN..]);
    let tag = Tag(tag);
    let checkpoint_len = bytes.len() as u64;
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
        index: None,
        index_bytes: None,
        opts: Default::default(),
        writer: Default::default(),
        log: super::log::LogPos {
            base: Some(tag),
            end: 0,
            checkpoint_len,
            checkpoint_version: h.version,
            log_version: 0,
            journal_bytes: 0,
        },
        overlay: Default::default(),
        pending: Default::default(),
        logj: Default::default(),
        recorded: Default::default(),
        links: Default::default(),
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
    let total = (HEADER_LEN + body.len() + TAG_LEN) as u64;
    if total > MAX_FSPF_LEN {
        zeroize::Zeroize::zeroize(&mut body);
        return Err(Error::FspfTooLarge {
            path: v.path.clone(),
            len: total,
            max: MAX_FSPF_LEN,
        });
    }
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

fn write_temp(v: &Volume) -> Result<(PathBuf, Tag, u64)> {
    let (bytes, tag) = seal(v)?;
    let mut rnd = [0u8; 6];
    crate::crypto::random_bytes(&mut rnd)?;
    let tmp = sibling(&v.path, &format!(".tmp-{}", hex::encode(rnd)));
    // The new fspf keeps the permission bits of the one it replaces (0600 for a new one), so
    // that a commit does not lock out the other users its owner let read it (a run whose
    // processes change uid, an image's non-root user).
    let mode = fs::symlink_metadata(&v.path)
        .map(|m| {
            use std::os::unix::fs::PermissionsExt;
            m.permissions().mode() & 0o666
        })
        .unwrap_or(0o600);
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        if mode != 0o600 {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        f.write_all(&bytes)?;
        f.sync_all()
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    Ok((tmp, tag, bytes.len() as u64))
}

/// After a checkpoint with tag `tag` of `len` bytes replaced the fspf: the log is stale (its
/// header names the old checkpoint) and is removed; the next commit starts a new one.
fn checkpointed(v: &mut Volume, tag: Tag, len: u64) {
    v.tag = tag;
    v.log = super::log::LogPos {
        base: Some(tag),
        end: 0,
        checkpoint_len: len,
        checkpoint_version: CURRENT_VERSION,
        log_version: 0,
        journal_bytes: 0,
    };
    v.logj.clear();
    let _ = fs::remove_file(super::log::log_path(&v.path));
}

/// Replace `path` atomically and durably by `content` (temp file beside it, fsync, rename,
/// directory fsync), created with `mode`. For small trusted files such as a tag file.
pub fn write_file_durably(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    replace_file(path, content, mode)?;
    sync_dir(path)
}

/// Overwrite the small file `path` in place with `content` and make it durable with one
/// `fdatasync`: no temporary file (whose inode the file system must allocate and free at every
/// write), no rename, no directory fsync. A missing file is created with
/// [`write_file_durably`]. For the tag file, written twice per commit: a few dozen bytes lie in
/// one sector, which devices write whole (should one be torn nonetheless it no longer parses,
/// and the next open fails closed, never trusting a wrong tag). A reader that reads it while it
/// is being written may see a mix of both contents; it fails to parse it and reads again.
pub fn overwrite_file_durably(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    overwrite_in_place(path, content, mode, true)
}

/// [`overwrite_file_durably`] without its `fdatasync` (a missing file or another name for it
/// is still replaced durably): for a tag file's publish after a commit point, whose durable
/// predecessor already names the same state.
pub fn overwrite_file(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    overwrite_in_place(path, content, mode, false)
}

fn overwrite_in_place(path: &Path, content: &[u8], mode: u32, durable: bool) -> Result<()> {
    let f = match OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return write_file_durably(path, content, mode)
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    let res = (|| {
        use std::os::unix::fs::MetadataExt;
        let m = f.metadata()?;
        if !m.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        if m.nlink() != 1 {
            // Another name for the same file (a hard link someone made): replace this name
            // instead of writing through to the other.
            return Ok(false);
        }
        f.write_all_at(content, 0)?;
        f.set_len(content.len() as u64)?;
        if durable {
            f.sync_data()?;
        }
        Ok(true)
    })();
    match res {
        Ok(true) => Ok(()),
        Ok(false) => write_file_durably(path, content, mode),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// [`write_file_durably`] without the directory's fsync: after a crash `path` holds the old
/// content or the new one, each complete, but which one is not settled until the directory is
/// synced.
fn replace_file(path: &Path, content: &[u8], mode: u32) -> Result<()> {
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
    Ok(())
}

/// Atomically replace the fspf: temp file, fsync, rename, fsync directory. `announce` learns
/// the new tag after the temp file is durable and before the rename (the commit point), so a
/// trust anchor can hold both tags across a crash in the window; if it fails, nothing changes.
pub(crate) fn write(v: &mut Volume, announce: &mut dyn FnMut(Tag) -> Result<()>) -> Result<()> {
    let (tmp, tag, len) = write_temp(v)?;
    if let Err(e) = announce(tag) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = fs::rename(&tmp, &v.path) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(&v.path, e));
    }
    sync_dir(&v.path)?;
    checkpointed(v, tag, len);
    Ok(())
}

/// Write a new fspf; without `force` an existing file is never replaced (link fails on EEXIST).
pub(crate) fn write_new(v: &mut Volume, force: bool) -> Result<()> {
    if force {
        return write(v, &mut |_| Ok(()));
    }
    let (tmp, tag, len) = write_temp(v)?;
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
    checkpointed(v, tag, len);
    Ok(())
}

/// Open (create) the lock file `FSPF<suffix>`: not through a symlink, and only a regular file
/// (O_NONBLOCK: a FIFO in its place must not block the open).
fn open_lock_file(fspf: &Path, suffix: &str) -> Result<(File, PathBuf)> {
    let lp = sibling(fspf, suffix);
    let f = kernel_fs::open_rw_path(&lp, false).map_err(|e| open_error(&lp, e))?;
    Ok((f, lp))
}

/// Exclusive lock on `FSPF.lock` (flock), released on drop. Serialises updaters across processes
/// and threads (each acquisition opens its own file description).
#[derive(Debug)]
pub struct FspfLock {
    _file: File,
    held: (u64, u64, std::thread::ThreadId),
}

/// The `FSPF.lock`s held, by lock file (device, inode) and thread: a thread that holds one
/// must not wait for it again (a second file description would wait for the first forever).
static LOCKS_HELD: std::sync::Mutex<Vec<(u64, u64, std::thread::ThreadId)>> =
    std::sync::Mutex::new(Vec::new());

impl FspfLock {
    pub fn acquire(fspf: &Path) -> Result<FspfLock> {
        use std::os::unix::fs::MetadataExt;
        let (f, lp) = open_lock_file(fspf, ".lock")?;
        f.lock().map_err(|e| Error::io(&lp, e))?;
        let m = f.metadata().map_err(|e| Error::io(&lp, e))?;
        let held = (m.dev(), m.ino(), std::thread::current().id());
        LOCKS_HELD
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(held);
        Ok(FspfLock { _file: f, held })
    }

    /// Does the calling thread hold `FSPF.lock` of `fspf`?
    pub(crate) fn held_here(fspf: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(m) = fs::metadata(sibling(fspf, ".lock")) else {
            return false;
        };
        let me = (m.dev(), m.ino(), std::thread::current().id());
        LOCKS_HELD
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&me)
    }
}

impl Drop for FspfLock {
    fn drop(&mut self) {
        let mut held = LOCKS_HELD.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = held.iter().position(|h| *h == self.held) {
            held.swap_remove(i);
        }
    }
}

/// A shared lock on `FSPF.writers.lock`, held by every process that has staged a file version
/// (a shadow, an outboard) that is not yet committed or discarded: each [`super::StagedFile`]
/// keeps one alive. The orphan cleanup ([`Volume::clean_orphans`](super::Volume::clean_orphans)) removes uncommitted
/// shadows only when it can take this lock exclusively, i.e. when no such writer exists.
///
/// Its descriptor outlives the call that staged the version; in a shielded program the program
/// runs in between. It is therefore moved to a number >= [`WRITER_FD_BASE`], out of the way of
/// `dup2(x, 4)`-style redirections, and listed by [`held_fds`] so that a frontend that
/// interposes `close`/`dup2` can keep the program from closing it.
#[derive(Debug)]
pub struct WriterGuard {
    file: File,
}

/// Lowest descriptor number a [`WriterGuard`] uses.
pub const WRITER_FD_BASE: i32 = 900;

static HELD: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

/// Descriptors fspf-core holds open across calls (the writer locks of staged versions).
pub fn held_fds() -> Vec<i32> {
    HELD.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

impl WriterGuard {
    pub(crate) fn acquire(fspf: &Path) -> Result<WriterGuard> {
        use std::os::fd::AsRawFd;
        let (f, lp) = open_lock_file(fspf, ".writers.lock")?;
        f.lock_shared().map_err(|e| Error::io(&lp, e))?;
        // Same open file description, hence the same lock; the low number is closed.
        let file = match rustix::io::fcntl_dupfd_cloexec(&f, WRITER_FD_BASE) {
            Ok(high) => File::from(high),
            Err(_) => f,
        };
        HELD.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(file.as_raw_fd());
        Ok(WriterGuard { file })
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = held.iter().position(|&h| h == fd) {
            held.swap_remove(i);
        }
    }
}

/// The exclusive side of [`WriterGuard`], without waiting: `None` while any writer holds it.
pub(crate) fn no_writers(fspf: &Path) -> Result<Option<File>> {
    let (f, lp) = open_lock_file(fspf, ".writers.lock")?;
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&lp, e)),
    }
}

/// Is `name` (in the fspf's directory) one of the fspf's commit temporaries, `FSPF.tmp-<12 hex>`?
pub(crate) fn is_temp_name(fspf: &Path, name: &[u8]) -> bool {
    let Some(base) = fspf.file_name() else {
        return false;
    };
    name.strip_prefix(base.as_encoded_bytes())
        .and_then(|r| r.strip_prefix(b".tmp-"))
        .is_some_and(|h| h.len() == 12 && h.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
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

    /// Regression (pjdfstest under `fspf run`): every commit wrote the new fspf with mode 0600,
    /// so the other users of a run (processes that drop to another uid, an image's non-root
    /// user) could no longer read the fspf their own run committed.
    #[test]
    fn a_commit_made_the_fspf_0600_and_locked_out_the_other_users() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fspf.pb");
        let mut v = crate::volume::encrypted_root_volume(&p, &d.path().join("vol"));
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        v.save().unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
    }

    /// The tag file is written in place (same inode, no temporary file), shrinks from two
    /// tags to one, is created when missing, never writes through a second name (a hard link
    /// someone made: that name is replaced instead) and never follows a symlink.
    #[test]
    fn a_tag_file_is_overwritten_in_place_but_never_through_another_name() {
        for durable in [true, false] {
            tag_file_overwrite(durable);
        }
    }

    /// [`overwrite_file_durably`] (`durable`) or [`overwrite_file`], the publish's.
    fn tag_file_overwrite(durable: bool) {
        use std::os::unix::fs::MetadataExt;
        let overwrite_file_durably = |p: &Path, c: &[u8], m: u32| {
            if durable {
                overwrite_file_durably(p, c, m)
            } else {
                overwrite_file(p, c, m)
            }
        };
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tag");
        overwrite_file_durably(&p, b"a\n", 0o600).unwrap();
        let ino = fs::metadata(&p).unwrap().ino();
        overwrite_file_durably(&p, b"aaaa\nbbbb\n", 0o600).unwrap();
        overwrite_file_durably(&p, b"b\n", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"b\n");
        assert_eq!(fs::metadata(&p).unwrap().ino(), ino, "written in place");
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "no temporary left"
        );
        let other = d.path().join("other");
        fs::hard_link(&p, &other).unwrap();
        overwrite_file_durably(&p, b"c\n", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"c\n");
        assert_eq!(
            fs::read(&other).unwrap(),
            b"b\n",
            "the other name is untouched"
        );
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&other, &link).unwrap();
        assert!(overwrite_file_durably(&link, b"d\n", 0o600).is_err());
        assert_eq!(fs::read(&other).unwrap(), b"b\n");
    }
}

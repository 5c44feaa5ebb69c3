//! Open shielded files: the fd table (fd → shared open-file description), verified readers,
//! write buffers, and the stat structures the shield synthesises.
use crate::log;
use crate::shield::{Node, NodeKind};
use fspf_core::volume::memory::MemReader;
use fspf_core::volume::KernelReader;
use fspf_core::EmbedPath;
use libc::c_int;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Plaintext of a file being written (or written but not yet committed). Shared by every fd of
/// this process that has the path open, so they all see the same bytes.
pub struct WriteBuf {
    pub path: EmbedPath,
    pub data: Vec<u8>,
    pub mode: u32,
    pub dirty: bool,
    /// Open write descriptions; the version is sealed when this drops to 0.
    pub writers: usize,
    pub mtime: i64,
    /// Unlinked or replaced while open: never sealed again.
    pub detached: bool,
    /// Its latest version is staged but not committed: reads must come from this buffer.
    pub pending: bool,
}

pub enum Body {
    /// Read-only, lazily verified chunk by chunk.
    Kernel(Box<KernelReader>),
    Mem(Box<MemReader>),
    /// Ephemeral not-protected file (read-only snapshot).
    Plain(Arc<Vec<u8>>),
    Buf(Arc<Mutex<WriteBuf>>),
    Dir,
}

/// One open file description (shared across dup'd fds, like the kernel's).
pub struct OpenFile {
    pub path: EmbedPath,
    pub offset: u64,
    pub read: bool,
    pub write: bool,
    pub append: bool,
    pub body: Body,
    pub mode: u32,
    pub kernel: Option<PathBuf>,
}

pub type Handle = Arc<Mutex<OpenFile>>;

static TABLE: RwLock<BTreeMap<c_int, Handle>> = RwLock::new(BTreeMap::new());
static BITS: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];
static TRANSLATED: RwLock<BTreeMap<c_int, EmbedPath>> = RwLock::new(BTreeMap::new());
static N_TRANSLATED: AtomicUsize = AtomicUsize::new(0);

fn bit(fd: c_int) -> Option<(usize, u64)> {
    let fd = usize::try_from(fd).ok()?;
    (fd < 64 * 64).then(|| (fd / 64, 1u64 << (fd % 64)))
}

/// Fast check used by every fd hook.
#[inline]
pub fn is_shielded(fd: c_int) -> bool {
    match bit(fd) {
        Some((i, m)) => BITS[i].load(Ordering::Relaxed) & m != 0,
        None => fd >= 0 && table_read().contains_key(&fd),
    }
}

fn table_read() -> std::sync::RwLockReadGuard<'static, BTreeMap<c_int, Handle>> {
    TABLE.read().unwrap_or_else(|e| e.into_inner())
}
pub fn table_write() -> std::sync::RwLockWriteGuard<'static, BTreeMap<c_int, Handle>> {
    TABLE.write().unwrap_or_else(|e| e.into_inner())
}

pub fn get(fd: c_int) -> Option<Handle> {
    if !is_shielded(fd) {
        return None;
    }
    table_read().get(&fd).cloned()
}

pub fn insert(fd: c_int, h: Handle) {
    table_write().insert(fd, h);
    if let Some((i, m)) = bit(fd) {
        BITS[i].fetch_or(m, Ordering::Relaxed);
    }
}

pub fn remove(fd: c_int) -> Option<Handle> {
    if let Some((i, m)) = bit(fd) {
        BITS[i].fetch_and(!m, Ordering::Relaxed);
    }
    table_write().remove(&fd)
}

pub fn all_handles() -> Vec<Handle> {
    table_read().values().cloned().collect()
}

pub fn all_fds() -> Vec<c_int> {
    table_read().keys().copied().collect()
}

/// Embed path of a shielded directory fd.
pub fn dir_path(fd: c_int) -> Option<EmbedPath> {
    let h = get(fd)?;
    let f = h.lock().unwrap_or_else(|e| e.into_inner());
    Some(f.path.clone())
}

/// Remember the embed path of an fd opened on a translated kernel path (for `*at` calls).
pub fn track_translated(fd: c_int, ep: EmbedPath) {
    TRANSLATED
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(fd, ep);
    N_TRANSLATED.fetch_add(1, Ordering::Relaxed);
}

pub fn translated_path(fd: c_int) -> Option<EmbedPath> {
    if N_TRANSLATED.load(Ordering::Relaxed) == 0 {
        return None;
    }
    TRANSLATED
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&fd)
        .cloned()
}

pub fn forget_translated(fd: c_int) {
    if N_TRANSLATED.load(Ordering::Relaxed) == 0 {
        return;
    }
    if TRANSLATED
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&fd)
        .is_some()
    {
        N_TRANSLATED.fetch_sub(1, Ordering::Relaxed);
    }
}

impl OpenFile {
    pub fn size(&self) -> u64 {
        match &self.body {
            Body::Kernel(r) => r.size(),
            Body::Mem(r) => r.size(),
            Body::Plain(v) => v.len() as u64,
            Body::Buf(b) => b.lock().map(|g| g.data.len() as u64).unwrap_or(0),
            Body::Dir => 0,
        }
    }

    /// Verified plaintext at `off`; EIO (and a log line) when verification fails.
    pub fn read_at(&mut self, out: &mut [u8], off: u64) -> Result<usize, c_int> {
        if !self.read {
            return Err(libc::EBADF);
        }
        let r = match &mut self.body {
            Body::Kernel(r) => r.read_at(out, off),
            Body::Mem(r) => r.read_at(out, off),
            Body::Plain(v) => Ok(copy_from(v, out, off)),
            Body::Buf(b) => Ok(copy_from(
                &b.lock().unwrap_or_else(|e| e.into_inner()).data,
                out,
                off,
            )),
            Body::Dir => return Err(libc::EISDIR),
        };
        r.map_err(|e| {
            let m = e.to_string();
            log(format!("read refused: {m}"));
            crate::integrity_failure(&m);
            libc::EIO
        })
    }

    pub fn write_at(&mut self, data: &[u8], off: u64) -> Result<usize, c_int> {
        let Body::Buf(b) = &self.body else {
            return Err(libc::EBADF);
        };
        if !self.write {
            return Err(libc::EBADF);
        }
        let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
        let off = if self.append {
            g.data.len()
        } else {
            usize::try_from(off).map_err(|_| libc::EFBIG)?
        };
        let end = off.checked_add(data.len()).ok_or(libc::EFBIG)?;
        if g.data.len() < end {
            g.data.resize(end, 0);
        }
        g.data[off..end].copy_from_slice(data);
        g.dirty = true;
        g.mtime = crate::shield::get().started.max(now());
        Ok(data.len())
    }

    pub fn set_len(&mut self, len: u64) -> Result<(), c_int> {
        let Body::Buf(b) = &self.body else {
            return Err(libc::EINVAL);
        };
        if !self.write {
            return Err(libc::EINVAL);
        }
        let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
        g.data
            .resize(usize::try_from(len).map_err(|_| libc::EFBIG)?, 0);
        g.dirty = true;
        Ok(())
    }

    pub fn node(&self) -> Node {
        Node {
            kind: if matches!(self.body, Body::Dir) {
                NodeKind::Dir
            } else {
                NodeKind::File
            },
            size: self.size(),
            mode: self.mode,
            kernel: self.kernel.clone(),
            mtime: match &self.body {
                Body::Buf(b) => b.lock().ok().map(|g| g.mtime),
                _ => None,
            },
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn copy_from(v: &[u8], out: &mut [u8], off: u64) -> usize {
    let Ok(off) = usize::try_from(off) else {
        return 0;
    };
    if off >= v.len() {
        return 0;
    }
    let n = out.len().min(v.len() - off);
    out[..n].copy_from_slice(&v[off..off + n]);
    n
}

/// Stable inode number for a shielded path (the kernel's changes on every committed rewrite,
/// which programs such as sqlite would take for "the database was replaced").
pub fn ino_of(ep: &EmbedPath) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in ep.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h | 1
}

/// Device number reported for shielded files.
pub const SHIELD_DEV: u64 = 0xf5f0;

/// Fill a `struct stat` for `node` at `ep`.
pub fn fill_stat(ep: &EmbedPath, node: &Node, st: &mut libc::stat) {
    // SAFETY: libc::stat is plain old data; all-zero is a valid value.
    *st = unsafe { std::mem::zeroed() };
    let mut times = None;
    if let Some(k) = &node.kernel {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::symlink_metadata(k) {
            st.st_uid = m.uid();
            st.st_gid = m.gid();
            times = Some((m.atime(), m.mtime(), m.ctime()));
        }
    }
    if times.is_none() {
        // SAFETY: getuid/getgid cannot fail.
        unsafe {
            st.st_uid = libc::getuid();
            st.st_gid = libc::getgid();
        }
    }
    let t = node.mtime.unwrap_or(crate::shield::get().started);
    let (a, m, c) = times.unwrap_or((t, t, t));
    let m = node.mtime.unwrap_or(m);
    st.st_atime = a;
    st.st_mtime = m;
    st.st_ctime = c.max(m);
    st.st_dev = SHIELD_DEV;
    st.st_ino = ino_of(ep);
    let (ty, nlink) = match node.kind {
        NodeKind::File => (libc::S_IFREG, 1),
        NodeKind::Dir => (libc::S_IFDIR, 2),
        NodeKind::Symlink(_) => (libc::S_IFLNK, 1),
    };
    st.st_mode = ty | (node.mode & 0o7777);
    st.st_nlink = nlink;
    st.st_size = node.size as i64;
    st.st_blksize = 4096;
    st.st_blocks = node.size.div_ceil(512) as i64;
}

pub fn fill_statx(ep: &EmbedPath, node: &Node, sx: &mut libc::statx) {
    // SAFETY: libc::stat is plain old data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    fill_stat(ep, node, &mut st);
    // SAFETY: libc::statx is plain old data; all-zero is a valid value.
    *sx = unsafe { std::mem::zeroed() };
    sx.stx_mask = libc::STATX_BASIC_STATS;
    sx.stx_blksize = st.st_blksize as u32;
    sx.stx_nlink = st.st_nlink as u32;
    sx.stx_uid = st.st_uid;
    sx.stx_gid = st.st_gid;
    sx.stx_mode = st.st_mode as u16;
    sx.stx_ino = st.st_ino;
    sx.stx_size = st.st_size as u64;
    sx.stx_blocks = st.st_blocks as u64;
    let ts = |s: i64| {
        // SAFETY: statx_timestamp is plain old data; all-zero is valid.
        let mut t: libc::statx_timestamp = unsafe { std::mem::zeroed() };
        t.tv_sec = s;
        t
    };
    sx.stx_atime = ts(st.st_atime);
    sx.stx_mtime = ts(st.st_mtime);
    sx.stx_ctime = ts(st.st_ctime);
    sx.stx_btime = ts(st.st_ctime);
    sx.stx_dev_major = (SHIELD_DEV >> 8) as u32;
    sx.stx_dev_minor = (SHIELD_DEV & 0xff) as u32;
}

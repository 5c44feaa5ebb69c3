//! Shield state: the volume and the run's trust anchor, path routing (embed path → region), the
//! node view (fspf + this process's uncommitted changes + ephemeral regions) and the commit
//! protocol. One mutex ([`Inner`]) guards it; file contents live in `files`.
use crate::anchor::{Anchor, AnchorState};
use crate::files::{self, WriteBuf};
use crate::{log, real, say};
use fspf_core::codec::Threads;
use fspf_core::format::metadata::{FileKind, Protection, Region, RegionKind};
use fspf_core::format::view::ChildKind;
use fspf_core::view::{EphemeralNode, Frontend, OpenFile, Pending, View, ViewError};
use fspf_core::volume::kernel_fs;
use fspf_core::volume::memory::{self, SealedMem};
use fspf_core::volume::{Change, KernelPath};
use fspf_core::{EmbedPath, Tag, Volume, VolumeKey, VolumeOptions};
use libc::c_int;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CStr, CString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Commit after this many staged file versions even without fsync (bounds memory, shadows and
/// the buffer fds a batch keeps open): 500, or up to 4096 when the fd limit leaves room (four
/// fds per staged version). Each commit costs a `syncfs` and an fspf rewrite, which dominated
/// the time of small-file creation at 500 per batch (bench/RESULTS.md).
pub fn commit_every_files() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        // SAFETY: getrlimit into a local struct.
        let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
            r.rlim_cur
        } else {
            1024
        };
        ((soft / 4).min(4096) as usize).max(500)
    })
}
const COMMIT_EVERY_BYTES: u64 = 256 << 20;
pub use fspf_core::view::MAX_SYMLINKS;
/// Lowest fd number for the files verified readers keep open (see `kernel_fs::set_fd_floor`).
const READER_FD_FLOOR: c_int = 600;
/// Lowest fd number for the shield's own inherited fds (anchor, key), out of the way of shells.
const HIGH_FD: c_int = 700;

pub struct Shield {
    pub fspf: PathBuf,
    key: Option<VolumeKey>,
    pub mutable: bool,
    /// The run's trust anchor (an inherited memfd) and its commit lock.
    anchor: Anchor,
    /// Private CLOEXEC memfd with the hex key, handed to exec'd children (FSPF_KEY_FD); or -1.
    key_fd_slot: AtomicI32,
    /// The key came in a memfd (`FSPF_KEY_FD`) and goes to exec'd children the same way.
    key_handoff: bool,
    /// Sealed memfd with the frozen index of the state this process last handed to children
    /// (`FSPF_INDEX_FD`); -1 when none. Rebuilt for children after a commit moved the tag.
    index_fd_slot: AtomicI32,
    /// When the shield started (ns since the epoch).
    pub started: i64,
    /// Options of every volume this process opens (fork-safe threads, batched durability).
    pub opts: VolumeOptions,
    inner: Mutex<Inner>,
    /// Kernel directories known to exist (see [`Shield::ensure_parent`]).
    dirs_made: Mutex<std::collections::HashSet<PathBuf>>,
    /// The tag the index in `index_fd_slot` was built from (when this process built it).
    index_tag: Mutex<Option<Tag>>,
}

#[derive(Debug)]
pub enum EphNode {
    Dir { mode: u32, mtime: i64 },
    File { sealed: SealedMem, mtime: i64 },
}

pub struct Inner {
    /// `None` when the fspf could not be opened or authenticated (fail-safe: refuse everything).
    pub vol: Option<Volume>,
    /// Ephemeral regions: embed path → sealed node; gone at exit.
    pub eph: BTreeMap<EmbedPath, EphNode>,
    /// Plaintext of files open for writing, and of kernel files staged but not yet committed.
    /// Sorted, so "is anything live below this directory" is a range query, not a scan.
    pub live: BTreeMap<EmbedPath, Arc<Mutex<WriteBuf>>>,
    /// Queued namespace and metadata changes the view shows before they are committed (new
    /// directories, removals, modes, times): `fspf_core::view::Pending`.
    pub pending: Pending,
    /// Staged versions that only appended to the version they were loaded from: rebased at
    /// commit onto what another process of the run committed meanwhile.
    pub appends: BTreeMap<EmbedPath, AppendDelta>,
    /// Changes staged for the next commit, in order.
    pub queue: Vec<Change>,
    pub staged_bytes: u64,
    /// Current directory as an embed path, and whether it differs from the kernel's cwd.
    pub cwd: EmbedPath,
    pub cwd_virtual: bool,
}

static SHIELD: OnceLock<Shield> = OnceLock::new();

/// The shield; only called from hooks after [`crate::ACTIVE`] was set, which happens after init.
pub fn get() -> &'static Shield {
    match SHIELD.get() {
        Some(s) => s,
        // ACTIVE is stored (Release) only after SHIELD.set succeeded.
        None => std::process::abort(),
    }
}

/// Where a path goes.
pub enum Route {
    /// Call the real function with the program's own arguments.
    Pass,
    /// Not-protected kernel region whose kernel path differs: call the real function on this.
    Kernel(CString, EmbedPath),
    /// Protected (or ephemeral) region: the shield serves it.
    Shield(EmbedPath),
    /// Refuse with this errno.
    Deny(c_int),
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.trim().is_empty())
}

/// Now, in nanoseconds since the epoch: every time the shield keeps is in nanoseconds.
pub fn now() -> i64 {
    fspf_core::format::metadata::now_ns()
}

/// Read up to 256 bytes at offset 0 of `fd`.
fn read_fd(fd: c_int) -> Option<Vec<u8>> {
    let mut b = vec![0u8; 256];
    // SAFETY: `b` is a valid writable buffer of its length.
    let n = unsafe { real::pread(fd, b.as_mut_ptr().cast(), b.len(), 0) };
    if n < 0 {
        return None;
    }
    b.truncate(n as usize);
    Some(b)
}

/// A new memfd holding `content`, moved to a high fd number.
fn memfd_with(name: &CStr, content: &[u8], cloexec: bool) -> c_int {
    // SAFETY: name is NUL-terminated; the returned fd is owned by us.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return -1;
    }
    // SAFETY: writing an owned buffer to our own fd.
    unsafe { real::pwrite(fd, content.as_ptr().cast(), content.len(), 0) };
    let cmd = if cloexec {
        libc::F_DUPFD_CLOEXEC
    } else {
        libc::F_DUPFD
    };
    // SAFETY: plain fcntl on our own fds.
    let high = unsafe { real::fcntl(fd, cmd, HIGH_FD as libc::c_ulong) };
    if high >= 0 {
        // SAFETY: closing the original, now duplicated, fd.
        unsafe { real::close(fd) };
        high
    } else {
        if !cloexec {
            // SAFETY: clearing FD_CLOEXEC on our own fd.
            unsafe { real::fcntl(fd, libc::F_SETFD, 0) };
        }
        fd
    }
}

/// Is `fd` a memfd created as a trust anchor (not some file that reused the fd number after an
/// unshielded process closed the anchor)?
fn is_anchor_memfd(fd: c_int) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .is_ok_and(|t| t.as_os_str().as_bytes().starts_with(b"/memfd:fspf-anchor"))
}

/// Move `fd` to the lowest free number >= HIGH_FD (closing the old one). None on failure.
fn relocate(fd: c_int, cloexec: bool) -> Option<c_int> {
    if fd >= HIGH_FD {
        return Some(fd);
    }
    let cmd = if cloexec {
        libc::F_DUPFD_CLOEXEC
    } else {
        libc::F_DUPFD
    };
    // SAFETY: duplicating our own fd.
    let n = unsafe { real::fcntl(fd, cmd, HIGH_FD as libc::c_ulong) };
    if n < 0 {
        return None;
    }
    // SAFETY: closing the old number of our own fd.
    unsafe { real::close(fd) };
    Some(n)
}

fn real_cwd() -> Option<EmbedPath> {
    std::env::current_dir()
        .ok()
        .and_then(|p| EmbedPath::from_path(&p).ok())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `FSPF_CWD` value for a child: the kernel cwd (hex) and the embed cwd it stands for, or
/// `None` when the cwd is not virtual. Without it a child of a process that did `cd /data`
/// would resolve relative names against the kernel directory (ciphertext) instead of `/data`.
pub fn cwd_for_child(inner: &Inner) -> Option<String> {
    if !inner.cwd_virtual {
        return None;
    }
    let real = std::env::current_dir().ok()?;
    Some(format!(
        "{}:{}",
        hex(real.as_os_str().as_bytes()),
        hex(inner.cwd.as_bytes())
    ))
}

/// The virtual cwd handed down by the parent, if the kernel cwd is still the one it recorded.
fn inherited_cwd() -> Option<EmbedPath> {
    let v = std::env::var("FSPF_CWD").ok()?;
    std::env::remove_var("FSPF_CWD");
    let unhex = |h: &str| -> Option<Vec<u8>> {
        (0..h.len() / 2)
            .map(|i| u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok())
            .collect()
    };
    let (real, embed) = v.split_once(':')?;
    let real = unhex(real)?;
    let now = std::env::current_dir().ok()?;
    if now.as_os_str().as_bytes() != real.as_slice() {
        return None;
    }
    EmbedPath::from_bytes(&unhex(embed)?).ok()
}

/// Load the shield from the environment. Returns false when the library should stay inert.
pub fn init() -> bool {
    let Some(fspf) = std::env::var_os("SCONE_FSPF") else {
        return false;
    };
    // Files the shield's readers keep open live at high fd numbers, out of the way of a shell's
    // `exec 3<F` / `dup2(x, 3)` and listed so that `close_range(3, ~0)` leaves them alone.
    fspf_core::volume::kernel_fs::set_fd_floor(READER_FD_FLOOR);
    // No rayon pool (it does not survive fork); large reads are verified on a second, scoped
    // thread unless FSPF_READ_THREADS=0; staged files are made durable by one syncfs per
    // commit, not one fsync each.
    let opts = VolumeOptions {
        threads: Threads {
            read_helper: std::env::var_os("FSPF_READ_THREADS").is_none_or(|v| v != "0"),
            ..Threads::FORK_SAFE
        },
        sync_each_file: false,
    };
    crate::umask::init();
    // Absolute now: the program may chdir before the shield reloads or commits.
    let fspf = std::path::absolute(PathBuf::from(&fspf)).unwrap_or_else(|_| PathBuf::from(fspf));
    let mutable = env_nonempty("SCONE_FSPF_MUTABLE").is_some_and(|v| v == "1");
    let mut problem: Option<String> = None;
    let mut key_from_fd = false;
    let key = if let Some(v) = env_nonempty("FSPF_KEY_FD") {
        key_from_fd = true;
        std::env::remove_var("FSPF_KEY_FD");
        match v.trim().parse::<c_int>() {
            Ok(fd) => {
                let bytes = read_fd(fd);
                // SAFETY: the fd was handed to us for this purpose; nobody else uses it.
                unsafe { real::close(fd) };
                match bytes.map(|b| String::from_utf8_lossy(&b).trim().to_string()) {
                    Some(hex) => match VolumeKey::from_hex(&hex) {
                        Ok(k) => Some(k),
                        Err(e) => {
                            problem = Some(format!("FSPF_KEY_FD: {e}"));
                            None
                        }
                    },
                    None => {
                        problem = Some(format!("FSPF_KEY_FD={fd}: cannot read the key"));
                        None
                    }
                }
            }
            Err(_) => {
                problem = Some(format!("FSPF_KEY_FD={v:?} is not a file descriptor"));
                None
            }
        }
    } else if let Some(k) = env_nonempty("SCONE_FSPF_KEY") {
        match VolumeKey::from_hex(k.trim()) {
            Ok(k) => Some(k),
            Err(e) => {
                problem = Some(format!("SCONE_FSPF_KEY: {e}"));
                None
            }
        }
    } else {
        None
    };
    let env_tag = match env_nonempty("SCONE_FSPF_TAG").map(|t| Tag::from_hex(t.trim())) {
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            problem.get_or_insert(format!("SCONE_FSPF_TAG: {e}"));
            None
        }
        None => None,
    };
    let mut anchor_fd = -1;
    let mut anchor_tag = None;
    if let Some(v) = env_nonempty("FSPF_ANCHOR_FD") {
        match v
            .trim()
            .parse::<c_int>()
            .ok()
            .filter(|fd| is_anchor_memfd(*fd))
            .and_then(|fd| read_fd(fd).map(|b| (fd, b)))
            .and_then(|(fd, b)| AnchorState::parse(&b).map(|st| (fd, st)))
        {
            Some((fd, st)) => {
                // Move it out of the way of shells (`exec 3>file`) and give its number back.
                anchor_fd = relocate(fd, false).unwrap_or(fd);
                if anchor_fd != fd {
                    std::env::set_var("FSPF_ANCHOR_FD", anchor_fd.to_string());
                }
                anchor_tag = Some(st);
            }
            None => {
                problem.get_or_insert(format!(
                    "FSPF_ANCHOR_FD={v}: not a readable trust anchor (16 or 32 bytes of tags)"
                ));
            }
        }
    }
    // A committer of this run killed inside its commit window leaves two trusted tags: the one
    // on disk is the one to open (either is a state the run committed).
    let trusted = match anchor_tag {
        Some(st) if st.pending.is_some() => Some(
            Volume::read_tag(&fspf)
                .ok()
                .and_then(|d| st.accepts(d))
                .unwrap_or(st.current),
        ),
        Some(st) => Some(st.current),
        None => env_tag,
    };
    // The run's frozen index, when it matches the trusted tag: nothing to parse (O(1) start).
    let mut index_fd = -1;
    let inherited = match (&problem, trusted) {
        (None, Some(t)) => crate::index_fd::inherited(&fspf, key.clone(), t),
        _ => None,
    };
    let vol = match (problem, inherited) {
        (Some(p), _) => Err(p),
        (None, Some((v, fd))) => {
            index_fd = fd;
            v.check_usable().map(|_| v).map_err(|e| e.to_string())
        }
        (None, None) => match (&key, trusted) {
            (Some(k), Some(t)) => Volume::open_cached(&fspf, k.clone(), t),
            _ => Volume::open(&fspf, key.clone(), trusted),
        }
        .and_then(|v| v.check_usable().map(|_| v))
        .map_err(|e| e.to_string()),
    };
    let vol = match vol {
        Ok(mut v) => {
            v.set_options(opts);
            if trusted.is_none() && v.is_encrypted() {
                say(format!(
                    "warning: no SCONE_FSPF_TAG: freshness of {} is not checked (trusting tag {})",
                    fspf.display(),
                    v.tag()
                ));
            }
            if anchor_fd < 0 {
                anchor_fd = memfd_with(c"fspf-anchor", &v.tag().0, false);
                std::env::set_var("FSPF_ANCHOR_FD", anchor_fd.to_string());
            }
            Some(v)
        }
        Err(e) => {
            say(format!(
                "{e}; the shield refuses every file access outside /proc, /sys and /dev (EACCES)"
            ));
            None
        }
    };
    // The key memfd for exec'd children is made when the first child needs it (most shielded
    // processes exec nothing).
    let key_fd = -1;
    let key_handoff = key.is_some() && key_from_fd;
    let (cwd, cwd_virtual) = inherited_cwd()
        .map(|c| (c, true))
        .unwrap_or_else(|| (real_cwd().unwrap_or_else(EmbedPath::root), false));
    let sh = Shield {
        opts,
        fspf,
        key,
        mutable,
        anchor: Anchor::new(
            anchor_fd,
            std::env::var_os("FSPF_TAG_FILE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        ),
        key_fd_slot: AtomicI32::new(key_fd),
        key_handoff,
        index_fd_slot: AtomicI32::new(index_fd),
        started: now(),
        inner: Mutex::new(Inner {
            vol,
            eph: BTreeMap::new(),
            live: BTreeMap::new(),
            pending: Pending::default(),
            appends: BTreeMap::new(),
            queue: Vec::new(),
            staged_bytes: 0,
            cwd,
            cwd_virtual,
        }),
        dirs_made: Mutex::new(std::collections::HashSet::new()),
        index_tag: Mutex::new(None),
    };
    SHIELD.set(sh).is_ok()
}

pub use fspf_core::view::link_target;

/// What a staged, append-only version added to the version it was loaded from.
pub struct AppendDelta {
    pub base: fspf_core::FileId,
    pub delta: Vec<u8>,
}

/// Appends larger than this are not kept for a rebase (the later committer then wins).
const APPEND_REBASE_MAX: u64 = 64 << 20;

pub use fspf_core::view::{Node, NodeKind};

/// The one place a view error becomes an errno.
pub fn errno_of(e: ViewError) -> c_int {
    match e {
        ViewError::NotFound => libc::ENOENT,
        ViewError::NotDir => libc::ENOTDIR,
        ViewError::Loop => libc::ELOOP,
    }
}

/// This process's buffers and ephemeral regions, as the view sees them.
struct Buffers<'a>(&'a Inner);

impl Frontend for Buffers<'_> {
    fn open_file(&self, ep: &EmbedPath) -> Option<OpenFile> {
        let b = self.0.live.get(ep)?;
        let b = b.lock().unwrap_or_else(|e| e.into_inner());
        Some(OpenFile {
            size: b.len(),
            mode: b.mode,
            mtime: b.mtime,
        })
    }
    fn open_below(&self, dir: &EmbedPath) -> Vec<EmbedPath> {
        below(&self.0.live, dir).map(|(k, _)| k.clone()).collect()
    }
    fn ephemeral(&self, ep: &EmbedPath) -> Option<EphemeralNode> {
        Some(match self.0.eph.get(ep)? {
            EphNode::Dir { mode, mtime } => EphemeralNode::Dir {
                mode: *mode,
                mtime: *mtime,
            },
            EphNode::File { sealed, mtime } => EphemeralNode::File {
                size: match &sealed.entry.kind {
                    FileKind::File { size, .. } => *size,
                    _ => 0,
                },
                mode: sealed.entry.mode,
                mtime: *mtime,
            },
        })
    }
    fn ephemeral_below(&self, dir: &EmbedPath) -> Vec<(EmbedPath, bool)> {
        below(&self.0.eph, dir)
            .map(|(k, n)| (k.clone(), matches!(n, EphNode::Dir { .. })))
            .collect()
    }
}

fn is_special(abs: &[u8]) -> bool {
    for p in [&b"/proc"[..], b"/sys", b"/dev"] {
        if abs.starts_with(p) && (abs.len() == p.len() || abs[p.len()] == b'/') {
            return true;
        }
    }
    false
}

/// Keys of `map` strictly below `dir` (byte-prefix scan; stops at the first key past it).
fn below<'a, V>(
    map: &'a BTreeMap<EmbedPath, V>,
    dir: &'a EmbedPath,
) -> impl Iterator<Item = (&'a EmbedPath, &'a V)> + 'a {
    map.range(dir.clone()..)
        .take_while(move |(k, _)| k.as_bytes().starts_with(dir.as_bytes()))
        .filter(move |(k, _)| *k != dir && k.starts_with(dir))
}

impl Shield {
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Route `path` (relative paths against `dirfd` or the cwd).
    pub fn route(&self, dirfd: c_int, path: *const libc::c_char) -> Route {
        if path.is_null() {
            return Route::Pass;
        }
        // SAFETY: the program passed a NUL-terminated path (non-null checked above).
        let p = unsafe { CStr::from_ptr(path) }.to_bytes();
        let inner = self.lock();
        self.route_bytes(&inner, dirfd, p)
    }

    pub fn route_bytes(&self, inner: &Inner, dirfd: c_int, p: &[u8]) -> Route {
        self.route_depth(inner, dirfd, p, 0)
    }

    /// Does `ep` (following symlinks of the last component) name something other than a
    /// directory? Used for a trailing slash, which only a directory accepts.
    fn names_non_dir(&self, inner: &Inner, ep: &EmbedPath, depth: u32) -> Option<c_int> {
        match self.lookup(inner, ep) {
            Ok(n) => match n.kind {
                NodeKind::Dir => None,
                NodeKind::File => Some(libc::ENOTDIR),
                NodeKind::Symlink(t) if depth < MAX_SYMLINKS => {
                    let target = link_target(ep, &t);
                    match self.route_depth(inner, libc::AT_FDCWD, &target, depth + 1) {
                        Route::Shield(e2) => self.names_non_dir(inner, &e2, depth + 1),
                        Route::Deny(e) => Some(e),
                        _ => None,
                    }
                }
                NodeKind::Symlink(_) => Some(libc::ELOOP),
            },
            Err(_) => None,
        }
    }

    fn route_depth(&self, inner: &Inner, dirfd: c_int, p: &[u8], depth: u32) -> Route {
        if p.is_empty() {
            return Route::Pass;
        }
        let absolute = p[0] == b'/';
        let (abs, base_real) = if absolute {
            (p.to_vec(), true)
        } else {
            let (base, real_base) = if dirfd == libc::AT_FDCWD {
                (inner.cwd.as_bytes().to_vec(), !inner.cwd_virtual)
            } else if let Some(ep) = files::dir_path(dirfd) {
                (ep.as_bytes().to_vec(), false)
            } else if let Some(ep) = files::translated_path(dirfd) {
                (ep.as_bytes().to_vec(), false)
            } else {
                match std::fs::read_link(format!("/proc/self/fd/{dirfd}")) {
                    Ok(t) => (t.as_os_str().as_bytes().to_vec(), true),
                    Err(_) => return Route::Pass,
                }
            };
            let mut v = base;
            v.push(b'/');
            v.extend_from_slice(p);
            (v, real_base)
        };
        if is_special(&abs) {
            return if absolute || base_real {
                Route::Pass
            } else {
                match (CString::new(abs.clone()), EmbedPath::from_bytes(&abs)) {
                    (Ok(c), Ok(ep)) => Route::Kernel(c, ep),
                    _ => Route::Pass,
                }
            };
        }
        let Ok(ep) = EmbedPath::from_bytes(&abs) else {
            return Route::Pass;
        };
        let Some(vol) = inner.vol.as_ref() else {
            return Route::Deny(libc::EACCES);
        };
        let Some(region) = vol.region_for(&ep) else {
            return Route::Pass;
        };
        match (&region.kind, region.protection) {
            (RegionKind::Kernel(k), Protection::NotProtected) => {
                let identity = k.as_os_str().as_bytes() == region.embed_point.as_bytes();
                // `..` is resolved lexically in embed paths (`/data/..` is `/` even when `/data`
                // exists only in the fspf), so such paths go to the kernel normalised.
                let dotdot = abs.windows(2).any(|w| w == b"..");
                if identity && base_real && !dotdot {
                    return Route::Pass;
                }
                match ep.kernel_path(region) {
                    Some(kp) => match CString::new(kp.into_os_string().into_vec()) {
                        Ok(c) => Route::Kernel(c, ep),
                        Err(_) => Route::Deny(libc::EINVAL),
                    },
                    None => Route::Deny(libc::EACCES),
                }
            }
            _ => {
                let fe = Buffers(inner);
                let view = View {
                    vol,
                    pending: &inner.pending,
                    frontend: &fe,
                };
                match view.dir_link(region, &ep).map(|r| r.map_err(errno_of)) {
                    Some(Ok(_)) if depth >= MAX_SYMLINKS => return Route::Deny(libc::ELOOP),
                    Some(Ok(next)) => {
                        return match self.route_depth(inner, libc::AT_FDCWD, &next, depth + 1) {
                            // The program's own path is not the one to use any more.
                            Route::Pass => {
                                match (CString::new(next.clone()), EmbedPath::from_bytes(&next)) {
                                    (Ok(c), Ok(e)) => Route::Kernel(c, e),
                                    _ => Route::Deny(libc::EINVAL),
                                }
                            }
                            r => r,
                        };
                    }
                    Some(Err(e)) => return Route::Deny(e),
                    None => {}
                }
                if p.len() > 1 && p.ends_with(b"/") {
                    if let Some(e) = self.names_non_dir(inner, &ep, depth) {
                        return Route::Deny(e);
                    }
                }
                Route::Shield(ep)
            }
        }
    }

    /// The region `ep` lies in.
    pub fn region_of<'a>(&self, inner: &'a Inner, ep: &EmbedPath) -> Option<&'a Region> {
        inner.vol.as_ref()?.region_for(ep)
    }

    /// If the anchor moved (another process of this run committed), reload the fspf requiring
    /// exactly the anchor's tag. Errors mean the fspf on disk is not the one the run trusts.
    pub fn refresh(&self, inner: &mut Inner) -> Result<(), c_int> {
        let Some(vol) = inner.vol.as_ref() else {
            return Err(libc::EACCES);
        };
        // Fail closed: without a readable anchor nothing on disk can be trusted.
        let Some(anchor) = self.anchor.read() else {
            log("the run's trust anchor is unreadable");
            return Err(libc::EACCES);
        };
        if anchor.current == vol.tag() && anchor.pending.is_none() {
            return Ok(());
        }
        let reopen = |t: Tag| Volume::open_with(&self.fspf, self.key.clone(), Some(t), self.opts);
        let v = match reopen(anchor.current) {
            Ok(v) if anchor.pending.is_none() => v,
            _ => {
                // A commit in flight, or a committer that died inside its commit window: decide
                // under the run's commit lock which of the anchor's tags is on disk.
                let _l = self.anchor.lock()?;
                self.settle_anchor()?;
                let a = self.anchor.read().ok_or(libc::EACCES)?;
                reopen(a.current).map_err(|e| {
                    log(format!("refusing the fspf on disk: {e}"));
                    libc::EACCES
                })?
            }
        };
        inner.vol = Some(v);
        Ok(())
    }

    pub fn anchor_fd(&self) -> c_int {
        self.anchor.fd()
    }

    /// Under the anchor lock: if a committer died after announcing a tag and that tag is now on
    /// disk (it passed the commit point), make it the current one. Err when the disk holds
    /// neither trusted tag (a rollback or a forgery).
    fn settle_anchor(&self) -> Result<Tag, c_int> {
        let st = self.anchor.read().ok_or(libc::EACCES)?;
        let disk = Volume::read_tag(&self.fspf).map_err(|e| {
            log(format!("cannot read the fspf's tag: {e}"));
            libc::EACCES
        })?;
        let Some(t) = st.accepts(disk) else {
            log(format!(
                "the fspf on disk (tag {disk}) is not the one this run trusts ({})",
                st.current
            ));
            return Err(libc::EACCES);
        };
        if st.pending.is_some() || t != st.current {
            self.anchor.publish(t)?;
        }
        Ok(t)
    }

    pub fn key_fd(&self) -> c_int {
        self.key_fd_slot.load(Ordering::Relaxed)
    }

    /// The key memfd to hand to an exec'd child (made on first use); -1 when the key is not
    /// handed on that way.
    pub fn key_fd_for_child(&self) -> c_int {
        let cur = self.key_fd();
        if cur >= 0 || !self.key_handoff {
            return cur;
        }
        let Some(k) = self.key.as_ref() else {
            return -1;
        };
        let fd = memfd_with(c"fspf-key", k.to_hex().as_bytes(), true);
        self.key_fd_slot.store(fd, Ordering::Relaxed);
        fd
    }

    pub fn index_fd(&self) -> c_int {
        self.index_fd_slot.load(Ordering::Relaxed)
    }

    /// The index fd to hand to a child about to be exec'd: the inherited one while the volume
    /// is still the state it describes, else a new one built from this process's volume (O(n),
    /// once per commit that a child follows). -1 when there is no usable volume.
    pub fn index_fd_for_child(&self, inner: &Inner) -> c_int {
        let Some(vol) = inner.vol.as_ref() else {
            return -1;
        };
        let cur = self.index_fd();
        if cur >= 0 && vol.is_indexed() {
            return cur;
        }
        if cur >= 0
            && self
                .index_tag
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                == Some(&vol.tag())
        {
            return cur;
        }
        let fd = crate::index_fd::create(vol);
        if fd >= 0 {
            if cur >= 0 {
                // SAFETY: closing our own previous index memfd.
                unsafe { real::close(cur) };
            }
            self.index_fd_slot.store(fd, Ordering::Relaxed);
            *self.index_tag.lock().unwrap_or_else(|e| e.into_inner()) = Some(vol.tag());
            std::env::set_var("FSPF_INDEX_FD", fd.to_string());
        }
        fd
    }

    /// Before the program dup2()s onto `target`: if that is one of the shield's own fds, move
    /// ours elsewhere first (a shell's `exec 3>file` must not replace the trust anchor).
    pub fn protect_own_fd(&self, target: c_int) {
        if target < 0 {
            return;
        }
        if target == self.anchor_fd() {
            // No commit of this process may hold the anchor's record lock while its old number
            // is closed (closing any fd of the memfd drops the process's locks on it).
            let _inner = self.lock();
            // SAFETY: duplicating our own anchor fd.
            let n = unsafe { real::fcntl(target, libc::F_DUPFD, (target + 1) as libc::c_ulong) };
            if n >= 0 {
                self.anchor.set_fd(n);
                if std::env::var_os("FSPF_ANCHOR_FD").is_some() {
                    std::env::set_var("FSPF_ANCHOR_FD", n.to_string());
                }
            }
        }
        if target == self.index_fd() {
            // SAFETY: duplicating our own index fd (inheritable, like the anchor).
            let n = unsafe { real::fcntl(target, libc::F_DUPFD, (target + 1) as libc::c_ulong) };
            if n >= 0 {
                self.index_fd_slot.store(n, Ordering::Relaxed);
                std::env::set_var("FSPF_INDEX_FD", n.to_string());
            }
        }
        if target == self.key_fd() {
            // SAFETY: duplicating our own key fd.
            let n = unsafe {
                real::fcntl(target, libc::F_DUPFD_CLOEXEC, (target + 1) as libc::c_ulong)
            };
            if n >= 0 {
                self.key_fd_slot.store(n, Ordering::Relaxed);
            }
        }
    }

    /// `utimensat`/`futimens` of `ep` (symlinks already followed): the modification time is
    /// recorded like a mode (`Shield::chmod`); access times are not kept.
    pub fn set_mtime(&self, inner: &mut Inner, ep: &EmbedPath, ns: i64) -> Result<(), c_int> {
        let node = self.lookup(inner, ep)?;
        if matches!(node.kind, NodeKind::Symlink(_)) {
            return Ok(());
        }
        if self.is_ephemeral(inner, ep) {
            match inner.eph.get_mut(ep) {
                Some(EphNode::Dir { mtime, .. }) => *mtime = ns,
                Some(EphNode::File { sealed, mtime }) => {
                    *mtime = ns;
                    sealed.entry.mtime_ns = ns;
                }
                None => {}
            }
            return Ok(());
        }
        self.check_writable(inner, ep)?;
        if let Some(b) = inner.live.get(ep) {
            let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
            g.mtime = ns;
            g.mtime_set = true;
        }
        let mut staged = false;
        for c in inner.queue.iter_mut().rev() {
            match c {
                Change::Put(s) if &s.path == ep => {
                    s.entry.mtime_ns = ns;
                    staged = true;
                    break;
                }
                Change::PutEntry(p, e) if p == ep => {
                    e.mtime_ns = ns;
                    staged = true;
                    break;
                }
                _ => {}
            }
        }
        if !staged && !inner.live.contains_key(ep) {
            let vol = inner.vol.as_ref().ok_or(libc::EACCES)?;
            let mut e = match vol.lookup(ep) {
                Some(e) => e.into_owned(),
                None => fspf_core::FileEntry {
                    kind: FileKind::Dir,
                    mode: node.mode,
                    mtime_ns: ns,
                },
            };
            if let Some(m) = inner.pending.modes.get(ep) {
                e.mode = *m;
            }
            e.mtime_ns = ns;
            inner.queue.push(Change::PutEntry(ep.clone(), e));
        }
        inner.pending.times.insert(ep.clone(), ns);
        Ok(())
    }

    /// `chmod` of `ep` (symlinks already followed): ephemeral nodes change at once; in kernel
    /// regions the new mode is queued as an entry (or set on the staged version or the open
    /// buffer) and committed at the next commit point like a write.
    pub fn chmod(&self, inner: &mut Inner, ep: &EmbedPath, mode: u32) -> Result<(), c_int> {
        let mode = mode & 0o7777;
        let node = self.lookup(inner, ep)?;
        if matches!(node.kind, NodeKind::Symlink(_)) {
            return Err(libc::EOPNOTSUPP);
        }
        if self.is_ephemeral(inner, ep) {
            match inner.eph.get_mut(ep) {
                Some(EphNode::Dir { mode: m, .. }) => *m = mode,
                Some(EphNode::File { sealed, .. }) => sealed.entry.mode = mode,
                None => return Err(libc::EPERM),
            }
            return Ok(());
        }
        self.check_writable(inner, ep)?;
        if let Some(b) = inner.live.get(ep) {
            b.lock().unwrap_or_else(|e| e.into_inner()).mode = mode;
        }
        let mut staged = false;
        for c in inner.queue.iter_mut().rev() {
            match c {
                Change::Put(s) if &s.path == ep => {
                    s.entry.mode = mode;
                    staged = true;
                    break;
                }
                Change::PutEntry(p, e) if p == ep => {
                    e.mode = mode;
                    staged = true;
                    break;
                }
                _ => {}
            }
        }
        if let Some(m) = inner.pending.new_dirs.get_mut(ep) {
            *m = mode;
        }
        if !staged && !inner.live.contains_key(ep) {
            let vol = inner.vol.as_ref().ok_or(libc::EACCES)?;
            let Some(e) = vol.lookup(ep) else {
                // An implied directory (only paths below it are listed): record it.
                inner.queue.push(Change::PutEntry(
                    ep.clone(),
                    fspf_core::FileEntry {
                        kind: FileKind::Dir,
                        mode,
                        mtime_ns: now(),
                    },
                ));
                inner.pending.modes.insert(ep.clone(), mode);
                return Ok(());
            };
            let mut e = e.into_owned();
            e.mode = mode;
            inner.queue.push(Change::PutEntry(ep.clone(), e));
        }
        inner.pending.modes.insert(ep.clone(), mode);
        Ok(())
    }

    /// What is at `ep` in the shielded view (`fspf_core::view`, which decides it).
    pub fn lookup(&self, inner: &Inner, ep: &EmbedPath) -> Result<Node, c_int> {
        let vol = inner.vol.as_ref().ok_or(libc::EACCES)?;
        let fe = Buffers(inner);
        let view = View {
            vol,
            pending: &inner.pending,
            frontend: &fe,
        };
        view.lookup(ep).map_err(errno_of)
    }

    /// Entries of directory `ep` (name, d_type), sorted by name, without `.`/`..`.
    pub fn children(&self, inner: &Inner, ep: &EmbedPath) -> Vec<(Vec<u8>, u8)> {
        let Some(vol) = inner.vol.as_ref() else {
            return Vec::new();
        };
        let fe = Buffers(inner);
        let view = View {
            vol,
            pending: &inner.pending,
            frontend: &fe,
        };
        view.children(ep)
            .into_iter()
            .map(|(n, k)| {
                let t = match k {
                    ChildKind::Dir => libc::DT_DIR,
                    ChildKind::File => libc::DT_REG,
                    ChildKind::Symlink => libc::DT_LNK,
                };
                (n, t)
            })
            .collect()
    }

    pub fn is_ephemeral(&self, inner: &Inner, ep: &EmbedPath) -> bool {
        self.region_of(inner, ep)
            .is_some_and(|r| r.kind == RegionKind::Ephemeral)
    }

    /// May the program change `ep`? Ephemeral regions always; kernel regions in mutable mode.
    pub fn check_writable(&self, inner: &Inner, ep: &EmbedPath) -> Result<(), c_int> {
        if self.is_ephemeral(inner, ep) || self.mutable {
            Ok(())
        } else {
            log(format!(
                "{ep}: protected region is read-only (set SCONE_FSPF_MUTABLE=1 to allow updates)"
            ));
            Err(libc::EROFS)
        }
    }

    /// Seal a buffer whose content changed: into memory for ephemeral regions, as a staged
    /// version otherwise.
    pub fn finish(&self, inner: &mut Inner, b: &mut WriteBuf) -> Result<(), c_int> {
        if !b.needs_seal() {
            return Ok(());
        }
        let vol = inner.vol.as_ref().ok_or(libc::EACCES)?;
        let region = vol.region_for(&b.path).ok_or(libc::EACCES)?.clone();
        let len = b.len();
        if region.kind != RegionKind::Ephemeral && len > files::HASH_MAX {
            // Large kernel file: seal straight from the memfd (no copy of the whole file).
            let print = b.fingerprint()?;
            let mut staged = self.stage(vol, &region, &b.path, print.0, b.mode, || b.reader())?;
            Self::stamp(b, &mut staged);
            Self::note_appends(inner, b);
            inner.staged_bytes += print.0;
            inner.queue.push(Change::Put(staged));
            b.mark_sealed_print(print);
            b.pending = true;
            return Ok(());
        }
        let data = b.contents()?;
        if region.kind == RegionKind::Ephemeral {
            let sealed = memory::seal_in_memory(self.opts.threads, &region, &b.path, b.mode, &data)
                .map_err(|e| {
                    log(format!("{}: {e}", b.path));
                    libc::EIO
                })?;
            inner.eph.insert(
                b.path.clone(),
                EphNode::File {
                    sealed,
                    mtime: b.mtime,
                },
            );
            b.mark_sealed(&data);
            return Ok(());
        }
        let mut staged =
            self.stage(
                vol,
                &region,
                &b.path,
                data.len() as u64,
                b.mode,
                || &data[..],
            )?;
        Self::stamp(b, &mut staged);
        Self::note_appends(inner, b);
        inner.staged_bytes += data.len() as u64;
        inner.queue.push(Change::Put(staged));
        b.mark_sealed(&data);
        b.pending = true;
        Ok(())
    }

    /// Before a `fork`, `exec` or `posix_spawn`: the children inherit the buffers' memfds, so
    /// their appends can no longer be told from this process's own.
    pub fn share_buffers(inner: &Inner) {
        for b in inner.live.values() {
            let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
            g.shared = true;
            g.base = None;
            g.append_only
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Remember what an append-only buffer added (for a rebase at commit), or forget it.
    fn note_appends(inner: &mut Inner, b: &WriteBuf) {
        let len = b.len();
        match b.base {
            Some((id, base_len))
                if !b.shared
                    && b.append_only.load(std::sync::atomic::Ordering::Relaxed)
                    && len >= base_len
                    && len - base_len <= APPEND_REBASE_MAX =>
            {
                let mut delta = vec![0u8; (len - base_len) as usize];
                let mut off = 0usize;
                while off < delta.len() {
                    match b.read_at(&mut delta[off..], base_len + off as u64) {
                        Ok(0) | Err(_) => {
                            inner.appends.remove(&b.path);
                            return;
                        }
                        Ok(n) => off += n,
                    }
                }
                inner
                    .appends
                    .insert(b.path.clone(), AppendDelta { base: id, delta });
            }
            _ => {
                inner.appends.remove(&b.path);
            }
        }
    }

    /// Under the commit locks, with `vol` at the run's current state: a queued append-only
    /// version whose base another process replaced is re-staged as that version plus the
    /// appended bytes (both writers' appends survive). Returns the merged contents by path.
    fn rebase_appends(
        &self,
        vol: &Volume,
        changes: &mut [Change],
        appends: &BTreeMap<EmbedPath, AppendDelta>,
    ) -> BTreeMap<EmbedPath, Vec<u8>> {
        let mut merged = BTreeMap::new();
        for c in changes.iter_mut() {
            let Change::Put(s) = c else { continue };
            let Some(d) = appends.get(&s.path) else {
                continue;
            };
            let cur = match vol.lookup(&s.path).map(|e| e.into_owned().kind) {
                Some(FileKind::File { id, .. }) if id != d.base => id,
                _ => continue,
            };
            let Ok(mut r) = vol.open_file(&s.path) else {
                continue;
            };
            let mut data = vec![0u8; r.size() as usize];
            let mut off = 0usize;
            let mut ok = true;
            while off < data.len() {
                match r.read_at(&mut data[off..], off as u64) {
                    Ok(0) | Err(_) => {
                        ok = false;
                        break;
                    }
                    Ok(n) => off += n,
                }
            }
            if !ok {
                continue;
            }
            data.extend_from_slice(&d.delta);
            let Some(region) = vol.region_for(&s.path).cloned() else {
                continue;
            };
            let mode = s.entry.mode;
            if let Ok(mut new) =
                self.stage(vol, &region, &s.path, data.len() as u64, mode, || &data[..])
            {
                log(format!(
                    "{}: appended {} bytes onto the version another process committed ({})",
                    s.path,
                    d.delta.len(),
                    cur.to_hex()
                ));
                new.entry.mtime_ns = s.entry.mtime_ns;
                let old = std::mem::replace(s, new);
                old.discard(vol.path());
                merged.insert(s.path.clone(), data);
            }
        }
        merged
    }

    /// The modification time a staged version records: the one `futimens`/`utimensat` set on
    /// its buffer, else now (the buffer keeps it for `stat`).
    fn stamp(b: &mut WriteBuf, staged: &mut fspf_core::volume::StagedFile) {
        if b.mtime_set {
            staged.entry.mtime_ns = b.mtime;
        } else {
            b.mtime = staged.entry.mtime_ns;
        }
    }

    /// Make sure the kernel directory of `path` exists (once per directory and process: a
    /// stat and a failing mkdir per staged file otherwise).
    fn ensure_parent(&self, region: &Region, path: &EmbedPath) {
        let Some(kp) = KernelPath::of(region, path) else {
            return;
        };
        let Some(parent) = kp.rel().parent() else {
            return;
        };
        let full = kp.base().join(parent);
        let mut known = self.dirs_made.lock().unwrap_or_else(|e| e.into_inner());
        if known.contains(&full) {
            return;
        }
        // No symlink below the region's directory is followed: a directory the attacker
        // replaced by a link to elsewhere makes this fail (ELOOP), it creates nothing there.
        if kernel_fs::create_dirs_beneath(kp.base(), parent, 0o755).is_ok() {
            known.insert(full);
        }
    }

    /// `Volume::stage_file` in a kernel directory made if needed; when it fails (the directory
    /// may have been removed since it was made), once more after making the directory again.
    fn stage<R: std::io::Read>(
        &self,
        vol: &Volume,
        region: &Region,
        path: &EmbedPath,
        size: u64,
        mode: u32,
        src: impl Fn() -> R,
    ) -> Result<fspf_core::volume::StagedFile, c_int> {
        self.ensure_parent(region, path);
        let r = vol.stage_file(path, size, mode, &mut src()).or_else(|_| {
            self.dirs_made
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            self.ensure_parent(region, path);
            vol.stage_file(path, size, mode, &mut src())
        });
        r.map_err(|e| {
            log(format!("{path}: staging failed: {e}"));
            // A full disk or quota is the program's to see (ENOSPC), not an integrity failure.
            match e.raw_os_error() {
                Some(n @ (libc::ENOSPC | libc::EDQUOT | libc::EFBIG)) => n,
                _ => libc::EIO,
            }
        })
    }

    /// Called when the last writer of `buf` closed it.
    pub fn last_writer_closed(&self, buf: &Arc<Mutex<WriteBuf>>) -> Result<(), c_int> {
        let mut inner = self.lock();
        let mut b = buf.lock().unwrap_or_else(|e| e.into_inner());
        if b.writers > 0 {
            return Ok(());
        }
        let r = self.finish(&mut inner, &mut b);
        let eph = self.is_ephemeral(&inner, &b.path);
        let path = b.path.clone();
        let clean = !b.pending && !b.touched.load(std::sync::atomic::Ordering::Relaxed);
        drop(b);
        // Ephemeral files now live sealed in the tree; a clean kernel buffer nobody holds may
        // go stale (another process of the run may commit the path): drop both from `live`.
        if eph || (clean && Arc::strong_count(buf) <= 2) {
            if inner.live.get(&path).is_some_and(|x| Arc::ptr_eq(x, buf)) {
                inner.live.remove(&path);
            }
        } else if inner.queue.len() >= commit_every_files()
            || inner.staged_bytes >= COMMIT_EVERY_BYTES
        {
            self.commit(&mut inner)?;
        }
        r
    }

    /// Stage every dirty kernel buffer and commit the queue (fsync, fork/exec, exit, batches).
    ///
    /// Protocol: one syncfs per kernel region touched (shadows durable), then under the fspf
    /// lock: read the anchor, commit merging onto the fspf only if its tag is the anchor's,
    /// publish the new tag in the anchor.
    pub fn commit(&self, inner: &mut Inner) -> Result<(), c_int> {
        let bufs: Vec<_> = inner.live.values().cloned().collect();
        let mut res = Ok(());
        for b in bufs {
            let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
            if !self.is_ephemeral(inner, &g.path) {
                if let Err(e) = self.finish(inner, &mut g) {
                    res = Err(e);
                }
            }
        }
        if inner.queue.is_empty() {
            return res;
        }
        let mut changes = std::mem::take(&mut inner.queue);
        let appends = std::mem::take(&mut inner.appends);
        inner.staged_bytes = 0;
        let Some(vol) = inner.vol.as_mut() else {
            return Err(libc::EACCES);
        };
        // Kernel side of queued removals: files move to their shadow names now (crash-safe,
        // `fspf_core::volume::moves`), directories are removed once the commit is durable.
        let mut preps = Vec::new();
        let mut gone_dirs: Vec<(EmbedPath, KernelPath)> = Vec::new();
        for c in &changes {
            if let Change::Remove(p) = c {
                if inner.pending.removed.get(p) == Some(&true) {
                    if let Some(k) = vol.region_for(p).and_then(|r| KernelPath::of(r, p)) {
                        gone_dirs.push((p.clone(), k));
                    }
                } else if let Ok(Some(m)) = vol.prepare_remove(p) {
                    preps.push(m);
                }
            }
        }
        let abort = |preps: Vec<fspf_core::volume::PreparedMove>| {
            for m in preps.into_iter().rev() {
                m.abort();
            }
        };
        let mut roots: BTreeSet<PathBuf> = BTreeSet::new();
        for c in &changes {
            let p = match c {
                Change::Put(s) => Some(&s.path),
                // Removals and renames of files moved the kernel file to a shadow name before
                // this commit: that rename must be durable before the fspf names the new state.
                Change::Remove(p) | Change::Rename { from: p, .. } => Some(p),
                Change::PutEntry(..) => None,
            };
            if let Some(p) = p {
                if let Some(r) = vol.region_for(p) {
                    if let RegionKind::Kernel(k) = &r.kind {
                        roots.insert(k.clone());
                    }
                }
            }
        }
        for r in roots {
            if let Ok(f) = std::fs::File::open(&r) {
                use std::os::fd::AsRawFd;
                // SAFETY: syncfs on an fd we own for the duration of the call.
                unsafe { real::syncfs(f.as_raw_fd()) };
            }
        }
        // The run's committers serialise on the anchor's lock (storage cannot remove it); the
        // fspf's lock file still keeps out other runs and the CLI.
        let alock = match self.anchor.lock() {
            Ok(l) => l,
            Err(e) => {
                abort(preps);
                cleanup_staged(&changes);
                say("commit failed, changes lost: the run's trust anchor cannot be locked");
                return Err(e);
            }
        };
        let trusted = match self.settle_anchor() {
            Ok(t) => t,
            Err(e) => {
                abort(preps);
                cleanup_staged(&changes);
                say("commit failed, changes lost: the fspf on disk is not the one this run trusts");
                return Err(e);
            }
        };
        let lock = match Volume::lock(&self.fspf) {
            Ok(l) => l,
            Err(e) => {
                abort(preps);
                cleanup_staged(&changes);
                say(format!("commit failed, changes lost: {e}"));
                return Err(libc::EIO);
            }
        };
        // Appends onto a file another process of the run changed since this one loaded it:
        // look at the run's current state and rebase them onto it.
        let mut merged = BTreeMap::new();
        if !appends.is_empty() {
            if vol.tag() != trusted {
                let opened =
                    Volume::open_with(&self.fspf, self.key.clone(), Some(trusted), self.opts);
                if let Ok(v) = opened {
                    *vol = v;
                }
            }
            merged = self.rebase_appends(vol, &mut changes, &appends);
        }
        let committed: Vec<(EmbedPath, fspf_core::FileId, u64)> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Put(s) => match &s.entry.kind {
                    FileKind::File { id, size, .. } => Some((s.path.clone(), *id, *size)),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        let anchor = &self.anchor;
        let mut announce = |next: Tag| {
            anchor
                .announce(trusted, next)
                .map_err(|e| fspf_core::Error::io(&self.fspf, std::io::Error::from_raw_os_error(e)))
        };
        let r = vol.commit_announced(changes, Some(trusted), &mut announce);
        match r {
            Ok(t) => {
                crash_point_for_tests();
                if let Err(e) = self.anchor.publish(t) {
                    // The new fspf is committed and announced: a later settle promotes it.
                    say(format!("cannot publish the new tag (errno {e})"));
                }
            }
            Err(e) => {
                // If the error came after the commit point (the directory fsync), the announced
                // tag is on disk and the next settle promotes it; otherwise it never appears.
                drop(lock);
                drop(alock);
                abort(preps);
                say(format!("commit failed, changes lost: {e}"));
                return Err(match e.raw_os_error() {
                    Some(n @ (libc::ENOSPC | libc::EDQUOT)) => n,
                    _ => libc::EIO,
                });
            }
        }
        drop(lock);
        drop(alock);
        for m in preps {
            m.finish();
        }
        // Deepest first: a directory's subdirectories go before it. One made again in the same
        // batch (`rm -r d; mkdir d`) is listed once more and stays.
        gone_dirs.sort_by_key(|(_, k)| std::cmp::Reverse(k.rel().as_os_str().len()));
        for (p, k) in gone_dirs {
            let again = inner
                .vol
                .as_ref()
                .is_some_and(|v| v.lookup(&p).is_some() || v.has_below(&p));
            if !again {
                let _ = kernel_fs::remove_unlisted_dir(k.base(), k.rel());
            }
        }
        // Buffers still open go on from what was committed: a rebased one takes the merged
        // contents, and each records its committed version as its new base.
        for (path, id, size) in committed {
            let Some(b) = inner.live.get(&path).cloned() else {
                continue;
            };
            let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(data) = merged.remove(&path) {
                if g.set_len(0).is_err() || g.write_all_at(&data, 0).is_err() {
                    continue;
                }
                let c = data;
                g.mark_sealed(&c);
            }
            if !g.shared {
                g.base = Some((id, size));
                g.append_only
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        inner.pending.clear();
        for b in inner.live.values() {
            b.lock().unwrap_or_else(|e| e.into_inner()).pending = false;
        }
        inner.live.retain(|_, b| Arc::strong_count(b) > 1);
        res
    }

    /// Commit a namespace change right away (after everything queued before it), then apply
    /// its kernel side effect.
    pub fn commit_now(
        &self,
        inner: &mut Inner,
        change: Change,
        kernel_effect: impl FnOnce(),
    ) -> Result<(), c_int> {
        inner.queue.push(change);
        self.commit(inner)?;
        kernel_effect();
        Ok(())
    }
}

/// Remove the shadows of changes that will not be committed.
fn cleanup_staged(changes: &[Change]) {
    for c in changes {
        if let Change::Put(s) = c {
            let _ = std::fs::remove_file(&s.shadow);
            if let Some(o) = &s.outboard {
                let _ = std::fs::remove_file(o);
            }
        }
    }
}

/// Fault injection for the crash tests: `FSPF_TEST_CRASH=after-commit-point` kills this
/// process with SIGKILL right after the new fspf replaced the old one and before the anchor
/// and tag file name it, the window in which a crash used to leave the run's tag stale.
fn crash_point_for_tests() {
    if std::env::var_os("FSPF_TEST_CRASH").is_some_and(|v| v == "after-commit-point") {
        // SAFETY: killing this process; nothing after this runs.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// At exit: finish every open writer (exit closes its fds) and commit. False if that failed.
pub fn at_exit() -> bool {
    let Some(sh) = SHIELD.get() else { return true };
    let handles = files::all_handles();
    for h in handles {
        let buf = {
            let f = h.lock().unwrap_or_else(|e| e.into_inner());
            match (&f.body, f.write) {
                (files::Body::Buf(b), true) => Some(b.clone()),
                _ => None,
            }
        };
        if let Some(b) = buf {
            let mut inner = sh.lock();
            let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
            let _ = sh.finish(&mut inner, &mut g);
        }
    }
    let mut inner = sh.lock();
    if let Err(e) = sh.commit(&mut inner) {
        say(format!(
            "final commit failed (errno {e}): this process's changes are lost"
        ));
        return false;
    }
    true
}

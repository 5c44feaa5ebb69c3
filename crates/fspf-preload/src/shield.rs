//! Shield state: the volume and the run's trust anchor, path routing (embed path → region), the
//! node view (fspf + this process's uncommitted changes + ephemeral regions) and the commit
//! protocol. One mutex ([`Inner`]) guards it; file contents live in `files`.
use crate::anchor::{Anchor, AnchorState};
use crate::files::{self, WriteBuf};
use crate::{log, real, say};
use fspf_core::codec::{HelperRef, Threads};
use fspf_core::format::metadata::{Protection, Region, RegionKind};
use fspf_core::format::view::ChildKind;
use fspf_core::session::{
    below, AppendDelta, OpenFiles, Session, SessionConfig, VersionMeta, APPEND_REBASE_MAX,
};
use fspf_core::view::{OpenFile, ViewError};
use fspf_core::{EmbedPath, Tag, Volume, VolumeKey, VolumeOptions};
use libc::c_int;
use std::collections::BTreeMap;
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
    /// The run's trust anchor (an inherited memfd) and its commit lock; the session holds it too.
    anchor: Arc<Anchor>,
    /// Private CLOEXEC memfd with the hex key, handed to exec'd children (FSPF_KEY_FD); or -1.
    key_fd_slot: AtomicI32,
    /// The key came in a memfd (`FSPF_KEY_FD`) and goes to exec'd children the same way.
    key_handoff: bool,
    /// Sealed memfd with the frozen index of the state this process last handed to children
    /// (`FSPF_INDEX_FD`); -1 when none. Rebuilt for children after a commit moved the tag.
    index_fd_slot: AtomicI32,
    /// When the shield started (ns since the epoch).
    pub started: i64,
    inner: Mutex<Inner>,
    /// The tag the index in `index_fd_slot` was built from (when this process built it).
    index_tag: Mutex<Option<Tag>>,
}

pub struct Inner {
    /// The volume, the queue of uncommitted changes, their overlay and the ephemeral regions,
    /// with the rules that apply to them (`fspf_core::session`). Its volume is `None` when the
    /// fspf could not be opened or authenticated (fail-safe: refuse everything).
    pub s: Session<Arc<Anchor>>,
    /// Plaintext of files open for writing, and of kernel files staged but not yet committed.
    /// Sorted, so "is anything live below this directory" is a range query, not a scan.
    pub live: BTreeMap<EmbedPath, Arc<Mutex<WriteBuf>>>,
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
    // No rayon pool (it does not survive fork); large reads are verified with the process's
    // read helper thread (`helper.rs`) unless FSPF_READ_THREADS=0; staged files are made
    // durable by one syncfs per commit, not one fsync each.
    let opts = VolumeOptions {
        threads: Threads {
            read_helper: std::env::var_os("FSPF_READ_THREADS").is_none_or(|v| v != "0"),
            helper: Some(HelperRef(&crate::helper::READ_HELPER)),
            ..Threads::FORK_SAFE
        },
        sync_each_file: false,
        log: true,
        log_journals: 0,
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
    let mut index_fd = -1;
    let open = |trusted: Option<Tag>, index_fd: &mut c_int| {
        // The run's frozen index, when it matches the trusted tag: nothing to parse (O(1) start).
        let inherited = match (&problem, trusted) {
            (None, Some(t)) => crate::index_fd::inherited(&fspf, key.clone(), t),
            _ => None,
        };
        match (&problem, inherited) {
            (Some(p), _) => Err(p.clone()),
            (None, Some((v, fd))) => {
                *index_fd = fd;
                v.check_usable().map(|_| v).map_err(|e| e.to_string())
            }
            (None, None) => match (&key, trusted) {
                (Some(k), Some(t)) => Volume::open_cached(&fspf, k.clone(), t),
                _ => Volume::open(&fspf, key.clone(), trusted),
            }
            .and_then(|v| v.check_usable().map(|_| v))
            .map_err(|e| e.to_string()),
        }
    };
    let (vol, trusted) = match anchor_tag {
        Some(st) => {
            let (vol, t) = fspf_core::session::join_run(
                st,
                || read_fd(anchor_fd).and_then(|b| AnchorState::parse(&b)),
                || Volume::read_tag(&fspf).ok(),
                |t| open(Some(t), &mut index_fd),
            );
            (vol, Some(t))
        }
        None => (open(env_tag, &mut index_fd), env_tag),
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
    let anchor = Arc::new(Anchor::new(
        anchor_fd,
        std::env::var_os("FSPF_TAG_FILE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from),
    ));
    let mut cfg = SessionConfig::new(fspf.clone(), key.clone(), opts);
    cfg.mutable = mutable;
    cfg.batch_files = commit_every_files();
    cfg.batch_bytes = COMMIT_EVERY_BYTES;
    cfg.say = |m| say(m);
    cfg.log = |m| log(m);
    let session = Session::new(cfg, anchor.clone(), vol);
    let sh = Shield {
        fspf,
        key,
        anchor,
        key_fd_slot: AtomicI32::new(key_fd),
        key_handoff,
        index_fd_slot: AtomicI32::new(index_fd),
        started: now(),
        inner: Mutex::new(Inner {
            s: session,
            live: BTreeMap::new(),
            cwd,
            cwd_virtual,
        }),
        index_tag: Mutex::new(None),
    };
    // After every other environment read: a program's own setenv (bash has one) may take over
    // the environment once something is set, and `locks::init` sets `FSPF_LOCKS_FD` when it
    // makes the run's lock memfd.
    crate::runbuf::init();
    crate::locks::init();
    SHIELD.set(sh).is_ok()
}

pub use fspf_core::view::link_target;

pub use fspf_core::view::{Node, NodeKind};

/// A view error as the errno the program sees (`ViewError::errno`, shared with the FUSE shield).
pub fn errno_of(e: ViewError) -> c_int {
    e.errno()
}

/// This process's buffers of files open for writing, as the session's view sees them.
pub struct Live<'a>(pub &'a BTreeMap<EmbedPath, Arc<Mutex<WriteBuf>>>);

impl OpenFiles for Live<'_> {
    fn open_file(&self, ep: &EmbedPath) -> Option<OpenFile> {
        let b = self.0.get(ep)?;
        let b = b.lock().unwrap_or_else(|e| e.into_inner());
        Some(OpenFile {
            size: b.len(),
            mode: b.mode,
            mtime: b.mtime,
            owner: b.owner,
        })
    }
    fn open_below(&self, dir: &EmbedPath) -> Vec<EmbedPath> {
        below(self.0, dir).map(|(k, _)| k.clone()).collect()
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

impl Shield {
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Route `path` (relative paths against `dirfd` or the cwd).
    /// Where `path` goes; a protected hard link is its target's path (everything but the
    /// namespace calls acts on the file, which its buffers and locks are keyed by).
    pub fn route(&self, dirfd: c_int, path: *const libc::c_char) -> Route {
        if path.is_null() {
            return Route::Pass;
        }
        // SAFETY: the program passed a NUL-terminated path (non-null checked above).
        let p = unsafe { CStr::from_ptr(path) }.to_bytes();
        let inner = self.lock();
        self.route_bytes(&inner, dirfd, p)
    }

    /// Where `path` goes, as a name: a hard link is not replaced by its target (unlink,
    /// rename and the new name of link).
    pub fn route_name(&self, dirfd: c_int, path: *const libc::c_char) -> Route {
        if path.is_null() {
            return Route::Pass;
        }
        // SAFETY: the program passed a NUL-terminated path (non-null checked above).
        let p = unsafe { CStr::from_ptr(path) }.to_bytes();
        let inner = self.lock();
        self.route_depth(&inner, dirfd, p, 0)
    }

    /// [`Shield::route`] of a path given as bytes.
    pub fn route_bytes(&self, inner: &Inner, dirfd: c_int, p: &[u8]) -> Route {
        match self.route_depth(inner, dirfd, p, 0) {
            Route::Shield(ep) => Route::Shield(inner.s.canonical(&Live(&inner.live), &ep)),
            r => r,
        }
    }

    /// Does `ep` (following symlinks of the last component) name something other than a
    /// directory? Used for a trailing slash, which only a directory accepts.
    fn names_non_dir(&self, inner: &Inner, ep: &EmbedPath, depth: u32) -> Option<c_int> {
        match self.lookup(inner, ep) {
            Ok(n) => match n.kind {
                NodeKind::Dir => None,
                NodeKind::File | NodeKind::Special { .. } => Some(libc::ENOTDIR),
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
        let Some(vol) = inner.s.vol() else {
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
                // The kernel's limits on names, which no kernel call checks for us here.
                if p.len() >= libc::PATH_MAX as usize
                    || ep.as_bytes().split(|&c| c == b'/').any(|c| c.len() > 255)
                {
                    return Route::Deny(libc::ENAMETOOLONG);
                }
                let dl = inner.s.dir_link(&Live(&inner.live), region, &ep);
                match dl.map(|r| r.map_err(errno_of)) {
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
        inner.s.region_of(ep)
    }

    /// If the anchor moved (another process of this run committed), reload the fspf requiring
    /// exactly the anchor's tag. Errors mean the fspf on disk is not the one the run trusts.
    pub fn refresh(&self, inner: &mut Inner) -> Result<(), c_int> {
        inner.s.refresh().map_err(errno_of)
    }

    pub fn anchor_fd(&self) -> c_int {
        self.anchor.fd()
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
        let Some(vol) = inner.s.vol() else {
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
        crate::index_fd::protect_paged_fd(target);
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

    /// `utimensat`/`futimens` of `ep` (symlinks already followed): recorded by the session,
    /// and on the open buffer.
    pub fn set_mtime(&self, inner: &mut Inner, ep: &EmbedPath, ns: i64) -> Result<(), c_int> {
        inner
            .s
            .set_mtime(&Live(&inner.live), ep, ns)
            .map_err(errno_of)?;
        if let Some(b) = inner.live.get(ep) {
            let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
            g.mtime = ns;
            g.mtime_set = true;
        }
        Ok(())
    }

    /// `chmod` of `ep` (symlinks already followed): recorded by the session, and on the open
    /// buffer.
    pub fn chmod(&self, inner: &mut Inner, ep: &EmbedPath, mode: u32) -> Result<(), c_int> {
        inner
            .s
            .chmod(&Live(&inner.live), ep, mode, now())
            .map_err(errno_of)?;
        if let Some(b) = inner.live.get(ep) {
            b.lock().unwrap_or_else(|e| e.into_inner()).mode = mode & 0o7777;
        }
        Ok(())
    }

    /// `chown` of `ep` (permission already checked): recorded by the session, and on the open
    /// buffer.
    pub fn chown(
        &self,
        inner: &mut Inner,
        ep: &EmbedPath,
        owner: fspf_core::format::metadata::Owner,
    ) -> Result<(), c_int> {
        inner
            .s
            .chown(&Live(&inner.live), ep, owner, now())
            .map_err(errno_of)?;
        if let Some(b) = inner.live.get(ep) {
            b.lock().unwrap_or_else(|e| e.into_inner()).owner = Some(owner);
        }
        Ok(())
    }

    /// What is at `ep` in the shielded view (`fspf_core::session`, which decides it).
    pub fn lookup(&self, inner: &Inner, ep: &EmbedPath) -> Result<Node, c_int> {
        inner.s.lookup(&Live(&inner.live), ep).map_err(errno_of)
    }

    /// Entries of directory `ep` (name, d_type), sorted by name, without `.`/`..`.
    pub fn children(&self, inner: &Inner, ep: &EmbedPath) -> Vec<(Vec<u8>, u8)> {
        inner
            .s
            .children(&Live(&inner.live), ep)
            .into_iter()
            .map(|(n, k)| {
                let t = match k {
                    ChildKind::Dir => libc::DT_DIR,
                    ChildKind::File => libc::DT_REG,
                    ChildKind::Symlink => libc::DT_LNK,
                    ChildKind::Special => libc::DT_UNKNOWN,
                };
                (n, t)
            })
            .collect()
    }

    /// A reader of `ep` at the run's current state (see `fdio::read_fresh`).
    pub fn reopen_current(&self, ep: &EmbedPath) -> Option<fspf_core::volume::KernelReader> {
        let mut inner = self.lock();
        inner.s.open_current(ep).ok()
    }

    pub fn is_ephemeral(&self, inner: &Inner, ep: &EmbedPath) -> bool {
        inner.s.is_ephemeral(ep)
    }

    /// May the program change `ep`? Ephemeral regions always; kernel regions in mutable mode.
    pub fn check_writable(&self, inner: &Inner, ep: &EmbedPath) -> Result<(), c_int> {
        inner.s.check_writable(ep).map_err(errno_of)
    }

    /// Seal a buffer whose content changed: into memory for ephemeral regions, as a staged
    /// version otherwise.
    pub fn finish(&self, inner: &mut Inner, b: &mut WriteBuf) -> Result<(), c_int> {
        if b.stream_staged.is_some()
            || !(b.needs_seal() || (b.streamable && crate::stream::is_active(b.fd)))
        {
            return Ok(());
        }
        if b.mirror && !crate::runbuf::still_current(&b.path, b.fd) {
            // Another process of the run unlinked or renamed the file: sealing this copy would
            // bring the removed name back.
            b.detached = true;
            crate::stream::discard(inner, b);
            return Ok(());
        }
        let eph = inner.s.is_ephemeral(&b.path);
        let meta = VersionMeta {
            mode: b.mode,
            mtime: b.mtime_set.then_some(b.mtime),
            owner: b.owner,
        };
        // A streamable buffer is sealed under its lock: no other process starts a stream in it
        // and punches out what this seal reads.
        let _streamable = if b.streamable {
            Some(crate::files::UnloadedLock::take(b.lock_fd()?)?)
        } else {
            None
        };
        // A stream sealed while written: the rest of the buffer is its tail (`stream.rs`).
        if !eph && crate::stream::finish(inner, b, meta)? {
            return Ok(());
        }
        if !eph && self.stage_tracked(inner, b, meta)? {
            return Ok(());
        }
        // A whole version is sealed from the whole buffer.
        crate::opening::load_unloaded(inner, b)?;
        let before = b.stat_now();
        if !eph && b.len() > files::HASH_MAX {
            // Large kernel file: seal straight from the memfd (no copy of the whole file).
            let print = b.fingerprint()?;
            let append = Self::append_delta(b);
            let path = b.path.clone();
            let t = inner
                .s
                .stage_put(&path, print.0, meta, append, || b.reader())
                .map_err(errno_of)?;
            b.mtime = t;
            b.mark_sealed_print(print);
            b.pending = true;
            b.start_tracking_from(before);
            return Ok(());
        }
        let data = b.contents()?;
        if eph {
            inner
                .s
                .put_ephemeral(&b.path, b.mode, b.mtime, &data)
                .map_err(errno_of)?;
            b.mark_sealed(&data);
            return Ok(());
        }
        let append = Self::append_delta(b);
        let t = inner
            .s
            .stage_put(&b.path, data.len() as u64, meta, append, || &data[..])
            .map_err(errno_of)?;
        b.mtime = t;
        b.mark_sealed(&data);
        b.pending = true;
        b.start_tracking_from(before);
        Ok(())
    }

    /// Stage `b` as an in-place update of its format-2 file (FORMAT.md §5b): what the hooks
    /// saw change since it equalled its committed version, or, when they cannot have seen every
    /// write (the run's shared buffer, a shared map, an inherited descriptor), the chunks that
    /// differ from the committed state. Only changed chunks are sealed and written.
    /// An update staged before and not yet committed is folded into the new one. `Ok(false)`:
    /// not possible (a format-1 or new file, a whole version already staged, a change too
    /// large): the caller seals a whole version.
    fn stage_tracked(
        &self,
        inner: &mut Inner,
        b: &mut WriteBuf,
        meta: VersionMeta,
    ) -> Result<bool, c_int> {
        // A new or format-1 file (most seals): a whole version, without reading the buffer
        // here first.
        if !inner.s.updatable(&b.path) {
            return Ok(false);
        }
        // A buffer with unloaded parts is staged under its lock (no other process loads or
        // writes it meanwhile), and refused if something changed it unseen: a raw write into a
        // hole would leave zeros the shield cannot tell from content.
        let _lazy = if b.unloaded() > 0 {
            let l = crate::files::UnloadedLock::take(b.lock_fd()?)?;
            if b.changed_unseen() {
                return Err(libc::EIO);
            }
            Some(l)
        } else {
            None
        };
        // Taken before the content is read: a write after it makes the buffer dirty again.
        let before = b.stat_now();
        let print = b.fingerprint()?;
        let buf: &WriteBuf = b;
        let read = |out: &mut [u8], off: u64| {
            buf.read_exact_at(out, off)
                .map_err(std::io::Error::from_raw_os_error)
        };
        let tracked = match (b.version, b.tracked()) {
            (Some(v), Some(t)) if v.root.is_some() && t.print.0 == print.0 => {
                Some((v, t.written.clone()))
            }
            _ => None,
        };
        let staged = match tracked {
            Some((v, written)) => inner
                .s
                .stage_update(&b.path, v, print.0, &written, meta, read),
            None => inner
                .s
                .stage_diff(&b.path, print.0, &b.holes_in(0, u64::MAX), meta, read),
        }
        .map_err(errno_of)?;
        let Some(t) = staged else {
            return Ok(false);
        };
        b.mtime = t;
        b.mark_sealed_print(print);
        b.pending = true;
        b.start_tracking_from(before);
        Ok(true)
    }

    /// Before a `fork`, `exec` or `posix_spawn`: the children inherit the buffers' memfds, so
    /// their appends can no longer be told from this process's own.
    pub fn share_buffers(inner: &Inner) {
        for b in inner.live.values() {
            let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
            g.shared = true;
            g.base = None;
            g.track = None;
            g.append_only
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// What an append-only buffer added to the version it was loaded from (for a rebase at
    /// commit), if it only appended.
    fn append_delta(b: &WriteBuf) -> Option<AppendDelta> {
        let len = b.len();
        let (id, base_len) = b.base?;
        if b.shared
            || !b.append_only.load(std::sync::atomic::Ordering::Relaxed)
            || len < base_len
            || len - base_len > APPEND_REBASE_MAX
        {
            return None;
        }
        let mut delta = vec![0u8; (len - base_len) as usize];
        let mut off = 0usize;
        while off < delta.len() {
            match b.read_at(&mut delta[off..], base_len + off as u64) {
                Ok(0) | Err(_) => return None,
                Ok(n) => off += n,
            }
        }
        Some(AppendDelta { base: id, delta })
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
        // A stream staged holds the buffer's lock until its commit: that is now.
        let streamed = b.stream_staged.is_some();
        drop(b);
        if streamed {
            self.commit(&mut inner)?;
            return r;
        }
        // Ephemeral files now live sealed in the tree; a clean kernel buffer nobody holds may
        // go stale (another process of the run may commit the path): drop both from `live`.
        if eph || (clean && Arc::strong_count(buf) <= 2) {
            if inner.live.get(&path).is_some_and(|x| Arc::ptr_eq(x, buf)) {
                inner.live.remove(&path);
            }
        } else if inner.s.batch_full() {
            self.commit(&mut inner)?;
        }
        r
    }

    /// Stage the dirty kernel buffers among `bufs`. Err: a staging failure; the others are
    /// still staged.
    fn stage_each(&self, inner: &mut Inner, bufs: &[Arc<Mutex<WriteBuf>>]) -> Result<(), c_int> {
        let mut res = Ok(());
        for b in bufs {
            let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
            if !inner.s.is_ephemeral(&g.path) {
                if let Err(e) = self.finish(inner, &mut g) {
                    res = Err(e);
                }
            }
        }
        res
    }

    /// Stage every dirty kernel buffer for a commit. The buffers this process shares with
    /// others of the run (`runbuf.rs`) are staged under the run's commit lock (the anchor's),
    /// which is returned, to be held until the session has committed (the session takes it
    /// again, which a POSIX record lock allows its holder): a snapshot of a shared file is then
    /// committed before any other process can take a newer one, so an older snapshot can never
    /// be committed after a newer one and take the file back (regression
    /// `a_shared_buffers_older_snapshot_was_committed_after_a_newer_one`; a snapshot this
    /// process took earlier, at a close, is staged again here when the file changed since).
    /// Buffers that stream their seal (`stream.rs`) hold their own lock across their commit
    /// and are staged before the run's lock is taken (the other order would deadlock).
    pub fn stage_for_commit(
        &self,
        inner: &mut Inner,
    ) -> (Result<(), c_int>, Option<crate::anchor::AnchorLock>) {
        let (shared, own): (Vec<_>, Vec<_>) = inner.live.values().cloned().partition(|b| {
            let g = b.lock().unwrap_or_else(|e| e.into_inner());
            g.mirror && !g.streamable && !g.detached
        });
        let res = self.stage_each(inner, &own);
        pause_after_stage_for_tests();
        if shared.is_empty() {
            return (res, None);
        }
        // Without the lock the session's commit fails the same way (the anchor cannot be
        // locked): the buffers are staged all the same, as before any commit.
        let lock = self.anchor.lock().ok();
        let shared_res = self.stage_each(inner, &shared);
        (res.and(shared_res), lock)
    }

    /// Stage every dirty kernel buffer and commit the queue (fsync, fork/exec, exit, batches):
    /// the protocol is the session's (`fspf_core::session`).
    pub fn commit(&self, inner: &mut Inner) -> Result<(), c_int> {
        let (committed, staged) = self.commit_parts(inner);
        committed?;
        staged
    }

    /// [`Shield::commit`]'s two outcomes: the commit's own, and the stages' (a buffer that could
    /// not be staged stays as it is, changed, for the next commit point).
    pub fn commit_parts(&self, inner: &mut Inner) -> (Result<(), c_int>, Result<(), c_int>) {
        let (res, run_lock) = self.stage_for_commit(inner);
        let frees_room = inner.s.removes_anything();
        let r = inner.s.commit().map_err(errno_of);
        if r.is_err() {
            // What was staged is lost: no buffer's tracked changes describe its difference
            // from a committed state any more.
            for b in inner.live.values() {
                b.lock().unwrap_or_else(|e| e.into_inner()).track = None;
            }
        }
        Self::after_commit(inner);
        drop(run_lock);
        if r.is_ok() && frees_room && matches!(res, Err(libc::ENOSPC | libc::EDQUOT)) {
            // A file that found no room may find it now: this commit removed what the program
            // removed to make room (`rm` of a large file, then `fsync` again, as on a plain
            // file system). Once more (the queue holds no removal now, so only once).
            return self.commit_parts(inner);
        }
        (r, res)
    }

    /// Buffers whose stream was staged but whose commit failed (nothing is queued any more)
    /// read it back and give it up (`stream::not_committed`).
    fn streams_not_committed(inner: &mut Inner) {
        if inner.s.has_queued() {
            return;
        }
        let bufs: Vec<_> = inner.live.values().cloned().collect();
        for b in bufs {
            let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
            if g.stream_staged.is_some() {
                crate::stream::not_committed(inner, &mut g);
            }
        }
    }

    /// After the session committed (here or inside a rename or symlink): buffers still open go
    /// on from what was committed. A rebased one takes the merged contents, and each records
    /// its committed version as its new base.
    pub fn after_commit(inner: &mut Inner) {
        let c = inner.s.take_committed();
        if !c.any {
            Self::streams_not_committed(inner);
            return;
        }
        let mut merged = c.merged;
        for (path, id, size) in c.files {
            let Some(b) = inner.live.get(&path).cloned() else {
                continue;
            };
            let mut g = b.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(data) = merged.remove(&path).filter(|_| !g.mirror) {
                // (The run's shared buffer is current as it is: other processes may have
                // written it since; it is never overwritten with a committed state.)
                if g.set_len(0).is_err() || g.write_all_at(&data, 0).is_err() {
                    g.track = None;
                    continue;
                }
                g.mark_loaded();
                g.mark_sealed(&data);
                g.start_tracking();
            }
            g.version = Some(id);
            // A stream's sealed part is committed content now.
            crate::stream::committed(&mut g);
            if !g.shared {
                g.base = Some((id, size));
                g.append_only
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        for b in inner.live.values() {
            b.lock().unwrap_or_else(|e| e.into_inner()).pending = false;
        }
        Self::streams_not_committed(inner);
        inner.live.retain(|_, b| Arc::strong_count(b) > 1);
    }
}

/// `FSPF_TEST_PAUSE_AFTER_STAGE=MS`: every commit of this process waits MS milliseconds after
/// staging its buffers, before it takes the run's commit lock (the window in which another
/// process's newer snapshot of a shared file can be committed first).
fn pause_after_stage_for_tests() {
    static MS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    crate::pause_for_tests("FSPF_TEST_PAUSE_AFTER_STAGE", &MS);
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
    // Applied update journals: the files they changed are made durable and the journals go
    // (a failure leaves them for the next open, which applies them again if needed).
    let _ = inner.s.settle_journals();
    // Everything is committed: the run's shared buffers this process was the last to hold go
    // (exit closes their fds, but runs no destructor).
    for b in inner.live.values() {
        let g = b.lock().unwrap_or_else(|e| e.into_inner());
        if g.mirror {
            crate::runbuf::leave(&g.path, g.fd);
        }
    }
    true
}

//! Kernel-side access below a trusted base directory without following symbolic links.
//!
//! The storage attacker can replace any directory below a region's kernel directory by a symlink
//! (`vol/sub -> /victim`). Every path fspf opens, creates, renames or removes there is therefore
//! resolved relative to the base with `openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)`, or, where
//! the kernel lacks `openat2` (before Linux 5.6, or a seccomp filter refusing it), one
//! `openat(O_NOFOLLOW | O_DIRECTORY)` per component. The base itself (a region's kernel path as
//! configured, the directory of the fspf, an `addf` output directory) is opened as given. A
//! symlink anywhere below it fails with `ELOOP`. New files are created `O_EXCL | O_NOFOLLOW`.
//!
//! Regular-file reads open with `O_NONBLOCK` (a FIFO put in place of a file must not block the
//! open), check `fstat` and clear `O_NONBLOCK` again: [`open_regular`].
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// A kernel path as a trusted base directory and a symlink-free relative part below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPath {
    base: PathBuf,
    rel: PathBuf,
}

impl KernelPath {
    /// `rel` must be relative and normal (no `.`, `..` or root components): embed paths are.
    pub fn new(base: impl Into<PathBuf>, rel: impl Into<PathBuf>) -> KernelPath {
        KernelPath {
            base: base.into(),
            rel: rel.into(),
        }
    }

    /// Where `path` of a kernel `region` lives (`None` for ephemeral regions or paths outside it).
    pub fn of(
        region: &crate::format::metadata::Region,
        path: &crate::policy::EmbedPath,
    ) -> Option<KernelPath> {
        use std::os::unix::ffi::OsStrExt;
        let crate::format::metadata::RegionKind::Kernel(base) = &region.kind else {
            return None;
        };
        let rel = path.strip_prefix(&region.embed_point)?;
        Some(KernelPath::new(base, OsStr::from_bytes(rel)))
    }

    pub fn base(&self) -> &Path {
        &self.base
    }
    pub fn rel(&self) -> &Path {
        &self.rel
    }
    /// The plain path (for messages, and for callers that have no choice).
    pub fn full(&self) -> PathBuf {
        if self.rel.as_os_str().is_empty() {
            self.base.clone()
        } else {
            self.base.join(&self.rel)
        }
    }

    /// The same location with another final name (a shadow beside the file).
    pub fn with_file_name(&self, name: impl AsRef<OsStr>) -> KernelPath {
        if self.rel.as_os_str().is_empty() {
            return KernelPath::new(self.base.with_file_name(name), "");
        }
        KernelPath::new(&self.base, self.rel.with_file_name(name))
    }

    /// The directory holding this entry, opened without following symlinks below the base, and
    /// the entry's name in it. For the base itself: its parent, as given, and its name.
    pub fn parent(&self) -> io::Result<(OwnedFd, OsString)> {
        match (self.rel.parent(), self.rel.file_name()) {
            (Some(dir), Some(name)) => Ok((open_dir_beneath(&self.base, dir)?, name.to_owned())),
            _ => {
                let name = self.base.file_name().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "base has no file name")
                })?;
                let dir = match self.base.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                Ok((open_path_dir(dir)?, name.to_owned()))
            }
        }
    }
}

fn check_relative(rel: &Path) -> io::Result<()> {
    if rel.components().all(|c| matches!(c, Component::Normal(_))) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a plain relative path", rel.display()),
        ))
    }
}

/// `O_PATH` directory fd of `dir` as given (symlinks followed: a trusted base).
fn open_path_dir(dir: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Cleared when `openat2` turned out to be unavailable (ENOSYS): use the per-component walk.
static OPENAT2: AtomicBool = AtomicBool::new(true);

/// Open `rel` relative to the directory `root` with `flags` (`O_NOFOLLOW | O_CLOEXEC` added),
/// following no symlink on the way.
fn openat_nofollow(root: &OwnedFd, rel: &Path, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
    match openat_nofollow_raw(root, rel, flags, mode) {
        // `O_PATH | O_NOFOLLOW` opens a final symlink itself and `O_DIRECTORY` then says ENOTDIR:
        // report it as the refused symlink it is.
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) && flags.contains(OFlags::PATH) => {
            let (Some(dir), Some(name)) = (rel.parent(), rel.file_name()) else {
                return Err(e);
            };
            let d =
                openat_nofollow_raw(root, dir, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
            match rustix::fs::statat(&d, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                    Err(rustix::io::Errno::LOOP.into())
                }
                _ => Err(e),
            }
        }
        r => r,
    }
}

fn openat_nofollow_raw(
    root: &OwnedFd,
    rel: &Path,
    flags: OFlags,
    mode: Mode,
) -> io::Result<OwnedFd> {
    check_relative(rel)?;
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    if rel.as_os_str().is_empty() {
        return Ok(rustix::fs::openat(root, ".", flags, mode)?);
    }
    if OPENAT2.load(Ordering::Relaxed) {
        let how = ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
        for _ in 0..8 {
            match rustix::fs::openat2(root, rel, flags, mode, how) {
                Ok(fd) => return Ok(fd),
                // The kernel could not rule out a concurrent rename: retry, as openat2(2) advises.
                Err(rustix::io::Errno::AGAIN) => continue,
                Err(rustix::io::Errno::NOSYS) => {
                    OPENAT2.store(false, Ordering::Relaxed);
                    break;
                }
                // Seccomp profiles that do not know openat2 may answer EPERM: walk instead.
                Err(rustix::io::Errno::PERM) => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    walk_nofollow(root, rel, flags, mode)
}

/// The fallback: one `openat(O_NOFOLLOW)` per component.
fn walk_nofollow(root: &OwnedFd, rel: &Path, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
    let mut parts: Vec<&OsStr> = rel.iter().collect();
    let last = parts.pop().unwrap_or(OsStr::new("."));
    let mut dir: Option<OwnedFd> = None;
    for c in parts {
        let at = dir.as_ref().unwrap_or(root);
        let dflags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let next = match rustix::fs::openat(at, c, dflags, Mode::empty()) {
            Ok(fd) => fd,
            // O_PATH | O_NOFOLLOW opens a symlink itself, and O_DIRECTORY then says ENOTDIR.
            Err(rustix::io::Errno::NOTDIR) => {
                let st = rustix::fs::statat(at, c, AtFlags::SYMLINK_NOFOLLOW)?;
                return Err(
                    if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
                        rustix::io::Errno::LOOP.into()
                    } else {
                        rustix::io::Errno::NOTDIR.into()
                    },
                );
            }
            Err(e) => return Err(e.into()),
        };
        dir = Some(next);
    }
    let at = dir.as_ref().unwrap_or(root);
    Ok(rustix::fs::openat(at, last, flags, mode)?)
}

/// Open the directory `rel` below `base` (`O_PATH`: usable as the directory of `*at` calls).
pub fn open_dir_beneath(base: &Path, rel: &Path) -> io::Result<OwnedFd> {
    let root = open_path_dir(base)?;
    if rel.as_os_str().is_empty() {
        return Ok(root);
    }
    openat_nofollow(&root, rel, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
}

/// Open `rel` below `base` with the `open(2)` flags `flags` (libc `O_*` bits; `O_NOFOLLOW` and
/// `O_CLOEXEC` are added) and `mode`, following no symlink below `base`: a symlink anywhere in
/// `rel`, also as its last component, fails with `ELOOP`. For frontends that hold libc flags.
pub fn open_beneath(base: &Path, rel: &Path, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let root = open_path_dir(base)?;
    openat_nofollow(
        &root,
        rel,
        OFlags::from_bits_retain(flags as u32),
        Mode::from_bits_retain(mode),
    )
}

/// What a non-regular file is, for messages.
pub fn kind_name(ft: FileType) -> &'static str {
    match ft {
        FileType::RegularFile => "regular file",
        FileType::Directory => "directory",
        FileType::Symlink => "symbolic link",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        _ => "special file",
    }
}

/// Why [`open_regular`] refused.
#[derive(Debug)]
pub enum OpenError {
    Io(io::Error),
    /// The entry exists but is not a regular file (its kind, from [`kind_name`]).
    NotRegular(&'static str),
}

impl OpenError {
    /// As an I/O error (a non-regular file is `InvalidData`).
    pub fn into_io(self) -> io::Error {
        match self {
            OpenError::Io(e) => e,
            OpenError::NotRegular(k) => io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a {k}, not a regular file"),
            ),
        }
    }
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> Self {
        OpenError::Io(e)
    }
}
impl From<rustix::io::Errno> for OpenError {
    fn from(e: rustix::io::Errno) -> Self {
        OpenError::Io(e.into())
    }
}

/// Check that an fd opened with `O_NONBLOCK` is a regular file, then make it blocking (all its
/// `F_SETFL` status flags are cleared: callers open without `O_APPEND` or `O_DIRECT`).
pub(crate) fn require_regular(fd: OwnedFd) -> Result<File, OpenError> {
    let st = rustix::fs::fstat(&fd)?;
    let ft = FileType::from_raw_mode(st.st_mode);
    if ft != FileType::RegularFile {
        return Err(OpenError::NotRegular(kind_name(ft)));
    }
    // Clear O_NONBLOCK: every opener here passes no other flag that F_SETFL changes (no
    // O_APPEND, O_DIRECT, O_NOATIME, O_ASYNC), so no F_GETFL is needed (one system call less per
    // open; a commit opens about a dozen files).
    rustix::fs::fcntl_setfl(&fd, OFlags::empty())?;
    Ok(File::from(fd))
}

/// Open `name` in the directory `dir` with `access` (`O_RDONLY` or `O_RDWR`), refusing symlinks,
/// FIFOs, devices and anything else that is not a regular file (without blocking on a FIFO).
fn open_regular_at_as(dir: &OwnedFd, name: &OsStr, access: OFlags) -> Result<File, OpenError> {
    let fl = access | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    require_regular(rustix::fs::openat(dir, name, fl, Mode::empty())?)
}

/// [`open_regular_at_as`] for `rel` below `base` (no symlink followed anywhere below it).
fn open_regular_as(base: &Path, rel: &Path, access: OFlags) -> Result<File, OpenError> {
    let root = open_path_dir(base)?;
    require_regular(openat_nofollow(
        &root,
        rel,
        access | OFlags::NONBLOCK,
        Mode::empty(),
    )?)
}

/// Open `name` in the directory `dir` read-only: a regular file only, never through a symlink.
pub fn open_regular_at(dir: &OwnedFd, name: &OsStr) -> Result<File, OpenError> {
    open_regular_at_as(dir, name, OFlags::RDONLY)
}

/// [`open_regular_at`] for `rel` below `base`.
pub fn open_regular(base: &Path, rel: &Path) -> Result<File, OpenError> {
    open_regular_as(base, rel, OFlags::RDONLY)
}

/// [`open_regular_at`] for reading and writing: the in-place application of a journal
/// (`update.rs`).
pub fn open_regular_rw_at(dir: &OwnedFd, name: &OsStr) -> Result<File, OpenError> {
    open_regular_at_as(dir, name, OFlags::RDWR)
}

/// [`open_regular_rw_at`] for `rel` below `base`.
pub fn open_regular_rw(base: &Path, rel: &Path) -> Result<File, OpenError> {
    open_regular_as(base, rel, OFlags::RDWR)
}

/// Open a file by plain path like [`open_regular`] (no symlink as its last component, nothing
/// but a regular file): for the fspf itself, whose directory is the caller's.
pub fn open_regular_path(p: &Path) -> Result<File, OpenError> {
    open_path_as(p, OFlags::RDONLY)
}

/// [`open_regular_path`] for reading and writing (an existing file: nothing is created).
pub fn open_rw_existing_path(p: &Path) -> Result<File, OpenError> {
    open_path_as(p, OFlags::RDWR)
}

/// Open the regular file at the plain path `p` with `access`, never through a symlink
/// (`O_NONBLOCK`: a FIFO in its place must not block the open).
fn open_path_as(p: &Path, access: OFlags) -> Result<File, OpenError> {
    let fd = rustix::fs::open(
        p,
        access | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    require_regular(fd)
}

/// Open the file at the plain path `p` for reading and writing, creating it (0600) if missing,
/// or only if missing with `create_new`: never through a symlink, only a regular file
/// (`O_NONBLOCK`: a FIFO in its place must not block the open). For the fspf's lock files and
/// its metadata log.
pub fn open_rw_path(p: &Path, create_new: bool) -> Result<File, OpenError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .create_new(create_new)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(p)?;
    require_regular(f.into())
}

/// Create the new file `name` in `dir` for writing (`O_EXCL | O_NOFOLLOW`: never an existing
/// file, never through a symlink), with `extra` flags (e.g. `O_DIRECT`).
pub fn create_new_at(dir: &OwnedFd, name: &OsStr, mode: u32, extra: OFlags) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC | extra,
        Mode::from_bits_retain(mode),
    )?;
    Ok(File::from(fd))
}

/// `lstat` of `rel` below `base` (the entry itself; its parents must not be symlinks).
pub fn stat_beneath(base: &Path, rel: &Path) -> io::Result<rustix::fs::Stat> {
    if rel.as_os_str().is_empty() {
        return Ok(rustix::fs::stat(base)?);
    }
    let (dir, name) = KernelPath::new(base, rel).parent()?;
    Ok(rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW)?)
}

/// The file type of `rel` below `base`, see [`stat_beneath`].
pub fn file_type_beneath(base: &Path, rel: &Path) -> io::Result<FileType> {
    stat_beneath(base, rel).map(|st| FileType::from_raw_mode(st.st_mode))
}

/// Target of the symlink `rel` below `base` (its parents must not be symlinks).
pub fn read_link_beneath(base: &Path, rel: &Path) -> io::Result<Vec<u8>> {
    let (dir, name) = KernelPath::new(base, rel).parent()?;
    Ok(rustix::fs::readlinkat(&dir, &name, Vec::new())?.into_bytes())
}

/// Remove `rel` below `base` (`dir`: an empty directory, else a file or symlink, never what a
/// symlink points to), following no symlink below `base`.
pub fn remove_beneath(base: &Path, rel: &Path, dir: bool) -> io::Result<()> {
    let (d, name) = KernelPath::new(base, rel).parent()?;
    let flags = if dir {
        AtFlags::REMOVEDIR
    } else {
        AtFlags::empty()
    };
    Ok(rustix::fs::unlinkat(&d, &name, flags)?)
}

/// Is `name` one of the files fspf itself leaves beside kernel files: a shadow
/// (`.NAME.fspf-<32 hex>`, a staged or interrupted version) or a stale directory moved aside
/// (`.NAME.fspf-stale-<hex>`)?
pub fn is_fspf_leftover(name: &OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let b = name.as_bytes();
    if !b.starts_with(b".") {
        return false;
    }
    let Some(i) = b.windows(6).rposition(|w| w == b".fspf-") else {
        return false;
    };
    let tail = &b[i + 6..];
    let hex = |t: &[u8]| !t.is_empty() && t.iter().all(u8::is_ascii_hexdigit);
    (tail.len() == 32 && hex(tail)) || tail.strip_prefix(b"stale-").is_some_and(hex)
}

/// Delete the directory `name` in `dir` and everything below it, following no symlink (a link
/// inside is removed, not followed). Best effort: the first error is returned.
fn remove_tree_at(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    let d = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut names: Vec<(OsString, bool)> = Vec::new();
    for e in rustix::fs::Dir::read_from(&d)? {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n == b"." || n == b".." {
            continue;
        }
        use std::os::unix::ffi::OsStrExt;
        names.push((
            OsStr::from_bytes(n).to_owned(),
            e.file_type() == FileType::Directory,
        ));
    }
    let mut first: Option<io::Error> = None;
    for (n, is_dir) in names {
        let r = if is_dir {
            remove_tree_at(&d, &n)
        } else {
            rustix::fs::unlinkat(&d, &n, AtFlags::empty()).map_err(io::Error::from)
        };
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(io::Error::from)?;
    first.map_or(Ok(()), Err)
}

/// Move `name` in `dir` out of the way (`.NAME.fspf-stale-<random>`) and delete it there.
fn move_aside_and_remove(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    let mut rnd = [0u8; 8];
    crate::crypto::random_bytes(&mut rnd).map_err(io::Error::other)?;
    let mut stale = OsString::from(".");
    stale.push(name);
    stale.push(format!(".fspf-stale-{}", hex::encode(rnd)));
    rustix::fs::renameat(dir, name, dir, &stale)?;
    // The name is free now; what was below it is deleted as far as possible (a failure leaves
    // a stale directory that `fspf verify` reports and `verify --clean` removes).
    let _ = remove_tree_at(dir, &stale);
    Ok(())
}

/// Remove the kernel directory `rel` below `base` that the fspf no longer lists (`rmdir`, `rm
/// -r` under the shield). Programs saw it empty, yet the kernel directory may still hold fspf's
/// leftovers (the shadow of a writer killed mid-commit) or unlisted files: those are invisible
/// and must not keep the name taken, or a file created there later could never be moved into
/// place (EIO on that path forever). So leftovers are removed first, and a directory that is
/// still not empty is moved aside and deleted. Follows no symlink below `base`.
pub fn remove_unlisted_dir(base: &Path, rel: &Path) -> io::Result<()> {
    let (parent, name) = KernelPath::new(base, rel).parent()?;
    match rustix::fs::unlinkat(&parent, &name, AtFlags::REMOVEDIR) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::NOTEMPTY) | Err(rustix::io::Errno::EXIST) => {
            move_aside_and_remove(&parent, &name)
        }
        Err(e) => Err(e.into()),
    }
}

/// Make the name `rel` below `base` free for a file being moved there: an unlisted directory
/// left at that name (see [`remove_unlisted_dir`]) is moved aside and deleted. Anything else is
/// left alone (a rename replaces files and symlinks itself).
pub fn clear_stale_dir(base: &Path, rel: &Path) -> io::Result<()> {
    let (parent, name) = KernelPath::new(base, rel).parent()?;
    match rustix::fs::statat(&parent, &name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            move_aside_and_remove(&parent, &name)
        }
        _ => Ok(()),
    }
}

/// Rename `from` to `to`, both below `base`, following no symlink below `base`; `to`'s parent
/// directories are created first (as [`create_dirs_beneath`]).
pub fn rename_beneath(base: &Path, from: &Path, to: &Path) -> io::Result<()> {
    if let Some(p) = to.parent() {
        create_dirs_beneath(base, p, 0o755)?;
    }
    let (fd, fname) = KernelPath::new(base, from).parent()?;
    let (td, tname) = KernelPath::new(base, to).parent()?;
    Ok(rustix::fs::renameat(&fd, &fname, &td, &tname)?)
}

/// Rename `from` to `to` inside the directory `dir`.
pub fn rename_at(dir: &OwnedFd, from: &OsStr, to: &OsStr) -> io::Result<()> {
    Ok(rustix::fs::renameat(dir, from, dir, to)?)
}

/// `fsync` the directory `dir` (an `O_PATH` fd cannot be synced: reopen it).
pub fn sync_dir_fd(dir: &OwnedFd) -> io::Result<()> {
    let d = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(rustix::fs::fsync(&d)?)
}

/// `mkdir -p` of `rel` below `base` (`base` is created as given if missing), following no
/// symlink below `base`: an existing symlink on the way fails with `ELOOP`. Returns the last
/// directory (`O_PATH`).
pub fn create_dirs_beneath(base: &Path, rel: &Path, mode: u32) -> io::Result<OwnedFd> {
    make_dirs_beneath(base, rel, mode, false)
}

/// The directories of `rel` below `base`, made with `mode` (set exactly, whatever the umask,
/// when `exact`), none reached through a symlink.
fn make_dirs_beneath(base: &Path, rel: &Path, mode: u32, exact: bool) -> io::Result<OwnedFd> {
    check_relative(rel)?;
    if !base.as_os_str().is_empty() {
        std::fs::create_dir_all(base)?;
    }
    let mut dir = open_path_dir(base)?;
    for c in rel.iter() {
        let made = match rustix::fs::mkdirat(&dir, c, Mode::from_bits_retain(mode)) {
            Ok(()) => true,
            Err(rustix::io::Errno::EXIST) => false,
            Err(e) => return Err(e.into()),
        };
        dir = openat_nofollow(
            &dir,
            Path::new(c),
            OFlags::PATH | OFlags::DIRECTORY,
            Mode::empty(),
        )?;
        if made && exact {
            // The umask narrowed what mkdir gave: set the bits exactly.
            let _ = chmod_dir(&dir, mode);
        }
    }
    Ok(dir)
}

/// [`create_dirs_beneath`] for the directories a shield makes below a region's kernel
/// directory: they get that directory's permission bits, whatever the umask, so that the
/// region is as writable for every user of a run (processes that change uid, such as `su`
/// or a test suite) as its owner made it.
pub fn create_dirs_like_base(base: &Path, rel: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(base)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o755);
    make_dirs_beneath(base, rel, mode, true)
}

/// `chmod` of a directory opened `O_PATH` (which cannot be `fchmod`ed itself).
pub fn chmod_dir(dir: &OwnedFd, mode: u32) -> io::Result<()> {
    let d = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(rustix::fs::fchmod(&d, Mode::from_bits_retain(mode))?)
}

/// Is this error the refusal of a symlink below the base?
pub fn is_symlink_refusal(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error())
}

/// Lowest fd number for files a [`KernelReader`](super::KernelReader) keeps open (0: no floor).
static FD_FLOOR: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
/// Fds of open [`TrackedFile`]s.
static TRACKED: std::sync::Mutex<std::collections::BTreeSet<i32>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());
static N_TRACKED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Move the files verified readers keep open to fd numbers `>= floor`. An in-process frontend
/// sets it: a shell's `exec 3<F` or `dup2(x, 3)` must not land on the reader's own fd, which
/// the kernel would close under it (the program never sees these fds). They are also listed by
/// [`is_tracked`], so the frontend can keep a program's `close_range(3, ~0)` off them.
pub fn set_fd_floor(floor: i32) {
    FD_FLOOR.store(floor, Ordering::Relaxed);
}

/// Is `fd` a file a verified reader holds open?
pub fn is_tracked(fd: i32) -> bool {
    N_TRACKED.load(Ordering::Relaxed) > 0
        && TRACKED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&fd)
}

/// The tracked fds (see [`is_tracked`]).
pub fn tracked_fds() -> Vec<i32> {
    if N_TRACKED.load(Ordering::Relaxed) == 0 {
        return Vec::new();
    }
    TRACKED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .copied()
        .collect()
}

/// A file kept open by a verified reader: moved above the fd floor and listed while it lives.
#[derive(Debug)]
pub struct TrackedFile {
    file: File,
}

impl TrackedFile {
    pub fn new(file: File) -> TrackedFile {
        use std::os::fd::AsRawFd;
        let floor = FD_FLOOR.load(Ordering::Relaxed);
        let file = if floor > 0 && file.as_raw_fd() < floor {
            // Same open file description at a high number; the low one is closed on drop.
            match rustix::io::fcntl_dupfd_cloexec(&file, floor) {
                Ok(high) => File::from(high),
                Err(_) => file,
            }
        } else {
            file
        };
        if floor > 0 {
            TRACKED
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(file.as_raw_fd());
            N_TRACKED.fetch_add(1, Ordering::Relaxed);
        }
        TrackedFile { file }
    }
}

impl Drop for TrackedFile {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        if FD_FLOOR.load(Ordering::Relaxed) > 0
            && TRACKED
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.file.as_raw_fd())
        {
            N_TRACKED.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl crate::codec::ReadAt for TrackedFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(&self.file, buf, offset)
    }
    fn will_need(&self, offset: u64, len: u64) {
        // Only a hint: a file system that ignores it costs the later write its read.
        let _ = rustix::fs::fadvise(
            &self.file,
            offset,
            std::num::NonZeroU64::new(len),
            rustix::fs::Advice::WillNeed,
        );
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}

#[cfg(test)]
mod tests {

    /// Regression (pjdfstest under `fspf run`): directories the shield made below a region's
    /// kernel directory were 0755 (less the umask) whatever that directory allowed, so a
    /// process of the run that had dropped to another uid could not write its files there.
    #[test]
    fn directories_made_for_a_region_were_0755_whatever_the_region_allowed() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("vol");
        std::fs::create_dir(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        create_dirs_like_base(&base, Path::new("a/b")).unwrap();
        for p in ["a", "a/b"] {
            let m = std::fs::metadata(base.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777;
            assert_eq!(m, 0o777, "{p}");
        }
    }

    use super::*;
    use std::os::unix::fs::symlink;

    fn world() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base");
        let victim = d.path().join("victim");
        std::fs::create_dir_all(base.join("real/deeper")).unwrap();
        std::fs::create_dir_all(&victim).unwrap();
        std::fs::write(base.join("real/f"), "f").unwrap();
        std::fs::write(victim.join("f"), "victim").unwrap();
        symlink(&victim, base.join("sub")).unwrap();
        symlink("real/f", base.join("flink")).unwrap();
        (d, base, victim)
    }

    fn both_ways(f: impl Fn()) {
        f();
        OPENAT2.store(false, Ordering::Relaxed);
        f();
        OPENAT2.store(true, Ordering::Relaxed);
    }

    #[test]
    fn symlinks_below_the_base_are_never_followed() {
        let (_d, base, victim) = world();
        both_ways(|| {
            let loop_ = |r: io::Result<()>| {
                let e = r.unwrap_err();
                assert!(is_symlink_refusal(&e), "{e}");
            };
            assert!(open_regular(&base, Path::new("real/f")).is_ok());
            for rel in ["sub/f", "flink"] {
                match open_regular(&base, Path::new(rel)) {
                    Err(OpenError::Io(e)) => assert!(is_symlink_refusal(&e), "{rel}: {e}"),
                    r => panic!("{rel}: {r:?}"),
                }
            }
            loop_(open_dir_beneath(&base, Path::new("sub")).map(|_| ()));
            loop_(remove_beneath(&base, Path::new("sub/f"), false));
            loop_(rename_beneath(
                &base,
                Path::new("real/f"),
                Path::new("sub/g"),
            ));
            loop_(create_dirs_beneath(&base, Path::new("sub/new"), 0o755).map(|_| ()));
            loop_(read_link_beneath(&base, Path::new("sub/x")).map(|_| ()));
            assert_eq!(
                file_type_beneath(&base, Path::new("sub")).unwrap(),
                FileType::Symlink
            );
            assert_eq!(std::fs::read(victim.join("f")).unwrap(), b"victim");
            assert!(!victim.join("g").exists() && !victim.join("new").exists());
        });
        // A symlink itself can be removed (not what it points to).
        remove_beneath(&base, Path::new("sub"), false).unwrap();
        assert!(victim.join("f").exists());
    }

    #[test]
    fn fifos_and_directories_are_not_regular_files() {
        let (_d, base, _) = world();
        let fifo = base.join("real/fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        both_ways(|| {
            for (rel, kind) in [("real/fifo", "FIFO"), ("real/deeper", "directory")] {
                match open_regular(&base, Path::new(rel)) {
                    Err(OpenError::NotRegular(k)) => assert_eq!(k, kind),
                    r => panic!("{rel}: {r:?}"),
                }
            }
        });
        match open_regular_path(&fifo) {
            Err(OpenError::NotRegular("FIFO")) => {}
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn create_dirs_and_rename_beneath() {
        let (_d, base, _) = world();
        both_ways(|| {
            create_dirs_beneath(&base, Path::new("a/b/c"), 0o755).unwrap();
            assert!(base.join("a/b/c").is_dir());
        });
        rename_beneath(&base, Path::new("real/f"), Path::new("x/y/f")).unwrap();
        assert_eq!(std::fs::read(base.join("x/y/f")).unwrap(), b"f");
        assert!(open_beneath(&base, Path::new("../base/x/y/f"), libc::O_RDONLY, 0).is_err());
        assert!(open_beneath(&base, Path::new("x/y/f"), libc::O_RDONLY, 0).is_ok());
        let k = KernelPath::new(&base, "x/y/f");
        assert_eq!(k.full(), base.join("x/y/f"));
        assert_eq!(k.with_file_name(".f.s").full(), base.join("x/y/.f.s"));
    }
}

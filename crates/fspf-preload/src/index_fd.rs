//! The run's frozen metadata index (`fspf_core::format::index`) in a sealed memfd named
//! `fspf-index` (`FSPF_INDEX_FD`), so that a shielded process starts without parsing the fspf:
//! it maps the index built by `fspf run` (or by the process that exec'd it) and reads it in
//! place. Trusted like the anchor it is checked against: only a process of the run can have
//! made it, the seals forbid any change after it was written, and it names the tag it was built
//! from, which must be the tag the run trusts now (otherwise the fspf is parsed as before).
use crate::real;
use fspf_core::volume::index_cache::{self, PagedCache};
use fspf_core::{Tag, Volume, VolumeKey};
use libc::c_int;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

const NAME: &std::ffi::CStr = c"fspf-index";
const SEALS: c_int =
    libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
/// Lowest fd number for the index memfd (next to the anchor's, out of the way of shells).
const INDEX_FD_BASE: c_int = 750;

/// Is `fd` a sealed `fspf-index` memfd? Returns its size.
fn sealed_index(fd: c_int) -> Option<usize> {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    if !link
        .as_os_str()
        .as_bytes()
        .starts_with(b"/memfd:fspf-index")
    {
        return None;
    }
    // SAFETY: querying the seals of an fd.
    let seals = unsafe { real::fcntl(fd, libc::F_GET_SEALS, 0) };
    if seals < 0 || seals & SEALS != SEALS {
        return None;
    }
    // SAFETY: fstat into a local buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { real::fstat(fd, &mut st) } != 0 || st.st_size <= 0 {
        return None;
    }
    usize::try_from(st.st_size).ok()
}

/// Map the inherited index read-only for the life of the process.
fn map(fd: c_int, len: usize) -> Option<&'static [u8]> {
    // SAFETY: a fresh read-only shared mapping of a sealed memfd of `len` bytes: the seals
    // guarantee its content and size never change, so the slice stays valid and immutable.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: the mapping above is never unmapped, hence 'static; see above for immutability.
    Some(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) })
}

/// The shield's own descriptor of the run's index cache (a close-on-exec copy of the inherited
/// one, which a program cannot close or replace: `hooks::io`), from which this process reads
/// the cache's pages; -1 when it reads none.
static PAGED_FD: AtomicI32 = AtomicI32::new(-1);

pub fn paged_fd() -> c_int {
    PAGED_FD.load(Ordering::Relaxed)
}

/// Before the program dup2()s onto `target`: move our cache descriptor out of its way.
pub fn protect_paged_fd(target: c_int) {
    let fd = paged_fd();
    if target < 0 || target != fd {
        return;
    }
    // SAFETY: duplicating our own fd.
    let n = unsafe { real::fcntl(fd, libc::F_DUPFD_CLOEXEC, (target + 1) as libc::c_ulong) };
    if n >= 0 {
        PAGED_FD.store(n, Ordering::Relaxed);
    }
}

/// The run's sealed index cache (`fspf run` hands its file over when it served, checked whole),
/// read a page at a time through a private copy of `fd`.
fn paged(fd: c_int, key: &VolumeKey) -> Option<&'static PagedCache> {
    // SAFETY: fstat of an inherited fd into a local buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { real::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return None;
    }
    // SAFETY: duplicating an inherited fd (close-on-exec: children get the inheritable one).
    let own = unsafe { real::fcntl(fd, libc::F_DUPFD_CLOEXEC, INDEX_FD_BASE as libc::c_ulong) };
    if own < 0 {
        return None;
    }
    PAGED_FD.store(own, Ordering::Relaxed);
    let read_at = Box::new(|at: u64, buf: &mut [u8]| {
        crate::files::pread_exact(paged_fd(), buf, at).map_err(std::io::Error::from_raw_os_error)
    });
    match PagedCache::open(
        read_at,
        st.st_size as u64,
        key,
        false,
        index_cache::stop_on_damage,
    ) {
        Some(c) => Some(Box::leak(Box::new(c))),
        None => {
            PAGED_FD.store(-1, Ordering::Relaxed);
            // SAFETY: closing our own copy.
            unsafe { real::close(own) };
            None
        }
    }
}

/// A volume over the inherited index, when there is one (a sealed memfd, or the run's index
/// cache) and the state it describes, with the metadata log's later records applied, is the
/// one with tag `trusted`. Returns the volume and the (relocated) fd.
pub fn inherited(fspf: &Path, key: Option<VolumeKey>, trusted: Tag) -> Option<(Volume, c_int)> {
    let v = std::env::var("FSPF_INDEX_FD").ok()?;
    let fd: c_int = v.trim().parse().ok()?;
    let mut vol = match sealed_index(fd) {
        Some(len) => Volume::from_index(fspf, key, map(fd, len)?).ok()?,
        None => {
            let c = paged(fd, key.as_ref()?)?;
            Volume::from_paged(fspf, key, c).ok()?
        }
    };
    // An index of the trusted state itself is used without reading the disk (the log's
    // position is looked up at the first commit); an older one catches up through the log.
    if vol.tag() != trusted && !matches!(vol.catch_up(), Ok(true)) {
        return None;
    }
    if vol.tag() != trusted {
        return None;
    }
    let moved = relocate(fd);
    if moved != fd {
        // Only when it moved: a program may bring its own setenv (bash does), which must not
        // run before the program itself started.
        std::env::set_var("FSPF_INDEX_FD", moved.to_string());
    }
    Some((vol, moved))
}

/// Move `fd` to a number >= INDEX_FD_BASE (inheritable), closing the old one.
fn relocate(fd: c_int) -> c_int {
    if fd >= INDEX_FD_BASE {
        return fd;
    }
    // SAFETY: duplicating our own fd.
    let n = unsafe { real::fcntl(fd, libc::F_DUPFD, INDEX_FD_BASE as libc::c_ulong) };
    if n < 0 {
        return fd;
    }
    // SAFETY: closing the old number of our own fd.
    unsafe { real::close(fd) };
    n
}

/// A new sealed index memfd for `vol` (inheritable); -1 on failure (children then parse).
pub fn create(vol: &Volume) -> c_int {
    let Ok(bytes) = vol.build_index() else {
        return -1;
    };
    match sealed_memfd(NAME, &bytes) {
        Ok(fd) => relocate(fd),
        Err(_) => -1,
    }
}

/// A new inheritable memfd named `name` holding `bytes`, sealed against any change (the
/// index, or a verified copy of a program to exec).
pub fn sealed_memfd(name: &std::ffi::CStr, bytes: &[u8]) -> Result<c_int, c_int> {
    // SAFETY: NUL-terminated name; the fd is ours.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(crate::errno());
    }
    if crate::files::pwrite_all(fd, bytes, 0).is_err() {
        // SAFETY: closing our memfd.
        unsafe { real::close(fd) };
        return Err(libc::EIO);
    }
    // SAFETY: sealing our memfd against any change.
    if unsafe { real::fcntl(fd, libc::F_ADD_SEALS, SEALS as libc::c_ulong) } != 0 {
        // SAFETY: closing our memfd.
        unsafe { real::close(fd) };
        return Err(libc::EIO);
    }
    Ok(fd)
}

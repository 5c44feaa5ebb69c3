//! The run's trust anchor: an inherited memfd (`FSPF_ANCHOR_FD`) that every process of one run
//! shares, holding the tag the run trusts, and the lock that serialises the run's committers.
//!
//! Layout: 16 bytes, the current tag; during a commit, 32 bytes: the current tag, then the tag
//! of the fspf about to replace it (announced after the new fspf is durable in its temp file,
//! before the rename that is the commit point). A committer killed inside that window leaves
//! both, and the next process accepts whichever of the two is on disk (old or new state, P9),
//! never a third. The same two states go to `FSPF_TAG_FILE` (`fspf run --tag-file`), so the tag
//! a user keeps after a crashed run is never stale.
//!
//! The lock is a POSIX record lock on the memfd: storage cannot remove or replace it (unlike
//! `FSPF.lock`, which an attacker can unlink), it is not inherited across `fork` and it is
//! released when its holder dies. Threads of one process are serialised by the shield's mutex,
//! which every committer holds.
use crate::real;
use fspf_core::Tag;
use libc::c_int;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

pub use fspf_core::session::AnchorState;
use fspf_core::view::ViewError;

pub struct Anchor {
    /// -1 when the shield failed to load. Atomic: it moves when the program dup2()s onto it.
    fd: AtomicI32,
    /// `FSPF_TAG_FILE`: where the run's current tag is kept for the user (`--tag-file`).
    tag_file: Option<PathBuf>,
}

/// Held while a process commits; unlocks on drop.
pub struct AnchorLock {
    fd: c_int,
}

fn record_lock(fd: c_int, kind: c_int, wait: bool) -> c_int {
    // SAFETY: a zeroed flock is a valid "whole file" lock request once l_type is set.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    let cmd = if wait { libc::F_SETLKW } else { libc::F_SETLK };
    loop {
        // SAFETY: fcntl record lock on our own anchor fd with a local flock struct.
        let r = unsafe { real::fcntl(fd, cmd, &mut fl as *mut libc::flock as libc::c_ulong) };
        if r == 0 || crate::errno() != libc::EINTR {
            return r;
        }
    }
}

impl Drop for AnchorLock {
    fn drop(&mut self) {
        record_lock(self.fd, libc::F_UNLCK, false);
    }
}

impl Anchor {
    pub fn new(fd: c_int, tag_file: Option<PathBuf>) -> Anchor {
        Anchor {
            fd: AtomicI32::new(fd),
            tag_file,
        }
    }

    pub fn fd(&self) -> c_int {
        self.fd.load(Ordering::Relaxed)
    }

    pub fn set_fd(&self, fd: c_int) {
        self.fd.store(fd, Ordering::Relaxed);
    }

    /// Read the anchor; `None` when there is none or it is unreadable (callers fail closed).
    pub fn read(&self) -> Option<AnchorState> {
        let fd = self.fd();
        if fd < 0 {
            return None;
        }
        let mut b = [0u8; 33];
        // SAFETY: reading into a local buffer of its size from our own anchor fd.
        let n = unsafe { real::pread(fd, b.as_mut_ptr().cast(), b.len(), 0) };
        if n < 0 {
            return None;
        }
        AnchorState::parse(&b[..n as usize])
    }

    /// Exclusive: the run's committers one at a time (blocks).
    pub fn lock(&self) -> Result<AnchorLock, c_int> {
        let fd = self.fd();
        if fd < 0 {
            return Err(libc::EACCES);
        }
        if record_lock(fd, libc::F_WRLCK, true) != 0 {
            let e = crate::errno();
            crate::say(format!("cannot lock the run's trust anchor (errno {e})"));
            return Err(libc::EACCES);
        }
        Ok(AnchorLock { fd })
    }

    fn write_bytes(&self, b: &[u8]) -> Result<(), c_int> {
        let fd = self.fd();
        if fd < 0 {
            return Err(libc::EACCES);
        }
        // SAFETY: writing a local buffer to our own anchor fd.
        let n = unsafe { real::pwrite(fd, b.as_ptr().cast(), b.len(), 0) };
        if n != b.len() as isize {
            return Err(libc::EIO);
        }
        // SAFETY: cutting our own anchor memfd to the length just written.
        if unsafe { real::ftruncate(fd, b.len() as i64) } != 0 {
            return Err(libc::EIO);
        }
        Ok(())
    }

    /// Before the commit point: trust `next` as well as `current` (under [`Anchor::lock`]).
    pub fn announce(&self, current: Tag, next: Tag) -> Result<(), c_int> {
        let mut b = [0u8; 32];
        b[..16].copy_from_slice(&current.0);
        b[16..].copy_from_slice(&next.0);
        self.write_tag_file(&[current, next])?;
        self.write_bytes(&b)
    }

    /// After the commit point (or on finding a crashed committer's commit on disk): `t` alone.
    pub fn publish(&self, t: Tag) -> Result<(), c_int> {
        self.write_bytes(&t.0)?;
        let Some(p) = &self.tag_file else {
            return Ok(());
        };
        // Not synced: the announce before it is durable and names this state too; the next
        // announce or `fspf run`'s settle at the end makes it durable.
        fspf_core::session::publish_tag_file(p, t).map_err(|e| {
            crate::say(format!("cannot write the tag file: {e}"));
            libc::EIO
        })
    }

    /// Write the tag file (`fspf_core::session::write_tag_file`). A user who finds two lines
    /// after a crash may trust either (old or new state); `fspf … --tag-file` accepts both.
    fn write_tag_file(&self, tags: &[Tag]) -> Result<(), c_int> {
        let Some(p) = &self.tag_file else {
            return Ok(());
        };
        fspf_core::session::write_tag_file(p, tags).map_err(|e| {
            crate::say(format!("cannot write the tag file: {e}"));
            libc::EIO
        })
    }
}

/// The session's view of the anchor: errors become [`ViewError::Untrusted`] (fail closed) or
/// [`ViewError::Io`].
impl fspf_core::session::Anchor for Anchor {
    type Lock = AnchorLock;
    fn read(&self) -> Option<AnchorState> {
        Anchor::read(self)
    }
    fn lock(&self) -> Result<AnchorLock, ViewError> {
        Anchor::lock(self).map_err(|_| ViewError::Untrusted)
    }
    fn announce(&self, current: Tag, next: Tag) -> Result<(), ViewError> {
        Anchor::announce(self, current, next).map_err(|_| ViewError::Io)
    }
    fn publish(&self, t: Tag) -> Result<(), ViewError> {
        Anchor::publish(self, t).map_err(|_| ViewError::Io)
    }
    fn after_commit_point(&self) {
        crash_point_for_tests();
    }
}

/// Fault injection for the crash tests: `FSPF_TEST_CRASH=after-commit-point` kills this
/// process with SIGKILL right after the new fspf replaced the old one and before the anchor
/// and tag file name it, the window in which a crash used to leave the run's tag stale.
fn crash_point_for_tests() {
    if std::env::var_os("FSPF_TEST_CRASH").is_some_and(|v| v == "after-commit-point") {
        // SAFETY: kill(2) on this process's own pid with SIGKILL; no memory is touched.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

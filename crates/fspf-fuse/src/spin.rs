//! Keeps one session thread awake while requests come close together.
//!
//! A program that waits for each reply before its next request (a `pread` loop, `cat` of many
//! small files, SQLite) pays for waking the daemon at every request: a session thread sleeps
//! in `read(/dev/fuse)`, and waking a sleeping thread on an idle core of a VM cost more than
//! serving a 4 KiB read (fio, 4 KiB random reads of a 1 GiB file: 13 600/s; 37 000 with the
//! descriptor non-blocking for good; 30 000 with this; gocryptfs, whose Go runtime spins before
//! it parks, 25 000-29 000).
//!
//! So each request puts the session's `/dev/fuse` descriptor in non-blocking mode
//! ([`Spin::touch`]): the thread reading it then retries its `read` at once on `EAGAIN` (fuser's
//! loop does) instead of sleeping. A watchdog thread puts the descriptor back in blocking mode
//! once no request came for [`WINDOW`], so an idle mount sleeps. The cost: one core busy for
//! up to `WINDOW` after the last request of a burst.
//!
//! With several session threads only one polls. `O_NONBLOCK` belongs to an open file
//! description, and each thread but one reads from a description of its own (fuser's
//! `clone_fd`: `/dev/fuse` opened again and bound to the session by `FUSE_DEV_IOC_CLONE`), which
//! stays blocking; the descriptor lent to [`Spin::attach`] duplicates the session's own, which
//! one thread reads. The kernel queues every request once for all of them: the polling thread
//! takes the next request as soon as it is free, and a sleeping one is woken for a request
//! that arrives while it is busy (the kernel also wakes a sleeping thread for requests the
//! polling one takes first; that thread finds nothing and sleeps again). Threads sharing one
//! description (fuser's default) would all poll: up to a core each.
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};

/// How long the polling thread keeps polling after the last request.
pub const WINDOW: Duration = Duration::from_millis(2);

#[derive(Default)]
struct Mode {
    /// Is the descriptor in non-blocking mode?
    spinning: bool,
    /// Has the session ended (the watchdog exits)?
    stopped: bool,
}

pub struct Spin {
    /// A duplicate of the session's own `/dev/fuse` descriptor: the same open file description,
    /// so its status flags are those the thread reading it sees (and no other thread).
    fd: OnceLock<OwnedFd>,
    start: Instant,
    /// Nanoseconds after `start` of the last request.
    last: AtomicU64,
    /// `Mode::spinning`, readable without the lock.
    spinning: AtomicBool,
    mode: Mutex<Mode>,
    wake: Condvar,
}

impl Spin {
    pub fn new() -> Arc<Spin> {
        Arc::new(Spin {
            fd: OnceLock::new(),
            start: Instant::now(),
            last: AtomicU64::new(0),
            spinning: AtomicBool::new(false),
            mode: Mutex::new(Mode::default()),
            wake: Condvar::new(),
        })
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Mode> {
        self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Set or clear `O_NONBLOCK` on the session's descriptor; `false` when that failed.
    fn set_nonblocking(&self, on: bool) -> bool {
        let Some(fd) = self.fd.get() else {
            return false;
        };
        let Ok(fl) = fcntl_getfl(fd) else {
            return false;
        };
        let fl = if on {
            fl | OFlags::NONBLOCK
        } else {
            fl - OFlags::NONBLOCK
        };
        fcntl_setfl(fd, fl).is_ok()
    }

    /// Serve the session whose `/dev/fuse` descriptor `fd` duplicates: start the watchdog.
    /// Without a call to `attach`, `touch` does nothing (every session thread just sleeps).
    /// Without a watchdog (no thread could start) it does nothing either.
    pub fn attach(self: &Arc<Spin>, fd: OwnedFd) {
        if self.fd.get().is_some() {
            return;
        }
        let me = self.clone();
        let watchdog = std::thread::Builder::new()
            .name("fspf-fuse-spin".into())
            .spawn(move || me.watch());
        if watchdog.is_ok() {
            let _ = self.fd.set(fd);
        }
    }

    /// A request came in: keep the polling thread polling until `WINDOW` after it.
    pub fn touch(&self) {
        self.last.store(self.now(), Ordering::Relaxed);
        if self.spinning.load(Ordering::Relaxed) || self.fd.get().is_none() {
            return;
        }
        let mut m = self.lock();
        if !m.spinning && !m.stopped && self.set_nonblocking(true) {
            m.spinning = true;
            self.spinning.store(true, Ordering::Relaxed);
            self.wake.notify_one();
        }
    }

    /// The session ended: put the descriptor back in blocking mode and end the watchdog.
    pub fn stop(&self) {
        let mut m = self.lock();
        m.stopped = true;
        if m.spinning {
            self.set_nonblocking(false);
            m.spinning = false;
            self.spinning.store(false, Ordering::Relaxed);
        }
        self.wake.notify_one();
    }

    fn watch(&self) {
        let mut m = self.lock();
        loop {
            while !m.spinning && !m.stopped {
                m = self.wake.wait(m).unwrap_or_else(|e| e.into_inner());
            }
            if m.stopped {
                return;
            }
            drop(m);
            std::thread::sleep(WINDOW);
            m = self.lock();
            let idle = self.now().saturating_sub(self.last.load(Ordering::Relaxed));
            if m.spinning && idle >= WINDOW.as_nanos() as u64 {
                // Back to sleeping in `read`. Should this fail, the thread keeps polling: the
                // flag stays set so that the next request does not try again at once.
                if self.set_nonblocking(false) {
                    m.spinning = false;
                    self.spinning.store(false, Ordering::Relaxed);
                }
            }
        }
    }
}

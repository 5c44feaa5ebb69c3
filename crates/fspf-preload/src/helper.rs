//! The read helper: one thread per process that verifies the second half of a large read
//! (`fspf_core::codec::Helper`) while the calling thread does the first. Starting a scoped thread
//! for each read costs about 45 us here, a fifth of a 1 MiB read; this thread is started once and
//! waits for work.
//!
//! What keeps it out of the program's way:
//! * it blocks every signal, so a signal the program directs at the process is never run on it
//!   (nor, e.g., taken from a `sigwait` thread);
//! * it exits after `IDLE` without work, so a program that later needs to be single-threaded
//!   (`unshare(CLONE_NEWUSER)`) is only refused within `IDLE` of a large read;
//! * a forked child (which has no copy of the thread) starts its own: the helper records the
//!   pid that owns it and never touches a parent's;
//! * a read that finds it busy (another thread's read, or a child forked while it was in use)
//!   runs alone: nobody waits for it.
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use fspf_core::codec::Helper;

/// How long the thread waits for work before it exits.
const IDLE: Duration = Duration::from_secs(1);
/// How long each side spins before it sleeps: the helper after a job (a sequential reader's next
/// read follows within microseconds), the caller for the helper's half. Waking a sleeping thread
/// on another core of a VM costs about as much as starting one.
const SPIN: Duration = Duration::from_micros(200);

/// `Worker::state`: no job, a job posted, the job done.
const FREE: u32 = 0;
const POSTED: u32 = 1;
const DONE: u32 = 2;

/// A job lent by `run_beside`: a closure borrowed from its caller's stack.
struct Job(*mut (dyn FnMut() + Send + 'static));

// SAFETY: the pointee is `Send` (the type says so); the pointer only travels to the helper
// thread, which calls it while `run_beside` (which owns the borrow) waits for it to finish.
unsafe impl Send for Job {}

#[derive(Default)]
struct Slot {
    job: Option<Job>,
    /// Is a thread serving this slot (it clears this, under the lock, when it exits idle)?
    alive: bool,
}

struct Worker {
    /// `FREE`, `POSTED` or `DONE`; changed under `slot`'s lock, read without it while spinning.
    state: AtomicU32,
    slot: Mutex<Slot>,
    posted: Condvar,
    finished: Condvar,
}

/// The process's helper: the pid it belongs to and its worker (leaked: a forked child may hold a
/// copy whose thread does not exist, and must neither join nor free it).
pub struct ReadHelper {
    current: Mutex<Option<(u32, &'static Worker)>>,
}

pub static READ_HELPER: ReadHelper = ReadHelper {
    current: Mutex::new(None),
};

/// Spin until `state` holds `want` or `SPIN` has passed; whether it does.
fn spin_for(state: &AtomicU32, want: u32) -> bool {
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            if state.load(Ordering::Acquire) == want {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() >= SPIN {
            return state.load(Ordering::Acquire) == want;
        }
    }
}

impl Worker {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn serve(&'static self) {
        block_signals();
        loop {
            spin_for(&self.state, POSTED);
            let mut slot = self.lock();
            while self.state.load(Ordering::Acquire) != POSTED {
                let (s, timeout) = self
                    .posted
                    .wait_timeout(slot, IDLE)
                    .unwrap_or_else(|e| e.into_inner());
                slot = s;
                if timeout.timed_out() && self.state.load(Ordering::Acquire) != POSTED {
                    slot.alive = false;
                    return;
                }
            }
            let job = slot.job.take();
            drop(slot);
            if let Some(Job(job)) = job {
                // SAFETY: `run_beside` posted this pointer to a closure that outlives the call:
                // it waits, before it returns or unwinds, until the state is `DONE` (below), so
                // the borrow is live and used by this thread alone until then.
                let job = unsafe { &mut *job };
                // A panic was reported by the panic hook; the job's result stays unset, which the
                // reader treats as "do it again alone".
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
            let _slot = self.lock();
            self.state.store(DONE, Ordering::Release);
            self.finished.notify_all();
        }
    }

    /// Start a thread for this worker; `false` when none can be started.
    fn start(&'static self) -> bool {
        std::thread::Builder::new()
            .name("fspf-read".into())
            .stack_size(256 * 1024)
            .spawn(move || self.serve())
            .is_ok()
    }
}

/// Block every signal in the calling thread (the helper's own).
fn block_signals() {
    // SAFETY: sigfillset initialises the local set; pthread_sigmask only changes this thread's
    // mask and accepts a null old-set pointer.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
}

/// Waits for the lent job when dropped, so that no path out of `run_beside` (a panic of `own`
/// included) leaves the helper thread using a borrow that has ended.
struct AwaitJob(&'static Worker);

impl Drop for AwaitJob {
    fn drop(&mut self) {
        let w = self.0;
        if !spin_for(&w.state, DONE) {
            let mut slot = w.lock();
            while w.state.load(Ordering::Acquire) != DONE {
                slot = w.finished.wait(slot).unwrap_or_else(|e| e.into_inner());
            }
        }
        w.state.store(FREE, Ordering::Release);
    }
}

impl Helper for ReadHelper {
    fn run_beside(&self, job: &mut (dyn FnMut() + Send), own: &mut dyn FnMut()) -> bool {
        // Held for the whole call: one lent job at a time. Busy, or left locked by a thread
        // that does not exist in this forked child: run alone.
        let mut current = match self.current.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        let pid = std::process::id();
        let worker = match *current {
            Some((p, w)) if p == pid => w,
            // None yet, or the parent's (its thread is not in this process): a new one.
            _ => {
                let w: &'static Worker = Box::leak(Box::new(Worker {
                    state: AtomicU32::new(FREE),
                    slot: Mutex::new(Slot::default()),
                    posted: Condvar::new(),
                    finished: Condvar::new(),
                }));
                *current = Some((pid, w));
                w
            }
        };
        {
            let mut slot = worker.lock();
            if !slot.alive {
                if !worker.start() {
                    return false;
                }
                slot.alive = true;
            }
            let job: *mut (dyn FnMut() + Send + '_) = job;
            // SAFETY: only the lifetime bound is erased. `AwaitJob` below waits until the helper
            // has finished with the pointer before this function returns or unwinds, so the
            // pointee outlives every use.
            let job: *mut (dyn FnMut() + Send + 'static) = unsafe { std::mem::transmute(job) };
            slot.job = Some(Job(job));
            worker.state.store(POSTED, Ordering::Release);
            worker.posted.notify_one();
        }
        let wait = AwaitJob(worker);
        own();
        drop(wait);
        true
    }
}

//! The FUSE shield: an fspf volume served through the kernel's FUSE interface, for what the
//! in-process shield cannot see (static binaries, Go programs, raw system calls, `io_uring`,
//! what `ld.so` maps).
//!
//! The filesystem rules are `fspf_core::session`'s: this crate only adapts FUSE requests to a
//! [`Session`] (inode numbers to embed paths, file handles to readers and write buffers,
//! `ViewError`s to errnos) and decides when to commit (fsync, a full batch, every
//! [`Config::commit_interval`], unmount). The daemon's trust anchor is its own memory
//! ([`DaemonAnchor`]); `--tag-file` receives the tag after every commit.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod fs;
mod spin;

use fspf_core::session::{Anchor, AnchorState, Session, SessionConfig};
use fspf_core::view::ViewError;
use fspf_core::{EmbedPath, Tag, Volume, VolumeKey, VolumeOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `FSPF_DEBUG` is set: diagnostics go to the daemon's log (read once).
pub(crate) fn debug() -> bool {
    static D: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *D.get_or_init(|| std::env::var_os("FSPF_DEBUG").is_some())
}

/// What to mount and how.
#[derive(Debug, Clone)]
pub struct Config {
    pub fspf: PathBuf,
    pub key: Option<VolumeKey>,
    /// The tag the user trusts; `None`: the tag on disk (freshness not checked).
    pub tag: Option<Tag>,
    /// Kernel regions take writes.
    pub mutable: bool,
    /// Show one region (its embed point at the mount's root) instead of the whole namespace.
    pub region: Option<EmbedPath>,
    /// Let other users reach the mount (`allow_other`; for non-root users it needs
    /// `user_allow_other` in `/etc/fuse.conf`).
    pub allow_other: bool,
    /// Where the current tag is kept (rewritten atomically after every commit).
    pub tag_file: Option<PathBuf>,
    /// The tag file is the user's durable anchor (`--tag-file`): each announce before a commit
    /// point is synced, so that after a power loss it names the state on disk. `false` for the
    /// file `fspf mount` keeps for `fspf umount` in a runtime directory: written, not synced
    /// (one device flush less per commit).
    pub tag_file_durable: bool,
    /// Staged changes are committed at the latest this long after they were made.
    pub commit_interval: Duration,
    /// Session threads serving requests (default 2; 0 counts as 1; `FSPF_FUSE_THREADS` in the
    /// environment overrides it). Each reads requests from a `/dev/fuse` descriptor of its own
    /// (`FUSE_DEV_IOC_CLONE`). Reads of open files run at once on them without the daemon's
    /// one state lock; writes hold it to find their buffer, every other request throughout
    /// (docs/FUSE.md, "Threads").
    pub threads: usize,
}

impl Config {
    pub fn new(fspf: PathBuf) -> Config {
        Config {
            fspf,
            key: None,
            tag: None,
            mutable: false,
            region: None,
            allow_other: false,
            tag_file: None,
            tag_file_durable: true,
            commit_interval: Duration::from_secs(1),
            threads: 2,
        }
    }
}

/// Why a mount failed.
#[derive(Debug)]
pub enum MountError {
    /// The fspf did not open with the key and tag given.
    Volume(fspf_core::Error),
    /// `--region` names no region of the fspf.
    NoSuchRegion(String),
    /// The mount itself failed (no `/dev/fuse`, no `fusermount3`, a busy mountpoint).
    Mount(std::io::Error),
}

impl std::fmt::Display for MountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MountError::Volume(e) => write!(f, "{e}"),
            MountError::NoSuchRegion(r) => write!(f, "--region {r}: the fspf has no region there"),
            MountError::Mount(e) => write!(
                f,
                "mounting failed: {e} (FUSE needs /dev/fuse and, for non-root users, fusermount3 from the fuse3 package)"
            ),
        }
    }
}

impl std::error::Error for MountError {}

/// The daemon's trust anchor: the tag in memory (nothing on the untrusted disk), mirrored to
/// the tag file. The daemon's one state mutex serialises its commits; other processes are kept
/// out by the fspf's lock file, and a commit that finds a tag on disk it does not trust fails.
pub struct DaemonAnchor {
    state: Mutex<AnchorState>,
    tag_file: Option<PathBuf>,
    /// Announces are synced ([`Config::tag_file_durable`]).
    durable: bool,
}

impl DaemonAnchor {
    fn new(tag: Tag, tag_file: Option<PathBuf>, durable: bool) -> DaemonAnchor {
        DaemonAnchor {
            state: Mutex::new(AnchorState {
                current: tag,
                pending: None,
            }),
            tag_file,
            durable,
        }
    }

    /// The tag the daemon trusts now.
    pub fn current(&self) -> Tag {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).current
    }

    /// Write the tag file (`fspf_core::session::write_tag_file`; not synced when it is only
    /// the channel to `fspf umount`, `mirror_tag_file`).
    fn write_tag_file(&self, tags: &[Tag]) -> Result<(), ViewError> {
        let Some(p) = &self.tag_file else {
            return Ok(());
        };
        let written = if self.durable {
            fspf_core::session::write_tag_file(p, tags)
        } else {
            fspf_core::session::mirror_tag_file(p, tags)
        };
        written.map_err(|e| {
            eprintln!("fspf mount: cannot write the tag file: {e}");
            ViewError::Io
        })
    }
}

impl Anchor for DaemonAnchor {
    type Lock = ();
    fn read(&self) -> Option<AnchorState> {
        Some(*self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }
    fn lock(&self) -> Result<(), ViewError> {
        Ok(())
    }
    fn announce(&self, current: Tag, next: Tag) -> Result<(), ViewError> {
        self.write_tag_file(&[current, next])?;
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = AnchorState {
            current,
            pending: Some(next),
        };
        Ok(())
    }
    fn publish(&self, t: Tag) -> Result<(), ViewError> {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = AnchorState {
            current: t,
            pending: None,
        };
        let Some(p) = &self.tag_file else {
            return Ok(());
        };
        // Not synced: the announce before it is durable and names this state too; the next
        // announce or the settle at unmount makes it durable.
        fspf_core::session::publish_tag_file(p, t).map_err(|e| {
            eprintln!("fspf mount: cannot write the tag file: {e}");
            ViewError::Io
        })
    }
}

impl DaemonAnchor {
    /// Make the tag file name the current tag alone, durably (at unmount).
    pub fn settle(&self) {
        if let Some(p) = &self.tag_file {
            if let Err(e) = fspf_core::session::settle_tag_file(p, self.current()) {
                eprintln!("fspf mount: cannot write the tag file: {e}");
            }
        }
    }
}

/// The journals and small new versions the daemon's log carries before a checkpoint, at least
/// (`VolumeOptions::log_journals`). A SQLite transaction in the default rollback-journal mode
/// puts its `-journal` (a few KiB) into two records: with the in-process shield's 256 KiB, a
/// checkpoint (the whole fspf sealed again, a `syncfs`) came every 15 transactions or so. The
/// daemon reads its log once, at the mount; a process that opens the volume later reads it once
/// too, and its first commit writes a checkpoint.
const LOG_JOURNALS: u64 = 4 << 20;

/// Raise this process's soft limit on open files to its hard limit. The daemon holds a memfd
/// per file buffer (up to a batch of 500 files between commits) and two descriptors per open
/// protected file; under the soft limit many systems start services with (1 024, or less), a
/// `cp -r` failed with `EIO` once the buffers had used it up. Nothing in the daemon uses
/// `select`, which the soft limit protects. Best effort: an error leaves the limit as it was.
/// Only in a daemon of its own (`mount_foreground`): `fspf run --mount-namespace` serves the
/// mount from the process that then starts the program, which keeps the limit it was given.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: l.maximum,
                maximum: l.maximum,
            },
        );
    }
}

/// Open the volume and build the filesystem (not yet mounted).
fn build(cfg: &Config) -> Result<fs::FspfFs, MountError> {
    // Staged files are not fsync'd one by one: the session's commit makes them durable with one
    // `syncfs` per kernel region before its commit point.
    let opts = VolumeOptions {
        sync_each_file: false,
        log: true,
        log_journals: LOG_JOURNALS,
        ..VolumeOptions::default()
    };
    let vol =
        Volume::open_with(&cfg.fspf, cfg.key.clone(), cfg.tag, opts).map_err(MountError::Volume)?;
    vol.check_usable().map_err(MountError::Volume)?;
    let root = match &cfg.region {
        Some(r) => {
            if !vol.regions().iter().any(|x| &x.embed_point == r) {
                return Err(MountError::NoSuchRegion(r.to_string()));
            }
            r.clone()
        }
        None => EmbedPath::root(),
    };
    let anchor = Arc::new(DaemonAnchor::new(
        vol.tag(),
        cfg.tag_file.clone(),
        cfg.tag_file_durable,
    ));
    anchor
        .write_tag_file(&[vol.tag()])
        .map_err(|_| MountError::Mount(std::io::Error::other("cannot write the tag file")))?;
    let mut scfg = SessionConfig::new(
        std::path::absolute(&cfg.fspf).unwrap_or_else(|_| cfg.fspf.clone()),
        cfg.key.clone(),
        opts,
    );
    scfg.mutable = cfg.mutable;
    scfg.say = |m| eprintln!("fspf mount: {m}");
    scfg.log = |m| {
        if debug() {
            eprintln!("fspf mount: {m}")
        }
    };
    let session = Session::new(scfg, anchor.clone(), Some(vol));
    Ok(fs::FspfFs::new(session, anchor, root))
}

fn options(cfg: &Config) -> fuser::Config {
    use fuser::MountOption as O;
    let mut c = fuser::Config::default();
    c.mount_options = vec![
        O::FSName(format!("fspf:{}", cfg.fspf.display())),
        O::Subtype("fspf".into()),
        O::DefaultPermissions,
        O::RW,
        O::NoDev,
        O::NoSuid,
    ];
    c.acl = if cfg.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    // `FSPF_FUSE_THREADS` in the daemon's environment overrides the configuration.
    let threads = std::env::var("FSPF_FUSE_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cfg.threads)
        .max(1);
    // Each thread but one reads from a clone of the session's descriptor, opened from
    // `/dev/fuse` again: when that cannot be opened, one thread serves the session (the spin
    // needs descriptors of their own, see `spin.rs`: threads never share one).
    let clonable = threads == 1
        || std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .is_ok();
    c.n_threads = Some(if clonable { threads } else { 1 });
    c.clone_fd = true;
    c
}

/// The FUSE session of `fs` mounted at `mountpoint` (the kernel's `INIT` answered: `init` has
/// run), with its `/dev/fuse` descriptor lent to the filesystem's [`spin::Spin`].
fn session(
    fs: fs::FspfFs,
    mountpoint: &Path,
    cfg: &Config,
) -> std::io::Result<fuser::Session<fs::FspfFs>> {
    use std::os::fd::AsFd;
    let spin = fs.spin();
    let se = fuser::Session::new(fs, mountpoint, &options(cfg))?;
    // The session's own descriptor: the one its last thread reads from (the others read from
    // clones, which stay blocking). Without the duplicate (no descriptors left) that thread
    // just sleeps between requests, as the others do.
    if let Ok(fd) = se.as_fd().try_clone_to_owned() {
        spin.attach(fd);
    }
    Ok(se)
}

/// A mounted volume served by background threads; unmounted (and its changes committed) when
/// dropped or by [`Mounted::unmount`].
pub struct Mounted {
    /// The thread running the session (which runs its worker threads and, once they end,
    /// `destroy`: the final commit).
    session: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    unmounter: Option<fuser::SessionUnmounter>,
    spin: Arc<spin::Spin>,
    anchor: Arc<DaemonAnchor>,
    stop: Arc<AtomicBool>,
    committer: Option<std::thread::JoinHandle<()>>,
    mountpoint: PathBuf,
}

impl Mounted {
    /// The tag the daemon trusts now (after its last commit).
    pub fn tag(&self) -> Tag {
        self.anchor.current()
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmount, commit what is left and return the final tag.
    pub fn unmount(mut self) -> Tag {
        self.finish();
        self.anchor.current()
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(mut u) = self.unmounter.take() {
            // Should it fail (the mount is busy), the session ends when it is unmounted.
            if let Err(e) = u.unmount() {
                eprintln!(
                    "fspf mount: unmounting {} failed: {e}; waiting for it to be unmounted",
                    self.mountpoint.display()
                );
            }
        }
        if let Some(s) = self.session.take() {
            match s.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("fspf mount: the session ended with an error: {e}"),
                Err(_) => eprintln!("fspf mount: the session thread panicked"),
            }
        }
        self.spin.stop();
        if let Some(c) = self.committer.take() {
            let _ = c.join();
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Mount `cfg` at `mountpoint`, served by background threads.
pub fn mount(cfg: &Config, mountpoint: &Path) -> Result<Mounted, MountError> {
    let fs = build(cfg)?;
    let anchor = fs.anchor();
    let (stop, committer) = fs.spawn_committer(cfg.commit_interval);
    let spin = fs.spin();
    let started = session(fs, mountpoint, cfg).and_then(|mut se| {
        let unmounter = se.unmount_callable();
        let t = std::thread::Builder::new()
            .name("fspf-fuse".into())
            .spawn(move || se.run())?;
        Ok((t, unmounter))
    });
    let (session, unmounter) = started.map_err(|e| {
        stop.store(true, Ordering::Relaxed);
        spin.stop();
        MountError::Mount(e)
    })?;
    Ok(Mounted {
        session: Some(session),
        unmounter: Some(unmounter),
        spin,
        anchor,
        stop,
        committer: Some(committer),
        mountpoint: mountpoint.to_path_buf(),
    })
}

/// Mount `cfg` at `mountpoint` and serve it until it is unmounted (`fusermount3 -u`,
/// `fspf umount`): this thread waits for the session's threads; `ready` runs once the mount is
/// in place. Returns the final tag.
pub fn mount_foreground(
    cfg: &Config,
    mountpoint: &Path,
    ready: impl FnOnce(Tag) + Send + 'static,
) -> Result<Tag, MountError> {
    raise_open_files_limit();
    let mut fs = build(cfg)?;
    let anchor = fs.anchor();
    fs.on_init(Box::new(ready));
    let (stop, committer) = fs.spawn_committer(cfg.commit_interval);
    // SIGINT, SIGTERM, SIGHUP: unmount, so that the session ends through `destroy` and commits
    // (a daemon killed by them would lose what was staged since its last commit).
    let mp = mountpoint.to_path_buf();
    if let Ok(mut signals) = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ]) {
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                let unmounted = std::process::Command::new("fusermount3")
                    .arg("-u")
                    .arg(&mp)
                    .status()
                    .is_ok_and(|s| s.success());
                if !unmounted {
                    let _ = std::process::Command::new("umount").arg(&mp).status();
                }
            }
        });
    }
    let spin = fs.spin();
    let r = session(fs, mountpoint, cfg).and_then(|se| se.run());
    spin.stop();
    stop.store(true, Ordering::Relaxed);
    let _ = committer.join();
    r.map_err(MountError::Mount)?;
    Ok(anchor.current())
}

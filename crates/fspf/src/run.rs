//! `fspf run`: start a program under the in-process shield (`libfspf_preload.so`).
//!
//! Checks the fspf with the key and tag first (a clear error instead of a shielded program that
//! refuses every file), creates the run's trust anchor (an inherited memfd holding the current
//! tag, named by `FSPF_ANCHOR_FD`), hands the key over in a memfd (`FSPF_KEY_FD`, never in the
//! child's environment), runs the program and exits with its status.
use crate::KeyTagArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use fspf_core::{Tag, Volume};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// the fspf (or SCONE_FSPF)
    #[arg(long, value_name = "FSPF", env = "SCONE_FSPF")]
    pub fspf: Option<PathBuf>,
    #[command(flatten)]
    pub kt: KeyTagArgs,
    /// allow updates of protected kernel regions (or SCONE_FSPF_MUTABLE=1)
    #[arg(long, env = "SCONE_FSPF_MUTABLE", value_parser = clap::builder::FalseyValueParser::new())]
    pub mutable: bool,
    /// keep the run's current fspf tag (hex) in this file: written at the start, by every
    /// commit of the run (both tags while a commit is in flight) and at the end
    #[arg(long, value_name = "PATH")]
    pub tag_file: Option<PathBuf>,
    /// serve the protected regions with FUSE at their embed paths, in a private mount namespace
    /// (root only): for static binaries and programs the in-process shield cannot see
    #[arg(long)]
    pub mount_namespace: bool,
    /// program and arguments
    #[arg(trailing_var_arg = true, required = true, value_name = "PROG")]
    pub argv: Vec<String>,
}

/// The hidden sub-command that `exec`s its arguments from inside the shield.
pub const EXEC_SHIELDED: &str = "__exec-shielded";

/// Is `p` in a protected kernel region (where the kernel must not load it by path)? The
/// program named to `fspf run` in an ephemeral region is the host's file, as in the reference
/// (an ephemeral `/` starts empty, yet the program runs).
fn shielded_path(vol: &Volume, p: &Path) -> bool {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    match fspf_core::EmbedPath::from_path(&abs) {
        Ok(ep) => vol.region_for(&ep).is_some_and(|r| {
            r.protection != fspf_core::Protection::NotProtected
                && matches!(r.kind, fspf_core::RegionKind::Kernel(_))
        }),
        Err(_) => true,
    }
}

/// Does `file` start with a `#!` line naming an interpreter in a protected region?
fn shebang_shielded(vol: &Volume, file: &Path) -> bool {
    let mut head = [0u8; 256];
    let n = std::fs::File::open(file)
        .and_then(|mut f| f.read(&mut head))
        .unwrap_or(0);
    let Some(line) = head[..n].strip_prefix(b"#!") else {
        return false;
    };
    let line = line.split(|&c| c == b'\n').next().unwrap_or(line);
    let interp = line
        .split(|&c| c == b' ' || c == b'\t')
        .find(|w| !w.is_empty())
        .unwrap_or_default();
    use std::os::unix::ffi::OsStrExt;
    !interp.is_empty() && shielded_path(vol, Path::new(std::ffi::OsStr::from_bytes(interp)))
}

/// Must `prog` be started under the shield (see [`EXEC_SHIELDED`])? Resolves it like `execvp`;
/// when in doubt, yes.
fn needs_shielded_exec(vol: &Volume, prog: &str) -> bool {
    let check = |p: &Path| shielded_path(vol, p) || shebang_shielded(vol, p);
    if prog.contains('/') {
        return check(Path::new(prog));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/bin:/usr/bin".into());
    for dir in std::env::split_paths(&path) {
        let cand = dir.join(prog);
        if shielded_path(vol, &cand) {
            return true;
        }
        if cand.is_file() {
            return shebang_shielded(vol, &cand);
        }
    }
    true
}

/// `fspf __exec-shielded -- PROG ARGS…`, run with the preload library: replace this process
/// by PROG through the shield's `execvp` hook (verified copy, `#!` interpreters included).
pub fn exec_shielded(argv: &[String]) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let Some(prog) = argv.first() else {
        bail!("nothing to execute");
    };
    let e = Command::new(prog).args(&argv[1..]).exec();
    eprintln!("fspf: cannot execute {prog}: {e}");
    Ok(if e.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

/// The preload library built into this binary (feature `embed-preload`; empty without it).
static EMBEDDED_PRELOAD: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libfspf_preload.so"));
/// A name for this build's library (computed by build.rs from its bytes).
const EMBEDDED_PRELOAD_ID: &str = include_str!(concat!(env!("OUT_DIR"), "/libfspf_preload.id"));

/// Where the preload library is: `FSPF_PRELOAD`, next to this executable, `../lib/fspf/`, or
/// the copy embedded in this binary, written once to a private cache directory.
pub fn find_preload() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FSPF_PRELOAD").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("FSPF_PRELOAD={} does not exist", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating the fspf executable")?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let candidates = [
        dir.join("libfspf_preload.so"),
        dir.join("../lib/fspf/libfspf_preload.so"),
    ];
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    if !EMBEDDED_PRELOAD.is_empty() {
        return extract_embedded_preload();
    }
    bail!(
        "libfspf_preload.so not found (looked in {} and {}); build it with `cargo build -p fspf-preload` or set FSPF_PRELOAD",
        candidates[0].display(),
        candidates[1].display()
    )
}

fn is_loader(exe: &Path) -> bool {
    exe.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("ld-linux") || n.starts_with("ld-musl"))
}

/// The `fspf` executable (not the dynamic loader that may have started it, see
/// [`self_command`]).
pub fn self_exe() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the fspf executable")?;
    if !is_loader(&exe) {
        return Ok(exe);
    }
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .context("fspf was started through the dynamic loader without an absolute path")
}

/// A command that runs this `fspf` again. In a protected image, `fspf` is started through the
/// dynamic loader bundled beside it (`/.fspf/lib/ld-linux-x86-64.so.2 --library-path /.fspf/lib
/// /.fspf/bin/fspf …`, so that it runs whatever C library the image has, or none): then the
/// executable is the loader, and the same loader and library path start it again.
pub fn self_command() -> Result<Command> {
    let exe = std::env::current_exe().context("locating the fspf executable")?;
    if is_loader(&exe) {
        let prog = self_exe()?;
        let mut c = Command::new(&exe);
        c.arg("--library-path")
            .arg(exe.parent().unwrap_or(Path::new("/")))
            .arg(prog);
        return Ok(c);
    }
    Ok(Command::new(exe))
}

/// The bytes of the preload library this `fspf` uses (for `fspf image protect`, which puts it
/// into the image beside the binary).
pub fn preload_bytes() -> Result<Vec<u8>> {
    if !EMBEDDED_PRELOAD.is_empty() && std::env::var_os("FSPF_PRELOAD").is_none_or(|p| p.is_empty())
    {
        return Ok(EMBEDDED_PRELOAD.to_vec());
    }
    let p = find_preload()?;
    std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
}

/// The embedded library as a file the dynamic loader can open by name in every process of the
/// run (a memfd would have to survive `close_fds` in each of them): content-addressed, in a
/// directory only this user can write (`$XDG_CACHE_HOME/fspf`, `~/.cache/fspf`, or
/// `/tmp/fspf-UID`), checked against the embedded bytes on every use and rewritten when it
/// differs.
fn extract_embedded_preload() -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let uid = rustix::process::getuid().as_raw();
    let dir = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(|c| PathBuf::from(c).join("fspf"))
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache/fspf"))
        })
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/fspf-{uid}")));
    private_dir(
        &dir,
        "it holds the preload library; fix it or set FSPF_PRELOAD",
    )?;
    let path = dir.join(format!("libfspf_preload-{EMBEDDED_PRELOAD_ID}.so"));
    if std::fs::read(&path).is_ok_and(|b| b == EMBEDDED_PRELOAD) {
        return Ok(path);
    }
    let tmp = dir.join(format!(".libfspf_preload-{}.tmp", std::process::id()));
    std::fs::write(&tmp, EMBEDDED_PRELOAD)
        .and_then(|_| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o500)))
        .and_then(|_| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing the embedded preload library to {}", path.display()))?;
    Ok(path)
}

/// Make `dir` (mode 0700) and check that it is a directory owned by this user and writable only
/// by it; `why` ends the error message.
pub(crate) fn private_dir(dir: &Path, why: &str) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let uid = rustix::process::getuid().as_raw();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let md = std::fs::symlink_metadata(dir).with_context(|| format!("{}", dir.display()))?;
    if !md.is_dir() || md.uid() != uid || md.permissions().mode() & 0o022 != 0 {
        bail!(
            "{} must be a directory owned by uid {uid} and writable only by it ({why})",
            dir.display()
        );
    }
    Ok(())
}

/// An inheritable memfd holding `content`, sealed against any change.
fn sealed_memfd(name: &str, content: &[u8]) -> Result<OwnedFd> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = rustix::fs::memfd_create(name, MemfdFlags::ALLOW_SEALING)
        .with_context(|| format!("memfd_create({name})"))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(content)?;
    rustix::fs::fcntl_add_seals(
        &f,
        SealFlags::SEAL | SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE,
    )
    .with_context(|| format!("sealing {name}"))?;
    Ok(f.into())
}

/// A mutable run's shared-buffer directory (`/dev/shm/fspf-run-<hex>`, 0700): plaintext of the
/// files the run's processes have open for writing, in RAM. Removed with everything in it when
/// dropped. None when it cannot be made (the run then keeps one buffer per process).
///
/// The run holds an exclusive `flock` on the directory while it lives. A run killed before it
/// could remove its directory leaves it unlocked, and the next mutable run of the same user
/// removes it (plaintext does not outlive a crashed run for longer than the next start).
struct BufDir(PathBuf, #[allow(dead_code)] std::fs::File);

const BUFDIR_PREFIX: &str = "fspf-run-";

impl BufDir {
    fn new() -> Option<BufDir> {
        use std::os::unix::fs::DirBuilderExt;
        sweep_buffer_dirs(Path::new("/dev/shm"));
        let mut r = [0u8; 8];
        fspf_core::crypto::random_bytes(&mut r).ok()?;
        let p = PathBuf::from(format!("/dev/shm/{BUFDIR_PREFIX}{}", hex::encode(r)));
        std::fs::DirBuilder::new().mode(0o700).create(&p).ok()?;
        let Some(f) = std::fs::File::open(&p).ok().filter(lock_dir) else {
            let _ = std::fs::remove_dir_all(&p);
            return None;
        };
        Some(BufDir(p, f))
    }
}

impl Drop for BufDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An exclusive, non-blocking `flock` on an open directory.
fn lock_dir(f: &std::fs::File) -> bool {
    rustix::fs::flock(f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
}

/// Remove the buffer directories under `base` that this user's killed runs left behind: those
/// no living run holds locked.
fn sweep_buffer_dirs(base: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(base) else {
        return;
    };
    let me = rustix::process::geteuid().as_raw();
    for d in rd.flatten() {
        if !d.file_name().to_string_lossy().starts_with(BUFDIR_PREFIX) {
            continue;
        }
        let p = d.path();
        let mine = std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir() && m.uid() == me);
        if mine && std::fs::File::open(&p).is_ok_and(|f| lock_dir(&f)) {
            let _ = std::fs::remove_dir_all(&p);
        }
    }
}

/// An inheritable memfd holding `content`.
fn memfd(name: &str, content: &[u8]) -> Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::empty())
        .with_context(|| format!("memfd_create({name})"))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(content)?;
    Ok(f.into())
}

/// The run's final tag from its anchor: the current tag, or, when a committer was killed inside
/// its commit window (the anchor holds two tags), whichever of the two is on disk.
fn settle(fspf: &Path, anchor: OwnedFd) -> Result<Tag> {
    let mut f = std::fs::File::from(anchor);
    f.rewind()?;
    let mut b = Vec::new();
    f.read_to_end(&mut b).context("reading the trust anchor")?;
    let tag = |s: &[u8]| {
        let mut t = [0u8; 16];
        t.copy_from_slice(s);
        Tag(t)
    };
    match b.len() {
        16 => {
            // The run's processes read from the trusted state they hold (the frozen index), not
            // from the disk: a fspf swapped in during the run is caught here at the latest.
            let t = tag(&b);
            let disk = Volume::read_tag(fspf)?;
            if disk != t {
                bail!(
                    "{}: the fspf on disk (tag {disk}) is not the one the run ended with ({t}): replaced or rolled back during the run",
                    fspf.display()
                );
            }
            Ok(t)
        }
        32 => {
            let (cur, next) = (tag(&b[..16]), tag(&b[16..]));
            let disk = Volume::read_tag(fspf)?;
            if disk == next || disk == cur {
                Ok(disk)
            } else {
                bail!(
                    "{}: the fspf on disk (tag {disk}) is neither of the run's trusted tags ({cur}, {next})",
                    fspf.display()
                )
            }
        }
        n => bail!("the run's trust anchor holds {n} bytes, not 16 or 32"),
    }
}

pub fn run(a: RunArgs) -> Result<i32> {
    if a.mount_namespace {
        return crate::mount::run_namespaced(a);
    }
    let Some(fspf) = a.fspf.clone() else {
        bail!("no fspf given: use --fspf FSPF or set SCONE_FSPF");
    };
    let fspf = std::path::absolute(&fspf).unwrap_or(fspf);
    let (key, tag, vol, cache) = a.kt.open_for_shielded_run(&fspf)?;
    if tag.is_none() && vol.is_encrypted() {
        eprintln!(
            "fspf: warning: no --tag (or SCONE_FSPF_TAG) given: freshness of {} is not checked",
            fspf.display()
        );
    }
    // Without a tag, the tag on disk now becomes the run's trust anchor.
    let tag: Tag = vol.tag();
    let preload = find_preload()?;
    let tag_file = a
        .tag_file
        .as_ref()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()));
    if let Some(p) = &tag_file {
        fspf_core::session::start_tag_file(p, tag)?;
    }
    let anchor = memfd("fspf-anchor", &tag.0)?;
    // The frozen index of this state: the run's shielded processes map it instead of parsing
    // the fspf each (their start then costs nothing in the volume's size).
    // When the sealed index cache served (checked whole), the processes read its pages from
    // the file this process opened, only those they need: a start costs no copy of the index.
    let index: OwnedFd = match (cache, vol.index_bytes()) {
        (Some(f), _) => {
            rustix::io::fcntl_setfd(&f, rustix::io::FdFlags::empty())
                .context("passing the index cache to the program")?;
            f.into()
        }
        (None, Some(b)) => sealed_memfd("fspf-index", b)?,
        (None, None) => sealed_memfd("fspf-index", &vol.build_index()?)?,
    };
    let key_fd = match &key {
        Some(k) => Some(memfd("fspf-key", k.to_hex().as_bytes())?),
        None => None,
    };
    // The memfd on which the run's processes lock protected files for each other (empty: only
    // its locks matter; docs/SHIELD.md "Locks").
    let locks = memfd("fspf-locks", &[])?;
    // Mutable runs: the directory in RAM where the run's processes share their write buffers
    // (one per file, docs/SHIELD.md "Shared write buffers"); removed when the program ends.
    // (`FSPF_SHARED_BUFFERS=0`: none; every process keeps private buffers, as before them.)
    let shared = std::env::var_os("FSPF_SHARED_BUFFERS").is_none_or(|v| v != "0");
    let bufdir = if a.mutable && shared {
        BufDir::new()
    } else {
        None
    };
    let ld = match std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        Some(old) => {
            let mut s = preload.clone().into_os_string();
            s.push(":");
            s.push(old);
            s
        }
        None => preload.clone().into_os_string(),
    };
    // A program (or its `#!` interpreter) in a protected region must not be loaded from disk by
    // the kernel: start it through this binary under the shield, whose exec hook runs it from a
    // verified copy.
    let mut cmd = if needs_shielded_exec(&vol, &a.argv[0]) {
        let mut c = self_command()?;
        c.arg(EXEC_SHIELDED).arg("--").arg(&a.argv[0]);
        c
    } else {
        Command::new(&a.argv[0])
    };
    drop(vol);
    cmd.args(&a.argv[1..])
        .env("LD_PRELOAD", ld)
        .env("SCONE_FSPF", &fspf)
        .env("SCONE_FSPF_TAG", tag.to_hex())
        .env("FSPF_ANCHOR_FD", anchor.as_raw_fd().to_string())
        .env("FSPF_INDEX_FD", index.as_raw_fd().to_string())
        .env("FSPF_LOCKS_FD", locks.as_raw_fd().to_string())
        .env_remove("FSPF_BUFDIR")
        .env_remove("SCONE_FSPF_KEY")
        .env_remove("FSPF_KEY_FD");
    if let Some(k) = &key_fd {
        cmd.env("FSPF_KEY_FD", k.as_raw_fd().to_string());
    }
    if a.mutable {
        cmd.env("SCONE_FSPF_MUTABLE", "1");
    }
    if let Some(d) = &bufdir {
        cmd.env("FSPF_BUFDIR", &d.0);
    }
    match &tag_file {
        Some(p) => cmd.env("FSPF_TAG_FILE", p),
        None => cmd.env_remove("FSPF_TAG_FILE"),
    };
    if !a.mutable {
        // Nothing of the run can move the anchor (only mutable runs commit), so there is no
        // final tag to settle: become the program instead of waiting for it (one process and
        // one wait fewer per run; the program's exit status and signals are its own).
        use std::os::unix::process::CommandExt;
        let e = cmd.exec();
        return Err(e).with_context(|| format!("starting {}", a.argv[0]));
    }
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", a.argv[0]))?;
    drop(key_fd);
    let final_tag = settle(&fspf, anchor)?;
    // Nothing committed: the file names the tag as at the start (`start_tag_file`), and what
    // of it is durable names that state too.
    if let (Some(p), true) = (&tag_file, final_tag != tag) {
        fspf_core::session::settle_tag_file(p, final_tag)?;
    }
    if let (Some(k), true) = (&key, final_tag != tag) {
        // The next run starts from the index cache and replays the log after it: after a run
        // that committed much, move the cache up to the final state (best effort).
        let _ = fspf_core::volume::index_cache::refresh(&fspf, k, final_tag);
    }
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    })
}

//! `fspf mount` and `fspf umount`: the FUSE shield (crate `fspf-fuse`) as a daemon.
//!
//! `fspf mount` starts itself again in the foreground as the daemon (key handed over in a
//! memfd, never on its command line), waits until the mount is in place and returns. The daemon
//! records its pid and tag file in a private state directory, so that `fspf umount` can commit,
//! unmount, wait for it and print the final tag.
use crate::KeyTagArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use fspf_core::{EmbedPath, Tag};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args, Debug)]
pub struct MountArgs {
    pub fspf: PathBuf,
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub kt: KeyTagArgs,
    /// allow updates of protected kernel regions (ephemeral regions always take them)
    #[arg(long)]
    pub mutable: bool,
    /// show only the region at EMBEDPOINT (its embed point at the mount's root)
    #[arg(long, value_name = "EMBEDPOINT")]
    pub region: Option<String>,
    /// stay in the foreground (the daemon itself); unmount with `fspf umount` or Ctrl-C
    #[arg(long)]
    pub foreground: bool,
    /// let other users reach the mount (non-root users need user_allow_other in /etc/fuse.conf)
    #[arg(long)]
    pub allow_other: bool,
    /// keep the current tag in this file (rewritten after every commit)
    #[arg(long, value_name = "PATH")]
    pub tag_file: Option<PathBuf>,
    /// commit staged changes at the latest this many milliseconds after they were made
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub commit_ms: u64,
    /// (internal) started by `fspf mount`: report readiness on stdout, then detach from it
    #[arg(long, hide = true)]
    pub daemon_child: bool,
}

#[derive(Args, Debug)]
pub struct UmountArgs {
    pub mountpoint: PathBuf,
}

/// `$XDG_RUNTIME_DIR/fspf` or `/tmp/fspf-UID/mounts`: owned by this user, not group/world
/// writable (it holds the tag files, which are trust anchors).
fn state_dir() -> Result<PathBuf> {
    let uid = rustix::process::getuid().as_raw();
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|v| !v.is_empty())
        .map(|d| PathBuf::from(d).join("fspf"))
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/fspf-{uid}/mounts")));
    crate::run::private_dir(&dir, "it holds the tag files of mounts")?;
    Ok(dir)
}

fn canonical_mountpoint(p: &Path) -> Result<PathBuf> {
    p.canonicalize()
        .with_context(|| format!("mountpoint {}", p.display()))
}

/// The state file of the mount at `mp`: `pid`, `mutable` (0/1) and the tag file, one per line.
fn state_file(mp: &Path) -> Result<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    Ok(state_dir()?.join(format!("mount-{}", hex::encode(mp.as_os_str().as_bytes()))))
}

pub fn mount(a: MountArgs) -> Result<i32> {
    let fspf = std::path::absolute(&a.fspf).unwrap_or_else(|_| a.fspf.clone());
    let mp = canonical_mountpoint(&a.mountpoint)?;
    if !mp.is_dir() {
        bail!("mountpoint {} is not a directory", mp.display());
    }
    let key = a.kt.volume_key(&fspf)?;
    let tag = a.kt.expected_tag(&fspf)?;
    if a.foreground || a.daemon_child {
        return daemon(&a, &fspf, &mp, key, tag);
    }
    // Start the daemon: the same binary in the foreground, detached from this terminal's
    // process group; the key goes in an inheritable memfd.
    let mut cmd = crate::run::self_command()?;
    cmd.arg("mount").arg(&fspf).arg(&mp).arg("--daemon-child");
    let key_fd = match &key {
        Some(k) => {
            let fd = rustix::fs::memfd_create("fspf-key", rustix::fs::MemfdFlags::empty())
                .context("memfd_create")?;
            let mut f = std::fs::File::from(fd);
            f.write_all(k.to_hex().as_bytes())?;
            Some(f)
        }
        None => None,
    };
    if let Some(f) = &key_fd {
        use std::os::fd::AsRawFd;
        cmd.arg("--key-fd").arg(f.as_raw_fd().to_string());
    }
    if let Some(t) = tag {
        cmd.arg("--tag").arg(t.to_hex());
    }
    if a.mutable {
        cmd.arg("--mutable");
    }
    if let Some(r) = &a.region {
        cmd.arg("--region").arg(r);
    }
    if a.allow_other {
        cmd.arg("--allow-other");
    }
    if let Some(t) = &a.tag_file {
        cmd.arg("--tag-file")
            .arg(std::path::absolute(t).unwrap_or_else(|_| t.clone()));
    }
    cmd.arg("--commit-ms").arg(a.commit_ms.to_string());
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    // The daemon outlives this command: what it reports later (a failed commit, a file that
    // failed verification) goes to a log beside its state file, not to this terminal's pipes.
    let log = state_file(&mp)?.with_extension("log");
    let log_file = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("{}", log.display()))?;
    let start = log_file.metadata().map(|m| m.len()).unwrap_or(0);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log_file)
        .env_remove("SCONE_FSPF_KEY");
    let mut child = cmd.spawn().context("starting the fspf mount daemon")?;
    drop(key_fd);
    let mut line = String::new();
    let out = child.stdout.take().context("daemon stdout")?;
    std::io::BufReader::new(out).read_line(&mut line)?;
    match line.strip_prefix("ready ") {
        Some(t) => {
            println!(
                "Mounted {} at {} (tag {}); unmount with: fspf umount {}",
                fspf.display(),
                mp.display(),
                t.trim(),
                mp.display()
            );
            Ok(0)
        }
        None => {
            let st = child.wait()?;
            let text = std::fs::read(&log).unwrap_or_default();
            let text = String::from_utf8_lossy(&text[(start as usize).min(text.len())..]);
            bail!("the mount daemon failed ({st}): {}", text.trim())
        }
    }
}

fn daemon(
    a: &MountArgs,
    fspf: &Path,
    mp: &Path,
    key: Option<fspf_core::VolumeKey>,
    tag: Option<Tag>,
) -> Result<i32> {
    let state = state_file(mp)?;
    let tag_file = match &a.tag_file {
        Some(t) => std::path::absolute(t).unwrap_or_else(|_| t.clone()),
        None => state.with_extension("tag"),
    };
    let mut cfg = fspf_fuse::Config::new(fspf.to_path_buf());
    cfg.key = key;
    cfg.tag = tag;
    cfg.mutable = a.mutable;
    cfg.allow_other = a.allow_other;
    cfg.tag_file = Some(tag_file.clone());
    // The file kept for `fspf umount` is a channel on this boot, not an anchor that outlives a
    // power loss (that is what `--tag-file` is for): its announces are not synced.
    cfg.tag_file_durable = a.tag_file.is_some();
    cfg.commit_interval = Duration::from_millis(a.commit_ms.max(1));
    cfg.region = match &a.region {
        Some(r) => Some(EmbedPath::parse(r).with_context(|| format!("--region {r}"))?),
        None => None,
    };
    fspf_core::write_file_durably(
        &state,
        format!(
            "{}\n{}\n{}\n",
            std::process::id(),
            u8::from(a.mutable),
            tag_file.display()
        )
        .as_bytes(),
        0o600,
    )?;
    let notify = a.daemon_child;
    let mp_shown = mp.display().to_string();
    let r = fspf_fuse::mount_foreground(&cfg, mp, move |t| {
        if notify {
            println!("ready {t}");
            let _ = std::io::stdout().flush();
            // Nobody reads stdout any more: later output must not fail on a closed pipe.
            if let Ok(null) = std::fs::File::options().write(true).open("/dev/null") {
                let _ = rustix::stdio::dup2_stdout(&null);
            }
        } else {
            eprintln!("fspf: mounted at {mp_shown} (tag {t}); unmount with fspf umount {mp_shown}");
        }
    });
    let _ = std::fs::remove_file(&state);
    let t = r.map_err(|e| anyhow::anyhow!("{e}"))?;
    if a.mutable && !notify {
        println!("{t}");
    }
    Ok(0)
}

pub fn umount(a: UmountArgs) -> Result<i32> {
    let mp = canonical_mountpoint(&a.mountpoint)?;
    let state = state_file(&mp)?;
    let info = std::fs::read_to_string(&state).ok();
    // Commit everything first (fsyncdir of the mount's root), so the tag printed is final even
    // if the daemon is not ours to wait for.
    if let Ok(d) = std::fs::File::open(&mp) {
        let _ = d.sync_all();
    }
    let st = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(&mp)
        .status();
    let ok = match st {
        Ok(s) => s.success(),
        Err(_) => std::process::Command::new("umount")
            .arg(&mp)
            .status()
            .is_ok_and(|s| s.success()),
    };
    if !ok {
        bail!(
            "could not unmount {} (busy, or not an fspf mount)",
            mp.display()
        );
    }
    let Some(info) = info else {
        return Ok(0);
    };
    let mut lines = info.lines();
    let pid: Option<i32> = lines.next().and_then(|l| l.trim().parse().ok());
    let mutable = lines.next() == Some("1");
    let tag_file = lines.next().map(PathBuf::from);
    // The daemon commits what is left and exits.
    if let Some(pid) = pid {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while Path::new(&format!("/proc/{pid}")).exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // What the daemon reported while mounted (failed commits, files that failed verification).
    let log = state.with_extension("log");
    if let Ok(text) = std::fs::read_to_string(&log) {
        let text = text.trim();
        if !text.is_empty() {
            eprintln!("{text}");
        }
        let _ = std::fs::remove_file(&log);
    }
    if mutable {
        if let Some(t) = tag_file.and_then(|p| std::fs::read_to_string(p).ok()) {
            match t.lines().map(str::trim).rfind(|l| !l.is_empty()) {
                Some(l) => println!("{l}"),
                None => bail!("the mount's tag file is empty"),
            }
        }
    }
    Ok(0)
}

/// `fspf run --mount-namespace -- PROG ARGS…`: the FUSE shield without the preload. This
/// process mounts the fspf's namespace at a private directory (mode 0700, no `allow_other`: only
/// this user reaches it) and serves it; PROG runs in a private mount namespace (`unshare
/// --mount --propagation private`) in which each protected region's embed path is a bind mount
/// of that region in the FUSE mount. Everyone else keeps seeing the kernel directories
/// (ciphertext); the daemon, outside the namespace, reaches them as before.
pub fn run_namespaced(a: crate::run::RunArgs) -> Result<i32> {
    if !rustix::process::geteuid().is_root() {
        bail!("--mount-namespace needs root (a private mount namespace and bind mounts); without root use fspf mount, or fspf run without --mount-namespace");
    }
    let Some(fspf) = a.fspf.clone() else {
        bail!("no fspf given: use --fspf FSPF or set SCONE_FSPF");
    };
    let fspf = std::path::absolute(&fspf).unwrap_or(fspf);
    // Only the regions are needed here (the daemon opens its own volume).
    let (key, tag, vol) = a.kt.open_for_run(&fspf)?;
    // The outermost embed points of protected (or ephemeral) regions: one bind mount each.
    let mut points: Vec<EmbedPath> = vol
        .regions()
        .iter()
        .filter(|r| {
            r.protection != fspf_core::Protection::NotProtected
                || r.kind == fspf_core::RegionKind::Ephemeral
        })
        .map(|r| r.embed_point.clone())
        .collect();
    points.sort();
    let mut outer: Vec<EmbedPath> = Vec::new();
    for p in points {
        if p.is_root() {
            bail!("the root region / is protected: it cannot be bind-mounted over / (use fspf run without --mount-namespace, or fspf mount)");
        }
        if !outer.iter().any(|o| p.starts_with(o)) {
            outer.push(p);
        }
    }
    for p in &outer {
        let host = PathBuf::from(p.to_string());
        if !host.is_dir() {
            bail!(
                "{} does not exist on this host: create the directory first (the region is bind-mounted there, inside the program's namespace only)",
                host.display()
            );
        }
    }
    drop(vol);
    let mp = state_dir()?.join(format!("ns-{}", std::process::id()));
    std::fs::create_dir_all(&mp).with_context(|| format!("{}", mp.display()))?;
    let mut cfg = fspf_fuse::Config::new(fspf.clone());
    cfg.key = key;
    cfg.tag = tag;
    cfg.mutable = a.mutable;
    cfg.tag_file = a
        .tag_file
        .as_ref()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()));
    let mounted = match fspf_fuse::mount(&cfg, &mp) {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir(&mp);
            bail!("{e}");
        }
    };
    // In the new namespace: bind each region, then become the program.
    let mut script = String::from("set -e\n");
    for (i, p) in outer.iter().enumerate() {
        script.push_str(&format!("mount --bind \"$MP{i}\" \"$EP{i}\"\n"));
        let _ = p;
    }
    script.push_str("exec \"$@\"\n");
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(&script)
        .arg("sh")
        .args(&a.argv);
    for (i, p) in outer.iter().enumerate() {
        let rel = p.to_string();
        cmd.env(format!("MP{i}"), mp.join(rel.trim_start_matches('/')));
        cmd.env(format!("EP{i}"), &rel);
    }
    let status = cmd.status();
    let final_tag = mounted.unmount();
    let _ = std::fs::remove_dir(&mp);
    let status = status.context("starting unshare (util-linux)")?;
    if a.mutable && a.tag_file.is_none() {
        eprintln!("fspf: the run's final tag: {final_tag}");
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    })
}

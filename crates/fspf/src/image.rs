//! `fspf image`: protect a container image in one command (`protect`), check a protected image
//! offline (`verify`), and the entrypoint of a protected image (`exec`), which starts the
//! image's program under the shield with the key from a mounted secret file.
use crate::KeyTagArgs;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use fspf_core::Tag;
use std::path::{Path, PathBuf};

/// Where a protected image's entrypoint looks for the key and, optionally, the tag.
pub const SECRET_KEY: &str = "/run/secrets/fspf-key";
pub const SECRET_TAG: &str = "/run/secrets/fspf-tag";
/// The shield inside a protected image: the binary, and beside it in `lib/` the preload library
/// and the C library and dynamic loader that the binary was linked with (so that it starts in
/// any image: glibc, musl or none).
const FSPF_BIN: &str = "/.fspf/bin/fspf";
const FSPF_LIB: &str = "/.fspf/lib";
/// Where `fspf image exec` mounts the FUSE shield for programs the preload cannot see.
const FUSE_ROOT: &str = "/.fspf/root";
/// `preload`, `fuse` or unset (chosen by the program): which shield `fspf image exec` uses.
const SHIELD_ENV: &str = "FSPF_IMAGE_SHIELD";

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Protect an image: SRC (OCI layout directory, OCI archive or `docker save` archive) to
    /// DST (an OCI archive). `/` is authenticated; /proc, /sys, /dev, /run, /tmp, /etc/hosts,
    /// /etc/hostname and /etc/resolv.conf are not protected
    Protect(ProtectArgs),
    /// Check a protected image offline: every listed file, and no plaintext of an encrypted
    /// path in any layer; exit 1 on any finding
    Verify(VerifyArgs),
    /// (the entrypoint of a protected image) run PROG under the shield, with the key from
    /// /run/secrets/fspf-key and the tag from /run/secrets/fspf-tag or --tag
    Exec(ExecArgs),
    /// (internal) enter ROOT (the FUSE shield's view) and exec PROG there
    #[command(name = "__chroot-exec", hide = true)]
    ChrootExec {
        root: PathBuf,
        cwd: PathBuf,
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        argv: Vec<String>,
    },
}

#[derive(Args, Debug)]
pub struct ProtectArgs {
    pub src: PathBuf,
    pub dst: PathBuf,
    /// make the subtree PATH encrypted (its files become ciphertext in the image)
    #[arg(long, value_name = "PATH")]
    pub encrypt: Vec<String>,
    /// keep the subtree PATH in memory at run time (an encrypted ephemeral region)
    #[arg(long, value_name = "PATH")]
    pub ephemeral: Vec<String>,
    /// leave the subtree PATH unprotected
    #[arg(long, value_name = "PATH")]
    pub not_protected: Vec<String>,
    /// do not list paths matching GLOB (absolute; `*` stays within a name, `**` crosses names):
    /// hidden under the shield; in an encrypted region also dropped from the image
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// write the key (hex) here, mode 0600 (required: the key is written nowhere else)
    #[arg(long, value_name = "OUT")]
    pub key_file: Option<PathBuf>,
    /// write the tag (hex) here, mode 0600
    #[arg(long, value_name = "OUT")]
    pub tag_file: Option<PathBuf>,
    /// reference name of the output (default: the source's, with `-fspf` added to its tag)
    #[arg(long, value_name = "REF")]
    pub name: Option<String>,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    pub image: PathBuf,
    #[command(flatten)]
    pub kt: KeyTagArgs,
    /// file holding the expected tag (hex), e.g. the --tag-file of `fspf image protect`
    #[arg(long, value_name = "PATH", conflicts_with = "tag")]
    pub tag_file: Option<PathBuf>,
    /// print the findings as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// the fspf in the image
    #[arg(long, value_name = "FSPF", default_value = "/.fspf/fspf.pb")]
    pub fspf: PathBuf,
    /// the key file (hex, or the line `fspf encrypt` prints)
    #[arg(long, value_name = "PATH", default_value = SECRET_KEY)]
    pub key_file: PathBuf,
    /// the image's tag, used when /run/secrets/fspf-tag is not mounted
    #[arg(long, value_name = "HEX")]
    pub tag: Option<String>,
    /// program and arguments
    #[arg(
        trailing_var_arg = true,
        required = true,
        value_name = "PROG",
        allow_hyphen_values = true
    )]
    pub argv: Vec<String>,
}

pub fn run(c: ImageCommand) -> Result<i32> {
    match c {
        ImageCommand::Protect(a) => protect(a),
        ImageCommand::Verify(a) => verify(a),
        ImageCommand::Exec(a) => exec(a),
        ImageCommand::ChrootExec { root, cwd, argv } => chroot_exec(&root, &cwd, &argv),
    }
}

fn write_secret(p: &Path, content: &str) -> Result<()> {
    fspf_core::write_file_durably(p, content.as_bytes(), 0o600)
        .with_context(|| format!("writing {}", p.display()))?;
    // An existing file keeps its mode through the rename-free path: make it 0600 either way.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", p.display()))?;
    Ok(())
}

fn protect(a: ProtectArgs) -> Result<i32> {
    let Some(key_file) = a.key_file.clone() else {
        bail!("give --key-file OUT: the image's key is written there and nowhere else (not into the image)");
    };
    for p in [Some(&key_file), a.tag_file.as_ref()].into_iter().flatten() {
        if p.is_dir() {
            bail!("{}: is a directory", p.display());
        }
    }
    let exe = crate::run::self_exe()?;
    let fspf_bytes = std::fs::read(&exe).with_context(|| format!("reading {}", exe.display()))?;
    let preload = crate::run::preload_bytes()?;
    let mut runtime: Vec<(String, Vec<u8>, u32)> = vec![
        ("bin/fspf".into(), fspf_bytes, 0o755),
        ("lib/libfspf_preload.so".into(), preload, 0o755),
    ];
    let mut loader = None;
    for lib in linked_libraries()? {
        let name = lib
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let bytes = std::fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?;
        if name.starts_with("ld-linux") {
            loader = Some(format!("{FSPF_LIB}/{name}"));
        }
        runtime.push((format!("lib/{name}"), bytes, 0o755));
    }
    let opts = fspf_image::ProtectOptions {
        src: a.src.clone(),
        dst: a.dst.clone(),
        encrypt: a.encrypt,
        ephemeral: a.ephemeral,
        not_protected: a.not_protected,
        exclude: a.exclude,
        runtime,
        wrapper: Box::new(move |tag: &Tag| {
            let mut w: Vec<String> = match &loader {
                Some(l) => vec![l.clone(), "--library-path".into(), FSPF_LIB.into()],
                None => vec![],
            };
            w.extend([
                FSPF_BIN.into(),
                "image".into(),
                "exec".into(),
                "--tag".into(),
                tag.to_hex(),
            ]);
            w
        }),
        name: a.name,
    };
    let p = fspf_image::protect(&opts)?;
    for u in &p.unmatched {
        eprintln!("fspf: warning: {u}: no file of the image is there (a typo?)");
    }
    write_secret(&key_file, &format!("{}\n", &*p.key.to_hex()))?;
    if let Some(t) = &a.tag_file {
        write_secret(t, &format!("{}\n", p.tag))?;
    }
    println!(
        "Protected image {} -> {}{}: {} files ({} encrypted, {} bytes), {} directories, {} symlinks; {} layers ({} rewritten) + the shield's layer. AES-GCM tag: {} key: written to {}",
        a.src.display(),
        a.dst.display(),
        p.name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default(),
        p.files,
        p.encrypted_files,
        p.bytes,
        p.dirs,
        p.symlinks,
        p.layers,
        p.rewritten_layers,
        p.tag,
        key_file.display()
    );
    Ok(0)
}

fn verify(a: VerifyArgs) -> Result<i32> {
    let dummy = Path::new("/.fspf/fspf.pb");
    let Some(key) = a.kt.volume_key(dummy)? else {
        bail!("give the image's key: --key-file PATH (or --key-fd N)");
    };
    let tag = match &a.tag_file {
        Some(p) => Some(read_tag_file(p)?),
        None => a.kt.expected_tag(dummy)?,
    };
    let r = fspf_image::verify(&a.image, key, tag)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"ok": r.findings.is_empty(), "tag": r.tag.to_hex(), "layers": r.layers, "files": r.files, "unlisted": r.unlisted, "findings": r.findings})
        );
    } else {
        for f in &r.findings {
            println!("FAILED {f}");
        }
        if r.findings.is_empty() {
            println!(
                "OK: {} files in {} layers verified against tag {}; no plaintext of an encrypted path; {} visible members not listed (hidden under the shield)",
                r.files, r.layers, r.tag, r.unlisted
            );
        } else {
            println!(
                "{} problem(s) found in {}",
                r.findings.len(),
                a.image.display()
            );
        }
    }
    Ok(if r.findings.is_empty() { 0 } else { 1 })
}

fn read_tag_file(p: &Path) -> Result<Tag> {
    let s = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    let t = s.lines().next().unwrap_or("").trim();
    Tag::from_hex(t).with_context(|| format!("{}: not a tag", p.display()))
}

/// The shared libraries this process has mapped (the C library, the loader), from
/// `/proc/self/maps`: what the `fspf` binary needs to start in an image without them.
fn linked_libraries() -> Result<Vec<PathBuf>> {
    let maps = std::fs::read_to_string("/proc/self/maps").context("reading /proc/self/maps")?;
    let mut out: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        let p = PathBuf::from(path);
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if !path.starts_with('/') || !name.contains(".so") || name.contains("fspf_preload") {
            continue;
        }
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

/// Which shield runs a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shield {
    /// The in-process shield (LD_PRELOAD): dynamically linked glibc programs.
    Preload,
    /// The FUSE shield mounted inside the container: static and musl programs.
    Fuse,
}

/// The ELF interpreter (`PT_INTERP`) of `file`, `Ok(None)` for a static ELF; for a `#!` script,
/// that of its interpreter.
fn interpreter(file: &Path, depth: u32) -> Result<Option<String>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(file).with_context(|| format!("{}", file.display()))?;
    let mut h = [0u8; 64];
    let n = f.read_at(&mut h, 0)?;
    if n >= 2 && &h[..2] == b"#!" && depth < 4 {
        let line = h[2..n].split(|&c| c == b'\n').next().unwrap_or_default();
        let interp = line
            .split(|&c| c == b' ' || c == b'\t')
            .find(|w| !w.is_empty())
            .unwrap_or_default();
        let interp = String::from_utf8_lossy(interp).into_owned();
        return interpreter(Path::new(&interp), depth + 1);
    }
    if n < 64 || &h[..4] != b"\x7fELF" || h[4] != 2 {
        bail!("{}: not a 64-bit ELF program", file.display());
    }
    let u16_at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]) as u64;
    let mut b8 = [0u8; 8];
    b8.copy_from_slice(&h[0x20..0x28]);
    let phoff = u64::from_le_bytes(b8);
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for i in 0..phnum.min(256) {
        let mut ph = [0u8; 56];
        f.read_exact_at(&mut ph, phoff + i * phentsize)?;
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == 3 {
            b8.copy_from_slice(&ph[8..16]);
            let off = u64::from_le_bytes(b8);
            b8.copy_from_slice(&ph[32..40]);
            let len = u64::from_le_bytes(b8).min(4096) as usize;
            let mut s = vec![0u8; len];
            f.read_exact_at(&mut s, off)?;
            let s = s.split(|&c| c == 0).next().unwrap_or_default();
            return Ok(Some(String::from_utf8_lossy(s).into_owned()));
        }
    }
    Ok(None)
}

/// `prog` as `execvp` finds it.
fn resolve(prog: &str) -> Option<PathBuf> {
    if prog.contains('/') {
        return Some(PathBuf::from(prog));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|c| c.is_file())
}

/// The shield for `prog`: `FSPF_IMAGE_SHIELD`, else the preload for glibc programs and FUSE for
/// the rest (static, musl), which needs `/dev/fuse` and `CAP_SYS_ADMIN` in the container.
fn choose_shield(prog: &str) -> Result<Shield> {
    match std::env::var(SHIELD_ENV).as_deref() {
        Ok("preload") => return Ok(Shield::Preload),
        Ok("fuse") => return Ok(Shield::Fuse),
        Ok("") | Err(_) => {}
        Ok(other) => bail!("{SHIELD_ENV}={other}: use preload or fuse"),
    }
    let Some(file) = resolve(prog) else {
        // Not found: the preload path reports it as execvp would.
        return Ok(Shield::Preload);
    };
    let glibc = match interpreter(&file, 0) {
        Ok(Some(i)) => i.contains("ld-linux"),
        Ok(None) => false,
        Err(_) => return Ok(Shield::Preload),
    };
    // The dynamic loader ignores a preload library it cannot load (a C library older than the
    // one it was built against) and runs the program unshielded: check first, fail closed.
    let why = if !glibc {
        format!(
            "{} is not a dynamically linked glibc program (static, or built for musl)",
            file.display()
        )
    } else {
        let need = crate::run::find_preload()
            .ok()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| glibc_required(&b));
        match (need, image_glibc()) {
            (Some(n), Some(have)) if have >= n => return Ok(Shield::Preload),
            (Some(n), Some(have)) => format!(
                "the image's glibc {}.{} is older than the {}.{} the in-process shield needs",
                have.0, have.1, n.0, n.1
            ),
            (None, _) => return Ok(Shield::Preload),
            (Some(_), None) => "the image's glibc (libc.so.6) was not found".to_string(),
        }
    };
    if Path::new("/dev/fuse").exists() && rustix::process::geteuid().is_root() {
        return Ok(Shield::Fuse);
    }
    bail!(
        "{why}: the in-process shield cannot see its file accesses. Run the container with the FUSE shield: podman run --device /dev/fuse --cap-add SYS_ADMIN -v ./key:{SECRET_KEY}:ro IMAGE"
    )
}

/// The newest `GLIBC_2.N` symbol version a library needs (from its version strings).
fn glibc_required(lib: &[u8]) -> Option<(u32, u32)> {
    let mut best = None;
    let pat = b"GLIBC_2.";
    let mut i = 0;
    while let Some(p) = lib[i..].windows(pat.len()).position(|w| w == pat) {
        let start = i + p + pat.len();
        let digits: Vec<u8> = lib[start..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .copied()
            .collect();
        if let Ok(minor) = String::from_utf8_lossy(&digits).parse::<u32>() {
            best = best.max(Some((2, minor)));
        }
        i = start;
    }
    best
}

/// The version of the image's glibc, from the banner in its `libc.so.6`.
fn image_glibc() -> Option<(u32, u32)> {
    const CANDIDATES: &[&str] = &[
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/libc.so.6",
        "/usr/lib64/libc.so.6",
        "/lib/libc.so.6",
        "/usr/lib/libc.so.6",
    ];
    let b = CANDIDATES.iter().find_map(|p| std::fs::read(p).ok())?;
    let pat = b"release version ";
    let at = b.windows(pat.len()).position(|w| w == pat)? + pat.len();
    let v: String = b[at..]
        .iter()
        .take_while(|c| c.is_ascii_digit() || **c == b'.')
        .map(|&c| c as char)
        .collect();
    let mut it = v.split('.').filter_map(|x| x.parse::<u32>().ok());
    Some((it.next()?, it.next()?))
}

/// Serve the fspf with FUSE at [`FUSE_ROOT`], bind the not-protected regions (/proc, /dev, …)
/// into it, run the program there (chroot), then unmount and commit.
fn exec_fuse(fspf: &Path, kt: &KeyTagArgs, mutable: bool, argv: &[String]) -> Result<i32> {
    use rustix::mount::{mount_bind, mount_bind_recursive, unmount, UnmountFlags};
    let (key, tag, vol) = kt.open_for_run(fspf)?;
    let mut binds: Vec<(PathBuf, PathBuf)> = Vec::new();
    for r in vol.regions() {
        if r.protection != fspf_core::Protection::NotProtected {
            continue;
        }
        let fspf_core::RegionKind::Kernel(k) = &r.kind else {
            continue;
        };
        let ep = r.embed_point.to_string();
        if ep.starts_with(FSPF_DIR_PREFIX) {
            continue;
        }
        binds.push((
            k.clone(),
            Path::new(FUSE_ROOT).join(ep.trim_start_matches('/')),
        ));
    }
    drop(vol);
    binds.sort_by(|a, b| a.1.cmp(&b.1));
    std::fs::create_dir_all(FUSE_ROOT).with_context(|| format!("creating {FUSE_ROOT}"))?;
    let mut cfg = fspf_fuse::Config::new(fspf.to_path_buf());
    cfg.key = key;
    cfg.tag = tag;
    cfg.mutable = mutable;
    cfg.allow_other = true;
    let mounted = fspf_fuse::mount(&cfg, Path::new(FUSE_ROOT))
        .map_err(|e| anyhow::anyhow!("mounting the FUSE shield at {FUSE_ROOT}: {e} (run the container with --device /dev/fuse --cap-add SYS_ADMIN)"))?;
    let mut bound = Vec::new();
    for (src, dst) in &binds {
        let ok = match (src.is_dir(), dst.is_dir(), src.is_file() && dst.is_file()) {
            (true, true, _) => mount_bind_recursive(src, dst).is_ok(),
            (false, false, true) => mount_bind(src, dst).is_ok(),
            _ => false,
        };
        if ok {
            bound.push(dst.clone());
        }
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let status = crate::run::self_command()?
        .args(["image", "__chroot-exec"])
        .arg(FUSE_ROOT)
        .arg(&cwd)
        .arg("--")
        .args(argv)
        .status()
        .context("starting the program in the FUSE shield's view");
    for d in bound.iter().rev() {
        let _ = unmount(d, UnmountFlags::DETACH);
    }
    let final_tag = mounted.unmount();
    if mutable {
        eprintln!("fspf: the run's final tag: {final_tag}");
    }
    let status = status?;
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    })
}

/// `fspf image __chroot-exec ROOT CWD -- PROG ARGS…`: become PROG inside ROOT.
fn chroot_exec(root: &Path, cwd: &Path, argv: &[String]) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    rustix::process::chroot(root).with_context(|| format!("chroot {}", root.display()))?;
    if std::env::set_current_dir(cwd).is_err() {
        std::env::set_current_dir("/").context("chdir /")?;
    }
    let Some(prog) = argv.first() else {
        bail!("nothing to execute");
    };
    let e = std::process::Command::new(prog).args(&argv[1..]).exec();
    eprintln!("fspf: cannot execute {prog}: {e}");
    Ok(if e.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

/// The not-protected region that holds the shield (never bound into the FUSE view).
pub const FSPF_DIR_PREFIX: &str = "/.fspf";

fn exec(a: ExecArgs) -> Result<i32> {
    if !a.key_file.is_file() {
        bail!(
            "this image is protected by fspf and its key is not at {}: run it with the key mounted, e.g. `podman run -v ./key:{SECRET_KEY}:ro IMAGE` (and optionally the tag at {SECRET_TAG})",
            a.key_file.display()
        );
    }
    let tag = if Path::new(SECRET_TAG).is_file() {
        Some(read_tag_file(Path::new(SECRET_TAG))?.to_hex())
    } else {
        a.tag
    };
    let mutable = std::env::var("SCONE_FSPF_MUTABLE")
        .is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
    let kt = KeyTagArgs {
        key_file: Some(a.key_file),
        key_fd: None,
        key: None,
        tag,
    };
    if choose_shield(&a.argv[0])? == Shield::Fuse {
        return exec_fuse(&a.fspf, &kt, mutable, &a.argv);
    }
    crate::run::run(crate::run::RunArgs {
        fspf: Some(a.fspf),
        kt,
        mutable,
        tag_file: None,
        mount_namespace: false,
        argv: a.argv,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a preload the image's older C library cannot load is ignored by the dynamic
    /// loader, and the program would run unshielded; the shield compares versions first.
    #[test]
    fn preload_needing_a_newer_glibc_than_the_image_ran_the_program_unshielded() {
        let lib = b"\0GLIBC_2.2.5\0GLIBC_2.34\0GLIBC_PRIVATE\0GLIBC_2.35\0GLIBC_2.3\0";
        assert_eq!(glibc_required(lib), Some((2, 35)));
        assert_eq!(glibc_required(b"no versions"), None);
        let have = image_glibc().expect("this machine's glibc");
        assert!(have >= (2, 17), "{have:?}");
    }

    #[test]
    fn elf_interpreters_tell_glibc_programs_from_static_ones() {
        let sh = interpreter(Path::new("/bin/sh"), 0).expect("reads /bin/sh");
        assert!(sh.is_some_and(|i| i.contains("ld-linux")));
        let bb = resolve("busybox").expect("busybox-static is installed (.ci/run)");
        assert_eq!(interpreter(&bb, 0).expect("reads busybox"), None);
    }
}

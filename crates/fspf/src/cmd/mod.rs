//! Sub-commands. Each validates its flags, calls fspf-core and prints the reference's lines.
pub mod addf;
pub mod addr;
pub mod show;
pub mod volume;

use crate::KeyTagArgs;
use anyhow::{bail, Context, Result};
use fspf_core::format::metadata::{FileKind, Protection, RegionKind};
use fspf_core::{EmbedPath, Volume};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub fn create(fspf: &Path, version: Option<&str>, force: bool) -> Result<i32> {
    if let Some(v) = version {
        if !matches!(v, "1" | "v1") {
            bail!("unsupported fspf format version {v:?}: this build writes version 1");
        }
    }
    let tag = Volume::create(fspf, force)?;
    println!(
        "Created empty file system protection file in {}. AES-GCM tag: {tag}",
        fspf.display()
    );
    Ok(0)
}

/// Lock, open (with key + tag), let `f` change the volume, save. Returns the new tag.
pub fn update(
    fspf: &Path,
    kt: &KeyTagArgs,
    f: impl FnOnce(&mut Volume) -> Result<()>,
) -> Result<fspf_core::Tag> {
    let _lock = Volume::lock(fspf)?;
    let mut v = kt.open_for_update(fspf)?;
    f(&mut v)?;
    Ok(v.save()?)
}

pub fn encrypt(fspf: &Path, kt: &KeyTagArgs) -> Result<i32> {
    let _lock = Volume::lock(fspf)?;
    let mut v = kt.open_for_update(fspf)?;
    let (tag, key) = v.encrypt()?;
    println!(
        "Encrypted file system protection file {} AES-GCM tag: {tag} key: {}",
        fspf.display(),
        &*key.to_hex()
    );
    Ok(0)
}

/// `verify --clean`: remove the leftovers of interrupted writers under the update lock.
fn clean(fspf: &Path, kt: &KeyTagArgs) -> Result<fspf_core::volume::CleanReport> {
    let lock = Volume::lock(fspf)?;
    // It changes the disk by what this fspf names: an older fspf must not decide.
    let v = kt.open_for_update(fspf)?;
    Ok(v.clean_orphans(&lock)?)
}

/// Leftovers listed in a warning at most (the rest is counted).
const LEFTOVERS_SHOWN: usize = 10;

pub fn verify(fspf: &Path, kt: &KeyTagArgs, json: bool, clean_first: bool) -> Result<i32> {
    let cleaned = if clean_first {
        Some(clean(fspf, kt)?)
    } else {
        None
    };
    let v = kt.open(fspf)?;
    let findings = v.verify();
    // After verify: opening the listed files rolled committed shadows forward already.
    let leftovers = v.orphans();
    let listed = v
        .files()
        .values()
        .filter(|e| matches!(e.kind, FileKind::File { .. }))
        .count();
    if json {
        let arr: Vec<_> = findings
            .iter()
            .map(|f| serde_json::json!({"path": f.path, "problem": f.problem}))
            .collect();
        let left: Vec<_> = leftovers
            .iter()
            .map(|o| serde_json::json!({"path": o.disk.full(), "kind": o.kind.name()}))
            .collect();
        let mut out = serde_json::json!({"files": listed, "ok": findings.is_empty(), "findings": arr, "leftovers": left});
        if let Some(c) = &cleaned {
            out["cleaned"] = serde_json::json!({
                "removed": c.removed, "rolled_forward": c.rolled_forward, "kept": c.kept,
                "failed": c.failed.iter().map(|(p, e)| serde_json::json!({"path": p, "error": e})).collect::<Vec<_>>(),
            });
        }
        println!("{out}");
    } else {
        if let Some(c) = &cleaned {
            println!(
                "Cleaned {}: removed {}, rolled forward {}, kept {} (staged by a writer of this fspf that is still running)",
                fspf.display(),
                c.removed.len(),
                c.rolled_forward.len(),
                c.kept.len()
            );
            for (p, e) in &c.failed {
                eprintln!("fspf: warning: could not clean {}: {e}", p.display());
            }
        }
        for f in &findings {
            println!("FAILED {}", f.problem);
        }
        if findings.is_empty() {
            println!("OK: {listed} files verified against tag {}", v.tag());
        } else {
            println!("{} problem(s) found in {}", findings.len(), fspf.display());
        }
        if !leftovers.is_empty() {
            eprintln!(
                "fspf: warning: {} leftovers of interrupted writers (not in the fspf, not an integrity problem; `fspf verify --clean` removes them):",
                leftovers.len()
            );
            for o in leftovers.iter().take(LEFTOVERS_SHOWN) {
                eprintln!(
                    "fspf: warning:   {} ({})",
                    o.disk.full().display(),
                    o.kind.name()
                );
            }
            if leftovers.len() > LEFTOVERS_SHOWN {
                eprintln!(
                    "fspf: warning:   ... and {} more",
                    leftovers.len() - LEFTOVERS_SHOWN
                );
            }
        }
    }
    Ok(if findings.is_empty() { 0 } else { 1 })
}

pub fn cat(fspf: &Path, embed_path: &str, kt: &KeyTagArgs) -> Result<i32> {
    let v = kt.open(fspf)?;
    v.check_usable()?;
    let p = EmbedPath::parse(embed_path)?;
    let region = v.region_for(&p).ok_or_else(|| fspf_core::Error::NoRegion {
        path: p.to_string(),
    })?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if region.protection == Protection::NotProtected {
        let RegionKind::Kernel(_) = region.kind else {
            bail!("{p}: region {} is ephemeral", region.embed_point)
        };
        let k = p.kernel_path(region).context("kernel path")?;
        let mut f = std::fs::File::open(&k).with_context(|| format!("{}", k.display()))?;
        std::io::copy(&mut f, &mut out)?;
    } else {
        let mut r = v.open_file(&p)?;
        // Verify everything before the first byte leaves: never emit a prefix of a bad file.
        r.verify_all()?;
        r.copy_to(&mut out)?;
    }
    out.flush()?;
    Ok(0)
}

pub fn export(fspf: &Path, embed_point: &str, outdir: &Path, kt: &KeyTagArgs) -> Result<i32> {
    let v = kt.open(fspf)?;
    v.check_usable()?;
    let ep = EmbedPath::parse(embed_point)?;
    std::fs::create_dir_all(outdir).with_context(|| format!("{}", outdir.display()))?;
    let mut failures = 0;
    let mut dir_modes: Vec<(std::path::PathBuf, u32)> = Vec::new();
    let mut files = 0;
    // Hard links to make once everything else is exported: (name, target's embed path).
    let mut links: Vec<(std::path::PathBuf, EmbedPath)> = Vec::new();
    // Where the entry at `p` lands.
    let dest_of = |p: &EmbedPath, dir: bool| -> Result<std::path::PathBuf> {
        let rel = p.strip_prefix(&ep).unwrap_or_default();
        Ok(if rel.is_empty() {
            match dir {
                // A single file or symlink exported by its own path lands inside OUTDIR.
                true => outdir.to_path_buf(),
                false => outdir.join(std::ffi::OsStr::from_bytes(p.file_name())),
            }
        } else {
            outdir.join(
                EmbedPath::root()
                    .join(rel)?
                    .to_path_buf()
                    .strip_prefix("/")?,
            )
        })
    };
    for p in v.paths_below(&ep) {
        let e = &v.files()[&p];
        let p = &p;
        let dest = dest_of(p, matches!(e.kind, FileKind::Dir))?;
        let res: Result<()> = (|| {
            match &e.kind {
                FileKind::Dir => {
                    // A listed directory replaced by a symlink on disk is an error, even empty.
                    v.check_kernel_node(p, e)?;
                    std::fs::create_dir_all(&dest)?;
                    // Writable while its entries are restored; the recorded mode comes last.
                    std::fs::set_permissions(
                        &dest,
                        std::fs::Permissions::from_mode(e.mode | 0o700),
                    )?;
                    dir_modes.push((dest.clone(), e.mode));
                }
                FileKind::Symlink(t) => {
                    if let Some(d) = dest.parent() {
                        std::fs::create_dir_all(d)?;
                    }
                    let _ = std::fs::remove_file(&dest);
                    std::os::unix::fs::symlink(
                        // Targets are bytes: a non-UTF-8 target must come back unchanged.
                        std::ffi::OsStr::from_bytes(t),
                        &dest,
                    )?;
                }
                FileKind::Special { kind, rdev } => {
                    // Restored with mkfifo/mknod, which only root may do for devices.
                    if let Some(d) = dest.parent() {
                        std::fs::create_dir_all(d)?;
                    }
                    let ty = match kind {
                        fspf_core::format::metadata::SpecialKind::Fifo => {
                            rustix::fs::FileType::Fifo
                        }
                        fspf_core::format::metadata::SpecialKind::Char => {
                            rustix::fs::FileType::CharacterDevice
                        }
                        fspf_core::format::metadata::SpecialKind::Block => {
                            rustix::fs::FileType::BlockDevice
                        }
                        fspf_core::format::metadata::SpecialKind::Socket => {
                            rustix::fs::FileType::Socket
                        }
                    };
                    let _ = std::fs::remove_file(&dest);
                    rustix::fs::mknodat(
                        rustix::fs::CWD,
                        &dest,
                        ty,
                        rustix::fs::Mode::from_raw_mode(e.mode),
                        *rdev,
                    )?;
                }
                FileKind::File { .. } => {
                    export_file(&v, p, e.mode, &dest)?;
                    files += 1;
                }
                // Another name of a file: a hard link once the file is exported, if it is
                // (below); a copy when the file lies outside what is exported.
                FileKind::Link(t) if t.starts_with(&ep) => links.push((dest.clone(), t.clone())),
                FileKind::Link(t) => {
                    let te = v.lookup(t).map(|e| e.into_owned());
                    match te {
                        Some(te) if matches!(te.kind, FileKind::File { .. }) => {
                            export_file(&v, t, te.mode, &dest)?;
                            files += 1;
                        }
                        _ => anyhow::bail!(
                            "{p}: a hard link to {t}, which is not a regular file here"
                        ),
                    }
                }
            }
            Ok(())
        })();
        if let Err(err) = res {
            failures += 1;
            let msg = crate::error_message(&err);
            if msg.starts_with(&p.to_string()) {
                eprintln!("fspf: error: {msg}");
            } else {
                eprintln!("fspf: error: {p}: {msg}");
            }
        }
    }
    for (dest, t) in links {
        let src = dest_of(&t, false)?;
        let _ = std::fs::remove_file(&dest);
        if let Err(err) = std::fs::hard_link(&src, &dest) {
            failures += 1;
            eprintln!(
                "fspf: error: {}: hard link to {}: {err}",
                dest.display(),
                src.display()
            );
        } else {
            files += 1;
        }
    }
    // Deepest first, so a read-only parent does not block its children.
    for (d, mode) in dir_modes.iter().rev() {
        if let Err(err) = std::fs::set_permissions(d, std::fs::Permissions::from_mode(*mode)) {
            failures += 1;
            eprintln!("fspf: error: {}: {err}", d.display());
        }
    }
    if failures > 0 {
        eprintln!(
            "fspf: {failures} entr{} could not be exported",
            if failures == 1 { "y" } else { "ies" }
        );
        return Ok(1);
    }
    println!("Exported {files} files below {ep} to {}", outdir.display());
    Ok(0)
}

/// Write the plaintext of the file listed at `src` to `dest` (through a temporary beside it,
/// synced, then renamed), with `mode`.
fn export_file(
    v: &fspf_core::Volume,
    src: &EmbedPath,
    mode: u32,
    dest: &std::path::Path,
) -> Result<()> {
    if let Some(d) = dest.parent() {
        std::fs::create_dir_all(d)?;
    }
    let mut r = v.open_file(src)?;
    let tmp = dest.with_file_name(format!(
        ".{}.fspf-export",
        dest.file_name().unwrap_or_default().to_string_lossy()
    ));
    let res = (|| -> Result<()> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut w = std::io::BufWriter::new(f);
        r.copy_to(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.set_permissions(std::fs::Permissions::from_mode(if mode == 0 {
            0o600
        } else {
            mode
        }))?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest)?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

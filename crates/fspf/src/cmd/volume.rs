//! `fspf create-volume (--encrypted|--authenticated) VOLUME_PATH [OUTPUT_PATH] [--envar-output]`
//!
//! A volume is a directory protected by a one-region fspf (`VOLUME_PATH/volume.fspf`, or
//! OUTPUT_PATH): the region's embed point and kernel path are the volume directory itself.
use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args};
use fspf_core::format::metadata::{FileKind, Protection, RegionKind};
use fspf_core::volume::RegionSpec;
use fspf_core::{EmbedPath, Volume};
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("protection").required(true).args(["encrypted", "authenticated"])))]
pub struct CreateVolumeArgs {
    #[arg(short = 'e', long)]
    pub encrypted: bool,
    #[arg(short = 'a', long)]
    pub authenticated: bool,
    pub volume_path: PathBuf,
    /// where to write the fspf (default VOLUME_PATH/volume.fspf)
    pub output_path: Option<PathBuf>,
    /// print `export VOLUME_KEY=…` and `export VOLUME_TAG=…` lines
    #[arg(long)]
    pub envar_output: bool,
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: CreateVolumeArgs) -> Result<i32> {
    std::fs::create_dir_all(&a.volume_path)
        .with_context(|| format!("{}", a.volume_path.display()))?;
    let dir = std::fs::canonicalize(&a.volume_path)?;
    let fspf = a
        .output_path
        .clone()
        .unwrap_or_else(|| dir.join("volume.fspf"));
    let protection = if a.encrypted {
        Protection::Encrypted
    } else {
        Protection::Authenticated
    };
    let existing: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path() != fspf)
        .collect();
    if protection == Protection::Encrypted && !existing.is_empty() {
        bail!(
            "{}: directory is not empty; an encrypted volume starts empty (import plaintext with `fspf addf FSPF {} SOURCE {}`)",
            dir.display(),
            dir.display(),
            dir.display()
        );
    }
    Volume::create(&fspf, a.force)?;
    let _lock = Volume::lock(&fspf)?;
    let mut v = Volume::open(&fspf, None, None)?;
    let ep = EmbedPath::from_path(&dir)?;
    v.add_region(RegionSpec {
        embed_point: ep.clone(),
        kind: RegionKind::Kernel(dir.clone()),
        protection,
        key_len: None,
        chunk_len: None,
    })?;
    v.save()?;
    if protection == Protection::Authenticated && !existing.is_empty() {
        // Record what is already there, in place (the fspf itself is skipped by the import).
        let staging = tempdir_listing(&dir, &fspf)?;
        let opts = fspf_core::volume::ImportOptions {
            embed_point: ep,
            source: staging.clone(),
            output: None,
        };
        let r = v.import(&opts, &|_| {});
        let _ = std::fs::remove_dir_all(&staging);
        r?;
    }
    let (tag, key) = v.encrypt()?;
    let files = v
        .files()
        .values()
        .filter(|e| matches!(e.kind, FileKind::File { .. }))
        .count();
    if a.envar_output {
        println!("export VOLUME_KEY={}", &*key.to_hex());
        println!("export VOLUME_TAG={tag}");
    } else {
        println!(
            "Created volume {} ({}, {files} files) in {} AES-GCM tag: {tag} key: {}",
            dir.display(),
            protection.name(),
            fspf.display(),
            &*key.to_hex()
        );
    }
    Ok(0)
}

/// A hard-link mirror of `dir` without the fspf, so `import` sees exactly the volume's files.
fn tempdir_listing(dir: &std::path::Path, fspf: &std::path::Path) -> Result<PathBuf> {
    let mut rnd = [0u8; 6];
    fspf_core::crypto::random_bytes(&mut rnd)?;
    let stage = dir.with_file_name(format!(
        ".{}.fspf-stage-{}",
        dir.file_name().unwrap_or_default().to_string_lossy(),
        hex::encode(rnd)
    ));
    // The stage root must exist before the first top-level entry is linked into it.
    std::fs::create_dir_all(&stage).with_context(|| format!("{}", stage.display()))?;
    let res = (|| -> Result<()> {
        for e in walk(dir)? {
            let rel = e.strip_prefix(dir)?;
            if e == fspf || fspf_core::volume::is_fspf_internal(fspf, &e) {
                continue;
            }
            let t = stage.join(rel);
            let md = std::fs::symlink_metadata(&e).with_context(|| format!("{}", e.display()))?;
            if md.is_dir() {
                std::fs::create_dir_all(&t)
            } else if md.file_type().is_symlink() {
                std::fs::read_link(&e).and_then(|l| std::os::unix::fs::symlink(l, &t))
            } else {
                std::fs::hard_link(&e, &t).or_else(|_| std::fs::copy(&e, &t).map(|_| ()))
            }
            .with_context(|| format!("staging {} as {}", e.display(), t.display()))?;
        }
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_dir_all(&stage);
        return Err(e);
    }
    Ok(stage)
}

fn walk(dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if std::fs::symlink_metadata(&p)?.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

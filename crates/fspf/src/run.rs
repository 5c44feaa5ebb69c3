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
    /// after the program exits, write the run's final fspf tag (hex) to this file
    #[arg(long, value_name = "PATH")]
    pub tag_file: Option<PathBuf>,
    /// program and arguments
    #[arg(trailing_var_arg = true, required = true, value_name = "PROG")]
    pub argv: Vec<String>,
}

/// Where the preload library is: `FSPF_PRELOAD`, next to this executable, or `../lib/fspf/`.
fn find_preload() -> Result<PathBuf> {
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
    bail!(
        "libfspf_preload.so not found (looked in {} and {}); build it with `cargo build -p fspf-preload` or set FSPF_PRELOAD",
        candidates[0].display(),
        candidates[1].display()
    )
}

/// An inheritable memfd holding `content`.
fn memfd(name: &str, content: &[u8]) -> Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::empty())
        .with_context(|| format!("memfd_create({name})"))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(content)?;
    Ok(f.into())
}

pub fn run(a: RunArgs) -> Result<i32> {
    let Some(fspf) = a.fspf.clone() else {
        bail!("no fspf given: use --fspf FSPF or set SCONE_FSPF");
    };
    let fspf = std::path::absolute(&fspf).unwrap_or(fspf);
    let key = a.kt.volume_key(&fspf)?;
    let tag = a.kt.expected_tag(&fspf)?;
    let vol = Volume::open(&fspf, key.clone(), tag)?;
    vol.meta.check_usable()?;
    if tag.is_none() && vol.is_encrypted() {
        eprintln!(
            "fspf: warning: no --tag (or SCONE_FSPF_TAG) given: freshness of {} is not checked",
            fspf.display()
        );
    }
    // Without a tag, the tag on disk now becomes the run's trust anchor.
    let tag: Tag = vol.tag();
    drop(vol);
    let preload = find_preload()?;
    let anchor = memfd("fspf-anchor", &tag.0)?;
    let key_fd = match &key {
        Some(k) => Some(memfd("fspf-key", k.to_hex().as_bytes())?),
        None => None,
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
    let mut cmd = Command::new(&a.argv[0]);
    cmd.args(&a.argv[1..])
        .env("LD_PRELOAD", ld)
        .env("SCONE_FSPF", &fspf)
        .env("SCONE_FSPF_TAG", tag.to_hex())
        .env("FSPF_ANCHOR_FD", anchor.as_raw_fd().to_string())
        .env_remove("SCONE_FSPF_KEY")
        .env_remove("FSPF_KEY_FD");
    if let Some(k) = &key_fd {
        cmd.env("FSPF_KEY_FD", k.as_raw_fd().to_string());
    }
    if a.mutable {
        cmd.env("SCONE_FSPF_MUTABLE", "1");
    }
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", a.argv[0]))?;
    drop(key_fd);
    let mut f = std::fs::File::from(anchor);
    f.rewind()?;
    let mut t = [0u8; 16];
    f.read_exact(&mut t).context("reading the trust anchor")?;
    let final_tag = Tag(t);
    if let Some(p) = &a.tag_file {
        std::fs::write(p, format!("{final_tag}\n"))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    })
}

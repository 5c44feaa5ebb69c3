//! `fspf show [-t|--tag] FSPF [KEY]`
use anyhow::{Context, Result};
use clap::Args;
use fspf_core::format::metadata::{FileKind, RegionKind};
use fspf_core::{Tag, Volume, VolumeKey};
use std::path::PathBuf;

#[derive(Args)]
pub struct ShowArgs {
    /// print only the current tag (no key needed)
    #[arg(short = 't', long = "tag")]
    pub tag_only: bool,
    pub fspf: PathBuf,
    /// fspf key (64 hex digits), visible to other users in /proc/PID/cmdline: prefer
    /// --key-file or --key-fd (or SCONE_FSPF_KEY)
    #[arg(value_name = "KEY", group = "key_source")]
    pub key_pos: Option<String>,
    /// file holding the key (hex, or the `fspf encrypt` line); `-` reads it from stdin
    #[arg(long, value_name = "PATH", group = "key_source")]
    pub key_file: Option<PathBuf>,
    /// read the key from the inherited file descriptor N
    #[arg(long, value_name = "N", group = "key_source")]
    pub key_fd: Option<u32>,
    /// fspf key (or SCONE_FSPF_KEY, for the fspf SCONE_FSPF names or any when it is unset);
    /// visible in /proc/PID/cmdline
    #[arg(long, value_name = "HEX", group = "key_source")]
    pub key: Option<String>,
    /// refuse an fspf whose tag differs (not read from SCONE_FSPF_TAG: show must work after updates)
    #[arg(long, value_name = "HEX")]
    pub expect_tag: Option<String>,
    /// machine-readable output
    #[arg(long)]
    pub json: bool,
}

/// Redacts the key (P10).
impl std::fmt::Debug for ShowArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |k: &Option<String>| k.as_ref().map(|_| "**redacted**");
        f.debug_struct("ShowArgs")
            .field("tag_only", &self.tag_only)
            .field("fspf", &self.fspf)
            .field("key_pos", &redact(&self.key_pos))
            .field("key", &redact(&self.key))
            .field("key_file", &self.key_file)
            .field("key_fd", &self.key_fd)
            .field("expect_tag", &self.expect_tag)
            .field("json", &self.json)
            .finish()
    }
}

pub fn run(a: ShowArgs) -> Result<i32> {
    if a.tag_only {
        let t = Volume::read_tag(&a.fspf)?;
        if a.json {
            println!("{}", serde_json::json!({ "tag": t.to_hex() }));
        } else {
            println!("{t}");
        }
        return Ok(0);
    }
    let key = match a.key_pos.as_ref().filter(|k| !k.trim().is_empty()) {
        Some(k) => Some(VolumeKey::from_hex(k).context("KEY")?),
        None => crate::KeyTagArgs {
            key: a.key.clone(),
            key_file: a.key_file.clone(),
            key_fd: a.key_fd,
            tag: None,
        }
        .volume_key(&a.fspf)?,
    };
    let expect = a.expect_tag.as_deref().map(Tag::from_hex).transpose()?;
    let v = Volume::open(&a.fspf, key, expect)?;
    let count = |ep: &fspf_core::EmbedPath| {
        v.files()
            .iter()
            .filter(|(p, e)| {
                matches!(e.kind, FileKind::File { .. })
                    && v.region_for(p).map(|r| &r.embed_point) == Some(ep)
            })
            .count()
    };
    if a.json {
        let regions: Vec<_> = v
            .regions()
            .iter()
            .map(|r| {
                serde_json::json!({
                    "embed_point": r.embed_point.to_string(),
                    "kind": match r.kind { RegionKind::Kernel(_) => "kernel", RegionKind::Ephemeral => "ephemeral" },
                    "kernel_path": match &r.kind { RegionKind::Kernel(k) => Some(k.display().to_string()), RegionKind::Ephemeral => None },
                    "protection": r.protection.name(),
                    "key_length": r.key.as_ref().map(|k| k.len()),
                    "chunk_length": r.chunk_len,
                    "files": count(&r.embed_point),
                })
            })
            .collect();
        let files: Vec<_> = v
            .files()
            .iter()
            .map(|(p, e)| {
                let (kind, size, target) = match &e.kind {
                    FileKind::File { size, .. } => ("file", Some(*size), None),
                    FileKind::Dir => ("dir", None, None),
                    FileKind::Symlink(t) => ("symlink", None, Some(String::from_utf8_lossy(t).into_owned())),
                    FileKind::Special { kind, .. } => (special_name(*kind), None, None),
                    FileKind::Link(t) => ("link", None, Some(t.to_string())),
                };
                serde_json::json!({"path": p.to_string(), "kind": kind, "size": size, "mode": format!("{:o}", e.mode), "target": target,
                    "region": v.region_for(p).map(|r| r.embed_point.to_string())})
            })
            .collect();
        let out = serde_json::json!({
            "path": a.fspf.display().to_string(), "tag": v.tag().to_hex(), "encrypted": v.is_encrypted(),
            "generation": v.generation(), "regions": regions, "files": files,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    println!("file system protection file {}", a.fspf.display());
    println!("  tag:        {}", v.tag());
    println!(
        "  encrypted:  {}",
        if v.is_encrypted() {
            "yes"
        } else {
            "no (run `fspf encrypt`)"
        }
    );
    println!("  generation: {}", v.generation());
    println!("regions:");
    if v.regions().is_empty() {
        println!("  (none)");
    }
    for r in v.regions() {
        let kernel = match &r.kind {
            RegionKind::Kernel(k) => format!("kernel {}", k.display()),
            RegionKind::Ephemeral => "ephemeral".into(),
        };
        let key = r
            .key
            .as_ref()
            .map_or("-".to_string(), |k| format!("{}-byte key", k.len()));
        println!(
            "  {:<20} {:<28} {:<14} {:<12} chunk {:>8}  {} files",
            r.embed_point.to_string(),
            kernel,
            r.protection.name(),
            key,
            r.chunk_len,
            count(&r.embed_point)
        );
    }
    println!("files:");
    for (p, e) in v.files() {
        match &e.kind {
            FileKind::File { size, .. } => println!(
                "  {:<40} file     {:>12} bytes  mode {:o}",
                p.to_string(),
                size,
                e.mode
            ),
            FileKind::Dir => println!(
                "  {:<40} dir      {:>12}        mode {:o}",
                p.to_string(),
                "",
                e.mode
            ),
            FileKind::Symlink(t) => println!(
                "  {:<40} symlink -> {}",
                p.to_string(),
                String::from_utf8_lossy(t)
            ),
            FileKind::Special { kind, rdev } => println!(
                "  {:<40} {:<8} {:>12}        mode {:o}",
                p.to_string(),
                special_name(*kind),
                rdev,
                e.mode
            ),
            FileKind::Link(t) => println!("  {:<40} link => {t}", p.to_string()),
        }
    }
    Ok(0)
}

fn special_name(k: fspf_core::format::metadata::SpecialKind) -> &'static str {
    use fspf_core::format::metadata::SpecialKind as S;
    match k {
        S::Fifo => "fifo",
        S::Char => "chardev",
        S::Block => "blockdev",
        S::Socket => "socket",
    }
}

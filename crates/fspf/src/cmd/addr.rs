//! `fspf addr FSPF EMBEDPOINT (--kernel DIR | --ephemeral) (-n | -a | -e) [-k LEN] [-c LEN]`
use crate::KeyTagArgs;
use anyhow::{bail, Result};
use clap::{ArgGroup, Args};
use fspf_core::format::metadata::{Protection, RegionKind};
use fspf_core::volume::RegionSpec;
use fspf_core::EmbedPath;
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("kind").required(true).args(["kernel", "ephemeral"])))]
#[command(group(ArgGroup::new("protection").required(true).args(["not_protected", "authenticated", "encrypted"])))]
pub struct AddrArgs {
    pub fspf: PathBuf,
    pub embed_point: String,
    /// files live on disk below DIR
    #[arg(long, value_name = "DIR")]
    pub kernel: Option<PathBuf>,
    /// files live in memory, empty at start, gone at exit
    #[arg(long)]
    pub ephemeral: bool,
    #[arg(short = 'n', long)]
    pub not_protected: bool,
    #[arg(short = 'a', long)]
    pub authenticated: bool,
    #[arg(short = 'e', long)]
    pub encrypted: bool,
    /// region key length in bytes: 16, 24 or 32 (128/192/256 read as bits); default 32
    #[arg(short = 'k', long, value_name = "LEN")]
    pub key_length: Option<u32>,
    /// chunk length in bytes (default 4096 for encrypted, 65536 for authenticated regions)
    #[arg(short = 'c', long, value_name = "BYTES")]
    pub chunk_length: Option<u32>,
    #[command(flatten)]
    pub kt: KeyTagArgs,
}

pub fn run(a: AddrArgs) -> Result<i32> {
    let embed_point = EmbedPath::parse(&a.embed_point)?;
    let kind = match &a.kernel {
        Some(k) => {
            if !k.is_absolute() {
                bail!("--kernel {}: the kernel path must be absolute", k.display());
            }
            RegionKind::Kernel(EmbedPath::from_path(k)?.to_path_buf())
        }
        None => RegionKind::Ephemeral,
    };
    let protection = if a.encrypted {
        Protection::Encrypted
    } else if a.authenticated {
        Protection::Authenticated
    } else {
        Protection::NotProtected
    };
    let key_len = match a.key_length {
        None => None,
        Some(l @ (16 | 24 | 32)) => Some(l as usize),
        Some(b @ (128 | 192 | 256)) => Some(b as usize / 8),
        Some(l) => bail!("--key-length {l}: must be 16, 24 or 32 bytes (or 128, 192, 256 bits)"),
    };
    let spec = RegionSpec {
        embed_point: embed_point.clone(),
        kind,
        protection,
        key_len,
        chunk_len: a.chunk_length,
    };
    let tag = super::update(&a.fspf, &a.kt, |v| Ok(v.add_region(spec)?))?;
    println!(
        "Added region {embed_point} to file system protection file {} new AES-GCM tag: {tag}",
        a.fspf.display()
    );
    Ok(0)
}

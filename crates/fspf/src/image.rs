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
/// The shield inside a protected image.
const FSPF_BIN: &str = "/.fspf/bin/fspf";

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
    let exe = std::env::current_exe().context("locating fspf")?;
    let fspf_bytes = std::fs::read(&exe).with_context(|| format!("reading {}", exe.display()))?;
    let preload = crate::run::preload_bytes()?;
    let opts = fspf_image::ProtectOptions {
        src: a.src.clone(),
        dst: a.dst.clone(),
        encrypt: a.encrypt,
        ephemeral: a.ephemeral,
        not_protected: a.not_protected,
        exclude: a.exclude,
        runtime: vec![
            ("bin/fspf".into(), fspf_bytes, 0o755),
            ("bin/libfspf_preload.so".into(), preload, 0o755),
        ],
        wrapper: Box::new(|tag: &Tag| {
            vec![
                FSPF_BIN.into(),
                "image".into(),
                "exec".into(),
                "--tag".into(),
                tag.to_hex(),
            ]
        }),
        name: a.name,
    };
    let p = fspf_image::protect(&opts)?;
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
    crate::run::run(crate::run::RunArgs {
        fspf: Some(a.fspf),
        kt: KeyTagArgs {
            key_file: Some(a.key_file),
            key_fd: None,
            key: None,
            tag,
        },
        mutable,
        tag_file: None,
        mount_namespace: false,
        argv: a.argv,
    })
}

//! Loading keys and tags from flags, files and the environment.
use crate::KeyTagArgs;
use anyhow::{bail, Context, Result};
use fspf_core::{Tag, Volume, VolumeKey};
use std::path::Path;

/// Parse a key file: 64 hex digits, or the `... key: HEX` line printed by `fspf encrypt`.
pub fn key_from_file(p: &Path) -> Result<VolumeKey> {
    let s = zeroize::Zeroizing::new(
        std::fs::read_to_string(p).with_context(|| format!("reading key file {}", p.display()))?,
    );
    let mut it = s.split_whitespace();
    let mut last = None;
    while let Some(w) = it.next() {
        if w == "key:" {
            last = it.next();
            break;
        }
        last = Some(w);
    }
    let Some(hex) = last else {
        bail!("key file {} is empty", p.display())
    };
    VolumeKey::from_hex(hex).with_context(|| format!("key file {}", p.display()))
}

/// Do `SCONE_FSPF_KEY` / `SCONE_FSPF_TAG` apply to `fspf`? Only when `SCONE_FSPF` is unset or
/// names the same file (paths compared canonicalised): a shell that exported them for one fspf
/// must not hand that fspf's key and tag to every other one.
pub fn env_applies_to(fspf: &Path) -> bool {
    match std::env::var_os("SCONE_FSPF").filter(|v| !v.is_empty()) {
        None => true,
        Some(named) => same_path(Path::new(&named), fspf),
    }
}

/// `a` and `b` name the same file: canonical paths, or (for a file that does not exist yet)
/// the canonical parent directory and the same name.
fn same_path(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| -> Option<std::path::PathBuf> {
        if let Ok(c) = std::fs::canonicalize(p) {
            return Some(c);
        }
        let parent = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        Some(std::fs::canonicalize(parent).ok()?.join(p.file_name()?))
    };
    match (canon(a), canon(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// A non-empty environment variable that applies to `fspf`.
fn env_for(fspf: &Path, name: &str) -> Option<zeroize::Zeroizing<String>> {
    let v = zeroize::Zeroizing::new(std::env::var(name).ok()?);
    (!v.trim().is_empty() && env_applies_to(fspf)).then_some(v)
}

impl KeyTagArgs {
    /// The key for `fspf`: `--key-file`, `--key`, or `SCONE_FSPF_KEY` (if it applies to `fspf`).
    pub fn volume_key(&self, fspf: &Path) -> Result<Option<VolumeKey>> {
        if let Some(f) = &self.key_file {
            return key_from_file(f).map(Some);
        }
        match &self.key {
            Some(k) if !k.trim().is_empty() => {
                return Ok(Some(VolumeKey::from_hex(k).context("--key")?))
            }
            _ => {}
        }
        match env_for(fspf, "SCONE_FSPF_KEY") {
            Some(k) => Ok(Some(VolumeKey::from_hex(&k).context("SCONE_FSPF_KEY")?)),
            None => Ok(None),
        }
    }

    /// The expected tag of `fspf`: `--tag`, or `SCONE_FSPF_TAG` (if it applies to `fspf`).
    pub fn expected_tag(&self, fspf: &Path) -> Result<Option<Tag>> {
        match &self.tag {
            Some(t) if !t.trim().is_empty() => Ok(Some(Tag::from_hex(t).context("--tag")?)),
            _ => match env_for(fspf, "SCONE_FSPF_TAG") {
                Some(t) => Ok(Some(Tag::from_hex(&t).context("SCONE_FSPF_TAG")?)),
                None => Ok(None),
            },
        }
    }

    /// Open `fspf` with the given key and, when given, check its tag.
    pub fn open(&self, fspf: &Path) -> Result<Volume> {
        let tag = self.expected_tag(fspf)?;
        let v = Volume::open(fspf, self.volume_key(fspf)?, tag)?;
        let tag_given = tag.is_some();
        if !v.is_encrypted() && tag_given {
            // Sealed under the public key, the tag can be forged by anyone (GHASH is linear).
            eprintln!(
                "fspf: warning: {} is not encrypted: its tag guards against accidents, not attackers (run `fspf encrypt`)",
                fspf.display()
            );
        }
        if v.is_encrypted() && !tag_given {
            eprintln!(
                "fspf: warning: no --tag (or SCONE_FSPF_TAG) given: freshness of {} is not checked",
                fspf.display()
            );
        }
        Ok(v)
    }

    /// Open `fspf` for a change. An encrypted fspf needs its current tag: without it a rolled-back
    /// fspf would be built upon, and the new tag would then bless the attacker's older state.
    pub fn open_for_update(&self, fspf: &Path) -> Result<Volume> {
        let tag = self.expected_tag(fspf)?;
        let tag_given = tag.is_some();
        let v = Volume::open(fspf, self.volume_key(fspf)?, tag)?;
        if v.is_encrypted() && !tag_given {
            bail!(
                "{} is encrypted: give its current tag (--tag or SCONE_FSPF_TAG; `fspf show --tag` prints it) so that a replaced or rolled-back fspf is never built upon",
                fspf.display()
            );
        }
        Ok(v)
    }
}

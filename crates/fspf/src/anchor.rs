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

impl KeyTagArgs {
    pub fn volume_key(&self) -> Result<Option<VolumeKey>> {
        if let Some(f) = &self.key_file {
            return key_from_file(f).map(Some);
        }
        match &self.key {
            Some(k) if !k.trim().is_empty() => Ok(Some(
                VolumeKey::from_hex(k).context("--key / SCONE_FSPF_KEY")?,
            )),
            _ => Ok(None),
        }
    }
    pub fn expected_tag(&self) -> Result<Option<Tag>> {
        match &self.tag {
            Some(t) if !t.trim().is_empty() => {
                Ok(Some(Tag::from_hex(t).context("--tag / SCONE_FSPF_TAG")?))
            }
            _ => Ok(None),
        }
    }
    /// Open `fspf` with the given key and, when given, check its tag.
    pub fn open(&self, fspf: &Path) -> Result<Volume> {
        let v = Volume::open(fspf, self.volume_key()?, self.expected_tag()?)?;
        let tag_given = self.tag.as_deref().is_some_and(|t| !t.trim().is_empty());
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
        let tag_given = self.tag.as_deref().is_some_and(|t| !t.trim().is_empty());
        let v = Volume::open(fspf, self.volume_key()?, self.expected_tag()?)?;
        if v.is_encrypted() && !tag_given {
            bail!(
                "{} is encrypted: give its current tag (--tag or SCONE_FSPF_TAG; `fspf show --tag` prints it) so that a replaced or rolled-back fspf is never built upon",
                fspf.display()
            );
        }
        Ok(v)
    }
}

//! Loading keys and tags from flags, files and the environment.
use crate::KeyTagArgs;
use anyhow::{bail, Context, Result};
use fspf_core::{Tag, Volume, VolumeKey};
use std::io::Read;
use std::path::Path;

/// Longest key text read from a file, stdin or a descriptor (the `fspf encrypt` line is ~180).
const MAX_KEY_TEXT: u64 = 4096;

/// The key text of `r`: its first line (a key file, stdin or an inherited fd), at most
/// [`MAX_KEY_TEXT`] bytes. Read byte by byte so nothing after the line is consumed: with
/// `--key-file -`, the rest of stdin stays for the program `fspf run` starts.
fn read_key_text(mut r: impl Read) -> std::io::Result<zeroize::Zeroizing<String>> {
    let mut buf = zeroize::Zeroizing::new(Vec::new());
    let mut b = [0u8; 1];
    while (buf.len() as u64) < MAX_KEY_TEXT {
        match r.read(&mut b) {
            Ok(0) => break,
            Ok(_) if b[0] == b'\n' && !buf.iter().all(u8::is_ascii_whitespace) => break,
            Ok(_) => buf.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(zeroize::Zeroizing::new(
        String::from_utf8_lossy(&buf).into_owned(),
    ))
}

/// An inherited descriptor (`--key-fd N`, or 0 for `--key-file -`), opened anew through
/// `/proc/self/fd` (no unsafe adoption of a raw fd; a pipe, file or memfd all work).
fn open_fd(n: u32) -> std::io::Result<std::fs::File> {
    std::fs::File::open(format!("/proc/self/fd/{n}"))
}

/// Parse a key file: 64 hex digits, or the `... key: HEX` line printed by `fspf encrypt`;
/// `-` is stdin.
pub fn key_from_file(p: &Path) -> Result<VolumeKey> {
    if p == Path::new("-") {
        let s = open_fd(0)
            .and_then(read_key_text)
            .context("reading the key from stdin (--key-file -)")?;
        return parse_key_text(&s, "stdin (--key-file -)");
    }
    // A file is read at once (nothing after the key line belongs to anyone else, unlike stdin).
    let s = std::fs::File::open(p)
        .and_then(|f| {
            let mut all = zeroize::Zeroizing::new(Vec::new());
            f.take(MAX_KEY_TEXT).read_to_end(&mut all)?;
            read_key_text(&all[..])
        })
        .with_context(|| format!("reading key file {}", p.display()))?;
    parse_key_text(&s, &format!("key file {}", p.display()))
}

/// The key read from the inherited descriptor `n` (`--key-fd N`).
pub fn key_from_fd(n: u32) -> Result<VolumeKey> {
    let s = open_fd(n)
        .and_then(read_key_text)
        .with_context(|| format!("reading the key from file descriptor {n} (--key-fd)"))?;
    parse_key_text(&s, &format!("file descriptor {n} (--key-fd)"))
}

/// 64 hex digits, or the `... key: HEX` line printed by `fspf encrypt`.
fn parse_key_text(s: &str, what: &str) -> Result<VolumeKey> {
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
        bail!("{what} is empty")
    };
    VolumeKey::from_hex(hex).with_context(|| what.to_string())
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

/// What `fspf run` opens: key, tag, volume, and the index cache file its processes read.
pub type RunOpen = (
    Option<VolumeKey>,
    Option<Tag>,
    Volume,
    Option<std::fs::File>,
);

impl KeyTagArgs {
    /// The key for `fspf`: `--key-file`, `--key`, or `SCONE_FSPF_KEY` (if it applies to `fspf`).
    pub fn volume_key(&self, fspf: &Path) -> Result<Option<VolumeKey>> {
        if let Some(f) = &self.key_file {
            return key_from_file(f).map(Some);
        }
        if let Some(n) = self.key_fd {
            return key_from_fd(n).map(Some);
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

    /// Key, expected tag and the opened volume of `fspf`, for a run or a mount: with both key
    /// and tag the sealed index cache beside the fspf spares the parse. The volume is usable.
    pub fn open_for_run(&self, fspf: &Path) -> Result<(Option<VolumeKey>, Option<Tag>, Volume)> {
        let key = self.volume_key(fspf)?;
        let tag = self.expected_tag(fspf)?;
        let vol = match (&key, tag) {
            (Some(k), Some(t)) => Volume::open_cached(fspf, k.clone(), t)?,
            _ => Volume::open(fspf, key.clone(), tag)?,
        };
        vol.check_usable()?;
        Ok((key, tag, vol))
    }

    /// [`KeyTagArgs::open_for_run`] for `fspf run`: with key and tag, the index cache (when
    /// it serves) is read a page at a time, and its file comes back for the run's processes,
    /// which read their pages from it too (`index_cache::PagedCache`).
    pub fn open_for_shielded_run(&self, fspf: &Path) -> Result<RunOpen> {
        let key = self.volume_key(fspf)?;
        let tag = self.expected_tag(fspf)?;
        let (vol, cache) = match (&key, tag) {
            (Some(k), Some(t)) => {
                let (v, c) = fspf_core::volume::index_cache::open_for_run(
                    fspf,
                    k.clone(),
                    t,
                    fspf_core::volume::index_cache::stop_on_damage,
                )?;
                (v, c.map(|(_, f)| f))
            }
            _ => (Volume::open(fspf, key.clone(), tag)?, None),
        };
        vol.check_usable()?;
        Ok((key, tag, vol, cache))
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

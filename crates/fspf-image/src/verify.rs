//! `fspf image verify`: check a protected archive offline. Every member the container sees in a
//! protected region is checked against the fspf (content, kind, link target), every file the
//! fspf lists must be there, and no layer may hold a member of an encrypted region that is not
//! fspf ciphertext (plaintext left in a lower layer).
use crate::error::{ImageError, Result};
use crate::merge::{whiteout, LayerMarks, Upper};
use crate::paths::member_path;
use crate::protect::FSPF_IN_IMAGE;
use crate::source::{self, Source};
use fspf_core::format::layout::ENC_MAGIC;
use fspf_core::{EmbedPath, FileKind, Protection, RegionKind, Tag, Volume, VolumeKey};
use std::collections::HashSet;
use std::io::{self, Read, Seek, Write};
use std::path::Path;

#[derive(Debug)]
pub struct VerifyReport {
    pub tag: Tag,
    pub layers: usize,
    /// Regular files checked against the fspf.
    pub files: u64,
    /// Visible members of protected regions that the fspf does not list (hidden under the
    /// shield, e.g. `--exclude`d): not a failure.
    pub unlisted: u64,
    pub findings: Vec<String>,
}

/// Members up to this size are checked from memory; larger ones from an unlinked temporary file.
const IN_MEMORY: u64 = 64 << 20;

/// The fspf named by the image's entrypoint `--tag`, when no tag is given.
pub fn entrypoint_tag(config: &serde_json::Value) -> Option<String> {
    let ep = config["config"]["Entrypoint"].as_array()?;
    let i = ep.iter().position(|a| a == "--tag")?;
    ep.get(i + 1)?.as_str().map(String::from)
}

/// Copy the fspf and its trees out of the image into `dir`. Returns the fspf's path there.
fn extract_fspf(src: &Source, image: &source::Image, dir: &Path) -> Result<std::path::PathBuf> {
    let fspf_rel = FSPF_IN_IMAGE.trim_start_matches('/');
    let mut upper = Upper::default();
    for l in image.layers.iter().rev() {
        let mut stream = source::open_layer(src, l, None)?;
        let mut marks = LayerMarks::default();
        let mut found = false;
        {
            let mut ar = tar::Archive::new(&mut stream);
            for e in ar.entries().map_err(|e| ImageError::io(&l.file, e))? {
                let mut e = e.map_err(|e| ImageError::io(&l.file, e))?;
                let Ok(p) = member_path(&e.path_bytes()) else {
                    continue;
                };
                if let Some(w) = whiteout(&p) {
                    marks.whiteout(w);
                    continue;
                }
                marks.define(&p, e.header().entry_type().is_dir());
                let rel = String::from_utf8_lossy(&p[1..]).into_owned();
                let ours = rel == fspf_rel || rel.starts_with(&format!("{fspf_rel}.trees/"));
                if !ours || upper.hides(&p) || e.header().entry_type() != tar::EntryType::Regular {
                    continue;
                }
                found |= rel == fspf_rel;
                let local = dir.join(rel.strip_prefix(".fspf/").unwrap_or(&rel));
                if let Some(d) = local.parent() {
                    std::fs::create_dir_all(d).map_err(|x| ImageError::io(d, x))?;
                }
                let mut f = std::fs::File::create(&local).map_err(|x| ImageError::io(&local, x))?;
                io::copy(&mut e, &mut f).map_err(|x| ImageError::io(&local, x))?;
            }
        }
        source::finish_layer(stream, l)?;
        upper.absorb(marks);
        if found {
            return Ok(dir.join("fspf.pb"));
        }
    }
    Err(ImageError::invalid(
        "image",
        format!("no {FSPF_IN_IMAGE}: not an image protected by fspf image protect"),
    ))
}

/// A member's bytes, positioned-readable: in memory when small, else spooled.
enum Stored {
    Mem(Vec<u8>),
    File(std::fs::File),
}

impl fspf_core::codec::ReadAt for Stored {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        match self {
            Stored::Mem(v) => v.read_at(buf, off),
            Stored::File(f) => f.read_at(buf, off),
        }
    }
    fn len(&self) -> io::Result<u64> {
        match self {
            Stored::Mem(v) => Ok(v.len() as u64),
            Stored::File(f) => fspf_core::codec::ReadAt::len(f),
        }
    }
}

fn stored(r: &mut impl Read, size: u64) -> io::Result<Stored> {
    if size <= IN_MEMORY {
        let mut v = Vec::with_capacity(size as usize);
        r.read_to_end(&mut v)?;
        Ok(Stored::Mem(v))
    } else {
        let mut f = tempfile::tempfile()?;
        io::copy(r, &mut f)?;
        f.flush()?;
        f.rewind()?;
        Ok(Stored::File(f))
    }
}

pub fn verify(image_path: &Path, key: VolumeKey, tag: Option<Tag>) -> Result<VerifyReport> {
    let src = Source::open(image_path)?;
    let image = src.image()?;
    let mut findings = Vec::new();
    let ep = image.config["config"]["Entrypoint"].as_array();
    if !ep
        .and_then(|a| a.first())
        .is_some_and(|a| a.as_str().is_some_and(|s| s.starts_with(crate::FSPF_DIR)))
    {
        findings.push(
            "the image's entrypoint does not start the shield (it does not run from /.fspf)"
                .to_string(),
        );
    }
    let tag = match tag {
        Some(t) => t,
        None => {
            let t = entrypoint_tag(&image.config).ok_or_else(|| {
                ImageError::invalid(
                    "image",
                    "no --tag in the entrypoint: give the tag (--tag or --tag-file)",
                )
            })?;
            Tag::from_hex(&t).map_err(ImageError::Core)?
        }
    };
    let work = tempfile::tempdir().map_err(|e| ImageError::io("temporary directory", e))?;
    let fspf = extract_fspf(&src, &image, work.path())?;
    let vol = Volume::open(&fspf, Some(key), Some(tag))?;
    let mut upper = Upper::default();
    let mut seen: HashSet<EmbedPath> = HashSet::new();
    let (mut files, mut unlisted) = (0u64, 0u64);
    for (i, l) in image.layers.iter().enumerate().rev() {
        let mut stream = source::open_layer(&src, l, None)?;
        let mut marks = LayerMarks::default();
        {
            let mut ar = tar::Archive::new(&mut stream);
            let mut verified_here: std::collections::HashMap<Vec<u8>, EmbedPath> =
                Default::default();
            for e in ar.entries().map_err(|e| ImageError::io(&l.file, e))? {
                let mut e = e.map_err(|e| ImageError::io(&l.file, e))?;
                let kind = e.header().entry_type();
                if kind == tar::EntryType::XGlobalHeader {
                    continue;
                }
                let name = e.path_bytes().into_owned();
                let label = String::from_utf8_lossy(&name).into_owned();
                let p = match member_path(&name) {
                    Ok(p) => p,
                    Err(reason) => {
                        findings.push(format!("layer {i}: {label}: refused: {reason}"));
                        continue;
                    }
                };
                if let Some(w) = whiteout(&p) {
                    marks.whiteout(w);
                    continue;
                }
                marks.define(&p, kind.is_dir());
                let visible = !upper.hides(&p);
                let ep = EmbedPath::from_bytes(&p)?;
                let shown = ep.to_string();
                let Some(region) = vol.region_for(&ep) else {
                    continue;
                };
                if region.kind == RegionKind::Ephemeral
                    || region.protection == Protection::NotProtected
                {
                    continue;
                }
                let encrypted = region.protection == Protection::Encrypted;
                let entry = vol.lookup(&ep).map(|c| c.into_owned());
                let regular = matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous);
                if regular {
                    let size = e.size();
                    let data = stored(&mut e, size).map_err(|x| ImageError::io(&l.file, x))?;
                    let listed_file =
                        matches!(entry.as_ref().map(|e| &e.kind), Some(FileKind::File { .. }));
                    if visible && listed_file {
                        files += 1;
                        seen.insert(ep.clone());
                        match vol.check_stored(&ep, data) {
                            Ok(()) => {
                                verified_here.insert(p.clone(), ep.clone());
                            }
                            Err(err) => findings.push(format!("layer {i}: {shown}: {err}")),
                        }
                        continue;
                    }
                    if encrypted {
                        let mut head = [0u8; 5];
                        let ok = size >= head.len() as u64
                            && fspf_core::codec::ReadAt::read_exact_at(&data, &mut head, 0).is_ok()
                            && head[..] == ENC_MAGIC[..5];
                        if !ok {
                            findings.push(format!("layer {i}: {shown}: plaintext of an encrypted path (not fspf ciphertext)"));
                            continue;
                        }
                    }
                    if visible {
                        match entry {
                            None => unlisted += 1,
                            Some(_) => findings.push(format!("layer {i}: {shown}: a regular file where the fspf lists another kind")),
                        }
                    }
                    continue;
                }
                if !visible {
                    continue;
                }
                match kind {
                    tar::EntryType::Link => {
                        let t = e
                            .link_name_bytes()
                            .map(|c| c.into_owned())
                            .unwrap_or_default();
                        let target = member_path(&t)
                            .ok()
                            .and_then(|t| verified_here.get(&t).cloned());
                        match (target, entry) {
                            (Some(tp), Some(en)) if vol.lookup(&tp).is_some_and(|te| te.kind == en.kind) => {
                                files += 1;
                                seen.insert(ep);
                            }
                            (_, None) => unlisted += 1,
                            _ => findings.push(format!("layer {i}: {shown}: a hard link whose content the fspf does not list here")),
                        }
                    }
                    tar::EntryType::Symlink => {
                        let t = e
                            .link_name_bytes()
                            .map(|c| c.into_owned())
                            .unwrap_or_default();
                        match entry.map(|e| e.kind) {
                            Some(FileKind::Symlink(x)) if x == t => {
                                seen.insert(ep);
                            }
                            None => unlisted += 1,
                            Some(_) => findings.push(format!(
                                "layer {i}: {shown}: symlink to {} differs from the fspf",
                                String::from_utf8_lossy(&t)
                            )),
                        }
                    }
                    tar::EntryType::Directory => match entry.map(|e| e.kind) {
                        Some(FileKind::Dir) | None => {}
                        Some(_) => findings.push(format!(
                            "layer {i}: {shown}: a directory where the fspf lists another kind"
                        )),
                    },
                    _ => match entry.map(|e| e.kind) {
                        Some(FileKind::Special { .. }) => {
                            seen.insert(ep);
                        }
                        None => unlisted += 1,
                        Some(_) => findings.push(format!(
                            "layer {i}: {shown}: a special file where the fspf lists another kind"
                        )),
                    },
                }
            }
        }
        if let Err(err) = source::finish_layer(stream, l) {
            findings.push(err.to_string());
        }
        upper.absorb(marks);
    }
    let mut missing: Vec<String> = vol
        .files()
        .iter()
        // A hard link (kind 5) has nothing stored at its name: its file is checked at the
        // file's name, and the fspf's parse checked that the two name each other.
        .filter(|(p, e)| !matches!(e.kind, FileKind::Dir | FileKind::Link(_)) && !seen.contains(*p))
        .filter(|(p, _)| {
            vol.region_for(p)
                .is_some_and(|r| r.kind != RegionKind::Ephemeral)
        })
        .map(|(p, _)| format!("{p}: listed in the fspf but not in the image"))
        .collect();
    findings.append(&mut missing);
    Ok(VerifyReport {
        tag,
        layers: image.layers.len(),
        files,
        unlisted,
        findings,
    })
}

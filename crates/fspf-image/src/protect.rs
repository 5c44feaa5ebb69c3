//! `fspf image protect`: one streamed pass over the layers, top layer first, that records every
//! file the container sees in a new fspf, seals encrypted paths into rewritten layers, and
//! writes the protected image as an OCI archive with one more layer holding the fspf and the
//! shield, and an entrypoint that starts the image's own program under it.
use crate::error::{ImageError, Result};
use crate::merge::{whiteout, LayerMarks, Upper};
use crate::paths::{ancestors, member_path, symlink_escapes};
use crate::source::{self, LayerRef, Source, MT_CONFIG, MT_LAYER_GZIP, MT_LAYER_TAR, MT_MANIFEST};
use crate::tarw::{self, padding, write_header, ArchiveWriter, Member, BLOCK};
use fspf_core::format::metadata::{Owner, SpecialKind};
use fspf_core::volume::RegionSpec;
use fspf_core::{EmbedPath, FileEntry, FileKind, Protection, RegionKind, Tag, Volume, VolumeKey};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Where the shield lives in a protected image (a not-protected region).
pub const FSPF_DIR: &str = "/.fspf";
/// The fspf in a protected image.
pub const FSPF_IN_IMAGE: &str = "/.fspf/fspf.pb";
/// Regions that are not protected by default: kernel file systems, runtime state, scratch
/// space, the files a container runtime mounts over the image (`/etc/hosts`, …) and the
/// shield's own directory.
pub const DEFAULT_NOT_PROTECTED: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/tmp",
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    FSPF_DIR,
];

/// Builds the wrapper's program and arguments from the tag.
pub type Wrapper = Box<dyn Fn(&Tag) -> Vec<String>>;

pub struct ProtectOptions {
    pub src: PathBuf,
    pub dst: PathBuf,
    pub encrypt: Vec<String>,
    pub ephemeral: Vec<String>,
    pub not_protected: Vec<String>,
    pub exclude: Vec<String>,
    /// Files of the shield placed below [`FSPF_DIR`]: (relative path, content, mode).
    pub runtime: Vec<(String, Vec<u8>, u32)>,
    /// Program and arguments that start the image's entrypoint under the shield, given the tag;
    /// `--` and the image's own entrypoint follow.
    pub wrapper: Wrapper,
    /// `org.opencontainers.image.ref.name` of the output (default: the source's, tag + `-fspf`).
    pub name: Option<String>,
}

#[derive(Debug)]
pub struct Protected {
    pub key: VolumeKey,
    pub tag: Tag,
    pub files: u64,
    pub encrypted_files: u64,
    pub bytes: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub layers: usize,
    pub rewritten_layers: usize,
    pub manifest_digest: String,
    pub name: Option<String>,
    /// Command-line paths and patterns (`--encrypt /app`, `--exclude GLOB`) that no member of
    /// the image matched: most likely typos.
    pub unmatched: Vec<String>,
}

/// What a region does to a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Not recorded, bytes kept (not-protected and ephemeral regions).
    Pass,
    Authenticated,
    Encrypted,
}

/// The whiteout member name that hides the tar member `name` (`a/b/c` -> `a/b/.wh.c`).
fn whiteout_name(name: &[u8]) -> Vec<u8> {
    let trimmed = name.strip_suffix(b"/").unwrap_or(name);
    let cut = trimmed
        .iter()
        .rposition(|&b| b == b'/')
        .map_or(0, |i| i + 1);
    let mut w = trimmed[..cut].to_vec();
    w.extend_from_slice(b".wh.");
    w.extend_from_slice(&trimmed[cut..]);
    w
}

/// `a` and `b` lie in one region (a hard link may only name a file of its own region).
fn same_region(vol: &Volume, a: &EmbedPath, b: &EmbedPath) -> bool {
    match (vol.region_for(a), vol.region_for(b)) {
        (Some(x), Some(y)) => x.embed_point == y.embed_point,
        _ => false,
    }
}

fn class_of(vol: &Volume, p: &EmbedPath) -> Class {
    match vol.region_for(p) {
        Some(r) if r.kind == RegionKind::Ephemeral => Class::Pass,
        Some(r) => match r.protection {
            Protection::NotProtected => Class::Pass,
            Protection::Authenticated => Class::Authenticated,
            Protection::Encrypted => Class::Encrypted,
        },
        None => Class::Pass,
    }
}

fn is_region_point(vol: &Volume, p: &EmbedPath) -> bool {
    vol.regions().iter().any(|r| &r.embed_point == p)
}

/// Absolute embed path of a command-line path.
fn user_path(flag: &str, p: &str) -> Result<EmbedPath> {
    if !p.starts_with('/') {
        return Err(ImageError::invalid(
            format!("{flag} {p}"),
            "paths in the image must be absolute (start with /)",
        ));
    }
    Ok(EmbedPath::parse(p)?)
}

/// The `--exclude` globs: a path is excluded when a glob matches it or one of its ancestors.
pub struct Excludes(globset::GlobSet);

impl Excludes {
    pub fn new(globs: &[String]) -> Result<Self> {
        let mut b = globset::GlobSetBuilder::new();
        for g in globs {
            if !g.starts_with('/') && !g.starts_with('*') {
                return Err(ImageError::invalid(
                    format!("--exclude {g}"),
                    "patterns match absolute paths in the image: start them with / (or *)",
                ));
            }
            let glob = globset::GlobBuilder::new(g.trim_end_matches('/'))
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| ImageError::invalid(format!("--exclude {g}"), e.to_string()))?;
            b.add(glob);
        }
        Ok(Excludes(b.build().map_err(|e| {
            ImageError::invalid("--exclude", e.to_string())
        })?))
    }
    pub fn matches(&self, p: &[u8]) -> bool {
        !self.which(p).is_empty()
    }
    /// The indices of the globs that match `p` or one of its ancestors.
    pub fn which(&self, p: &[u8]) -> Vec<usize> {
        if self.0.is_empty() {
            return Vec::new();
        }
        let mut out = self.0.matches(String::from_utf8_lossy(p).as_ref());
        for a in ancestors(p).skip(1) {
            out.extend(self.0.matches(String::from_utf8_lossy(a).as_ref()));
        }
        out
    }
}

/// A reader that copies what it reads into a writer (an authenticated member: its bytes are
/// hashed by the seal and written unchanged into the rewritten layer).
struct Tee<'a, R, W: ?Sized> {
    r: R,
    w: &'a mut W,
}

impl<R: Read, W: Write + ?Sized> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        self.w.write_all(&buf[..n])?;
        Ok(n)
    }
}

fn makedev(major: u32, minor: u32) -> u64 {
    let (ma, mi) = (major as u64, minor as u64);
    ((ma & 0xffff_f000) << 32) | ((ma & 0xfff) << 8) | ((mi & 0xffff_ff00) << 12) | (mi & 0xff)
}

/// The header fields of a source member, to write it again.
struct Head {
    name: Vec<u8>,
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    size: u64,
    link: Option<Vec<u8>>,
    uname: Option<Vec<u8>>,
    gname: Option<Vec<u8>>,
    dev: Option<(u32, u32)>,
    pax: Vec<(String, Vec<u8>)>,
}

impl Head {
    fn of<R: Read>(e: &mut tar::Entry<'_, R>) -> Result<Head> {
        let h = e.header();
        let kind = h.entry_type();
        let dev = if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            Some((
                h.device_major().ok().flatten().unwrap_or(0),
                h.device_minor().ok().flatten().unwrap_or(0),
            ))
        } else {
            None
        };
        let mut head = Head {
            name: e.path_bytes().into_owned(),
            kind,
            mode: h.mode().unwrap_or(0o644),
            uid: h.uid().unwrap_or(0),
            gid: h.gid().unwrap_or(0),
            mtime: h.mtime().unwrap_or(0),
            size: e.size(),
            link: e.link_name_bytes().map(|l| l.into_owned()),
            uname: h.username_bytes().map(|u| u.to_vec()),
            gname: h.groupname_bytes().map(|g| g.to_vec()),
            dev,
            pax: Vec::new(),
        };
        if let Ok(Some(ext)) = e.pax_extensions() {
            for r in ext.flatten() {
                let Ok(k) = r.key() else { continue };
                if matches!(k, "path" | "linkpath" | "size") || k.starts_with("GNU.sparse") {
                    continue;
                }
                head.pax.push((k.to_string(), r.value_bytes().to_vec()));
            }
        }
        Ok(head)
    }

    fn member(&self, size: u64) -> Member<'_> {
        Member {
            name: &self.name,
            kind: if self.kind == tar::EntryType::Continuous
                || self.kind == tar::EntryType::GNUSparse
            {
                tar::EntryType::Regular
            } else {
                self.kind
            },
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            size,
            link: self.link.as_deref(),
            uname: self.uname.as_deref(),
            gname: self.gname.as_deref(),
            dev: self.dev,
            pax: self.pax.clone(),
        }
    }

    fn meta(&self, mut e: FileEntry) -> FileEntry {
        e.mode = self.mode & 0o7777;
        e.mtime_ns = (self.mtime as i64).saturating_mul(1_000_000_000);
        e.owner = Some(Owner {
            uid: self.uid as u32,
            gid: self.gid as u32,
        });
        e
    }
}

fn entry(kind: FileKind) -> FileEntry {
    FileEntry {
        links: Vec::new(),
        kind,
        mode: 0,
        mtime_ns: 0,
        owner: None,
        ino: None,
        ctime_ns: 0,
    }
}

/// The output's reference name: `--name`, else the source's with `-fspf` added to its tag.
fn output_name(opts: &ProtectOptions, src: Option<&str>) -> Option<String> {
    if let Some(n) = &opts.name {
        return Some(n.clone());
    }
    let s = src?;
    let last = s.rsplit('/').next().unwrap_or(s);
    Some(if last.contains(':') {
        format!("{s}-fspf")
    } else {
        format!("{s}:fspf")
    })
}

/// A new fspf in `dir` with the image's regions, encrypted; returns it opened.
fn new_volume(dir: &Path, opts: &ProtectOptions) -> Result<(Volume, VolumeKey, Tag)> {
    let p = dir.join("fspf.pb");
    Volume::create(&p, false)?;
    let mut v = Volume::open(&p, None, None)?;
    let mut regions: BTreeMap<EmbedPath, (RegionKind, Protection)> = BTreeMap::new();
    let kernel = |e: &EmbedPath| RegionKind::Kernel(e.to_path_buf());
    regions.insert(
        EmbedPath::root(),
        (kernel(&EmbedPath::root()), Protection::Authenticated),
    );
    for d in DEFAULT_NOT_PROTECTED {
        let e = EmbedPath::parse(d)?;
        regions.insert(e.clone(), (kernel(&e), Protection::NotProtected));
    }
    let fspf_dir = EmbedPath::parse(FSPF_DIR)?;
    let mut user = |flag: &str,
                    list: &[String],
                    f: &dyn Fn(&EmbedPath) -> (RegionKind, Protection)|
     -> Result<()> {
        for p in list {
            let e = user_path(flag, p)?;
            if e.starts_with(&fspf_dir) {
                return Err(ImageError::invalid(
                    format!("{flag} {p}"),
                    format!("{FSPF_DIR} holds the shield; it cannot be a region"),
                ));
            }
            regions.insert(e.clone(), f(&e));
        }
        Ok(())
    };
    user("--encrypt", &opts.encrypt, &|e| {
        (kernel(e), Protection::Encrypted)
    })?;
    user("--ephemeral", &opts.ephemeral, &|_| {
        (RegionKind::Ephemeral, Protection::Encrypted)
    })?;
    user("--not-protected", &opts.not_protected, &|e| {
        (kernel(e), Protection::NotProtected)
    })?;
    for (embed_point, (kind, protection)) in regions {
        v.add_region(RegionSpec {
            embed_point,
            kind,
            protection,
            key_len: None,
            chunk_len: None,
        })?;
    }
    let (tag, key) = v.encrypt()?;
    drop(v);
    let v = Volume::open(&p, Some(key.clone()), Some(tag))?;
    Ok((v, key, tag))
}

pub fn protect(opts: &ProtectOptions) -> Result<Protected> {
    let src = Source::open(&opts.src)?;
    let image = src.image()?;
    let excludes = Excludes::new(&opts.exclude)?;
    let dst_dir = match opts.dst.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if opts.dst.is_dir() {
        return Err(ImageError::invalid(
            opts.dst.display().to_string(),
            "is a directory; DST is the OCI archive to write",
        ));
    }
    let work = tempfile::Builder::new()
        .prefix(".fspf-image-")
        .tempdir_in(&dst_dir)
        .map_err(|e| ImageError::io(&dst_dir, e))?;
    let (mut vol, key, _) = new_volume(work.path(), opts)?;
    let tmp = tempfile::Builder::new()
        .prefix(".fspf-image-out-")
        .tempfile_in(&dst_dir)
        .map_err(|e| ImageError::io(&dst_dir, e))?;
    let file = tmp
        .as_file()
        .try_clone()
        .map_err(|e| ImageError::io(tmp.path(), e))?;
    let mut out = ArchiveWriter::new(file).map_err(|e| ImageError::io(tmp.path(), e))?;
    let any_encrypted = vol
        .regions()
        .iter()
        .any(|r| r.protection == Protection::Encrypted && r.kind != RegionKind::Ephemeral);

    let mut upper = Upper::default();
    let mut listed: BTreeMap<EmbedPath, FileEntry> = BTreeMap::new();
    // Which command-line paths and patterns matched a member (the others are reported).
    let user_points: Vec<(String, EmbedPath)> = [
        ("--encrypt", &opts.encrypt),
        ("--ephemeral", &opts.ephemeral),
        ("--not-protected", &opts.not_protected),
    ]
    .iter()
    .flat_map(|(f, l)| l.iter().map(move |p| (format!("{f} {p}"), p)))
    .map(|(label, p)| Ok((label, EmbedPath::parse(p)?)))
    .collect::<Result<_>>()?;
    let mut point_used = vec![false; user_points.len()];
    let mut exclude_used = vec![false; opts.exclude.len()];
    let mut descriptors: Vec<Option<(Value, String)>> = vec![None; image.layers.len()];
    let mut report = (0u64, 0u64, 0u64, 0usize); // files, encrypted files, bytes, rewritten layers
    for (i, l) in image.layers.iter().enumerate().rev() {
        // Without encrypted regions every layer is copied unchanged, by the reading thread.
        let copy = if any_encrypted {
            None
        } else {
            Some(
                out.begin_blob()
                    .map_err(|e| ImageError::io(tmp.path(), e))?,
            )
        };
        let mut stream = source::open_layer(&src, l, copy)?;
        let gzip = stream.gzip;
        let mut marks = LayerMarks::default();
        let mut changed = false;
        let mut sink = if any_encrypted {
            Some(
                out.begin_blob()
                    .map_err(|e| ImageError::io(tmp.path(), e))?,
            )
        } else {
            None
        };
        let werr = |e: io::Error| ImageError::io(tmp.path(), e);
        {
            let mut ar = tar::Archive::new(&mut stream);
            let entries = ar.entries().map_err(|e| ImageError::io(&l.file, e))?;
            // Files sealed in this layer, for its hard links.
            let mut sealed: HashMap<Vec<u8>, (FileEntry, bool)> = HashMap::new();
            for e in entries {
                let mut e = e.map_err(|e| {
                    ImageError::invalid(
                        format!("layer {}", l.file),
                        format!("not a tar archive: {e}"),
                    )
                })?;
                let head = Head::of(&mut e)?;
                if matches!(head.kind, tar::EntryType::XGlobalHeader) {
                    continue;
                }
                let name_str = || String::from_utf8_lossy(&head.name).into_owned();
                let p = member_path(&head.name).map_err(|reason| ImageError::Escape {
                    layer: i,
                    name: name_str(),
                    reason,
                })?;
                // Copies the member unchanged into the rewritten layer.
                macro_rules! keep {
                    () => {
                        if let Some(w) = sink.as_mut() {
                            write_header(w, &head.member(head.size)).map_err(werr)?;
                            let n = io::copy(&mut e, w).map_err(werr)?;
                            w.write_all(&[0u8; BLOCK as usize][..padding(n)])
                                .map_err(werr)?;
                        }
                    };
                }
                if let Some(w) = whiteout(&p) {
                    marks.whiteout(w);
                    keep!();
                    continue;
                }
                let is_dir = head.kind.is_dir();
                marks.define(&p, is_dir);
                let visible = !upper.hides(&p);
                let ep = EmbedPath::from_bytes(&p)?;
                let class = class_of(&vol, &ep);
                let hit = excludes.which(&p);
                for g in &hit {
                    exclude_used[*g] = true;
                }
                let excluded = !hit.is_empty();
                for (k, (_, e)) in user_points.iter().enumerate() {
                    if ep.starts_with(e) {
                        point_used[k] = true;
                    }
                }
                let record = visible && class != Class::Pass && !excluded;
                match head.kind {
                    tar::EntryType::Regular
                    | tar::EntryType::Continuous
                    | tar::EntryType::GNUSparse => {
                        let size = e.size();
                        if class == Class::Encrypted {
                            changed = true;
                            if excluded {
                                // Dropped: no plaintext of an encrypted path stays in a layer.
                                continue;
                            }
                            let w = sink.as_mut().ok_or_else(|| {
                                ImageError::Unsupported(
                                    "internal: an encrypted member without a rewritten layer"
                                        .into(),
                                )
                            })?;
                            let clen = vol.sealed_len(&ep, size)?;
                            write_header(w, &head.member(clen)).map_err(werr)?;
                            let before = w.len;
                            let fe = vol.seal_stream(&ep, size, head.mode, &mut e, w)?;
                            if w.len - before != clen {
                                return Err(ImageError::Unsupported(format!(
                                    "internal: {} sealed to {} bytes, not {clen}",
                                    name_str(),
                                    w.len - before
                                )));
                            }
                            w.write_all(&[0u8; BLOCK as usize][..padding(clen)])
                                .map_err(werr)?;
                            let fe = head.meta(fe);
                            sealed.insert(p.clone(), (fe.clone(), visible));
                            if record {
                                report.0 += 1;
                                report.1 += 1;
                                report.2 += size;
                                listed.insert(ep, fe);
                            }
                        } else if record {
                            let fe = match sink.as_mut() {
                                Some(w) => {
                                    write_header(w, &head.member(size)).map_err(werr)?;
                                    let mut tee = Tee {
                                        r: &mut e,
                                        w: &mut *w,
                                    };
                                    let fe = vol.seal_stream(
                                        &ep,
                                        size,
                                        head.mode,
                                        &mut tee,
                                        &mut io::sink(),
                                    )?;
                                    w.write_all(&[0u8; BLOCK as usize][..padding(size)])
                                        .map_err(werr)?;
                                    fe
                                }
                                None => {
                                    vol.seal_stream(&ep, size, head.mode, &mut e, &mut io::sink())?
                                }
                            };
                            let fe = head.meta(fe);
                            sealed.insert(p.clone(), (fe.clone(), true));
                            report.0 += 1;
                            report.2 += size;
                            listed.insert(ep, fe);
                        } else {
                            keep!();
                        }
                    }
                    tar::EntryType::Link => {
                        let target = head.link.clone().unwrap_or_default();
                        let t = member_path(&target).map_err(|reason| ImageError::Escape {
                            layer: i,
                            name: format!(
                                "{} (hard link to {})",
                                name_str(),
                                String::from_utf8_lossy(&target)
                            ),
                            reason,
                        })?;
                        if class == Class::Encrypted && (excluded || excludes.matches(&t)) {
                            changed = true;
                            continue;
                        }
                        if class != Class::Pass && (record || class == Class::Encrypted) {
                            let tp = EmbedPath::from_bytes(&t)?;
                            match sealed.get(&t) {
                                // In an encrypted region (whose layers are rewritten anyway) a
                                // hard link is recorded as one (FORMAT.md §2, kind 5): one file
                                // under two names, as the shields make them, and nothing stored
                                // at the link's name. The member becomes a whiteout of its name,
                                // so that a lower layer's file there does not show either.
                                Some((_, true))
                                    if class == Class::Encrypted
                                        && same_region(&vol, &ep, &tp) =>
                                {
                                    if record {
                                        report.0 += 1;
                                        listed.insert(ep, entry(FileKind::Link(tp)));
                                    }
                                    if let Some(w) = sink.as_mut() {
                                        let name = whiteout_name(&head.name);
                                        let mut m = head.member(0);
                                        m.name = &name;
                                        m.kind = tar::EntryType::Regular;
                                        m.link = None;
                                        m.dev = None;
                                        write_header(w, &m).map_err(werr)?;
                                    }
                                    changed = true;
                                    continue;
                                }
                                // Elsewhere the layer keeps its bytes (an authenticated layer
                                // stays shareable with the image it came from), so the name
                                // holds the file on disk: an entry sharing the target's content.
                                Some((fe, true)) => {
                                    if record {
                                        report.0 += 1;
                                        listed.insert(ep, fe.clone());
                                    }
                                }
                                _ => {
                                    return Err(ImageError::Unsupported(format!(
                                        "layer {i}: hard link {} -> {}: its target must be a protected file of the same layer that stays visible (copy the file instead of linking it)",
                                        name_str(),
                                        String::from_utf8_lossy(&target)
                                    )))
                                }
                            }
                        }
                        keep!();
                    }
                    tar::EntryType::Symlink => {
                        let target = head.link.clone().unwrap_or_default();
                        if symlink_escapes(&p, &target) {
                            return Err(ImageError::Escape {
                                layer: i,
                                name: format!(
                                    "{} -> {}",
                                    name_str(),
                                    String::from_utf8_lossy(&target)
                                ),
                                reason: "symlink climbing above the root",
                            });
                        }
                        if record {
                            listed.insert(ep, head.meta(entry(FileKind::Symlink(target))));
                        }
                        keep!();
                    }
                    tar::EntryType::Directory => {
                        if record && !is_region_point(&vol, &ep) {
                            listed.insert(ep, head.meta(entry(FileKind::Dir)));
                        }
                        keep!();
                    }
                    tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                        if record {
                            let kind = match head.kind {
                                tar::EntryType::Char => SpecialKind::Char,
                                tar::EntryType::Block => SpecialKind::Block,
                                _ => SpecialKind::Fifo,
                            };
                            let (ma, mi) = head.dev.unwrap_or((0, 0));
                            listed.insert(
                                ep,
                                head.meta(entry(FileKind::Special {
                                    kind,
                                    rdev: makedev(ma, mi),
                                })),
                            );
                        }
                        keep!();
                    }
                    other => {
                        return Err(ImageError::Unsupported(format!(
                            "layer {i}: member {} has tar type {:?}, which image layers do not use",
                            name_str(),
                            other.as_byte() as char
                        )))
                    }
                }
            }
            if let Some(w) = sink.as_mut() {
                w.write_all(&[0u8; 2 * BLOCK as usize]).map_err(werr)?;
            }
        }
        let (raw_digest, copied) = source::finish_layer(stream, l)?;
        upper.absorb(marks);
        descriptors[i] = Some(match sink {
            Some(s) if changed => {
                let (new_digest, len) = out.finish_blob(s).map_err(werr)?;
                report.3 += 1;
                (
                    json!({"mediaType": MT_LAYER_TAR, "digest": new_digest, "size": len}),
                    new_digest.clone(),
                )
            }
            s => {
                if let Some(s) = s {
                    out.abandon_blob(s).map_err(werr)?;
                }
                let (d, n) = match copied {
                    Some(c) => out.finish_blob(c).map_err(werr)?,
                    None => copy_blob(&src, l, &raw_digest, &mut out).map_err(werr)?,
                };
                if d != raw_digest {
                    return Err(ImageError::Digest {
                        what: format!("layer {} as copied", l.file),
                        expected: raw_digest,
                        found: d,
                    });
                }
                let mt = l.media_type.clone().unwrap_or_else(|| {
                    (if gzip { MT_LAYER_GZIP } else { MT_LAYER_TAR }).to_string()
                });
                (
                    json!({"mediaType": mt, "digest": d, "size": n}),
                    l.diff_id.clone(),
                )
            }
        });
    }
    // Parent directories that no layer lists (tar files may omit them).
    let mut parents = Vec::new();
    for p in listed.keys() {
        let mut cur = p.parent();
        while let Some(d) = cur {
            if listed.contains_key(&d)
                || is_region_point(&vol, &d)
                || class_of(&vol, &d) == Class::Pass
            {
                break;
            }
            parents.push(d.clone());
            cur = d.parent();
        }
    }
    for d in parents {
        let mut e = entry(FileKind::Dir);
        e.mode = 0o755;
        e.owner = Some(Owner { uid: 0, gid: 0 });
        listed.entry(d).or_insert(e);
    }
    let dirs = listed
        .values()
        .filter(|e| matches!(e.kind, FileKind::Dir))
        .count() as u64;
    let symlinks = listed
        .values()
        .filter(|e| matches!(e.kind, FileKind::Symlink(_)))
        .count() as u64;
    let tag = vol.record(listed.into_iter().collect())?;
    let fspf_path = vol.path().to_path_buf();
    drop(vol);
    // The sealed index cache, so that the container's first process parses nothing.
    drop(Volume::open_cached(&fspf_path, key.clone(), tag)?);

    // The shield's layer: the runtime, the fspf, its trees and index cache.
    let werr = |e: io::Error| ImageError::io(tmp.path(), e);
    let mut w = out.begin_blob().map_err(werr)?;
    let dir = |w: &mut dyn Write, name: &str| -> io::Result<()> {
        tarw::write_member(
            w,
            &Member::plain(name.as_bytes(), tar::EntryType::Directory, 0o755, 0),
            &[],
        )
        .map(|_| ())
    };
    let base = FSPF_DIR.trim_start_matches('/');
    dir(&mut w, &format!("{base}/")).map_err(werr)?;
    let mut made = std::collections::BTreeSet::new();
    for (rel, bytes, mode) in &opts.runtime {
        let mut acc = String::from(base);
        let parts: Vec<&str> = rel.split('/').collect();
        for d in &parts[..parts.len() - 1] {
            acc = format!("{acc}/{d}");
            if made.insert(acc.clone()) {
                dir(&mut w, &format!("{acc}/")).map_err(werr)?;
            }
        }
        let name = format!("{base}/{rel}");
        tarw::write_member(
            &mut w,
            &Member::plain(
                name.as_bytes(),
                tar::EntryType::Regular,
                *mode,
                bytes.len() as u64,
            ),
            bytes,
        )
        .map_err(werr)?;
    }
    for e in walk(work.path()).map_err(|e| ImageError::io(work.path(), e))? {
        let rel = e
            .strip_prefix(work.path())
            .unwrap_or(&e)
            .to_string_lossy()
            .into_owned();
        let name = format!("{base}/{rel}");
        if e.is_dir() {
            dir(&mut w, &format!("{name}/")).map_err(werr)?;
        } else {
            let bytes = std::fs::read(&e).map_err(|x| ImageError::io(&e, x))?;
            tarw::write_member(
                &mut w,
                &Member::plain(
                    name.as_bytes(),
                    tar::EntryType::Regular,
                    0o644,
                    bytes.len() as u64,
                ),
                &bytes,
            )
            .map_err(werr)?;
        }
    }
    w.write_all(&[0u8; 2 * BLOCK as usize]).map_err(werr)?;
    let (shield_digest, shield_len) = out.finish_blob(w).map_err(werr)?;

    // Config: the wrapped entrypoint, the new diff_ids, one more history entry.
    let mut config = image.config.clone();
    if !config["config"].is_object() {
        config["config"] = json!({});
    }
    let mut ep: Vec<Value> = (opts.wrapper)(&tag).into_iter().map(Value::from).collect();
    ep.push("--".into());
    if let Some(orig) = config["config"]["Entrypoint"].as_array() {
        ep.extend(orig.iter().cloned());
    }
    config["config"]["Entrypoint"] = Value::Array(ep);
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for d in descriptors {
        let (desc, diff) =
            d.ok_or_else(|| ImageError::Unsupported("internal: a layer was not written".into()))?;
        layers.push(desc);
        diff_ids.push(Value::from(diff));
    }
    layers.push(json!({"mediaType": MT_LAYER_TAR, "digest": shield_digest, "size": shield_len}));
    diff_ids.push(Value::from(shield_digest.clone()));
    config["rootfs"] = json!({"type": "layers", "diff_ids": diff_ids});
    if !config["history"].is_array() {
        config["history"] = json!([]);
    }
    if let Some(h) = config["history"].as_array_mut() {
        h.push(json!({"created_by": "fspf image protect", "comment": "fspf: the file system protection file and the shield"}));
    }
    let cfg_bytes =
        serde_json::to_vec(&config).map_err(|e| ImageError::invalid("config", e.to_string()))?;
    let (cdigest, csize) = out.add_blob(&cfg_bytes).map_err(werr)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": cdigest, "size": csize},
        "layers": layers,
    });
    let mbytes = serde_json::to_vec(&manifest)
        .map_err(|e| ImageError::invalid("manifest", e.to_string()))?;
    let (mdigest, msize) = out.add_blob(&mbytes).map_err(werr)?;
    let name = output_name(opts, image.ref_name.as_deref());
    let mut desc = json!({"mediaType": MT_MANIFEST, "digest": mdigest, "size": msize});
    if let Some(n) = &name {
        desc["annotations"] = json!({"org.opencontainers.image.ref.name": n});
    }
    let index = json!({"schemaVersion": 2, "manifests": [desc]});
    out.add_file("index.json", index.to_string().as_bytes())
        .map_err(werr)?;
    out.finish().map_err(werr)?;
    tmp.persist(&opts.dst)
        .map_err(|e| ImageError::io(&opts.dst, e.error))?;
    Ok(Protected {
        key,
        tag,
        files: report.0,
        encrypted_files: report.1,
        bytes: report.2,
        dirs,
        symlinks,
        layers: image.layers.len(),
        rewritten_layers: report.3,
        manifest_digest: mdigest,
        name,
        unmatched: user_points
            .iter()
            .zip(&point_used)
            .filter(|(_, used)| !**used)
            .map(|((label, _), _)| label.clone())
            .chain(
                opts.exclude
                    .iter()
                    .zip(&exclude_used)
                    .filter(|(_, used)| !**used)
                    .map(|(g, _)| format!("--exclude {g}")),
            )
            .collect(),
    })
}

/// Copy layer `l` unchanged into the archive. Returns its digest and size.
fn copy_blob(
    src: &Source,
    l: &LayerRef,
    digest: &str,
    out: &mut ArchiveWriter,
) -> io::Result<(String, u64)> {
    let (mut r, _) = src
        .open_file(&l.file)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let mut w = out.begin_blob()?;
    io::copy(&mut r, &mut w)?;
    let (d, n) = out.finish_blob(w)?;
    if d != digest {
        // The output is discarded with this error.
        return Err(io::Error::other(format!(
            "layer {} changed while it was read",
            l.file
        )));
    }
    Ok((d, n))
}

/// Every file and directory below `dir`, parents first, sorted.
fn walk(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&d)?
            .map(|e| e.map(|e| e.path()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for p in names.into_iter().rev() {
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

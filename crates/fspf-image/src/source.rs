//! Reading an image: an OCI image layout directory, an OCI archive (`podman save --format
//! oci-archive`) or a `docker save` archive. Archives are read in place: their members are
//! indexed once and read by offset, nothing is extracted.
use crate::error::{ImageError, Result};
use crate::tarw::Sha256;
use serde_json::Value;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Media types of the parts fspf writes or reads.
pub const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MT_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Where the image's files are.
pub enum Source {
    Layout(PathBuf),
    Archive {
        path: PathBuf,
        file: File,
        members: HashMap<String, ArchiveMember>,
    },
}

#[derive(Debug, Clone)]
pub struct ArchiveMember {
    offset: u64,
    size: u64,
    /// Link target: (is a symlink, target). Docker archives link `ID/layer.tar` to
    /// `../DIGEST.tar`; a symlink's target is relative to its directory, a hard link's names a
    /// member.
    link: Option<(bool, String)>,
}

/// One layer of the image, bottom first.
#[derive(Debug, Clone)]
pub struct LayerRef {
    /// The file in the source that holds it.
    pub file: String,
    /// `sha256:HEX` of its bytes, when the image names it (OCI); docker archives name only the
    /// uncompressed digest (`diff_id`).
    pub digest: Option<String>,
    pub media_type: Option<String>,
    /// `sha256:HEX` of the uncompressed tar, from the config's `rootfs.diff_ids`.
    pub diff_id: String,
}

/// The parts of an image that `fspf image` reads.
pub struct Image {
    pub config: Value,
    pub layers: Vec<LayerRef>,
    /// `org.opencontainers.image.ref.name` or the first docker `RepoTags` entry.
    pub ref_name: Option<String>,
}

fn norm(name: &str) -> String {
    name.trim_start_matches("./").to_string()
}

impl Source {
    pub fn open(path: &Path) -> Result<Source> {
        let md = std::fs::metadata(path).map_err(|e| ImageError::io(path, e))?;
        if md.is_dir() {
            if !path.join("index.json").is_file() {
                return Err(ImageError::invalid(
                    path.display().to_string(),
                    "a directory without index.json is not an OCI image layout",
                ));
            }
            return Ok(Source::Layout(path.to_path_buf()));
        }
        let file = File::open(path).map_err(|e| ImageError::io(path, e))?;
        let mut magic = [0u8; 4];
        let n = file
            .read_at(&mut magic, 0)
            .map_err(|e| ImageError::io(path, e))?;
        if n >= 2 && magic[..2] == [0x1f, 0x8b] {
            return Err(ImageError::Unsupported(format!(
                "{}: a gzip-compressed archive: give the uncompressed tar (`podman save` and `docker save` write one; `gunzip` it first)",
                path.display()
            )));
        }
        let mut members = HashMap::new();
        let mut ar = tar::Archive::new(&file);
        let entries = ar
            .entries_with_seek()
            .map_err(|e| ImageError::io(path, e))?;
        for e in entries {
            let e = e.map_err(|e| {
                ImageError::invalid(
                    path.display().to_string(),
                    format!("not a tar archive: {e}"),
                )
            })?;
            let name = norm(&String::from_utf8_lossy(&e.path_bytes()));
            let sym = e.header().entry_type() == tar::EntryType::Symlink;
            let link = match e.header().entry_type() {
                tar::EntryType::Symlink | tar::EntryType::Link => e
                    .link_name_bytes()
                    .map(|l| (sym, String::from_utf8_lossy(&l).into_owned())),
                _ => None,
            };
            members.insert(
                name,
                ArchiveMember {
                    offset: e.raw_file_position(),
                    size: e.size(),
                    link,
                },
            );
        }
        if members.is_empty() {
            return Err(ImageError::invalid(
                path.display().to_string(),
                "an empty archive",
            ));
        }
        Ok(Source::Archive {
            path: path.to_path_buf(),
            file,
            members,
        })
    }

    fn label(&self) -> String {
        match self {
            Source::Layout(p) | Source::Archive { path: p, .. } => p.display().to_string(),
        }
    }

    fn member(&self, name: &str) -> Option<ArchiveMember> {
        let Source::Archive { members, .. } = self else {
            return None;
        };
        let mut name = norm(name);
        for _ in 0..8 {
            let m = members.get(&name)?;
            match &m.link {
                None => return Some(m.clone()),
                Some((true, l)) => {
                    let dir = Path::new(&name).parent().unwrap_or(Path::new(""));
                    name = normalize_rel(&dir.join(l));
                }
                Some((false, l)) => name = norm(l),
            }
        }
        None
    }

    pub fn exists(&self, name: &str) -> bool {
        match self {
            Source::Layout(d) => d.join(name).is_file(),
            Source::Archive { .. } => self.member(name).is_some(),
        }
    }

    /// A file of the image, streamed, with its size.
    pub fn open_file(&self, name: &str) -> Result<(Box<dyn Read + Send>, u64)> {
        match self {
            Source::Layout(d) => {
                let p = d.join(name);
                let f = File::open(&p).map_err(|e| ImageError::io(&p, e))?;
                let n = f.metadata().map_err(|e| ImageError::io(&p, e))?.len();
                Ok((Box::new(f), n))
            }
            Source::Archive { file, .. } => {
                let m = self.member(name).ok_or_else(|| {
                    ImageError::invalid(self.label(), format!("no member {name}"))
                })?;
                let file = file
                    .try_clone()
                    .map_err(|e| ImageError::io(self.label(), e))?;
                Ok((
                    Box::new(SliceReader {
                        file,
                        pos: m.offset,
                        end: m.offset + m.size,
                    }),
                    m.size,
                ))
            }
        }
    }

    /// A small file of the image (JSON), whole.
    pub fn read_small(&self, name: &str) -> Result<Vec<u8>> {
        let (mut r, n) = self.open_file(name)?;
        if n > 64 << 20 {
            return Err(ImageError::invalid(
                format!("{}: {name}", self.label()),
                "larger than 64 MiB",
            ));
        }
        let mut b = Vec::with_capacity(n as usize);
        r.read_to_end(&mut b)
            .map_err(|e| ImageError::io(format!("{}: {name}", self.label()), e))?;
        Ok(b)
    }

    fn json(&self, name: &str) -> Result<Value> {
        let b = self.read_small(name)?;
        serde_json::from_slice(&b)
            .map_err(|e| ImageError::invalid(format!("{}: {name}", self.label()), e.to_string()))
    }

    /// A blob named by digest, checked against it.
    fn blob_json(&self, digest: &str) -> Result<Value> {
        let name = blob_path(digest)?;
        let b = self.read_small(&name)?;
        let found = crate::tarw::sha256_digest(&b);
        if found != digest {
            return Err(ImageError::Digest {
                what: format!("{}: {name}", self.label()),
                expected: digest.into(),
                found,
            });
        }
        serde_json::from_slice(&b)
            .map_err(|e| ImageError::invalid(format!("{}: {name}", self.label()), e.to_string()))
    }

    /// Read the image's manifest and config.
    pub fn image(&self) -> Result<Image> {
        if self.exists("index.json") {
            return self.oci_image();
        }
        if self.exists("manifest.json") {
            return self.docker_image();
        }
        Err(ImageError::invalid(
            self.label(),
            "neither index.json (OCI) nor manifest.json (docker save): not an image archive",
        ))
    }

    fn oci_image(&self) -> Result<Image> {
        let index = self.json("index.json")?;
        let mut desc = pick_manifest(&index, &self.label())?;
        // A nested index (multi-platform): one level down.
        if matches!(desc["mediaType"].as_str(), Some(MT_INDEX | MT_DOCKER_LIST)) {
            let d = desc["digest"].as_str().unwrap_or_default().to_string();
            let nested = self.blob_json(&d)?;
            desc = pick_manifest(&nested, &self.label())?;
        }
        let ref_name = desc["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .map(String::from);
        let mdigest = desc["digest"].as_str().ok_or_else(|| {
            ImageError::invalid(self.label(), "index.json: a manifest without digest")
        })?;
        let manifest = self.blob_json(mdigest)?;
        let cdigest = manifest["config"]["digest"]
            .as_str()
            .ok_or_else(|| ImageError::invalid(self.label(), "manifest without config"))?;
        let config = self.blob_json(cdigest)?;
        let diff_ids = diff_ids(&config, &self.label())?;
        let layers = manifest["layers"]
            .as_array()
            .ok_or_else(|| ImageError::invalid(self.label(), "manifest without layers"))?;
        if layers.len() != diff_ids.len() {
            return Err(ImageError::invalid(
                self.label(),
                format!(
                    "{} layers but {} rootfs.diff_ids in the config",
                    layers.len(),
                    diff_ids.len()
                ),
            ));
        }
        let mut out = Vec::new();
        for (l, diff_id) in layers.iter().zip(diff_ids) {
            let digest = l["digest"]
                .as_str()
                .ok_or_else(|| ImageError::invalid(self.label(), "a layer without digest"))?;
            out.push(LayerRef {
                file: blob_path(digest)?,
                digest: Some(digest.to_string()),
                media_type: l["mediaType"].as_str().map(String::from),
                diff_id,
            });
        }
        Ok(Image {
            config,
            layers: out,
            ref_name,
        })
    }

    fn docker_image(&self) -> Result<Image> {
        let m = self.json("manifest.json")?;
        let m = match m.as_array().map(|a| a.as_slice()) {
            Some([one]) => one.clone(),
            Some([]) | None => {
                return Err(ImageError::invalid(
                    self.label(),
                    "manifest.json lists no image",
                ))
            }
            Some(more) => {
                return Err(ImageError::Unsupported(format!(
                    "{}: manifest.json lists {} images; save one image per archive",
                    self.label(),
                    more.len()
                )))
            }
        };
        let cfg = m["Config"]
            .as_str()
            .ok_or_else(|| ImageError::invalid(self.label(), "manifest.json: no Config"))?;
        let cfg_bytes = self.read_small(cfg)?;
        let config: Value = serde_json::from_slice(&cfg_bytes)
            .map_err(|e| ImageError::invalid(format!("{}: {cfg}", self.label()), e.to_string()))?;
        let diff_ids = diff_ids(&config, &self.label())?;
        let files = m["Layers"]
            .as_array()
            .ok_or_else(|| ImageError::invalid(self.label(), "manifest.json: no Layers"))?;
        if files.len() != diff_ids.len() {
            return Err(ImageError::invalid(
                self.label(),
                format!(
                    "{} layers but {} rootfs.diff_ids in the config",
                    files.len(),
                    diff_ids.len()
                ),
            ));
        }
        let layers = files
            .iter()
            .zip(diff_ids)
            .map(|(f, diff_id)| {
                Ok(LayerRef {
                    file: f
                        .as_str()
                        .ok_or_else(|| {
                            ImageError::invalid(
                                self.label(),
                                "manifest.json: a layer is not a string",
                            )
                        })?
                        .to_string(),
                    digest: None,
                    media_type: None,
                    diff_id,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Image {
            config,
            layers,
            ref_name: m["RepoTags"][0].as_str().map(String::from),
        })
    }
}

fn normalize_rel(p: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                parts.pop();
            }
            std::path::Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            _ => {}
        }
    }
    parts.join("/")
}

fn pick_manifest(index: &Value, label: &str) -> Result<Value> {
    let ms = index["manifests"]
        .as_array()
        .ok_or_else(|| ImageError::invalid(label, "index.json lists no manifests"))?;
    let usable: Vec<&Value> = ms
        .iter()
        .filter(|m| {
            let p = &m["platform"];
            p.is_null() || (p["os"] == "linux" && p["architecture"] == "amd64")
        })
        .collect();
    match usable.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(ImageError::invalid(
            label,
            "index.json: no manifest for linux/amd64",
        )),
        more => Err(ImageError::Unsupported(format!(
            "{label}: index.json lists {} images; save one image per archive",
            more.len()
        ))),
    }
}

fn diff_ids(config: &Value, label: &str) -> Result<Vec<String>> {
    config["rootfs"]["diff_ids"]
        .as_array()
        .ok_or_else(|| ImageError::invalid(label, "config without rootfs.diff_ids"))?
        .iter()
        .map(|d| {
            d.as_str()
                .map(String::from)
                .ok_or_else(|| ImageError::invalid(label, "config: a diff_id is not a string"))
        })
        .collect()
}

/// `blobs/sha256/HEX` for `sha256:HEX`; other algorithms are refused.
pub fn blob_path(digest: &str) -> Result<String> {
    match digest.split_once(':') {
        Some(("sha256", hex)) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(format!("blobs/sha256/{hex}"))
        }
        _ => Err(ImageError::Unsupported(format!(
            "digest {digest:?}: only sha256 digests are supported"
        ))),
    }
}

/// A window of the archive file.
struct SliceReader {
    file: File,
    pos: u64,
    end: u64,
}

impl Read for SliceReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min((self.end - self.pos) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A reader that hashes what passes through it, and copies it into `copy`.
pub struct HashRead<R> {
    pub inner: R,
    pub hash: Sha256,
    pub copy: Option<crate::tarw::BlobSink>,
}

impl<R: Read> Read for HashRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        if let Some(c) = self.copy.as_mut() {
            std::io::Write::write_all(c, &buf[..n])?;
        }
        Ok(n)
    }
}

/// The uncompressed tar of a layer: plain or gzip, told by its first bytes.
pub enum Decoded<R: BufRead> {
    Plain(R),
    Gzip(Box<flate2::bufread::MultiGzDecoder<R>>),
}

impl<R: BufRead> Read for Decoded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoded::Plain(r) => r.read(buf),
            Decoded::Gzip(r) => r.read(buf),
        }
    }
}

/// Bytes handed from the reading thread to the layer's reader.
const CHUNK: usize = 1 << 20;
/// Chunks in flight between the two.
const DEPTH: usize = 4;

/// A layer being read: a thread reads the blob, hashes it (its digest), decompresses it and
/// hashes the tar (its `diff_id`), and hands the tar on in chunks, so that reading, hashing and
/// decompressing overlap with the sealing done on the calling thread.
pub struct LayerStream {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
    worker: Option<std::thread::JoinHandle<LayerDigests>>,
    pub gzip: bool,
}

/// What the reading thread found: the blob's digest, the tar's, and the copy of the blob.
type LayerDigests = (String, String, Option<crate::tarw::BlobSink>);

impl Read for LayerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for LayerStream {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(Ok(v)) => {
                    self.cur = v;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                // The thread is done: end of the tar.
                Err(_) => {
                    self.cur.clear();
                    self.pos = 0;
                }
            }
        }
        Ok(&self.cur[self.pos..])
    }
    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.cur.len());
    }
}

/// Open layer `l` for reading its tar; its blob is also copied, unchanged, into `copy`.
pub fn open_layer(
    src: &Source,
    l: &LayerRef,
    copy: Option<crate::tarw::BlobSink>,
) -> Result<LayerStream> {
    let (raw, _) = src.open_file(&l.file)?;
    let mut br = BufReader::with_capacity(
        CHUNK,
        HashRead {
            inner: raw,
            hash: Sha256::new(),
            copy,
        },
    );
    let head = br.fill_buf().map_err(|e| ImageError::io(&l.file, e))?;
    let mut dec = if head.starts_with(&[0x1f, 0x8b]) {
        Decoded::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(br)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(ImageError::Unsupported(format!(
            "layer {}: zstd-compressed layers are not supported yet; save the image with gzip or uncompressed layers",
            l.file
        )));
    } else {
        Decoded::Plain(br)
    };
    let gzip = matches!(dec, Decoded::Gzip(_));
    let (tx, rx) = std::sync::mpsc::sync_channel(DEPTH);
    let worker = std::thread::spawn(move || {
        let mut diff = Sha256::new();
        let mut abandoned = false;
        loop {
            let mut v = vec![0u8; CHUNK];
            let mut n = 0;
            let r = loop {
                match dec.read(&mut v[n..]) {
                    Ok(0) => break Ok(()),
                    Ok(k) => {
                        n += k;
                        if n == v.len() {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            if let Err(e) = r {
                let _ = tx.send(Err(e));
                break;
            }
            if n == 0 {
                break;
            }
            v.truncate(n);
            if gzip {
                diff.update(&v);
            }
            if tx.send(Ok(v)).is_err() {
                abandoned = true;
                break;
            }
        }
        if abandoned {
            return (String::new(), String::new(), None);
        }
        let raw = match dec {
            Decoded::Plain(r) => r,
            Decoded::Gzip(g) => (*g).into_inner(),
        };
        let mut raw = raw;
        // Whatever follows the compressed stream still belongs to the blob's digest.
        let _ = io::copy(&mut raw, &mut io::sink());
        let raw = raw.into_inner();
        let raw_digest = raw.hash.digest();
        // An uncompressed layer is its own tar: one digest for both.
        let diff = if gzip {
            diff.digest()
        } else {
            raw_digest.clone()
        };
        (raw_digest, diff, raw.copy)
    });
    Ok(LayerStream {
        rx,
        cur: Vec::new(),
        pos: 0,
        worker: Some(worker),
        gzip,
    })
}

/// After the tar is read: drain what is left and check both digests. Returns the raw digest
/// and the copy given to [`open_layer`].
pub fn finish_layer(
    mut s: LayerStream,
    l: &LayerRef,
) -> Result<(String, Option<crate::tarw::BlobSink>)> {
    io::copy(&mut s, &mut io::sink()).map_err(|e| ImageError::io(&l.file, e))?;
    let (raw_digest, diff, copy) = s
        .worker
        .take()
        .map(|w| w.join())
        .ok_or_else(|| ImageError::Unsupported("internal: layer read twice".into()))?
        .map_err(|_| {
            ImageError::Unsupported(format!("layer {}: the reading thread panicked", l.file))
        })?;
    if diff != l.diff_id {
        return Err(ImageError::Digest {
            what: format!("layer {} (uncompressed, rootfs.diff_ids)", l.file),
            expected: l.diff_id.clone(),
            found: diff,
        });
    }
    if let Some(d) = &l.digest {
        if &raw_digest != d {
            return Err(ImageError::Digest {
                what: format!("layer {}", l.file),
                expected: d.clone(),
                found: raw_digest,
            });
        }
    }
    Ok((raw_digest, copy))
}

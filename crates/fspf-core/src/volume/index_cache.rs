//! `FSPF.index`: the frozen index of a state of the fspf (`format::index`), kept beside it so
//! that a run can start without parsing the fspf (the index is searched in place), then apply
//! the metadata log's records after that state (FORMAT.md §5c). It lives on untrusted storage
//! and holds region keys, so it is sealed, in pages: each page AES-256-GCM under a key derived
//! from the volume key and a random salt of this cache (`HKDF(volume key, salt, info "fspf v3
//! index cache pages")`), its number as nonce, and the cache's header (tag of the state it
//! describes, salt, lengths) as associated data. So a reader can check and decrypt only the
//! pages it needs (`PagedCache`, what `fspf run`'s processes read), and a page moved, taken
//! from another cache, cut short or changed does not open. A cache that does not open, or whose
//! state is no longer in the log (a checkpoint was written since), is ignored; the fspf is then
//! parsed as before and the cache rewritten. Only encrypted fspfs get one (an unencrypted fspf
//! has no secret to key it).
//!
//! Layout (FORMAT.md §5a): `"FSPFIDX3"` (8) | tag of the state (16) | salt (16) | index length
//! u64 LE (8) | page length u32 LE (4), then page k = 0, 1, ... (`ceil(len / page)` of them):
//! ciphertext (page length bytes, the last page shorter) | GCM tag (16).
use super::{kernel_fs, store, Volume};
use crate::crypto::{self, AeadKey, Tag, NONCE_LEN, TAG_LEN};
use crate::error::Result;
use crate::format::index::{FrozenIndex, LazyPages, PageSource};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FSPFIDX3";
const INFO: &[u8] = b"fspf v3 index cache pages";
/// Bytes of the header: magic, tag, salt, index length, page length.
pub const HEAD: usize = 8 + TAG_LEN + SALT_LEN + 8 + 4;
const SALT_LEN: usize = 16;
/// Plaintext bytes per page as written. Small enough that a lookup's pages (about two per
/// probe of its binary search) cost little to read and open, large enough that a tag per page
/// (16 bytes) costs 0.4 %.
pub const PAGE: usize = 4096;
/// Page lengths a reader accepts.
const PAGE_RANGE: std::ops::RangeInclusive<u32> = 512..=(1 << 20);
/// A cache larger than this is not read (an fspf is at most 1 GiB; its index is smaller).
const MAX_LEN: u64 = 1 << 30;

/// `FSPF.index` beside `fspf`.
pub fn cache_path(fspf: &Path) -> PathBuf {
    store::sibling(fspf, ".index")
}

/// A cache's header, parsed (not authenticated by itself: every page's tag covers it).
#[derive(Debug, Clone, Copy)]
struct Header {
    raw: [u8; HEAD],
    tag: Tag,
    salt: [u8; SALT_LEN],
    len: usize,
    page: usize,
}

impl Header {
    fn parse(raw: &[u8]) -> Option<Header> {
        let raw: [u8; HEAD] = raw.get(..HEAD)?.try_into().ok()?;
        if &raw[..8] != MAGIC {
            return None;
        }
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&raw[8..8 + TAG_LEN]);
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&raw[8 + TAG_LEN..8 + TAG_LEN + SALT_LEN]);
        let at = 8 + TAG_LEN + SALT_LEN;
        let len = u64::from_le_bytes(raw[at..at + 8].try_into().ok()?);
        let page = u32::from_le_bytes(raw[at + 8..at + 12].try_into().ok()?);
        if len == 0 || len > MAX_LEN || !PAGE_RANGE.contains(&page) {
            return None;
        }
        Some(Header {
            raw,
            tag: Tag(tag),
            salt,
            len: usize::try_from(len).ok()?,
            page: page as usize,
        })
    }

    fn pages(&self) -> usize {
        self.len.div_ceil(self.page)
    }

    /// Plaintext length of page `k`.
    fn page_len(&self, k: usize) -> usize {
        self.len.min((k + 1) * self.page) - k * self.page
    }

    /// Where page `k` (ciphertext and tag) lies in the file.
    fn page_at(&self, k: usize) -> u64 {
        (HEAD + k * (self.page + TAG_LEN)) as u64
    }

    /// The cache file's length.
    fn file_len(&self) -> u64 {
        (HEAD + self.len + self.pages() * TAG_LEN) as u64
    }

    fn key(&self, vol_key: &crypto::VolumeKey) -> Option<AeadKey> {
        let mut k = zeroize::Zeroizing::new([0u8; 32]);
        crypto::hkdf_sha256(vol_key.as_bytes(), &self.salt, INFO, &mut k[..]).ok()?;
        AeadKey::new(&k[..]).ok()
    }
}

fn nonce(k: usize) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&(k as u64).to_be_bytes());
    n
}

/// Open page `k` from `sealed` (its ciphertext and tag) into `out` (its plaintext length).
fn open_page(h: &Header, key: &AeadKey, k: usize, sealed: &[u8], out: &mut [u8]) -> bool {
    let n = h.page_len(k);
    sealed.len() == n + TAG_LEN
        && out.len() == n
        && key.open_to(nonce(k), &h.raw, &sealed[..n], &sealed[n..], out)
}

/// Reads `buf.len()` bytes at an offset of the cache file (a file, or an fd the caller holds).
pub type ReadAt = dyn Fn(u64, &mut [u8]) -> std::io::Result<()> + Send + Sync;

/// Reads and opens page k of a cache (`None`: it does not open).
type Fetch = dyn Fn(usize) -> Option<Box<[u8]>> + Send + Sync;

/// The cache read a page at a time: only the pages a lookup touches are read and opened, and
/// each is kept once opened. What `fspf run`'s processes use, so that a process's start costs
/// what it looks up, not the volume's size. A page that does not open calls `on_damage` (the
/// callers stop the process: the cache was checked whole when the run started, so a page that
/// fails later was changed under the run), then answers as missing.
pub struct PagedCache {
    head: Header,
    pages: LazyPages<Box<Fetch>>,
}

impl std::fmt::Debug for PagedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedCache")
            .field("len", &self.head.len)
            .field("tag", &self.head.tag)
            .finish_non_exhaustive()
    }
}

impl PageSource for PagedCache {
    fn len(&self) -> usize {
        self.pages.len()
    }
    fn slice(&self, off: usize, n: usize) -> Option<&[u8]> {
        self.pages.slice(off, n)
    }
}

impl PagedCache {
    /// The cache read through `read_at`, of a file `file_len` bytes long. Reads its header
    /// and opens page 0 (which authenticates the header); with `check_all`, reads and opens
    /// every page once, in large reads, keeping none (O(size) without holding it). `None` when
    /// any of that fails.
    pub fn open(
        read_at: Box<ReadAt>,
        file_len: u64,
        vol_key: &crypto::VolumeKey,
        check_all: bool,
        on_damage: fn(usize),
    ) -> Option<PagedCache> {
        let mut raw = [0u8; HEAD];
        read_at(0, &mut raw).ok()?;
        let head = Header::parse(&raw)?;
        if head.file_len() != file_len {
            return None;
        }
        let key = head.key(vol_key)?;
        if check_all {
            check_pages(&head, &key, &*read_at)?;
        }
        let fetch = move |k: usize| -> Option<Box<[u8]>> {
            let n = head.page_len(k);
            let mut sealed = vec![0u8; n + TAG_LEN];
            let mut out = vec![0u8; n];
            let ok = read_at(head.page_at(k), &mut sealed).is_ok()
                && open_page(&head, &key, k, &sealed, &mut out);
            if !ok {
                on_damage(k);
                return None;
            }
            Some(out.into_boxed_slice())
        };
        let c = PagedCache {
            head,
            pages: LazyPages::new(head.len, head.page, Box::new(fetch)),
        };
        c.pages.page(0)?;
        Some(c)
    }

    /// The tag of the state the cache describes (authenticated by every page).
    pub fn tag(&self) -> Tag {
        self.head.tag
    }

    /// How many pages have been read and opened.
    pub fn fetched(&self) -> usize {
        self.pages.fetched()
    }
}

/// Read and open every page, a run of pages per read, into buffers reused throughout.
fn check_pages(h: &Header, key: &AeadKey, read_at: &ReadAt) -> Option<()> {
    const RUN: usize = 64;
    let stride = h.page + TAG_LEN;
    let mut buf = vec![0u8; RUN * stride];
    let mut out = zeroize::Zeroizing::new(vec![0u8; h.page]);
    let mut k = 0;
    while k < h.pages() {
        let n = RUN.min(h.pages() - k);
        let bytes = (k..k + n).map(|j| h.page_len(j) + TAG_LEN).sum::<usize>();
        read_at(h.page_at(k), &mut buf[..bytes]).ok()?;
        for j in 0..n {
            let at = j * stride;
            let len = h.page_len(k + j);
            if !open_page(h, key, k + j, &buf[at..at + len + TAG_LEN], &mut out[..len]) {
                return None;
            }
        }
        k += n;
    }
    Some(())
}

/// `read_at` over a file.
fn file_reader(f: std::fs::File) -> Box<ReadAt> {
    use std::os::unix::fs::FileExt;
    Box::new(move |at, buf| f.read_exact_at(buf, at))
}

/// The whole index in the cache, if every page opens: the index bytes (the state it describes
/// is named in its header and authenticated with it).
pub fn read(fspf: &Path, vol_key: &crypto::VolumeKey) -> Option<Vec<u8>> {
    let f = kernel_fs::open_regular_path(&cache_path(fspf)).ok()?;
    let len = f.metadata().ok()?.len();
    if len > MAX_LEN + MAX_LEN / 128 {
        return None;
    }
    let read_at = file_reader(f);
    let mut raw = [0u8; HEAD];
    read_at(0, &mut raw).ok()?;
    let h = Header::parse(&raw)?;
    if h.file_len() != len {
        return None;
    }
    let key = h.key(vol_key)?;
    let mut sealed = vec![0u8; len as usize - HEAD];
    read_at(HEAD as u64, &mut sealed).ok()?;
    let mut out = vec![0u8; h.len];
    for k in 0..h.pages() {
        let (at, n) = (k * (h.page + TAG_LEN), h.page_len(k));
        let o = k * h.page;
        if !open_page(
            &h,
            &key,
            k,
            &sealed[at..at + n + TAG_LEN],
            &mut out[o..o + n],
        ) {
            return None;
        }
    }
    let ix = FrozenIndex::open(&out).ok()?;
    (ix.tag() == h.tag).then_some(out)
}

/// Write the cache for `vol` (best effort: a failure only costs the next run a parse).
pub fn write(vol: &Volume) -> Result<()> {
    let Some(vk) = vol.key() else {
        return Ok(());
    };
    // The cache stands for log records whose journals its readers will not learn: the chains
    // through them are made durable first (FORMAT.md §5b, "Journals in the log").
    vol.settle_log_chains()?;
    let index = vol.index_of_state()?;
    store::write_file_durably(&cache_path(vol.path()), &seal(&index, vk)?, 0o600)
}

/// The cache file's bytes for `index` (its header names the state the index describes).
pub fn seal(index: &[u8], vk: &crypto::VolumeKey) -> Result<Vec<u8>> {
    // The state the index describes: the volume's, or the older one of the frozen index it
    // is backed by (its log records are replayed on top of it).
    let tag = FrozenIndex::open(index)?.tag();
    let mut salt = [0u8; SALT_LEN];
    crypto::random_bytes(&mut salt)?;
    let mut raw = [0u8; HEAD];
    raw[..8].copy_from_slice(MAGIC);
    raw[8..8 + TAG_LEN].copy_from_slice(&tag.0);
    raw[8 + TAG_LEN..8 + TAG_LEN + SALT_LEN].copy_from_slice(&salt);
    let at = 8 + TAG_LEN + SALT_LEN;
    raw[at..at + 8].copy_from_slice(&(index.len() as u64).to_le_bytes());
    raw[at + 8..].copy_from_slice(&(PAGE as u32).to_le_bytes());
    let h = Header::parse(&raw).ok_or_else(|| {
        crate::error::Error::Other("index cache: the index is empty or too large".into())
    })?;
    let key = h
        .key(vk)
        .ok_or_else(|| crate::error::Error::Other("index cache: key derivation".into()))?;
    let mut out = Vec::with_capacity(h.file_len() as usize);
    out.extend_from_slice(&raw);
    let mut page = zeroize::Zeroizing::new(Vec::with_capacity(PAGE));
    for (k, p) in index.chunks(PAGE).enumerate() {
        page.clear();
        page.extend_from_slice(p);
        let t = key.seal(nonce(k), &raw, &mut page)?;
        out.extend_from_slice(&page);
        out.extend_from_slice(&t);
    }
    Ok(out)
}

/// A cache this many log bytes behind the current state is rewritten by [`refresh`].
pub const REFRESH_MIN: u64 = 16 << 10;

/// How many bytes of the metadata log lie after the state the cache names in its header
/// (`None`: no cache, or its state is no longer in the log). The header is read without the
/// key and not authenticated: it only decides whether [`refresh`] rewrites the cache, which
/// every reader authenticates anyway (reading and decrypting the whole cache here cost about
/// as much as the rest of a small run's end).
fn cache_lag(fspf: &Path) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let f = kernel_fs::open_regular_path(&cache_path(fspf)).ok()?;
    let mut head = [0u8; MAGIC.len() + TAG_LEN];
    f.read_exact_at(&mut head, 0).ok()?;
    if &head[..MAGIC.len()] != MAGIC {
        return None;
    }
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(&head[MAGIC.len()..]);
    super::log::DiskState::read(fspf).ok()?.log_after(Tag(t))
}

/// After a run that committed much: make the cache describe the state with `tag` when the
/// log after the cached state is longer than [`REFRESH_MIN`], so that the next runs' processes
/// replay little (O(n) once, where every later start would otherwise replay the same records).
/// Best effort, like [`write`].
pub fn refresh(fspf: &Path, key: &crate::crypto::VolumeKey, tag: Tag) -> Result<()> {
    if cache_lag(fspf).is_some_and(|l| l <= REFRESH_MIN) {
        return Ok(());
    }
    let v = Volume::open_cached(fspf, key.clone(), tag)?;
    if v.is_indexed() {
        write(&v)?;
    }
    Ok(())
}

impl Volume {
    /// [`Volume::open`] for a caller that holds `key` and trusts `tag`, using the sealed index
    /// cache when it opens and its state is still in the metadata log (nothing is parsed;
    /// reads search the index in place, and the log's later records are applied on top), else
    /// parsing the fspf and writing the cache for the next time. The state on disk must have
    /// `tag` either way (a replaced or rolled-back fspf is refused as by `open`).
    pub fn open_cached(path: &Path, key: crate::crypto::VolumeKey, tag: Tag) -> Result<Volume> {
        let st = super::log::DiskState::read(&store::absolute(path))?;
        if st.tag() == tag {
            if let Some(buf) = read(path, &key) {
                // Kept for the life of the process: the volume searches it in place.
                let bytes: &'static [u8] = Box::leak(buf.into_boxed_slice());
                if let Ok(mut v) = Volume::from_index(path, Some(key.clone()), bytes) {
                    if matches!(v.catch_up_to(st), Ok(true)) && v.tag() == tag {
                        return Ok(v);
                    }
                }
            }
        }
        let v = Volume::open(path, Some(key), Some(tag))?;
        let _ = write(&v);
        Ok(v)
    }

    /// [`Volume::open_cached`] for `fspf run`: the cache, when it serves, is checked whole
    /// (every page opened once, none kept) and then read a page at a time, and returned with
    /// the volume so that the run's processes read the same cache (`PagedCache`). Its pages
    /// that fail later call `on_damage`.
    pub fn open_for_run_paged(
        path: &Path,
        key: crate::crypto::VolumeKey,
        tag: Tag,
        on_damage: fn(usize),
    ) -> Result<(Volume, Option<(&'static PagedCache, std::fs::File)>)> {
        let st = super::log::DiskState::read(&store::absolute(path))?;
        if st.tag() == tag {
            if let Some((c, f)) = open_file(path, &key, on_damage) {
                // Kept for the life of the process: the volume reads its pages.
                let c: &'static PagedCache = Box::leak(Box::new(c));
                if let Ok(mut v) = Volume::from_paged(path, Some(key.clone()), c) {
                    if matches!(v.catch_up_to(st), Ok(true)) && v.tag() == tag {
                        return Ok((v, Some((c, f))));
                    }
                }
            }
        }
        let v = Volume::open(path, Some(key), Some(tag))?;
        let _ = write(&v);
        Ok((v, None))
    }
}

/// [`Volume::open_for_run_paged`].
pub fn open_for_run(
    path: &Path,
    key: crypto::VolumeKey,
    tag: Tag,
    on_damage: fn(usize),
) -> Result<(Volume, Option<(&'static PagedCache, std::fs::File)>)> {
    Volume::open_for_run_paged(path, key, tag, on_damage)
}

/// What the run's processes do when a page of the index cache does not open: stop, with a
/// message, rather than answer from metadata that is not there (the cache was checked whole
/// when the run started, so it was changed under the run).
pub fn stop_on_damage(page: usize) {
    eprintln!(
        "fspf: page {page} of the index cache no longer opens: the cache was changed during this run; stopping"
    );
    std::process::abort();
}

/// The cache of `fspf`, checked whole, as a [`PagedCache`], and the file it reads (its own
/// descriptor, for the run's processes).
fn open_file(
    fspf: &Path,
    key: &crate::crypto::VolumeKey,
    on_damage: fn(usize),
) -> Option<(PagedCache, std::fs::File)> {
    let f = kernel_fs::open_regular_path(&cache_path(fspf)).ok()?;
    let len = f.metadata().ok()?.len();
    let mine = f.try_clone().ok()?;
    let c = PagedCache::open(file_reader(mine), len, key, true, on_damage)?;
    Some((c, f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::metadata::{Protection, RegionKind};
    use crate::volume::RegionSpec;
    use crate::EmbedPath;

    #[test]
    fn the_index_cache_opens_only_for_its_own_tag_and_key() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fspf.pb");
        Volume::create(&p, false).unwrap();
        let mut v = Volume::open(&p, None, None).unwrap();
        v.add_region(RegionSpec {
            embed_point: EmbedPath::root(),
            kind: RegionKind::Kernel(d.path().join("vol")),
            protection: Protection::Encrypted,
            key_len: None,
            chunk_len: None,
        })
        .unwrap();
        let (t1, k) = v.encrypt().unwrap();
        // First open parses and writes the cache; the second reads it.
        let a = Volume::open_cached(&p, k.clone(), t1).unwrap();
        assert!(!a.is_indexed());
        assert!(cache_path(&p).exists());
        let b = Volume::open_cached(&p, k.clone(), t1).unwrap();
        assert!(b.is_indexed());
        assert_eq!(b.regions().len(), 1);
        // Another key, a flipped byte, or another tag named in its header: not used.
        let other = Volume::open(&p, Some(k.clone()), Some(t1)).unwrap();
        assert!(read(&p, &k).is_some());
        assert!(read(&p, &crate::crypto::VolumeKey::random().unwrap()).is_none());
        let good = std::fs::read(cache_path(&p)).unwrap();
        let mut raw = good.clone();
        raw[10] ^= 1;
        std::fs::write(cache_path(&p), &raw).unwrap();
        assert!(read(&p, &k).is_none(), "the state's tag is authenticated");
        let mut raw = good;
        let mid = raw.len() / 2;
        raw[mid] ^= 1;
        std::fs::write(cache_path(&p), &raw).unwrap();
        assert!(read(&p, &k).is_none());
        let c = Volume::open_cached(&p, k.clone(), t1).unwrap();
        assert!(!c.is_indexed(), "a damaged cache is ignored and rewritten");
        drop(other);
        // A rolled-back fspf is refused whatever the cache says.
        let mut v2 = Volume::open(&p, Some(k.clone()), Some(t1)).unwrap();
        let t2 = v2.save().unwrap();
        assert!(Volume::open_cached(&p, k.clone(), t1).is_err());
        assert!(Volume::open_cached(&p, k, t2).is_ok());
    }

    /// A volume with `n` files listed (metadata only) under an encrypted root, its key, tag,
    /// and the cache's bytes.
    fn volume_with(d: &Path, n: usize) -> (PathBuf, crypto::VolumeKey, Tag) {
        let p = d.join("fspf.pb");
        let mut v = crate::volume::encrypted_root_volume(&p, &d.join("vol"));
        let (t, k) = v.encrypt().unwrap();
        let mut v = Volume::open(&p, Some(k.clone()), Some(t)).unwrap();
        let dir = crate::format::metadata::FileEntry {
            links: Vec::new(),
            kind: crate::FileKind::Dir,
            mode: 0o755,
            mtime_ns: 1,
            ctime_ns: 1,
            owner: None,
            ino: None,
        };
        let changes = (0..n)
            .map(|i| {
                crate::volume::Change::PutEntry(
                    EmbedPath::parse(&format!("/d{}/e{i}", i % 10)).unwrap(),
                    dir.clone(),
                )
            })
            .collect();
        let t = v.commit(changes, Some(t)).unwrap();
        let v = Volume::open(&p, Some(k.clone()), Some(t)).unwrap();
        write(&v).unwrap();
        (p, k, t)
    }

    fn reader(b: Vec<u8>) -> Box<ReadAt> {
        Box::new(move |at, buf| {
            let at = usize::try_from(at).unwrap();
            match b.get(at..at + buf.len()) {
                Some(s) => {
                    buf.copy_from_slice(s);
                    Ok(())
                }
                None => Err(std::io::ErrorKind::UnexpectedEof.into()),
            }
        })
    }

    fn quiet(_: usize) {}

    #[test]
    fn a_paged_cache_reads_the_pages_a_lookup_needs_and_answers_as_the_parsed_volume() {
        let d = tempfile::tempdir().unwrap();
        let (p, k, t) = volume_with(d.path(), 20_000);
        let raw = std::fs::read(cache_path(&p)).unwrap();
        let c = PagedCache::open(reader(raw.clone()), raw.len() as u64, &k, true, quiet).unwrap();
        assert_eq!(c.tag(), t);
        assert_eq!(
            c.fetched(),
            1,
            "opening reads page 0 only (check_all keeps none)"
        );
        let c: &'static PagedCache = Box::leak(Box::new(c));
        let v = Volume::from_paged(&p, Some(k.clone()), c).unwrap();
        let parsed = Volume::open(&p, Some(k.clone()), Some(t)).unwrap();
        for q in ["/d3/e13", "/d3/e14", "/d9/e19999", "/d0"] {
            let q = EmbedPath::parse(q).unwrap();
            assert_eq!(v.lookup(&q), parsed.lookup(&q), "{q}");
        }
        let total = raw.len().div_ceil(PAGE);
        assert!(
            c.fetched() * 5 < total && total > 200,
            "4 lookups read {} of {total} pages",
            c.fetched()
        );
        // The whole-cache reader gives the index the volume would build.
        assert_eq!(
            read(&p, &k).unwrap(),
            parsed.build_index().unwrap().to_vec()
        );
    }

    #[test]
    fn a_cache_page_moved_swapped_cut_or_changed_does_not_open() {
        let d = tempfile::tempdir().unwrap();
        let (p, k, t) = volume_with(d.path(), 3_000);
        let good = std::fs::read(cache_path(&p)).unwrap();
        // A second cache of the same state: same index, another salt.
        write(&Volume::open(&p, Some(k.clone()), Some(t)).unwrap()).unwrap();
        let other = std::fs::read(cache_path(&p)).unwrap();
        assert_eq!(good.len(), other.len());
        assert_ne!(good, other);
        let stride = PAGE + TAG_LEN;
        let page = |b: &[u8], i: usize| b[HEAD + i * stride..HEAD + (i + 1) * stride].to_vec();
        let put = |b: &mut Vec<u8>, i: usize, pg: &[u8]| {
            b[HEAD + i * stride..HEAD + (i + 1) * stride].copy_from_slice(pg)
        };
        let mut attacks: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut b = good.clone();
        let (p1, p2) = (page(&good, 1), page(&good, 2));
        put(&mut b, 1, &p2);
        put(&mut b, 2, &p1);
        attacks.push(("pages 1 and 2 swapped", b));
        let mut b = good.clone();
        put(&mut b, 1, &page(&other, 1));
        attacks.push(("page 1 of another cache of the same state", b));
        let mut b = good.clone();
        b[HEAD + 5 * stride + 100] ^= 0x10;
        attacks.push(("a bit of page 5 flipped", b));
        let mut b = good.clone();
        b.truncate(b.len() - stride);
        attacks.push(("the last full page cut off", b));
        let mut b = good.clone();
        let last = b.len() - 1;
        b[last] ^= 1;
        attacks.push(("the last page's tag changed", b));
        let mut b = good.clone();
        b[8 + TAG_LEN + SALT_LEN] ^= 1;
        attacks.push(("the length in the header changed", b));
        for (what, b) in attacks {
            std::fs::write(cache_path(&p), &b).unwrap();
            assert!(read(&p, &k).is_none(), "{what}: read whole");
            assert!(
                PagedCache::open(reader(b.clone()), b.len() as u64, &k, true, quiet).is_none(),
                "{what}: checked whole"
            );
            assert!(
                open_file(&p, &k, quiet).is_none(),
                "{what}: opened for a run"
            );
            let (v, c) = open_for_run(&p, k.clone(), t, quiet).unwrap();
            assert!(
                c.is_none() && !v.is_indexed(),
                "{what}: the run parses the fspf"
            );
            assert!(read(&p, &k).is_some(), "{what}: and rewrites the cache");
        }
    }

    static DAMAGED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    fn note(page: usize) {
        DAMAGED.store(page, std::sync::atomic::Ordering::SeqCst);
    }

    #[test]
    fn a_page_changed_after_the_check_is_reported_when_read_and_answers_nothing() {
        let d = tempfile::tempdir().unwrap();
        let (p, k, t) = volume_with(d.path(), 3_000);
        let mut b = std::fs::read(cache_path(&p)).unwrap();
        let pages = (b.len() - HEAD).div_ceil(PAGE + TAG_LEN);
        // Every page but the last flipped: a lookup of the last path needs some of them.
        for i in 1..pages - 1 {
            b[HEAD + i * (PAGE + TAG_LEN) + 7] ^= 1;
        }
        // As a process of a run reads it: not checked whole.
        let c = PagedCache::open(reader(b.clone()), b.len() as u64, &k, false, note).unwrap();
        let c: &'static PagedCache = Box::leak(Box::new(c));
        assert_eq!(c.tag(), t);
        let v = Volume::from_paged(&p, Some(k), c).unwrap();
        assert_eq!(v.lookup(&EmbedPath::parse("/d9/e2999").unwrap()), None);
        assert!(DAMAGED.load(std::sync::atomic::Ordering::SeqCst) > 0);
    }

    #[test]
    fn a_cache_of_the_unpaged_format_is_ignored_and_rewritten() {
        let d = tempfile::tempdir().unwrap();
        let (p, k, t) = volume_with(d.path(), 10);
        // What the previous layout ("FSPFIDX2": one GCM message) put there.
        std::fs::write(cache_path(&p), b"FSPFIDX2 anything after it").unwrap();
        assert!(read(&p, &k).is_none());
        let v = Volume::open_cached(&p, k.clone(), t).unwrap();
        assert!(!v.is_indexed());
        assert_eq!(&std::fs::read(cache_path(&p)).unwrap()[..8], MAGIC);
        assert!(Volume::open_cached(&p, k, t).unwrap().is_indexed());
    }

    #[test]
    fn a_cache_far_behind_the_log_is_moved_up_by_refresh() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fspf.pb");
        let mut v = crate::volume::encrypted_root_volume(&p, &d.path().join("vol"));
        let (t, k) = v.encrypt().unwrap();
        let mut v = Volume::open_cached(&p, k.clone(), t).unwrap();
        let mut o = v.options();
        o.log = true;
        v.set_options(o);
        assert_eq!(cache_lag(&p), Some(0));
        let dir = crate::format::metadata::FileEntry {
            links: Vec::new(),
            kind: crate::FileKind::Dir,
            mode: 0o755,
            mtime_ns: 1,
            ctime_ns: 1,
            owner: None,
            ino: None,
        };
        // A few commits: the cache stays (a start replays them).
        let commit = |v: &mut Volume, i: usize| {
            let t = v.tag();
            let c = crate::volume::Change::PutEntry(
                EmbedPath::parse(&format!("/d{i}")).unwrap(),
                dir.clone(),
            );
            v.commit(vec![c], Some(t)).unwrap()
        };
        let mut t = v.tag();
        for i in 0..3 {
            t = commit(&mut v, i);
        }
        let lag = cache_lag(&p).unwrap();
        assert!(lag > 0 && lag <= REFRESH_MIN);
        refresh(&p, &k, t).unwrap();
        assert_eq!(cache_lag(&p), Some(lag), "a short lag is left alone");
        // Many: refresh rewrites the cache at the current state, which then opens as is.
        for i in 3..400 {
            t = commit(&mut v, i);
        }
        assert!(cache_lag(&p).unwrap() > REFRESH_MIN);
        refresh(&p, &k, t).unwrap();
        assert_eq!(cache_lag(&p), Some(0));
        let w = Volume::open_cached(&p, k, t).unwrap();
        assert!(w.is_indexed());
        assert!(w.lookup(&EmbedPath::parse("/d399").unwrap()).is_some());
    }
}

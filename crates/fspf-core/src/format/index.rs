//! The frozen metadata index: an opened fspf's regions and entries laid out once, in a flat,
//! position-independent byte string, so that a process can query them where they lie (a sealed
//! memfd mapped read-only) without parsing them. Opening reads the header and the regions only;
//! lookups and listings are binary searches over a table of record offsets.
//!
//! Layout (integers little-endian, no alignment needed; all lengths are bytes):
//!
//! ```text
//!  0  magic        "FSPFIDX\0"
//!  8  version      u32 = 7 (1 had no mtime_ns, 2 no owners and special files, 3 no inode
//!                    numbers, 4 no ctime_ns, 5 no hard links, 6 no inode table)
//! 12  entry_count  u32
//! 16  tag          [16]  tag of the fspf the index was built from
//! 32  regions_len  u32
//! 36  records_len  u32
//! 40  ino_count    u32   entries that record an inode number
//! 44  link_count   u32   hard-link entries (kind 5)
//! 48  regions      MetadataPb (protobuf) with the generation and regions, no files
//!     offsets      entry_count x u32: where entry i's record starts within `records`
//!     records      one per entry, in tree order:
//!                  path_len u32 | path | kind u8 (1 file, 2 dir, 3 symlink, 4 special, 5 link) |
//!                    mode u16 | mtime_ns i64 | ctime_ns i64 | owned u8 (0 or 1) |
//!                    owned: uid u32 | gid u32 |
//!                    ino u64 (0: none recorded) |
//!                    file:    file id [16] | size u64 | root_len u8 (0 or 32) | root
//!                    symlink: target_len u32 | target
//!                    special: special u8 (1 fifo, 2 char, 3 block, 4 socket) | rdev u64
//!                    link:    target_len u32 | target
//!                  file and special: link_count u32 | link_count x (len u32 | path)
//!     inos         ino_count x (ino u64 | entry u32): the recorded inode numbers, sorted by
//!                  number (then entry), with the entry that records each
//! ```
//!
//! **Tree order** ([`tree_order`]): paths compare byte by byte with `/` ranked below every other
//! byte, i.e. component by component. Every subtree is then one contiguous run right after its
//! root (`/a`, `/a/b`, `/a/b/c`, `/a-b`, `/a.b`, `/ab`), and a directory's children come in name
//! order, each followed by its descendants. This is not the byte order of [`EmbedPath`], which
//! puts `/a-b` between `/a` and `/a/b`, and which `BTreeMap<EmbedPath, _>` keeps.
//!
//! The bytes are trusted like the trust anchor: a process of the run builds them from a volume
//! it opened with key and tag and passes them on in a sealed memfd; the index carries that tag so
//! a process checks it against the run's current one. Accessors still never panic on malformed
//! bytes: they answer `None` or stop, and [`FrozenIndex::validate`] checks everything.
use crate::crypto::{FileId, Tag, FILE_ID_LEN, TAG_LEN};
use crate::format::metadata::{
    FileEntry, FileKind, Metadata, MetadataPb, Owner, Region, SpecialKind,
};
use crate::format::view::{ChildKind, Children};
use crate::policy::EmbedPath;
use prost::Message;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use zeroize::{Zeroize, Zeroizing};

pub const INDEX_MAGIC: [u8; 8] = *b"FSPFIDX\0";
pub const INDEX_VERSION: u32 = 7;
const HEADER_LEN: usize = 48;
const KIND_FILE: u8 = 1;
const KIND_DIR: u8 = 2;
const KIND_SYMLINK: u8 = 3;
const KIND_SPECIAL: u8 = 4;
const KIND_LINK: u8 = 5;
const ROOT_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    #[error("metadata index: {len} bytes is shorter than its {HEADER_LEN}-byte header")]
    Truncated { len: usize },
    #[error("not a metadata index (bad magic)")]
    BadMagic,
    #[error("metadata index version {0} (this build reads version {INDEX_VERSION})")]
    UnsupportedVersion(u32),
    #[error("metadata index: its header adds up to {expected} bytes, but it has {actual}")]
    LengthMismatch { expected: u64, actual: usize },
    #[error("metadata index: regions: {0}")]
    Regions(String),
    #[error("metadata index: entry {index}: {reason}")]
    Entry { index: usize, reason: &'static str },
    #[error("metadata index: {what} does not fit the format's 32-bit lengths")]
    TooLarge { what: &'static str },
}

/// Tree order of two paths: bytewise, with `/` below every other byte (see the module header).
pub fn tree_order(a: &[u8], b: &[u8]) -> Ordering {
    let rank = |c: u8| if c == b'/' { 0 } else { u16::from(c) + 1 };
    let i = common_prefix(a, b);
    match (a.get(i), b.get(i)) {
        (Some(&x), Some(&y)) => rank(x).cmp(&rank(y)),
        _ => a.len().cmp(&b.len()),
    }
}

/// Length of the longest common prefix, eight bytes at a time (sibling paths share long ones).
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let mut i = 0;
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        if x != y {
            break;
        }
        i += 8;
    }
    let (ta, tb) = (
        a.get(i..).unwrap_or_default(),
        b.get(i..).unwrap_or_default(),
    );
    i + ta.iter().zip(tb).take_while(|(x, y)| x == y).count()
}

/// Lay out `meta` as an index, stamped with `tag` (the tag of the fspf `meta` was read from).
/// O(n log n) at most: the map's byte order is nearly tree order already. The index holds the
/// region keys, so it is wiped when dropped.
pub fn build_index(meta: &Metadata, tag: Tag) -> Result<Zeroizing<Vec<u8>>, IndexError> {
    let too_large = |what| move |_| IndexError::TooLarge { what };
    let mut pb = MetadataPb {
        format_version: 1,
        generation: meta.generation,
        regions: meta.regions_pb(),
        files: Vec::new(),
    };
    let regions = Zeroizing::new(pb.encode_to_vec());
    for r in &mut pb.regions {
        r.key.zeroize();
    }
    let mut entries: Vec<(&EmbedPath, &FileEntry)> = meta.files.iter().collect();
    entries.sort_by(|a, b| tree_order(a.0.as_bytes(), b.0.as_bytes()));

    let mut offsets = Vec::with_capacity(entries.len() * 4);
    let mut records = Vec::new();
    let mut inos: Vec<(u64, u32)> = Vec::new();
    for (i, (path, e)) in entries.iter().enumerate() {
        if let Some(ino) = e.ino {
            let i = u32::try_from(i).map_err(too_large("the entry count"))?;
            inos.push((ino, i));
        }
        let off = u32::try_from(records.len()).map_err(too_large("records"))?;
        offsets.extend_from_slice(&off.to_le_bytes());
        let path = path.as_bytes();
        let path_len = u32::try_from(path.len()).map_err(too_large("a path"))?;
        records.extend_from_slice(&path_len.to_le_bytes());
        records.extend_from_slice(path);
        let kind = match e.kind {
            FileKind::File { .. } => KIND_FILE,
            FileKind::Dir => KIND_DIR,
            FileKind::Symlink(_) => KIND_SYMLINK,
            FileKind::Special { .. } => KIND_SPECIAL,
            FileKind::Link(_) => KIND_LINK,
        };
        records.push(kind);
        // Parsing masks modes to permission bits, so they fit 16 bits.
        records.extend_from_slice(&((e.mode & 0o7777) as u16).to_le_bytes());
        records.extend_from_slice(&e.mtime_ns.to_le_bytes());
        records.extend_from_slice(&e.ctime_ns.to_le_bytes());
        match e.owner {
            Some(o) => {
                records.push(1);
                records.extend_from_slice(&o.uid.to_le_bytes());
                records.extend_from_slice(&o.gid.to_le_bytes());
            }
            None => records.push(0),
        }
        records.extend_from_slice(&e.ino.unwrap_or(0).to_le_bytes());
        match &e.kind {
            FileKind::File { id, size, root } => {
                records.extend_from_slice(&id.0);
                records.extend_from_slice(&size.to_le_bytes());
                match root {
                    Some(r) => {
                        records.push(ROOT_LEN as u8);
                        records.extend_from_slice(r);
                    }
                    None => records.push(0),
                }
            }
            FileKind::Dir => {}
            FileKind::Symlink(t) => {
                let len = u32::try_from(t.len()).map_err(too_large("a symlink target"))?;
                records.extend_from_slice(&len.to_le_bytes());
                records.extend_from_slice(t);
            }
            FileKind::Special { kind, rdev } => {
                records.push(kind.code() as u8);
                records.extend_from_slice(&rdev.to_le_bytes());
            }
            FileKind::Link(t) => {
                let t = t.as_bytes();
                let len = u32::try_from(t.len()).map_err(too_large("a path"))?;
                records.extend_from_slice(&len.to_le_bytes());
                records.extend_from_slice(t);
            }
        }
        if matches!(e.kind, FileKind::File { .. } | FileKind::Special { .. }) {
            let n = u32::try_from(e.links.len()).map_err(too_large("a link count"))?;
            records.extend_from_slice(&n.to_le_bytes());
            for l in &e.links {
                let l = l.as_bytes();
                let len = u32::try_from(l.len()).map_err(too_large("a path"))?;
                records.extend_from_slice(&len.to_le_bytes());
                records.extend_from_slice(l);
            }
        }
    }

    let len = HEADER_LEN + regions.len() + offsets.len() + records.len();
    let mut out = Zeroizing::new(Vec::with_capacity(len));
    out.extend_from_slice(&INDEX_MAGIC);
    out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    let count = u32::try_from(entries.len()).map_err(too_large("the entry count"))?;
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&tag.0);
    let regions_len = u32::try_from(regions.len()).map_err(too_large("regions"))?;
    out.extend_from_slice(&regions_len.to_le_bytes());
    let records_len = u32::try_from(records.len()).map_err(too_large("records"))?;
    out.extend_from_slice(&records_len.to_le_bytes());
    inos.sort_unstable();
    let ino_count = u32::try_from(inos.len()).map_err(too_large("the inode table"))?;
    out.extend_from_slice(&ino_count.to_le_bytes());
    let links = entries
        .iter()
        .filter(|(_, e)| matches!(e.kind, FileKind::Link(_)))
        .count();
    let link_count = u32::try_from(links).map_err(too_large("the link count"))?;
    out.extend_from_slice(&link_count.to_le_bytes());
    out.extend_from_slice(&regions);
    out.extend_from_slice(&offsets);
    out.extend_from_slice(&records);
    for (ino, i) in inos {
        out.extend_from_slice(&ino.to_le_bytes());
        out.extend_from_slice(&i.to_le_bytes());
    }
    Ok(out)
}

/// An index's bytes read on demand, a page at a time (the sealed index cache read lazily,
/// `volume::index_cache::PagedCache`). A byte range asked for is always one item of the
/// layout (the header, the regions, one offset, one record, one inode row), so a source can
/// keep each range that crosses a page boundary as one joined copy.
pub trait PageSource: std::fmt::Debug + Send + Sync {
    /// Length of the index in bytes.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes `off .. off + n`, kept for the source's life; `None` past the end or when the
    /// bytes cannot be read.
    fn slice(&self, off: usize, n: usize) -> Option<&[u8]>;
}

/// A [`PageSource`] over pages of `page` bytes that `fetch(k)` yields on first use (the last
/// page may be shorter) and that are kept for the source's life. A range that crosses a page
/// boundary is joined once and kept too, under the first boundary it crosses: items of the
/// layout do not overlap, so no two ranges asked for cross the same boundary first (one that
/// does, from damaged offsets, answers `None`). No I/O here: `fetch` brings it.
pub struct LazyPages<F> {
    len: usize,
    page: usize,
    fetch: F,
    pages: Box<[std::sync::OnceLock<Option<Page>>]>,
    joins: Box<[std::sync::OnceLock<Option<Joined>>]>,
}

/// A page's bytes, once fetched.
type Page = Box<[u8]>;

/// A range kept joined: where it starts, and its bytes.
type Joined = (usize, Box<[u8]>);

impl<F: Fn(usize) -> Option<Box<[u8]>>> LazyPages<F> {
    /// `len` bytes in pages of `page` bytes (at least 1).
    pub fn new(len: usize, page: usize, fetch: F) -> LazyPages<F> {
        let page = page.max(1);
        let n = len.div_ceil(page).max(1);
        LazyPages {
            len,
            page,
            fetch,
            pages: (0..n).map(|_| std::sync::OnceLock::new()).collect(),
            joins: (0..n).map(|_| std::sync::OnceLock::new()).collect(),
        }
    }

    /// Page `k`, fetched once; `None` if it cannot be read or has the wrong length.
    pub fn page(&self, k: usize) -> Option<&[u8]> {
        let want = self
            .len
            .min((k + 1) * self.page)
            .checked_sub(k * self.page)?;
        self.pages
            .get(k)?
            .get_or_init(|| (self.fetch)(k).filter(|p| p.len() == want))
            .as_deref()
    }

    /// How many pages have been fetched so far.
    pub fn fetched(&self) -> usize {
        self.pages.iter().filter(|p| p.get().is_some()).count()
    }
}

impl<F> std::fmt::Debug for LazyPages<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyPages")
            .field("len", &self.len)
            .field("page", &self.page)
            .finish_non_exhaustive()
    }
}

impl<F: Fn(usize) -> Option<Box<[u8]>> + Send + Sync> PageSource for LazyPages<F> {
    fn len(&self) -> usize {
        self.len
    }

    fn slice(&self, off: usize, n: usize) -> Option<&[u8]> {
        let end = off.checked_add(n)?;
        if end > self.len {
            return None;
        }
        let (first, last) = (off / self.page, end.saturating_sub(1).max(off) / self.page);
        if first == last {
            let at = off - first * self.page;
            return self.page(first)?.get(at..at + n);
        }
        let joined = self.joins.get(first)?.get_or_init(|| {
            let mut b = Vec::with_capacity(n);
            for k in first..=last {
                let p = self.page(k)?;
                let from = off.saturating_sub(k * self.page);
                let to = (end - k * self.page).min(p.len());
                b.extend_from_slice(p.get(from..to)?);
            }
            Some((off, b.into_boxed_slice()))
        });
        match joined {
            Some((o, b)) if *o == off && b.len() == n => Some(b),
            _ => None,
        }
    }
}

/// Where an index's bytes are: in one slice, or in a [`PageSource`].
#[derive(Debug, Clone, Copy)]
enum Src<'a> {
    Flat(&'a [u8]),
    Paged(&'a dyn PageSource),
}

impl<'a> Src<'a> {
    fn len(self) -> usize {
        match self {
            Src::Flat(b) => b.len(),
            Src::Paged(p) => p.len(),
        }
    }
    fn slice(self, off: usize, n: usize) -> Option<&'a [u8]> {
        match self {
            Src::Flat(b) => b.get(off..off.checked_add(n)?),
            Src::Paged(p) => p.slice(off, n),
        }
    }
}

/// An index opened in place. Holds the parsed regions (few) and borrows everything else.
#[derive(Debug)]
pub struct FrozenIndex<'a> {
    tag: Tag,
    generation: u64,
    regions: Vec<Region>,
    entries: Entries<'a>,
    /// Where the inode table starts: `ino_rows` x (ino u64, entry u32), sorted.
    inos_at: usize,
    ino_rows: usize,
    /// How many entries are hard links.
    link_count: u32,
}

/// Bytes per row of the inode table.
const INO_ROW: usize = 12;

impl<'a> FrozenIndex<'a> {
    /// Check the header, that the sections add up to exactly `bytes.len()`, and parse the
    /// regions. Nothing proportional to the number of entries is read or allocated.
    pub fn open(bytes: &'a [u8]) -> Result<FrozenIndex<'a>, IndexError> {
        Self::open_src(Src::Flat(bytes))
    }

    /// [`FrozenIndex::open`] over bytes read on demand: reads the header and the regions.
    pub fn open_paged(src: &'a dyn PageSource) -> Result<FrozenIndex<'a>, IndexError> {
        Self::open_src(Src::Paged(src))
    }

    fn open_src(src: Src<'a>) -> Result<FrozenIndex<'a>, IndexError> {
        let total = src.len();
        let header = src
            .slice(0, HEADER_LEN)
            .ok_or(IndexError::Truncated { len: total })?;
        let mut h = Cursor(header);
        if h.take(INDEX_MAGIC.len()) != Some(&INDEX_MAGIC[..]) {
            return Err(IndexError::BadMagic);
        }
        // The header is HEADER_LEN bytes long, so these reads succeed.
        let short = || IndexError::Truncated { len: total };
        let version = h.u32().ok_or_else(short)?;
        if version != INDEX_VERSION {
            return Err(IndexError::UnsupportedVersion(version));
        }
        let count = h.u32().ok_or_else(short)?;
        let tag: [u8; TAG_LEN] = h.array().ok_or_else(short)?;
        let regions_len = h.u32().ok_or_else(short)?;
        let records_len = h.u32().ok_or_else(short)?;
        let ino_count = h.u32().ok_or_else(short)?;
        let link_count = h.u32().ok_or_else(short)?;
        let expected = HEADER_LEN as u64
            + u64::from(regions_len)
            + 4 * u64::from(count)
            + u64::from(records_len)
            + INO_ROW as u64 * u64::from(ino_count);
        if expected != total as u64 {
            return Err(IndexError::LengthMismatch {
                expected,
                actual: total,
            });
        }
        // The lengths add up to `total`, so each fits a usize and the sums do not overflow.
        let mismatch = || IndexError::LengthMismatch {
            expected,
            actual: total,
        };
        let count = usize::try_from(count).map_err(|_| mismatch())?;
        let regions_len = usize::try_from(regions_len).map_err(|_| mismatch())?;
        let records_len = usize::try_from(records_len).map_err(|_| mismatch())?;
        let regions = src.slice(HEADER_LEN, regions_len).ok_or_else(mismatch)?;
        let offsets = HEADER_LEN + regions_len;
        let records = offsets + count * 4;
        let inos_at = records + records_len;
        let pb = MetadataPb::decode(regions).map_err(|e| IndexError::Regions(e.to_string()))?;
        if !pb.files.is_empty() {
            return Err(IndexError::Regions(
                "the regions section lists files".into(),
            ));
        }
        let meta = Metadata::from_pb(pb).map_err(IndexError::Regions)?;
        Ok(FrozenIndex {
            tag: Tag(tag),
            generation: meta.generation,
            regions: meta.regions,
            entries: Entries {
                src,
                offsets,
                records,
                records_len,
                count,
            },
            inos_at,
            ino_rows: ino_count as usize,
            link_count,
        })
    }

    /// Are any entries hard links?
    pub fn has_links(&self) -> bool {
        self.link_count > 0
    }

    /// Paths of the entries that record inode number `ino` (normally none or one). O(log n).
    pub fn with_ino(&self, ino: u64) -> impl Iterator<Item = &'a [u8]> + '_ {
        let rows = self.ino_rows;
        let (mut lo, mut hi) = (0, rows);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.ino_row(mid).is_some_and(|(n, _)| n < ino) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        (lo..rows)
            .map_while(move |i| self.ino_row(i).filter(|&(n, _)| n == ino))
            .filter_map(move |(_, e)| self.entries.path(usize::try_from(e).ok()?))
    }

    /// Row `i` of the inode table: (inode number, entry).
    fn ino_row(&self, i: usize) -> Option<(u64, u32)> {
        let at = self.inos_at.checked_add(i.checked_mul(INO_ROW)?)?;
        let mut c = Cursor(self.entries.src.slice(at, INO_ROW)?);
        Some((c.u64()?, c.u32()?))
    }

    /// Tag of the fspf this index was built from; compare it with the run's current tag.
    pub fn tag(&self) -> Tag {
        self.tag
    }
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// Regions, sorted by embed point (parsed and validated by [`FrozenIndex::open`]).
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }
    /// Number of listed entries.
    pub fn len(&self) -> usize {
        self.entries.count
    }
    pub fn is_empty(&self) -> bool {
        self.entries.count == 0
    }

    /// The entry listed at `path`, by binary search. O(log n).
    pub fn get(&self, path: &EmbedPath) -> Option<FileEntry> {
        let i = self.entries.lower_bound(path.as_bytes());
        let (p, rest) = self.entries.record(i)?;
        if p != path.as_bytes() {
            return None;
        }
        parse_entry(&mut Cursor(rest))
    }

    /// Is any path listed strictly below `dir`? O(log n).
    pub fn has_below(&self, dir: &EmbedPath) -> bool {
        let prefix = dir.child_prefix();
        let i = self.entries.first_below(&prefix);
        self.entries.path(i).is_some_and(|p| p.starts_with(&prefix))
    }

    /// Direct children of `dir` in name order (rules: [`crate::format::view::MetaView`]).
    /// Each child's subtree is contiguous and jumped over by a galloping search, so a child with
    /// s descendants costs O(log s) and one without costs O(1), after the O(log n) start.
    pub fn children(&self, dir: &EmbedPath) -> Children<'a> {
        let prefix = dir.child_prefix();
        let pos = self.entries.first_below(&prefix);
        Children::frozen(FrozenChildren {
            entries: self.entries,
            prefix,
            pos,
        })
    }

    /// The paths of `path` (if listed) and of every entry below it, in tree order: one
    /// contiguous run of the index. O(log n) to start, O(1) per path.
    pub fn subtree(&self, path: &EmbedPath) -> impl Iterator<Item = &'a [u8]> + 'a {
        let entries = self.entries;
        let me = path.as_bytes().to_vec();
        let prefix = path.child_prefix();
        let start = entries.lower_bound(&me);
        (start..entries.count)
            .map_while(move |i| entries.path(i))
            .take_while(move |p| *p == &me[..] || p.starts_with(&prefix))
    }

    /// Every entry in tree order; a malformed record yields an error and ends the walk. O(n).
    pub fn iter(&self) -> impl Iterator<Item = Result<(EmbedPath, FileEntry), IndexError>> + 'a {
        let entries = self.entries;
        let mut next_off = 0usize;
        let mut prev: Option<&'a [u8]> = None;
        let mut failed = false;
        (0..entries.count).map_while(move |index| {
            if failed {
                return None;
            }
            let r = entries.checked_record(index, &mut next_off, &mut prev);
            failed = r.is_err();
            Some(r)
        })
    }

    /// Check every record: laid out back to back, well formed, normalised paths in strictly
    /// increasing tree order. O(n); for tests, fuzzing and diagnostics, never needed to query.
    pub fn validate(&self) -> Result<(), IndexError> {
        self.iter().try_for_each(|r| r.map(drop))?;
        self.entries.check_end()?;
        // The inode table: sorted, each row naming an entry that records that number, and
        // every recorded number in it.
        let bad = |reason| IndexError::Entry {
            index: self.entries.count,
            reason,
        };
        let mut prev: Option<(u64, u32)> = None;
        let mut rows = 0usize;
        for row in 0..self.ino_rows {
            let (ino, e) = self.ino_row(row).ok_or(bad("inode table"))?;
            if prev.is_some_and(|p| p >= (ino, e)) {
                return Err(bad("inode table out of order"));
            }
            prev = Some((ino, e));
            let (_, rest) = self
                .entries
                .record(e as usize)
                .ok_or(bad("inode table names no entry"))?;
            if parse_entry(&mut Cursor(rest)).and_then(|x| x.ino) != Some(ino) {
                return Err(bad("inode table disagrees with its entry"));
            }
            rows += 1;
        }
        let recorded = self
            .iter()
            .filter(|r| matches!(r, Ok((_, e)) if e.ino.is_some()))
            .count();
        if rows != recorded {
            return Err(bad("inode table misses recorded numbers"));
        }
        let links = self
            .iter()
            .filter(|r| matches!(r, Ok((_, e)) if matches!(e.kind, FileKind::Link(_))))
            .count();
        if links != self.link_count as usize {
            return Err(bad("link count disagrees with the entries"));
        }
        Ok(())
    }

    /// The full `Metadata` back (what a process needs to commit). O(n log n), validating.
    pub fn to_metadata(&self) -> Result<Metadata, IndexError> {
        let mut files = self.iter().collect::<Result<Vec<_>, _>>()?;
        self.entries.check_end()?;
        // Strictly increasing in tree order means no duplicates; the map wants byte order.
        files.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Metadata {
            generation: self.generation,
            regions: self.regions.clone(),
            files: files.into_iter().collect::<BTreeMap<_, _>>(),
        })
    }
}

/// The offset table and records of an index. Every read is bounds-checked and answers `None`
/// for bytes that do not parse.
#[derive(Debug, Clone, Copy)]
struct Entries<'a> {
    src: Src<'a>,
    /// Where the offset table starts in the index.
    offsets: usize,
    /// Where the records start, and their length in all.
    records: usize,
    records_len: usize,
    count: usize,
}

impl<'a> Entries<'a> {
    /// Where record `i` starts within the records.
    fn offset(&self, i: usize) -> Option<usize> {
        if i >= self.count {
            return None;
        }
        let b = self
            .src
            .slice(self.offsets.checked_add(i.checked_mul(4)?)?, 4)?;
        usize::try_from(Cursor(b).u32()?).ok()
    }

    /// Start and end of record `i` within the records: records lie back to back, so it ends
    /// where the next one starts (the last one at the end of the records).
    fn span(&self, i: usize) -> Option<(usize, usize)> {
        let off = self.offset(i)?;
        let end = if i + 1 < self.count {
            self.offset(i + 1)?
        } else {
            self.records_len
        };
        (off <= end && end <= self.records_len).then_some((off, end))
    }

    /// Path of entry `i` and the rest of its record.
    fn record(&self, i: usize) -> Option<(&'a [u8], &'a [u8])> {
        #[cfg(test)]
        probes::count();
        let (off, end) = self.span(i)?;
        let mut c = Cursor(self.src.slice(self.records.checked_add(off)?, end - off)?);
        let len = c.u32()?;
        let path = c.take(usize::try_from(len).ok()?)?;
        Some((path, c.0))
    }

    fn path(&self, i: usize) -> Option<&'a [u8]> {
        self.record(i).map(|(p, _)| p)
    }

    /// First entry not below `path` in tree order (`count` if none).
    fn lower_bound(&self, path: &[u8]) -> usize {
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            // An unreadable record counts as "not less": the search still ends.
            if self
                .path(mid)
                .is_some_and(|p| tree_order(p, path) == Ordering::Less)
            {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// First entry strictly below the directory whose child prefix is `prefix` (`/` or `dir/`),
    /// if any is listed: the subtree follows the directory itself, so this is the first entry
    /// from `prefix` on, skipping `/` itself when listing the root.
    fn first_below(&self, prefix: &[u8]) -> usize {
        let i = self.lower_bound(prefix);
        if self.path(i) == Some(prefix) {
            i + 1
        } else {
            i
        }
    }

    /// First index from `start` on where `inside` fails, for `inside` true on a run starting at
    /// `start`: doubling steps, then bisection. O(log(run length)), O(1) for an empty run.
    fn end_of_run(&self, start: usize, inside: impl Fn(usize) -> bool) -> usize {
        let (mut lo, mut step) = (start, 1usize);
        let mut hi = loop {
            let probe = lo.saturating_add(step - 1);
            if probe >= self.count {
                break self.count;
            }
            if !inside(probe) {
                break probe;
            }
            lo = probe + 1;
            step = step.saturating_mul(2);
        };
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if inside(mid) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        hi
    }

    /// Entry `index`, checked against the layout: it starts at `next_off` (records lie back to
    /// back) and its path is a normalised embed path after `prev` in tree order.
    fn checked_record(
        &self,
        index: usize,
        next_off: &mut usize,
        prev: &mut Option<&'a [u8]>,
    ) -> Result<(EmbedPath, FileEntry), IndexError> {
        let bad = |reason| IndexError::Entry { index, reason };
        let (off, end) = self
            .span(index)
            .ok_or(bad("offset out of order or past the end"))?;
        if off != *next_off {
            return Err(bad("record is not where the previous one ends"));
        }
        let (p, rest) = self.record(index).ok_or(bad("path runs past the end"))?;
        let mut c = Cursor(rest);
        let entry = parse_entry(&mut c).ok_or(bad("malformed entry"))?;
        if !c.0.is_empty() {
            return Err(bad("bytes after the entry"));
        }
        let path = EmbedPath::from_bytes(p).map_err(|_| bad("path is not an embed path"))?;
        if path.as_bytes() != p {
            return Err(bad("path is not normalised"));
        }
        if prev.is_some_and(|q| tree_order(q, p) != Ordering::Less) {
            return Err(bad("paths out of order or listed twice"));
        }
        *prev = Some(p);
        *next_off = end;
        Ok((path, entry))
    }

    /// After the last record: nothing may follow it.
    fn check_end(&self) -> Result<(), IndexError> {
        // The last record ends at the end of the records by its span, and `checked_record`
        // checks that its entry fills it exactly; without entries there are no records.
        if self.count == 0 && self.records_len != 0 {
            return Err(IndexError::Entry {
                index: self.count,
                reason: "bytes after the last record",
            });
        }
        Ok(())
    }
}

/// Children of one directory, read lazily from an index.
pub struct FrozenChildren<'a> {
    entries: Entries<'a>,
    /// `/` or `dir/`.
    prefix: Vec<u8>,
    /// Next entry to look at: the first of the next child's subtree.
    pos: usize,
}

impl<'a> Iterator for FrozenChildren<'a> {
    type Item = (&'a [u8], ChildKind);
    fn next(&mut self) -> Option<Self::Item> {
        let (path, rest) = self.entries.record(self.pos)?;
        let below = path.strip_prefix(&self.prefix[..])?;
        let (name, kind) = match below.iter().position(|&c| c == b'/') {
            Some(i) => (below.get(..i)?, ChildKind::Dir),
            None => {
                let kind = match Cursor(rest).u8()? {
                    KIND_FILE => ChildKind::File,
                    KIND_DIR => ChildKind::Dir,
                    KIND_SYMLINK => ChildKind::Symlink,
                    KIND_SPECIAL => ChildKind::Special,
                    KIND_LINK => {
                        let e = parse_entry(&mut Cursor(rest))?;
                        let entries = self.entries;
                        ChildKind::of(&e.kind, |t| {
                            let (p, rest) = entries.record(entries.lower_bound(t.as_bytes()))?;
                            (p == t.as_bytes())
                                .then(|| parse_entry(&mut Cursor(rest)))?
                                .map(|e| e.kind)
                        })
                    }
                    _ => return None,
                };
                (below, kind)
            }
        };
        if name.is_empty() {
            return None;
        }
        // `dir/name` and everything below it: the run to jump over.
        let root = path.get(..self.prefix.len() + name.len())?;
        let entries = self.entries;
        let inside = |i: usize| {
            entries.path(i).is_some_and(|p| {
                p.strip_prefix(root)
                    .is_some_and(|r| r.first().is_none_or(|&c| c == b'/'))
            })
        };
        self.pos = entries.end_of_run(self.pos.saturating_add(1), inside);
        Some((name, kind))
    }
}

/// The entry after a record's path.
fn parse_entry(c: &mut Cursor<'_>) -> Option<FileEntry> {
    let kind = c.u8()?;
    let mode = u32::from(c.u16()?);
    let mtime_ns = c.u64()? as i64;
    let ctime_ns = c.u64()? as i64;
    let owner = match c.u8()? {
        0 => None,
        1 => Some(Owner {
            uid: c.u32()?,
            gid: c.u32()?,
        }),
        _ => return None,
    };
    let ino = match c.u64()? {
        0 => None,
        n => Some(n),
    };
    let kind = match kind {
        KIND_FILE => {
            let mut id = [0u8; FILE_ID_LEN];
            id.copy_from_slice(c.take(FILE_ID_LEN)?);
            let size = c.u64()?;
            let root = match usize::from(c.u8()?) {
                0 => None,
                ROOT_LEN => {
                    let mut r = [0u8; ROOT_LEN];
                    r.copy_from_slice(c.take(ROOT_LEN)?);
                    Some(r)
                }
                _ => return None,
            };
            FileKind::File {
                id: FileId(id),
                size,
                root,
            }
        }
        KIND_DIR => FileKind::Dir,
        KIND_SYMLINK => {
            let len = usize::try_from(c.u32()?).ok()?;
            FileKind::Symlink(c.take(len)?.to_vec())
        }
        KIND_SPECIAL => FileKind::Special {
            kind: SpecialKind::from_code(u32::from(c.u8()?))?,
            rdev: c.u64()?,
        },
        KIND_LINK => {
            let len = usize::try_from(c.u32()?).ok()?;
            FileKind::Link(EmbedPath::from_bytes(c.take(len)?).ok()?)
        }
        _ => return None,
    };
    if mode & !0o7777 != 0 {
        return None;
    }
    let mut links = Vec::new();
    if matches!(kind, FileKind::File { .. } | FileKind::Special { .. }) {
        for _ in 0..c.u32()? {
            let len = usize::try_from(c.u32()?).ok()?;
            links.push(EmbedPath::from_bytes(c.take(len)?).ok()?);
        }
    }
    Some(FileEntry {
        links,
        kind,
        mode,
        mtime_ns,
        owner,
        ino,
        ctime_ns,
    })
}

/// Reads from the front of a byte slice; every read checks the bounds.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }
    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
}

/// Counts record reads, so tests can state costs in reads rather than in time.
#[cfg(test)]
mod probes {
    use std::cell::Cell;
    thread_local!(static READS: Cell<usize> = const { Cell::new(0) });
    pub fn count() {
        READS.with(|r| r.set(r.get() + 1));
    }
    /// Record reads made by `f`.
    pub fn during<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let before = READS.with(Cell::get);
        let t = f();
        (t, READS.with(Cell::get) - before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::RegionKey;
    use crate::format::metadata::{Protection, RegionKind};
    use crate::format::view::MetaView;
    use proptest::prelude::*;
    use std::path::PathBuf;

    fn p(s: &str) -> EmbedPath {
        EmbedPath::parse(s).unwrap()
    }
    fn file(n: u8) -> FileEntry {
        FileEntry {
            links: Vec::new(),
            kind: FileKind::File {
                id: FileId([n; FILE_ID_LEN]),
                size: u64::from(n) * 1000,
                root: n.is_multiple_of(2).then_some([n; ROOT_LEN]),
            },
            mode: 0o644,
            mtime_ns: -5,
            owner: None,
            ino: None,
            ctime_ns: 0,
        }
    }
    fn regions() -> Vec<Region> {
        vec![
            Region {
                embed_point: EmbedPath::root(),
                kind: RegionKind::Kernel(PathBuf::from("/")),
                protection: Protection::NotProtected,
                key: None,
                chunk_len: 4096,
            },
            Region {
                embed_point: p("/a"),
                kind: RegionKind::Kernel(PathBuf::from("/srv/a")),
                protection: Protection::Encrypted,
                key: Some(RegionKey::from_bytes(vec![9; 32]).unwrap()),
                chunk_len: 4096,
            },
            Region {
                embed_point: p("/tmp"),
                kind: RegionKind::Ephemeral,
                protection: Protection::Authenticated,
                key: Some(RegionKey::from_bytes(vec![5; 16]).unwrap()),
                chunk_len: 65536,
            },
        ]
    }
    fn meta(files: impl IntoIterator<Item = (EmbedPath, FileEntry)>) -> Metadata {
        Metadata {
            generation: 42,
            regions: regions(),
            files: files.into_iter().collect(),
        }
    }
    const TAG: Tag = Tag([0x5a; TAG_LEN]);

    /// Paths that sort differently in byte order and in tree order.
    fn tricky() -> Metadata {
        let mut m = meta([]);
        for (s, e) in [
            ("/a", FileEntry::test_dir()),
            ("/a-b", file(1)),
            ("/a.b", file(2)),
            ("/a/b", FileEntry::test_dir()),
            ("/a/b/c", file(3)),
            ("/a/b-c/d", file(4)),
            ("/ab", file(5)),
            ("/implied/x/y", file(6)),
            ("/implied/x-y", file(7)),
        ] {
            m.files.insert(p(s), e);
        }
        m.files.insert(
            p("/link"),
            FileEntry {
                links: Vec::new(),
                kind: FileKind::Symlink(b"/a/b/c".to_vec()),
                mode: 0o777,
                mtime_ns: 0,
                owner: None,
                ino: None,
                ctime_ns: 0,
            },
        );
        // Hard links: two names of `/a/b/c`, listed in other directories; one of a fifo.
        m.files.get_mut(&p("/a/b/c")).unwrap().links = vec![p("/hard"), p("/a/b-c/h")];
        let fifo = FileEntry {
            links: vec![p("/a/fifo2")],
            kind: FileKind::Special {
                kind: crate::format::metadata::SpecialKind::Fifo,
                rdev: 0,
            },
            mode: 0o600,
            mtime_ns: 0,
            owner: None,
            ino: Some(9),
            ctime_ns: 0,
        };
        m.files.insert(p("/a/fifo"), fifo);
        for (l, t) in [
            ("/hard", "/a/b/c"),
            ("/a/b-c/h", "/a/b/c"),
            ("/a/fifo2", "/a/fifo"),
        ] {
            let e = FileEntry {
                links: Vec::new(),
                kind: FileKind::Link(p(t)),
                mode: 0,
                mtime_ns: 0,
                owner: None,
                ino: None,
                ctime_ns: 0,
            };
            m.files.insert(p(l), e);
        }
        m
    }

    /// What a listing must say, by scanning every listed path (the definition in `MetaView`).
    fn reference_children(m: &Metadata, d: &EmbedPath) -> Vec<(Vec<u8>, ChildKind)> {
        let mut out: BTreeMap<Vec<u8>, ChildKind> = BTreeMap::new();
        for (k, e) in &m.files {
            let Some(rest) = k.strip_prefix(d) else {
                continue;
            };
            if rest.is_empty() {
                continue;
            }
            match rest.iter().position(|&c| c == b'/') {
                Some(i) => {
                    out.entry(rest[..i].to_vec()).or_insert(ChildKind::Dir);
                }
                None => {
                    out.insert(
                        rest.to_vec(),
                        ChildKind::of(&e.kind, |t| m.files.get(t).map(|e| e.kind.clone())),
                    );
                }
            }
        }
        out.into_iter().collect()
    }
    fn listed(c: crate::format::view::Children<'_>) -> Vec<(Vec<u8>, ChildKind)> {
        c.map(|(n, k)| (n.to_vec(), k)).collect()
    }
    /// Every listed path, every ancestor of one, the root and a few unlisted names.
    fn dirs_to_list(m: &Metadata) -> Vec<EmbedPath> {
        let mut dirs = vec![EmbedPath::root(), p("/nope"), p("/a/nope"), p("/a-")];
        for k in m.files.keys() {
            let mut d = Some(k.clone());
            while let Some(x) = d {
                d = x.parent();
                dirs.push(x);
            }
        }
        dirs.sort();
        dirs.dedup();
        dirs
    }
    fn assert_views_agree(m: &Metadata) {
        let bytes = build_index(m, TAG).unwrap();
        let ix = FrozenIndex::open(&bytes).unwrap();
        assert_index_answers(m, &ix);
        // The same index read a page at a time, with pages so small that items cross them.
        for page in [1, 7, 64] {
            let paged = paged(&bytes, page);
            let ix = FrozenIndex::open_paged(&paged).unwrap();
            assert_index_answers(m, &ix);
            ix.validate().unwrap();
            assert_eq!(&ix.to_metadata().unwrap(), m, "paged by {page}");
            for (k, e) in &m.files {
                assert_eq!(ix.get(k).as_ref(), Some(e), "paged by {page}: {k}");
                if let Some(n) = e.ino {
                    assert!(
                        ix.with_ino(n).any(|p| p == k.as_bytes()),
                        "paged: ino of {k}"
                    );
                }
            }
        }
    }

    /// `bytes` as a [`PageSource`] of `page`-byte pages.
    fn paged(bytes: &[u8], page: usize) -> LazyPages<impl Fn(usize) -> Option<Box<[u8]>> + '_> {
        LazyPages::new(bytes.len(), page, move |k| {
            let from = k * page;
            Some(bytes.get(from..(from + page).min(bytes.len()))?.into())
        })
    }

    fn assert_index_answers(m: &Metadata, ix: &FrozenIndex<'_>) {
        for d in dirs_to_list(m) {
            let want = reference_children(m, &d);
            assert_eq!(listed(ix.children(&d)), want, "index, children of {d}");
            assert_eq!(listed(m.children(&d)), want, "metadata, children of {d}");
            let below = m.files.keys().any(|k| k != &d && k.starts_with(&d));
            assert_eq!(ix.has_below(&d), below, "index, has_below {d}");
            assert_eq!(m.has_below(&d), below, "metadata, has_below {d}");
        }
    }

    #[test]
    fn tree_order_puts_a_subtree_right_after_its_root() {
        let mut v = vec!["/ab", "/a.b", "/a/b", "/a", "/a-b", "/a/b/c", "/", "/a/b-c"];
        v.sort_by(|a, b| tree_order(a.as_bytes(), b.as_bytes()));
        assert_eq!(
            v,
            ["/", "/a", "/a/b", "/a/b/c", "/a/b-c", "/a-b", "/a.b", "/ab"]
        );
        assert_eq!(tree_order(b"/a\x01", b"/a/z"), Ordering::Greater);
        assert_eq!(tree_order(b"/a\xff", b"/a\x01"), Ordering::Greater);
    }

    #[test]
    fn every_entry_is_found_and_nothing_else() {
        let m = tricky();
        let bytes = build_index(&m, TAG).unwrap();
        let ix = FrozenIndex::open(&bytes).unwrap();
        assert_eq!(
            (ix.tag(), ix.generation(), ix.len()),
            (TAG, 42, m.files.len())
        );
        assert_eq!(ix.regions(), &m.regions[..]);
        for (k, e) in &m.files {
            assert_eq!(ix.get(k).as_ref(), Some(e), "{k}");
        }
        for absent in ["/", "/a/b/c/d", "/a-", "/implied", "/implied/x", "/zz"] {
            assert_eq!(ix.get(&p(absent)), None, "{absent}");
        }
        assert_eq!(ix.to_metadata().unwrap(), m);
        ix.validate().unwrap();
    }

    #[test]
    fn listings_follow_components_not_bytes() {
        let m = tricky();
        let bytes = build_index(&m, TAG).unwrap();
        let ix = FrozenIndex::open(&bytes).unwrap();
        let names = |c: crate::format::view::Children<'_>| {
            c.map(|(n, k)| format!("{}:{k:?}", String::from_utf8_lossy(n)))
                .collect::<Vec<_>>()
        };
        let root = [
            "a:Dir",
            "a-b:File",
            "a.b:File",
            "ab:File",
            "hard:File",
            "implied:Dir",
            "link:Symlink",
        ];
        assert_eq!(names(ix.children(&EmbedPath::root())), root);
        assert_eq!(names(m.children(&EmbedPath::root())), root);
        // A hard link is listed with its target's kind.
        let a = ["b:Dir", "b-c:Dir", "fifo:Special", "fifo2:Special"];
        assert_eq!(names(ix.children(&p("/a"))), a);
        assert_eq!(names(m.children(&p("/a"))), a);
        assert_eq!(names(m.children(&p("/implied"))), ["x:Dir", "x-y:File"]);
        assert_eq!(names(ix.children(&p("/implied"))), ["x:Dir", "x-y:File"]);
        assert!(ix.children(&p("/a-b")).next().is_none());
        assert!(ix.has_below(&p("/implied/x")) && !ix.has_below(&p("/a-b")));
        assert_views_agree(&m);
    }

    #[test]
    fn a_listed_root_is_not_its_own_child() {
        let m = meta([
            (EmbedPath::root(), FileEntry::test_dir()),
            (p("/x"), file(1)),
        ]);
        assert_views_agree(&m);
        let bytes = build_index(&m, TAG).unwrap();
        let ix = FrozenIndex::open(&bytes).unwrap();
        assert_eq!(listed(ix.children(&EmbedPath::root())).len(), 1);
        assert_eq!(ix.get(&EmbedPath::root()), Some(FileEntry::test_dir()));
        let only_root = meta([(EmbedPath::root(), FileEntry::test_dir())]);
        let bytes = build_index(&only_root, TAG).unwrap();
        assert!(!FrozenIndex::open(&bytes)
            .unwrap()
            .has_below(&EmbedPath::root()));
        assert!(!only_root.has_below(&EmbedPath::root()));
    }

    #[test]
    fn an_empty_fspf_gives_an_empty_index() {
        let m = Metadata::default();
        let bytes = build_index(&m, TAG).unwrap();
        let ix = FrozenIndex::open(&bytes).unwrap();
        assert!(ix.is_empty() && ix.regions().is_empty());
        assert!(ix.children(&EmbedPath::root()).next().is_none());
        assert_eq!(ix.to_metadata().unwrap(), m);
    }

    #[test]
    fn both_backings_answer_through_the_same_trait() {
        fn describe(v: &dyn MetaView, path: &EmbedPath) -> (Option<FileEntry>, String, usize) {
            let region = v.region_for(path).map(|r| r.embed_point.to_string());
            let entry = v.entry(path).map(|e| e.into_owned());
            (entry, region.unwrap_or_default(), v.children(path).count())
        }
        let m = tricky();
        let bytes = build_index(&m, TAG).unwrap();
        let ix = FrozenIndex::open(&bytes).unwrap();
        for path in ["/a", "/a/b/c", "/tmp/x", "/ab", "/nope"] {
            assert_eq!(describe(&m, &p(path)), describe(&ix, &p(path)), "{path}");
        }
        assert_eq!(describe(&ix, &p("/a/b")).1, "/a");
        assert_eq!(describe(&ix, &p("/ab")).1, "/");
        assert_eq!(ix.generation(), MetaView::generation(&m));
    }

    #[test]
    fn open_reads_no_entry() {
        // Open is O(1) in the number of entries by construction: it never touches the offset
        // table or the records. Shown twice: it reads no record, and it succeeds over garbage.
        let mut m = meta([]);
        for i in 0..2000 {
            m.files
                .insert(p(&format!("/a/d{}/f{i}", i % 7)), file(i as u8));
        }
        let mut bytes = build_index(&m, TAG).unwrap();
        let (ix, reads) = probes::during(|| FrozenIndex::open(&bytes).map(|ix| ix.len()));
        assert_eq!((ix, reads), (Ok(2000), 0));
        let entries_start = HEADER_LEN + region_section_len(&bytes);
        for b in &mut bytes[entries_start..] {
            *b = 0xa5;
        }
        let ix = FrozenIndex::open(&bytes).unwrap();
        assert_eq!((ix.len(), ix.regions().len()), (2000, 3));
        assert_eq!(ix.get(&p("/a/d0/f0")), None);
        assert!(ix.children(&p("/a")).next().is_none());
        assert!(ix.validate().is_err() && ix.to_metadata().is_err());
    }
    fn region_section_len(bytes: &[u8]) -> usize {
        u32::from_le_bytes(bytes[32..36].try_into().unwrap()) as usize
    }

    #[test]
    fn lookups_and_listings_cost_logarithmic_reads() {
        // 3 children with 20 000 descendants each, and 1 000 leaf children of /wide.
        let mut m = meta([]);
        for c in ["a", "b", "c"] {
            for i in 0..20_000 {
                m.files
                    .insert(p(&format!("/{c}/x{}/f{i}", i % 100)), file(1));
            }
        }
        for i in 0..1000 {
            m.files.insert(p(&format!("/wide/f{i:04}")), file(2));
        }
        let bytes = build_index(&m, TAG).unwrap();
        let ix = FrozenIndex::open(&bytes).unwrap();
        let log_n = usize::BITS - ix.len().leading_zeros(); // 16 for 61 000 entries
        let log_n = log_n as usize;
        let (e, reads) = probes::during(|| ix.get(&p("/b/x7/f10007")));
        assert!(e.is_some() && reads <= log_n + 1, "get: {reads} reads");
        let (n, reads) = probes::during(|| ix.children(&EmbedPath::root()).count());
        assert_eq!(n, 4);
        // Each big child: a doubling search and a bisection over its 20 000-entry run.
        assert!(
            reads <= 2 * log_n + 4 * (2 * log_n + 2),
            "children of /: {reads} reads"
        );
        let (n, reads) = probes::during(|| ix.children(&p("/wide")).count());
        assert_eq!(n, 1000);
        assert!(
            reads <= 2 * log_n + 2 * 1000 + 2,
            "children of /wide: {reads} reads"
        );
        let (below, reads) = probes::during(|| ix.has_below(&p("/c/x99")));
        assert!(below && reads <= 2 * log_n + 2, "has_below: {reads} reads");
    }

    #[test]
    fn a_lookup_in_a_paged_index_fetches_a_few_pages_not_the_index() {
        let mut m = meta([]);
        for i in 0..60_000 {
            m.files.insert(p(&format!("/d{}/f{i}", i % 100)), file(1));
        }
        let bytes = build_index(&m, TAG).unwrap();
        let pages = paged(&bytes, 4096);
        let total = bytes.len().div_ceil(4096);
        let ix = FrozenIndex::open_paged(&pages).unwrap();
        assert!(pages.fetched() <= 1, "open: {} pages", pages.fetched());
        assert_eq!(ix.get(&p("/d7/f10007")), Some(file(1)));
        assert_eq!(ix.get(&p("/d7/f10008")), None);
        let log_n = (usize::BITS - ix.len().leading_zeros()) as usize;
        // Each probe of the binary searches: one offset and one record, each on a page.
        let n = pages.fetched();
        assert!(
            n <= 4 * log_n + 2,
            "two lookups fetched {n} of {total} pages"
        );
        assert!(total > 500, "{total} pages");
    }

    #[test]
    fn a_page_that_cannot_be_read_answers_nothing_and_does_not_panic() {
        let m = tricky();
        let bytes = build_index(&m, TAG).unwrap();
        for bad in 1..bytes.len().div_ceil(64) {
            let pages = LazyPages::new(bytes.len(), 64, |k| {
                let from = k * 64;
                (k != bad).then(|| bytes[from..(from + 64).min(bytes.len())].into())
            });
            let Ok(ix) = FrozenIndex::open_paged(&pages) else {
                continue;
            };
            assert!(
                ix.validate().is_err(),
                "page {bad} missing, yet the index validates"
            );
            for k in m.files.keys() {
                if let Some(e) = ix.get(k) {
                    assert_eq!(Some(&e), m.files.get(k));
                }
            }
        }
    }

    #[test]
    fn an_index_cut_short_at_any_length_is_refused() {
        let bytes = build_index(&tricky(), TAG).unwrap();
        for len in 0..bytes.len() {
            assert!(FrozenIndex::open(&bytes[..len]).is_err(), "cut at {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            FrozenIndex::open(&longer),
            Err(IndexError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn header_fields_are_checked() {
        let bytes = build_index(&tricky(), TAG).unwrap();
        let with = |at: usize, b: &[u8]| {
            let mut v = bytes.clone();
            v[at..at + b.len()].copy_from_slice(b);
            FrozenIndex::open(&v).map(|_| ()).unwrap_err()
        };
        assert_eq!(with(0, b"X"), IndexError::BadMagic);
        assert_eq!(
            with(8, &1u32.to_le_bytes()),
            IndexError::UnsupportedVersion(1)
        );
        assert_eq!(
            with(8, &2u32.to_le_bytes()),
            IndexError::UnsupportedVersion(2)
        );
        assert_eq!(
            with(8, &3u32.to_le_bytes()),
            IndexError::UnsupportedVersion(3)
        );
        assert_eq!(
            with(8, &4u32.to_le_bytes()),
            IndexError::UnsupportedVersion(4)
        );
        assert_eq!(
            with(8, &6u32.to_le_bytes()),
            IndexError::UnsupportedVersion(6)
        );
        assert_eq!(
            with(8, &8u32.to_le_bytes()),
            IndexError::UnsupportedVersion(8)
        );
        assert!(matches!(
            with(40, &u32::MAX.to_le_bytes()),
            IndexError::LengthMismatch { .. }
        ));
        assert!(matches!(
            with(12, &u32::MAX.to_le_bytes()),
            IndexError::LengthMismatch { .. }
        ));
        assert!(matches!(
            with(36, &u32::MAX.to_le_bytes()),
            IndexError::LengthMismatch { .. }
        ));
        // The link count is checked by validation (lookups only use it as a hint).
        let mut v = bytes.clone();
        v[44] ^= 1;
        assert!(FrozenIndex::open(&v).unwrap().validate().is_err());
        assert!(matches!(
            with(HEADER_LEN, &[0xff; 4]),
            IndexError::Regions(_)
        ));
    }

    /// Everything a process may call, on whatever `open` accepted: none of it may panic.
    fn exercise(bytes: &[u8], paths: &[EmbedPath]) {
        let Ok(ix) = FrozenIndex::open(bytes) else {
            return;
        };
        let _ = (ix.len(), ix.tag(), ix.generation(), ix.regions().len());
        for path in paths {
            let _ = ix.get(path);
            let _ = ix.has_below(path);
            let _ = ix.children(path).take(10_000).count();
            let _ = ix.region_for(path);
        }
        let _ = ix.iter().count();
        let _ = ix.validate();
        let _ = ix.to_metadata();
    }

    #[test]
    fn every_single_byte_change_is_survived() {
        let m = tricky();
        let bytes = build_index(&m, TAG).unwrap();
        let paths = dirs_to_list(&m);
        for at in 0..bytes.len() {
            for v in [0x00, 0x01, 0x2f, 0x7f, 0xff, bytes[at] ^ 0x01] {
                let mut b = bytes.clone();
                b[at] = v;
                exercise(&b, &paths);
            }
        }
    }

    fn component() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "a", "a-b", "a.b", "ab", "b", "-", "\u{1}", "a\u{1}", "\u{7f}", "z", "a0",
        ])
    }
    fn path() -> impl Strategy<Value = EmbedPath> {
        (prop::collection::vec(component(), 1..7), any::<bool>()).prop_map(|(cs, high)| {
            let mut b = Vec::new();
            for c in cs {
                b.push(b'/');
                b.extend_from_slice(c.as_bytes());
            }
            if high {
                b.push(0xff); // not UTF-8: paths are bytes
            }
            EmbedPath::from_bytes(&b).unwrap()
        })
    }
    fn entry() -> impl Strategy<Value = FileEntry> {
        let kind = prop_oneof![
            (any::<[u8; 16]>(), any::<u64>(), any::<Option<[u8; 32]>>()).prop_map(
                |(id, size, root)| FileKind::File {
                    id: FileId(id),
                    size,
                    root
                }
            ),
            Just(FileKind::Dir),
            prop::collection::vec(any::<u8>(), 0..12).prop_map(FileKind::Symlink),
            (1u32..=4, any::<u64>()).prop_map(|(k, rdev)| FileKind::Special {
                kind: SpecialKind::from_code(k).unwrap(),
                rdev
            }),
        ];
        let owner =
            any::<Option<(u32, u32)>>().prop_map(|o| o.map(|(uid, gid)| Owner { uid, gid }));
        let ino = any::<Option<u64>>().prop_map(|i| i.filter(|&n| n != 0));
        (kind, 0u32..0o10000, any::<i64>(), owner, ino, any::<i64>()).prop_map(
            |(kind, mode, mtime_ns, owner, ino, ctime_ns)| FileEntry {
                links: Vec::new(),
                kind,
                mode,
                mtime_ns,
                owner,
                ino,
                ctime_ns,
            },
        )
    }
    fn metadata() -> impl Strategy<Value = Metadata> {
        prop::collection::btree_map(path(), entry(), 0..80).prop_map(meta)
    }

    proptest! {
        #[test]
        fn random_trees_round_trip_and_list_like_a_scan(m in metadata(), g in any::<u64>()) {
            let mut m = m;
            m.generation = g;
            let bytes = build_index(&m, TAG).unwrap();
            let ix = FrozenIndex::open(&bytes).unwrap();
            prop_assert_eq!(ix.len(), m.files.len());
            for (k, e) in &m.files {
                prop_assert_eq!(ix.get(k), Some(e.clone()));
            }
            prop_assert_eq!(ix.to_metadata().unwrap(), m.clone());
            assert_views_agree(&m);
        }

        #[test]
        fn random_damage_never_panics(
            m in metadata(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = build_index(&m, TAG).unwrap();
            for (at, v) in edits {
                let i = at.index(bytes.len());
                bytes[i] = v;
            }
            let paths = dirs_to_list(&m);
            exercise(&bytes, &paths);
            let cut = cut.index(bytes.len() + 1);
            exercise(&bytes[..cut], &paths);
        }
    }
}

//! Encrypted-file format 2 (docs/FORMAT.md §4a): chunks sealed under per-epoch keys, their
//! entries in a tree of 4 KiB pages whose top-page hash the fspf commits. This module builds
//! trees (whole files, streaming), reads and verifies pages, and computes the pages an update
//! rewrites. Positions come from `format::tree`; nothing here knows paths or commits.
use super::ReadAt;
use crate::crypto::{
    self, ct_eq, AeadKey, FileId, MacKey, RegionKey, EPOCH_LEN, NONCE_LEN, TAG_LEN,
};
use crate::error::{Error, Result};
use crate::format::layout::{chunk_count, ENC_HEADER_LEN};
use crate::format::tree::{self as ft, ENC2_MAGIC, ENTRY_LEN, FANOUT, PAGE_LEN};
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::io::Write;
use std::sync::Arc;

/// One tree page.
pub type Page = Box<[u8; PAGE_LEN]>;

/// Pages of a tree by (level, index).
pub type Pages = std::collections::BTreeMap<(u32, u64), Page>;

pub fn zero_page() -> Page {
    Box::new([0u8; PAGE_LEN])
}

/// Nonce of chunk `index` under an epoch key: 4 zero bytes || index u64 BE. An epoch key seals
/// each index at most once.
pub fn nonce2(index: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&index.to_be_bytes());
    n
}

/// Associated data of chunk `index`: file id || index u64 LE.
pub fn aad2(id: &FileId, index: u64) -> [u8; 24] {
    let mut a = [0u8; 24];
    a[..16].copy_from_slice(&id.0);
    a[16..].copy_from_slice(&index.to_le_bytes());
    a
}

/// Header of a format-2 encrypted file.
pub fn header2(id: &FileId) -> [u8; ENC_HEADER_LEN as usize] {
    let mut h = [0u8; ENC_HEADER_LEN as usize];
    h[..8].copy_from_slice(&ENC2_MAGIC);
    h[8..].copy_from_slice(&id.0);
    h
}

/// A chunk's entry: the epoch its key came from and its GCM tag.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ChunkEntry {
    pub epoch: [u8; EPOCH_LEN],
    pub tag: [u8; TAG_LEN],
}

impl ChunkEntry {
    pub fn read(page: &[u8; PAGE_LEN], slot: usize) -> ChunkEntry {
        let e = &page[slot * ENTRY_LEN..(slot + 1) * ENTRY_LEN];
        let mut c = ChunkEntry {
            epoch: [0; EPOCH_LEN],
            tag: [0; TAG_LEN],
        };
        c.epoch.copy_from_slice(&e[..EPOCH_LEN]);
        c.tag.copy_from_slice(&e[EPOCH_LEN..]);
        c
    }
    pub fn write(&self, page: &mut [u8; PAGE_LEN], slot: usize) {
        let e = &mut page[slot * ENTRY_LEN..(slot + 1) * ENTRY_LEN];
        e[..EPOCH_LEN].copy_from_slice(&self.epoch);
        e[EPOCH_LEN..].copy_from_slice(&self.tag);
    }
}

/// Derives (and caches) the chunk keys of one file's epochs.
pub struct EpochKeys {
    region: RegionKey,
    id: FileId,
    cache: HashMap<[u8; EPOCH_LEN], Arc<AeadKey>>,
}

/// Keys kept per reader; a file updated in many commits has many epochs.
const EPOCH_CACHE: usize = 256;

impl EpochKeys {
    pub fn new(region: RegionKey, id: FileId) -> EpochKeys {
        EpochKeys {
            region,
            id,
            cache: HashMap::new(),
        }
    }
    pub fn id(&self) -> &FileId {
        &self.id
    }
    pub fn key(&mut self, epoch: &[u8; EPOCH_LEN]) -> Result<Arc<AeadKey>> {
        if let Some(k) = self.cache.get(epoch) {
            return Ok(k.clone());
        }
        if self.cache.len() >= EPOCH_CACHE {
            self.cache.clear();
        }
        let k = Arc::new(crypto::epoch_chunk_key(&self.region, &self.id, epoch)?);
        self.cache.insert(*epoch, k.clone());
        Ok(k)
    }
}

/// Seal one chunk in place under `key` (from a fresh epoch); returns its tag.
pub fn seal_chunk2(
    key: &AeadKey,
    id: &FileId,
    index: u64,
    data: &mut [u8],
) -> Result<[u8; TAG_LEN]> {
    key.seal(nonce2(index), &aad2(id, index), data)
}

/// Builds the tree of a whole file in one pass, writing complete pages in post-order as they
/// complete and the spine at the end (`format::tree`).
pub struct TreeBuilder<'a, W: Write> {
    key: &'a MacKey,
    n: u64,
    top: u32,
    /// Per level: the page being filled, its index and how many entries it holds.
    open: Vec<(Page, u64, usize)>,
    out: W,
    written: u64,
}

impl<'a, W: Write> TreeBuilder<'a, W> {
    pub fn new(key: &'a MacKey, n: u64, out: W) -> Self {
        let top = ft::levels(n) - 1;
        TreeBuilder {
            key,
            n,
            top,
            open: (0..=top).map(|_| (zero_page(), 0, 0)).collect(),
            out,
            written: 0,
        }
    }

    fn put(&mut self, level: u32, entry: &[u8; ENTRY_LEN]) -> std::io::Result<()> {
        let l = level as usize;
        let (page, index, count) = &mut self.open[l];
        page[*count * ENTRY_LEN..(*count + 1) * ENTRY_LEN].copy_from_slice(entry);
        *count += 1;
        if *count as u64 == FANOUT && level < self.top {
            let (page, index) = (std::mem::replace(page, zero_page()), *index);
            self.open[l].1 += 1;
            self.open[l].2 = 0;
            self.out.write_all(&page[..])?;
            self.written += 1;
            let h = self.key.page(level, index, &page[..]);
            self.put(level + 1, &h)?;
        }
        // A full top page is written by `finish`, like an incomplete one.
        Ok(())
    }

    /// Add the entry of the next chunk.
    pub fn push(&mut self, e: &ChunkEntry) -> std::io::Result<()> {
        let mut b = [0u8; ENTRY_LEN];
        b[..EPOCH_LEN].copy_from_slice(&e.epoch);
        b[EPOCH_LEN..].copy_from_slice(&e.tag);
        self.put(0, &b)
    }

    /// Write the spine (incomplete pages, lowest level first, then the top) and return the root
    /// and the writer.
    pub fn finish(mut self) -> std::io::Result<([u8; 32], W)> {
        for level in 0..=self.top {
            let l = level as usize;
            let (page, index, count) = std::mem::replace(&mut self.open[l], (zero_page(), 0, 0));
            if level < self.top && count == 0 {
                continue;
            }
            self.out.write_all(&page[..])?;
            self.written += 1;
            let h = self.key.page(level, index, &page[..]);
            if level == self.top {
                debug_assert_eq!(self.written, ft::tree_pages(self.n));
                return Ok((h, self.out));
            }
            self.put(level + 1, &h)?;
        }
        unreachable!("the loop returns at the top level")
    }
}

/// Verified access to the pages of one file's tree: every page returned was checked against
/// its parent, up to the root the fspf records. Verified pages are cached.
pub struct TreeReader<O: ReadAt> {
    key: MacKey,
    root: [u8; 32],
    n: u64,
    file: O,
    cache: HashMap<(u32, u64), Page, BuildHasherDefault<PageHasher>>,
    label: String,
}

/// A multiplicative hash for (level, page) keys: they are page numbers of a tree whose shape the
/// file's size fixes, so nobody can choose colliding keys, and SipHash cost a few per cent of a
/// random 4 KiB read.
#[derive(Default)]
pub struct PageHasher(u64);

impl std::hash::Hasher for PageHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(*b as u64);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(n as u64);
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// Verified pages kept per reader, at most (16 MiB: the whole tree of a 2 GiB file with 4 KiB
/// chunks; a reader holds only the pages it has read). With 512, random 4 KiB reads over a
/// 1 GiB file (2 048 leaf pages) missed three times in four, and each miss read and hashed a
/// page: 150 000 reads/s against 560 000 before format 2.
const PAGE_CACHE: usize = 4096;

impl<O: ReadAt> TreeReader<O> {
    /// Checks the tree file's length for a file of `size` bytes in chunks of `chunk_len`.
    pub fn new(
        key: MacKey,
        root: [u8; 32],
        size: u64,
        chunk_len: u32,
        file: O,
        label: String,
    ) -> Result<Self> {
        let need = ft::tree_len(size, chunk_len);
        let have = file.len().map_err(|e| Error::Io {
            path: label.clone().into(),
            source: e,
        })?;
        if have != need {
            return Err(Error::TreeSize {
                path: label,
                expected: need,
                actual: have,
            });
        }
        Ok(TreeReader {
            key,
            root,
            n: chunk_count(size, chunk_len),
            file,
            cache: HashMap::default(),
            label,
        })
    }

    /// The tree file's bytes at `at` as they are (unverified: an updater diffs its new pages
    /// against them, and whatever it writes is verified by every later read).
    pub fn read_raw(&self, buf: &mut [u8], at: u64) -> Result<()> {
        self.file.read_exact_at(buf, at).map_err(|e| self.io(e))
    }

    pub fn chunks(&self) -> u64 {
        self.n
    }

    fn io(&self, e: std::io::Error) -> Error {
        Error::Io {
            path: self.label.clone().into(),
            source: e,
        }
    }

    fn bad(&self, level: u32, p: u64) -> Error {
        Error::TreeAuth {
            path: self.label.clone(),
            level,
            page: p,
        }
    }

    /// Verify page `p` of `level` (and its ancestors) into the cache.
    fn load(&mut self, level: u32, p: u64) -> Result<()> {
        if self.cache.contains_key(&(level, p)) {
            return Ok(());
        }
        let top = ft::levels(self.n) - 1;
        if level > top || p >= ft::pages_at(self.n, level) {
            return Err(self.bad(level, p));
        }
        let mut page = zero_page();
        let at = ft::page_pos(self.n, level, p) * PAGE_LEN as u64;
        self.file
            .read_exact_at(&mut page[..], at)
            .map_err(|e| self.io(e))?;
        let h = self.key.page(level, p, &page[..]);
        let expected = if level == top {
            self.root
        } else {
            self.load(level + 1, p / FANOUT)?;
            let parent = &self.cache[&(level + 1, p / FANOUT)];
            let s = (p % FANOUT) as usize * ENTRY_LEN;
            let mut e = [0u8; 32];
            e.copy_from_slice(&parent[s..s + ENTRY_LEN]);
            e
        };
        if !ct_eq(&h, &expected) {
            return Err(self.bad(level, p));
        }
        if self.cache.len() >= PAGE_CACHE {
            // Evict one leaf page (an arbitrary one: the map's order); the pages above the
            // leaves are few, and every leaf needs them.
            if let Some(k) = self.cache.keys().find(|(l, _)| *l == 0).copied() {
                self.cache.remove(&k);
            }
        }
        self.cache.insert((level, p), page);
        Ok(())
    }

    /// Verified page `p` of `level` (a copy).
    pub fn page(&mut self, level: u32, p: u64) -> Result<Page> {
        self.load(level, p)?;
        Ok(self.cache[&(level, p)].clone())
    }

    /// Verified entry of chunk `i`.
    pub fn entry(&mut self, i: u64) -> Result<ChunkEntry> {
        if let Some(page) = self.cache.get(&(0, i / FANOUT)) {
            return Ok(ChunkEntry::read(page, (i % FANOUT) as usize));
        }
        self.load(0, i / FANOUT)?;
        Ok(ChunkEntry::read(
            &self.cache[&(0, i / FANOUT)],
            (i % FANOUT) as usize,
        ))
    }
}

/// The pages an update rewrites, and the new root. `old` answers the pages of the committed
/// tree (verified); `changed` holds the new entries of every chunk whose content changed, and
/// `n_new` is the new chunk count. Returns the pages of the new tree to write (by level and
/// index), the new root, and the new tree's page count.
pub fn update_pages<O: ReadAt>(
    key: &MacKey,
    old: &mut TreeReader<O>,
    changed: &std::collections::BTreeMap<u64, ChunkEntry>,
    n_new: u64,
) -> Result<(Pages, [u8; 32])> {
    use std::collections::BTreeMap;
    let n_old = old.chunks();
    let old_levels = ft::levels(n_old);
    let new_levels = ft::levels(n_new);
    let mut pages: BTreeMap<(u32, u64), Page> = BTreeMap::new();
    // The current content of a page of the new tree: rewritten already, else the committed page,
    // else (a page the old tree did not have) zeros.
    fn get<O: ReadAt>(
        pages: &BTreeMap<(u32, u64), Page>,
        old: &mut TreeReader<O>,
        old_levels: u32,
        n_old: u64,
        level: u32,
        p: u64,
    ) -> Result<Page> {
        if let Some(pg) = pages.get(&(level, p)) {
            return Ok(pg.clone());
        }
        if level < old_levels && p < ft::pages_at(n_old, level) {
            return old.page(level, p);
        }
        Ok(zero_page())
    }
    // Level 0: the new entries; then the last page (its tail past the end is zeroed).
    for (&i, e) in changed.range(..n_new) {
        let p = i / FANOUT;
        let mut pg = get(&pages, old, old_levels, n_old, 0, p)?;
        e.write(&mut pg, (i % FANOUT) as usize);
        pages.insert((0, p), pg);
    }
    // Unless the chunk count changed, only the pages above changed entries are rewritten.
    let resized = n_new != n_old;
    for level in 0..new_levels {
        let width = ft::pages_at(n_new, level);
        let count_below = if level == 0 {
            n_new
        } else {
            ft::pages_at(n_new, level - 1)
        };
        // The last page of every level is rewritten: it is on the spine, whose position moves
        // whenever the chunk count changes.
        let last = width - 1;
        if level > 0 {
            // Parents of the pages rewritten below, and the last page.
            let mut parents: Vec<u64> = pages
                .keys()
                .filter(|(l, _)| *l == level - 1)
                .map(|(_, p)| p / FANOUT)
                .collect();
            if resized {
                parents.push(last);
            }
            parents.dedup();
            for q in parents {
                let mut pg = get(&pages, old, old_levels, n_old, level, q)?;
                let existed = level < old_levels && q < ft::pages_at(n_old, level);
                let first_child = q * FANOUT;
                let end = ((q + 1) * FANOUT).min(count_below);
                for c in first_child..end {
                    let slot = (c - first_child) as usize * ENTRY_LEN;
                    let child_existed =
                        level - 1 < old_levels && c < ft::pages_at(n_old, level - 1);
                    let h = if let Some(cp) = pages.get(&(level - 1, c)) {
                        Some(key.page(level - 1, c, &cp[..]))
                    } else if !existed && child_existed {
                        // A new parent over an unchanged child (the tree grew a level).
                        let cp = old.page(level - 1, c)?;
                        Some(key.page(level - 1, c, &cp[..]))
                    } else {
                        None
                    };
                    if let Some(h) = h {
                        pg[slot..slot + ENTRY_LEN].copy_from_slice(&h);
                    }
                }
                let keep = (end - first_child) as usize * ENTRY_LEN;
                pg[keep..].fill(0);
                pages.insert((level, q), pg);
            }
        } else if resized {
            let mut pg = get(&pages, old, old_levels, n_old, 0, last)?;
            let keep = (n_new - last * FANOUT) as usize * ENTRY_LEN;
            pg[keep..].fill(0);
            pages.insert((0, last), pg);
        }
    }
    // Pages past the new end (a shrink) are not part of the new tree.
    pages.retain(|&(l, p), _| l < new_levels && p < ft::pages_at(n_new, l));
    let top = new_levels - 1;
    // Nothing changed (an update that rewrote bytes with the same values): the committed top.
    let top_page = match pages.get(&(top, 0)) {
        Some(p) => p.clone(),
        None => get(&pages, old, old_levels, n_old, top, 0)?,
    };
    let root = key.page(top, 0, &top_page[..]);
    Ok((pages, root))
}

/// Bytes read and sealed per step when sealing a whole file.
const SEAL_STEP: usize = 1 << 20;

/// Seal exactly `size` bytes of `src` as a new format-2 file `id`: header and chunks to `data`,
/// the tree pages to `tree`. All chunks share one fresh random epoch. Returns the root.
#[allow(clippy::too_many_arguments)]
pub fn seal_file2<W: Write, T: Write>(
    region: &RegionKey,
    id: &FileId,
    chunk_len: u32,
    size: u64,
    src: &mut impl std::io::Read,
    data: &mut W,
    tree: T,
    label: &str,
) -> Result<([u8; 32], T)> {
    let io = |e: std::io::Error| Error::Io {
        path: label.into(),
        source: e,
    };
    let mut epoch = [0u8; EPOCH_LEN];
    crypto::random_bytes(&mut epoch)?;
    let key = crypto::epoch_chunk_key(region, id, &epoch)?;
    let tkey = crypto::tree_key(region, id)?;
    let n = chunk_count(size, chunk_len);
    let mut builder = TreeBuilder::new(&tkey, n, tree);
    data.write_all(&header2(id)).map_err(io)?;
    let c = chunk_len as usize;
    let per = (SEAL_STEP / c).max(1);
    let mut buf = vec![0u8; per * c];
    let mut i = 0u64;
    let mut left = size;
    loop {
        let take = (left.min((per * c) as u64)) as usize;
        let got = super::read_full(src, &mut buf[..take]).map_err(io)?;
        if got != take {
            return Err(super::changed(label));
        }
        for piece in buf[..take].chunks_mut(c) {
            let tag = seal_chunk2(&key, id, i, piece)?;
            builder.push(&ChunkEntry { epoch, tag }).map_err(io)?;
            i += 1;
        }
        if take == 0 {
            // The one empty chunk of an empty file: only its tag.
            let tag = seal_chunk2(&key, id, 0, &mut [])?;
            builder.push(&ChunkEntry { epoch, tag }).map_err(io)?;
            i += 1;
        }
        data.write_all(&buf[..take]).map_err(io)?;
        left -= take as u64;
        if left == 0 {
            break;
        }
    }
    debug_assert_eq!(i, n);
    let mut probe = [0u8; 1];
    if super::read_full(src, &mut probe).map_err(io)? != 0 {
        return Err(super::changed(label));
    }
    builder.finish().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn entry(i: u64, salt: u8) -> ChunkEntry {
        let mut e = ChunkEntry {
            epoch: [salt; EPOCH_LEN],
            tag: [0; TAG_LEN],
        };
        e.tag[..8].copy_from_slice(&i.to_le_bytes());
        e
    }

    fn build(key: &MacKey, entries: &[ChunkEntry]) -> ([u8; 32], Vec<u8>) {
        let mut b = TreeBuilder::new(key, entries.len() as u64, Vec::new());
        for e in entries {
            b.push(e).unwrap();
        }
        b.finish().unwrap()
    }

    /// An update of any chunks, with any growth or shrink, gives byte for byte the tree a
    /// whole-file build of the new entries gives, and the same root.
    #[test]
    fn an_update_gives_the_tree_a_fresh_build_gives() {
        let key = MacKey([7; 32]);
        let cases: &[(u64, u64, &[u64])] = &[
            (1, 1, &[0]),
            (1, 2, &[]),
            (100, 100, &[3, 99]),
            (128, 129, &[]),
            (129, 128, &[5]),
            (300, 200, &[0, 150]),
            (200, 300, &[199]),
            (128 * 128, 128 * 128 + 1, &[77]),
            (128 * 128 + 1, 127, &[]),
            (5, 128 * 128 * 2 + 3, &[1]),
            (128 * 128 * 2 + 3, 128 * 128, &[128 * 128 - 1]),
            // nothing changed at all (an update that wrote the same bytes)
            (300, 300, &[]),
            (128 * 128 + 5, 128 * 128 + 5, &[]),
        ];
        for &(n_old, n_new, touched) in cases {
            let old: Vec<ChunkEntry> = (0..n_old).map(|i| entry(i, 1)).collect();
            let (root_old, file_old) = build(&key, &old);
            let size_old = n_old * 4096;
            let mut reader = TreeReader::new(
                key.clone(),
                root_old,
                size_old,
                4096,
                file_old.clone(),
                "t".into(),
            )
            .unwrap();
            let mut new: Vec<ChunkEntry> = (0..n_new)
                .map(|i| {
                    if i < n_old {
                        old[i as usize]
                    } else {
                        entry(i, 2)
                    }
                })
                .collect();
            let mut changed = BTreeMap::new();
            for i in n_old..n_new {
                changed.insert(i, new[i as usize]);
            }
            for &i in touched {
                if i < n_new {
                    new[i as usize] = entry(i, 3);
                    changed.insert(i, new[i as usize]);
                }
            }
            let (pages, root) = update_pages(&key, &mut reader, &changed, n_new).unwrap();
            let (root_new, file_new) = build(&key, &new);
            assert_eq!(root, root_new, "root, {n_old} -> {n_new}");
            let mut file = file_old.clone();
            file.resize(ft::tree_pages(n_new) as usize * PAGE_LEN, 0);
            for ((l, p), pg) in &pages {
                let at = ft::page_pos(n_new, *l, *p) as usize * PAGE_LEN;
                file[at..at + PAGE_LEN].copy_from_slice(&pg[..]);
            }
            assert!(file == file_new, "tree bytes, {n_old} -> {n_new}");
            assert!(
                pages.len() as u64
                    <= touched.len() as u64
                        + (n_new.saturating_sub(n_old))
                        + 2 * u64::from(ft::levels(n_new))
                        + 2,
                "{} pages rewritten for {n_old} -> {n_new}",
                pages.len()
            );
        }
    }

    /// Counts the reads of a tree file.
    struct Counted(Vec<u8>, std::sync::atomic::AtomicUsize);

    impl ReadAt for Counted {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.read_at(buf, offset)
        }
        fn len(&self) -> std::io::Result<u64> {
            Ok(self.0.len() as u64)
        }
    }

    /// Random reads over a 1 GiB file (2 048 leaf pages) kept 512 verified pages and, when full,
    /// dropped every leaf: three reads in four read and hashed a tree page again. The whole tree
    /// of a file of up to 2 GiB now stays: a second pass over every chunk reads no page.
    #[test]
    fn random_reads_over_a_large_file_thrashed_the_tree_page_cache() {
        let key = MacKey([3; 32]);
        let n = 2048 * FANOUT;
        let entries: Vec<ChunkEntry> = (0..n).map(|i| entry(i, 1)).collect();
        let (root, file) = build(&key, &entries);
        let counted = Counted(file, Default::default());
        let mut t = TreeReader::new(key, root, n * 4096, 4096, counted, "t".into()).unwrap();
        let mut order: Vec<u64> = (0..n).step_by(61).collect();
        let mut st = 7u64;
        for i in (1..order.len()).rev() {
            st = st
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            order.swap(i, (st >> 33) as usize % (i + 1));
        }
        for &i in &order {
            assert_eq!(t.entry(i).unwrap(), entries[i as usize]);
        }
        let first = t.file.1.load(std::sync::atomic::Ordering::Relaxed);
        assert!(first <= 2048 + 16 + 1, "{first} page reads for 2 065 pages");
        for &i in order.iter().rev() {
            assert_eq!(t.entry(i).unwrap(), entries[i as usize]);
        }
        let second = t.file.1.load(std::sync::atomic::Ordering::Relaxed) - first;
        assert_eq!(second, 0, "a second pass read {second} pages again");
    }

    #[test]
    fn a_page_swapped_rolled_back_or_flipped_is_refused() {
        let key = MacKey([9; 32]);
        let n = 128 * 3 + 1;
        let entries: Vec<ChunkEntry> = (0..n).map(|i| entry(i, 1)).collect();
        let (root, file) = build(&key, &entries);
        let open = |f: Vec<u8>| TreeReader::new(key.clone(), root, n * 4096, 4096, f, "t".into());
        assert_eq!(
            open(file.clone()).unwrap().entry(200).unwrap(),
            entries[200]
        );
        // swap level-0 pages 0 and 1
        let mut f = file.clone();
        let (a, b) = (
            PAGE_LEN * ft::page_pos(n, 0, 0) as usize,
            PAGE_LEN * ft::page_pos(n, 0, 1) as usize,
        );
        let pa = f[a..a + PAGE_LEN].to_vec();
        let pb = f[b..b + PAGE_LEN].to_vec();
        f[a..a + PAGE_LEN].copy_from_slice(&pb);
        f[b..b + PAGE_LEN].copy_from_slice(&pa);
        assert!(matches!(
            open(f).unwrap().entry(0),
            Err(Error::TreeAuth { .. })
        ));
        // one flipped bit in the top page
        let mut f = file.clone();
        let top = PAGE_LEN * ft::page_pos(n, 1, 0) as usize;
        f[top + 5] ^= 1;
        assert!(open(f).unwrap().entry(3).is_err());
        // a page rolled back to an older tree's copy
        let mut older = entries.clone();
        older[130] = entry(130, 9);
        let (_, old_file) = build(&key, &older);
        let mut f = file.clone();
        f[b..b + PAGE_LEN].copy_from_slice(&old_file[b..b + PAGE_LEN]);
        assert!(open(f.clone()).unwrap().entry(130).is_err());
        // a truncated or extended tree
        assert!(matches!(
            open(file[..file.len() - 1].to_vec()),
            Err(Error::TreeSize { .. })
        ));
    }
}

//! Encrypted-file format 2: where chunks and chunk-tree pages live (pure arithmetic, no I/O).
//! Normative description: docs/FORMAT.md §4a.
//!
//! A format-2 file of `size` bytes has `n = chunk_count(size)` chunks stored as bare ciphertext
//! (no per-chunk tag) after a 24-byte header: chunk `i` at `ENC_HEADER_LEN + i * C`. Each chunk's
//! 32-byte *entry* (the 16-byte epoch its key was derived from and its 16-byte GCM tag) sits in a
//! page of the **chunk tree**, a tree of 4 KiB pages with 128 entries each: level 0 holds the
//! chunk entries, level `l + 1` the 32-byte hashes of the pages of level `l`, up to the first
//! level with a single page (the *top*), whose hash is the root recorded in the fspf.
//!
//! The tree file stores the pages so that appending chunks moves none of them: a page whose
//! subtree is complete (all `128^(l+1)` chunks it covers exist) sits at its position in the
//! post-order of complete pages, which never changes as the file grows; the at most one
//! incomplete page per level (the right spine) follows them, lowest level first. An update of
//! `k` chunks therefore rewrites at most `k + levels` pages in place, and an append rewrites the
//! spine: `O(k + log n)`.
use super::layout::{chunk_count, ENC_HEADER_LEN};

/// Magic of a format-2 encrypted file ("fspfE", format 2, two zero bytes).
pub const ENC2_MAGIC: [u8; 8] = *b"fspfE\x02\0\0";
/// Bytes per tree page.
pub const PAGE_LEN: usize = 4096;
/// Bytes per entry (chunk entry or page hash).
pub const ENTRY_LEN: usize = 32;
/// Entries per page.
pub const FANOUT: u64 = (PAGE_LEN / ENTRY_LEN) as u64;

/// Files of more than this many chunks are written in format 2 by the frontends; smaller ones
/// in format 1, which needs no tree file (a rewrite of at most 16 chunks costs what an update of
/// them would).
pub const FORMAT2_MIN_CHUNKS: u64 = 16;

/// `FANOUT^(level + 1)`: chunks covered by one page of `level` (saturating).
fn span(level: u32) -> u64 {
    FANOUT.saturating_pow(level + 1)
}

/// Offset of chunk `index` in a format-2 file (`None` if it does not fit in a u64).
pub fn chunk_offset(chunk_len: u32, index: u64) -> Option<u64> {
    index
        .checked_mul(u64::from(chunk_len))?
        .checked_add(ENC_HEADER_LEN)
}

/// Length on disk of a format-2 file of `size` plaintext bytes.
pub fn data_len(size: u64) -> Option<u64> {
    size.checked_add(ENC_HEADER_LEN)
}

/// Number of levels of the chunk tree over `n` chunks (at least 1).
pub fn levels(n: u64) -> u32 {
    let mut l = 1;
    while span(l - 1) < n {
        l += 1;
    }
    l
}

/// Number of pages of `level` over `n` chunks.
pub fn pages_at(n: u64, level: u32) -> u64 {
    n.div_ceil(span(level)).max(1)
}

/// Number of complete pages of `level` (those whose whole subtree exists).
fn complete_at(n: u64, level: u32) -> u64 {
    n / span(level)
}

/// Post-order position of level-0 page `q` among complete pages: `q` plus the complete pages
/// of upper levels that end before it.
fn post0(q: u64) -> u64 {
    let mut pos = q;
    let mut f = FANOUT;
    while f <= q {
        pos += q / f;
        f = f.saturating_mul(FANOUT);
    }
    pos
}

/// Position (in pages) of page `p` of `level` in the tree file of a tree over `n` chunks; the
/// page must exist (`level < levels(n)`, `p < pages_at(n, level)`).
pub fn page_pos(n: u64, level: u32, p: u64) -> u64 {
    if p < complete_at(n, level) {
        // After its last level-0 descendant and the complete pages of levels 1..level that end
        // with it.
        let last = (p + 1) * FANOUT.pow(level) - 1;
        return post0(last) + u64::from(level);
    }
    let complete: u64 = (0..levels(n)).map(|l| complete_at(n, l)).sum();
    let spine_below = (0..level).filter(|&l| has_partial(n, l)).count() as u64;
    complete + spine_below
}

/// Does `level` end with an incomplete page?
fn has_partial(n: u64, level: u32) -> bool {
    !n.is_multiple_of(span(level))
}

/// Number of pages in the tree file of a tree over `n` chunks.
pub fn tree_pages(n: u64) -> u64 {
    (0..levels(n))
        .map(|l| complete_at(n, l) + u64::from(has_partial(n, l)))
        .sum()
}

/// Length in bytes of the tree file of a file of `size` bytes in chunks of `chunk_len`.
pub fn tree_len(size: u64, chunk_len: u32) -> u64 {
    tree_pages(chunk_count(size, chunk_len)) * PAGE_LEN as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: lay out all pages by walking the tree in post-order (complete pages) and then
    /// the spine, as FORMAT.md §4a describes it.
    fn reference(n: u64) -> Vec<(u32, u64)> {
        let top = levels(n) - 1;
        let mut complete = Vec::new();
        fn walk(n: u64, l: u32, p: u64, out: &mut Vec<(u32, u64)>) {
            if l > 0 {
                for c in p * FANOUT..((p + 1) * FANOUT).min(pages_at(n, l - 1)) {
                    walk(n, l - 1, c, out);
                }
            }
            if (p + 1) * span(l) <= n {
                out.push((l, p));
            }
        }
        walk(n, top, 0, &mut complete);
        for l in 0..=top {
            if !n.is_multiple_of(span(l)) {
                complete.push((l, pages_at(n, l) - 1));
            }
        }
        complete
    }

    #[test]
    fn page_positions_follow_the_post_order_of_complete_pages_then_the_spine() {
        for n in [
            1,
            2,
            127,
            128,
            129,
            255,
            256,
            128 * 128 - 1,
            128 * 128,
            128 * 128 + 1,
            128 * 128 * 3 + 5,
        ] {
            let order = reference(n);
            assert_eq!(order.len() as u64, tree_pages(n), "n = {n}");
            for (pos, (l, p)) in order.iter().enumerate() {
                assert_eq!(page_pos(n, *l, *p), pos as u64, "n = {n}, page ({l}, {p})");
            }
        }
    }

    #[test]
    fn appending_moves_no_complete_page() {
        for n in [1u64, 100, 128, 300, 128 * 128, 128 * 130] {
            for (l, p) in reference(n) {
                if (p + 1) * span(l) <= n {
                    assert_eq!(page_pos(n, l, p), page_pos(n + 1, l, p));
                    assert_eq!(page_pos(n, l, p), page_pos(n * 3, l, p));
                }
            }
        }
    }

    #[test]
    fn worked_sizes() {
        // FORMAT.md §4a: C = 4096.
        assert_eq!(tree_len(0, 4096), 4096);
        assert_eq!(tree_len(4096 * 128, 4096), 4096);
        assert_eq!(tree_len(4096 * 128 + 1, 4096), 3 * 4096);
        // 1 GiB: 262 144 chunks, 2 048 level-0 pages, 16 level-1 pages, one level-2 page.
        assert_eq!(levels(262_144), 3);
        assert_eq!(tree_len(1 << 30, 4096), (2048 + 16 + 1) * 4096);
        assert_eq!(data_len(1 << 30), Some((1 << 30) + 24));
    }
}

//! Chunk layout and size arithmetic for protected files (pure; heavily unit-tested).
//!
//! A file of `size` plaintext bytes is cut into `n = max(1, ceil(size / C))` chunks of `C` bytes,
//! the last one holding the remainder (a full chunk when `size` is a positive multiple of `C`, and
//! an empty chunk when `size` is 0). Encrypted files on disk are
//! `ENC_HEADER_LEN + size + n * TAG_LEN` bytes: header, then each chunk's ciphertext followed by its tag.
use crate::crypto::{FILE_ID_LEN, TAG_LEN};

/// Magic at the start of every encrypted file ("fspfE" + format 1 + two zero bytes).
pub const ENC_MAGIC: [u8; 8] = *b"fspfE\x01\0\0";
/// Encrypted file header: magic + file id.
pub const ENC_HEADER_LEN: u64 = (ENC_MAGIC.len() + FILE_ID_LEN) as u64;
/// Default chunk length of authenticated (and not-protected) regions: 64 KiB. Verifying a chunk
/// costs one leaf hash plus one 32-byte outboard read per tree level, so small chunks would make
/// sequential reads of authenticated files pay those reads 16 times as often.
pub const DEFAULT_CHUNK_LEN: u32 = 64 * 1024;
/// Default chunk length of encrypted regions: 4 KiB. A random 4 KiB read then decrypts 4 KiB, not
/// 64 KiB; sequential reads keep their speed because the reader loads many consecutive chunks
/// with one `pread` and verifies them on two threads (`codec::ProtectedReader`). Costs 16 bytes
/// of tag per 4 KiB on disk (0.39 %). Measured in bench/RESULTS.md.
pub const DEFAULT_CHUNK_LEN_ENCRYPTED: u32 = 4 * 1024;
pub const MIN_CHUNK_LEN: u32 = 512;
pub const MAX_CHUNK_LEN: u32 = 16 * 1024 * 1024;
/// Largest plaintext size of a file: `i64::MAX`, the largest `off_t`. Parsing refuses larger
/// sizes, and with it every length and offset here fits in a `u64` (even at 512-byte chunks the
/// encrypted form adds only 1/32).
pub const MAX_FILE_SIZE: u64 = i64::MAX as u64;
/// Merkle node size for authenticated files.
pub const NODE_LEN: u64 = 32;

/// Number of chunks of a file of `size` bytes (`chunk_len` is at least [`MIN_CHUNK_LEN`] in every
/// validated region; 0 is treated as 1 so this never divides by zero).
pub fn chunk_count(size: u64, chunk_len: u32) -> u64 {
    if size == 0 {
        1
    } else {
        size.div_ceil(u64::from(chunk_len.max(1)))
    }
}

/// Plaintext length of chunk `index` (0 past the end).
pub fn chunk_plain_len(size: u64, chunk_len: u32, index: u64) -> u64 {
    let c = u64::from(chunk_len);
    match index.checked_mul(c) {
        Some(start) if start < size => (size - start).min(c),
        _ => 0,
    }
}

/// Offset of chunk `index` in an encrypted file; `None` if it does not fit in a u64.
pub fn enc_chunk_offset(chunk_len: u32, index: u64) -> Option<u64> {
    index
        .checked_mul(u64::from(chunk_len) + TAG_LEN as u64)?
        .checked_add(ENC_HEADER_LEN)
}

/// Size on disk of an encrypted file holding `size` plaintext bytes; `None` if it does not fit
/// in a u64 (such a size cannot be stored, and [`Metadata`](super::metadata::Metadata) refuses it).
pub fn enc_file_len(size: u64, chunk_len: u32) -> Option<u64> {
    chunk_count(size, chunk_len)
        .checked_mul(TAG_LEN as u64)?
        .checked_add(size)?
        .checked_add(ENC_HEADER_LEN)
}

/// Node counts of the Merkle levels stored in an outboard (leaves first, root excluded).
pub fn merkle_levels(leaves: u64) -> Vec<u64> {
    let mut levels = Vec::new();
    let mut n = leaves;
    while n > 1 {
        levels.push(n);
        n = n.div_ceil(2);
    }
    levels
}

/// Size of the outboard tree of a file with `leaves` chunks (0 for a single chunk: root = leaf);
/// `None` if it does not fit in a u64.
pub fn outboard_len(leaves: u64) -> Option<u64> {
    merkle_levels(leaves)
        .into_iter()
        .try_fold(0u64, |acc, w| acc.checked_add(w))?
        .checked_mul(NODE_LEN)
}

/// Can a file of `size` bytes be stored in a region with `chunk_len`, encrypted (header, size and
/// one tag per chunk) and authenticated (size and outboard), with every offset in a u64?
pub fn size_fits(size: u64, chunk_len: u32) -> bool {
    enc_file_len(size, chunk_len).is_some() && outboard_len(chunk_count(size, chunk_len)).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    const C: u32 = 4096;
    #[test]
    fn worked_sizes_match_format_md() {
        // docs/FORMAT.md §Sizes, chunk length 4096
        assert_eq!(enc_file_len(0, C).unwrap(), 24 + 16);
        assert_eq!(enc_file_len(1, C).unwrap(), 24 + 1 + 16);
        assert_eq!(enc_file_len(4096, C).unwrap(), 24 + 4096 + 16);
        assert_eq!(enc_file_len(4097, C).unwrap(), 24 + 4097 + 32);
        assert_eq!(
            enc_file_len(1 << 30, 65536).unwrap(),
            24 + (1 << 30) + 16384 * 16
        );
    }
    #[test]
    fn worked_sizes_at_default_encrypted_chunk_len_match_format_md() {
        // docs/FORMAT.md §4 "Worked sizes", encrypted, C = 4096
        let c = DEFAULT_CHUNK_LEN_ENCRYPTED;
        assert_eq!(c, 4096);
        let gib = 1u64 << 30;
        assert_eq!(
            [0, 4096, 4097, gib].map(|s| chunk_count(s, c)),
            [1, 1, 2, 262_144]
        );
        assert_eq!(enc_file_len(0, c).unwrap(), 40);
        assert_eq!(enc_file_len(4096, c).unwrap(), 4136);
        assert_eq!(enc_file_len(4097, c).unwrap(), 4153);
        assert_eq!(enc_file_len(gib, c).unwrap(), 1_077_936_152);
    }
    #[test]
    fn worked_sizes_at_default_chunk_len_match_format_md() {
        // docs/FORMAT.md §4 "Worked sizes", C = 65536 (authenticated default)
        let c = DEFAULT_CHUNK_LEN;
        assert_eq!(c, 65536);
        let gib = 1u64 << 30;
        assert_eq!(
            [0, 1, 65536, 65537, gib].map(|s| chunk_count(s, c)),
            [1, 1, 1, 2, 16384]
        );
        assert_eq!(enc_file_len(0, c).unwrap(), 40);
        assert_eq!(enc_file_len(1, c).unwrap(), 41);
        assert_eq!(enc_file_len(65536, c).unwrap(), 65576);
        assert_eq!(enc_file_len(65537, c).unwrap(), 65593);
        assert_eq!(enc_file_len(gib, c).unwrap(), 1_074_003_992);
        assert_eq!(chunk_plain_len(65537, c, 1), 1);
        assert_eq!(outboard_len(chunk_count(65536, c)).unwrap(), 0);
        assert_eq!(outboard_len(chunk_count(65537, c)).unwrap(), 64);
        assert_eq!(outboard_len(chunk_count(gib, c)).unwrap(), 32766 * 32);
        assert_eq!(outboard_len(chunk_count(gib, c)).unwrap(), 1_048_512);
        // a random read of a 10 GiB file needs one 32-byte sibling per level
        assert_eq!(merkle_levels(chunk_count(10 * gib, c)).len(), 18);
    }
    #[test]
    fn chunk_counts_and_lengths() {
        assert_eq!(chunk_count(0, C), 1);
        assert_eq!(chunk_count(1, C), 1);
        assert_eq!(chunk_count(4096, C), 1);
        assert_eq!(chunk_count(4097, C), 2);
        assert_eq!(chunk_plain_len(4097, C, 0), 4096);
        assert_eq!(chunk_plain_len(4097, C, 1), 1);
        assert_eq!(chunk_plain_len(0, C, 0), 0);
        assert_eq!(enc_chunk_offset(C, 1), Some(24 + 4112));
    }
    #[test]
    fn outboard_sizes() {
        assert_eq!(outboard_len(1).unwrap(), 0);
        assert_eq!(outboard_len(2).unwrap(), 64);
        assert_eq!(merkle_levels(5), vec![5, 3, 2]);
        assert_eq!(outboard_len(5).unwrap(), (5 + 3 + 2) * 32);
    }
    /// Regression: `enc_file_len` (and the other size functions) used unchecked arithmetic and
    /// overflowed for sizes near u64::MAX.
    #[test]
    fn enc_file_len_overflowed_for_huge_sizes() {
        assert_eq!(enc_file_len(u64::MAX, C), None);
        assert_eq!(enc_file_len(u64::MAX - ENC_HEADER_LEN, MAX_CHUNK_LEN), None);
        // 2^64 / 528 * 512 bytes at 512-byte chunks: the tags push it over.
        assert_eq!(
            enc_file_len(u64::MAX / 528 * 512 + 512, MIN_CHUNK_LEN),
            None
        );
        let fits = u64::MAX / 528 * 512 - 1024;
        assert!(enc_file_len(fits, MIN_CHUNK_LEN).is_some());
        assert!(size_fits(fits, MIN_CHUNK_LEN));
        assert!(!size_fits(u64::MAX, MAX_CHUNK_LEN));
        assert_eq!(enc_chunk_offset(C, u64::MAX / 4000), None);
        assert_eq!(enc_chunk_offset(C, u64::MAX), None);
        assert_eq!(chunk_plain_len(u64::MAX, C, u64::MAX), 0);
        assert_eq!(chunk_plain_len(u64::MAX, C, u64::MAX / 4096), 4095);
        assert_eq!(outboard_len(u64::MAX), None);
        assert_eq!(outboard_len(u64::MAX / 32), None);
        assert!(outboard_len(u64::MAX / 128).is_some());
        assert_eq!(chunk_count(u64::MAX, 0), u64::MAX);
    }
}

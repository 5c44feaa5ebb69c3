//! `FSPF.log`: the sealed, hash-chained log of metadata changes after a checkpoint (FORMAT.md
//! §5c). Framing and associated data only; no I/O, no keys.
//!
//! ```text
//! header   "FSPFLOG" 0x05 (8) | tag of the checkpoint (the FSPF file) it continues (16)
//!          (0x04: records carry no files; 0x03: records carry no journals either)
//! record   n u32 LE | nonce (12) | AES-256-GCM ciphertext (n) | GCM tag (16) | check (8)
//!          AAD   = "FSPFLOG" 0x03 || tag of the previous record (the checkpoint's for the
//!                  first) || n u32 LE  (the same in both versions)
//!          check = BLAKE3 (unkeyed) of the record's n + 32 bytes before it, first 8 bytes:
//!                  tells a torn append from a complete record without the key
//! ```
use crate::crypto::{Tag, NONCE_LEN, TAG_LEN};

/// Magic of the logs this version writes: records may carry update journals and small files
/// (FORMAT.md §5c).
pub const LOG_MAGIC: [u8; 8] = *b"FSPFLOG\x05";
/// Magic of a log written before records carried files: still read, and continued without
/// files (a reader of that version would not know them).
pub const LOG_MAGIC_V4: [u8; 8] = *b"FSPFLOG\x04";
/// Magic of a log written before records carried journals: still read, and continued without
/// journals (a reader of that version would not apply them).
pub const LOG_MAGIC_V3: [u8; 8] = *b"FSPFLOG\x03";
/// The associated data's prefix (the version-3 magic, in both versions).
const AAD_MAGIC: [u8; 8] = LOG_MAGIC_V3;
pub const LOG_HEADER_LEN: usize = 24;
/// Bytes of a record besides its ciphertext: length, nonce, GCM tag, check.
pub const RECORD_OVERHEAD: usize = 4 + NONCE_LEN + TAG_LEN + CHECK_LEN;
const CHECK_LEN: usize = 8;

/// Where the GCM tag (the state's tag) of the record ending at `end` lies: just before its
/// check.
pub fn tag_range(end: usize) -> Option<std::ops::Range<usize>> {
    let to = end.checked_sub(CHECK_LEN)?;
    Some(to.checked_sub(TAG_LEN)?..to)
}
/// Largest ciphertext of one record (a commit listing this much is sealed as a checkpoint).
pub const MAX_RECORD: usize = 64 << 20;

/// The header of a log continuing the checkpoint with tag `base`.
pub fn header(base: &Tag) -> [u8; LOG_HEADER_LEN] {
    let mut h = [0u8; LOG_HEADER_LEN];
    h[..8].copy_from_slice(&LOG_MAGIC);
    h[8..].copy_from_slice(&base.0);
    h
}

/// The checkpoint tag a log's header names, if `bytes` start with a log header (either
/// version).
pub fn parse_header(bytes: &[u8]) -> Option<Tag> {
    header_version(bytes)?;
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(bytes.get(8..LOG_HEADER_LEN)?);
    Some(Tag(t))
}

/// The version of a log header (3, 4 or 5), if `bytes` start with one.
pub fn header_version(bytes: &[u8]) -> Option<u8> {
    let h = bytes.get(..LOG_HEADER_LEN)?;
    if h[..8] == LOG_MAGIC {
        Some(5)
    } else if h[..8] == LOG_MAGIC_V4 {
        Some(4)
    } else if h[..8] == LOG_MAGIC_V3 {
        Some(3)
    } else {
        None
    }
}

/// Associated data of a record of `n` ciphertext bytes following the state with tag `prev`.
pub fn aad(prev: &Tag, n: u32) -> [u8; 8 + TAG_LEN + 4] {
    let mut a = [0u8; 8 + TAG_LEN + 4];
    a[..8].copy_from_slice(&AAD_MAGIC);
    a[8..8 + TAG_LEN].copy_from_slice(&prev.0);
    a[8 + TAG_LEN..].copy_from_slice(&n.to_le_bytes());
    a
}

fn check(bytes: &[u8]) -> [u8; CHECK_LEN] {
    let h = blake3::hash(bytes);
    let mut c = [0u8; CHECK_LEN];
    c.copy_from_slice(&h.as_bytes()[..CHECK_LEN]);
    c
}

/// A whole record: `n`, `nonce`, the sealed ciphertext with its GCM tag appended (`sealed`),
/// and the check.
pub fn encode_record(nonce: &[u8; NONCE_LEN], sealed: &[u8]) -> Vec<u8> {
    let n = (sealed.len() - TAG_LEN) as u32;
    let mut r = Vec::with_capacity(sealed.len() + 4 + NONCE_LEN + CHECK_LEN);
    r.extend_from_slice(&n.to_le_bytes());
    r.extend_from_slice(nonce);
    r.extend_from_slice(sealed);
    let c = check(&r);
    r.extend_from_slice(&c);
    r
}

/// One complete record found in a log (its check matches), located in the bytes given to
/// [`frames`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Where the record starts and ends (offsets into the bytes walked).
    pub start: usize,
    pub end: usize,
    pub n: u32,
    pub nonce: [u8; NONCE_LEN],
    /// The GCM tag: the tag of the state after this record.
    pub tag: Tag,
}

impl Frame {
    /// The ciphertext and GCM tag within the walked bytes.
    pub fn sealed(&self) -> std::ops::Range<usize> {
        self.start + 4 + NONCE_LEN..self.end - CHECK_LEN
    }
}

/// The complete records of `bytes` from offset `from` on, in order, up to the first that is
/// incomplete or fails its check (a torn append; everything after it is ignored). Nothing is
/// authenticated here: a caller with the key opens each frame with [`aad`] of its predecessor.
pub fn frames(bytes: &[u8], from: usize) -> impl Iterator<Item = Frame> + '_ {
    let mut at = from;
    std::iter::from_fn(move || {
        let rest = bytes.get(at..)?;
        let n = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
        if n as usize > MAX_RECORD {
            return None;
        }
        let body = 4 + NONCE_LEN + n as usize + TAG_LEN;
        let whole = rest.get(..body + CHECK_LEN)?;
        if check(&whole[..body]) != whole[body..] {
            return None;
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&whole[4..4 + NONCE_LEN]);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&whole[body - TAG_LEN..body]);
        let f = Frame {
            start: at,
            end: at + body + CHECK_LEN,
            n,
            nonce,
            tag: Tag(tag),
        };
        at = f.end;
        Some(f)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(fill: u8, n: usize) -> Vec<u8> {
        let mut sealed = vec![fill; n + TAG_LEN];
        sealed[n..].fill(fill ^ 0x55);
        encode_record(&[fill; NONCE_LEN], &sealed)
    }

    #[test]
    fn frames_walk_complete_records_and_stop_at_a_torn_one() {
        let mut log = header(&Tag([9; 16])).to_vec();
        log.extend(rec(1, 10));
        log.extend(rec(2, 0));
        let whole = log.len();
        log.extend(rec(3, 100));
        let f: Vec<Frame> = frames(&log, LOG_HEADER_LEN).collect();
        assert_eq!(f.len(), 3);
        assert_eq!(f[0].start, LOG_HEADER_LEN);
        assert_eq!(f[1].tag, Tag([2 ^ 0x55; 16]));
        assert_eq!(f[2].end, log.len());
        assert_eq!(log[f[0].sealed()].len(), 10 + TAG_LEN);
        // Torn anywhere in the last record: the first two remain.
        for cut in whole..log.len() {
            assert_eq!(
                frames(&log[..cut], LOG_HEADER_LEN).count(),
                2,
                "cut at {cut}"
            );
        }
        // A flipped byte fails the check: that record and the rest are not complete records.
        let mut bad = log.clone();
        bad[LOG_HEADER_LEN + 20] ^= 1;
        assert_eq!(frames(&bad, LOG_HEADER_LEN).count(), 0);
        assert_eq!(parse_header(&log), Some(Tag([9; 16])));
        assert_eq!(parse_header(&log[..23]), None);
        assert_eq!(parse_header(b"FSPFLOG\x02aaaaaaaaaaaaaaaa"), None);
        assert_eq!(header_version(&log), Some(5));
        let mut v4 = log.clone();
        v4[..8].copy_from_slice(&LOG_MAGIC_V4);
        assert_eq!(header_version(&v4), Some(4));
        assert_eq!(parse_header(&v4), Some(Tag([9; 16])));
        let mut v3 = log.clone();
        v3[..8].copy_from_slice(&LOG_MAGIC_V3);
        assert_eq!(header_version(&v3), Some(3));
        assert_eq!(parse_header(&v3), Some(Tag([9; 16])));
    }

    #[test]
    fn the_aad_binds_predecessor_and_length() {
        assert_ne!(aad(&Tag([1; 16]), 5), aad(&Tag([2; 16]), 5));
        assert_ne!(aad(&Tag([1; 16]), 5), aad(&Tag([1; 16]), 6));
    }
}

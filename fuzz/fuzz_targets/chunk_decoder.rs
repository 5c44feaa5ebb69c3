//! The chunk decoder (`codec::ProtectedReader`) of encrypted and authenticated files.
//!
//! A file is sealed exactly as a writer seals it (fixed region key, file id from the input), then
//! the fuzzer's mutations are applied to the bytes on disk and to the Merkle outboard: bit flips,
//! byte stores, truncation, extension, insertion, deletion, copies within the file, chunk swaps,
//! splices from another version of a file sealed under the same region key, or raw fuzzer bytes
//! as the whole file. Then a sequence of reads (random offsets and lengths, on one reader, so the
//! readahead window is exercised), `copy_to`, `for_each_verified` and `verify_all`.
//!
//! Must never panic and never return a byte that differs from the original plaintext: every
//! read either fails or returns exactly the original bytes. Unmutated files must read back whole,
//! and a mutation that changed any byte must make `verify_all` (or the open) fail.
#![no_main]

use arbitrary::Arbitrary;
use fspf_core::codec::{
    seal_authenticated, seal_encrypted, set_read_threads, FileCodec, ProtectedReader,
};
use fspf_core::crypto::{file_chunk_key, file_mac_key, FileId, RegionKey};
use libfuzzer_sys::fuzz_target;
use std::sync::Mutex;

type Reader = ProtectedReader<Vec<u8>, Vec<u8>>;

#[derive(Debug, Arbitrary)]
enum ChunkLen {
    Min,
    Odd(u16),
    Page,
}

#[derive(Debug, Arbitrary)]
enum Mutation {
    Flip {
        pos: u32,
        bit: u8,
    },
    Store {
        pos: u32,
        byte: u8,
    },
    Truncate {
        len: u32,
    },
    Append {
        bytes: Vec<u8>,
    },
    Insert {
        pos: u32,
        bytes: Vec<u8>,
    },
    Delete {
        pos: u32,
        len: u16,
    },
    /// Copy a range of the file over another place of itself (chunks moved within a file).
    CopyWithin {
        from: u32,
        to: u32,
        len: u16,
    },
    /// Swap two whole chunk slots (ciphertext + tag, or plaintext).
    SwapChunks {
        a: u16,
        b: u16,
    },
    /// Bytes of the other version (other id, other content, same region key) at the same offset.
    SpliceOther {
        pos: u32,
        len: u16,
    },
    /// The other version's bytes as the whole file (and its outboard).
    ReplaceWithOther,
    /// Raw fuzzer bytes as the whole file.
    Replace {
        bytes: Vec<u8>,
    },
    FlipOutboard {
        pos: u32,
        bit: u8,
    },
    TruncateOutboard {
        len: u32,
    },
    DropOutboard,
}

#[derive(Debug, Arbitrary)]
enum Access {
    Read {
        offset: u32,
        len: u16,
    },
    /// A read near the end of the file (offset counted back from the size).
    ReadTail {
        back: u16,
        len: u16,
    },
    Big {
        offset: u32,
        len: u32,
    },
    CopyTo,
    ForEach {
        block: u16,
    },
    VerifyAll,
}

#[derive(Debug, Arbitrary)]
struct Input {
    encrypted: bool,
    key_len: u8,
    chunk_len: ChunkLen,
    size: u32,
    seed: u64,
    id: [u8; 16],
    threads: bool,
    mutations: Vec<Mutation>,
    accesses: Vec<Access>,
}

/// Plaintext, the bytes on disk and the outboard of one sealed version.
struct Sealed {
    plain: Vec<u8>,
    disk: Vec<u8>,
    outboard: Vec<u8>,
    root: [u8; 32],
}

fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn seal(encrypted: bool, key: &RegionKey, id: &FileId, c: u32, plain: Vec<u8>) -> Sealed {
    let size = plain.len() as u64;
    if encrypted {
        let k = file_chunk_key(key, id).expect("chunk key");
        let mut disk = Vec::new();
        seal_encrypted(&k, id, c, size, &mut &plain[..], &mut disk, "f").expect("seal");
        Sealed {
            plain,
            disk,
            outboard: Vec::new(),
            root: [0; 32],
        }
    } else {
        let k = file_mac_key(key, id).expect("mac key");
        let (root, outboard) =
            seal_authenticated(&k, c, size, &mut &plain[..], None, "f").expect("seal");
        Sealed {
            disk: plain.clone(),
            plain,
            outboard,
            root,
        }
    }
}

fn at(pos: u32, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        pos as usize % len
    }
}

/// Apply `m`; chunk slots (`slot` bytes each) start at `header`.
fn mutate(
    disk: &mut Vec<u8>,
    outboard: &mut Vec<u8>,
    m: &Mutation,
    other: &Sealed,
    slot: usize,
    header: usize,
) {
    match m {
        Mutation::Flip { pos, bit } => {
            if !disk.is_empty() {
                let i = at(*pos, disk.len());
                disk[i] ^= 1 << (bit % 8);
            }
        }
        Mutation::Store { pos, byte } => {
            if !disk.is_empty() {
                let i = at(*pos, disk.len());
                disk[i] = *byte;
            }
        }
        Mutation::Truncate { len } => {
            let l = at(*len, disk.len() + 1);
            disk.truncate(l);
        }
        Mutation::Append { bytes } => disk.extend_from_slice(bytes),
        Mutation::Insert { pos, bytes } => {
            let i = at(*pos, disk.len() + 1);
            disk.splice(i..i, bytes.iter().copied());
        }
        Mutation::Delete { pos, len } => {
            let i = at(*pos, disk.len() + 1);
            let e = (i + *len as usize).min(disk.len());
            disk.drain(i..e);
        }
        Mutation::CopyWithin { from, to, len } => {
            let f = at(*from, disk.len());
            let t = at(*to, disk.len());
            let l = (*len as usize).min(disk.len() - f.max(t));
            disk.copy_within(f..f + l, t);
        }
        Mutation::SwapChunks { a, b } => {
            let body = disk.get_mut(header..).unwrap_or_default();
            let n = body.len() / slot;
            if n >= 2 {
                let (a, b) = (*a as usize % n, *b as usize % n);
                let (lo, hi) = (a.min(b), a.max(b));
                if lo != hi {
                    let (x, y) = body.split_at_mut(hi * slot);
                    x[lo * slot..(lo + 1) * slot].swap_with_slice(&mut y[..slot]);
                }
            }
        }
        Mutation::SpliceOther { pos, len } => {
            let i = at(*pos, disk.len().min(other.disk.len()));
            let e = (i + *len as usize).min(disk.len()).min(other.disk.len());
            disk[i..e].copy_from_slice(&other.disk[i..e]);
        }
        Mutation::ReplaceWithOther => {
            *disk = other.disk.clone();
            *outboard = other.outboard.clone();
        }
        Mutation::Replace { bytes } => *disk = bytes.clone(),
        Mutation::FlipOutboard { pos, bit } => {
            if !outboard.is_empty() {
                let i = at(*pos, outboard.len());
                outboard[i] ^= 1 << (bit % 8);
            }
        }
        Mutation::TruncateOutboard { len } => {
            let l = at(*len, outboard.len() + 1);
            outboard.truncate(l);
        }
        Mutation::DropOutboard => outboard.clear(),
    }
}

fn reader(
    encrypted: bool,
    key: &RegionKey,
    id: &FileId,
    s: &Sealed,
    c: u32,
    disk: Vec<u8>,
    outboard: Vec<u8>,
) -> fspf_core::Result<Reader> {
    let codec = if encrypted {
        FileCodec::Encrypted {
            key: file_chunk_key(key, id).expect("chunk key"),
            id: *id,
            data: disk,
        }
    } else {
        FileCodec::Authenticated {
            key: file_mac_key(key, id).expect("mac key"),
            root: s.root,
            data: disk,
            outboard: (!outboard.is_empty()).then_some(outboard),
        }
    };
    ProtectedReader::new(codec, s.plain.len() as u64, c, "f".into())
}

/// `got` read at `offset` must be exactly the original bytes there.
fn same(plain: &[u8], offset: u64, got: &[u8]) {
    let start = (offset as usize).min(plain.len());
    assert!(start + got.len() <= plain.len(), "read past the end");
    assert!(
        plain[start..start + got.len()] == *got,
        "wrong plaintext served at offset {offset} ({} bytes)",
        got.len()
    );
}

fuzz_target!(|input: Input| {
    let c = match input.chunk_len {
        ChunkLen::Min => 512,
        ChunkLen::Odd(x) => 512 + (x as u32 % 4096),
        ChunkLen::Page => 4096,
    };
    // Mostly small files (fast, and every chunk boundary case); 1 in 8 up to 300 KB for the
    // readahead window and direct reads, 1 in 32 up to 2.3 MB for reads verified on two threads.
    let size = match input.size >> 27 {
        0..=23 => input.size as usize % 3000,
        24..=27 => input.size as usize % 40_000,
        28..=30 => input.size as usize % 300_000,
        _ => input.size as usize % 2_300_000,
    };
    let key_len = [16, 24, 32][input.key_len as usize % 3];
    let key = RegionKey::from_bytes(content(key_len, 0x6b6579)).expect("region key");
    let id = FileId(input.id);
    let mut other_id = input.id;
    other_id[0] ^= 0x80;
    let other_id = FileId(other_id);
    set_read_threads(input.threads);

    let s = seal(input.encrypted, &key, &id, c, content(size, input.seed));
    let other = seal(
        input.encrypted,
        &key,
        &other_id,
        c,
        content(size, input.seed ^ 0x5eed),
    );
    let slot = c as usize + if input.encrypted { 16 } else { 0 };
    let header = if input.encrypted { 24 } else { 0 };
    let (mut disk, mut outboard) = (s.disk.clone(), s.outboard.clone());
    for m in input.mutations.iter().take(8) {
        mutate(&mut disk, &mut outboard, m, &other, slot, header);
    }
    let disk_changed = disk != s.disk;
    let outboard_changed = outboard != s.outboard;

    let Ok(mut r) = reader(
        input.encrypted,
        &key,
        &id,
        &s,
        c,
        disk.clone(),
        outboard.clone(),
    ) else {
        assert!(
            disk_changed || outboard_changed,
            "an intact file failed to open"
        );
        return;
    };
    let plain = &s.plain;
    let intact = !disk_changed && !outboard_changed;
    for a in input.accesses.iter().take(16) {
        match a {
            Access::Read { offset, len } => {
                let off = *offset as u64 % (plain.len() as u64 + 2);
                let mut buf = vec![0u8; *len as usize];
                match r.read_at(&mut buf, off) {
                    Ok(n) => same(plain, off, &buf[..n]),
                    Err(e) => assert!(!intact, "intact read failed: {e}"),
                }
            }
            Access::ReadTail { back, len } => {
                let off = (plain.len() as u64).saturating_sub(*back as u64);
                let mut buf = vec![0u8; *len as usize];
                match r.read_at(&mut buf, off) {
                    Ok(n) => same(plain, off, &buf[..n]),
                    Err(e) => assert!(!intact, "intact read failed: {e}"),
                }
            }
            Access::Big { offset, len } => {
                let off = *offset as u64 % (plain.len() as u64 + 2);
                // (no larger than what is left of the file, plus a little: buffers are zeroed)
                let left = plain.len() - (off as usize).min(plain.len());
                let mut buf = vec![0u8; (*len as usize % (3 << 20)).min(left + 100)];
                match r.read_at(&mut buf, off) {
                    Ok(n) => same(plain, off, &buf[..n]),
                    Err(e) => assert!(!intact, "intact read failed: {e}"),
                }
            }
            Access::CopyTo => {
                let mut out = Vec::new();
                match r.copy_to(&mut out) {
                    Ok(()) => assert!(out == *plain, "copy_to served wrong plaintext"),
                    Err(e) => {
                        assert!(!intact, "intact copy_to failed: {e}");
                        same(plain, 0, &out);
                    }
                }
            }
            Access::ForEach { block } => {
                let seen = Mutex::new(0usize);
                let res = r.for_each_verified(*block as usize + 1, |off, b| {
                    same(plain, off, b);
                    *seen.lock().unwrap() += b.len();
                    Ok(())
                });
                match res {
                    Ok(()) => assert_eq!(*seen.lock().unwrap(), plain.len()),
                    Err(e) => assert!(!intact, "intact for_each_verified failed: {e}"),
                }
            }
            Access::VerifyAll => match r.verify_all() {
                Ok(()) => assert!(intact, "verify_all accepted a modified file"),
                Err(e) => assert!(!intact, "intact verify_all failed: {e}"),
            },
        }
    }
    // Whatever the accesses were, a modified file must fail a full verification.
    let mut fresh = reader(input.encrypted, &key, &id, &s, c, disk, outboard)
        .expect("opened once, opens again");
    match fresh.verify_all() {
        Ok(()) => assert!(intact, "verify_all accepted a modified file"),
        Err(e) => assert!(!intact, "intact verify_all failed: {e}"),
    }
});

use super::*;
use crate::crypto::{file_chunk_key, file_mac_key, FileId, RegionKey};

fn enc(size: usize, c: u32) -> (AeadKey, FileId, Vec<u8>, Vec<u8>) {
    let rk = RegionKey::random(32).unwrap();
    let id = FileId::random().unwrap();
    let k = file_chunk_key(&rk, &id).unwrap();
    let plain: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
    let mut out = Vec::new();
    seal_encrypted(&k, &id, c, size as u64, &mut &plain[..], &mut out, "t").unwrap();
    (k, id, plain, out)
}

#[test]
fn encrypted_roundtrip_at_chunk_boundaries() {
    for size in [0usize, 1, 511, 512, 513, 4096, 5000] {
        let (k, id, plain, out) = enc(size, 512);
        assert_eq!(
            out.len() as u64,
            layout::enc_file_len(size as u64, 512).unwrap()
        );
        let mut r = ProtectedReader::<Vec<u8>, Vec<u8>>::new(
            FileCodec::Encrypted {
                key: k,
                id,
                data: out,
            },
            size as u64,
            512,
            "t".into(),
        )
        .unwrap();
        let mut got = vec![0u8; size + 10];
        let n = r.read_at(&mut got, 0).unwrap();
        assert_eq!(&got[..n], &plain[..]);
        if size > 3 {
            let mut two = [0u8; 2];
            assert_eq!(r.read_at(&mut two, size as u64 - 2).unwrap(), 2);
            assert_eq!(two, [plain[size - 2], plain[size - 1]]);
        }
    }
}

#[test]
fn authenticated_roundtrip_and_tamper() {
    for size in [0usize, 1, 512, 513, 3000] {
        let rk = RegionKey::random(16).unwrap();
        let id = FileId::random().unwrap();
        let k = file_mac_key(&rk, &id).unwrap();
        let plain: Vec<u8> = (0..size).map(|i| i as u8).collect();
        let (root, ob) =
            seal_authenticated(&k, 512, size as u64, &mut &plain[..], None, "t").unwrap();
        let mk = |data: Vec<u8>| {
            ProtectedReader::<Vec<u8>, Vec<u8>>::new(
                FileCodec::Authenticated {
                    key: k.clone(),
                    root,
                    data,
                    outboard: if ob.is_empty() {
                        None
                    } else {
                        Some(ob.clone())
                    },
                },
                size as u64,
                512,
                "t".into(),
            )
        };
        let mut r = mk(plain.clone()).unwrap();
        r.verify_all().unwrap();
        if size > 0 {
            for bit in [0usize, size * 8 - 1] {
                let mut bad = plain.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                assert!(mk(bad).unwrap().verify_all().is_err());
            }
        }
    }
}

#[test]
fn pipelined_seal_of_many_batches_roundtrips() {
    // 3 full batches (4 MiB each) plus a partial chunk: exercises the writer thread.
    let size = BATCH_BYTES * 3 + 100;
    let (k, id, plain, out) = enc(size, 512);
    assert_eq!(
        out.len() as u64,
        layout::enc_file_len(size as u64, 512).unwrap()
    );
    let mut r = ProtectedReader::<Vec<u8>, Vec<u8>>::new(
        FileCodec::Encrypted {
            key: k,
            id,
            data: out,
        },
        size as u64,
        512,
        "t".into(),
    )
    .unwrap();
    let mut got = Vec::new();
    r.copy_to(&mut got).unwrap();
    assert_eq!(got, plain);
}

#[test]
fn pipelined_seal_reports_a_source_that_shrank() {
    let rk = RegionKey::random(32).unwrap();
    let id = FileId::random().unwrap();
    let k = file_chunk_key(&rk, &id).unwrap();
    let plain = vec![7u8; BATCH_BYTES * 2 + 512 * 8];
    let mut out = Vec::new();
    let claimed = plain.len() as u64 + 1;
    let e = seal_encrypted(&k, &id, 512, claimed, &mut &plain[..], &mut out, "/f").unwrap_err();
    assert!(e.to_string().contains("changed size"), "{e}");
}

#[test]
fn pipelined_seal_reports_a_failing_writer() {
    struct Full(usize);
    impl std::io::Write for Full {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.0 < b.len() {
                return Err(std::io::Error::other("disk full"));
            }
            self.0 -= b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let rk = RegionKey::random(32).unwrap();
    let id = FileId::random().unwrap();
    let k = file_chunk_key(&rk, &id).unwrap();
    let plain = vec![7u8; BATCH_BYTES * 3];
    let mut w = Full(100_000);
    let e = seal_encrypted(
        &k,
        &id,
        512,
        plain.len() as u64,
        &mut &plain[..],
        &mut w,
        "/f",
    )
    .unwrap_err();
    assert!(e.to_string().contains("disk full"), "{e}");
}

/// Regression: the last node of an odd-width Merkle level is never read as a sibling, so a flip
/// there went unnoticed by `verify_all`. Every outboard byte must now be checked.
#[test]
fn verify_all_checks_every_outboard_byte() {
    for chunks in [2usize, 3, 4, 5, 7, 9] {
        let size = (chunks - 1) * 512 + 100;
        let rk = RegionKey::random(32).unwrap();
        let id = FileId::random().unwrap();
        let k = file_mac_key(&rk, &id).unwrap();
        let plain: Vec<u8> = (0..size).map(|i| (i * 13) as u8).collect();
        let (root, ob) =
            seal_authenticated(&k, 512, size as u64, &mut &plain[..], None, "t").unwrap();
        assert_eq!(
            ob.len() as u64,
            layout::outboard_len(chunks as u64).unwrap()
        );
        for off in 0..ob.len() {
            let mut bad = ob.clone();
            bad[off] ^= 0x40;
            let mut r = ProtectedReader::<Vec<u8>, Vec<u8>>::new(
                FileCodec::Authenticated {
                    key: k.clone(),
                    root,
                    data: plain.clone(),
                    outboard: Some(bad),
                },
                size as u64,
                512,
                "t".into(),
            )
            .unwrap();
            assert!(
                r.verify_all().is_err(),
                "{chunks} chunks: outboard byte {off} flipped went unnoticed"
            );
        }
    }
}

/// A tiny deterministic generator for offsets and lengths.
fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 33
}

type MemReader = ProtectedReader<Vec<u8>, Vec<u8>>;

fn enc_reader(size: usize, c: u32) -> (MemReader, Vec<u8>, Vec<u8>) {
    let (k, id, plain, out) = enc(size, c);
    let r = ProtectedReader::new(
        FileCodec::Encrypted {
            key: k,
            id,
            data: out.clone(),
        },
        size as u64,
        c,
        "t".into(),
    )
    .unwrap();
    (r, plain, out)
}

fn auth_reader(plain: &[u8], c: u32) -> impl Fn(Vec<u8>) -> ProtectedReader<Vec<u8>, Vec<u8>> {
    let rk = RegionKey::random(32).unwrap();
    let id = FileId::random().unwrap();
    let k = file_mac_key(&rk, &id).unwrap();
    let (root, ob) =
        seal_authenticated(&k, c, plain.len() as u64, &mut &plain[..], None, "t").unwrap();
    move |data: Vec<u8>| {
        let size = data.len() as u64;
        ProtectedReader::new(
            FileCodec::Authenticated {
                key: k.clone(),
                root,
                data,
                outboard: (!ob.is_empty()).then(|| ob.clone()),
            },
            size,
            c,
            "t".into(),
        )
        .unwrap()
    }
}

/// Sequential reads of several sizes (growing windows, parallel spans, direct reads into the
/// caller's buffer), then random reads (spanning chunk boundaries, after and inside the cached
/// window, across EOF): every byte equals the plaintext.
#[test]
fn windowed_reads_sequential_then_random_return_the_plaintext() {
    for (size, c) in [
        (512 * 3000 + 77, 512u32),
        (4096 * 700, 4096),
        (65536 * 40 + 1, 65536),
    ] {
        let (mut r, plain, _) = enc_reader(size, c);
        let mk = auth_reader(&plain, c);
        let mut a = mk(plain.clone());
        // The same reads without the scoped read helper (FSPF_READ_THREADS=0).
        let alone = Threads {
            pool: false,
            read_helper: false,
            helper: None,
        };
        let (r1, _, _) = enc_reader(size, c);
        let mut r1 = r1.with_threads(alone);
        let mut a1 = mk(plain.clone()).with_threads(alone);
        for r in [&mut r, &mut a, &mut r1, &mut a1] {
            for step in [1000usize, 4096, 128 * 1024, 1 << 20, 3 << 20] {
                let got = r.read_in_steps(step).unwrap();
                assert_eq!(got.len(), plain.len(), "step {step}");
                assert!(got == plain, "step {step}, chunk {c}");
            }
            let mut st = size as u64;
            for _ in 0..300 {
                let off = lcg(&mut st) % (size as u64 + 100);
                let len = (lcg(&mut st) % (3 * c as u64 + 10)) as usize;
                let mut buf = vec![0xAAu8; len];
                let n = r.read_at(&mut buf, off).unwrap();
                let exp = (size as u64).saturating_sub(off).min(len as u64) as usize;
                assert_eq!(n, exp, "off {off} len {len}");
                assert_eq!(&buf[..n], &plain[off as usize..off as usize + n]);
            }
        }
    }
}

/// A sequential window that would extend past the end of the file stops at the last chunk, and
/// reads at and past EOF return 0.
#[test]
fn window_crossing_eof_is_clipped() {
    let size = 512 * 10 + 3;
    let (mut r, plain, _) = enc_reader(size, 512);
    let mut buf = [0u8; 700];
    let mut off = 0;
    while off < size {
        let n = r.read_at(&mut buf, off as u64).unwrap();
        assert_eq!(&buf[..n], &plain[off..off + n]);
        off += n;
    }
    assert_eq!(r.read_at(&mut buf, size as u64).unwrap(), 0);
    assert_eq!(r.read_at(&mut buf, size as u64 + 5000).unwrap(), 0);
    let mut all = vec![0u8; size + 100];
    assert_eq!(r.read_at(&mut all, 0).unwrap(), size);
    assert_eq!(&all[..size], &plain[..]);
}

/// A tampered chunk inside a window: reads before it succeed (readahead over the bad chunk does
/// not fail them), every read touching it fails, and none of its bytes reach the caller's buffer
/// (it is left as it was or zeroed), in the window path and in direct large reads alike; chunks
/// after it stay readable.
#[test]
fn tampered_chunk_inside_a_window_fails_without_leaking_bytes() {
    let c = 512usize;
    // > 2 MiB: a read of the whole file is verified on two threads, the bad chunk in the second half
    let size = c * 6000;
    let bad = 4000usize;
    let (_, plain, ct) = enc_reader(size, c as u32);
    // encrypted: flip a ciphertext bit of chunk `bad`; authenticated: a plaintext bit
    let enc_bad = {
        let (k, id, plain2, mut out) = enc(size, c as u32);
        out[layout::enc_chunk_offset(c as u32, bad as u64).unwrap() as usize + 5] ^= 1;
        let r = ProtectedReader::<Vec<u8>, Vec<u8>>::new(
            FileCodec::Encrypted {
                key: k,
                id,
                data: out,
            },
            size as u64,
            c as u32,
            "t".into(),
        )
        .unwrap();
        (r, plain2)
    };
    let _ = ct;
    let mut tampered = plain.clone();
    tampered[bad * c + 5] ^= 1;
    let auth_bad = (
        auth_reader(&plain, c as u32)(tampered.clone()),
        plain.clone(),
    );
    for (mut r, plain) in [enc_bad, auth_bad] {
        let bad_range = bad * c..(bad + 1) * c;
        let no_leak = |buf: &[u8], base: usize| {
            let lo = bad_range.start.max(base) - base;
            let hi = (bad_range.end.min(base + buf.len())).saturating_sub(base);
            if lo < hi {
                let region = &buf[lo..hi];
                assert!(
                    region.iter().all(|&b| b == 0xAA) || region.iter().all(|&b| b == 0),
                    "bytes of the tampered chunk reached the caller"
                );
            }
        };
        // sequential small reads up to the bad chunk
        let mut off = 0;
        let mut buf = vec![0xAAu8; 1000];
        loop {
            buf.fill(0xAA);
            match r.read_at(&mut buf, off as u64) {
                Ok(n) => {
                    assert!(
                        off + n <= bad_range.start,
                        "read over the bad chunk succeeded"
                    );
                    assert_eq!(&buf[..n], &plain[off..off + n]);
                    off += n;
                }
                Err(e) => {
                    assert!(e.to_string().contains(&format!("chunk {bad}")), "{e}");
                    assert!(off + buf.len() > bad_range.start);
                    no_leak(&buf, off);
                    break;
                }
            }
        }
        // direct large reads spanning it (the whole file; and from the bad chunk on)
        for start in [0usize, bad * c, (bad - 3) * c] {
            let mut big = vec![0xAAu8; size - start];
            let e = r.read_at(&mut big, start as u64).unwrap_err();
            assert!(e.to_string().contains(&format!("chunk {bad}")), "{e}");
            no_leak(&big, start);
        }
        // after it, and just before it
        let mut after = vec![0u8; 5000];
        let n = r.read_at(&mut after, ((bad + 1) * c) as u64).unwrap();
        assert_eq!(&after[..n], &plain[(bad + 1) * c..(bad + 1) * c + n]);
        let mut before = vec![0u8; 100];
        r.read_at(&mut before, (bad * c - 100) as u64).unwrap();
        assert_eq!(&before[..], &plain[bad * c - 100..bad * c]);
        assert!(r.verify_all().is_err());
        assert!(r.copy_to(&mut Vec::new()).is_err());
    }
}

/// `for_each_verified` (the shield's placeholder fill, two threads) hands out exactly the
/// plaintext; with a tampered chunk it fails and never hands out a block holding that chunk.
#[test]
fn for_each_verified_fills_in_parallel_and_stops_at_a_bad_chunk() {
    let c = 512usize;
    let size = c * 5000 + 9;
    let rk = RegionKey::random(32).unwrap();
    let id = FileId::random().unwrap();
    let plain: Vec<u8> = (0..size).map(|i| (i * 31) as u8).collect();
    let mut ct = Vec::new();
    let k = file_chunk_key(&rk, &id).unwrap();
    seal_encrypted(
        &k,
        &id,
        c as u32,
        size as u64,
        &mut &plain[..],
        &mut ct,
        "t",
    )
    .unwrap();
    let collect = |data: Vec<u8>| {
        let mut r = MemReader::new(
            FileCodec::Encrypted {
                key: file_chunk_key(&rk, &id).unwrap(),
                id,
                data,
            },
            size as u64,
            c as u32,
            "t".into(),
        )
        .unwrap();
        let got = std::sync::Mutex::new(vec![0xAAu8; size]);
        let res = r.for_each_verified(64 * 1024, |off, b| {
            got.lock().unwrap()[off as usize..off as usize + b.len()].copy_from_slice(b);
            Ok(())
        });
        (res, got.into_inner().unwrap())
    };
    let (res, got) = collect(ct.clone());
    res.unwrap();
    assert!(got == plain);
    let bad = 4000usize;
    ct[layout::enc_chunk_offset(c as u32, bad as u64).unwrap() as usize] ^= 1;
    let (res, got) = collect(ct);
    assert!(res.unwrap_err().to_string().contains("chunk 4000"));
    assert!(got[bad * c..(bad + 1) * c].iter().all(|&b| b == 0xAA));
}

/// Regression: a reader given a huge listed size computed the expected on-disk length with
/// unchecked arithmetic (`enc_file_len` overflowed: a panic in debug builds, a wrapped and
/// possibly matching length in release builds).
#[test]
fn reader_over_a_huge_listed_size_overflowed_enc_file_len() {
    for size in [u64::MAX, u64::MAX - 40, u64::MAX / 33 * 32] {
        let (key, id, _, data) = enc(10, 512);
        let r = ProtectedReader::<Vec<u8>, Vec<u8>>::new(
            FileCodec::Encrypted { key, id, data },
            size,
            512,
            "t".into(),
        );
        assert!(
            matches!(r, Err(Error::FileTooLarge { .. })),
            "{size}: {:?}",
            r.err()
        );
    }
}

/// Found by `random_changes_to_a_committed_file_on_disk_are_detected`: a read of an empty file
/// returned end-of-file without checking its only chunk, so a modified tag of an empty encrypted
/// file went unnoticed by every read (only `verify_all` saw it).
#[test]
fn tampered_tag_of_an_empty_encrypted_file_went_unnoticed_by_reads() {
    for at in [24usize, 31, 39] {
        let (k, id, _, mut out) = enc(0, 512);
        out[at] ^= 1;
        let mut r = ProtectedReader::<Vec<u8>, Vec<u8>>::new(
            FileCodec::Encrypted {
                key: k,
                id,
                data: out,
            },
            0,
            512,
            "t".into(),
        )
        .unwrap();
        let mut buf = [0u8; 16];
        assert!(
            matches!(
                r.read_at(&mut buf, 0),
                Err(Error::ChunkAuth { chunk: 0, .. })
            ),
            "byte {at}"
        );
        assert!(r.read_at(&mut buf, 5).is_err(), "byte {at}, past the end");
    }
    // an intact empty file reads as empty, also past its end
    let (k, id, _, out) = enc(0, 512);
    let codec = FileCodec::Encrypted {
        key: k,
        id,
        data: out,
    };
    let mut r = ProtectedReader::<Vec<u8>, Vec<u8>>::new(codec, 0, 512, "t".into()).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(r.read_at(&mut buf, 0).unwrap(), 0);
    assert_eq!(r.read_at(&mut buf, 7).unwrap(), 0);
}

/// Found by the `fspf_metadata` fuzz target: a size near `u64::MAX` (taken from an fspf entry)
/// overflowed `enc_file_len` in the open-time length check and panicked.
#[test]
fn reader_over_a_huge_size_overflowed_the_length_check() {
    for size in [u64::MAX, u64::MAX - 1, layout::MAX_FILE_SIZE + 1] {
        let (k, id, _, out) = enc(10, 512);
        let r = ProtectedReader::<Vec<u8>, Vec<u8>>::new(
            FileCodec::Encrypted {
                key: k,
                id,
                data: out,
            },
            size,
            512,
            "t".into(),
        );
        assert!(matches!(r, Err(Error::FileTooLarge { .. })), "size {size}");
    }
}

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
        assert_eq!(out.len() as u64, layout::enc_file_len(size as u64, 512));
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
    // 3 full batches of 64 chunks plus a partial chunk: exercises the writer thread.
    let size = 512 * 64 * 3 + 100;
    let (k, id, plain, out) = enc(size, 512);
    assert_eq!(out.len() as u64, layout::enc_file_len(size as u64, 512));
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
    let plain = vec![7u8; 512 * 200];
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
    let plain = vec![7u8; 512 * 64 * 10];
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
        assert_eq!(ob.len() as u64, layout::outboard_len(chunks as u64));
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

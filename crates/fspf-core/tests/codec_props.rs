//! Property tests of the chunked codec: random sizes and chunk lengths round-trip, and a random
//! corruption of the bytes on disk is always detected and never turns into wrong plaintext.
use fspf_core::codec::{seal_authenticated, seal_encrypted, FileCodec, ProtectedReader};
use fspf_core::crypto::{file_chunk_key, file_mac_key, FileId, RegionKey};
use proptest::prelude::*;

type Reader = ProtectedReader<Vec<u8>, Vec<u8>>;

mod common;
use common::content;

struct Sealed {
    key: RegionKey,
    id: FileId,
    plain: Vec<u8>,
    chunk_len: u32,
    disk: Vec<u8>,
    root: [u8; 32],
    outboard: Vec<u8>,
    encrypted: bool,
}

fn seal(encrypted: bool, key_len: usize, size: usize, chunk_len: u32, seed: u64) -> Sealed {
    let key = RegionKey::random(key_len).unwrap();
    let id = FileId::random().unwrap();
    let plain = content(size, seed);
    let (disk, root, outboard) = if encrypted {
        let k = file_chunk_key(&key, &id).unwrap();
        let mut out = Vec::new();
        seal_encrypted(
            &k,
            &id,
            chunk_len,
            size as u64,
            &mut &plain[..],
            &mut out,
            "p",
        )
        .unwrap();
        (out, [0; 32], Vec::new())
    } else {
        let k = file_mac_key(&key, &id).unwrap();
        let (root, ob) =
            seal_authenticated(&k, chunk_len, size as u64, &mut &plain[..], None, "p").unwrap();
        (plain.clone(), root, ob)
    };
    Sealed {
        key,
        id,
        plain,
        chunk_len,
        disk,
        root,
        outboard,
        encrypted,
    }
}

impl Sealed {
    fn reader(&self, disk: Vec<u8>, outboard: Vec<u8>) -> fspf_core::Result<Reader> {
        let codec = if self.encrypted {
            FileCodec::Encrypted {
                key: file_chunk_key(&self.key, &self.id).unwrap(),
                id: self.id,
                data: disk,
            }
        } else {
            FileCodec::Authenticated {
                key: file_mac_key(&self.key, &self.id).unwrap(),
                root: self.root,
                data: disk,
                outboard: (!outboard.is_empty()).then_some(outboard),
            }
        };
        ProtectedReader::new(codec, self.plain.len() as u64, self.chunk_len, "p".into())
    }

    /// A tampered copy must fail `verify_all`, and any read that succeeds returns original bytes.
    fn assert_tamper_detected(&self, disk: Vec<u8>, outboard: Vec<u8>, probes: &[(u64, usize)]) {
        let Ok(mut r) = self.reader(disk.clone(), outboard.clone()) else {
            return; // rejected at open: fine
        };
        assert!(r.verify_all().is_err(), "corruption went unnoticed");
        let mut r = self.reader(disk, outboard).unwrap();
        for &(off, len) in probes {
            let mut buf = vec![0u8; len];
            if let Ok(n) = r.read_at(&mut buf, off) {
                let start = (off as usize).min(self.plain.len());
                assert_eq!(
                    &buf[..n],
                    &self.plain[start..start + n],
                    "wrong bytes served"
                );
            }
        }
    }
}

fn chunk_len() -> impl Strategy<Value = u32> {
    prop_oneof![Just(512u32), Just(4096), 512u32..=5000]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_sizes_and_chunk_lengths_round_trip(
        encrypted in any::<bool>(),
        key_len in prop_oneof![Just(16usize), Just(24), Just(32)],
        size in prop_oneof![0usize..=3, 500usize..=1100, 0usize..=20_000],
        c in chunk_len(),
        seed in any::<u64>(),
        probes in prop::collection::vec((0u64..21_000, 0usize..6000), 0..6),
    ) {
        let s = seal(encrypted, key_len, size, c, seed);
        let mut r = s.reader(s.disk.clone(), s.outboard.clone()).unwrap();
        r.verify_all().unwrap();
        let mut all = Vec::new();
        r.copy_to(&mut all).unwrap();
        prop_assert_eq!(&all, &s.plain);
        for (off, len) in probes {
            let mut buf = vec![0u8; len];
            let n = r.read_at(&mut buf, off).unwrap();
            let start = (off as usize).min(size);
            let end = (start + len).min(size);
            prop_assert_eq!(n, end - start);
            prop_assert_eq!(&buf[..n], &s.plain[start..end]);
        }
    }

    #[test]
    fn a_random_byte_corruption_of_an_encrypted_file_is_never_silent(
        size in 0usize..=12_000,
        c in chunk_len(),
        seed in any::<u64>(),
        pos in any::<prop::sample::Index>(),
        xor in 1u8..=255,
        probes in prop::collection::vec((0u64..12_000, 1usize..3000), 1..5),
    ) {
        let s = seal(true, 32, size, c, seed);
        let mut bad = s.disk.clone();
        let i = pos.index(bad.len());
        bad[i] ^= xor;
        s.assert_tamper_detected(bad, Vec::new(), &probes);
    }

    #[test]
    fn a_random_byte_corruption_of_an_authenticated_file_or_its_tree_is_never_silent(
        size in 1usize..=12_000,
        c in chunk_len(),
        seed in any::<u64>(),
        in_tree in any::<bool>(),
        pos in any::<prop::sample::Index>(),
        xor in 1u8..=255,
        probes in prop::collection::vec((0u64..12_000, 1usize..3000), 1..5),
    ) {
        let s = seal(false, 32, size, c, seed);
        let (mut data, mut ob) = (s.disk.clone(), s.outboard.clone());
        if in_tree && !ob.is_empty() {
            let i = pos.index(ob.len());
            ob[i] ^= xor;
        } else {
            let i = pos.index(data.len());
            data[i] ^= xor;
        }
        s.assert_tamper_detected(data, ob, &probes);
    }

    #[test]
    fn random_truncation_or_extension_is_never_silent(
        encrypted in any::<bool>(),
        size in 0usize..=12_000,
        c in chunk_len(),
        seed in any::<u64>(),
        new_len in any::<prop::sample::Index>(),
        extend in 1usize..5000,
        grow in any::<bool>(),
    ) {
        let s = seal(encrypted, 32, size, c, seed);
        let mut bad = s.disk.clone();
        if grow || bad.is_empty() {
            bad.extend(content(extend, seed ^ 0xff));
        } else {
            bad.truncate(new_len.index(bad.len()));
        }
        s.assert_tamper_detected(bad, s.outboard.clone(), &[(0, 100_000)]);
    }
}

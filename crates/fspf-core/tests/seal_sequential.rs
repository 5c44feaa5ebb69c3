//! The preload shield seals with `Threads::FORK_SAFE` (no rayon pool: scoped threads for the
//! pipelined writer and the two halves of a batch), or with no read helper at all. Its output must be byte for byte
//! what the parallel path writes, for single-chunk, single-batch (threaded halves) and
//! multi-batch files, including sizes that end exactly on a chunk or batch boundary.
use fspf_core::codec::{seal_authenticated_with, seal_encrypted_with, Threads};
use fspf_core::crypto::{file_chunk_key, FileId, RegionKey};

#[test]
fn sequential_mode_seals_exactly_like_the_parallel_path() {
    let rk = RegionKey::random(32).unwrap();
    let c = 65536u32;
    let max = 3 * 64 * c as usize + 7;
    let plain: Vec<u8> = (0..max).map(|i| (i * 31 + i / 65536) as u8).collect();
    for size in [
        0usize,
        100,
        c as usize,
        7 * c as usize + 1,
        8 * c as usize,
        64 * c as usize,
        65 * c as usize + 5,
        128 * c as usize,
        max,
    ] {
        let id = FileId::random().unwrap();
        let k = file_chunk_key(&rk, &id).unwrap();
        let mk = fspf_core::crypto::file_mac_key(&rk, &id).unwrap();
        let seal = |t: Threads| {
            let mut out = Vec::new();
            let p = &mut &plain[..size];
            seal_encrypted_with(t, &k, &id, c, size as u64, p, &mut out, "t").unwrap();
            let p = &mut &plain[..size];
            let auth = seal_authenticated_with(t, &mk, c, size as u64, p, None, "t").unwrap();
            (out, auth)
        };
        let par = seal(Threads::default());
        for t in [
            Threads::FORK_SAFE,
            Threads {
                pool: false,
                read_helper: false,
                helper: None,
            },
        ] {
            assert!(par == seal(t), "size {size}: {t:?} output differs");
        }
    }
}

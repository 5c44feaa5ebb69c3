//! The preload shield seals with `codec::set_sequential(true)` (no rayon pool: scoped threads
//! for the pipelined writer and the two halves of a batch). Its output must be byte for byte
//! what the parallel path writes, for single-chunk, single-batch (threaded halves) and
//! multi-batch files, including sizes that end exactly on a chunk or batch boundary.
use fspf_core::codec::{seal_encrypted, set_sequential};
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
        let seal = |seq: bool| {
            set_sequential(seq);
            let mut out = Vec::new();
            seal_encrypted(&k, &id, c, size as u64, &mut &plain[..size], &mut out, "t").unwrap();
            set_sequential(false);
            out
        };
        let par = seal(false);
        let seq = seal(true);
        assert!(par == seq, "size {size}: sequential output differs");
    }
}

//! Helpers shared by the property tests.

/// `len` pseudo-random bytes from `seed` (xorshift64): reproducible contents for a proptest case.
pub fn content(len: usize, seed: u64) -> Vec<u8> {
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

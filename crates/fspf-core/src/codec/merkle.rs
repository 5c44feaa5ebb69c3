//! Binary Merkle tree over chunk leaves. Level k+1 pairs nodes (2i, 2i+1) of level k; an unpaired
//! last node is promoted unchanged. The outboard stores every level but the root, leaves first.
use super::ReadAt;
use crate::crypto::{ct_eq, MacKey};
use crate::format::layout::{merkle_levels, NODE_LEN};

pub fn merkle_root_and_outboard(key: &MacKey, leaves: &[[u8; 32]]) -> ([u8; 32], Vec<u8>) {
    if leaves.len() == 1 {
        return (leaves[0], Vec::new());
    }
    let cap = crate::format::layout::outboard_len(leaves.len() as u64).unwrap_or(0);
    let mut outboard = Vec::with_capacity(cap as usize);
    let mut level: Vec<[u8; 32]> = leaves.to_vec();
    while level.len() > 1 {
        for n in &level {
            outboard.extend_from_slice(n);
        }
        level = level
            .chunks(2)
            .map(|p| {
                if p.len() == 2 {
                    key.node(&p[0], &p[1])
                } else {
                    p[0]
                }
            })
            .collect();
    }
    (level[0], outboard)
}

/// Check `leaf` (index `index` of `leaves`) against `root` using sibling nodes from `outboard`.
pub fn verify_leaf<O: ReadAt>(
    key: &MacKey,
    root: &[u8; 32],
    leaves: u64,
    mut index: u64,
    leaf: [u8; 32],
    outboard: Option<&O>,
) -> std::io::Result<bool> {
    let mut cur = leaf;
    let mut base = 0u64;
    for width in merkle_levels(leaves) {
        let sib = index ^ 1;
        if sib < width {
            let Some(o) = outboard else { return Ok(false) };
            let mut s = [0u8; 32];
            o.read_exact_at(&mut s, (base + sib) * NODE_LEN)?;
            cur = if index & 1 == 0 {
                key.node(&cur, &s)
            } else {
                key.node(&s, &cur)
            };
        }
        base += width;
        index >>= 1;
    }
    Ok(ct_eq(&cur, root))
}

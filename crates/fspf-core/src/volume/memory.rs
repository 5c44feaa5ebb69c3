//! Ephemeral files: sealed in memory with the same codec as kernel files, so an ephemeral
//! encrypted/authenticated region never holds plaintext outside a verified reader (preload shield).
use crate::codec::{self, ProtectedReader, Threads};
use crate::crypto::{self, FileId};
use crate::error::{Error, Result};
use crate::format::metadata::{FileEntry, FileKind, Protection, Region};
use crate::policy::EmbedPath;
use std::sync::Arc;

/// One sealed version of an in-memory file: its entry (id, size, root) and its on-"disk" bytes.
#[derive(Debug, Clone)]
pub struct SealedMem {
    pub entry: FileEntry,
    /// Ciphertext (encrypted), or the plaintext (authenticated / not-protected).
    pub data: Arc<Vec<u8>>,
    /// Merkle outboard of authenticated multi-chunk files.
    pub outboard: Option<Arc<Vec<u8>>>,
}

/// Verified reader over a [`SealedMem`].
pub type MemReader = ProtectedReader<Arc<Vec<u8>>, Arc<Vec<u8>>>;

/// Seal `plain` as a fresh version (fresh file id, hence fresh key) of `path` in `region`.
pub fn seal_in_memory(
    threads: Threads,
    region: &Region,
    path: &EmbedPath,
    mode: u32,
    plain: &[u8],
) -> Result<SealedMem> {
    let label = path.to_string();
    let size = plain.len() as u64;
    let id = FileId::random()?;
    let Some(key) = region.key.as_ref() else {
        return Ok(SealedMem {
            entry: FileEntry::new_file(id, size, None, mode),
            data: Arc::new(plain.to_vec()),
            outboard: None,
        });
    };
    match region.protection {
        Protection::Encrypted => {
            let k = crypto::file_chunk_key(key, &id)?;
            let mut out = Vec::with_capacity(plain.len() + 64);
            codec::seal_encrypted_with(
                threads,
                &k,
                &id,
                region.chunk_len,
                size,
                &mut &plain[..],
                &mut out,
                &label,
            )?;
            Ok(SealedMem {
                entry: FileEntry::new_file(id, size, None, mode),
                data: Arc::new(out),
                outboard: None,
            })
        }
        _ => {
            let k = crypto::file_mac_key(key, &id)?;
            let (root, outboard) = codec::seal_authenticated_with(
                threads,
                &k,
                region.chunk_len,
                size,
                &mut &plain[..],
                None,
                &label,
            )?;
            Ok(SealedMem {
                entry: FileEntry::new_file(id, size, Some(root), mode),
                data: Arc::new(plain.to_vec()),
                outboard: (!outboard.is_empty()).then(|| Arc::new(outboard)),
            })
        }
    }
}

/// Verified reader over a sealed in-memory file of a protected `region`.
pub fn open_in_memory(
    threads: Threads,
    region: &Region,
    path: &EmbedPath,
    sealed: &SealedMem,
) -> Result<MemReader> {
    let label = path.to_string();
    let FileKind::File { id, size, root } = &sealed.entry.kind else {
        return Err(Error::Invalid {
            path: label,
            reason: "not a regular file".into(),
        });
    };
    let codec = super::codec_for(
        region,
        path,
        id,
        root.as_ref(),
        *size,
        sealed.data.clone(),
        || Ok(sealed.outboard.clone()),
    )?;
    Ok(ProtectedReader::new(codec, *size, region.chunk_len, label)?.with_threads(threads))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::RegionKey;
    use crate::format::metadata::RegionKind;

    fn region(p: Protection) -> Region {
        Region {
            embed_point: EmbedPath::root(),
            kind: RegionKind::Ephemeral,
            protection: p,
            key: Some(RegionKey::random(32).unwrap()),
            chunk_len: 512,
        }
    }

    #[test]
    fn ephemeral_round_trip_and_tamper_detection() {
        for p in [Protection::Encrypted, Protection::Authenticated] {
            let r = region(p);
            let path = EmbedPath::parse("/x").unwrap();
            let plain: Vec<u8> = (0..2000u32).map(|i| i as u8).collect();
            let s = seal_in_memory(Threads::default(), &r, &path, 0o644, &plain).unwrap();
            let mut rd = open_in_memory(Threads::default(), &r, &path, &s).unwrap();
            let mut out = vec![0; 2000];
            assert_eq!(rd.read_at(&mut out, 0).unwrap(), 2000);
            assert_eq!(out, plain);
            let mut bad = (*s.data).clone();
            bad[600] ^= 1;
            let t = SealedMem {
                data: Arc::new(bad),
                ..s.clone()
            };
            let mut rd = open_in_memory(Threads::default(), &r, &path, &t).unwrap();
            assert!(rd.read_at(&mut out, 0).is_err());
        }
    }
}

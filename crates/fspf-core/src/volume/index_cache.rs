//! `FSPF.index`: the frozen index of the current fspf (`format::index`), kept beside it so that
//! a run can start without parsing the fspf (the index is searched in place). It lives on
//! untrusted storage and holds region keys, so it is sealed: AES-256-GCM under a key derived
//! from the volume key (`HKDF(volume key, info "fspf v1 index cache")`), a random nonce, and the
//! tag of the fspf it describes as associated data. A cache for another tag (an older state, a
//! forged one) fails authentication and is ignored; the fspf is then parsed as before and the
//! cache rewritten. Only encrypted fspfs get one (an unencrypted fspf has no secret to key it).
//!
//! Layout: `"FSPFIDX1"` (8 bytes) | nonce (12) | ciphertext of the index | GCM tag (16).
use super::{kernel_fs, store, Volume};
use crate::crypto::{self, AeadKey, Tag, NONCE_LEN, TAG_LEN};
use crate::error::Result;
use std::io::Read;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FSPFIDX1";
const INFO: &[u8] = b"fspf v1 index cache";
/// A cache larger than this is not read (an fspf is at most 1 GiB; its index is smaller).
const MAX_LEN: u64 = 1 << 30;

/// `FSPF.index` beside `fspf`.
pub fn cache_path(fspf: &Path) -> PathBuf {
    let mut n = fspf
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    n.push(".index");
    fspf.with_file_name(n)
}

fn cache_key(vol_key: &crate::crypto::VolumeKey) -> Result<AeadKey> {
    let mut k = zeroize::Zeroizing::new([0u8; 32]);
    crypto::hkdf_sha256(vol_key.as_bytes(), b"", INFO, &mut k[..])?;
    AeadKey::new(&k[..])
}

/// The index for the fspf with `tag`, if a valid cache for exactly that tag is there: the
/// buffer and where in it the index lies.
pub fn read(
    fspf: &Path,
    vol_key: &crate::crypto::VolumeKey,
    tag: Tag,
) -> Option<(Vec<u8>, std::ops::Range<usize>)> {
    let p = cache_path(fspf);
    let mut f = kernel_fs::open_regular_path(&p).ok()?;
    let len = f.metadata().ok()?.len();
    if len > MAX_LEN || len < (MAGIC.len() + NONCE_LEN + TAG_LEN) as u64 {
        return None;
    }
    let mut b = Vec::with_capacity(len as usize);
    f.read_to_end(&mut b).ok()?;
    if &b[..MAGIC.len()] != MAGIC {
        return None;
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&b[MAGIC.len()..MAGIC.len() + NONCE_LEN]);
    let mut aad = Vec::with_capacity(MAGIC.len() + 16);
    aad.extend_from_slice(MAGIC);
    aad.extend_from_slice(&tag.0);
    let key = cache_key(vol_key).ok()?;
    let body = &mut b[MAGIC.len() + NONCE_LEN..];
    let n = key.open(nonce, &aad, body)?;
    // Decrypted in place; the index needs no alignment, so it is used where it lies: no second
    // buffer and no move of the index's size (3 MB for 50 000 files, at every `fspf run`).
    let start = MAGIC.len() + NONCE_LEN;
    Some((b, start..start + n))
}

/// Write the cache for `vol` (best effort: a failure only costs the next run a parse).
pub fn write(vol: &Volume) -> Result<()> {
    let Some(vk) = vol.key() else {
        return Ok(());
    };
    let index = vol.build_index()?;
    let mut nonce = [0u8; NONCE_LEN];
    crypto::random_bytes(&mut nonce)?;
    let mut aad = Vec::with_capacity(MAGIC.len() + 16);
    aad.extend_from_slice(MAGIC);
    aad.extend_from_slice(&vol.tag().0);
    let mut body = zeroize::Zeroizing::new(index.to_vec());
    let gtag = cache_key(vk)?.seal(nonce, &aad, &mut body)?;
    let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + body.len() + TAG_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&body);
    out.extend_from_slice(&gtag);
    store::write_file_durably(&cache_path(vol.path()), &out, 0o600)
}

impl Volume {
    /// [`Volume::open`] for a caller that holds `key` and trusts `tag`, using the sealed index
    /// cache when it matches (nothing is parsed; reads search the index in place), else parsing
    /// the fspf and writing the cache for the next time. The fspf on disk must have `tag` either
    /// way (a replaced or rolled-back fspf is refused as by `open`).
    pub fn open_cached(path: &Path, key: crate::crypto::VolumeKey, tag: Tag) -> Result<Volume> {
        let disk = store::read_tag(&store::absolute(path))?;
        if disk == tag {
            if let Some((buf, range)) = read(path, &key, tag) {
                // Kept for the life of the process: the volume searches it in place.
                let bytes: &'static [u8] = &Box::leak(buf.into_boxed_slice())[range];
                if let Ok(v) = Volume::from_index(path, Some(key.clone()), bytes) {
                    if v.tag() == tag {
                        return Ok(v);
                    }
                }
            }
        }
        let v = Volume::open(path, Some(key), Some(tag))?;
        let _ = write(&v);
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::metadata::{Protection, RegionKind};
    use crate::volume::RegionSpec;
    use crate::EmbedPath;

    #[test]
    fn the_index_cache_opens_only_for_its_own_tag_and_key() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fspf.pb");
        Volume::create(&p, false).unwrap();
        let mut v = Volume::open(&p, None, None).unwrap();
        v.add_region(RegionSpec {
            embed_point: EmbedPath::root(),
            kind: RegionKind::Kernel(d.path().join("vol")),
            protection: Protection::Encrypted,
            key_len: None,
            chunk_len: None,
        })
        .unwrap();
        let (t1, k) = v.encrypt().unwrap();
        // First open parses and writes the cache; the second reads it.
        let a = Volume::open_cached(&p, k.clone(), t1).unwrap();
        assert!(!a.is_indexed());
        assert!(cache_path(&p).exists());
        let b = Volume::open_cached(&p, k.clone(), t1).unwrap();
        assert!(b.is_indexed());
        assert_eq!(b.regions().len(), 1);
        // Another tag, another key, or a flipped byte: not used.
        let other = Volume::open(&p, Some(k.clone()), Some(t1)).unwrap();
        assert!(read(&p, &k, Tag([9; 16])).is_none());
        assert!(read(&p, &crate::crypto::VolumeKey::random().unwrap(), t1).is_none());
        let mut raw = std::fs::read(cache_path(&p)).unwrap();
        let mid = raw.len() / 2;
        raw[mid] ^= 1;
        std::fs::write(cache_path(&p), &raw).unwrap();
        assert!(read(&p, &k, t1).is_none());
        let c = Volume::open_cached(&p, k.clone(), t1).unwrap();
        assert!(!c.is_indexed(), "a damaged cache is ignored and rewritten");
        drop(other);
        // A rolled-back fspf is refused whatever the cache says.
        let mut v2 = Volume::open(&p, Some(k.clone()), Some(t1)).unwrap();
        let t2 = v2.save().unwrap();
        assert!(Volume::open_cached(&p, k.clone(), t1).is_err());
        assert!(Volume::open_cached(&p, k, t2).is_ok());
    }
}

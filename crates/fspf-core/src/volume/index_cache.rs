//! `FSPF.index`: the frozen index of a state of the fspf (`format::index`), kept beside it so
//! that a run can start without parsing the fspf (the index is searched in place), then apply
//! the metadata log's records after that state (FORMAT.md §5c). It lives on untrusted storage
//! and holds region keys, so it is sealed: AES-256-GCM under a key derived from the volume key
//! (`HKDF(volume key, info "fspf v1 index cache")`), a random nonce, and the tag of the state it
//! describes as associated data. A cache that does not open, or whose state is no longer in the
//! log (a checkpoint was written since), is ignored; the fspf is then parsed as before and the
//! cache rewritten. Only encrypted fspfs get one (an unencrypted fspf has no secret to key it).
//!
//! Layout: `"FSPFIDX2"` (8 bytes) | tag of the state (16) | nonce (12) | ciphertext of the
//! index | GCM tag (16).
use super::{kernel_fs, store, Volume};
use crate::crypto::{self, AeadKey, Tag, NONCE_LEN, TAG_LEN};
use crate::error::Result;
use std::io::Read;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FSPFIDX2";
const INFO: &[u8] = b"fspf v1 index cache";
/// A cache larger than this is not read (an fspf is at most 1 GiB; its index is smaller).
const MAX_LEN: u64 = 1 << 30;

/// `FSPF.index` beside `fspf`.
pub fn cache_path(fspf: &Path) -> PathBuf {
    store::sibling(fspf, ".index")
}

fn cache_key(vol_key: &crate::crypto::VolumeKey) -> Result<AeadKey> {
    let mut k = zeroize::Zeroizing::new([0u8; 32]);
    crypto::hkdf_sha256(vol_key.as_bytes(), b"", INFO, &mut k[..])?;
    AeadKey::new(&k[..])
}

/// The index in the cache, if it opens: the buffer and where in it the index lies. The index
/// names the state it describes (its tag is authenticated with it).
pub fn read(
    fspf: &Path,
    vol_key: &crate::crypto::VolumeKey,
) -> Option<(Vec<u8>, std::ops::Range<usize>)> {
    let p = cache_path(fspf);
    let mut f = kernel_fs::open_regular_path(&p).ok()?;
    let len = f.metadata().ok()?.len();
    let head = MAGIC.len() + TAG_LEN + NONCE_LEN;
    if len > MAX_LEN || len < (head + TAG_LEN) as u64 {
        return None;
    }
    let mut b = Vec::with_capacity(len as usize);
    f.read_to_end(&mut b).ok()?;
    if &b[..MAGIC.len()] != MAGIC {
        return None;
    }
    let aad = b[..MAGIC.len() + TAG_LEN].to_vec();
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&b[MAGIC.len() + TAG_LEN..head]);
    let key = cache_key(vol_key).ok()?;
    let n = key.open(nonce, &aad, &mut b[head..])?;
    // Decrypted in place; the index needs no alignment, so it is used where it lies: no second
    // buffer and no move of the index's size (3 MB for 50 000 files, at every `fspf run`).
    let ix = crate::format::index::FrozenIndex::open(&b[head..head + n]).ok()?;
    if ix.tag().0[..] != aad[MAGIC.len()..] {
        return None;
    }
    Some((b, head..head + n))
}

/// Write the cache for `vol` (best effort: a failure only costs the next run a parse).
pub fn write(vol: &Volume) -> Result<()> {
    let Some(vk) = vol.key() else {
        return Ok(());
    };
    // The cache stands for log records whose journals its readers will not learn: the chains
    // through them are made durable first (FORMAT.md §5b, "Journals in the log").
    vol.settle_log_chains()?;
    let index = vol.index_of_state()?;
    // The state the index describes: this volume's, or the older one of the frozen index it
    // is backed by (its log records are replayed on top of it).
    let tag = crate::format::index::FrozenIndex::open(&index)?.tag();
    let mut nonce = [0u8; NONCE_LEN];
    crypto::random_bytes(&mut nonce)?;
    let mut aad = Vec::with_capacity(MAGIC.len() + 16);
    aad.extend_from_slice(MAGIC);
    aad.extend_from_slice(&tag.0);
    let mut body = zeroize::Zeroizing::new(index.to_vec());
    let gtag = cache_key(vk)?.seal(nonce, &aad, &mut body)?;
    let mut out = Vec::with_capacity(aad.len() + NONCE_LEN + body.len() + TAG_LEN);
    out.extend_from_slice(&aad);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&body);
    out.extend_from_slice(&gtag);
    store::write_file_durably(&cache_path(vol.path()), &out, 0o600)
}

/// A cache this many log bytes behind the current state is rewritten by [`refresh`].
pub const REFRESH_MIN: u64 = 16 << 10;

/// How many bytes of the metadata log lie after the state the cache names in its header
/// (`None`: no cache, or its state is no longer in the log). The header is read without the
/// key and not authenticated: it only decides whether [`refresh`] rewrites the cache, which
/// every reader authenticates anyway (reading and decrypting the whole cache here cost about
/// as much as the rest of a small run's end).
fn cache_lag(fspf: &Path) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let f = kernel_fs::open_regular_path(&cache_path(fspf)).ok()?;
    let mut head = [0u8; MAGIC.len() + TAG_LEN];
    f.read_exact_at(&mut head, 0).ok()?;
    if &head[..MAGIC.len()] != MAGIC {
        return None;
    }
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(&head[MAGIC.len()..]);
    super::log::DiskState::read(fspf).ok()?.log_after(Tag(t))
}

/// After a run that committed much: make the cache describe the state with `tag` when the
/// log after the cached state is longer than [`REFRESH_MIN`], so that the next runs' processes
/// replay little (O(n) once, where every later start would otherwise replay the same records).
/// Best effort, like [`write`].
pub fn refresh(fspf: &Path, key: &crate::crypto::VolumeKey, tag: Tag) -> Result<()> {
    if cache_lag(fspf).is_some_and(|l| l <= REFRESH_MIN) {
        return Ok(());
    }
    let v = Volume::open_cached(fspf, key.clone(), tag)?;
    if v.is_indexed() {
        write(&v)?;
    }
    Ok(())
}

impl Volume {
    /// [`Volume::open`] for a caller that holds `key` and trusts `tag`, using the sealed index
    /// cache when it opens and its state is still in the metadata log (nothing is parsed;
    /// reads search the index in place, and the log's later records are applied on top), else
    /// parsing the fspf and writing the cache for the next time. The state on disk must have
    /// `tag` either way (a replaced or rolled-back fspf is refused as by `open`).
    pub fn open_cached(path: &Path, key: crate::crypto::VolumeKey, tag: Tag) -> Result<Volume> {
        let st = super::log::DiskState::read(&store::absolute(path))?;
        if st.tag() == tag {
            if let Some((buf, range)) = read(path, &key) {
                // Kept for the life of the process: the volume searches it in place.
                let bytes: &'static [u8] = &Box::leak(buf.into_boxed_slice())[range];
                if let Ok(mut v) = Volume::from_index(path, Some(key.clone()), bytes) {
                    if matches!(v.catch_up_to(st), Ok(true)) && v.tag() == tag {
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
        // Another key, a flipped byte, or another tag named in its header: not used.
        let other = Volume::open(&p, Some(k.clone()), Some(t1)).unwrap();
        assert!(read(&p, &k).is_some());
        assert!(read(&p, &crate::crypto::VolumeKey::random().unwrap()).is_none());
        let good = std::fs::read(cache_path(&p)).unwrap();
        let mut raw = good.clone();
        raw[10] ^= 1;
        std::fs::write(cache_path(&p), &raw).unwrap();
        assert!(read(&p, &k).is_none(), "the state's tag is authenticated");
        let mut raw = good;
        let mid = raw.len() / 2;
        raw[mid] ^= 1;
        std::fs::write(cache_path(&p), &raw).unwrap();
        assert!(read(&p, &k).is_none());
        let c = Volume::open_cached(&p, k.clone(), t1).unwrap();
        assert!(!c.is_indexed(), "a damaged cache is ignored and rewritten");
        drop(other);
        // A rolled-back fspf is refused whatever the cache says.
        let mut v2 = Volume::open(&p, Some(k.clone()), Some(t1)).unwrap();
        let t2 = v2.save().unwrap();
        assert!(Volume::open_cached(&p, k.clone(), t1).is_err());
        assert!(Volume::open_cached(&p, k, t2).is_ok());
    }

    #[test]
    fn a_cache_far_behind_the_log_is_moved_up_by_refresh() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fspf.pb");
        let mut v = crate::volume::encrypted_root_volume(&p, &d.path().join("vol"));
        let (t, k) = v.encrypt().unwrap();
        let mut v = Volume::open_cached(&p, k.clone(), t).unwrap();
        let mut o = v.options();
        o.log = true;
        v.set_options(o);
        assert_eq!(cache_lag(&p), Some(0));
        let dir = crate::format::metadata::FileEntry {
            links: Vec::new(),
            kind: crate::FileKind::Dir,
            mode: 0o755,
            mtime_ns: 1,
            ctime_ns: 1,
            owner: None,
            ino: None,
        };
        // A few commits: the cache stays (a start replays them).
        let commit = |v: &mut Volume, i: usize| {
            let t = v.tag();
            let c = crate::volume::Change::PutEntry(
                EmbedPath::parse(&format!("/d{i}")).unwrap(),
                dir.clone(),
            );
            v.commit(vec![c], Some(t)).unwrap()
        };
        let mut t = v.tag();
        for i in 0..3 {
            t = commit(&mut v, i);
        }
        let lag = cache_lag(&p).unwrap();
        assert!(lag > 0 && lag <= REFRESH_MIN);
        refresh(&p, &k, t).unwrap();
        assert_eq!(cache_lag(&p), Some(lag), "a short lag is left alone");
        // Many: refresh rewrites the cache at the current state, which then opens as is.
        for i in 3..400 {
            t = commit(&mut v, i);
        }
        assert!(cache_lag(&p).unwrap() > REFRESH_MIN);
        refresh(&p, &k, t).unwrap();
        assert_eq!(cache_lag(&p), Some(0));
        let w = Volume::open_cached(&p, k, t).unwrap();
        assert!(w.is_indexed());
        assert!(w.lookup(&EmbedPath::parse("/d399").unwrap()).is_some());
    }
}

//! The fspf parser after the GCM open: the input is the metadata protobuf that `fspf.pb` seals.
//!
//! Each input goes through two paths that must agree:
//! * directly: `MetadataPb::decode` + `Metadata::from_pb` (what `Volume::open` does after the
//!   GCM open);
//! * the real open path: sealed with a known volume key (and, for odd-length inputs, also under
//!   the public key) into an `fspf.pb` on a tmpfs, then `Volume::open` with key and tag.
//!
//! Never panics; anything accepted is structurally valid (sorted unique regions, keys exactly on
//! protected regions, normalised paths) and round-trips: `from_pb(to_pb(m)) == m` and `to_pb` is
//! a fixed point. Each listed regular file then gets a verified reader over bytes nobody sealed,
//! which must open or fail cleanly and never verify.
#![no_main]

use fspf_core::crypto::{AeadKey, Tag};
use fspf_core::format::header::{Header, CURRENT_VERSION, PUBLIC_KEY};
use fspf_core::format::layout;
use fspf_core::format::metadata::{FileKind, Metadata, MetadataPb, Protection, RegionKind};
use fspf_core::volume::memory::{open_in_memory, SealedMem};
use fspf_core::{EmbedPath, Error, Volume, VolumeKey};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

const VOLUME_KEY: [u8; 32] = [0x5a; 32];

/// `fspf.pb` in a directory that lives as long as the fuzzing process (on tmpfs when there is one).
fn fspf_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("fspf-fuzz-metadata-")
            .tempdir_in(base)
            .expect("scratch dir")
            .keep();
        dir.join("fspf.pb")
    })
}

/// An `fspf.pb` holding `body` sealed like `store::seal` does (header as AAD, tag at the end).
fn seal(body: &[u8], key: Option<&[u8; 32]>, nonce: [u8; 12]) -> (Vec<u8>, Tag) {
    let header = Header {
        version: CURRENT_VERSION,
        sealed: key.is_some(),
        nonce,
    }
    .encode();
    let aead = AeadKey::new(key.unwrap_or(&PUBLIC_KEY)).expect("AES-256 key");
    let mut ct = body.to_vec();
    let tag = aead.seal(nonce, &header, &mut ct).expect("seal");
    let mut out = header.to_vec();
    out.extend_from_slice(&ct);
    out.extend_from_slice(&tag);
    (out, Tag(tag))
}

/// The real open path: write the sealed fspf and open it with its key and tag.
fn open_sealed(body: &[u8], key: Option<&[u8; 32]>) -> fspf_core::Result<Volume> {
    let mut nonce = [0u8; 12];
    for (i, b) in body.iter().take(12).enumerate() {
        nonce[i] = *b;
    }
    let (file, tag) = seal(body, key, nonce);
    let path = fspf_path();
    std::fs::write(path, &file).expect("write scratch fspf");
    let vk = key.map(|k| VolumeKey::from_hex(&hex(k)).expect("volume key"));
    Volume::open(path, vk, Some(tag))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What `from_pb` promises to every later layer.
fn check_invariants(m: &Metadata) {
    for w in m.regions.windows(2) {
        assert!(
            w[0].embed_point < w[1].embed_point,
            "regions not sorted/unique"
        );
    }
    for r in &m.regions {
        assert_eq!(
            EmbedPath::from_bytes(r.embed_point.as_bytes()).unwrap(),
            r.embed_point
        );
        match (&r.key, r.protection) {
            (None, Protection::NotProtected) => {}
            (Some(k), Protection::Authenticated | Protection::Encrypted) => {
                assert!([16, 24, 32].contains(&k.len()), "key of {} bytes", k.len())
            }
            (k, p) => panic!("key {:?} on a {} region", k.is_some(), p.name()),
        }
        assert!((layout::MIN_CHUNK_LEN..=layout::MAX_CHUNK_LEN).contains(&r.chunk_len));
        if let RegionKind::Kernel(k) = &r.kind {
            assert!(
                k.as_os_str().as_encoded_bytes().first() == Some(&b'/'),
                "relative kernel path accepted"
            );
        }
    }
    for (p, e) in &m.files {
        assert_eq!(&EmbedPath::from_bytes(p.as_bytes()).unwrap(), p);
        assert!(e.mode <= 0o7777);
        let _ = m.region_for(p);
    }
    let _ = m.check_usable();
    assert_eq!(m.paths_below(&EmbedPath::root()).len(), m.files.len());
}

/// Readers over bytes that no writer sealed: open or fail cleanly, never verify.
fn check_readers(m: &Metadata) {
    for (p, e) in m.files.iter().take(8) {
        let FileKind::File { id, size, .. } = &e.kind else {
            continue;
        };
        let Some(region) = m.region_for(p) else {
            continue;
        };
        // A forged file of exactly the length the entry expects, when that is small (computed
        // here without the layout functions, so that their arithmetic is fuzzed in the reader).
        let len = match region.protection {
            Protection::Encrypted if *size <= 1 << 16 => {
                Some(24 + size + 16 * size.div_ceil(region.chunk_len as u64).max(1))
            }
            Protection::Encrypted => None,
            _ => Some(*size),
        };
        let mut data = match len {
            Some(l) if l <= 1 << 16 => vec![0u8; l as usize],
            _ => Vec::new(),
        };
        if let Some(h) = data.get_mut(..24) {
            h.copy_from_slice(&fspf_core::codec::enc_header(id));
        }
        let outboard = if *size <= 1 << 16 {
            let need =
                layout::outboard_len(layout::chunk_count(*size, region.chunk_len)).unwrap_or(0);
            (need > 0).then(|| Arc::new(vec![0u8; need as usize]))
        } else {
            None
        };
        let sealed = SealedMem {
            entry: e.clone(),
            data: Arc::new(data),
            outboard,
        };
        let Ok(mut r) = open_in_memory(region, p, &sealed) else {
            continue;
        };
        let mut buf = vec![0u8; 4096];
        match r.read_at(&mut buf, 0) {
            Ok(0) => assert_eq!(*size, 0),
            Ok(n) => panic!("{p}: {n} forged bytes verified"),
            Err(_) => {}
        }
        if *size > 0 {
            assert!(r.verify_all().is_err(), "{p}: forged file verified");
        }
    }
}

fuzz_target!(|body: &[u8]| {
    let direct = MetadataPb::decode(body)
        .map_err(|e| e.to_string())
        .and_then(Metadata::from_pb);
    if let Ok(m) = &direct {
        check_invariants(m);
        let pb = m.to_pb();
        let again = Metadata::from_pb(pb.clone()).expect("to_pb output must parse");
        assert_eq!(&again, m, "from_pb(to_pb(m)) != m");
        assert_eq!(again.to_pb(), pb, "to_pb is not a fixed point");
        let bytes = pb.encode_to_vec();
        assert_eq!(MetadataPb::decode(&bytes[..]).expect("own encoding"), pb);
        check_readers(m);
    }

    let mut keys: Vec<Option<&[u8; 32]>> = vec![Some(&VOLUME_KEY)];
    if body.len() % 2 == 1 {
        keys.push(None);
    }
    for key in keys {
        match (open_sealed(body, key), &direct) {
            (Ok(v), Ok(m)) => {
                assert_eq!(&v.meta, m, "Volume::open parsed differently");
                assert_eq!(v.is_encrypted(), key.is_some());
            }
            (Err(Error::MalformedMetadata { .. }), Err(_)) => {}
            (Ok(_), Err(e)) => panic!("Volume::open accepted what from_pb rejects: {e}"),
            (Err(e), _) => panic!("Volume::open failed unexpectedly: {e}"),
        }
    }
});

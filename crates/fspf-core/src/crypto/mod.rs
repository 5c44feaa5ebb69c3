//! Keys, tags and the primitives fspf uses: AES-GCM (128/192/256), HKDF-SHA256, keyed BLAKE3 and
//! the OS CSPRNG. This is the only module that names aws-lc-rs; key types zeroize on drop and
//! never print their bytes.
use crate::error::{Error, Result};
use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::hkdf;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Length of an AES-GCM tag and of the fspf trust-anchor tag.
pub const TAG_LEN: usize = 16;
/// Length of an AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Length of a random file id.
pub const FILE_ID_LEN: usize = 16;

/// Fill `buf` from the OS CSPRNG (`getrandom(2)`, blocking until the kernel's generator is
/// seeded). Not aws-lc's DRBG: its first use in a process seeds a CPU-jitter entropy source,
/// about 30 ms of CPU that every shielded process paid at its first commit (and every mutable
/// `fspf run` at its start).
pub fn random_bytes(buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::rand::getrandom(&mut buf[done..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                return Err(Error::Other(format!(
                    "the OS random number generator failed: {e}"
                )))
            }
        }
    }
    Ok(())
}

/// The 16-byte AES-GCM tag of `fspf.pb`: together with the volume key, the trust anchor.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Tag(pub [u8; TAG_LEN]);

impl Tag {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn from_hex(s: &str) -> Result<Tag> {
        let s = s.trim();
        let mut out = [0u8; TAG_LEN];
        hex::decode_to_slice(s, &mut out).map_err(|_| {
            Error::InvalidTag(format!("expected {} hex digits, got {:?}", TAG_LEN * 2, s))
        })?;
        Ok(Tag(out))
    }
}
impl std::fmt::Debug for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tag({})", self.to_hex())
    }
}
impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Random per-file(-version) identifier; file keys are derived from it, so every version of every
/// file is sealed under its own key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FileId(pub [u8; FILE_ID_LEN]);
impl FileId {
    pub fn random() -> Result<FileId> {
        let mut b = [0u8; FILE_ID_LEN];
        random_bytes(&mut b)?;
        Ok(FileId(b))
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}
impl std::fmt::Debug for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileId({})", self.to_hex())
    }
}

/// Symmetric key bytes of 16, 24 or 32 bytes. Zeroized on drop, redacted in `Debug`.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct SecretBytes(Vec<u8>);
impl SecretBytes {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    fn parse(bytes: Vec<u8>) -> Result<SecretBytes> {
        match bytes.len() {
            16 | 24 | 32 => Ok(SecretBytes(bytes)),
            n => {
                let mut b = bytes;
                b.zeroize();
                Err(Error::InvalidKey(format!(
                    "key must be 16, 24 or 32 bytes, got {n}"
                )))
            }
        }
    }
    fn random(len: usize) -> Result<SecretBytes> {
        let mut v = vec![0u8; len];
        random_bytes(&mut v)?;
        SecretBytes::parse(v)
    }
}
impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(**redacted**)")
    }
}

/// Key of a region (random, stored inside the encrypted fspf).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RegionKey(pub SecretBytes);
impl RegionKey {
    pub fn random(len: usize) -> Result<RegionKey> {
        Ok(RegionKey(SecretBytes::random(len)?))
    }
    pub fn from_bytes(b: Vec<u8>) -> Result<RegionKey> {
        Ok(RegionKey(SecretBytes::parse(b)?))
    }
    pub fn len(&self) -> usize {
        self.0 .0.len()
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// Key that seals `fspf.pb` (printed by `fspf encrypt`). Always 32 bytes (AES-256-GCM).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct VolumeKey(pub SecretBytes);
impl VolumeKey {
    pub fn random() -> Result<VolumeKey> {
        Ok(VolumeKey(SecretBytes::random(32)?))
    }
    pub fn from_hex(s: &str) -> Result<VolumeKey> {
        let s = Zeroizing::new(s.trim().to_string());
        let bytes = hex::decode(s.as_bytes()).map_err(|_| {
            Error::InvalidKey("the key must be hex (64 hex digits for 32 bytes)".into())
        })?;
        if bytes.len() != 32 {
            let n = bytes.len();
            let mut b = bytes;
            b.zeroize();
            return Err(Error::InvalidKey(format!(
                "the fspf key must be 32 bytes (64 hex digits), got {n} bytes"
            )));
        }
        Ok(VolumeKey(SecretBytes::parse(bytes)?))
    }
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0.as_bytes()))
    }
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

fn algorithm(key_len: usize) -> Result<&'static aead::Algorithm> {
    match key_len {
        16 => Ok(&aead::AES_128_GCM),
        24 => Ok(&aead::AES_192_GCM),
        32 => Ok(&aead::AES_256_GCM),
        n => Err(Error::InvalidKey(format!(
            "AES-GCM key must be 16, 24 or 32 bytes, got {n}"
        ))),
    }
}

/// An AES-GCM key ready for sealing and opening.
pub struct AeadKey(LessSafeKey);
impl AeadKey {
    pub fn new(key: &[u8]) -> Result<AeadKey> {
        let alg = algorithm(key.len())?;
        let k = UnboundKey::new(alg, key)
            .map_err(|_| Error::InvalidKey("AES-GCM key rejected".into()))?;
        Ok(AeadKey(LessSafeKey::new(k)))
    }
    /// Encrypt `in_out` in place, returning the tag.
    pub fn seal(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN]> {
        let tag = self
            .0
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), in_out)
            .map_err(|_| Error::Other("AES-GCM seal failed (message too long)".into()))?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }
    /// Decrypt `ct_and_tag` in place; returns the plaintext length. `None` when authentication fails.
    pub fn open(&self, nonce: [u8; NONCE_LEN], aad: &[u8], ct_and_tag: &mut [u8]) -> Option<usize> {
        self.0
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                ct_and_tag,
            )
            .ok()
            .map(|p| p.len())
    }
    /// Decrypt `in_out` (ciphertext without its tag) in place after checking `tag`. Returns
    /// `false` when authentication fails; `in_out` is then zeroed, so neither ciphertext nor
    /// unverified plaintext is left in it.
    pub fn open_in_place_to(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        tag: &[u8],
        in_out: &mut [u8],
    ) -> bool {
        let ok = tag.len() == TAG_LEN
            && self
                .0
                .open_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    tag,
                    in_out,
                )
                .is_ok();
        if !ok {
            in_out.fill(0);
        }
        ok
    }
    /// Decrypt `ct` (ciphertext without its tag) into `out` (same length) after checking `tag`.
    /// Returns `false` when authentication fails; `out` is then zeroed, so no unverified
    /// plaintext is left in it.
    pub fn open_to(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        ct: &[u8],
        tag: &[u8],
        out: &mut [u8],
    ) -> bool {
        let ok = ct.len() == out.len()
            && tag.len() == TAG_LEN
            && self
                .0
                .open_separate_gather(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    ct,
                    tag,
                    out,
                )
                .is_ok();
        if !ok {
            out.fill(0);
        }
        ok
    }
}
impl std::fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AeadKey(**redacted**)")
    }
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-SHA256(ikm, salt, info) → `len` bytes (RFC 5869).
pub fn hkdf_sha256(ikm: &[u8], salt: &[u8], info: &[u8], out: &mut [u8]) -> Result<()> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let info = [info];
    let okm = prk
        .expand(&info, Len(out.len()))
        .map_err(|_| Error::Other("HKDF output too long".into()))?;
    okm.fill(out)
        .map_err(|_| Error::Other("HKDF fill failed".into()))
}

/// HKDF info strings; part of the normative format (docs/FORMAT.md §Keys).
pub const INFO_CHUNK_KEY: &[u8] = b"fspf v1 chunk key";
pub const INFO_MAC_KEY: &[u8] = b"fspf v1 mac key";

/// AES-GCM key for the chunks of one file version: HKDF(region key, salt = file id).
pub fn file_chunk_key(region: &RegionKey, id: &FileId) -> Result<AeadKey> {
    let mut k = Zeroizing::new(vec![0u8; region.len()]);
    hkdf_sha256(region.as_bytes(), &id.0, INFO_CHUNK_KEY, &mut k)?;
    AeadKey::new(&k)
}

/// Keyed-BLAKE3 key for the chunks of one authenticated file version.
pub fn file_mac_key(region: &RegionKey, id: &FileId) -> Result<MacKey> {
    let mut k = [0u8; 32];
    hkdf_sha256(region.as_bytes(), &id.0, INFO_MAC_KEY, &mut k)?;
    Ok(MacKey(k))
}

/// HKDF info strings of encrypted-file format 2 (docs/FORMAT.md §4a).
pub const INFO_CHUNK_KEY_V2: &[u8] = b"fspf v2 chunk key";
pub const INFO_TREE_KEY_V2: &[u8] = b"fspf v2 tree key";
/// Bytes of a format-2 key epoch.
pub const EPOCH_LEN: usize = 16;

/// AES-GCM key for the chunks of a format-2 file sealed in one epoch: HKDF(region key,
/// salt = file id || epoch). Every seal of a chunk draws a fresh random epoch (at most one seal
/// per chunk index per epoch), so (key, nonce = chunk index) is never used twice.
pub fn epoch_chunk_key(
    region: &RegionKey,
    id: &FileId,
    epoch: &[u8; EPOCH_LEN],
) -> Result<AeadKey> {
    let mut salt = [0u8; FILE_ID_LEN + EPOCH_LEN];
    salt[..FILE_ID_LEN].copy_from_slice(&id.0);
    salt[FILE_ID_LEN..].copy_from_slice(epoch);
    let mut k = Zeroizing::new(vec![0u8; region.len()]);
    hkdf_sha256(region.as_bytes(), &salt, INFO_CHUNK_KEY_V2, &mut k)?;
    AeadKey::new(&k)
}

/// Keyed-BLAKE3 key for the chunk-tree pages of a format-2 file.
pub fn tree_key(region: &RegionKey, id: &FileId) -> Result<MacKey> {
    let mut k = [0u8; 32];
    hkdf_sha256(region.as_bytes(), &id.0, INFO_TREE_KEY_V2, &mut k)?;
    Ok(MacKey(k))
}

/// 32-byte keyed-BLAKE3 key. Zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MacKey(pub [u8; 32]);
impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey(**redacted**)")
    }
}
impl MacKey {
    /// Leaf hash of chunk `index`: BLAKE3-keyed(0x00 || index u64 LE || last u8 || data).
    pub fn leaf(&self, index: u64, last: bool, data: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(&[0u8]);
        h.update(&index.to_le_bytes());
        h.update(&[last as u8]);
        h.update(data);
        *h.finalize().as_bytes()
    }
    /// Hash of a format-2 chunk-tree page: BLAKE3-keyed(0x02 || level u8 || index u64 LE ||
    /// page), binding the page to its place in the tree.
    pub fn page(&self, level: u32, index: u64, page: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(&[2u8, level as u8]);
        h.update(&index.to_le_bytes());
        h.update(page);
        *h.finalize().as_bytes()
    }
    /// Interior node: BLAKE3-keyed(0x01 || left || right).
    pub fn node(&self, left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(&[1u8]);
        h.update(left);
        h.update(right);
        *h.finalize().as_bytes()
    }
}

/// Constant-time equality for tags and roots.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn debug_output_never_shows_key_bytes() {
        let k = VolumeKey::from_hex(&"ab".repeat(32)).unwrap();
        let s = format!("{k:?}");
        assert!(!s.contains("ab"), "{s}");
        assert!(s.contains("redacted"));
    }
    #[test]
    fn region_key_lengths() {
        for l in [16, 24, 32] {
            let k = RegionKey::random(l).unwrap();
            assert_eq!(k.len(), l);
            let id = FileId::random().unwrap();
            let a = file_chunk_key(&k, &id).unwrap();
            let mut buf = *b"hello";
            let t = a.seal([0; 12], b"", &mut buf).unwrap();
            let mut ct = buf.to_vec();
            ct.extend_from_slice(&t);
            assert_eq!(a.open([0; 12], b"", &mut ct), Some(5));
            assert_eq!(&ct[..5], b"hello");
        }
        assert!(RegionKey::random(20).is_err());
    }
    #[test]
    fn volume_key_rejects_wrong_length() {
        assert!(VolumeKey::from_hex("abcd").is_err());
        assert!(VolumeKey::from_hex("zz").is_err());
    }
}

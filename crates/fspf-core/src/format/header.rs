//! `fspf.pb` container: a 20-byte plaintext header, then AES-256-GCM(metadata) and its 16-byte tag.
//!
//! ```text
//! 0   4  magic "FSPF"
//! 4   2  format version, u16 LE (3; 2 before the metadata log, 1 before format-2 files)
//! 6   2  flags, u16 LE: bit 0 = sealed with the user's volume key (else with PUBLIC_KEY)
//! 8  12  nonce (random for every write)
//! 20  n  AES-256-GCM ciphertext of the protobuf `Metadata`; AAD = bytes 0..20
//! 20+n 16 GCM tag (the fspf tag printed by the CLI)
//! ```
use crate::crypto::{NONCE_LEN, TAG_LEN};

pub const MAGIC: [u8; 4] = *b"FSPF";
pub const VERSION_1: u16 = 1;
/// Adds format-2 encrypted files (FORMAT.md §4a): a version-1 reader must refuse the fspf
/// rather than take those files for tampered ones.
pub const VERSION_2: u16 = 2;
/// Adds the metadata log (FORMAT.md §5c): the current state is the checkpoint with the records
/// of `FSPF.log` applied. A version-2 reader would take the checkpoint for the current state and
/// refuse it for its tag; it must refuse the version instead.
pub const VERSION_3: u16 = 3;
pub const CURRENT_VERSION: u16 = VERSION_3;
pub const HEADER_LEN: usize = 20;
pub const FLAG_SEALED: u16 = 1;
/// Largest `fspf.pb` readers accept and writers produce: 1 GiB (about 20 million entries). Checked
/// against the file's length before it is read, so a huge or endless file is refused up front.
pub const MAX_FSPF_LEN: u64 = 1 << 30;

/// Key used before `fspf encrypt`: public on purpose, so `show --tag` and the tag chain work from
/// `create` on. Metadata sealed with it is authenticated against accidents, not against attackers.
pub const PUBLIC_KEY: [u8; 32] = *b"fspf v1 public (unencrypted) key";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub sealed: bool,
    pub nonce: [u8; NONCE_LEN],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    BadMagic,
    Truncated(usize),
    UnsupportedVersion(u16),
    UnknownFlags(u16),
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        let flags = if self.sealed { FLAG_SEALED } else { 0 };
        b[6..8].copy_from_slice(&flags.to_le_bytes());
        b[8..20].copy_from_slice(&self.nonce);
        b
    }

    /// Parse the header of a whole fspf file. Also checks there is room for a tag.
    pub fn decode(file: &[u8]) -> Result<Header, HeaderError> {
        if file.len() >= 4 && file[0..4] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if file.len() < HEADER_LEN + TAG_LEN {
            return Err(HeaderError::Truncated(file.len()));
        }
        let version = u16::from_le_bytes([file[4], file[5]]);
        if version == 0 || version > CURRENT_VERSION {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        let flags = u16::from_le_bytes([file[6], file[7]]);
        if flags & !FLAG_SEALED != 0 {
            return Err(HeaderError::UnknownFlags(flags));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&file[8..20]);
        Ok(Header {
            version,
            sealed: flags & FLAG_SEALED != 0,
            nonce,
        })
    }
}

/// The tag of an fspf file: its last 16 bytes (no key needed).
pub fn tag_of(file: &[u8]) -> Result<[u8; TAG_LEN], HeaderError> {
    Header::decode(file)?;
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(&file[file.len() - TAG_LEN..]);
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn header_roundtrip() {
        let h = Header {
            version: 1,
            sealed: true,
            nonce: [7; 12],
        };
        let mut f = h.encode().to_vec();
        f.extend_from_slice(&[0; 16]);
        assert_eq!(Header::decode(&f), Ok(h));
    }
    #[test]
    fn header_rejects_garbage() {
        assert_eq!(
            Header::decode(b"XXXXaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            Err(HeaderError::BadMagic)
        );
        assert_eq!(Header::decode(b"FSPF"), Err(HeaderError::Truncated(4)));
        let mut f = Header {
            version: 1,
            sealed: false,
            nonce: [0; 12],
        }
        .encode()
        .to_vec();
        f.extend_from_slice(&[0; 16]);
        f[4] = 9;
        assert_eq!(Header::decode(&f), Err(HeaderError::UnsupportedVersion(9)));
    }
}

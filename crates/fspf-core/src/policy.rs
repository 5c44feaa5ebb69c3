//! Embed paths (the paths a protected program sees) and their mapping to regions and kernel paths.
//! An embed path is absolute and normalised: no `.`/`..`/empty components, no trailing slash.
use crate::error::{Error, Result};
use crate::format::metadata::{Region, RegionKind};
use std::path::{Path, PathBuf};

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EmbedPath(Box<[u8]>);

impl EmbedPath {
    pub fn root() -> EmbedPath {
        EmbedPath(Box::from(&b"/"[..]))
    }

    /// Parse an absolute path, normalising `//`, `.` and `..` lexically (`/..` stays `/`).
    pub fn from_bytes(b: &[u8]) -> Result<EmbedPath> {
        if b.first() != Some(&b'/') {
            return Err(Error::InvalidPath {
                path: String::from_utf8_lossy(b).into_owned(),
                reason: "embed paths must be absolute (start with /)",
            });
        }
        if b.contains(&0) {
            return Err(Error::InvalidPath {
                path: String::from_utf8_lossy(b).into_owned(),
                reason: "NUL byte in path",
            });
        }
        let mut parts: Vec<&[u8]> = Vec::new();
        for c in b.split(|&x| x == b'/') {
            match c {
                b"" | b"." => {}
                b".." => {
                    parts.pop();
                }
                c => parts.push(c),
            }
        }
        Ok(Self::from_parts(&parts))
    }

    fn from_parts(parts: &[&[u8]]) -> EmbedPath {
        if parts.is_empty() {
            return EmbedPath::root();
        }
        let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
        for p in parts {
            out.push(b'/');
            out.extend_from_slice(p);
        }
        EmbedPath(out.into_boxed_slice())
    }

    pub fn from_path(p: &Path) -> Result<EmbedPath> {
        Self::from_bytes(p.as_os_str().as_encoded_bytes())
    }

    pub fn parse(s: &str) -> Result<EmbedPath> {
        Self::from_bytes(s.as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_path_buf(&self) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        PathBuf::from(std::ffi::OsStr::from_bytes(&self.0))
    }

    /// The inode number of an entry that records none: a hash of the path (FNV-1a, odd), the
    /// same in every process. An entry records one when it first moves (FORMAT.md §2), so that a
    /// rename keeps it.
    pub fn default_ino(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.as_bytes() {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        h | 1
    }

    pub fn is_root(&self) -> bool {
        &*self.0 == b"/"
    }

    /// True when `self` is `prefix` or lies below it (component-wise: `/database` is not in `/data`).
    pub fn starts_with(&self, prefix: &EmbedPath) -> bool {
        if prefix.is_root() {
            return true;
        }
        let (s, p) = (&*self.0, &*prefix.0);
        s.starts_with(p) && (s.len() == p.len() || s[p.len()] == b'/')
    }

    /// Path of `self` relative to `prefix` (empty when equal). `None` when not below it.
    pub fn strip_prefix(&self, prefix: &EmbedPath) -> Option<&[u8]> {
        if !self.starts_with(prefix) {
            return None;
        }
        if prefix.is_root() {
            return Some(&self.0[1..]);
        }
        let rest = &self.0[prefix.0.len()..];
        Some(rest.strip_prefix(b"/").unwrap_or(rest))
    }

    /// `self` with its prefix `from` replaced by `to` (a rename of `from`); `None` when `self` is
    /// not `from` or below it.
    pub fn rebased(&self, from: &EmbedPath, to: &EmbedPath) -> Option<EmbedPath> {
        let rest = self.strip_prefix(from)?;
        if rest.is_empty() {
            return Some(to.clone());
        }
        to.join(rest).ok()
    }

    /// `self` joined with a relative path (which is normalised; `..` cannot escape `self`'s root).
    pub fn join(&self, rel: &[u8]) -> Result<EmbedPath> {
        let mut v = self.0.to_vec();
        v.push(b'/');
        v.extend_from_slice(rel);
        EmbedPath::from_bytes(&v)
    }

    pub fn parent(&self) -> Option<EmbedPath> {
        if self.is_root() {
            return None;
        }
        let i = self.0.iter().rposition(|&c| c == b'/').unwrap_or(0);
        Some(if i == 0 {
            EmbedPath::root()
        } else {
            EmbedPath(Box::from(&self.0[..i]))
        })
    }

    /// The bytes every path strictly below `self` starts with: `/` for the root, else `self/`.
    pub fn child_prefix(&self) -> Vec<u8> {
        let mut p = self.0.to_vec();
        if !self.is_root() {
            p.push(b'/');
        }
        p
    }

    pub fn file_name(&self) -> &[u8] {
        let i = self.0.iter().rposition(|&c| c == b'/').map_or(0, |i| i + 1);
        &self.0[i..]
    }

    /// Kernel path of `self` inside `region` (`None` for ephemeral regions or paths outside it).
    pub fn kernel_path(&self, region: &Region) -> Option<PathBuf> {
        let RegionKind::Kernel(base) = &region.kind else {
            return None;
        };
        let rel = self.strip_prefix(&region.embed_point)?;
        if rel.is_empty() {
            return Some(base.clone());
        }
        use std::os::unix::ffi::OsStrExt;
        Some(base.join(std::ffi::OsStr::from_bytes(rel)))
    }
}

/// Maps keyed by `EmbedPath` can be searched with byte strings that are not embed paths (the
/// prefix `/a/` of a subtree). Sound because `Eq`, `Ord` and `Hash` are those of the bytes; an
/// order other than byte order (e.g. the frozen index's, `/` lowest) would break this.
impl std::borrow::Borrow<[u8]> for EmbedPath {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Display for EmbedPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}
impl std::fmt::Debug for EmbedPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EmbedPath({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn p(s: &str) -> EmbedPath {
        EmbedPath::parse(s).unwrap()
    }
    #[test]
    fn normalises() {
        assert_eq!(p("/a//b/./c/../d/").to_string(), "/a/b/d");
        assert_eq!(p("/..").to_string(), "/");
        assert!(EmbedPath::parse("rel/x").is_err());
    }
    #[test]
    fn prefix_is_component_wise() {
        assert!(p("/data/x").starts_with(&p("/data")));
        assert!(p("/data").starts_with(&p("/data")));
        assert!(!p("/database").starts_with(&p("/data")));
        assert!(p("/anything").starts_with(&p("/")));
        assert_eq!(p("/data/x/y").strip_prefix(&p("/data")), Some(&b"x/y"[..]));
        assert_eq!(p("/x").strip_prefix(&p("/")), Some(&b"x"[..]));
        assert_eq!(p("/data").strip_prefix(&p("/data")), Some(&b""[..]));
    }
    #[test]
    fn parent_and_name() {
        assert_eq!(p("/a/b").parent(), Some(p("/a")));
        assert_eq!(p("/a").parent(), Some(p("/")));
        assert_eq!(p("/").parent(), None);
        assert_eq!(p("/a/b").file_name(), b"b");
    }
}

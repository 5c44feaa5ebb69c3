//! Layer merging as an overlay does it, computed from the top layer down so that one pass over
//! each layer decides whether a member is the one a container sees: a member is hidden by any
//! higher layer that defines its path, removes it or an ancestor (`.wh.NAME`), makes an
//! ancestor opaque (`.wh..wh..opq`), or puts a non-directory at an ancestor.
use crate::paths::ancestors;
use std::collections::{HashMap, HashSet};

/// A whiteout member: what it removes from the layers below.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Whiteout {
    /// `DIR/.wh.NAME`: `DIR/NAME` and everything below it.
    Remove(Vec<u8>),
    /// `DIR/.wh..wh..opq`: everything below `DIR`.
    Opaque(Vec<u8>),
}

/// Is the member at `path` (a member path) a whiteout?
pub fn whiteout(path: &[u8]) -> Option<Whiteout> {
    let slash = path.iter().rposition(|&b| b == b'/')?;
    let (dir, name) = (&path[..slash], &path[slash + 1..]);
    let dir = if dir.is_empty() { &b"/"[..] } else { dir };
    if name == b".wh..wh..opq" {
        return Some(Whiteout::Opaque(dir.to_vec()));
    }
    let removed = name.strip_prefix(b".wh.")?;
    let mut p = dir.to_vec();
    if p != b"/" {
        p.push(b'/');
    }
    p.extend_from_slice(removed);
    Some(Whiteout::Remove(p))
}

/// What the layers above the current one define.
#[derive(Debug, Default)]
pub struct Upper {
    /// Paths defined above, and whether as a directory.
    defined: HashMap<Vec<u8>, bool>,
    removed: HashSet<Vec<u8>>,
    opaque: HashSet<Vec<u8>>,
}

/// What one layer defines, applied to the layers below it once the layer is read.
#[derive(Debug, Default)]
pub struct LayerMarks {
    defined: Vec<(Vec<u8>, bool)>,
    whiteouts: Vec<Whiteout>,
}

impl LayerMarks {
    pub fn define(&mut self, path: &[u8], is_dir: bool) {
        self.defined.push((path.to_vec(), is_dir));
    }
    pub fn whiteout(&mut self, w: Whiteout) {
        self.whiteouts.push(w);
    }
}

impl Upper {
    /// Is a member at `path` of the current layer hidden by the layers above?
    pub fn hides(&self, path: &[u8]) -> bool {
        if self.defined.contains_key(path) || self.removed.contains(path) {
            return true;
        }
        ancestors(path).any(|a| {
            self.removed.contains(a)
                || self.opaque.contains(a)
                || self.defined.get(a).is_some_and(|dir| !dir)
        })
    }

    /// The current layer is read: what it defines now applies to the layers below.
    pub fn absorb(&mut self, marks: LayerMarks) {
        for (p, dir) in marks.defined {
            // A directory defined higher up keeps its kind; a lower one never overrides.
            self.defined.entry(p).or_insert(dir);
        }
        for w in marks.whiteouts {
            match w {
                Whiteout::Remove(p) => {
                    self.removed.insert(p);
                }
                Whiteout::Opaque(p) => {
                    self.opaque.insert(p);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(defs: &[(&str, bool)], wh: &[&str]) -> LayerMarks {
        let mut m = LayerMarks::default();
        for (p, d) in defs {
            m.define(p.as_bytes(), *d);
        }
        for w in wh {
            m.whiteout(whiteout(w.as_bytes()).expect("a whiteout"));
        }
        m
    }

    #[test]
    fn whiteout_names_are_recognised() {
        assert_eq!(
            whiteout(b"/a/.wh.b"),
            Some(Whiteout::Remove(b"/a/b".to_vec()))
        );
        assert_eq!(whiteout(b"/.wh.b"), Some(Whiteout::Remove(b"/b".to_vec())));
        assert_eq!(
            whiteout(b"/a/.wh..wh..opq"),
            Some(Whiteout::Opaque(b"/a".to_vec()))
        );
        assert_eq!(whiteout(b"/a/b"), None);
    }

    #[test]
    fn a_removed_path_hides_the_lower_file_and_everything_below_it() {
        let mut u = Upper::default();
        u.absorb(layer(&[], &["/etc/.wh.secret", "/.wh.opt"]));
        assert!(u.hides(b"/etc/secret"));
        assert!(u.hides(b"/opt/x/y"));
        assert!(!u.hides(b"/etc/passwd"));
        assert!(!u.hides(b"/etc/secretive"));
    }

    #[test]
    fn an_opaque_directory_hides_lower_children_not_itself() {
        let mut u = Upper::default();
        u.absorb(layer(
            &[("/app", true), ("/app/new", false)],
            &["/app/.wh..wh..opq"],
        ));
        assert!(u.hides(b"/app/old"));
        assert!(u.hides(b"/app/new"));
        // The directory entry itself is defined above, so its lower copy is hidden too.
        assert!(u.hides(b"/app"));
    }

    #[test]
    fn directories_merge_but_a_file_replaces_a_lower_tree() {
        let mut u = Upper::default();
        u.absorb(layer(&[("/usr", true), ("/usr/lib", false)], &[]));
        assert!(!u.hides(b"/usr/bin/x"));
        assert!(u.hides(b"/usr/lib/libc.so"));
        assert!(u.hides(b"/usr/lib"));
    }
}

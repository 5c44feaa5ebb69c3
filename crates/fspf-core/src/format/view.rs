//! Read access to an fspf's namespace that does not care how it is stored: [`MetaView`] is
//! implemented by the parsed [`Metadata`] and by the mapped [`FrozenIndex`], with the same answers.
use crate::format::index::{FrozenChildren, FrozenIndex};
use crate::format::metadata::{region_index_in, FileEntry, FileKind, Metadata, Region};
use crate::policy::EmbedPath;
use std::borrow::Cow;

/// What a directory entry is, as a listing reports it (`d_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChildKind {
    File,
    Dir,
    Symlink,
    /// A fifo, device node or socket.
    Special,
}

impl ChildKind {
    /// The kind a listing shows for an entry of `kind`; a hard link shows its target's
    /// (`target` looks it up; a regular file if it is not listed, which parsing refuses).
    pub fn of(kind: &FileKind, target: impl FnOnce(&EmbedPath) -> Option<FileKind>) -> ChildKind {
        match kind {
            FileKind::File { .. } => ChildKind::File,
            FileKind::Dir => ChildKind::Dir,
            FileKind::Symlink(_) => ChildKind::Symlink,
            FileKind::Special { .. } => ChildKind::Special,
            FileKind::Link(t) => match target(t) {
                Some(FileKind::Special { .. }) => ChildKind::Special,
                _ => ChildKind::File,
            },
        }
    }
}

/// The namespace of an fspf: listed entries, directory listings and regions.
///
/// Listings follow one rule on every backing: the direct children of `dir` are the first
/// components below `dir` of all listed paths, each once, in byte order of the name. A child that
/// is listed has the kind of its entry; one that is only implied by paths below it (`/a/b/c`
/// listed, `/a/b` not) is a directory.
pub trait MetaView {
    /// Generation of the fspf this view shows (bumped by every commit).
    fn generation(&self) -> u64;
    /// Regions, sorted by embed point.
    fn regions(&self) -> &[Region];
    /// The entry listed at `path`. O(log n).
    fn entry(&self, path: &EmbedPath) -> Option<Cow<'_, FileEntry>>;
    /// Direct children of `dir`. O(log n + k) for k children without descendants; a child with
    /// s descendants adds O(log s) (its subtree is jumped over, never walked).
    fn children(&self, dir: &EmbedPath) -> Children<'_>;
    /// Is any path listed strictly below `dir`? O(log n).
    fn has_below(&self, dir: &EmbedPath) -> bool;

    /// The region that owns `path` (longest embed-point prefix, by whole components).
    fn region_for(&self, path: &EmbedPath) -> Option<&Region> {
        let regions = self.regions();
        region_index_in(regions, path).and_then(|i| regions.get(i))
    }
}

/// Iterator over `(name, kind)` of a directory's children, from either backing.
pub struct Children<'a>(ChildrenInner<'a>);

enum ChildrenInner<'a> {
    /// Collected from a `Metadata` (its byte order scatters implied directories; see there).
    Listed(std::vec::IntoIter<(&'a [u8], ChildKind)>),
    Frozen(FrozenChildren<'a>),
}

impl<'a> Children<'a> {
    pub(crate) fn listed(v: Vec<(&'a [u8], ChildKind)>) -> Children<'a> {
        Children(ChildrenInner::Listed(v.into_iter()))
    }
    pub(crate) fn frozen(c: FrozenChildren<'a>) -> Children<'a> {
        Children(ChildrenInner::Frozen(c))
    }
}

impl<'a> Iterator for Children<'a> {
    type Item = (&'a [u8], ChildKind);
    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.0 {
            ChildrenInner::Listed(it) => it.next(),
            ChildrenInner::Frozen(it) => it.next(),
        }
    }
}

impl MetaView for Metadata {
    fn generation(&self) -> u64 {
        self.generation
    }
    fn regions(&self) -> &[Region] {
        &self.regions
    }
    fn entry(&self, path: &EmbedPath) -> Option<Cow<'_, FileEntry>> {
        self.files.get(path).map(Cow::Borrowed)
    }
    fn children(&self, dir: &EmbedPath) -> Children<'_> {
        Metadata::children(self, dir)
    }
    fn has_below(&self, dir: &EmbedPath) -> bool {
        Metadata::has_below(self, dir)
    }
}

impl MetaView for FrozenIndex<'_> {
    fn generation(&self) -> u64 {
        FrozenIndex::generation(self)
    }
    fn regions(&self) -> &[Region] {
        FrozenIndex::regions(self)
    }
    fn entry(&self, path: &EmbedPath) -> Option<Cow<'_, FileEntry>> {
        self.get(path).map(Cow::Owned)
    }
    fn children(&self, dir: &EmbedPath) -> Children<'_> {
        FrozenIndex::children(self, dir)
    }
    fn has_below(&self, dir: &EmbedPath) -> bool {
        FrozenIndex::has_below(self, dir)
    }
}

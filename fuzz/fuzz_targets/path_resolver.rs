//! Embed path parsing and normalisation (`policy::EmbedPath`) and region resolution
//! (`Metadata::region_for`: longest prefix by whole components; `EmbedPath::kernel_path`).
//!
//! Never panics. Parsing accepts exactly the absolute paths without NUL, and its result is
//! normalised (no empty, `.` or `..` components, no trailing `/`), agrees with a normaliser built
//! on `std::path::Path::components`, and is a fixed point (normalisation is idempotent).
//! `parent`/`file_name`/`join`/`starts_with`/`strip_prefix` agree with each other. A path resolves
//! to the region a brute-force longest-component-prefix search picks, and the kernel path of a
//! path in a kernel region lies below that region's kernel directory: the part after the directory
//! is made of normal components only (no `..`, `.` or root to escape with), one per component of
//! the path below the embed point, and distinct paths of a region get distinct kernel paths.
#![no_main]

use arbitrary::Arbitrary;
use fspf_core::format::metadata::{FileEntry, FileKind, Metadata, Protection, Region, RegionKind};
use fspf_core::EmbedPath;
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, Arbitrary)]
struct RegionIn {
    embed_point: Vec<u8>,
    /// `None`: ephemeral.
    kernel: Option<Vec<u8>>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    paths: Vec<Vec<u8>>,
    regions: Vec<RegionIn>,
    rel: Vec<u8>,
}

/// Independent normaliser: `Path::components` (which already drops empty and `.` components),
/// with `..` popping lexically and never above the root.
fn model_components(b: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for c in Path::new(OsStr::from_bytes(b)).components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n.as_bytes().to_vec()),
        }
    }
    out
}

fn components(p: &EmbedPath) -> Vec<&[u8]> {
    if p.is_root() {
        Vec::new()
    } else {
        p.as_bytes()[1..].split(|&x| x == b'/').collect()
    }
}

fn check_normalised(p: &EmbedPath) {
    let b = p.as_bytes();
    assert_eq!(b.first(), Some(&b'/'));
    assert!(!b.contains(&0));
    if !p.is_root() {
        assert!(!b.ends_with(b"/"), "trailing slash in {p:?}");
        for c in components(p) {
            assert!(!matches!(c, b"" | b"." | b".."), "component {c:?} in {p:?}");
        }
    }
    let again = EmbedPath::from_bytes(b).expect("a normalised path parses");
    assert_eq!(&again, p, "normalisation is not idempotent");
    assert_eq!(&EmbedPath::from_path(&p.to_path_buf()).expect("parses"), p);
    let _ = p.to_string();
}

fn check_parent(p: &EmbedPath) {
    match p.parent() {
        None => assert!(p.is_root()),
        Some(parent) => {
            assert!(!p.is_root());
            check_normalised(&parent);
            let name = p.file_name();
            assert!(!name.is_empty() && !name.contains(&b'/'));
            assert_eq!(&parent.join(name).expect("join"), p);
            assert!(p.starts_with(&parent) && p != &parent);
            assert_eq!(components(&parent).len() + 1, components(p).len());
        }
    }
}

fn check_pair(p: &EmbedPath, q: &EmbedPath) {
    let (pc, qc) = (components(p), components(q));
    let model = pc.len() >= qc.len() && pc[..qc.len()] == qc[..];
    assert_eq!(p.starts_with(q), model, "{p:?} starts_with {q:?}");
    match p.strip_prefix(q) {
        Some(rest) => {
            assert!(model);
            assert_eq!(&q.join(rest).expect("join"), p);
            assert_eq!(rest.is_empty(), p == q);
            assert!(!rest.starts_with(b"/"));
        }
        None => assert!(!model),
    }
}

fn region(embed_point: EmbedPath, kernel: Option<&[u8]>) -> Region {
    let kind = match kernel {
        None => RegionKind::Ephemeral,
        Some(k) => {
            // kernel paths in an fspf are absolute (the parser refuses others) and have no NUL
            let mut v = vec![b'/'];
            v.extend(k.iter().copied().filter(|&b| b != 0));
            RegionKind::Kernel(PathBuf::from(OsStr::from_bytes(&v)))
        }
    };
    Region {
        embed_point,
        kind,
        protection: Protection::NotProtected,
        key: None,
        chunk_len: 4096,
    }
}

fuzz_target!(|input: Input| {
    let mut parsed: Vec<EmbedPath> = Vec::new();
    for raw in input.paths.iter().take(16) {
        match EmbedPath::from_bytes(raw) {
            Ok(p) => {
                assert!(raw.first() == Some(&b'/') && !raw.contains(&0));
                check_normalised(&p);
                let model = model_components(raw);
                assert_eq!(components(&p), model, "{raw:?} normalised to {p:?}");
                check_parent(&p);
                match p.join(&input.rel) {
                    Ok(j) => {
                        check_normalised(&j);
                        let mut whole = p.as_bytes().to_vec();
                        whole.push(b'/');
                        whole.extend_from_slice(&input.rel);
                        assert_eq!(components(&j), model_components(&whole));
                    }
                    Err(_) => assert!(input.rel.contains(&0)),
                }
                parsed.push(p);
            }
            Err(_) => assert!(raw.first() != Some(&b'/') || raw.contains(&0)),
        }
    }
    for p in &parsed {
        for q in &parsed {
            check_pair(p, q);
        }
        check_pair(p, &EmbedPath::root());
    }

    let mut meta = Metadata::default();
    for r in input.regions.iter().take(8) {
        let Ok(ep) = EmbedPath::from_bytes(&r.embed_point) else {
            continue;
        };
        if meta.regions.iter().all(|x| x.embed_point != ep) {
            meta.regions.push(region(ep, r.kernel.as_deref()));
        }
    }
    meta.regions
        .sort_by(|a, b| a.embed_point.cmp(&b.embed_point));
    for p in &parsed {
        meta.files.insert(
            p.clone(),
            FileEntry {
                kind: FileKind::Dir,
                mode: 0,
                mtime_ns: 0,
            },
        );
    }
    let _ = meta.check_usable();

    let mut seen: BTreeMap<(&EmbedPath, PathBuf), &EmbedPath> = BTreeMap::new();
    for p in &parsed {
        // Brute force: the region whose embed point is the longest component prefix.
        let expected = meta
            .regions
            .iter()
            .filter(|r| {
                let (pc, rc) = (components(p), components(&r.embed_point));
                pc.len() >= rc.len() && pc[..rc.len()] == rc[..]
            })
            .max_by_key(|r| components(&r.embed_point).len());
        let got = meta.region_for(p);
        assert_eq!(
            got.map(|r| &r.embed_point),
            expected.map(|r| &r.embed_point),
            "region of {p:?}"
        );
        let below: Vec<&EmbedPath> = parsed.iter().filter(|x| x.starts_with(p)).collect();
        let mut below: Vec<EmbedPath> = below.into_iter().cloned().collect();
        below.sort();
        below.dedup();
        assert_eq!(meta.paths_below(p), below, "paths_below {p:?}");

        for r in &meta.regions {
            let kp = p.kernel_path(r);
            let RegionKind::Kernel(base) = &r.kind else {
                assert!(kp.is_none(), "ephemeral region gave a kernel path");
                continue;
            };
            let Some(rest) = p.strip_prefix(&r.embed_point) else {
                assert!(
                    kp.is_none(),
                    "{p:?} outside {:?} has a kernel path",
                    r.embed_point
                );
                continue;
            };
            let kp = kp.expect("a path in a kernel region has a kernel path");
            let tail = kp
                .strip_prefix(base)
                .unwrap_or_else(|_| panic!("{kp:?} escapes {base:?}"));
            let comps: Vec<Component> = tail.components().collect();
            assert!(
                comps.iter().all(|c| matches!(c, Component::Normal(_))),
                "{kp:?}: {tail:?} is not plainly below {base:?}"
            );
            let rel_count = if rest.is_empty() {
                0
            } else {
                rest.split(|&x| x == b'/').count()
            };
            assert_eq!(comps.len(), rel_count, "{p:?} -> {kp:?}");
            assert_eq!(tail.as_os_str().as_bytes(), rest);
            if Some(r) == got {
                // distinct paths of the region that owns them never share a kernel file
                if let Some(prev) = seen.insert((&r.embed_point, kp.clone()), p) {
                    assert_eq!(prev, p, "{prev:?} and {p:?} share {kp:?}");
                }
            }
        }
    }
});

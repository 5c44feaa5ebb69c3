//! Frozen fixtures of every format version (`testdata/fspf/v1/`, `v2/`, `v3/`, and `v3-log4/`,
//! `v3-log5/` for the metadata log's versions, `v3-links/` for hard links; never regenerated): the
//! good tree must keep opening with its recorded key and tag and serve the same plaintext; every
//! `broken/<defect>/` copy must keep failing, in the way its name says.
//!
//! The fixtures' regions record absolute kernel paths below `/tmp/fspf-fixture-vN` (where they
//! were made). The library test re-points those regions at the checked-out copy in memory (the fspf
//! on disk is untouched, and the outboard trees are found beside the fspf, as always).
use fspf_core::volume::Finding;
use fspf_core::{EmbedPath, Error, FileKind, Tag, Volume, VolumeKey};
use std::path::{Path, PathBuf};

/// The frozen tree of format version `v` in the checkout.
fn fixture_dir_of(v: u32) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../../testdata/fspf/v{v}"))
}

/// The frozen tree `testdata/fspf/<name>` in the checkout.
fn fixture_named(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../../testdata/fspf/{name}"))
}

/// Key and tag from version `v`'s `keytag` (the `fspf encrypt` line: awk `$11` and `$9`).
fn keytag_of(v: u32) -> (VolumeKey, Tag) {
    keytag_in(&fixture_dir_of(v))
}

/// Key and tag from the `keytag` of the fixture tree `dir`.
fn keytag_in(dir: &Path) -> (VolumeKey, Tag) {
    let line = std::fs::read_to_string(dir.join("keytag")).expect("keytag");
    let w: Vec<&str> = line.split_whitespace().collect();
    (
        VolumeKey::from_hex(w[10]).expect("key"),
        Tag::from_hex(w[8]).expect("tag"),
    )
}

/// Open the version-`v` fixture copy in `dir` with its recorded anchor; kernel regions, recorded
/// below `/tmp/fspf-fixture-v<v>`, re-pointed at `dir`.
fn open_of(v: u32, dir: &Path) -> fspf_core::Result<Volume> {
    let (key, tag) = keytag_of(v);
    let mut vol = Volume::open(&dir.join("fspf.pb"), Some(key), Some(tag))?;
    vol.rebase_kernel_paths(Path::new(&format!("/tmp/fspf-fixture-v{v}")), dir);
    Ok(vol)
}

fn fixture_dir() -> PathBuf {
    fixture_dir_of(1)
}

fn keytag() -> (VolumeKey, Tag) {
    keytag_of(1)
}

fn open_at(dir: &Path) -> fspf_core::Result<Volume> {
    open_of(1, dir)
}

/// The `broken/<defect>/` copies of one version: each is checked by name, and `finish` asserts
/// that every copy on disk had a check.
struct Broken {
    dir: PathBuf,
    checked: Vec<String>,
}

impl Broken {
    fn of(dir: PathBuf) -> Broken {
        Broken {
            dir,
            checked: Vec::new(),
        }
    }
    fn case(&mut self, name: &str, check: &dyn Fn(&Path)) {
        check(&self.dir.join(name));
        self.checked.push(name.to_string());
    }
    fn finish(mut self) {
        let mut seen: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        seen.sort();
        self.checked.sort();
        assert_eq!(self.checked, seen, "every broken copy has a check");
    }
}

fn read(v: &Volume, path: &str) -> fspf_core::Result<Vec<u8>> {
    let mut r = v.open_file(&EmbedPath::parse(path).unwrap())?;
    r.verify_all()?;
    let mut out = Vec::new();
    r.copy_to(&mut out)?;
    Ok(out)
}

fn data_bin() -> Vec<u8> {
    (0..10000u32).map(|i| ((i * 131 + 7) % 251) as u8).collect()
}
fn libx() -> Vec<u8> {
    (0..9000u32).map(|i| ((i * 17 + 3) % 253) as u8).collect()
}

#[test]
fn v1_fixture_opens_with_its_recorded_key_and_tag_and_serves_the_same_plaintext() {
    let dir = fixture_dir();
    let (_, tag) = keytag();
    assert_eq!(Volume::read_tag(&dir.join("fspf.pb")).unwrap(), tag);
    let v = open_at(&dir).expect("v1 fixture must stay readable");
    assert!(v.is_encrypted());
    let regions: Vec<String> = v
        .regions()
        .iter()
        .map(|r| format!("{} {} {}", r.embed_point, r.class(), r.chunk_len))
        .collect();
    assert_eq!(
        regions,
        [
            "/ kernel not-protected 65536",
            "/auth kernel authenticated 4096",
            "/enc kernel encrypted 4096"
        ]
    );
    assert_eq!(read(&v, "/enc/hello.txt").unwrap(), b"Hello World\n");
    assert_eq!(read(&v, "/enc/empty").unwrap(), b"");
    assert_eq!(read(&v, "/enc/sub/data.bin").unwrap(), data_bin());
    assert_eq!(
        read(&v, "/auth/readme.txt").unwrap(),
        b"authenticated readme\n"
    );
    assert_eq!(read(&v, "/auth/lib/libx.so").unwrap(), libx());
    assert_eq!(
        read(&v, "/auth/late.txt").unwrap(),
        b"added after the first encrypt\n"
    );
    match &v
        .entry(&EmbedPath::parse("/auth/libx-link").unwrap())
        .unwrap()
        .kind
    {
        FileKind::Symlink(t) => assert_eq!(t, b"lib/libx.so"),
        k => panic!("libx-link: {k:?}"),
    }
    let findings = v.verify();
    assert!(findings.is_empty(), "{findings:?}");
}

fn has_finding(f: &[Finding], path: &str, needle: &str) -> bool {
    f.iter()
        .any(|x| x.path == path && x.problem.contains(needle))
}

#[test]
fn every_broken_v1_copy_fails_as_its_name_says() {
    let mut broken = Broken::of(fixture_dir().join("broken"));
    broken.case("fspf_byte_flipped", &|d| {
        assert!(matches!(open_at(d), Err(Error::WrongKeyOrCorrupt { .. })));
    });
    broken.case("fspf_rolled_back", &|d| {
        assert!(matches!(open_at(d), Err(Error::TagMismatch { .. })));
        // It is an older, once-valid fspf: its own tag would open it (freshness is the tag's job).
        let (key, _) = keytag();
        let old = Volume::read_tag(&d.join("fspf.pb")).unwrap();
        assert!(Volume::open(&d.join("fspf.pb"), Some(key), Some(old)).is_ok());
    });
    broken.case("chunk_flipped", &|d| {
        let v = open_at(d).unwrap();
        assert!(matches!(
            read(&v, "/enc/sub/data.bin"),
            Err(Error::ChunkAuth { chunk: 1, .. })
        ));
        assert!(has_finding(&v.verify(), "/enc/sub/data.bin", "chunk 1"));
        assert_eq!(read(&v, "/enc/hello.txt").unwrap(), b"Hello World\n");
    });
    broken.case("file_truncated", &|d| {
        let v = open_at(d).unwrap();
        assert!(matches!(
            read(&v, "/enc/sub/data.bin"),
            Err(Error::SizeMismatch { .. })
        ));
        assert!(has_finding(&v.verify(), "/enc/sub/data.bin", "truncated"));
    });
    broken.case("unlisted_file", &|d| {
        let v = open_at(d).unwrap();
        assert!(matches!(
            read(&v, "/enc/unlisted.txt"),
            Err(Error::NotListed { .. })
        ));
        let f = v.verify();
        assert!(has_finding(&f, "/enc/unlisted.txt", "unlisted"), "{f:?}");
        assert_eq!(f.len(), 1, "{f:?}");
    });
    broken.case("auth_file_modified", &|d| {
        let v = open_at(d).unwrap();
        assert!(matches!(
            read(&v, "/auth/readme.txt"),
            Err(Error::ChunkAuth { chunk: 0, .. })
        ));
        assert!(has_finding(&v.verify(), "/auth/readme.txt", "chunk 0"));
    });
    broken.case("auth_tree_flipped", &|d| {
        let v = open_at(d).unwrap();
        assert!(matches!(
            read(&v, "/auth/lib/libx.so"),
            Err(Error::ChunkAuth { chunk: 0, .. })
        ));
        assert!(has_finding(&v.verify(), "/auth/lib/libx.so", "chunk 0"));
    });
    broken.case("file_deleted", &|d| {
        let v = open_at(d).unwrap();
        assert!(matches!(read(&v, "/enc/empty"), Err(Error::Missing { .. })));
        assert!(has_finding(&v.verify(), "/enc/empty", "missing"));
    });
    broken.case("files_swapped", &|d| {
        let v = open_at(d).unwrap();
        for p in ["/enc/hello.txt", "/enc/empty"] {
            assert!(
                matches!(read(&v, p), Err(Error::HeaderMismatch { .. })),
                "{p}"
            );
        }
        assert_eq!(v.verify().len(), 2);
    });
    broken.finish();
}

// ---------------------------------------------------------------------------------------------
// Format v2: a format-2 file (chunk tree), updated in place once.

fn fixture_dir_v2() -> PathBuf {
    fixture_dir_of(2)
}

fn keytag_v2() -> (VolumeKey, Tag) {
    keytag_of(2)
}

fn open_v2(dir: &Path) -> fspf_core::Result<Volume> {
    open_of(2, dir)
}

fn big_v2() -> Vec<u8> {
    let mut b: Vec<u8> = (0..300_000u32)
        .map(|i| ((i * 37 + 11) % 251) as u8)
        .collect();
    b[200_000..200_016].copy_from_slice(b"updated in place");
    b.extend_from_slice(b"appended line\n");
    b
}

#[test]
fn v2_fixture_opens_with_its_recorded_key_and_tag_and_serves_the_same_plaintext() {
    let dir = fixture_dir_v2();
    let (_, tag) = keytag_v2();
    assert_eq!(Volume::read_tag(&dir.join("fspf.pb")).unwrap(), tag);
    let v = open_v2(&dir).expect("v2 fixture must stay readable");
    let big = EmbedPath::parse("/enc/big").unwrap();
    match &v.entry(&big).unwrap().kind {
        FileKind::File { root, size, .. } => {
            assert!(root.is_some(), "format 2: a chunk-tree root");
            assert_eq!(*size, 300_014);
        }
        k => panic!("{k:?}"),
    }
    assert!(read(&v, "/enc/big").unwrap() == big_v2());
    assert_eq!(
        read(&v, "/enc/small.txt").unwrap(),
        b"a small file stays format 1\n"
    );
    let findings = v.verify();
    assert!(findings.is_empty(), "{findings:?}");
}

#[test]
fn every_broken_v2_copy_fails_as_its_name_says() {
    let mut broken = Broken::of(fixture_dir_v2().join("broken"));
    let tree_auth = |d: &Path| {
        let v = open_v2(d).unwrap();
        let e = read(&v, "/enc/big").unwrap_err();
        assert!(matches!(e, Error::TreeAuth { .. }), "{e}");
        assert!(has_finding(&v.verify(), "/enc/big", "chunk-tree page"));
        assert_eq!(read(&v, "/enc/small.txt").unwrap().len(), 28);
    };
    broken.case("fspf_rolled_back", &|d| {
        assert!(matches!(open_v2(d), Err(Error::TagMismatch { .. })));
        let (key, _) = keytag_v2();
        let old = Volume::read_tag(&d.join("fspf.pb")).unwrap();
        assert!(Volume::open(&d.join("fspf.pb"), Some(key), Some(old)).is_ok());
    });
    broken.case("chunk_rolled_back", &|d| {
        let v = open_v2(d).unwrap();
        let e = read(&v, "/enc/big").unwrap_err();
        assert!(matches!(e, Error::ChunkAuth { chunk: 48, .. }), "{e}");
    });
    broken.case("tree_rolled_back", &tree_auth);
    broken.case("state_rolled_back", &|d| {
        // The older file is shorter than the committed size; a same-size rollback is the
        // tree's to catch (tree_rolled_back).
        let v = open_v2(d).unwrap();
        let e = read(&v, "/enc/big").unwrap_err();
        assert!(matches!(e, Error::SizeMismatch { .. }), "{e}");
    });
    broken.case("page_flipped", &tree_auth);
    broken.case("chunk_flipped", &|d| {
        let v = open_v2(d).unwrap();
        let e = read(&v, "/enc/big").unwrap_err();
        assert!(matches!(e, Error::ChunkAuth { chunk: 10, .. }), "{e}");
    });
    broken.case("format1_header", &|d| {
        let v = open_v2(d).unwrap();
        let e = read(&v, "/enc/big").unwrap_err();
        assert!(matches!(e, Error::HeaderMismatch { .. }), "{e}");
    });
    broken.case("tree_missing", &|d| {
        let v = open_v2(d).unwrap();
        let e = read(&v, "/enc/big").unwrap_err();
        assert!(matches!(e, Error::TreeSize { actual: 0, .. }), "{e}");
    });
    broken.finish();
}

// ---------------------------------------------------------------------------------------------
// Format v3: a checkpoint and a metadata log of four commits (FORMAT.md §5c).

#[test]
fn v3_fixture_opens_its_checkpoint_and_log_and_serves_the_same_plaintext() {
    let dir = fixture_dir_of(3);
    let (_, tag) = keytag_of(3);
    assert_eq!(Volume::read_tag(&dir.join("fspf.pb")).unwrap(), tag);
    let v = open_of(3, &dir).expect("v3 fixture must stay readable");
    assert_eq!(
        read(&v, "/enc/a.txt").unwrap(),
        b"first commit\nsecond commit\n"
    );
    assert_eq!(read(&v, "/enc/d/c.txt").unwrap(), b"in a directory\n");
    assert_eq!(read(&v, "/enc/e.txt").unwrap(), b"third commit\n");
    assert!(v
        .entry(&EmbedPath::parse("/enc/d/b.txt").unwrap())
        .is_none());
    let findings = v.verify();
    assert!(findings.is_empty(), "{findings:?}");
    // The second run's tag names an older state: refused as a rollback.
    let older = std::fs::read_to_string(dir.join(".older-tag")).unwrap();
    let (key, _) = keytag_of(3);
    let e = Volume::open(
        &dir.join("fspf.pb"),
        Some(key),
        Some(Tag::from_hex(older.trim()).unwrap()),
    )
    .unwrap_err();
    assert!(matches!(e, Error::TagMismatch { .. }), "{e}");
}

#[test]
fn every_broken_v3_copy_fails_as_its_name_says() {
    let mut broken = Broken::of(fixture_dir_of(3).join("broken"));
    let rollback = |d: &Path| {
        let e = open_of(3, d).unwrap_err();
        assert!(matches!(e, Error::TagMismatch { .. }), "{e}");
    };
    // Damaged records are refused by the chain even when no tag is given.
    let damaged = |d: &Path| {
        let (key, _) = keytag_of(3);
        let e = Volume::open(&d.join("fspf.pb"), Some(key), None).unwrap_err();
        assert!(matches!(e, Error::LogDamaged { .. }), "{e}");
        assert!(open_of(3, d).is_err());
    };
    broken.case("log_rolled_back", &|d| {
        rollback(d);
        // It is the state of the second run, valid under its own (older) tag.
        let (key, _) = keytag_of(3);
        let older = std::fs::read_to_string(fixture_dir_of(3).join(".older-tag")).unwrap();
        let t = Tag::from_hex(older.trim()).unwrap();
        assert!(Volume::open(&d.join("fspf.pb"), Some(key), Some(t)).is_ok());
    });
    broken.case("log_removed", &rollback);
    broken.case("log_stale", &rollback);
    broken.case("record_flipped", &damaged);
    broken.case("records_swapped", &damaged);
    broken.case("record_replayed", &damaged);
    broken.finish();
}

// ---------------------------------------------------------------------------------------------
// Format v3 with a version-4 log (journals in its records) and a version-5 log (small files in
// its records as well): FORMAT.md §5b, §5c.

/// A copy of the fixture tree `src` in a temporary directory: reading applies the log's
/// journals (the checkout has no `user.fspf.mark`) and writes the files, which must not touch
/// the checkout.
fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

/// The version-`logv` log fixture's `state` ("" for the good tree, or `crashed/<name>`),
/// copied into `tmp` and opened with the fixture's anchor, its region re-pointed at the copy.
fn open_log_fixture(logv: u32, state: &str, tmp: &Path) -> fspf_core::Result<Volume> {
    let name = format!("v3-log{logv}");
    copy_tree(&fixture_named(&name).join(state), tmp);
    let (key, tag) = keytag_in(&fixture_named(&name));
    let mut vol = Volume::open(&tmp.join("fspf.pb"), Some(key), Some(tag))?;
    vol.rebase_kernel_paths(Path::new(&format!("/tmp/fspf-fixture-{name}")), tmp);
    Ok(vol)
}

fn big_log() -> Vec<u8> {
    let mut b: Vec<u8> = (0..300_000u32)
        .map(|i| ((i * 37 + 11) % 251) as u8)
        .collect();
    b[200_000..200_016].copy_from_slice(b"updated in place");
    b
}

fn check_log_fixture(v: &Volume) {
    assert!(read(v, "/enc/big").unwrap() == big_log());
    assert_eq!(read(v, "/enc/small.txt").unwrap(), b"a small file\n");
    assert_eq!(read(v, "/enc/new.txt").unwrap(), b"carried by the log\n");
    let findings = v.verify();
    assert!(findings.is_empty(), "{findings:?}");
}

#[test]
fn v3_fixtures_with_version_4_and_5_logs_open_and_serve_the_same_plaintext() {
    for logv in [4, 5] {
        let magic =
            std::fs::read(fixture_named(&format!("v3-log{logv}")).join("fspf.pb.log")).unwrap();
        assert_eq!(
            &magic[..8],
            &[b"FSPFLOG".as_slice(), &[logv as u8]].concat()[..]
        );
        for state in ["", "crashed/before_apply"] {
            let tmp = tempfile::tempdir().unwrap();
            let v = open_log_fixture(logv, state, tmp.path())
                .unwrap_or_else(|e| panic!("log {logv} {state}: {e}"));
            check_log_fixture(&v);
        }
    }
}

#[test]
fn a_file_of_a_version_5_log_lost_by_a_power_loss_is_restored_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let v = open_log_fixture(5, "crashed/before_publish", tmp.path()).unwrap();
    let made_in = std::fs::read_to_string(fixture_named("v3-log5").join(".made-in-boot")).unwrap();
    let now = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    if made_in.trim() == now.trim() {
        // The boot that wrote the record: its page cache held the file, so its absence is a
        // change on disk.
        let e = read(&v, "/enc/new.txt").unwrap_err();
        assert!(matches!(e, Error::Missing { .. }), "{e}");
    } else {
        check_log_fixture(&v);
        assert!(tmp.path().join("enc/new.txt").is_file(), "written again");
    }
}

/// The hard-link fixture's tree `state` ("" or `broken/<name>`), copied into `tmp` and opened
/// with the fixture's anchor, its region re-pointed at the copy.
fn open_links_fixture(state: &str, tmp: &Path) -> fspf_core::Result<Volume> {
    copy_tree(&fixture_named("v3-links").join(state), tmp);
    let (key, tag) = keytag_in(&fixture_named("v3-links"));
    let mut vol = Volume::open(&tmp.join("fspf.pb"), Some(key), Some(tag))?;
    vol.rebase_kernel_paths(Path::new("/tmp/fspf-fixture-v3-links"), tmp);
    Ok(vol)
}

#[test]
fn v3_fixture_with_hard_links_opens_and_serves_one_file_under_its_names() {
    let tmp = tempfile::tempdir().unwrap();
    let v = open_links_fixture("", tmp.path()).unwrap();
    let content = b"shared content\nmore\n";
    assert_eq!(read(&v, "/enc/b").unwrap(), content);
    assert_eq!(read(&v, "/enc/e/c").unwrap(), content);
    assert_eq!(read(&v, "/enc/solo").unwrap(), b"alone\n");
    let entry = |p: &str| {
        v.lookup(&EmbedPath::parse(p).unwrap())
            .unwrap()
            .into_owned()
    };
    let b = entry("/enc/b");
    assert_eq!(b.nlink(), 2);
    assert_eq!(b.links, [EmbedPath::parse("/enc/e/c").unwrap()]);
    assert_eq!(
        entry("/enc/e/c").kind,
        FileKind::Link(EmbedPath::parse("/enc/b").unwrap())
    );
    assert_eq!(entry("/enc/p").nlink(), 2);
    assert!(!tmp.path().join("enc/a").exists() && !tmp.path().join("enc/e/c").exists());
    let findings = v.verify();
    assert!(findings.is_empty(), "{findings:?}");
}

#[test]
fn every_broken_hard_link_copy_fails_as_its_name_says() {
    let mut broken = Broken::of(fixture_named("v3-links").join("broken"));
    broken.case("planted", &|_| {
        let tmp = tempfile::tempdir().unwrap();
        let v = open_links_fixture("broken/planted", tmp.path()).unwrap();
        // Never read through the link's name ...
        assert_eq!(read(&v, "/enc/e/c").unwrap(), b"shared content\nmore\n");
        // ... and reported.
        let f = v.verify();
        assert!(has_finding(&f, "/enc/e/c", "an object on disk"), "{f:?}");
    });
    broken.finish();
}

//! The session against a real volume in a temporary directory and an anchor in memory.
use super::*;
use crate::format::metadata::{Owner, SpecialKind};
use crate::view::NodeKind;
use crate::volume::RegionSpec;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// The run's anchor as a cell; counts publishes (one per commit).
#[derive(Default)]
struct MemAnchor {
    st: Mutex<Option<AnchorState>>,
    publishes: AtomicUsize,
    unreadable: AtomicBool,
}

impl Anchor for MemAnchor {
    type Lock = ();
    fn read(&self) -> Option<AnchorState> {
        if self.unreadable.load(Ordering::Relaxed) {
            return None;
        }
        *self.st.lock().unwrap()
    }
    fn lock(&self) -> Result<(), ViewError> {
        Ok(())
    }
    fn announce(&self, current: Tag, next: Tag) -> Result<(), ViewError> {
        *self.st.lock().unwrap() = Some(AnchorState {
            current,
            pending: Some(next),
        });
        Ok(())
    }
    fn publish(&self, t: Tag) -> Result<(), ViewError> {
        self.publishes.fetch_add(1, Ordering::Relaxed);
        *self.st.lock().unwrap() = Some(AnchorState {
            current: t,
            pending: None,
        });
        Ok(())
    }
}

fn p(s: &str) -> EmbedPath {
    EmbedPath::parse(s).unwrap()
}

struct Fixture {
    dir: tempfile::TempDir,
    key: VolumeKey,
    anchor: Arc<MemAnchor>,
}

impl Fixture {
    /// `/` ephemeral encrypted, `/d` an encrypted kernel region at `DIR/vol`.
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let fspf = dir.path().join("fspf.pb");
        std::fs::create_dir(dir.path().join("vol")).unwrap();
        Volume::create(&fspf, false).unwrap();
        let mut v = Volume::open(&fspf, None, None).unwrap();
        v.add_region(RegionSpec {
            embed_point: EmbedPath::root(),
            kind: RegionKind::Ephemeral,
            protection: Protection::Encrypted,
            key_len: None,
            chunk_len: None,
        })
        .unwrap();
        v.add_region(RegionSpec {
            embed_point: p("/d"),
            kind: RegionKind::Kernel(dir.path().join("vol")),
            protection: Protection::Encrypted,
            key_len: None,
            chunk_len: Some(4096),
        })
        .unwrap();
        let (tag, key) = v.encrypt().unwrap();
        let anchor = Arc::new(MemAnchor::default());
        *anchor.st.lock().unwrap() = Some(AnchorState {
            current: tag,
            pending: None,
        });
        Fixture { dir, key, anchor }
    }

    fn fspf(&self) -> PathBuf {
        self.dir.path().join("fspf.pb")
    }

    fn session(&self, mutable: bool) -> Session<Arc<MemAnchor>> {
        let t = self.anchor.read().unwrap().current;
        let vol = Volume::open(&self.fspf(), Some(self.key.clone()), Some(t)).unwrap();
        let mut cfg = SessionConfig::new(
            self.fspf(),
            Some(self.key.clone()),
            VolumeOptions::default(),
        );
        cfg.mutable = mutable;
        Session::new(cfg, self.anchor.clone(), Some(vol))
    }

    /// The committed content of `path`, read through a fresh volume at the anchor's tag.
    fn committed(&self, path: &str) -> Option<Vec<u8>> {
        let t = self.anchor.read().unwrap().current;
        let v = Volume::open(&self.fspf(), Some(self.key.clone()), Some(t)).unwrap();
        let mut r = v.open_file(&p(path)).ok()?;
        let mut out = vec![0u8; r.size() as usize];
        let mut off = 0;
        while off < out.len() {
            off += r.read_at(&mut out[off..], off as u64).unwrap();
        }
        Some(out)
    }
}

fn meta(mode: u32) -> VersionMeta {
    VersionMeta {
        mode,
        mtime: None,
        owner: None,
    }
}

fn put<A: Anchor>(s: &mut Session<A>, path: &str, data: &[u8]) {
    s.stage_put(&p(path), data.len() as u64, meta(0o644), None, || data)
        .unwrap();
}

fn names<A: Anchor>(s: &Session<A>, dir: &str) -> Vec<String> {
    s.children(&NoOpenFiles, &p(dir))
        .into_iter()
        .map(|(n, _)| String::from_utf8(n).unwrap())
        .collect()
}

#[test]
fn rm_r_of_many_files_is_one_commit_and_removes_the_kernel_side() {
    let f = Fixture::new();
    let mut s = f.session(true);
    s.mkdir(&NoOpenFiles, &p("/d/t"), 0o755, None, 1).unwrap();
    for i in 0..200 {
        put(
            &mut s,
            &format!("/d/t/f{i}"),
            format!("file {i}\n").as_bytes(),
        );
    }
    s.commit().unwrap();
    assert_eq!(f.anchor.publishes.load(Ordering::Relaxed), 1);
    assert!(f.dir.path().join("vol/t/f7").exists());
    for i in 0..200 {
        s.unlink(&NoOpenFiles, &p(&format!("/d/t/f{i}")), false)
            .unwrap();
    }
    // Removals show before the commit; nothing was committed for them yet.
    assert!(names(&s, "/d/t").is_empty());
    assert_eq!(
        s.lookup(&NoOpenFiles, &p("/d/t/f3")),
        Err(ViewError::NotFound)
    );
    s.unlink(&NoOpenFiles, &p("/d/t"), true).unwrap();
    assert_eq!(f.anchor.publishes.load(Ordering::Relaxed), 1);
    s.commit().unwrap();
    assert_eq!(f.anchor.publishes.load(Ordering::Relaxed), 2);
    assert!(!f.dir.path().join("vol/t").exists());
    assert_eq!(f.committed("/d/t/f7"), None);
    assert!(f.session(false).vol().unwrap().files().is_empty());
}

#[test]
fn rules_of_the_namespace_give_typed_errors() {
    let f = Fixture::new();
    let mut s = f.session(true);
    let o = &NoOpenFiles;
    put(&mut s, "/d/a", b"a");
    s.mkdir(o, &p("/d/dir"), 0o700, None, 1).unwrap();
    put(&mut s, "/d/dir/x", b"x");
    assert_eq!(
        s.mkdir(o, &p("/d/a"), 0o755, None, 1),
        Err(ViewError::Exists)
    );
    assert_eq!(
        s.mkdir(o, &p("/d/a/b"), 0o755, None, 1),
        Err(ViewError::NotDir)
    );
    assert_eq!(
        s.mkdir(o, &p("/d/no/b"), 0o755, None, 1),
        Err(ViewError::NotFound)
    );
    assert_eq!(s.unlink(o, &p("/d/dir"), false), Err(ViewError::IsDir));
    assert_eq!(s.unlink(o, &p("/d/a"), true), Err(ViewError::NotDir));
    assert_eq!(s.unlink(o, &p("/d/dir"), true), Err(ViewError::NotEmpty));
    assert_eq!(s.unlink(o, &p("/d"), true), Err(ViewError::Busy));
    assert_eq!(
        s.rename(o, &p("/d/a"), &p("/x"), 0),
        Err(ViewError::CrossDevice)
    );
    assert_eq!(
        s.rename(o, &p("/d/dir"), &p("/d/dir/in"), 0),
        Err(ViewError::Invalid)
    );
    assert_eq!(
        s.rename(o, &p("/d/a"), &p("/d/dir"), 0),
        Err(ViewError::IsDir)
    );
    assert_eq!(
        s.rename(o, &p("/d/a"), &p("/d/dir/x"), RENAME_NOREPLACE),
        Err(ViewError::Exists)
    );
    assert_eq!(
        s.rename(o, &p("/d/a"), &p("/d/b"), 2),
        Err(ViewError::Invalid)
    );
    assert_eq!(
        s.symlink(o, b"a", &p("/link"), None, 1),
        Err(ViewError::NotPermitted)
    );
    s.symlink(o, b"dir", &p("/d/l"), None, 1).unwrap();
    assert_eq!(
        s.chmod(o, &p("/d/l"), 0o600, 1),
        Err(ViewError::NotSupported)
    );
    // Committed together with the queued writes; a read-only session changes nothing.
    let mut ro = f.session(false);
    assert_eq!(
        ro.lookup(o, &p("/d/l")).unwrap().kind,
        NodeKind::Symlink(b"dir".to_vec())
    );
    assert_eq!(
        ro.mkdir(o, &p("/d/new"), 0o755, None, 1),
        Err(ViewError::ReadOnly)
    );
    assert_eq!(ro.unlink(o, &p("/d/a"), false), Err(ViewError::ReadOnly));
    assert_eq!(f.committed("/d/dir/x").unwrap(), b"x");
}

#[test]
fn modes_times_and_renames_show_at_once_and_persist() {
    let f = Fixture::new();
    let mut s = f.session(true);
    let o = &NoOpenFiles;
    put(&mut s, "/d/src/f", b"content");
    s.commit().unwrap();
    s.chmod(o, &p("/d/src/f"), 0o750, 1).unwrap();
    s.set_mtime(o, &p("/d/src/f"), 123_000_000_000).unwrap();
    s.chmod(o, &p("/d/src"), 0o711, 1).unwrap();
    let n = s.lookup(o, &p("/d/src/f")).unwrap();
    assert_eq!((n.mode, n.mtime), (0o750, Some(123_000_000_000)));
    assert_eq!(s.lookup(o, &p("/d/src")).unwrap().mode, 0o711);
    s.rename(o, &p("/d/src"), &p("/d/dst"), 0).unwrap();
    assert_eq!(s.lookup(o, &p("/d/src/f")), Err(ViewError::NotFound));
    let fresh = f.session(false);
    let n = fresh.lookup(o, &p("/d/dst/f")).unwrap();
    assert_eq!((n.mode, n.mtime), (0o750, Some(123_000_000_000)));
    assert_eq!(fresh.lookup(o, &p("/d/dst")).unwrap().mode, 0o711);
    assert_eq!(f.committed("/d/dst/f").unwrap(), b"content");
    assert!(f.dir.path().join("vol/dst/f").exists());
    assert!(!f.dir.path().join("vol/src").exists());
    // A file renamed within a directory: the kernel file moves with it.
    s.rename(o, &p("/d/dst/f"), &p("/d/dst/g"), 0).unwrap();
    assert_eq!(f.committed("/d/dst/g").unwrap(), b"content");
    assert!(!f.dir.path().join("vol/dst/f").exists());
}

#[test]
fn a_rolled_back_fspf_is_refused_by_refresh_and_commit() {
    let f = Fixture::new();
    let mut a = f.session(true);
    let mut b = f.session(true);
    put(&mut a, "/d/x", b"v1");
    a.commit().unwrap();
    // The state on disk: the checkpoint and the metadata log after it (FORMAT.md §5c).
    let log = crate::volume::log_path(&f.fspf());
    let old = std::fs::read(f.fspf()).unwrap();
    let old_log = std::fs::read(&log).unwrap();
    put(&mut a, "/d/x", b"v2");
    a.commit().unwrap();
    assert_ne!(std::fs::read(&log).unwrap(), old_log, "a commit appends");
    // The other session of the run follows the anchor.
    b.refresh().unwrap();
    assert_eq!(b.lookup(&NoOpenFiles, &p("/d/x")).unwrap().size, 2);
    // Storage rolls the fspf back one commit: both sessions refuse it.
    std::fs::write(f.fspf(), &old).unwrap();
    std::fs::write(&log, &old_log).unwrap();
    put(&mut a, "/d/y", b"new");
    assert_eq!(a.commit(), Err(ViewError::Untrusted));
    // A process of the run that starts now cannot open it against the anchor's tag.
    let t = f.anchor.read().unwrap().current;
    assert!(Volume::open(&f.fspf(), Some(f.key.clone()), Some(t)).is_err());
    // The anchor names a tag the disk does not hold: refresh refuses.
    *f.anchor.st.lock().unwrap() = Some(AnchorState {
        current: Tag([9; 16]),
        pending: None,
    });
    assert_eq!(b.refresh(), Err(ViewError::Untrusted));
}

#[test]
fn an_unreadable_anchor_fails_closed() {
    let f = Fixture::new();
    let mut s = f.session(true);
    f.anchor.unreadable.store(true, Ordering::Relaxed);
    assert_eq!(s.refresh(), Err(ViewError::Untrusted));
    assert_eq!(
        s.mkdir(&NoOpenFiles, &p("/d/n"), 0o755, None, 1),
        Err(ViewError::Untrusted)
    );
    put(&mut s, "/d/n", b"n");
    assert_eq!(s.commit(), Err(ViewError::Untrusted));
    // Nothing staged stays behind.
    assert_eq!(
        std::fs::read_dir(f.dir.path().join("vol")).unwrap().count(),
        0
    );
}

#[test]
fn a_crashed_committers_announced_tag_is_settled_when_it_is_on_disk() {
    let f = Fixture::new();
    let mut a = f.session(true);
    put(&mut a, "/d/x", b"v1");
    a.commit().unwrap();
    let before = f.anchor.read().unwrap().current;
    put(&mut a, "/d/x", b"v2");
    a.commit().unwrap();
    let after = f.anchor.read().unwrap().current;
    // As if the committer died between the commit point and publishing.
    *f.anchor.st.lock().unwrap() = Some(AnchorState {
        current: before,
        pending: Some(after),
    });
    let mut b = f.session_on_disk();
    b.refresh().unwrap();
    assert_eq!(
        f.anchor.read().unwrap(),
        AnchorState {
            current: after,
            pending: None
        }
    );
    assert_eq!(b.lookup(&NoOpenFiles, &p("/d/x")).unwrap().size, 2);
}

impl Fixture {
    /// A session over whatever fspf is on disk (the anchor is not consulted to open it).
    fn session_on_disk(&self) -> Session<Arc<MemAnchor>> {
        let vol = Volume::open(&self.fspf(), Some(self.key.clone()), None).ok();
        let mut cfg = SessionConfig::new(
            self.fspf(),
            Some(self.key.clone()),
            VolumeOptions::default(),
        );
        cfg.mutable = true;
        Session::new(cfg, self.anchor.clone(), vol)
    }
}

#[test]
fn appends_of_two_sessions_to_one_file_are_both_kept() {
    let f = Fixture::new();
    let mut s = f.session(true);
    put(&mut s, "/d/log", b"start\n");
    s.commit().unwrap();
    let base = s
        .vol()
        .unwrap()
        .lookup(&p("/d/log"))
        .unwrap()
        .kind
        .version()
        .unwrap();
    let mut a = f.session(true);
    let mut b = f.session(true);
    let append = |s: &mut Session<Arc<MemAnchor>>, line: &[u8]| {
        let mut all = b"start\n".to_vec();
        all.extend_from_slice(line);
        let d = AppendDelta {
            base,
            delta: line.to_vec(),
        };
        s.stage_put(&p("/d/log"), all.len() as u64, meta(0o644), Some(d), || {
            &all[..]
        })
        .unwrap();
    };
    append(&mut a, b"from a\n");
    append(&mut b, b"from b\n");
    a.commit().unwrap();
    b.commit().unwrap();
    assert_eq!(f.committed("/d/log").unwrap(), b"start\nfrom a\nfrom b\n");
    let c = b.take_committed();
    assert!(c.any);
    assert_eq!(c.merged[&p("/d/log")], b"start\nfrom a\nfrom b\n");
}

#[test]
fn ephemeral_regions_change_in_memory_at_once() {
    let f = Fixture::new();
    let mut s = f.session(false);
    let o = &NoOpenFiles;
    s.mkdir(o, &p("/tmp"), 0o700, None, 5).unwrap();
    s.put_ephemeral(&p("/tmp/a"), 0o600, 7, b"secret").unwrap();
    assert_eq!(names(&s, "/tmp"), ["a"]);
    s.rename(o, &p("/tmp"), &p("/tmp2"), 0).unwrap();
    match s.open_ephemeral(&p("/tmp2/a")).unwrap() {
        EphemeralContent::Sealed(mut r) => {
            let mut b = [0u8; 6];
            assert_eq!(r.read_at(&mut b, 0).unwrap(), 6);
            assert_eq!(&b, b"secret");
        }
        EphemeralContent::Plain(_) => panic!("an encrypted region kept plaintext"),
    }
    // Sealed in memory: the plaintext is not what the session stores.
    assert_ne!(
        &s.ephemeral_file(&p("/tmp2/a")).unwrap().data[..],
        b"secret"
    );
    s.unlink(o, &p("/tmp2/a"), false).unwrap();
    s.unlink(o, &p("/tmp2"), true).unwrap();
    assert_eq!(s.lookup(o, &p("/tmp2")), Err(ViewError::NotFound));
    assert!(!s.has_queued());
    assert_eq!(f.anchor.publishes.load(Ordering::Relaxed), 0);
}

#[test]
fn anchor_state_parses_one_or_two_tags_and_accepts_only_those() {
    let a = Tag([1; 16]);
    let b = Tag([2; 16]);
    let one = AnchorState::parse(&a.0).unwrap();
    assert_eq!(one.pending, None);
    assert_eq!(one.accepts(a), Some(a));
    assert_eq!(one.accepts(b), None);
    let mut both = a.0.to_vec();
    both.extend_from_slice(&b.0);
    let two = AnchorState::parse(&both).unwrap();
    assert_eq!(two.to_bytes(), both);
    assert_eq!(two.accepts(b), Some(b));
    assert_eq!(two.accepts(a), Some(a));
    assert_eq!(two.accepts(Tag([3; 16])), None);
    assert_eq!(AnchorState::parse(&[0; 17]), None);
    assert_eq!(AnchorState::parse(&[]), None);
}

#[test]
fn view_errors_map_to_the_errnos_programs_expect() {
    let all = [
        (ViewError::NotFound, libc_errno("ENOENT", 2)),
        (ViewError::NotDir, libc_errno("ENOTDIR", 20)),
        (ViewError::Loop, libc_errno("ELOOP", 40)),
        (ViewError::Exists, libc_errno("EEXIST", 17)),
        (ViewError::IsDir, libc_errno("EISDIR", 21)),
        (ViewError::NotEmpty, libc_errno("ENOTEMPTY", 39)),
        (ViewError::Busy, libc_errno("EBUSY", 16)),
        (ViewError::ReadOnly, libc_errno("EROFS", 30)),
        (ViewError::CrossDevice, libc_errno("EXDEV", 18)),
        (ViewError::Invalid, libc_errno("EINVAL", 22)),
        (ViewError::NotPermitted, libc_errno("EPERM", 1)),
        (ViewError::NotSupported, libc_errno("EOPNOTSUPP", 95)),
        (ViewError::Untrusted, libc_errno("EACCES", 13)),
        (ViewError::Io, libc_errno("EIO", 5)),
        (ViewError::NoSpace, libc_errno("ENOSPC", 28)),
        (ViewError::Quota, libc_errno("EDQUOT", 122)),
        (ViewError::TooBig, libc_errno("EFBIG", 27)),
    ];
    for (e, n) in all {
        assert_eq!(e.errno(), n, "{e:?}");
    }
}

/// Linux x86-64 errno values (asm-generic), named for the failure message.
fn libc_errno(_name: &str, n: i32) -> i32 {
    n
}

/// pjdfstest found it on the FUSE mount: a file chowned (or chmod'ed) and removed in one batch
/// showed the removed file's owner and mode on a new file made there before the commit.
#[test]
fn a_removed_paths_queued_owner_and_mode_showed_on_a_new_entry_there() {
    let f = Fixture::new();
    let mut s = f.session(true);
    let o = &NoOpenFiles;
    put(&mut s, "/d/x", b"old");
    s.chown(o, &p("/d/x"), Owner { uid: 0, gid: 0 }, 1).unwrap();
    s.chmod(o, &p("/d/x"), 0o600, 1).unwrap();
    s.unlink(o, &p("/d/x"), false).unwrap();
    let new = VersionMeta {
        mode: 0o644,
        mtime: None,
        owner: Some(Owner { uid: 9, gid: 9 }),
    };
    s.stage_put(&p("/d/x"), 3, new, None, || &b"new"[..])
        .unwrap();
    let n = s.lookup(o, &p("/d/x")).unwrap();
    assert_eq!((n.mode, n.owner), (0o644, Some(Owner { uid: 9, gid: 9 })));
    s.commit().unwrap();
    let n = f.session(false).lookup(o, &p("/d/x")).unwrap();
    assert_eq!((n.mode, n.owner), (0o644, Some(Owner { uid: 9, gid: 9 })));
}

/// A directory made since the last commit showed no modification time (frontends then showed
/// their start time); it shows the time it was made.
#[test]
fn a_new_directory_showed_no_modification_time_until_the_commit() {
    let f = Fixture::new();
    let mut s = f.session(true);
    s.mkdir(&NoOpenFiles, &p("/d/n"), 0o755, None, 12_345)
        .unwrap();
    assert_eq!(
        s.lookup(&NoOpenFiles, &p("/d/n")).unwrap().mtime,
        Some(12_345)
    );
}

/// Regression (pjdfstest `rename/09.t`, `rename/10.t`): the inode number a shield reports was
/// a hash of the path, so a rename changed it, for the entry and everything below it; a new
/// version written afterwards must keep it too.
#[test]
fn a_rename_changed_the_inode_number_of_the_entry_and_its_children() {
    let f = Fixture::new();
    let mut s = f.session(true);
    let o = &NoOpenFiles;
    s.mkdir(o, &p("/d/src"), 0o755, None, 1).unwrap();
    put(&mut s, "/d/src/f", b"content");
    s.commit().unwrap();
    let before = s.lookup(o, &p("/d/src/f")).unwrap();
    // Nothing recorded: the path's own number.
    assert_eq!(before.ino, Some(p("/d/src/f").default_ino()));
    assert_eq!(s.vol().unwrap().lookup(&p("/d/src/f")).unwrap().ino, None);
    let dir_before = p("/d/src").default_ino();
    s.rename(o, &p("/d/src"), &p("/d/dst"), 0).unwrap();
    let fresh = f.session(false);
    let moved = fresh.lookup(o, &p("/d/dst/f")).unwrap();
    assert_eq!(moved.ino, Some(p("/d/src/f").default_ino()));
    assert_eq!(fresh.lookup(o, &p("/d/dst")).unwrap().ino, Some(dir_before));
    // A new version at the new path keeps the number.
    put(&mut s, "/d/dst/f", b"rewritten");
    s.commit().unwrap();
    let fresh = f.session(false);
    assert_eq!(
        fresh.lookup(o, &p("/d/dst/f")).unwrap().ino,
        Some(p("/d/src/f").default_ino())
    );
}

/// A process joined the run while another committed: it read the anchor with a commit in flight
/// (two tags), found the old state on disk, and the commit point passed before it opened. The
/// anchor still named the same two tags, so the start was not tried again and the process
/// refused the fspf ("tag mismatch"), failing every file access: a `cat` in a shell loop read
/// nothing, and the loop's counter started again from zero.
#[test]
fn a_process_joining_during_a_commit_refused_the_state_the_commit_point_made() {
    use std::cell::Cell;
    let (t1, t2) = (Tag([1; 16]), Tag([2; 16]));
    let in_flight = AnchorState {
        current: t1,
        pending: Some(t2),
    };
    let disk = Cell::new(t1);
    let opens = Cell::new(0);
    let (r, trusted) = join_run(
        in_flight,
        || Some(in_flight),
        || Some(disk.get()),
        |t| {
            opens.set(opens.get() + 1);
            // The commit point passes between the read of the disk's tag and the open.
            disk.set(t2);
            if t == disk.get() {
                Ok(())
            } else {
                Err("tag mismatch")
            }
        },
    );
    assert_eq!(r, Ok(()), "opened after {} tries", opens.get());
    assert_eq!(trusted, t2);
    // A disk that holds neither trusted tag is still refused, after a bounded number of tries.
    let opens = Cell::new(0);
    let (r, _) = join_run(
        in_flight,
        || Some(in_flight),
        || Some(Tag([3; 16])),
        |t| {
            opens.set(opens.get() + 1);
            if t == Tag([3; 16]) {
                Ok(())
            } else {
                Err("tag mismatch")
            }
        },
    );
    assert_eq!(r, Err("tag mismatch"));
    assert!(opens.get() <= JOIN_RETRIES + 1);
}

/// The names listed in the committed fspf (re-parsed from disk, so `check_links` ran).
fn committed_links(f: &Fixture, path: &str) -> Vec<String> {
    let v = f.session(false);
    let e = v.vol().unwrap().lookup(&p(path)).unwrap().into_owned();
    e.links.iter().map(|l| l.to_string()).collect()
}

#[test]
fn hard_links_share_content_mode_and_inode_and_count_their_names() {
    let f = Fixture::new();
    let mut s = f.session(true);
    let o = &NoOpenFiles;
    put(&mut s, "/d/a", b"one");
    s.commit().unwrap();
    s.link(o, &p("/d/a"), &p("/d/b"), 7).unwrap();
    // A link to a link names the file.
    s.link(o, &p("/d/b"), &p("/d/c"), 8).unwrap();
    for n in ["/d/a", "/d/b", "/d/c"] {
        let node = s.lookup(o, &p(n)).unwrap();
        assert_eq!(
            (node.kind, node.nlink, node.size),
            (NodeKind::File, 3, 3),
            "{n}"
        );
    }
    assert_eq!(s.canonical(o, &p("/d/c")), p("/d/a"));
    assert_eq!(names(&s, "/d"), ["a", "b", "c"]);
    // A mode set through one name shows through all; a new version through one name is read
    // through the others.
    s.chmod(o, &p("/d/c"), 0o600, 9).unwrap();
    s.commit().unwrap();
    assert_eq!(s.lookup(o, &p("/d/b")).unwrap().mode, 0o600);
    put(&mut s, "/d/a", b"two!");
    s.commit().unwrap();
    assert_eq!(f.committed("/d/b").unwrap(), b"two!");
    assert_eq!(committed_links(&f, "/d/a"), ["/d/b", "/d/c"]);
    // Nothing is on disk for a link.
    assert!(!f.dir.path().join("vol/b").exists());
    let r = f.session(false);
    assert_eq!(r.lookup(o, &p("/d/c")).unwrap().nlink, 3);
    assert_eq!(
        r.lookup(o, &p("/d/c")).unwrap().ino,
        r.lookup(o, &p("/d/a")).unwrap().ino
    );
}

#[test]
fn removing_a_files_first_name_moves_it_to_a_link_and_the_last_name_removes_it() {
    let f = Fixture::new();
    let mut s = f.session(true);
    let o = &NoOpenFiles;
    put(&mut s, "/d/a", b"data");
    s.commit().unwrap();
    let ino = s.lookup(o, &p("/d/a")).unwrap().ino;
    s.link(o, &p("/d/a"), &p("/d/b"), 1).unwrap();
    s.link(o, &p("/d/a"), &p("/d/c"), 1).unwrap();
    assert_eq!(s.unlink(o, &p("/d/a"), false), Ok(Some(p("/d/b"))));
    assert_eq!(s.lookup(o, &p("/d/a")), Err(ViewError::NotFound));
    assert_eq!(s.lookup(o, &p("/d/c")).unwrap().nlink, 2);
    assert_eq!(f.committed("/d/b").unwrap(), b"data");
    assert_eq!(f.committed("/d/c").unwrap(), b"data");
    assert!(f.dir.path().join("vol/b").exists());
    assert!(!f.dir.path().join("vol/a").exists());
    assert_eq!(committed_links(&f, "/d/b"), ["/d/c"]);
    // The inode number a program saw stays.
    let n = f.session(false).lookup(o, &p("/d/c")).unwrap();
    assert_eq!(
        n.ino.unwrap_or(p("/d/a").default_ino()),
        ino.unwrap_or(p("/d/a").default_ino())
    );
    // Removing a link leaves the file; the last name removes it.
    assert_eq!(s.unlink(o, &p("/d/c"), false), Ok(None));
    assert_eq!(s.lookup(o, &p("/d/b")).unwrap().nlink, 1);
    assert!(committed_links(&f, "/d/b").is_empty());
    assert_eq!(s.unlink(o, &p("/d/b"), false), Ok(None));
    s.commit().unwrap();
    assert!(f.session(false).vol().unwrap().files().is_empty());
    assert!(!f.dir.path().join("vol/b").exists());
}

#[test]
fn renames_keep_hard_links_consistent() {
    let f = Fixture::new();
    let mut s = f.session(true);
    let o = &NoOpenFiles;
    s.mkdir(o, &p("/d/x"), 0o755, None, 1).unwrap();
    put(&mut s, "/d/x/f", b"f");
    put(&mut s, "/d/g", b"g");
    s.commit().unwrap();
    s.link(o, &p("/d/x/f"), &p("/d/out"), 1).unwrap();
    s.link(o, &p("/d/x/f"), &p("/d/x/in"), 1).unwrap();
    // Two names of one file: nothing happens.
    assert_eq!(
        s.rename(o, &p("/d/out"), &p("/d/x/f"), 0),
        Ok(Renamed::Nothing)
    );
    assert_eq!(s.lookup(o, &p("/d/out")).unwrap().nlink, 3);
    // A directory holding the file and one link moves: both follow, the outside link too.
    assert_eq!(
        s.rename(o, &p("/d/x"), &p("/d/y"), 0),
        Ok(Renamed::Moved { kept: None })
    );
    assert_eq!(s.canonical(o, &p("/d/out")), p("/d/y/f"));
    assert_eq!(s.canonical(o, &p("/d/y/in")), p("/d/y/f"));
    assert_eq!(committed_links(&f, "/d/y/f"), ["/d/out", "/d/y/in"]);
    assert_eq!(f.committed("/d/out").unwrap(), b"f");
    // A link moves by name.
    s.rename(o, &p("/d/out"), &p("/d/out2"), 0).unwrap();
    assert_eq!(committed_links(&f, "/d/y/f"), ["/d/out2", "/d/y/in"]);
    // Another file moved over a link: the link goes, the file it named stays.
    s.rename(o, &p("/d/g"), &p("/d/y/in"), 0).unwrap();
    assert_eq!(f.committed("/d/y/in").unwrap(), b"g");
    assert_eq!(committed_links(&f, "/d/y/f"), ["/d/out2"]);
    // Another file moved over a file with a link: it lives on at the link.
    put(&mut s, "/d/h", b"h");
    s.commit().unwrap();
    assert_eq!(
        s.rename(o, &p("/d/h"), &p("/d/y/f"), 0),
        Ok(Renamed::Moved {
            kept: Some(p("/d/out2"))
        })
    );
    assert_eq!(f.committed("/d/y/f").unwrap(), b"h");
    assert_eq!(f.committed("/d/out2").unwrap(), b"f");
    assert_eq!(s.lookup(o, &p("/d/out2")).unwrap().nlink, 1);
    // Every state on the way parsed again from disk (links checked); the files verify.
    assert!(f.session(false).vol().unwrap().verify().is_empty());
}

#[test]
fn hard_links_are_refused_where_the_kernel_refuses_them() {
    let f = Fixture::new();
    let mut s = f.session(true);
    let o = &NoOpenFiles;
    put(&mut s, "/d/a", b"a");
    s.mkdir(o, &p("/d/dir"), 0o755, None, 1).unwrap();
    s.symlink(o, b"a", &p("/d/sym"), None, 1).unwrap();
    s.commit().unwrap();
    assert_eq!(
        s.link(o, &p("/d/dir"), &p("/d/l"), 1),
        Err(ViewError::NotPermitted)
    );
    assert_eq!(
        s.link(o, &p("/d/sym"), &p("/d/l"), 1),
        Err(ViewError::NotPermitted)
    );
    assert_eq!(
        s.link(o, &p("/d/a"), &p("/l"), 1),
        Err(ViewError::CrossDevice)
    );
    assert_eq!(
        s.link(o, &p("/d/a"), &p("/d/dir"), 1),
        Err(ViewError::Exists)
    );
    assert_eq!(
        s.link(o, &p("/d/none"), &p("/d/l"), 1),
        Err(ViewError::NotFound)
    );
    assert_eq!(
        s.link(o, &p("/d/a"), &p("/d/no/l"), 1),
        Err(ViewError::NotFound)
    );
    let mut ro = f.session(false);
    assert_eq!(
        ro.link(o, &p("/d/a"), &p("/d/l"), 1),
        Err(ViewError::ReadOnly)
    );
    // A fifo can have links (an entry only).
    s.mknod(o, &p("/d/fifo"), SpecialKind::Fifo, 0, 0o644, None, 1)
        .unwrap();
    s.link(o, &p("/d/fifo"), &p("/d/fifo2"), 1).unwrap();
    let n = f.session(false).lookup(o, &p("/d/fifo2")).unwrap();
    assert_eq!(
        (n.nlink, matches!(n.kind, NodeKind::Special { .. })),
        (2, true)
    );
}

/// Random sequences of writes, links, removals and renames (of files, of links, of a directory
/// holding some of them) agree with a model of names and files: every name reads its file's
/// content and shows its link count, in the session and after a fresh open from disk (which
/// checks the links both ways), and the volume verifies.
#[test]
fn random_hard_link_sequences_agree_with_a_model_of_names_and_files() {
    for seed in 1..=6u64 {
        let f = Fixture::new();
        let mut s = f.session(true);
        let o = &NoOpenFiles;
        s.mkdir(o, &p("/d/s1"), 0o755, None, 1).unwrap();
        s.commit().unwrap();
        let mut dir = "s1";
        // name (relative to /d, with `S` for the directory) -> file number; file -> content.
        let mut names: BTreeMap<String, u32> = BTreeMap::new();
        let mut content: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
        let all = ["a", "b", "c", "S/x", "S/y"];
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let path = |n: &str, dir: &str| p(&format!("/d/{}", n.replace('S', dir)));
        // The most names one file had at once: the sequence must have made links.
        let mut most = 0;
        for step in 0..200u32 {
            let r = next();
            let a = all[(r % 5) as usize];
            let b = all[((r >> 8) % 5) as usize];
            let (pa, pb) = (path(a, dir), path(b, dir));
            let what = format!("seed {seed} step {step}");
            match (r >> 16) % 8 {
                0 | 1 => {
                    let data = format!("{what} {a}").into_bytes();
                    let target = s.canonical(o, &pa);
                    put(&mut s, &target.to_string(), &data);
                    let fnum = *names.entry(a.to_string()).or_insert(step);
                    content.insert(fnum, data);
                }
                2..=4 => {
                    let r = s.link(o, &pa, &pb, 5);
                    match (names.get(a).copied(), names.contains_key(b)) {
                        (Some(fnum), false) if a != b => {
                            r.unwrap_or_else(|e| panic!("{what}: link {a} {b}: {e:?}"));
                            names.insert(b.to_string(), fnum);
                        }
                        _ => assert!(r.is_err(), "{what}: link {a} {b} should fail"),
                    }
                }
                5 => {
                    let r = s.unlink(o, &pa, false);
                    match names.remove(a) {
                        Some(_) => {
                            r.unwrap_or_else(|e| panic!("{what}: unlink {a}: {e:?}"));
                        }
                        None => assert!(r.is_err(), "{what}: unlink {a} should fail"),
                    }
                }
                6 => {
                    let r = s.rename(o, &pa, &pb, 0);
                    match names.get(a).copied() {
                        Some(fa) => {
                            r.unwrap_or_else(|e| panic!("{what}: rename {a} {b}: {e:?}"));
                            if a != b && names.get(b) != Some(&fa) {
                                names.remove(a);
                                names.insert(b.to_string(), fa);
                            }
                        }
                        None => assert!(r.is_err(), "{what}: rename {a} {b} should fail"),
                    }
                }
                _ => {
                    let other = if dir == "s1" { "s2" } else { "s1" };
                    s.rename(o, &p(&format!("/d/{dir}")), &p(&format!("/d/{other}")), 0)
                        .unwrap_or_else(|e| panic!("{what}: rename dir: {e:?}"));
                    dir = other;
                }
            }
            content.retain(|fnum, _| names.values().any(|v| v == fnum));
            let count = |fnum: u32| names.values().filter(|&&v| v == fnum).count() as u64;
            for n in all {
                match names.get(n) {
                    Some(&fnum) => {
                        let node = s.lookup(o, &path(n, dir)).unwrap();
                        assert_eq!(node.nlink, count(fnum), "{what}: nlink of {n}");
                        most = most.max(node.nlink);
                    }
                    None => assert!(s.lookup(o, &path(n, dir)).is_err(), "{what}: {n} absent"),
                }
            }
            if step % 10 == 9 {
                s.commit().unwrap();
                let fresh = f.session(false);
                for (n, &fnum) in &names {
                    let got = f.committed(&path(n, dir).to_string());
                    assert_eq!(got.as_ref(), content.get(&fnum), "{what}: content of {n}");
                    assert_eq!(
                        fresh.lookup(o, &path(n, dir)).unwrap().nlink,
                        count(fnum),
                        "{what}: committed nlink of {n}"
                    );
                }
                let findings = fresh.vol().unwrap().verify();
                assert!(findings.is_empty(), "{what}: {findings:?}");
            }
        }
        assert!(most >= 3, "seed {seed}: at most {most} names");
    }
}

/// A file renamed away from a name keeps the inode number it showed there (the name's own);
/// a new file made at that name showed the same number, so `cp`, `tar` and `rsync -H` took
/// two different files for one (log rotation: `mv app.log app.log.1`, then a new `app.log`).
#[test]
fn a_new_file_at_a_renamed_files_old_name_showed_the_same_inode_number() {
    let f = Fixture::new();
    let mut s = f.session(true);
    let o = &NoOpenFiles;
    // What `stat` shows: the recorded number, else the path's.
    let ino = |s: &Session<Arc<MemAnchor>>, path: &str| {
        let n = s.lookup(o, &p(path)).unwrap();
        n.ino.unwrap_or(p(path).default_ino())
    };
    put(&mut s, "/d/app.log", b"old");
    s.commit().unwrap();
    let first = ino(&s, "/d/app.log");
    assert_eq!(first, p("/d/app.log").default_ino());
    s.rename(o, &p("/d/app.log"), &p("/d/app.log.1"), 0)
        .unwrap();
    assert_eq!(ino(&s, "/d/app.log.1"), first);
    put(&mut s, "/d/app.log", b"new");
    let shown = ino(&s, "/d/app.log");
    assert_ne!(shown, first, "before the commit");
    s.commit().unwrap();
    let fresh = f.session(false);
    assert_eq!(ino(&fresh, "/d/app.log"), shown);
    assert_eq!(ino(&fresh, "/d/app.log.1"), first);
    // The new file keeps its number once the old one is gone, and through a rename.
    s.unlink(o, &p("/d/app.log.1"), false).unwrap();
    s.commit().unwrap();
    assert_eq!(ino(&s, "/d/app.log"), shown);
    s.rename(o, &p("/d/app.log"), &p("/d/moved"), 0).unwrap();
    assert_eq!(ino(&f.session(false), "/d/moved"), shown);
}

#[test]
fn a_file_removed_and_written_again_in_one_batch_replaces_the_old_one_in_place() {
    let f = Fixture::new();
    let mut s = f.session(true);
    put(&mut s, "/d/j", b"first transaction's journal");
    put(&mut s, "/d/k", b"k");
    s.commit().unwrap();
    // SQLite: the journal is removed at the end of a transaction and made again by the next.
    s.unlink(&NoOpenFiles, &p("/d/j"), false).unwrap();
    put(&mut s, "/d/j", b"second");
    assert_eq!(
        super::commit::removed_then_written(&s.queue),
        BTreeSet::from([p("/d/j")])
    );
    s.commit().unwrap();
    assert_eq!(f.committed("/d/j").as_deref(), Some(&b"second"[..]));
    let mut on_disk: Vec<_> = std::fs::read_dir(f.dir.path().join("vol"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    on_disk.sort();
    assert_eq!(on_disk, ["j", "k"]);
    assert!(f.session(false).vol().unwrap().verify().is_empty());

    // Not when the name was written first, when the last change removes it, when a rename is in
    // the batch or when a directory above it goes.
    put(&mut s, "/d/j", b"third");
    s.unlink(&NoOpenFiles, &p("/d/j"), false).unwrap();
    put(&mut s, "/d/j", b"fourth");
    s.unlink(&NoOpenFiles, &p("/d/k"), false).unwrap();
    put(&mut s, "/d/k", b"k2");
    s.unlink(&NoOpenFiles, &p("/d/k"), false).unwrap();
    assert!(super::commit::removed_then_written(&s.queue).is_empty());
    s.commit().unwrap();
    assert_eq!(f.committed("/d/j").as_deref(), Some(&b"fourth"[..]));
    assert_eq!(f.committed("/d/k"), None);
    s.unlink(&NoOpenFiles, &p("/d/j"), false).unwrap();
    put(&mut s, "/d/j", b"fifth");
    put(&mut s, "/d/m", b"m");
    s.rename(&NoOpenFiles, &p("/d/m"), &p("/d/n"), 0).unwrap();
    assert!(super::commit::removed_then_written(&s.queue).is_empty());
    s.commit().unwrap();
    s.mkdir(&NoOpenFiles, &p("/d/t"), 0o755, None, 1).unwrap();
    put(&mut s, "/d/t/f", b"f");
    s.commit().unwrap();
    s.unlink(&NoOpenFiles, &p("/d/t/f"), false).unwrap();
    s.unlink(&NoOpenFiles, &p("/d/t"), true).unwrap();
    s.mkdir(&NoOpenFiles, &p("/d/t"), 0o755, None, 2).unwrap();
    put(&mut s, "/d/t/f", b"f again");
    assert!(super::commit::removed_then_written(&s.queue).is_empty());
    s.commit().unwrap();
    assert_eq!(f.committed("/d/t/f").as_deref(), Some(&b"f again"[..]));
    assert_eq!(f.committed("/d/j").as_deref(), Some(&b"fifth"[..]));
    // A directory removed and a file made at its name: the directory goes as before.
    s.mkdir(&NoOpenFiles, &p("/d/e"), 0o755, None, 3).unwrap();
    s.commit().unwrap();
    s.unlink(&NoOpenFiles, &p("/d/e"), true).unwrap();
    put(&mut s, "/d/e", b"a file now");
    s.commit().unwrap();
    assert_eq!(f.committed("/d/e").as_deref(), Some(&b"a file now"[..]));
    assert!(f.dir.path().join("vol/e").is_file());
    assert!(f.session(false).vol().unwrap().verify().is_empty());
}

/// Several small files staged in one call (sealed and written on the pool, then queued in the
/// order given) commit as one `stage_put` each would: in a new directory too, and superseding a
/// version of the same file queued before.
#[test]
fn small_files_staged_together_commit_as_if_staged_one_by_one() {
    let f = Fixture::new();
    for pool in [false, true] {
        let mut s = f.session(true);
        if let Some(v) = s.vol.as_mut() {
            let mut o = v.options();
            o.threads.pool = pool;
            v.set_options(o);
        }
        put(&mut s, "/d/a0", b"first version");
        let bodies: Vec<(String, Vec<u8>)> = (0..40)
            .map(|i| {
                let dir = if i % 2 == 0 { "/d" } else { "/d/new/deeper" };
                (
                    format!("{dir}/a{i}"),
                    format!("{pool} {i}\n").repeat(i + 1).into_bytes(),
                )
            })
            .collect();
        let paths: Vec<EmbedPath> = bodies.iter().map(|(path, _)| p(path)).collect();
        let files: Vec<(&EmbedPath, VersionMeta, &[u8])> = bodies
            .iter()
            .zip(&paths)
            .map(|((_, b), path)| (path, meta(0o640), &b[..]))
            .collect();
        let staged = s.stage_puts(&files);
        assert!(staged.iter().all(|r| r.is_ok()), "{staged:?}");
        s.commit().unwrap();
        for (path, b) in &bodies {
            assert_eq!(
                f.committed(path).as_deref(),
                Some(&b[..]),
                "{path} (pool {pool})"
            );
        }
    }
}

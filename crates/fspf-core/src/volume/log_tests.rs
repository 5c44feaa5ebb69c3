//! The metadata log (FORMAT.md §5c): commits append records; every way of tampering with the
//! log is detected; a volume over a frozen index with the log applied reads as a parsed one.
use super::*;
use crate::format::log::{frames, LOG_HEADER_LEN};
use crate::format::metadata::FileEntry;
use crate::volume::log::log_journals_limit;
use std::fs;

struct Fx {
    _d: tempfile::TempDir,
    p: PathBuf,
    key: VolumeKey,
}

fn p(s: &str) -> EmbedPath {
    EmbedPath::parse(s).unwrap()
}

fn logging(mut v: Volume) -> Volume {
    let mut o = v.options();
    o.log = true;
    v.set_options(o);
    v
}

impl Fx {
    fn new() -> (Fx, Volume) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fspf.pb");
        let mut v = encrypted_root_volume(&p, &d.path().join("vol"));
        let (t, key) = v.encrypt().unwrap();
        let v = Volume::open(&p, Some(key.clone()), Some(t)).unwrap();
        (Fx { _d: d, p, key }, logging(v))
    }
    fn open(&self, t: Tag) -> Result<Volume> {
        Volume::open(&self.p, Some(self.key.clone()), Some(t)).map(logging)
    }
    fn log(&self) -> PathBuf {
        log_path(&self.p)
    }
}

fn mkdir(v: &mut Volume, path: &str) -> Tag {
    let t = v.tag();
    v.commit(
        vec![Change::PutEntry(p(path), FileEntry::test_dir())],
        Some(t),
    )
    .unwrap()
}

#[test]
fn a_commit_appends_one_small_record_and_the_last_record_is_the_tag() {
    let (fx, mut v) = Fx::new();
    let checkpoint = fs::read(&fx.p).unwrap();
    let t1 = mkdir(&mut v, "/a");
    let file1 = fs::metadata(fx.log()).unwrap().len();
    let len1 = logical(&fs::read(fx.log()).unwrap()).len() as u64;
    let t2 = mkdir(&mut v, "/a/b");
    let file2 = fs::metadata(fx.log()).unwrap().len();
    let len2 = logical(&fs::read(fx.log()).unwrap()).len() as u64;
    // Records are written over zeros preallocated in 64 KiB steps: the file's length (an
    // inode write at every fdatasync) did not change.
    assert_eq!((file1, file2), (64 << 10, 64 << 10));
    // The checkpoint is untouched; the log holds a header and two records of ~100 bytes.
    assert_eq!(fs::read(&fx.p).unwrap(), checkpoint);
    let rec = len2 - len1;
    assert!((40..200).contains(&rec), "one directory entry: {rec} bytes");
    assert_eq!(len1, LOG_HEADER_LEN as u64 + rec - 2, "{len1} {rec}");
    assert_eq!(Volume::read_tag(&fx.p).unwrap(), t2);
    assert_ne!(t1, t2);
    let w = fx.open(t2).unwrap();
    assert!(w.lookup(&p("/a/b")).is_some() && w.generation() == v.generation());
    // The previous state is a rollback now.
    assert!(matches!(fx.open(t1), Err(Error::TagMismatch { .. })));
}

#[test]
fn the_log_is_compacted_into_a_checkpoint_when_full() {
    let (fx, mut v) = Fx::new();
    let before = fs::read(&fx.p).unwrap();
    let mut t = v.tag();
    let mut n = 0;
    // Each record ~100 bytes: the 128 KiB floor is passed within ~1 500 commits.
    while fs::read(&fx.p).unwrap() == before {
        n += 1;
        t = mkdir(&mut v, &format!("/d{n:05}"));
        assert!(n < 5000, "no checkpoint after {n} commits");
    }
    assert!(n > 500, "checkpoint after only {n} commits");
    // The commit that checkpointed removed the log; the next starts a new one.
    assert!(!fx.log().exists());
    let w = fx.open(t).unwrap();
    assert_eq!(w.paths_below(&EmbedPath::root()).len(), n);
    let t = mkdir(&mut v, "/after");
    assert!(fx.log().exists());
    assert_eq!(
        fx.open(t).unwrap().paths_below(&EmbedPath::root()).len(),
        n + 1
    );
}

/// Three commits after the checkpoint; returns the tags and the log's bytes.
fn three(fx: &Fx, v: &mut Volume) -> ([Tag; 3], Vec<u8>) {
    let a = mkdir(v, "/x");
    let b = mkdir(v, "/y");
    let c = mkdir(v, "/z");
    ([a, b, c], logical(&fs::read(fx.log()).unwrap()))
}

/// The log up to its last complete record (past it: preallocated zeros, FORMAT.md §5c).
fn logical(log: &[u8]) -> Vec<u8> {
    let end = frames(log, LOG_HEADER_LEN)
        .last()
        .map_or(LOG_HEADER_LEN, |f| f.end);
    log[..end].to_vec()
}

fn records(log: &[u8]) -> Vec<std::ops::Range<usize>> {
    frames(log, LOG_HEADER_LEN)
        .map(|f| f.start..f.end)
        .collect()
}

/// Recompute a record's keyless check after changing it, as an attacker would.
fn fix_check(log: &mut [u8], r: std::ops::Range<usize>) {
    let body = r.end - 8;
    let h = blake3::hash(&log[r.start..body]);
    log[body..r.end].copy_from_slice(&h.as_bytes()[..8]);
}

#[test]
fn a_truncated_removed_or_older_log_is_a_rollback() {
    let (fx, mut v) = Fx::new();
    let ([_, b, c], log) = three(&fx, &mut v);
    let r = records(&log);
    // Truncated by one record: the state is b's, refused for c.
    fs::write(fx.log(), &log[..r[2].start]).unwrap();
    assert!(matches!(fx.open(c), Err(Error::TagMismatch { .. })));
    assert_eq!(Volume::read_tag(&fx.p).unwrap(), b);
    // Torn inside the last record (a crash): the same, and b's state still opens.
    fs::write(fx.log(), &log[..r[2].end - 3]).unwrap();
    assert!(matches!(fx.open(c), Err(Error::TagMismatch { .. })));
    assert!(fx.open(b).is_ok());
    // Removed: the checkpoint's state.
    fs::remove_file(fx.log()).unwrap();
    assert!(matches!(fx.open(c), Err(Error::TagMismatch { .. })));
    fs::write(fx.log(), &log).unwrap();
    assert!(fx.open(c).is_ok());
}

#[test]
fn a_flipped_reordered_replayed_or_forked_record_is_detected() {
    let (fx, mut v) = Fx::new();
    let ([a, _, c], log) = three(&fx, &mut v);
    let r = records(&log);
    // Refused given the trusted tag (by the keyless tag check or the chain); and the chain
    // itself refuses it even to a reader that trusts whatever is on disk (no tag given).
    let damaged = |bytes: &[u8], trusted: Tag| {
        fs::write(fx.log(), bytes).unwrap();
        let e = fx.open(trusted).unwrap_err();
        assert!(
            matches!(e, Error::LogDamaged { .. } | Error::TagMismatch { .. }),
            "{e}"
        );
        assert!(e.is_integrity(), "{e}");
        Volume::open(&fx.p, Some(fx.key.clone()), None).unwrap_err()
    };
    // A flipped ciphertext byte, check recomputed: fails authentication.
    let mut bad = log.clone();
    bad[r[1].start + 20] ^= 1;
    fix_check(&mut bad, r[1].clone());
    assert!(matches!(damaged(&bad, c), Error::LogDamaged { .. }));
    // Records 2 and 3 swapped.
    let mut bad = log[..r[1].start].to_vec();
    bad.extend_from_slice(&log[r[2].clone()]);
    bad.extend_from_slice(&log[r[1].clone()]);
    assert!(matches!(damaged(&bad, c), Error::LogDamaged { .. }));
    // Record 2 replayed at the end.
    let mut bad = log.clone();
    bad.extend_from_slice(&log[r[1].clone()]);
    assert!(matches!(damaged(&bad, c), Error::LogDamaged { .. }));
    // A fork: another writer continues state a (the log cut back to it) with its own record.
    fs::write(fx.log(), &log[..r[0].end]).unwrap();
    let mut other = fx.open(a).unwrap();
    let fork_tag = mkdir(&mut other, "/fork");
    let forked = fs::read(fx.log()).unwrap();
    let fork_rec = &forked[r[0].end..];
    // Both continuations in one log: the second does not follow the first.
    let mut bad = log.clone();
    bad.extend_from_slice(fork_rec);
    assert!(matches!(damaged(&bad, c), Error::LogDamaged { .. }));
    // The fork alone, given the tag the run trusts (c): refused as a rollback.
    fs::write(fx.log(), &forked).unwrap();
    assert!(matches!(fx.open(c), Err(Error::TagMismatch { .. })));
    assert!(
        fx.open(fork_tag).is_ok(),
        "the fork is a valid state of its own tag"
    );
    // A log made for another checkpoint is stale: ignored, the checkpoint's state shows.
    let mut stale = log.clone();
    stale[8] ^= 1;
    fs::write(fx.log(), &stale).unwrap();
    assert!(matches!(fx.open(c), Err(Error::TagMismatch { .. })));
    fs::write(fx.log(), &log).unwrap();
    assert!(fx.open(c).is_ok());
}

#[test]
fn a_commit_after_a_torn_append_overwrites_the_torn_record() {
    let (fx, mut v) = Fx::new();
    let ([_, b, _], log) = three(&fx, &mut v);
    let r = records(&log);
    fs::write(fx.log(), &log[..r[2].end - 5]).unwrap();
    let mut w = fx.open(b).unwrap();
    let t = mkdir(&mut w, "/after-crash");
    let now = fs::read(fx.log()).unwrap();
    assert_eq!(records(&now).len(), 3);
    assert_eq!(&now[..r[2].start], &log[..r[2].start]);
    let o = fx.open(t).unwrap();
    assert!(o.lookup(&p("/after-crash")).is_some() && o.lookup(&p("/z")).is_none());
}

#[test]
fn a_volume_over_an_index_with_the_log_applied_reads_as_the_parsed_volume() {
    let (fx, mut v) = Fx::new();
    for d in ["/a", "/a/b", "/a/b/c", "/a-b", "/e", "/e/f", "/g"] {
        mkdir(&mut v, d);
    }
    let bytes: &'static [u8] = Box::leak(v.build_index().unwrap().to_vec().into_boxed_slice());
    // Changes after the index's state: removals (of a subtree too), renames, additions.
    let t0 = v.tag();
    v.commit(
        vec![
            Change::Remove(p("/a/b")),
            Change::Rename {
                from: p("/e"),
                to: p("/a/e"),
            },
            Change::PutEntry(p("/g/h/i"), FileEntry::test_dir()),
            Change::PutEntry(p("/new"), FileEntry::test_dir()),
        ],
        Some(t0),
    )
    .unwrap();
    let t = mkdir(&mut v, "/a/e/f/k");
    let mut ix = logging(Volume::from_index(&fx.p, Some(fx.key.clone()), bytes).unwrap());
    assert!(ix.catch_up().unwrap());
    assert_eq!(ix.tag(), t);
    assert!(ix.is_indexed());
    let parsed = fx.open(t).unwrap();
    let check = |ix: &Volume, parsed: &Volume| {
        let all = parsed.paths_below(&EmbedPath::root());
        assert_eq!(ix.paths_below(&EmbedPath::root()), all);
        let mut probe: Vec<EmbedPath> = all.clone();
        for x in ["/", "/a/b", "/a/b/c", "/e", "/g/h", "/zz", "/a-b"] {
            probe.push(p(x));
        }
        for q in &probe {
            assert_eq!(ix.lookup(q), parsed.lookup(q), "{q}");
            let shown = |v: &Volume| v.ino_of(q, v.lookup(q).and_then(|e| e.ino));
            assert_eq!(shown(ix), shown(parsed), "{q}");
            assert_eq!(ix.has_below(q), parsed.has_below(q), "{q}");
            assert_eq!(
                ix.children(q).collect::<Vec<_>>(),
                parsed.children(q).collect::<Vec<_>>(),
                "{q}"
            );
            assert_eq!(ix.paths_below(q), parsed.paths_below(q), "{q}");
        }
    };
    check(&ix, &parsed);
    // The indexed volume commits through the log without parsing the index.
    let t2 = {
        let t = ix.tag();
        ix.commit(
            vec![
                Change::Remove(p("/a")),
                Change::PutEntry(p("/z"), FileEntry::test_dir()),
            ],
            Some(t),
        )
        .unwrap()
    };
    assert!(ix.is_indexed(), "a logged commit keeps the index");
    let parsed = fx.open(t2).unwrap();
    check(&ix, &parsed);
    // A parsed copy of the indexed volume equals the parsed volume.
    ix.ensure_loaded().unwrap();
    assert_eq!(ix.files(), parsed.files());
}

/// Regression (pjdfstest under `fspf run`, after the metadata log): the log was created 0600
/// whatever the fspf's mode, so the run's processes that drop to another uid could no longer
/// read the state their run committed.
#[test]
fn the_log_was_created_0600_and_locked_out_the_other_users() {
    use std::os::unix::fs::PermissionsExt;
    let (fx, mut v) = Fx::new();
    fs::set_permissions(&fx.p, fs::Permissions::from_mode(0o644)).unwrap();
    mkdir(&mut v, "/a");
    let m = fs::metadata(fx.log()).unwrap().permissions().mode() & 0o777;
    assert_eq!(m, 0o644);
}

/// Regression: a new log was written in place over a stale one (a crash between a checkpoint
/// and the removal of the old log leaves it); until the truncation (or after a crash that kept
/// the write but not the truncation) the stale records followed the new one, failed the chain
/// and made the whole state unreadable.
#[test]
fn a_new_log_was_written_over_a_stale_one_and_its_records_broke_the_chain() {
    let (fx, mut v) = Fx::new();
    let ([..], stale) = three(&fx, &mut v);
    // A checkpoint (as when the log is full), then the old log put back as a crash leaves it.
    let t = v.save().unwrap();
    assert!(!fx.log().exists());
    fs::write(fx.log(), &stale).unwrap();
    let mut v = fx.open(t).unwrap();
    // A second name keeps the stale file: the new log must be another file, the stale one
    // never rewritten.
    let keep = fx.p.with_file_name("stale-log");
    fs::hard_link(fx.log(), &keep).unwrap();
    let t = mkdir(&mut v, "/new");
    assert_eq!(
        fs::read(&keep).unwrap(),
        stale,
        "the stale log was written in place"
    );
    let now = fs::read(fx.log()).unwrap();
    assert_eq!(records(&now).len(), 1);
    assert!(fx.open(t).unwrap().lookup(&p("/new")).is_some());
}

#[test]
fn is_current_on_disk_answers_without_reading_the_log_and_never_wrongly_yes() {
    let (fx, mut v) = Fx::new();
    assert!(!v.is_current_on_disk().unwrap(), "no log yet: not known");
    let t = mkdir(&mut v, "/a");
    assert!(v.is_current_on_disk().unwrap());
    // Another writer appends: no longer current.
    let mut w = fx.open(t).unwrap();
    let t2 = mkdir(&mut w, "/b");
    assert!(!v.is_current_on_disk().unwrap());
    assert!(w.is_current_on_disk().unwrap());
    // The first one follows it at its next commit and merges onto it.
    let t3 = v
        .commit(
            vec![Change::PutEntry(p("/c"), FileEntry::test_dir())],
            Some(t2),
        )
        .unwrap();
    let o = fx.open(t3).unwrap();
    assert!(o.lookup(&p("/b")).is_some() && o.lookup(&p("/c")).is_some());
    // A torn record after its own (in the preallocated zeros): not known (the log is read).
    let end = logical(&fs::read(fx.log()).unwrap()).len() as u64;
    let f = fs::OpenOptions::new().write(true).open(fx.log()).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"torn", end).unwrap();
    assert!(!v.is_current_on_disk().unwrap());
    std::os::unix::fs::FileExt::write_all_at(&f, &[0; 4], end).unwrap();
    assert!(
        v.is_current_on_disk().unwrap(),
        "zeros after its record: its own state"
    );
    // A checkpoint by another writer: no longer current.
    let mut x = fx.open(t3).unwrap();
    x.save().unwrap();
    assert!(!v.is_current_on_disk().unwrap());
}

#[test]
fn a_commit_given_the_look_under_its_lock_appends_through_the_log_that_look_opened() {
    let (fx, mut v) = Fx::new();
    mkdir(&mut v, "/a");
    let lock = Volume::lock(&fx.p).unwrap();
    let (disk, current) = v.disk_tag_locked(&lock).unwrap();
    assert_eq!(disk, v.tag());
    let current = current.expect("the disk holds this volume's state");
    let t = v.tag();
    let t2 = v
        .commit_announced(
            vec![Change::PutEntry(p("/b"), FileEntry::test_dir())],
            Some(t),
            Some(current),
            &mut |_| Ok(()),
        )
        .unwrap();
    drop(lock);
    // The record is on disk: another reader opens the new state, with both entries.
    let w = fx.open(t2).unwrap();
    assert!(w.lookup(&p("/a")).is_some() && w.lookup(&p("/b")).is_some());
    assert!(v.is_current_on_disk().unwrap());
    // Once another writer appended, the look finds no state of its own to hand on.
    let mut w = w;
    mkdir(&mut w, "/c");
    let lock = Volume::lock(&fx.p).unwrap();
    let (disk, current) = v.disk_tag_locked(&lock).unwrap();
    assert_eq!(disk, w.tag());
    assert!(current.is_none());
    drop(lock);
    // A look whose volume moved on since is not used: the commit looks at the disk itself.
    let lock = Volume::lock(&fx.p).unwrap();
    let (_, current) = w.disk_tag_locked(&lock).unwrap();
    let current = current.expect("w's own state");
    assert_ne!(v.tag(), w.tag());
    let t4 = v
        .commit_announced(
            vec![Change::PutEntry(p("/d"), FileEntry::test_dir())],
            Some(w.tag()),
            Some(current),
            &mut |_| Ok(()),
        )
        .unwrap();
    drop(lock);
    let x = fx.open(t4).unwrap();
    for d in ["/a", "/b", "/c", "/d"] {
        assert!(x.lookup(&p(d)).is_some(), "{d}");
    }
}

/// The numbers entries record, over a frozen index and its overlay as over a parsed volume: a
/// directory renamed away from `/x` records `/x`'s own number, so a new `/x` shows another,
/// and records it; once the renamed one is gone, the number is free again.
#[test]
fn an_indexed_volume_knows_which_inode_numbers_its_entries_record() {
    let (fx, mut v) = Fx::new();
    mkdir(&mut v, "/x");
    let own = p("/x").default_ino();
    let t = v.tag();
    v.commit(
        vec![Change::Rename {
            from: p("/x"),
            to: p("/y"),
        }],
        Some(t),
    )
    .unwrap();
    mkdir(&mut v, "/x");
    let new_x = v.lookup(&p("/x")).unwrap().ino.expect("recorded");
    assert_ne!(new_x, own);
    assert_eq!(v.lookup(&p("/y")).unwrap().ino, Some(own));
    let bytes: &'static [u8] = Box::leak(v.build_index().unwrap().to_vec().into_boxed_slice());
    crate::format::index::FrozenIndex::open(bytes)
        .unwrap()
        .validate()
        .unwrap();
    let mut ix = logging(Volume::from_index(&fx.p, Some(fx.key.clone()), bytes).unwrap());
    assert!(ix.is_indexed());
    assert!(ix.ino_recorded(own) && ix.ino_recorded(new_x));
    assert!(!ix.ino_recorded(p("/z").default_ino()));
    // /z shows its own number; the overlay's removal of /y frees /x's.
    assert_eq!(ix.ino_of(&p("/z"), None), p("/z").default_ino());
    let t = ix.tag();
    ix.commit(vec![Change::Remove(p("/y"))], Some(t)).unwrap();
    assert!(ix.is_indexed());
    assert!(!ix.ino_recorded(own));
    assert_eq!(ix.ino_of(&p("/x2"), None), p("/x2").default_ino());
    let t = ix.tag();
    ix.commit(
        vec![Change::PutEntry(p("/w"), {
            let mut e = FileEntry::test_dir();
            e.ino = Some(p("/q").default_ino());
            e
        })],
        Some(t),
    )
    .unwrap();
    assert!(ix.ino_recorded(p("/q").default_ino()));
    assert_ne!(ix.ino_of(&p("/q"), None), p("/q").default_ino());
}

#[test]
fn a_writer_that_reads_its_log_once_lets_journals_fill_more_of_it() {
    let (_fx, mut v) = Fx::new();
    mkdir(&mut v, "/a");
    let budget = log_journals_limit(v.log.checkpoint_len);
    assert_eq!(budget, 2 * LOG_MIN_LIMIT);
    assert!(v.log_has_room(100, budget - 1000));
    assert!(!v.log_has_room(100, budget + 1));
    // The FUSE daemon's budget (VolumeOptions::log_journals).
    let mut o = v.options();
    o.log_journals = 4 << 20;
    v.set_options(o);
    assert!(v.log_has_room(100, 3 << 20));
    assert!(!v.log_has_room(100, (4 << 20) + 1));
}

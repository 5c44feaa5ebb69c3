//! A subset of pjdfstest (vendored in `third_party/pjdfstest`, run by `bench/pjdfstest-run.sh`)
//! under the in-process shield (`bench/pjdfstest.sh`: the whole run under `fspf run --mutable`,
//! in a mutable encrypted region) and on a mutable FUSE mount. Every test file of the subset
//! passes today; a regression in permissions, owners, modes, times, renames, special files or
//! name limits fails the file that covers it. The full suite (about 15 minutes) is
//! `bash bench/pjdfstest.sh`; its figure and the reasons for every remaining failure are in
//! docs/SHIELD.md and docs/FUSE.md. Needs root (the suite switches users), a C compiler,
//! autoconf, automake and perl's `prove`; `.ci/run` installs them.
use crate::fuse::{need, Mounted};
use crate::harness::FSPF;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Test files of the subset (relative to pjdfstest's `tests/`): each syscall family's files
/// that do not exercise access times (not recorded, see docs/SHIELD.md), hard links included.
const SUBSET: &[&str] = &[
    "chmod/05.t",
    "chmod/07.t",
    "chmod/11.t",
    "chmod/12.t",
    "chown/05.t",
    "chown/07.t",
    "ftruncate/00.t",
    "ftruncate/05.t",
    "ftruncate/12.t",
    "granular/00.t",
    "granular/02.t",
    "link/00.t",
    "link/01.t",
    "link/06.t",
    "mkdir/02.t",
    "mkdir/05.t",
    "mkdir/06.t",
    "mkfifo/05.t",
    "mknod/08.t",
    "open/02.t",
    "open/05.t",
    "open/07.t",
    "open/08.t",
    "open/09.t",
    "open/16.t",
    "posix_fallocate/00.t",
    "rename/04.t",
    "rename/12.t",
    "rename/13.t",
    "rename/20.t",
    "rename/21.t",
    "rmdir/02.t",
    "rmdir/06.t",
    "rmdir/07.t",
    "rmdir/11.t",
    "symlink/05.t",
    "symlink/06.t",
    "truncate/00.t",
    "truncate/05.t",
    "truncate/12.t",
    "unlink/05.t",
    "unlink/06.t",
    "unlink/11.t",
    "unlink/14.t",
    "utimensat/06.t",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn preconditions() {
    let o = Command::new("id").arg("-u").output().expect("id");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "0",
        "pjdfstest switches users: run the tests as root"
    );
    need("cc", "gcc");
    need("make", "make");
    need("autoreconf", "autoconf");
    need("aclocal", "automake");
    need("prove", "perl");
}

/// Run `script` with `args`; returns the runner's summary line after checking it.
fn pjdfstest(script: &str, args: &[String]) -> String {
    preconditions();
    let build = repo().join("target/pjdfstest-build");
    let o = Command::new("bash")
        .arg(repo().join(script))
        .args(args)
        .env("SKIP_BUILD", "1")
        .env("FSPF_BIN", FSPF)
        .env("PJD_BUILD", &build)
        .output()
        .expect("bash");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let last = out
        .lines()
        .rfind(|l| l.starts_with("pjdfstest: "))
        .unwrap_or_else(|| {
            panic!(
                "no summary from {script}: {out}{}",
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .to_string();
    let want = format!(
        "pjdfstest: {n}/{n} test files pass, 0 of ",
        n = SUBSET.len()
    );
    assert!(
        last.starts_with(&want),
        "every file of the subset passes:\n{out}"
    );
    last
}

#[test]
fn pjdfstest_subset_passes_under_the_in_process_shield() {
    let args: Vec<String> = SUBSET.iter().map(|s| s.to_string()).collect();
    pjdfstest("bench/pjdfstest.sh", &args);
}

#[test]
fn pjdfstest_subset_passes_on_a_mutable_fuse_mount() {
    let m = Mounted::new(true);
    let dir = m.m("data/pjd");
    std::fs::create_dir(&dir).expect("mkdir on the mount");
    let mut args = vec![dir.display().to_string()];
    args.extend(SUBSET.iter().map(|s| s.to_string()));
    pjdfstest("bench/pjdfstest-run.sh", &args);
    drop(m);
}

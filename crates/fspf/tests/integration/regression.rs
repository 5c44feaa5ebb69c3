//! One test per bug found, named after the bug.
use crate::harness::*;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;

/// `fspf export` rebuilt symlink targets through `String::from_utf8_lossy`, turning a target like
/// `b"t-\xfe"` into `"t-\u{fffd}"`.
#[test]
fn export_mangled_non_utf8_symlink_targets() {
    let env = Env::new();
    let src = env.mkdir("src");
    std::os::unix::fs::symlink(OsStr::from_bytes(b"t-\xfe\x80"), src.join("l")).unwrap();
    env.write("src/f", "f");
    env.ok(["create", "fspf.pb"]);
    env.ok(["addr", "fspf.pb", "/", "--kernel", "/", "-n"]);
    env.ok(["addr", "fspf.pb", "/a", "-a", "--kernel", &env.p("src")]);
    env.ok(["addf", "fspf.pb", "/a", "src"]);
    env.ok(["export", "fspf.pb", "/a", "out"]);
    let t = fs::read_link(env.path("out/l")).unwrap();
    assert_eq!(t.as_os_str().as_bytes(), b"t-\xfe\x80");
}

/// `fspf create-volume -a DIR` on a directory with a top-level file failed with a bare
/// "No such file or directory": the hard-link stage was created only after linking into it.
#[test]
fn create_volume_authenticated_failed_on_top_level_files() {
    let env = Env::new();
    env.write("v/a.txt", "A");
    let out = env.ok(["create-volume", "-a", "v"]);
    assert!(out.contains("(authenticated, 1 files)"), "{out}");
    // Only the volume and its fspf files remain; no stage directory.
    let names: Vec<_> = fs::read_dir(env.root())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["v"], "{names:?}");
}

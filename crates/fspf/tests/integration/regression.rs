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

/// `fspf verify` missed flips in outboard bytes that no chunk verification reads (the last node of
/// an odd-width Merkle level, e.g. leaf 2 of a 3-chunk file).
#[test]
fn verify_missed_flips_in_unpaired_outboard_nodes() {
    let env = Env::new();
    env.write("a/three", pattern(2 * CHUNK + 7, 1));
    env.write("a/five", pattern(4 * CHUNK + 1, 2));
    env.ok(["create", "fspf.pb"]);
    env.ok(["addr", "fspf.pb", "/", "--kernel", "/", "-n"]);
    env.ok([
        "addr",
        "fspf.pb",
        "/a",
        "-a",
        "--kernel",
        &env.p("a"),
        "-c",
        "4096",
    ]);
    env.ok(["addf", "fspf.pb", "/a", "a"]);
    let trees: Vec<_> = fs::read_dir(env.path("fspf.pb.trees"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(trees.len(), 2);
    for t in trees {
        let good = fs::read(&t).unwrap();
        // Flip one byte in every node.
        for node in 0..good.len() / 32 {
            let off = node * 32 + 5;
            flip(&t, off, 0x02);
            let o = env.run(["verify", "fspf.pb"]);
            assert_eq!(o.status.code(), Some(1), "{t:?} node {node} flipped");
            for name in ["/a/three", "/a/five"] {
                let c = env.run(["cat", "fspf.pb", name]);
                if !c.status.success() {
                    assert!(c.stdout.is_empty());
                }
            }
            fs::write(&t, &good).unwrap();
        }
    }
    env.ok(["verify", "fspf.pb"]);
}

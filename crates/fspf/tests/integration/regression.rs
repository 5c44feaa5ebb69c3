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

/// I/O errors printed their cause twice: "nosuch: No such file or directory (os error 2): No such
/// file or directory (os error 2)" (fspf-core's `Io` shows its source and anyhow's `{:#}` again).
#[test]
fn io_errors_repeated_their_cause() {
    let env = Env::new();
    let o = env.fails(["verify", "nosuch.pb"]);
    let e = stderr(&o);
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
    assert!(e.contains("nosuch.pb"), "{e}");
    env.ok(["create", "fspf.pb"]);
    env.ok(["addr", "fspf.pb", "/", "--kernel", "/", "-n"]);
    env.ok(["addr", "fspf.pb", "/a", "-a", "--kernel", &env.p("a")]);
    let o = env.fails(["addf", "fspf.pb", "/a", "missing-source"]);
    let e = stderr(&o);
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
    assert!(e.contains("missing-source"), "{e}");
}

/// `verify` skipped every unlisted file whose name starts with "." and contains ".fspf-", so a
/// planted `.evil.fspf-x` went unreported. Only exact shadow names (`.NAME.fspf-<32 hex>`, left by
/// an interrupted commit) are skipped now.
#[test]
fn verify_ignored_any_dot_name_containing_fspf() {
    let env = Env::new();
    env.write("src/a", "a");
    env.mkdir("vol");
    env.ok(["create", "fspf.pb"]);
    env.ok(["addr", "fspf.pb", "/", "--kernel", "/", "-n"]);
    env.ok(["addr", "fspf.pb", "/d", "-e", "--kernel", &env.p("vol")]);
    env.ok(["addf", "fspf.pb", "/d", "src", &env.p("vol")]);
    for planted in [
        ".evil.fspf-x",
        ".x.fspf-",
        ".fspf-0123456789abcdef0123456789abcdef",
    ] {
        env.write(format!("vol/{planted}"), "planted");
        let o = env.fails(["verify", "fspf.pb"]);
        assert!(
            stdout(&o).contains(&format!("/d/{planted}: unlisted file")),
            "{planted}: {}",
            stdout(&o)
        );
        let o = env.fails(["cat", "fspf.pb", &format!("/d/{planted}")]);
        assert!(o.stdout.is_empty());
        fs::remove_file(env.path(format!("vol/{planted}"))).unwrap();
    }
    // A leftover shadow of an interrupted commit is not a finding (and still not readable).
    let shadow = ".a.fspf-0123456789abcdef0123456789abcdef";
    env.write(format!("vol/{shadow}"), "leftover");
    env.ok(["verify", "fspf.pb"]);
    let o = env.fails(["cat", "fspf.pb", &format!("/d/{shadow}")]);
    assert!(o.stdout.is_empty());
}

// Also fixed: `Debug` of the parsed command line printed the key (`KeyTagArgs`, `ShowArgs`); the
// regression test needs the binary's private types, so it lives in crates/fspf/src/main.rs
// (`parsed_args_debug_showed_the_key`).

//! The reference walkthrough and the CLI's contract: exact output lines, flag placement, errors.
use crate::harness::*;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

fn re(pattern: &str) -> regex::Regex {
    regex::Regex::new(pattern).expect("regex")
}

#[track_caller]
fn assert_line(out: &str, pattern: &str) {
    let r = re(&format!("^{pattern}$"));
    assert!(
        out.lines().any(|l| r.is_match(l)),
        "no line matches {pattern:?} in:\n{out}"
    );
}

const HEX32: &str = "[0-9a-f]{32}";
const HEX64: &str = "[0-9a-f]{64}";

/// The reference's /data walkthrough, line by line.
fn walkthrough(env: &Env) -> KeyTag {
    env.write("data-original/hello.txt", "Hello World\n");
    env.write(
        "data-original/world.py",
        "f = open('/data/hello.txt', 'r')\nprint str(f.read())\n",
    );
    env.mkdir("volume");
    let out = env.ok(["create", "fspf.pb"]);
    assert_line(
        &out,
        &format!("Created empty file system protection file in fspf.pb. AES-GCM tag: {HEX32}"),
    );
    let out = env.ok(["addr", "fspf.pb", "/", "--kernel", "/", "--not-protected"]);
    assert_line(
        &out,
        &format!("Added region / to file system protection file fspf.pb new AES-GCM tag: {HEX32}"),
    );
    let vol = env.p("volume");
    let out = env.ok(["addr", "fspf.pb", "/data", "--encrypted", "--kernel", &vol]);
    assert_line(
        &out,
        &format!(
            "Added region /data to file system protection file fspf.pb new AES-GCM tag: {HEX32}"
        ),
    );
    let out = env.ok(["addf", "fspf.pb", "/data", "data-original", &vol]);
    assert_line(
        &out,
        &format!("Added files to file system protection file fspf.pb new AES-GCM tag: {HEX32}"),
    );
    let tag_before = last_word(&out);
    assert_eq!(env.ok(["show", "--tag", "fspf.pb"]).trim(), tag_before);
    let out = env.ok(["encrypt", "fspf.pb"]);
    assert_line(
        &out,
        &format!(
            "Encrypted file system protection file fspf.pb AES-GCM tag: ({HEX32}) key: ({HEX64})"
        ),
    );
    env.write("keytag", &out);
    let kt = parse_encrypt_line(out.trim());
    assert_ne!(kt.tag, tag_before, "encrypt must change the tag");
    assert_eq!(env.ok(["show", "--tag", "fspf.pb"]).trim(), kt.tag);
    kt
}

#[test]
fn reference_walkthrough_prints_the_reference_lines_and_cat_shows_plaintext() {
    let env = Env::new();
    let kt = walkthrough(&env);
    // awk '{print $11}' / '{print $9}' on the keytag file.
    let keytag = String::from_utf8(env.read("keytag")).unwrap();
    let awk = parse_encrypt_line(keytag.trim());
    assert_eq!(awk, kt);
    let out = env.ok([
        "cat",
        "fspf.pb",
        "/data/hello.txt",
        "--key",
        &kt.key,
        "--tag",
        &kt.tag,
    ]);
    assert_eq!(out, "Hello World\n");
    // Same through the environment variables of the reference.
    let o = env.run_env(
        ["cat", "fspf.pb", "/data/world.py"],
        &[("SCONE_FSPF_KEY", &kt.key), ("SCONE_FSPF_TAG", &kt.tag)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "f = open('/data/hello.txt', 'r')\nprint str(f.read())\n"
    );
    // And through --key-file holding the encrypt line.
    let out = env.ok([
        "cat",
        "fspf.pb",
        "/data/hello.txt",
        "--key-file",
        "keytag",
        "--tag",
        &kt.tag,
    ]);
    assert_eq!(out, "Hello World\n");
    let v = env.ok(["verify", "fspf.pb", "--key", &kt.key, "--tag", &kt.tag]);
    assert_line(&v, &format!("OK: 2 files verified against tag {}", kt.tag));
}

#[test]
fn ciphertext_on_disk_differs_and_holds_no_plaintext() {
    let env = Env::new();
    walkthrough(&env);
    for name in ["hello.txt", "world.py"] {
        let plain = env.read(format!("data-original/{name}"));
        let ct = env.read(format!("volume/{name}"));
        assert_ne!(plain, ct);
        assert_eq!(
            ct.len(),
            24 + plain.len() + 16,
            "{name}: header + body + tag"
        );
        assert_eq!(&ct[..8], b"fspfE\x01\0\0");
        for w in plain.windows(6) {
            assert!(
                !ct.windows(6).any(|c| c == w),
                "{name}: plaintext {:?} visible in ciphertext",
                String::from_utf8_lossy(w)
            );
        }
    }
    // The encrypted fspf hides file names too.
    let pb = env.read("fspf.pb");
    assert!(!pb.windows(9).any(|w| w == b"hello.txt"));
}

#[test]
fn flags_work_before_and_after_positionals() {
    let env = Env::new();
    env.mkdir("v1");
    env.mkdir("v2");
    env.ok(["create", "fspf.pb"]);
    env.ok(["addr", "--kernel", "/", "--not-protected", "fspf.pb", "/"]);
    env.ok(["addr", "-e", "--kernel", &env.p("v1"), "fspf.pb", "/a"]);
    env.ok(["addr", "fspf.pb", "-a", "/b", "--kernel", &env.p("v2")]);
    env.write("src/x", "x");
    let kt = env.encrypt(None);
    let out = env.ok([
        "addf", "--key", &kt.key, "--tag", &kt.tag, "fspf.pb", "/a", "src", "v1",
    ]);
    let tag = last_word(&out);
    env.ok(["cat", "--tag", &tag, "fspf.pb", "--key", &kt.key, "/a/x"]);
    env.ok(["show", "fspf.pb", &kt.key]);
    env.ok(["show", "--key", &kt.key, "fspf.pb", "--json"]);
    env.ok(["show", "fspf.pb", "--tag"]);
}

fn fresh_with_root(env: &Env) {
    env.ok(["create", "fspf.pb"]);
    env.ok(["addr", "fspf.pb", "/", "--kernel", "/", "-n"]);
}

fn key_len_of(env: &Env, region: &str) -> Option<u64> {
    let j: serde_json::Value =
        serde_json::from_str(&env.ok(["show", "fspf.pb", "--json"])).expect("json");
    j["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["embed_point"] == region)
        .and_then(|r| r["key_length"].as_u64())
}

#[test]
fn key_length_accepts_bytes_and_bits_and_rejects_others() {
    let env = Env::new();
    fresh_with_root(&env);
    for (flag, want, ep) in [
        ("16", 16, "/k16"),
        ("24", 24, "/k24"),
        ("32", 32, "/k32"),
        ("128", 16, "/k128"),
        ("256", 32, "/k256"),
    ] {
        env.ok(["addr", "fspf.pb", ep, "-e", "--ephemeral", "-k", flag]);
        assert_eq!(key_len_of(&env, ep), Some(want), "-k {flag}");
    }
    env.ok(["addr", "fspf.pb", "/dflt", "-a", "--ephemeral"]);
    assert_eq!(key_len_of(&env, "/dflt"), Some(32), "default key length");
    let before = env.read("fspf.pb");
    let o = env.fails(["addr", "fspf.pb", "/k20", "-e", "--ephemeral", "-k", "20"]);
    assert!(stderr(&o).contains("--key-length 20"), "{}", stderr(&o));
    assert_eq!(env.read("fspf.pb"), before);
}

#[test]
fn addr_errors_are_clear_and_leave_the_fspf_alone() {
    let env = Env::new();
    fresh_with_root(&env);
    env.ok(["addr", "fspf.pb", "/data", "-e", "--kernel", "/data"]);
    let before = env.read("fspf.pb");
    for (args, needle) in [
        (
            vec!["addr", "fspf.pb", "/data", "-a", "--kernel", "/x"],
            "region /data already exists",
        ),
        (
            vec!["addr", "fspf.pb", "/data/", "-a", "--kernel", "/x"],
            "region /data already exists",
        ),
        (
            vec!["addr", "fspf.pb", "data", "-a", "--kernel", "/x"],
            "must be absolute",
        ),
        (
            vec![
                "addr", "fspf.pb", "/np", "-n", "--kernel", "/np", "-k", "16",
            ],
            "not-protected",
        ),
        (
            vec!["addr", "fspf.pb", "/rel", "-a", "--kernel", "relative/dir"],
            "must be absolute",
        ),
    ] {
        let o = env.fails(&args);
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
        assert_eq!(env.read("fspf.pb"), before, "{args:?} changed the fspf");
    }
    // clap-level: a region needs exactly one class and one kind.
    let o = env.run(["addr", "fspf.pb", "/z", "--kernel", "/z"]);
    assert!(!o.status.success());
    let o = env.run(["addr", "fspf.pb", "/z", "-a", "-e", "--kernel", "/z"]);
    assert!(!o.status.success());
    assert_eq!(env.read("fspf.pb"), before);
}

#[test]
fn two_regions_without_root_give_a_clear_error_on_addf_and_verify() {
    let env = Env::new();
    env.mkdir("a");
    env.mkdir("b");
    env.write("src/x", "x");
    env.ok(["create", "fspf.pb"]);
    env.ok(["addr", "fspf.pb", "/a", "-a", "--kernel", &env.p("a")]);
    env.ok(["addr", "fspf.pb", "/b", "-a", "--kernel", &env.p("b")]);
    let before = env.read("fspf.pb");
    let o = env.fails(["addf", "fspf.pb", "/a", "src", &env.p("a")]);
    assert!(stderr(&o).contains("no root region"), "{}", stderr(&o));
    assert_eq!(env.read("fspf.pb"), before);
    let o = env.fails(["verify", "fspf.pb"]);
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(all.contains("no root region"), "{all}");
}

#[test]
fn create_refuses_to_overwrite_without_force() {
    let env = Env::new();
    fresh_with_root(&env);
    let before = env.read("fspf.pb");
    let o = env.fails(["create", "fspf.pb"]);
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(env.read("fspf.pb"), before);
    env.ok(["create", "fspf.pb", "--force"]);
    assert_ne!(env.read("fspf.pb"), before);
    let j: serde_json::Value =
        serde_json::from_str(&env.ok(["show", "fspf.pb", "--json"])).unwrap();
    assert_eq!(j["regions"].as_array().unwrap().len(), 0);
}

#[test]
fn addf_refuses_output_equal_to_source_and_encrypted_without_output() {
    let env = Env::new();
    fresh_with_root(&env);
    env.write("vol/secret.txt", "top secret");
    env.ok(["addr", "fspf.pb", "/data", "-e", "--kernel", &env.p("vol")]);
    let before = env.read("fspf.pb");
    let o = env.fails(["addf", "fspf.pb", "/data", "vol", "vol"]);
    assert!(stderr(&o).contains("must differ"), "{}", stderr(&o));
    // through another spelling of the same directory
    let o = env.fails([
        "addf",
        "fspf.pb",
        "/data",
        "vol",
        &format!("{}/.", env.p("vol")),
    ]);
    assert!(stderr(&o).contains("must differ"), "{}", stderr(&o));
    assert_eq!(env.read("vol/secret.txt"), b"top secret");
    let o = env.fails(["addf", "fspf.pb", "/data", "vol"]);
    assert!(stderr(&o).contains("OUTPUT_DIR"), "{}", stderr(&o));
    assert_eq!(env.read("fspf.pb"), before);
    assert_eq!(env.read("vol/secret.txt"), b"top secret");
}

#[test]
fn addf_into_not_protected_region_says_nothing_to_record() {
    let env = Env::new();
    fresh_with_root(&env);
    env.write("src/x", "x");
    let before = env.read("fspf.pb");
    let o = env.fails(["addf", "fspf.pb", "/", "src"]);
    assert!(stderr(&o).contains("nothing to record"), "{}", stderr(&o));
    assert_eq!(env.read("fspf.pb"), before);
}

#[test]
fn wrong_key_wrong_tag_and_missing_key_are_named_and_change_nothing() {
    let env = Env::new();
    let kt = walkthrough(&env);
    env.write("more/new.txt", "new");
    let before = env.read("fspf.pb");
    let wrong_key = "11".repeat(32);
    let wrong_tag = "22".repeat(16);
    let vol = env.p("volume");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--key", &wrong_key, "--tag", &kt.tag], "wrong key"),
        (vec!["--key", &kt.key, "--tag", &wrong_tag], "tag mismatch"),
        (vec!["--tag", &kt.tag], "a key is required"),
        (vec![], "a key is required"),
    ];
    for (kt_args, needle) in &cases {
        for cmd in [
            vec!["cat", "fspf.pb", "/data/hello.txt"],
            vec!["verify", "fspf.pb"],
            vec!["addf", "fspf.pb", "/data", "more", &vol],
            vec!["addr", "fspf.pb", "/e", "-e", "--ephemeral"],
            vec!["encrypt", "fspf.pb"],
            vec!["export", "fspf.pb", "/data", "out"],
        ] {
            let mut args = cmd.clone();
            args.extend(kt_args.iter().copied());
            let o = env.fails(&args);
            assert!(
                stderr(&o).contains(needle),
                "{args:?}: expected {needle:?}: {}",
                stderr(&o)
            );
            assert!(o.stdout.is_empty(), "{args:?} printed {}", stdout(&o));
            assert_eq!(env.read("fspf.pb"), before, "{args:?} changed the fspf");
        }
    }
    assert!(!env.path("volume/new.txt").exists());
    assert!(!env.path("out").join("hello.txt").exists());
    // A malformed key or tag is named too.
    let o = env.fails(["cat", "fspf.pb", "/data/hello.txt", "--key", "abc"]);
    assert!(stderr(&o).contains("--key"), "{}", stderr(&o));
    let o = env.fails([
        "cat",
        "fspf.pb",
        "/data/hello.txt",
        "--key",
        &kt.key,
        "--tag",
        "xyz",
    ]);
    assert!(stderr(&o).contains("--tag"), "{}", stderr(&o));
}

#[test]
fn encrypt_again_rotates_the_key() {
    let env = Env::new();
    let kt = walkthrough(&env);
    let kt2 = env.encrypt(Some(&kt));
    assert_ne!(kt.key, kt2.key);
    assert_ne!(kt.tag, kt2.tag);
    let o = env.fails([
        "cat",
        "fspf.pb",
        "/data/hello.txt",
        "--key",
        &kt.key,
        "--tag",
        &kt2.tag,
    ]);
    assert!(stderr(&o).contains("wrong key"), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    let out = env.ok([
        "cat",
        "fspf.pb",
        "/data/hello.txt",
        "--key",
        &kt2.key,
        "--tag",
        &kt2.tag,
    ]);
    assert_eq!(out, "Hello World\n");
}

#[test]
fn show_json_parses_and_describes_regions_and_files() {
    let env = Env::new();
    let kt = walkthrough(&env);
    let j: serde_json::Value =
        serde_json::from_str(&env.ok(["show", "fspf.pb", &kt.key, "--json"])).expect("json");
    assert_eq!(j["tag"], kt.tag);
    assert_eq!(j["encrypted"], true);
    let regions = j["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 2);
    let data = regions
        .iter()
        .find(|r| r["embed_point"] == "/data")
        .unwrap();
    assert_eq!(data["protection"], "encrypted");
    assert_eq!(data["kind"], "kernel");
    assert_eq!(data["key_length"], 32);
    assert_eq!(data["files"], 2);
    let files = j["files"].as_array().unwrap();
    let hello = files
        .iter()
        .find(|f| f["path"] == "/data/hello.txt")
        .unwrap();
    assert_eq!(hello["size"], 12);
    assert_eq!(hello["kind"], "file");
    // show --tag --json
    let t: serde_json::Value =
        serde_json::from_str(&env.ok(["show", "--tag", "fspf.pb", "--json"])).unwrap();
    assert_eq!(t["tag"], kt.tag);
    // verify --json
    let v: serde_json::Value = serde_json::from_str(&env.ok([
        "verify", "fspf.pb", "--key", &kt.key, "--tag", &kt.tag, "--json",
    ]))
    .unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["files"], 2);
}

/// Build a tree with everything `export` must restore.
fn rich_tree(root: &Path) {
    use std::os::unix::fs::symlink;
    let w = |rel: &str, data: &[u8], mode: u32| {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    };
    w("empty", b"", 0o644);
    w("one_chunk", &pattern(CHUNK, 1), 0o600);
    w("chunk_plus_one", &pattern(CHUNK + 1, 2), 0o640);
    w("run.sh", b"#!/bin/sh\necho hi\n", 0o755);
    w("sub/deeper/file.txt", b"deep", 0o644);
    w("big", &pattern(5 * CHUNK + 17, 3), 0o644);
    fs::create_dir_all(root.join("emptydir")).unwrap();
    fs::create_dir_all(root.join("private")).unwrap();
    fs::set_permissions(root.join("private"), fs::Permissions::from_mode(0o750)).unwrap();
    w("readonly/inside.txt", b"inside", 0o444);
    fs::set_permissions(root.join("readonly"), fs::Permissions::from_mode(0o555)).unwrap();
    symlink("sub/deeper/file.txt", root.join("link")).unwrap();
    symlink("/nonexistent/target", root.join("dangling")).unwrap();
    let bad_name = std::ffi::OsStr::from_bytes(b"caf\xe9-\xff.bin");
    fs::write(root.join(bad_name), b"non-utf8 name").unwrap();
    let bad_target = std::ffi::OsStr::from_bytes(b"target-\xfe");
    symlink(bad_target, root.join("link-non-utf8")).unwrap();
}

/// Short fingerprint of file content (length + FNV-1a) to keep failure messages readable.
fn fingerprint(d: &[u8]) -> String {
    let h = d.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{} bytes fnv {h:016x}", d.len())
}

/// Give every directory below `root` owner rwx again, so the temp dir can be removed.
fn make_writable(root: &Path) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let _ = fs::set_permissions(&d, fs::Permissions::from_mode(0o755));
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
}

/// Every entry below `root`: relative path (lossy), type, mode, content fingerprint or target.
fn snapshot(root: &Path) -> Vec<(String, String, u32, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = format!("{:?}", p.strip_prefix(root).unwrap().as_os_str());
            if md.file_type().is_symlink() {
                let t = fs::read_link(&p).unwrap();
                out.push((rel, "link".into(), 0, format!("{:?}", t.as_os_str())));
            } else if md.is_dir() {
                out.push((rel, "dir".into(), md.mode() & 0o7777, String::new()));
                stack.push(p);
            } else {
                out.push((
                    rel,
                    "file".into(),
                    md.mode() & 0o7777,
                    fingerprint(&fs::read(&p).unwrap()),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn export_restores_an_identical_tree_from_an_encrypted_region() {
    let env = Env::new();
    rich_tree(&env.mkdir("src"));
    env.mkdir("vol");
    fresh_with_root(&env);
    env.ok([
        "addr",
        "fspf.pb",
        "/data",
        "-e",
        "--kernel",
        &env.p("vol"),
        "-c",
        "4096",
    ]);
    env.ok(["addf", "fspf.pb", "/data", "src", &env.p("vol")]);
    let kt = env.encrypt(None);
    let out = env.ok([
        "export", "fspf.pb", "/data", "out", "--key", &kt.key, "--tag", &kt.tag,
    ]);
    assert!(out.contains("Exported"), "{out}");
    assert_eq!(snapshot(&env.path("out")), snapshot(&env.path("src")));
    make_writable(env.root());
    // The ciphertext tree has the same shape but other bytes.
    assert_eq!(
        fs::metadata(env.path("vol/chunk_plus_one")).unwrap().len(),
        (24 + CHUNK + 1 + 2 * 16) as u64
    );
    assert_eq!(
        fs::metadata(env.path("vol/one_chunk")).unwrap().len(),
        (24 + CHUNK + 16) as u64
    );
    assert_eq!(fs::metadata(env.path("vol/empty")).unwrap().len(), 40);
}

#[test]
fn export_restores_an_identical_tree_from_an_authenticated_region() {
    let env = Env::new();
    rich_tree(&env.mkdir("auth"));
    fresh_with_root(&env);
    env.ok([
        "addr",
        "fspf.pb",
        "/auth",
        "-a",
        "--kernel",
        &env.p("auth"),
        "-c",
        "4096",
    ]);
    env.ok(["addf", "fspf.pb", "/auth", "auth"]);
    let kt = env.encrypt(None);
    env.ok(["verify", "fspf.pb", "--key", &kt.key, "--tag", &kt.tag]);
    env.ok([
        "export", "fspf.pb", "/auth", "out", "--key", &kt.key, "--tag", &kt.tag,
    ]);
    assert_eq!(snapshot(&env.path("out")), snapshot(&env.path("auth")));
    make_writable(env.root());
}

#[test]
fn authenticated_addf_with_output_dir_writes_a_verifiable_plaintext_copy() {
    let env = Env::new();
    env.write("src/a.txt", "alpha\n");
    env.write("src/d/b.bin", pattern(3 * CHUNK, 9));
    env.mkdir("mnt");
    fresh_with_root(&env);
    env.ok([
        "addr",
        "fspf.pb",
        "/mnt/auth",
        "-a",
        "--kernel",
        &env.p("mnt"),
        "-c",
        "4096",
    ]);
    env.ok(["addf", "fspf.pb", "/mnt/auth", "src", &env.p("mnt")]);
    assert_eq!(env.read("mnt/a.txt"), b"alpha\n");
    assert_eq!(env.read("mnt/d/b.bin"), pattern(3 * CHUNK, 9));
    let kt = env.encrypt(None);
    env.ok(["verify", "fspf.pb", "--key", &kt.key, "--tag", &kt.tag]);
    let out = env.ok([
        "cat",
        "fspf.pb",
        "/mnt/auth/a.txt",
        "--key",
        &kt.key,
        "--tag",
        &kt.tag,
    ]);
    assert_eq!(out, "alpha\n");
    // Nothing but the copy was written next to the protected files (trees live beside the fspf).
    let mut names: Vec<_> = fs::read_dir(env.path("mnt"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["a.txt", "d"]);
}

#[test]
fn authenticated_addf_without_output_dir_records_in_place_and_writes_nothing_there() {
    let env = Env::new();
    env.write("root/etc/conf", "x = 1\n");
    env.write("root/lib/libx.so", pattern(2 * CHUNK + 5, 4));
    fresh_with_root(&env);
    env.ok([
        "addr",
        "fspf.pb",
        "/r",
        "-a",
        "--kernel",
        &env.p("root"),
        "-c",
        "4096",
    ]);
    let before = snapshot(&env.path("root"));
    env.ok(["addf", "fspf.pb", "/r", "root"]);
    assert_eq!(
        snapshot(&env.path("root")),
        before,
        "in-place addf wrote into the region"
    );
    let kt = env.encrypt(None);
    env.ok(["verify", "fspf.pb", "--key", &kt.key, "--tag", &kt.tag]);
    let out = env.ok([
        "cat",
        "fspf.pb",
        "/r/etc/conf",
        "--key",
        &kt.key,
        "--tag",
        &kt.tag,
    ]);
    assert_eq!(out, "x = 1\n");
}

#[test]
fn create_volume_encrypted_then_addf_and_verify() {
    let env = Env::new();
    let out = env.ok(["create-volume", "-e", "vol"]);
    let dir = fs::canonicalize(env.path("vol")).unwrap();
    let words: Vec<&str> = out.split_whitespace().collect();
    let key = words.last().unwrap().to_string();
    let tag = words[words.len() - 3].to_string();
    assert!(re(&format!("^{HEX64}$")).is_match(&key), "{out}");
    assert!(re(&format!("^{HEX32}$")).is_match(&tag), "{out}");
    let f = dir.join("volume.fspf");
    assert!(f.exists());
    let d = dir.to_str().unwrap();
    let f = f.to_str().unwrap();
    env.write("plain/x.txt", "volume data");
    let out = env.ok(["addf", f, d, "plain", d, "--key", &key, "--tag", &tag]);
    let tag = last_word(&out);
    env.ok(["verify", f, "--key", &key, "--tag", &tag]);
    let x = format!("{d}/x.txt");
    assert_eq!(
        env.ok(["cat", f, &x, "--key", &key, "--tag", &tag]),
        "volume data"
    );
    assert_ne!(env.read("vol/x.txt"), b"volume data");
    // An encrypted volume must start empty.
    env.write("full/f", "f");
    env.fails(["create-volume", "-e", "full"]);
}

#[test]
fn create_volume_authenticated_records_existing_files_with_envar_output() {
    let env = Env::new();
    env.write("avol/a.txt", "A");
    env.write("avol/sub/b.bin", pattern(70_000, 5));
    let out = env.ok(["create-volume", "--authenticated", "avol", "--envar-output"]);
    let mut key = None;
    let mut tag = None;
    for l in out.lines() {
        if let Some(k) = l.strip_prefix("export VOLUME_KEY=") {
            key = Some(k.to_string());
        }
        if let Some(t) = l.strip_prefix("export VOLUME_TAG=") {
            tag = Some(t.to_string());
        }
    }
    let (key, tag) = (key.expect(&out), tag.expect(&out));
    assert!(re(&format!("^{HEX64}$")).is_match(&key));
    assert!(re(&format!("^{HEX32}$")).is_match(&tag));
    let dir = fs::canonicalize(env.path("avol")).unwrap();
    let f = dir.join("volume.fspf");
    let f = f.to_str().unwrap();
    env.ok(["verify", f, "--key", &key, "--tag", &tag]);
    let a = format!("{}/a.txt", dir.display());
    assert_eq!(env.ok(["cat", f, &a, "--key", &key, "--tag", &tag]), "A");
    // No staging debris next to the volume.
    let debris: Vec<_> = fs::read_dir(env.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("fspf-stage"))
        .collect();
    assert!(debris.is_empty(), "{debris:?}");
    // Tampering is caught.
    fs::write(dir.join("a.txt"), "B").unwrap();
    env.fails(["verify", f, "--key", &key, "--tag", &tag]);
}

#[test]
fn fspf_file_is_mode_0600() {
    let env = Env::new();
    let kt = walkthrough(&env);
    let mode = fs::metadata(env.path("fspf.pb")).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600, "fspf.pb mode {mode:o}");
    env.write("more/y", "y");
    env.ok([
        "addf",
        "fspf.pb",
        "/data",
        "more",
        &env.p("volume"),
        "--key",
        &kt.key,
        "--tag",
        &kt.tag,
    ]);
    let mode = fs::metadata(env.path("fspf.pb")).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600, "after addf: {mode:o}");
}

/// Copy a directory tree, keeping symlinks as symlinks.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let ft = e.file_type().unwrap();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if ft.is_dir() {
            copy_tree(&src, &dst);
        } else {
            fs::copy(&src, &dst).unwrap();
        }
    }
}

/// The frozen v1 fixture through the CLI: copied to the kernel paths it records (see
/// testdata/fspf/v1/README), under a lock so concurrent runs do not trip over each other.
#[test]
fn v1_fixture_is_readable_by_the_cli_at_its_recorded_place() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/fspf/v1");
    let base = Path::new("/tmp/fspf-fixture-v1");
    let _lock = fspf_core::Volume::lock(base).expect("fixture lock");
    let _ = fs::remove_dir_all(base);
    let run = |copy_from: &Path| {
        let _ = fs::remove_dir_all(base);
        for part in ["fspf.pb", "fspf.pb.trees", "enc", "auth"] {
            let (s, d) = (copy_from.join(part), base.join(part));
            if s.is_dir() {
                copy_tree(&s, &d);
            } else {
                fs::create_dir_all(base).unwrap();
                fs::copy(&s, &d).unwrap();
            }
        }
    };
    let env = Env::new();
    let keytag = fixture.join("keytag");
    let kt = parse_encrypt_line(fs::read_to_string(&keytag).unwrap().trim());
    let f = base.join("fspf.pb");
    let f = f.to_str().unwrap();
    let kf = keytag.to_str().unwrap();
    run(&fixture);
    let out = env.ok([
        "cat",
        f,
        "/enc/hello.txt",
        "--key-file",
        kf,
        "--tag",
        &kt.tag,
    ]);
    assert_eq!(out, "Hello World\n");
    let out = env.ok([
        "cat",
        f,
        "/auth/readme.txt",
        "--key",
        &kt.key,
        "--tag",
        &kt.tag,
    ]);
    assert_eq!(out, "authenticated readme\n");
    let out = env.ok(["verify", f, "--key-file", kf, "--tag", &kt.tag]);
    assert_line(
        &out,
        &format!("OK: 6 files verified against tag {}", kt.tag),
    );
    for (defect, embed) in [
        ("fspf_rolled_back", "/enc/hello.txt"),
        ("chunk_flipped", "/enc/sub/data.bin"),
        ("files_swapped", "/enc/hello.txt"),
        ("auth_tree_flipped", "/auth/lib/libx.so"),
    ] {
        run(&fixture.join("broken").join(defect));
        let o = env.fails(["verify", f, "--key-file", kf, "--tag", &kt.tag]);
        assert!(!stdout(&o).starts_with("OK"), "{defect}");
        let o = env.fails(["cat", f, embed, "--key-file", kf, "--tag", &kt.tag]);
        assert!(o.stdout.is_empty(), "{defect}");
    }
    let _ = fs::remove_dir_all(base);
}

#[test]
fn chunk_length_out_of_range_is_refused() {
    let env = Env::new();
    fresh_with_root(&env);
    let before = env.read("fspf.pb");
    for c in ["0", "100", "511", "16777217"] {
        let o = env.fails(["addr", "fspf.pb", "/x", "-e", "--ephemeral", "-c", c]);
        assert!(
            stderr(&o).contains("chunk length"),
            "-c {c}: {}",
            stderr(&o)
        );
    }
    assert_eq!(env.read("fspf.pb"), before);
    env.ok(["addr", "fspf.pb", "/x", "-e", "--ephemeral", "-c", "512"]);
}

#[test]
fn concurrent_updaters_lose_no_update() {
    let env = Env::new();
    fresh_with_root(&env);
    let children: Vec<_> = (0..8)
        .map(|i| {
            std::process::Command::new(FSPF)
                .args(["addr", "fspf.pb", &format!("/r{i}"), "-a", "--ephemeral"])
                .current_dir(env.root())
                .env_remove("SCONE_FSPF_KEY")
                .env_remove("SCONE_FSPF_TAG")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let j: serde_json::Value =
        serde_json::from_str(&env.ok(["show", "fspf.pb", "--json"])).unwrap();
    assert_eq!(j["regions"].as_array().unwrap().len(), 9, "{j}");
    assert_eq!(j["generation"], 9, "one generation per update");
    // No temp files left behind.
    let leftovers: Vec<_> = fs::read_dir(env.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// The reference's "Extended Example": ephemeral encrypted root, an authenticated and an
/// encrypted kernel region, key and tag taken with awk from the encrypt line.
#[test]
fn reference_extended_example_with_ephemeral_root() {
    let env = Env::new();
    env.write("original/hello", "hello world\n");
    env.write("mnt/authenticated/hello", "hello world\n");
    env.mkdir("mnt/encrypted");
    let (auth, enc) = (env.p("mnt/authenticated"), env.p("mnt/encrypted"));
    env.ok(["create", "fspf.pb"]);
    env.ok(["addr", "fspf.pb", "/", "-e", "--ephemeral"]);
    env.ok([
        "addr",
        "fspf.pb",
        "/mnt/authenticated",
        "-a",
        "--kernel",
        &auth,
    ]);
    env.ok(["addr", "fspf.pb", "/mnt/encrypted", "-e", "--kernel", &enc]);
    env.ok(["addf", "fspf.pb", "/mnt/authenticated", "./original"]);
    env.ok([
        "addf",
        "fspf.pb",
        "/mnt/encrypted",
        "./original",
        "./mnt/encrypted",
    ]);
    let kt = env.encrypt(None);
    let out = env.ok(["verify", "fspf.pb", "--key", &kt.key, "--tag", &kt.tag]);
    assert_line(
        &out,
        &format!("OK: 2 files verified against tag {}", kt.tag),
    );
    for p in ["/mnt/authenticated/hello", "/mnt/encrypted/hello"] {
        let out = env.ok(["cat", "fspf.pb", p, "--key", &kt.key, "--tag", &kt.tag]);
        assert_eq!(out, "hello world\n");
    }
    // Files in the ephemeral root have no kernel copy to read.
    let o = env.fails([
        "cat", "fspf.pb", "/etc/x", "--key", &kt.key, "--tag", &kt.tag,
    ]);
    assert!(stderr(&o).contains("ephemeral"), "{}", stderr(&o));
    // addf into an ephemeral region is refused.
    let o = env.fails([
        "addf", "fspf.pb", "/", "original", "--key", &kt.key, "--tag", &kt.tag,
    ]);
    assert!(stderr(&o).contains("ephemeral"), "{}", stderr(&o));
}

#[test]
fn not_protected_region_files_are_read_as_they_are() {
    let env = Env::new();
    let kt = walkthrough(&env);
    // `/` is kernel `/`, not-protected: cat reads the kernel file unchanged, verify ignores it.
    env.write("plain.txt", "as is\n");
    let p = env.p("plain.txt");
    let out = env.ok(["cat", "fspf.pb", &p, "--key", &kt.key, "--tag", &kt.tag]);
    assert_eq!(out, "as is\n");
    env.ok(["verify", "fspf.pb", "--key", &kt.key, "--tag", &kt.tag]);
}

#[test]
fn a_bad_key_file_is_named_in_the_error() {
    let env = Env::new();
    let kt = walkthrough(&env);
    env.write("empty-key", "");
    env.write("bad-key", "key: not-hex\n");
    for f in ["empty-key", "bad-key", "missing-key"] {
        let o = env.fails([
            "cat",
            "fspf.pb",
            "/data/hello.txt",
            "--key-file",
            f,
            "--tag",
            &kt.tag,
        ]);
        assert!(stderr(&o).contains(f), "{f}: {}", stderr(&o));
        assert!(o.stdout.is_empty());
    }
    // A key file holding just the hex key works too.
    env.write("hex-key", format!("{}\n", kt.key));
    let out = env.ok([
        "cat",
        "fspf.pb",
        "/data/hello.txt",
        "--key-file",
        "hex-key",
        "--tag",
        &kt.tag,
    ]);
    assert_eq!(out, "Hello World\n");
}

/// `cargo install` (or copying the binary alone) used to give an `fspf run` that failed with
/// "libfspf_preload.so not found": the library now travels inside the binary and is written to
/// a private cache directory, checked against the embedded bytes on every use.
#[test]
fn fspf_binary_copied_alone_could_not_run_programs() {
    let env = Env::new();
    env.two_regions("/data", "--encrypted", "vol");
    env.mkdir("vol");
    let kt = env.encrypt(None);
    env.write("key", &kt.key);
    let bin = env.mkdir("bin").join("fspf");
    fs::copy(FSPF, &bin).expect("copy the fspf binary");
    let home = env.mkdir("home");
    let run = |script: &str| {
        std::process::Command::new(&bin)
            .current_dir(env.root())
            .env("HOME", &home)
            .env_remove("XDG_CACHE_HOME")
            .env_remove("FSPF_PRELOAD")
            .env_remove("LD_PRELOAD")
            .args([
                "run",
                "--fspf",
                "fspf.pb",
                "--key-file",
                "key",
                "--tag-file",
                "tf",
            ])
            .args(["--mutable", "--", "sh", "-c", script])
            .output()
            .expect("spawn the copied fspf")
    };
    fs::write(env.path("tf"), &kt.tag).unwrap();
    let o = run("echo sealed > /data/f && cat /data/f");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "sealed\n");
    assert!(!fs::read(env.path("vol/f")).unwrap().starts_with(b"sealed"));
    let cache = home.join(".cache/fspf");
    assert_eq!(fs::metadata(&cache).unwrap().mode() & 0o777, 0o700);
    let libs: Vec<_> = fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(libs.len(), 1, "{libs:?}");
    // A cached copy that differs from the embedded library is replaced, never loaded.
    let lib = &libs[0];
    fs::set_permissions(lib, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(lib, b"not a library").unwrap();
    let o = run("cat /data/f");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "sealed\n");
    assert_ne!(fs::read(lib).unwrap(), b"not a library");
    // A cache directory others can write is refused with a clear error.
    fs::set_permissions(&cache, fs::Permissions::from_mode(0o777)).unwrap();
    let o = run("true");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("writable only by it"), "{}", stderr(&o));
}

/// `addf` recorded every hard link of the source as a file of its own (its own id and
/// ciphertext): now, with OUTPUT_DIR, the other names of a file are hard links of it
/// (FORMAT.md §2, kind 5; nothing written for them), an `addf` of the same tree again keeps
/// them, and an authenticated import in place still records each name as a file.
#[test]
fn addf_records_the_sources_hard_links_as_hard_links() {
    let env = Env::new();
    env.write("src/a", pattern(10_000, 1));
    env.write("src/solo", b"alone\n");
    fs::hard_link(env.path("src/a"), env.path("src/b")).unwrap();
    env.mkdir("src/sub");
    fs::hard_link(env.path("src/a"), env.path("src/sub/c")).unwrap();
    env.mkdir("vol");
    env.two_regions("/data", "-e", "vol");
    for _ in 0..2 {
        env.ok(["addf", "fspf.pb", "/data", "src", "vol"]);
    }
    assert!(env.path("vol/a").exists());
    assert!(!env.path("vol/b").exists() && !env.path("vol/sub/c").exists());
    let kt = env.encrypt(None);
    let show = env.ok(["show", "fspf.pb", "--key", &kt.key]);
    assert!(
        show.contains("/data/b") && show.contains("link => /data/a"),
        "{show}"
    );
    for name in ["/data/a", "/data/b", "/data/sub/c"] {
        let o = env.run(["cat", "fspf.pb", name, "--key", &kt.key, "--tag", &kt.tag]);
        assert_eq!(o.stdout, pattern(10_000, 1), "{name}");
    }
    env.ok(["verify", "fspf.pb", "--key", &kt.key, "--tag", &kt.tag]);
    // `export` makes them hard links again.
    env.ok([
        "export", "fspf.pb", "/data", "out", "--key", &kt.key, "--tag", &kt.tag,
    ]);
    let ino = |rel: &str| fs::metadata(env.path(rel)).unwrap().ino();
    assert_eq!(ino("out/a"), ino("out/b"));
    assert_eq!(ino("out/a"), ino("out/sub/c"));
    assert_eq!(fs::metadata(env.path("out/a")).unwrap().nlink(), 3);
    assert_eq!(env.read("out/sub/c"), pattern(10_000, 1));
    // Authenticated in place: the names stay files on disk, so each is a file in the fspf.
    let env2 = Env::new();
    env2.write("src/a", b"same\n");
    fs::hard_link(env2.path("src/a"), env2.path("src/b")).unwrap();
    env2.ok(["create", "fspf.pb"]);
    env2.ok(["addr", "fspf.pb", "/", "--kernel", "/", "-n"]);
    let src = env2.p("src");
    env2.ok(["addr", "fspf.pb", "/auth", "-a", "--kernel", &src]);
    env2.ok(["addf", "fspf.pb", "/auth", "src"]);
    let show = env2.ok(["show", "fspf.pb"]);
    assert!(!show.contains("link =>"), "{show}");
    env2.ok(["verify", "fspf.pb"]);
}

//! One test per bug found, named after the bug.
use crate::harness::*;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::process::Command;

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
    env.two_regions("/a", "-a", "a");
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

/// Multiplication in GF(2^128) with GCM's bit order (NIST SP 800-38D, algorithm 1).
fn gf_mul(x: u128, y: u128) -> u128 {
    let r = 0xe1u128 << 120;
    let (mut z, mut v) = (0u128, y);
    for i in 0..128 {
        if (x >> (127 - i)) & 1 == 1 {
            z ^= v;
        }
        v = if v & 1 == 1 { (v >> 1) ^ r } else { v >> 1 };
    }
    z
}

fn gf_inv(a: u128) -> u128 {
    // a^(2^128 - 2); the multiplicative identity is x^0 = the top bit.
    let (mut result, mut base, mut e) = (1u128 << 127, a, u128::MAX - 1);
    while e > 0 {
        if e & 1 == 1 {
            result = gf_mul(result, base);
        }
        base = gf_mul(base, base);
        e >>= 1;
    }
    result
}

/// An unencrypted fspf (sealed under the public key) with attacker-chosen metadata whose GCM tag
/// equals `target`: with a known key, GHASH is linear, so one free ciphertext block fixes the tag.
fn forge_unencrypted_fspf(
    meta: &fspf_core::format::metadata::MetadataPb,
    target: [u8; 16],
) -> Vec<u8> {
    use fspf_core::format::header::{Header, PUBLIC_KEY};
    use prost::Message;
    let mut body = meta.encode_to_vec();
    // An unknown length-delimited field (number 15) whose last 16 bytes are one aligned block.
    let pad = (16 - (body.len() + 2) % 16) % 16;
    body.push((15 << 3) | 2);
    body.push((pad + 16) as u8);
    body.extend(std::iter::repeat_n(0u8, pad + 16));
    assert_eq!(body.len() % 16, 0);
    let nonce = [7u8; 12];
    let hdr = Header {
        version: 1,
        sealed: false,
        nonce,
    }
    .encode();
    let aead = fspf_core::crypto::AeadKey::new(&PUBLIC_KEY).unwrap();
    let t0 = aead.seal(nonce, &hdr, &mut body).unwrap();
    // H = AES_K(0^128); the last ciphertext block is multiplied by H^2 (the length block follows).
    let ecb = aws_lc_rs::cipher::EncryptingKey::ecb(
        aws_lc_rs::cipher::UnboundCipherKey::new(&aws_lc_rs::cipher::AES_256, &PUBLIC_KEY).unwrap(),
    )
    .unwrap();
    let mut h = [0u8; 16];
    ecb.encrypt(&mut h).unwrap();
    let h = u128::from_be_bytes(h);
    let want = u128::from_be_bytes(t0) ^ u128::from_be_bytes(target);
    let delta = gf_mul(want, gf_inv(gf_mul(h, h)));
    let n = body.len();
    let last = u128::from_be_bytes(body[n - 16..].try_into().unwrap()) ^ delta;
    body[n - 16..].copy_from_slice(&last.to_be_bytes());
    let mut out = hdr.to_vec();
    out.extend_from_slice(&body);
    out.extend_from_slice(&target);
    out
}

/// Downgrade: an fspf whose header says "not encrypted" was opened with the public key even when
/// the caller gave a key, so an attacker could replace an encrypted fspf by a forged unencrypted
/// one (any metadata, region keys of the attacker's choosing) with the victim's tag, and `cat`
/// printed the attacker's bytes with exit 0. A key now requires an encrypted fspf.
#[test]
fn unencrypted_fspf_was_accepted_when_a_key_was_given() {
    use fspf_core::format::metadata::{FileEntryPb, MetadataPb, RegionPb};
    let env = Env::new();
    env.write("orig/hello.txt", "Hello World\n");
    env.mkdir("vol");
    env.ok(["create", "fspf.pb"]);
    env.ok(["addr", "fspf.pb", "/", "--kernel", "/", "-n"]);
    env.ok(["addr", "fspf.pb", "/data", "-e", "--kernel", &env.p("vol")]);
    env.ok(["addf", "fspf.pb", "/data", "orig", &env.p("vol")]);
    let kt = env.encrypt(None);
    // The attacker: own region key, own file id, own ciphertext, forged fspf with the victim's tag.
    let rk = fspf_core::RegionKey::from_bytes(vec![0x42; 32]).unwrap();
    let id = fspf_core::FileId([0x24; 16]);
    let evil = b"attacker-controlled\n";
    let mut ct = Vec::new();
    let k = fspf_core::crypto::file_chunk_key(&rk, &id).unwrap();
    fspf_core::codec::seal_encrypted(
        &k,
        &id,
        65536,
        evil.len() as u64,
        &mut &evil[..],
        &mut ct,
        "x",
    )
    .unwrap();
    fs::write(env.path("vol/hello.txt"), ct).unwrap();
    let meta = MetadataPb {
        format_version: 1,
        generation: 99,
        regions: vec![
            RegionPb {
                embed_point: b"/".to_vec(),
                kind: 1,
                kernel_path: b"/".to_vec(),
                protection: 1,
                key: vec![],
                chunk_len: 65536,
            },
            RegionPb {
                embed_point: b"/data".to_vec(),
                kind: 1,
                kernel_path: env.p("vol").into_bytes(),
                protection: 3,
                key: rk.as_bytes().to_vec(),
                chunk_len: 65536,
            },
        ],
        files: vec![FileEntryPb {
            path: b"/data/hello.txt".to_vec(),
            kind: 1,
            file_id: id.0.to_vec(),
            size: evil.len() as u64,
            root: vec![],
            mode: 0o644,
            target: vec![],
            mtime_ns: 0,
            ..Default::default()
        }],
    };
    let tag = fspf_core::Tag::from_hex(&kt.tag).unwrap();
    fs::write(env.fspf_path(), forge_unencrypted_fspf(&meta, tag.0)).unwrap();
    assert_eq!(
        env.ok(["show", "--tag", "fspf.pb"]).trim(),
        kt.tag,
        "forged tag"
    );
    for kt_args in [
        vec!["--key", kt.key.as_str(), "--tag", kt.tag.as_str()],
        vec!["--key", kt.key.as_str()],
    ] {
        let mut args = vec!["cat", "fspf.pb", "/data/hello.txt"];
        args.extend(kt_args.iter().copied());
        let o = env.fails(&args);
        assert!(o.stdout.is_empty(), "{kt_args:?}: printed {:?}", stdout(&o));
        assert!(stderr(&o).contains("not encrypted"), "{}", stderr(&o));
        let mut args = vec!["verify", "fspf.pb"];
        args.extend(kt_args.iter().copied());
        env.fails(&args);
    }
    // Residual risk, by design: without a key an unencrypted fspf is all there is to trust, and
    // its tag is forgeable. The CLI says so instead of staying silent.
    let o = env.run(["cat", "fspf.pb", "/data/hello.txt", "--tag", &kt.tag]);
    assert!(
        stderr(&o).contains("not encrypted: its tag guards against accidents, not attackers"),
        "{}",
        stderr(&o)
    );
}

/// With a kernel path that is a symlink to the real directory, `verify` reported the region root
/// itself and the fspf's own files (fspf.pb, its lock, its trees) as unlisted files.
#[test]
fn verify_reported_fspf_files_when_the_kernel_path_is_a_symlink() {
    let env = Env::new();
    env.mkdir("real");
    std::os::unix::fs::symlink("real", env.path("link")).unwrap();
    env.write("src/x", "x");
    env.write("src/big", pattern(3 * 512, 1));
    let f = env.p("link/fspf.pb");
    env.ok(["create", &f]);
    env.ok(["addr", &f, "/", "--kernel", "/", "-n"]);
    env.ok([
        "addr",
        &f,
        "/v",
        "-a",
        "--kernel",
        &env.p("link"),
        "-c",
        "512",
    ]);
    env.ok(["addf", &f, "/v", "src", &env.p("link")]);
    let o = env.run(["verify", &f]);
    assert!(o.status.success(), "{}", stdout(&o));
    env.write("real/planted", "p");
    let o = env.fails(["verify", &f]);
    assert!(
        stdout(&o).contains("/v/planted: unlisted"),
        "{}",
        stdout(&o)
    );
    assert!(!stdout(&o).contains("FAILED /v/fspf.pb"), "{}", stdout(&o));
    assert!(!stdout(&o).contains("FAILED /v:"), "{}", stdout(&o));
}

/// `fspf export FSPF /region/file OUTDIR` tried to write the file over OUTDIR itself ("Is a
/// directory"); a single exported file now lands in OUTDIR under its own name. Export errors also
/// named the path twice ("/d/a: /d/a: chunk 0 failed ...").
#[test]
fn export_of_a_single_file_wrote_onto_the_output_directory() {
    let env = Env::new();
    env.write("src/a", "a\n");
    env.write("src/b", "b\n");
    env.mkdir("vol");
    env.ok(["create", "fspf.pb"]);
    env.ok(["addr", "fspf.pb", "/", "--kernel", "/", "-n"]);
    env.ok(["addr", "fspf.pb", "/d", "-e", "--kernel", &env.p("vol")]);
    env.ok(["addf", "fspf.pb", "/d", "src", &env.p("vol")]);
    env.ok(["export", "fspf.pb", "/d/b", "one"]);
    assert_eq!(env.read("one/b"), b"b\n");
    // A tampered file is not exported; the others are; the error names the path once.
    flip(&env.path("vol/a"), 30, 1);
    let o = env.fails(["export", "fspf.pb", "/d", "out"]);
    assert!(!env.path("out/a").exists());
    assert_eq!(env.read("out/b"), b"b\n");
    let e = stderr(&o);
    assert_eq!(e.matches("/d/a").count(), 1, "{e}");
    assert!(e.contains("chunk 0 failed authentication"), "{e}");
    let leftovers: Vec<_> = fs::read_dir(env.path("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["b"], "temp files left: {leftovers:?}");
}

/// Re-running `addf` with OUTPUT_DIR after a symlink's target changed recorded the new target but
/// left the old link in OUTPUT_DIR (it was only created when absent), so `verify` failed.
#[test]
fn re_addf_left_a_changed_symlink_stale_in_the_output() {
    let env = Env::new();
    env.write("src/a", "a");
    env.write("src/b", "b");
    std::os::unix::fs::symlink("a", env.path("src/l")).unwrap();
    env.write("src/was-file", "f");
    env.mkdir("out");
    env.ok(["create", "fspf.pb"]);
    env.ok(["addr", "fspf.pb", "/", "--kernel", "/", "-n"]);
    env.ok(["addr", "fspf.pb", "/d", "-e", "--kernel", &env.p("out")]);
    env.ok(["addf", "fspf.pb", "/d", "src", &env.p("out")]);
    fs::remove_file(env.path("src/l")).unwrap();
    std::os::unix::fs::symlink("b", env.path("src/l")).unwrap();
    fs::remove_file(env.path("src/was-file")).unwrap();
    std::os::unix::fs::symlink("a", env.path("src/was-file")).unwrap();
    env.ok(["addf", "fspf.pb", "/d", "src", &env.p("out")]);
    assert_eq!(
        fs::read_link(env.path("out/l")).unwrap().to_str(),
        Some("b")
    );
    assert_eq!(
        fs::read_link(env.path("out/was-file")).unwrap().to_str(),
        Some("a")
    );
    let o = env.run(["verify", "fspf.pb"]);
    assert!(o.status.success(), "{}", stdout(&o));
}

/// `fspf export` restored directories with `mode | 0o700`, so a recorded 0555 directory came back
/// as 0755. The recorded mode is now applied last, deepest directory first.
#[test]
fn export_widened_read_only_directory_modes() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let env = Env::new();
    env.write("src/ro/f", "f");
    fs::set_permissions(env.path("src/ro"), fs::Permissions::from_mode(0o555)).unwrap();
    env.ok(["create", "fspf.pb"]);
    env.ok(["addr", "fspf.pb", "/", "--kernel", "/", "-n"]);
    env.ok(["addr", "fspf.pb", "/a", "-a", "--kernel", &env.p("src")]);
    env.ok(["addf", "fspf.pb", "/a", "src"]);
    env.ok(["export", "fspf.pb", "/a", "out"]);
    let mode = fs::metadata(env.path("out/ro")).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o555, "{mode:o}");
    assert_eq!(env.read("out/ro/f"), b"f");
    for d in ["src/ro", "out/ro"] {
        fs::set_permissions(env.path(d), fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// `fspf verify` walked into the kernel directory of a nested region (`/` authenticated at
/// `root/`, `/data` encrypted at `root/srv/vol`) and called that region's ciphertext "unlisted
/// file in protected region /".
#[test]
fn verify_reported_a_nested_regions_storage_as_unlisted() {
    let env = Env::new();
    env.write("root/etc/app.conf", "conf");
    env.write("plain/hello.txt", "Hello World\n");
    env.mkdir("root/srv/vol");
    env.ok(["create", "fspf.pb"]);
    env.ok(["addr", "fspf.pb", "/", "-a", "--kernel", &env.p("root")]);
    env.ok([
        "addr",
        "fspf.pb",
        "/data",
        "-e",
        "--kernel",
        &env.p("root/srv/vol"),
    ]);
    // Record only the root region's own files (not its srv/ subtree, which is storage).
    env.write("rootsrc/etc/app.conf", "conf");
    env.ok(["addf", "fspf.pb", "/", "rootsrc"]);
    env.ok(["addf", "fspf.pb", "/data", "plain", &env.p("root/srv/vol")]);
    let out = env.ok(["verify", "fspf.pb"]);
    assert!(out.starts_with("OK:"), "{out}");
    // A file planted in the root region itself is still reported.
    env.write("root/etc/planted", "x");
    let o = env.fails(["verify", "fspf.pb"]);
    let s = stdout(&o);
    assert!(s.contains("/etc/planted: unlisted"), "{s}");
    assert!(!s.contains("hello.txt"), "{s}");
}

/// Changing an encrypted fspf with only its key (no tag) built on whatever fspf was on disk: an
/// attacker's rolled-back fspf would have been extended and then blessed with a fresh tag.
#[test]
fn update_without_tag_could_bless_a_rolled_back_fspf() {
    let env = Env::new();
    env.write("src/a.txt", "A");
    env.write("src2/b.txt", "B");
    env.mkdir("vol");
    env.ok(["create", "fspf.pb"]);
    env.ok(["addr", "fspf.pb", "/", "--kernel", "/", "-n"]);
    env.ok(["addr", "fspf.pb", "/d", "-e", "--kernel", &env.p("vol")]);
    let kt = env.encrypt(None);
    let before = env.read("fspf.pb");
    for args in [
        vec!["addf", "fspf.pb", "/d", "src2", "vol", "--key", &kt.key],
        vec![
            "addr", "fspf.pb", "/e", "-a", "--kernel", "/tmp", "--key", &kt.key,
        ],
        vec!["encrypt", "fspf.pb", "--key", &kt.key],
    ] {
        let o = env.fails(&args);
        assert!(
            stderr(&o).contains("give its current tag"),
            "{}",
            stderr(&o)
        );
        assert_eq!(env.read("fspf.pb"), before, "{args:?} changed the fspf");
    }
    // With the tag, the same change goes through.
    env.ok([
        "addf", "fspf.pb", "/d", "src2", "vol", "--key", &kt.key, "--tag", &kt.tag,
    ]);
}

/// The storage attacker replaced `vol/sub`, a directory of an encrypted kernel region, by a
/// symlink to a victim directory holding a valid copy: reads went through it (`verify` said OK),
/// and commits wrote shadows into the victim directory and renamed them over its files.
#[test]
fn symlinked_region_directory_redirected_writes_outside_the_region() {
    let env = Env::new();
    env.write("src/sub/a", pattern(5000, 1));
    env.write("src/sub/b", "b\n");
    env.write("src/top", "t\n");
    env.mkdir("vol");
    env.two_regions("/data", "-e", "vol");
    env.ok(["addf", "fspf.pb", "/data", "src", &env.p("vol")]);
    let kt = env.encrypt(None);
    let k = ["--key", &kt.key, "--tag", &kt.tag];
    // A valid copy in the victim directory, and the region's directory swapped for a link to it.
    fs::rename(env.path("vol/sub"), env.path("victim")).unwrap();
    std::os::unix::fs::symlink(env.path("victim"), env.path("vol/sub")).unwrap();
    let victim_before: Vec<_> = ["a", "b"]
        .iter()
        .map(|n| env.read(format!("victim/{n}")))
        .collect();

    let mut a = vec!["cat", "fspf.pb", "/data/sub/a"];
    a.extend(k);
    let o = env.fails(&a);
    assert!(o.stdout.is_empty());
    assert!(
        stderr(&o).contains("/data/sub/a: a symbolic link on disk"),
        "{}",
        stderr(&o)
    );

    let mut a = vec!["verify", "fspf.pb"];
    a.extend(k);
    let o = env.fails(&a);
    let out = stdout(&o);
    for p in ["/data/sub:", "/data/sub/a:", "/data/sub/b:"] {
        assert!(
            out.contains(&format!("FAILED {p} a symbolic link")),
            "{p}: {out}"
        );
    }

    let mut a = vec!["export", "fspf.pb", "/data", "out"];
    a.extend(k);
    let o = env.fails(&a);
    assert!(
        stderr(&o).contains("/data/sub: a symbolic link"),
        "{}",
        stderr(&o)
    );

    // A commit that rewrites the files must not write into the victim directory.
    env.write("src/sub/a", "new a\n");
    let mut a = vec!["addf", "fspf.pb", "/data", "src"];
    let vol = env.p("vol");
    a.push(&vol);
    a.extend(k);
    let o = env.fails(&a);
    assert!(stderr(&o).contains("symbolic link"), "{}", stderr(&o));
    let names: Vec<_> = fs::read_dir(env.path("victim"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names.len(),
        2,
        "files added to the victim directory: {names:?}"
    );
    for (n, before) in ["a", "b"].iter().zip(&victim_before) {
        assert_eq!(
            &env.read(format!("victim/{n}")),
            before,
            "victim/{n} changed"
        );
    }
    // The tag did not move (nothing was committed), and the rest still reads.
    let mut a = vec!["cat", "fspf.pb", "/data/top"];
    a.extend(k);
    assert_eq!(env.ok(&a), "t\n");
}

/// A FIFO put in place of a listed file made `fspf cat` and `fspf verify` block forever in
/// `open` (nobody ever writes to it).
#[test]
fn fifo_in_place_of_a_listed_file_hung_cat_and_verify() {
    let env = Env::new();
    env.write("src/a", pattern(3000, 1));
    env.write("src/b", "b");
    env.mkdir("vol");
    env.two_regions("/data", "-e", "vol");
    env.ok(["addf", "fspf.pb", "/data", "src", &env.p("vol")]);
    env.mkfifo("vol/a");
    let o = env.run_bounded(["cat", "fspf.pb", "/data/a"], 30);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    assert!(
        stderr(&o).contains("/data/a: is a FIFO, not a regular file"),
        "{}",
        stderr(&o)
    );
    let o = env.run_bounded(["verify", "fspf.pb"], 30);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("FAILED /data/a: is a FIFO"),
        "{}",
        stdout(&o)
    );
}

/// A FIFO put in place of an outboard (`FSPF.trees/<id>`) made reads of the authenticated file
/// block forever.
#[test]
fn fifo_in_place_of_an_outboard_hung_cat_and_verify() {
    let env = Env::new();
    env.write("auth/big", pattern(3 * CHUNK + 5, 2));
    env.two_regions("/a", "-a", "auth");
    env.ok(["addf", "fspf.pb", "/a", "auth"]);
    let trees: Vec<_> = fs::read_dir(env.path("fspf.pb.trees"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(trees.len(), 1);
    env.mkfifo(&trees[0]);
    for args in [
        ["cat", "fspf.pb", "/a/big"].as_slice(),
        &["verify", "fspf.pb"],
    ] {
        let o = env.run_bounded(args, 30);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let all = format!("{}{}", stdout(&o), stderr(&o));
        assert!(
            all.contains("is a FIFO, not a regular file"),
            "{args:?}: {all}"
        );
    }
}

/// `fspf.pb` replaced by a symlink to `/dev/zero` was read until memory ran out; a FIFO in its
/// place blocked forever. The fspf must be a regular file of at most 1 GiB, checked before reading.
#[test]
fn fspf_as_a_symlink_to_dev_zero_was_read_until_memory_ran_out() {
    let env = Env::new();
    std::os::unix::fs::symlink("/dev/zero", env.path("fspf.pb")).unwrap();
    env.mkfifo("fifo.pb");
    for (f, kind) in [("fspf.pb", "symbolic link"), ("fifo.pb", "FIFO")] {
        for args in [
            vec!["show", "--tag", f],
            vec!["verify", f],
            vec!["cat", f, "/x"],
        ] {
            let o = env.run_bounded(&args, 30);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
            assert!(
                stderr(&o).contains(&format!("{f}: is a {kind}, not a regular file")),
                "{args:?}: {}",
                stderr(&o)
            );
        }
    }
}

/// With `SCONE_FSPF`, `SCONE_FSPF_KEY` and `SCONE_FSPF_TAG` exported for one fspf (as the
/// reference's walkthrough does), commands on another fspf used that key and tag and failed
/// ("tag mismatch"). The variables apply only to the fspf `SCONE_FSPF` names.
#[test]
fn scone_fspf_variables_were_applied_to_another_fspf() {
    let env = Env::new();
    env.write("src/x", "x\n");
    env.two_regions("/d", "-e", "vol");
    env.ok(["addf", "fspf.pb", "/d", "src", "vol"]);
    let kt = env.encrypt(None);
    let a = env.p("fspf.pb");
    let vars = [
        ("SCONE_FSPF", a.as_str()),
        ("SCONE_FSPF_KEY", kt.key.as_str()),
        ("SCONE_FSPF_TAG", kt.tag.as_str()),
    ];
    for args in [
        vec!["create", "b.pb"],
        vec!["addr", "b.pb", "/", "--kernel", "/", "-n"],
        vec!["show", "b.pb"],
        vec!["verify", "b.pb"],
    ] {
        let o = env.run_env(&args, &vars);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
    // They still apply to the fspf SCONE_FSPF names, however it is spelled.
    for f in ["fspf.pb", "./fspf.pb", a.as_str(), "vol/../fspf.pb"] {
        let o = env.run_env(["cat", f, "/d/x"], &vars);
        assert_eq!(stdout(&o), "x\n", "{f}: {}", stderr(&o));
    }
    // Without SCONE_FSPF they apply to any fspf, as before.
    let o = env.run_env(
        ["cat", "fspf.pb", "/d/x"],
        &[("SCONE_FSPF_KEY", &kt.key), ("SCONE_FSPF_TAG", &kt.tag)],
    );
    assert_eq!(stdout(&o), "x\n", "{}", stderr(&o));
}

/// `fspf run --key HEX` kept the key in its world-readable `/proc/PID/cmdline` for the whole
/// run (and `fspf show FSPF KEY`, `--key` elsewhere, briefly). The key is now scrubbed from the
/// process's argument area at start, a warning names the non-leaking forms, and those forms
/// (`--key-file PATH`, `--key-file -`, `--key-fd N`) exist.
#[test]
fn key_on_the_command_line_stayed_visible_in_proc_cmdline() {
    let env = Env::new();
    env.write("src/x", "x\n");
    env.two_regions("/d", "-e", "vol");
    env.ok(["addf", "fspf.pb", "/d", "src", "vol"]);
    let kt = env.encrypt(None);
    // Any file will do as the preload: the test looks at the parent, not at the shielded child.
    // `--mutable`: a mutable run's `fspf run` stays as the parent for the whole run (an
    // immutable one execs the program, whose command line holds no key).
    let fake = env.write("fake.so", "");
    let mut run = Command::new(FSPF)
        .args([
            "run",
            "--mutable",
            "--key",
            &kt.key,
            "--tag",
            &kt.tag,
            "--fspf",
            "fspf.pb",
        ])
        .args(["--", "sleep", "3"])
        .current_dir(env.root())
        .env("FSPF_PRELOAD", &fake)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = run.id();
    // Wait until fspf run has started its child: it is past its own start-up by then.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let has_child = || {
        fs::read_dir("/proc").unwrap().flatten().any(|e| {
            let stat = fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            rest.split_whitespace().nth(1) == Some(&pid.to_string())
        })
    };
    while !has_child() {
        assert!(
            std::time::Instant::now() < deadline,
            "fspf run started no child"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let _ = run.kill();
    let out = run.wait_with_output().unwrap();
    let shown = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(shown.contains("run --mutable --key"), "{shown}");
    assert!(!shown.contains(&kt.key[..16]), "key visible: {shown}");
    assert!(
        stderr(&out)
            .contains("the key is visible to other users in /proc/PID/cmdline; use --key-file"),
        "{}",
        stderr(&out)
    );

    // The forms that never put the key on the command line, without the warning.
    env.write("key", format!("{}\n", kt.key));
    let cat = |extra: &[&str], stdin: Option<&str>| {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "exec \"$0\" cat fspf.pb /d/x --tag {} {}",
                kt.tag,
                extra.join(" ")
            ))
            .arg(FSPF)
            .current_dir(env.root())
            .env_remove("SCONE_FSPF_KEY")
            .env_remove("SCONE_FSPF_TAG")
            .env_remove("SCONE_FSPF");
        if let Some(s) = stdin {
            c.stdin(fs::File::open(env.path(s)).unwrap());
        }
        c.output().unwrap()
    };
    for (extra, stdin) in [
        (vec!["--key-file", "key"], None),
        (vec!["--key-file", "-"], Some("key")),
        (vec!["--key-fd", "3", "3<key"], None),
    ] {
        let o = cat(&extra, stdin);
        assert_eq!(stdout(&o), "x\n", "{extra:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("visible"), "{extra:?}: {}", stderr(&o));
    }
    // A positional KEY (show) and --key elsewhere warn.
    for args in [
        vec!["show", "fspf.pb", kt.key.as_str()],
        vec!["cat", "fspf.pb", "/d/x", "--key", &kt.key, "--tag", &kt.tag],
    ] {
        let o = env.run(&args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("/proc/PID/cmdline"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
}

/// Shadows (`.NAME.fspf-<id>`) and `FSPF.tmp-*` temporaries left by crashed writers were never
/// removed (106 203 of them after 60 kills). `fspf verify` now warns about them (not an integrity
/// failure) and `fspf verify --clean` removes them: committed shadows are rolled forward, and
/// uncommitted ones are kept while a writer of the fspf holds `FSPF.writers.lock`.
#[test]
fn crashed_writers_left_shadows_and_temporaries_forever() {
    let env = Env::new();
    env.write("src/a", "a\n");
    env.write("src/sub/b", pattern(3 * CHUNK, 3));
    env.write("auth/big", pattern(3 * CHUNK + 5, 4));
    env.mkdir("vol");
    env.ok(["create", "fspf.pb"]);
    env.ok(["addr", "fspf.pb", "/", "--kernel", "/", "-n"]);
    env.ok([
        "addr",
        "fspf.pb",
        "/d",
        "-e",
        "--kernel",
        &env.p("vol"),
        "-c",
        "4096",
    ]);
    env.ok([
        "addr",
        "fspf.pb",
        "/au",
        "-a",
        "--kernel",
        &env.p("auth"),
        "-c",
        "4096",
    ]);
    env.ok(["addf", "fspf.pb", "/d", "src", &env.p("vol")]);
    env.ok(["addf", "fspf.pb", "/au", "auth"]);
    let kt = env.encrypt(None);
    let k = ["--key", &kt.key, "--tag", &kt.tag];
    let hex = |c: char| c.to_string().repeat(32);
    // What crashed writers leave: uncommitted shadows, a commit temporary, an outboard.
    let junk = [
        format!("vol/.a.fspf-{}", hex('1')),
        format!("vol/sub/.b.fspf-{}", hex('2')),
        format!("auth/.big.fspf-{}", hex('3')),
        "fspf.pb.tmp-0123456789ab".to_string(),
        format!("fspf.pb.trees/{}", hex('4')),
    ];
    for j in &junk {
        env.write(j, "junk");
    }
    let mut a = vec!["verify", "fspf.pb"];
    a.extend(k);
    let o = env.run(&a);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).starts_with("OK:"), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("5 leftovers of interrupted writers"),
        "{}",
        stderr(&o)
    );

    // A writer of this fspf is active (holds the writers lock): its possible shadows are kept.
    // The lock is held by a child process, not by this test process: a descriptor opened here
    // is copied into every child a concurrent test forks, which holds the lock until it execs,
    // so a release by `drop` here could be seen late (that made this test flaky in CI).
    let mut writers = std::process::Command::new("flock")
        .arg("-s")
        .arg(env.path("fspf.pb.writers.lock"))
        .args(["sh", "-c", "echo locked; exec cat >/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("flock(1) from util-linux is needed by this test");
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(writers.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "locked\n", "flock did not take the lock");
    }
    // A crash after the commit point: the committed version still under its shadow name.
    let v = fspf_core::Volume::open(
        &env.fspf_path(),
        Some(fspf_core::VolumeKey::from_hex(&kt.key).unwrap()),
        None,
    )
    .unwrap();
    let b = fspf_core::EmbedPath::parse("/d/sub/b").unwrap();
    let fspf_core::FileKind::File { id, .. } = &v.entry(&b).unwrap().kind else {
        panic!("not a file")
    };
    let committed = format!("vol/sub/.b.fspf-{}", id.to_hex());
    fs::rename(env.path("vol/sub/b"), env.path(&committed)).unwrap();
    a.push("--clean");
    let o = env.run(&a);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("rolled forward 1"), "{}", stdout(&o));
    assert!(!env.path(&committed).exists());
    assert!(stdout(&o).contains("removed 1"), "{}", stdout(&o));
    assert!(stdout(&o).contains("kept 4"), "{}", stdout(&o));
    assert!(!env.path(&junk[3]).exists());
    assert!(env.path(&junk[0]).exists());
    drop(writers.stdin.take());
    assert!(writers.wait().unwrap().success());

    let o = env.run(&a);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("removed 4"), "{}", stdout(&o));
    for j in &junk {
        assert!(!env.path(j).exists(), "{j} left");
    }
    a.pop();
    let o = env.run(&a);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(!stderr(&o).contains("leftover"), "{}", stderr(&o));
    let mut c = vec!["cat", "fspf.pb", "/d/a"];
    c.extend(k);
    assert_eq!(env.ok(&c), "a\n");
}

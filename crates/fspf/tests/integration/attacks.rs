//! Attacks on the properties of DESIGN.md §2. Each attack changes bytes on disk the way an attacker
//! with full control of storage could, then requires BOTH `fspf verify` and `fspf cat` to fail,
//! with `cat` printing nothing (never a prefix, never the tampered bytes).
//!
//! | property | tests here (plus elsewhere) |
//! |---|---|
//! | P1 confidentiality | `equal_plaintexts_encrypt_differently_and_no_plaintext_leaks`, cli `ciphertext_on_disk_differs_and_holds_no_plaintext` |
//! | P2 integrity | `bit_flips_anywhere_in_{encrypted,authenticated}_files_are_detected`, `bit_flips_in_outboard_trees_are_detected`, `a_flip_of_every_byte_of_a_small_fspf_makes_open_fail`; fspf-core `codec_props`, `vectors` |
//! | P3 position binding | `chunks_swapped_within_a_file_are_detected`, `same_chunk_index_swapped_between_two_files_is_detected`, `whole_files_swapped_between_paths_are_detected` |
//! | P4 size binding | `truncated_and_extended_{encrypted,authenticated}_files_are_detected_also_at_chunk_boundaries` |
//! | P5 per-file freshness | `an_older_valid_version_of_a_file_is_rejected` |
//! | P6 volume freshness | `an_older_valid_fspf_is_rejected_given_the_current_tag`, `a_whole_older_state_put_back_is_rejected_given_the_current_tag`, regression `unencrypted_fspf_was_accepted_when_a_key_was_given` |
//! | P7 completeness | `an_unlisted_file_in_a_protected_region_is_reported_and_unreadable`, `a_deleted_listed_file_is_an_error_not_empty_output`, `authenticated_symlinks_and_directories_are_checked_by_verify` |
//! | P8 nonce safety | `every_file_version_gets_a_fresh_file_id_so_no_key_nonce_pair_repeats` |
//! | P9 crash safety | `kill_9_during_addf_leaves_the_old_or_the_new_state_and_both_verify`, cli `concurrent_updaters_lose_no_update` |
//! | P10 key hygiene | `the_key_never_appears_in_error_output`, `debug_output_of_an_open_volume_shows_no_key_material`, `written_secrets_are_private` |
use crate::harness::*;
use std::fs;
use std::path::Path;

/// Interesting offsets of an encrypted file holding `size` bytes in chunks of [`CHUNK`].
fn enc_offsets(size: usize) -> Vec<usize> {
    let n = size.div_ceil(CHUNK).max(1);
    let len = HDR + size + n * TAG;
    let mut v = vec![0, 4, 5, 7, 8, 15, 23];
    for i in 0..n {
        let start = enc_chunk(i);
        let body = if i + 1 == n { size - i * CHUNK } else { CHUNK };
        v.extend([start, start + body / 2, start + body.saturating_sub(1)]);
        v.extend([start + body, start + body + 7, start + body + TAG - 1]);
    }
    v.push(len - 1);
    v.retain(|&o| o < len);
    v.sort();
    v.dedup();
    v
}

fn mask(i: usize) -> u8 {
    [0x01, 0x80, 0x10, 0x04][i % 4]
}

#[test]
fn bit_flips_anywhere_in_encrypted_files_are_detected() {
    let p = Protected::new();
    p.assert_intact();
    for name in ["empty", "one", "chunk", "chunk1", "big"] {
        let size = p.plain(name).len();
        let rel = format!("vol/{name}");
        assert_eq!(
            fs::metadata(p.env.path(&rel)).unwrap().len() as usize,
            HDR + size + size.div_ceil(CHUNK).max(1) * TAG
        );
        for (i, off) in enc_offsets(size).into_iter().enumerate() {
            p.attack(
                &rel,
                &format!("/data/{name}"),
                &format!("{rel} flip @{off}"),
                |f| flip(f, off, mask(i)),
            );
        }
    }
    p.assert_intact();
}

#[test]
fn bit_flips_anywhere_in_authenticated_files_are_detected() {
    let p = Protected::new();
    for name in ["one", "chunk", "chunk1", "big", "four"] {
        let size = p.plain(name).len();
        let rel = format!("authvol/{name}");
        let mut offs = vec![0, size / 2, size - 1];
        for i in 1..size.div_ceil(CHUNK) {
            offs.extend([i * CHUNK - 1, i * CHUNK]);
        }
        offs.sort();
        offs.dedup();
        for (i, off) in offs.into_iter().enumerate() {
            p.attack(
                &rel,
                &format!("/auth/{name}"),
                &format!("{rel} flip @{off}"),
                |f| flip(f, off, mask(i)),
            );
        }
    }
    p.assert_intact();
}

#[test]
fn bit_flips_in_outboard_trees_are_detected() {
    let p = Protected::new();
    for name in ["chunk1", "big", "four"] {
        let tree = p.tree_of(name);
        let len = fs::metadata(&tree)
            .expect("multi-chunk files have a tree")
            .len() as usize;
        let rel = tree
            .strip_prefix(p.env.root())
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        for node in 0..len / 32 {
            for (i, b) in [0usize, 13, 31].into_iter().enumerate() {
                let off = node * 32 + b;
                p.attack(
                    &rel,
                    &format!("/auth/{name}"),
                    &format!("tree of {name} flip @{off}"),
                    |f| flip(f, off, mask(i)),
                );
            }
        }
        p.attack(&rel, &format!("/auth/{name}"), "tree truncated", |f| {
            let b = fs::read(f).unwrap();
            fs::write(f, &b[..b.len() - 32]).unwrap();
        });
        p.attack(&rel, &format!("/auth/{name}"), "tree extended", |f| {
            let mut b = fs::read(f).unwrap();
            b.extend_from_slice(&[0; 32]);
            fs::write(f, b).unwrap();
        });
        p.attack(&rel, &format!("/auth/{name}"), "tree deleted", |f| {
            fs::remove_file(f).unwrap()
        });
    }
    // Single-chunk files have no tree: their root is the leaf.
    assert!(!p.tree_of("one").exists());
    p.assert_intact();
}

#[test]
fn a_flip_of_every_byte_of_a_small_fspf_makes_open_fail() {
    let env = Env::new();
    env.write("orig/hello.txt", "Hello World\n");
    env.mkdir("vol");
    env.ok(["create", "fspf.pb"]);
    env.ok(["addr", "fspf.pb", "/", "--kernel", "/", "-n"]);
    env.ok(["addr", "fspf.pb", "/data", "-e", "--kernel", &env.p("vol")]);
    env.ok(["addf", "fspf.pb", "/data", "orig", &env.p("vol")]);
    let kt = env.encrypt(None);
    let good = env.read("fspf.pb");
    assert!(good.len() < 400, "small fspf expected, got {}", good.len());
    let key = fspf_core::VolumeKey::from_hex(&kt.key).unwrap();
    let tag = fspf_core::Tag::from_hex(&kt.tag).unwrap();
    let path = env.fspf_path();
    // Every bit, in process: with the tag, and even without it (the key alone must catch it).
    for bit in 0..good.len() * 8 {
        let mut b = good.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        fs::write(&path, &b).unwrap();
        assert!(
            fspf_core::Volume::open(&path, Some(key.clone()), Some(tag)).is_err(),
            "bit {bit} flipped: opened with tag"
        );
        assert!(
            fspf_core::Volume::open(&path, Some(key.clone()), None).is_err(),
            "bit {bit} flipped: opened without tag"
        );
    }
    // Every byte, through the CLI.
    for off in 0..good.len() {
        let mut b = good.clone();
        b[off] ^= mask(off);
        fs::write(&path, &b).unwrap();
        let o = env.run([
            "cat",
            "fspf.pb",
            "/data/hello.txt",
            "--key",
            &kt.key,
            "--tag",
            &kt.tag,
        ]);
        assert_eq!(
            o.status.code(),
            Some(1),
            "byte {off} flipped: cat succeeded"
        );
        assert!(o.stdout.is_empty(), "byte {off}");
    }
    // Truncated and extended fspf.
    for b in [&good[..good.len() - 1], &good[..20], &good[..0]] {
        fs::write(&path, b).unwrap();
        env.fails([
            "cat",
            "fspf.pb",
            "/data/hello.txt",
            "--key",
            &kt.key,
            "--tag",
            &kt.tag,
        ]);
    }
    let mut longer = good.clone();
    longer.push(0);
    fs::write(&path, &longer).unwrap();
    env.fails([
        "cat",
        "fspf.pb",
        "/data/hello.txt",
        "--key",
        &kt.key,
        "--tag",
        &kt.tag,
    ]);
    fs::write(&path, &good).unwrap();
    assert_eq!(
        env.ok([
            "cat",
            "fspf.pb",
            "/data/hello.txt",
            "--key",
            &kt.key,
            "--tag",
            &kt.tag
        ]),
        "Hello World\n"
    );
}

fn swap_ranges(f: &Path, a: usize, b: usize, len: usize) {
    let mut d = fs::read(f).unwrap();
    let (x, y) = (d[a..a + len].to_vec(), d[b..b + len].to_vec());
    d[a..a + len].copy_from_slice(&y);
    d[b..b + len].copy_from_slice(&x);
    fs::write(f, d).unwrap();
}

#[test]
fn chunks_swapped_within_a_file_are_detected() {
    let p = Protected::new();
    let full = CHUNK + TAG;
    for (a, b) in [(0, 1), (1, 2), (0, 2)] {
        p.attack(
            "vol/big",
            "/data/big",
            &format!("enc chunks {a}<->{b}"),
            |f| swap_ranges(f, enc_chunk(a), enc_chunk(b), full),
        );
        p.attack(
            "authvol/big",
            "/auth/big",
            &format!("auth chunks {a}<->{b}"),
            |f| swap_ranges(f, a * CHUNK, b * CHUNK, CHUNK),
        );
    }
    // Last (full) chunk of `four` swapped with its first: the last-chunk flag differs.
    p.attack("vol/four", "/data/four", "enc first<->last", |f| {
        swap_ranges(f, enc_chunk(0), enc_chunk(3), full)
    });
    p.assert_intact();
}

#[test]
fn same_chunk_index_swapped_between_two_files_is_detected() {
    let p = Protected::new();
    for i in 0..3 {
        p.attack(
            "vol/big",
            "/data/big",
            &format!("enc chunk {i} from twin"),
            |f| {
                let twin = fs::read(p.env.path("vol/twin")).unwrap();
                let mut d = fs::read(f).unwrap();
                let r = enc_chunk(i)..enc_chunk(i + 1);
                d[r.clone()].copy_from_slice(&twin[r]);
                fs::write(f, d).unwrap();
            },
        );
        p.attack(
            "authvol/big",
            "/auth/big",
            &format!("auth chunk {i} from twin"),
            |f| {
                let twin = fs::read(p.env.path("authvol/twin")).unwrap();
                let mut d = fs::read(f).unwrap();
                let r = i * CHUNK..(i + 1) * CHUNK;
                d[r.clone()].copy_from_slice(&twin[r]);
                fs::write(f, d).unwrap();
            },
        );
    }
    p.assert_intact();
}

#[test]
fn whole_files_swapped_between_paths_are_detected() {
    let p = Protected::new();
    for dir in ["vol", "authvol"] {
        let embed = if dir == "vol" { "/data" } else { "/auth" };
        let a = p.env.path(format!("{dir}/big"));
        let b = p.env.path(format!("{dir}/twin"));
        let (da, db) = (fs::read(&a).unwrap(), fs::read(&b).unwrap());
        assert_eq!(
            da.len(),
            db.len(),
            "equal sizes make the swap undetectable by size"
        );
        fs::write(&a, &db).unwrap();
        fs::write(&b, &da).unwrap();
        p.assert_rejected(&format!("{embed}/big"), "whole-file swap");
        p.assert_rejected(&format!("{embed}/twin"), "whole-file swap");
        // The attacker swaps the integrity trees as well.
        if dir == "authvol" {
            let (ta, tb) = (p.tree_of("big"), p.tree_of("twin"));
            let (xa, xb) = (fs::read(&ta).unwrap(), fs::read(&tb).unwrap());
            fs::write(&ta, &xb).unwrap();
            fs::write(&tb, &xa).unwrap();
            p.assert_rejected("/auth/big", "file + tree swap");
            fs::write(&ta, &xa).unwrap();
            fs::write(&tb, &xb).unwrap();
        }
        fs::write(&a, &da).unwrap();
        fs::write(&b, &db).unwrap();
    }
    // Two files of different sizes swapped.
    let (one, chunk) = (p.env.path("vol/one"), p.env.path("vol/chunk"));
    let (d1, d2) = (fs::read(&one).unwrap(), fs::read(&chunk).unwrap());
    fs::write(&one, &d2).unwrap();
    fs::write(&chunk, &d1).unwrap();
    p.assert_rejected("/data/one", "size-changing swap");
    p.assert_rejected("/data/chunk", "size-changing swap");
    fs::write(&one, &d1).unwrap();
    fs::write(&chunk, &d2).unwrap();
    p.assert_intact();
}

fn truncate_to(f: &Path, len: usize) {
    let d = fs::read(f).unwrap();
    fs::write(f, &d[..len]).unwrap();
}

fn append(f: &Path, extra: &[u8]) {
    let mut d = fs::read(f).unwrap();
    d.extend_from_slice(extra);
    fs::write(f, d).unwrap();
}

#[test]
fn truncated_and_extended_encrypted_files_are_detected_also_at_chunk_boundaries() {
    let p = Protected::new();
    for name in ["big", "four", "chunk1", "chunk", "one", "empty"] {
        let rel = format!("vol/{name}");
        let embed = format!("/data/{name}");
        let len = fs::metadata(p.env.path(&rel)).unwrap().len() as usize;
        let n = p.plain(name).len().div_ceil(CHUNK).max(1);
        let mut cuts = vec![len - 1, HDR, HDR - 1, 0];
        if n > 1 {
            // Drop the whole last chunk, and cut exactly at every chunk boundary.
            cuts.extend((1..n).map(enc_chunk));
        }
        for cut in cuts {
            p.attack(&rel, &embed, &format!("{rel} truncated to {cut}"), |f| {
                truncate_to(f, cut)
            });
        }
        p.attack(&rel, &embed, &format!("{rel} +1 byte"), |f| append(f, &[0]));
        p.attack(&rel, &embed, &format!("{rel} +1 chunk"), |f| {
            append(f, &pattern(CHUNK + TAG, 77))
        });
        // Append a copy of the file's own last chunk (a valid ciphertext under the file key).
        p.attack(&rel, &embed, &format!("{rel} last chunk duplicated"), |f| {
            let d = fs::read(f).unwrap();
            let last = d[enc_chunk(n - 1)..].to_vec();
            append(f, &last)
        });
    }
    p.assert_intact();
}

#[test]
fn truncated_and_extended_authenticated_files_are_detected_also_at_chunk_boundaries() {
    let p = Protected::new();
    for name in ["big", "four", "chunk1", "chunk", "one", "empty"] {
        let rel = format!("authvol/{name}");
        let embed = format!("/auth/{name}");
        let size = p.plain(name).len();
        let mut cuts = vec![size.saturating_sub(1), 0];
        cuts.extend((1..size.div_ceil(CHUNK)).map(|i| i * CHUNK));
        cuts.retain(|&c| c != size);
        cuts.dedup();
        for cut in cuts {
            p.attack(&rel, &embed, &format!("{rel} truncated to {cut}"), |f| {
                truncate_to(f, cut)
            });
        }
        p.attack(&rel, &embed, &format!("{rel} +1 byte"), |f| append(f, b"x"));
        p.attack(&rel, &embed, &format!("{rel} +1 chunk"), |f| {
            append(f, &pattern(CHUNK, 5))
        });
    }
    p.assert_intact();
}

#[test]
fn an_older_valid_version_of_a_file_is_rejected() {
    let mut p = Protected::new();
    let old_enc = p.env.read("vol/big");
    let old_auth = p.env.read("authvol/big");
    let old_tree = fs::read(p.tree_of("big")).unwrap();
    let old_enc_one = p.env.read("vol/one");
    // New versions with the same size (so only freshness can tell them apart).
    let mut newer = p.plain("big").to_vec();
    newer[10] ^= 0xff;
    p.env.write("orig/big", &newer);
    p.env.write("authvol/big", &newer);
    let args = p.kt_args();
    let f = p.env.p("fspf.pb");
    let out = p
        .env
        .ok(["addf", &f, "/data", &p.env.p("orig"), &p.env.p("vol")]
            .into_iter()
            .map(String::from)
            .chain(args.clone()));
    p.kt.tag = last_word(&out);
    let out = p.env.ok(["addf", &f, "/auth", &p.env.p("authvol")]
        .into_iter()
        .map(String::from)
        .chain(p.kt_args()));
    p.kt.tag = last_word(&out);
    assert_eq!(p.cat("/data/big").stdout, newer);
    assert_eq!(p.cat("/auth/big").stdout, newer);
    assert_ne!(
        p.env.read("vol/one"),
        old_enc_one,
        "re-addf gives new file ids"
    );
    // Roll back each file to its old, once-valid bytes.
    p.attack("vol/big", "/data/big", "old ciphertext", |f| {
        fs::write(f, &old_enc).unwrap()
    });
    p.attack(
        "vol/one",
        "/data/one",
        "old ciphertext (unchanged content)",
        |f| fs::write(f, &old_enc_one).unwrap(),
    );
    p.attack("authvol/big", "/auth/big", "old plaintext", |f| {
        fs::write(f, &old_auth).unwrap()
    });
    // Old plaintext plus the old tree under the new version's name.
    let tree = p.tree_of("big");
    let tree_rel = tree
        .strip_prefix(p.env.root())
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let new_tree = fs::read(&tree).unwrap();
    fs::write(p.env.path("authvol/big"), &old_auth).unwrap();
    p.attack(&tree_rel, "/auth/big", "old plaintext + old tree", |f| {
        fs::write(f, &old_tree).unwrap()
    });
    fs::write(p.env.path("authvol/big"), &newer).unwrap();
    assert_eq!(fs::read(&tree).unwrap(), new_tree);
    let v = p.verify();
    assert!(v.status.success(), "{}", stdout(&v));
}

#[test]
fn an_older_valid_fspf_is_rejected_given_the_current_tag() {
    let mut p = Protected::new();
    let old_fspf = p.env.read("fspf.pb");
    let old_tag = p.kt.tag.clone();
    p.env.write("orig/extra", "extra");
    let f = p.env.p("fspf.pb");
    let out = p
        .env
        .ok(["addf", &f, "/data", &p.env.p("orig"), &p.env.p("vol")]
            .into_iter()
            .map(String::from)
            .chain(p.kt_args()));
    p.kt.tag = last_word(&out);
    assert_ne!(p.kt.tag, old_tag);
    let new_fspf = p.env.read("fspf.pb");
    fs::write(p.env.fspf_path(), &old_fspf).unwrap();
    let o = p.cat("/data/extra");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("tag mismatch"), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    let o = p.verify();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("tag mismatch"), "{}", stderr(&o));
    // Also through SCONE_FSPF_TAG.
    let o = p.env.run_env(
        ["cat", "fspf.pb", "/data/one"],
        &[("SCONE_FSPF_KEY", &p.kt.key), ("SCONE_FSPF_TAG", &p.kt.tag)],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    // A modifying command must not build on the rolled-back fspf either.
    let o = p.env.run(
        ["addr", &f, "/x", "-e", "--ephemeral"]
            .into_iter()
            .map(String::from)
            .chain(p.kt_args()),
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(p.env.read("fspf.pb"), old_fspf);
    fs::write(p.env.fspf_path(), &new_fspf).unwrap();
    assert_eq!(p.cat("/data/extra").stdout, b"extra");
}

#[test]
fn an_unlisted_file_in_a_protected_region_is_reported_and_unreadable() {
    let p = Protected::new();
    let ct = p.env.read("vol/one");
    for (rel, embed, data) in [
        ("vol/evil", "/data/evil", b"evil".to_vec()),
        ("vol/copy-of-one", "/data/copy-of-one", ct),
        ("vol/sub/dir/evil", "/data/sub/dir/evil", b"x".to_vec()),
        (
            "authvol/evil.py",
            "/auth/evil.py",
            b"print('pwned')".to_vec(),
        ),
    ] {
        p.env.write(rel, &data);
        let v = p.verify();
        assert_eq!(v.status.code(), Some(1), "{rel}");
        assert!(
            stdout(&v).contains(&format!("{embed}: unlisted file")),
            "{rel}: {}",
            stdout(&v)
        );
        let c = p.cat(embed);
        assert_eq!(c.status.code(), Some(1), "{rel}");
        assert!(c.stdout.is_empty(), "{rel}");
        assert!(stderr(&c).contains("not listed"), "{}", stderr(&c));
        let mut args = vec!["verify".to_string(), p.env.p("fspf.pb"), "--json".into()];
        args.extend(p.kt_args());
        let j = p.env.run(&args);
        assert_eq!(j.status.code(), Some(1));
        let j: serde_json::Value = serde_json::from_slice(&j.stdout).expect("verify --json");
        assert_eq!(j["ok"], false);
        assert_eq!(j["findings"][0]["path"], embed, "{j}");
        fs::remove_file(p.env.path(rel)).unwrap();
    }
    let _ = fs::remove_dir_all(p.env.path("vol/sub"));
    let v = p.verify();
    assert!(v.status.success(), "{}", stdout(&v));
}

#[test]
fn a_deleted_listed_file_is_an_error_not_empty_output() {
    let p = Protected::new();
    for rel in ["vol/empty", "vol/big", "authvol/empty", "authvol/one"] {
        let embed = rel.replace("authvol/", "/auth/").replace("vol/", "/data/");
        p.attack(rel, &embed, &format!("{rel} deleted"), |f| {
            fs::remove_file(f).unwrap()
        });
        let f = p.env.path(rel);
        let saved = fs::read(&f).unwrap();
        fs::remove_file(&f).unwrap();
        let c = p.cat(&embed);
        assert!(stderr(&c).contains("missing"), "{}", stderr(&c));
        let v = p.verify();
        assert!(stdout(&v).contains("missing"), "{}", stdout(&v));
        fs::write(&f, saved).unwrap();
    }
    // A listed file replaced by a directory.
    let f = p.env.path("vol/one");
    let saved = fs::read(&f).unwrap();
    fs::remove_file(&f).unwrap();
    fs::create_dir(&f).unwrap();
    p.assert_rejected("/data/one", "file replaced by a directory");
    fs::remove_dir(&f).unwrap();
    fs::write(&f, saved).unwrap();
    p.assert_intact();
}

#[test]
fn equal_plaintexts_encrypt_differently_and_no_plaintext_leaks() {
    let env = Env::new();
    let secret: Vec<u8> = b"TOP-SECRET-MARKER-0123456789 "
        .iter()
        .cycle()
        .take(3 * CHUNK + 5)
        .copied()
        .collect();
    env.write("orig/a", &secret);
    env.write("orig/b", &secret);
    env.write("orig/zeros", vec![0u8; 2 * CHUNK]);
    env.write("orig/zeros2", vec![0u8; 2 * CHUNK]);
    env.mkdir("vol");
    env.two_regions("/d", "-e", "vol");
    env.ok(["addf", "fspf.pb", "/d", "orig", &env.p("vol")]);
    let a = env.read("vol/a");
    let b = env.read("vol/b");
    let z1 = env.read("vol/zeros");
    let z2 = env.read("vol/zeros2");
    assert_ne!(a, b);
    assert_ne!(z1, z2);
    // No 16-byte window in common between equal files (not even chunk-aligned repeats).
    let common = |x: &[u8], y: &[u8]| {
        let set: std::collections::HashSet<&[u8]> = x[HDR..].windows(16).collect();
        y[HDR..].windows(16).any(|w| set.contains(w))
    };
    assert!(!common(&a, &b));
    assert!(!common(&z1, &z2));
    // Within one file, equal plaintext chunks encrypt differently too.
    assert_ne!(
        z1[enc_chunk(0)..enc_chunk(0) + 64],
        z1[enc_chunk(1)..enc_chunk(1) + 64]
    );
    for ct in [&a, &b] {
        assert!(!ct
            .windows(12)
            .any(|w| secret.windows(12).take(40).any(|s| s == w)));
        assert!(!ct.windows(6).any(|w| w == b"SECRET"));
    }
    for z in [&z1, &z2] {
        assert!(
            !z[HDR..].windows(8).any(|w| w == [0u8; 8]),
            "zero runs leak"
        );
    }
    // Re-adding the same content gives yet another ciphertext.
    env.ok(["addf", "fspf.pb", "/d", "orig", &env.p("vol")]);
    assert_ne!(env.read("vol/a"), a);
    // And the encrypted fspf names no file.
    env.encrypt(None);
    let pb = env.read("fspf.pb");
    assert!(!pb.windows(5).any(|w| w == b"zeros"));
}

#[test]
fn the_key_never_appears_in_error_output() {
    let p = Protected::new();
    let key = p.kt.key.clone();
    let upper = key.to_uppercase();
    let f = p.env.p("fspf.pb");
    let wrong_tag = "00".repeat(16);
    let short = &key[..62];
    let long = format!("{key}00");
    let cases: Vec<Vec<&str>> = vec![
        vec!["cat", &f, "/data/nope", "--key", &key, "--tag", &p.kt.tag],
        vec!["cat", &f, "/data/big", "--key", &key, "--tag", &wrong_tag],
        vec!["cat", &f, "relative", "--key", &key],
        vec!["cat", &f, "/data/big", "--key", short],
        vec!["cat", &f, "/data/big", "--key", &long],
        vec!["cat", &f, "/data/big", "--key", &upper, "--tag", "zz"],
        vec!["verify", &f, "--key", &key, "--tag", &wrong_tag],
        vec![
            "addf",
            &f,
            "/data",
            "/nonexistent",
            "--key",
            &key,
            "--tag",
            &p.kt.tag,
        ],
        vec![
            "addr",
            &f,
            "/data",
            "-e",
            "--ephemeral",
            "--key",
            &key,
            "--tag",
            &p.kt.tag,
        ],
        vec![
            "export",
            &f,
            "/data",
            "/proc/nope",
            "--key",
            &key,
            "--tag",
            &p.kt.tag,
        ],
        vec!["show", &f, &key, "--expect-tag", &wrong_tag],
        vec!["show", &f, short],
        vec!["cat", &f, "--key", &key],
        vec!["cat", "--key", &key, "--bogus-flag"],
        vec!["encrypt", &f, "--key", &key, "--tag", &wrong_tag],
    ];
    for args in cases {
        let o = p.env.run(&args);
        assert!(!o.status.success(), "{args:?} should fail");
        let all = format!("{}{}", stdout(&o), stderr(&o));
        for secret in [&key[..], &upper[..], short, &key[8..40]] {
            assert!(!all.contains(secret), "{args:?} leaked the key:\n{all}");
        }
    }
    // Through the environment, including clap's usage errors and help.
    for args in [
        vec!["cat", &f],
        vec!["cat", "--help"],
        vec!["verify", &f, "--tag", &wrong_tag],
    ] {
        let o = p.env.run_env(&args, &[("SCONE_FSPF_KEY", &key)]);
        let all = format!("{}{}", stdout(&o), stderr(&o));
        assert!(
            !all.contains(&key[8..40]),
            "{args:?} leaked the key:\n{all}"
        );
    }
}

#[test]
fn debug_output_of_an_open_volume_shows_no_key_material() {
    let p = Protected::new();
    let key = fspf_core::VolumeKey::from_hex(&p.kt.key).unwrap();
    let v = fspf_core::Volume::open(&p.env.fspf_path(), Some(key.clone()), None).unwrap();
    let dbg = format!("{v:?} {key:?} {:?}", v.regions());
    assert!(!dbg.contains(&p.kt.key[..16]), "volume key in Debug");
    for r in v.regions() {
        if let Some(k) = &r.key {
            let hex = hex_of(k.as_bytes());
            assert!(!dbg.contains(&hex[..16]), "region key in Debug");
            let bytes = format!("{:?}", k.as_bytes());
            assert!(
                !dbg.contains(&bytes[..bytes.len().min(20)]),
                "region key bytes in Debug"
            );
        }
    }
    assert!(dbg.contains("redacted"));
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn written_secrets_are_private() {
    use std::os::unix::fs::MetadataExt;
    let p = Protected::new();
    let mode = |path: &Path| fs::metadata(path).unwrap().mode() & 0o777;
    assert_eq!(mode(&p.env.fspf_path()), 0o600);
    assert_eq!(mode(&p.env.path("fspf.pb.lock")), 0o600);
    assert_eq!(mode(&p.tree_of("big")), 0o600);
}

#[test]
fn a_whole_older_state_put_back_is_rejected_given_the_current_tag() {
    // Snapshot everything on disk (fspf, ciphertexts, plaintexts, trees), update, restore all.
    let mut p = Protected::new();
    let snapshot = |p: &Protected| -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        for d in ["vol", "authvol", "fspf.pb.trees"] {
            for e in fs::read_dir(p.env.path(d)).unwrap() {
                let path = e.unwrap().path();
                out.push((path.clone(), fs::read(&path).unwrap()));
            }
        }
        out.push((p.env.fspf_path(), p.env.read("fspf.pb")));
        out
    };
    let old = snapshot(&p);
    let old_tag = p.kt.tag.clone();
    let mut changed = p.plain("big").to_vec();
    changed[0] ^= 1;
    p.env.write("orig/big", &changed);
    p.env.write("authvol/big", &changed);
    let f = p.env.p("fspf.pb");
    for (region, src, out) in [
        ("/data", p.env.p("orig"), Some(p.env.p("vol"))),
        ("/auth", p.env.p("authvol"), None),
    ] {
        let mut args = vec!["addf".to_string(), f.clone(), region.into(), src];
        args.extend(out);
        args.extend(p.kt_args());
        p.kt.tag = last_word(&p.env.ok(&args));
    }
    for (path, bytes) in &old {
        fs::write(path, bytes).unwrap();
    }
    for embed in ["/data/big", "/auth/big", "/data/one"] {
        let c = p.cat(embed);
        assert_eq!(c.status.code(), Some(1), "{embed}");
        assert!(c.stdout.is_empty());
        assert!(stderr(&c).contains("tag mismatch"), "{}", stderr(&c));
    }
    assert_eq!(p.verify().status.code(), Some(1));
    // The old state is self-consistent: only the tag tells it is old.
    p.kt.tag = old_tag;
    p.assert_intact();
}

#[test]
fn authenticated_symlinks_and_directories_are_checked_by_verify() {
    let env = Env::new();
    env.write("a/real.txt", "real");
    env.write("a/other.txt", "other");
    env.mkdir("a/dir/empty");
    std::os::unix::fs::symlink("real.txt", env.path("a/link")).unwrap();
    env.ok(["create", "fspf.pb"]);
    env.ok(["addr", "fspf.pb", "/", "--kernel", "/", "-n"]);
    env.ok(["addr", "fspf.pb", "/a", "-a", "--kernel", &env.p("a")]);
    env.ok(["addf", "fspf.pb", "/a", "a"]);
    let kt = env.encrypt(None);
    let verify = || env.run(["verify", "fspf.pb", "--key", &kt.key, "--tag", &kt.tag]);
    assert!(verify().status.success());
    // Symlink re-pointed.
    fs::remove_file(env.path("a/link")).unwrap();
    std::os::unix::fs::symlink("other.txt", env.path("a/link")).unwrap();
    let o = verify();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("/a/link: symlink target changed"),
        "{}",
        stdout(&o)
    );
    fs::remove_file(env.path("a/link")).unwrap();
    std::os::unix::fs::symlink("real.txt", env.path("a/link")).unwrap();
    // Listed directory removed, or replaced by a file.
    fs::remove_dir(env.path("a/dir/empty")).unwrap();
    let o = verify();
    assert!(
        stdout(&o).contains("/a/dir/empty: listed directory is missing"),
        "{}",
        stdout(&o)
    );
    env.write("a/dir/empty", "now a file");
    let o = verify();
    assert_eq!(o.status.code(), Some(1));
    fs::remove_file(env.path("a/dir/empty")).unwrap();
    fs::create_dir(env.path("a/dir/empty")).unwrap();
    assert!(verify().status.success());
    // `cat` of a symlink or directory entry is an error, not an empty file.
    for p in ["/a/link", "/a/dir"] {
        let o = env.fails(["cat", "fspf.pb", p, "--key", &kt.key, "--tag", &kt.tag]);
        assert!(o.stdout.is_empty());
    }
    // A regular file replaced by a symlink to another listed file with other content.
    fs::remove_file(env.path("a/real.txt")).unwrap();
    std::os::unix::fs::symlink("other.txt", env.path("a/real.txt")).unwrap();
    let o = env.fails([
        "cat",
        "fspf.pb",
        "/a/real.txt",
        "--key",
        &kt.key,
        "--tag",
        &kt.tag,
    ]);
    assert!(o.stdout.is_empty());
    assert_eq!(verify().status.code(), Some(1));
}

#[test]
fn every_file_version_gets_a_fresh_file_id_so_no_key_nonce_pair_repeats() {
    // P8: chunk nonces are the chunk index; safety rests on a fresh file id (hence key) per version.
    let env = Env::new();
    for i in 0..5 {
        env.write(format!("orig/f{i}"), pattern(CHUNK + i, i as u8));
    }
    env.write("orig/same1", "same");
    env.write("orig/same2", "same");
    env.mkdir("vol");
    env.two_regions("/d", "-e", "vol");
    let mut seen = std::collections::HashSet::new();
    for round in 0..4 {
        env.ok(["addf", "fspf.pb", "/d", "orig", &env.p("vol")]);
        let v = fspf_core::Volume::open(&env.fspf_path(), None, None).unwrap();
        let mut n = 0;
        for e in v.files().values() {
            if let fspf_core::FileKind::File { id, .. } = &e.kind {
                assert!(seen.insert(*id), "round {round}: file id {id:?} reused");
                n += 1;
            }
        }
        assert_eq!(n, 7);
        // The id on disk is the one the fspf lists (header bytes 8..24).
        for name in ["f0", "same1"] {
            let ct = env.read(format!("vol/{name}"));
            let p = fspf_core::EmbedPath::parse(&format!("/d/{name}")).unwrap();
            let fspf_core::FileKind::File { id, .. } = &v.entry(&p).unwrap().kind else {
                panic!()
            };
            assert_eq!(&ct[8..24], &id.0[..]);
        }
    }
    assert_eq!(seen.len(), 28);
}

#[test]
fn kill_9_during_addf_leaves_the_old_or_the_new_state_and_both_verify() {
    // P9: SIGKILL at spread-out moments of an import; the next run sees a verifiable state.
    let env = Env::new();
    for i in 0..40 {
        env.write(
            format!("orig/d{}/f{i}", i % 4),
            pattern(20_000 + i * 37, i as u8),
        );
    }
    env.write("auth/x", pattern(9000, 9));
    env.mkdir("vol");
    env.two_regions("/d", "-e", "vol");
    env.ok([
        "addr",
        "fspf.pb",
        "/a",
        "-a",
        "--kernel",
        &env.p("auth"),
        "-c",
        "4096",
    ]);
    env.ok(["addf", "fspf.pb", "/d", "orig", &env.p("vol")]);
    env.ok(["addf", "fspf.pb", "/a", "auth"]);
    let start = std::time::Instant::now();
    env.ok(["addf", "fspf.pb", "/d", "orig", &env.p("vol")]);
    let full = start.elapsed();
    let mut states = std::collections::HashSet::new();
    for step in 0..12u32 {
        let before = env.ok(["show", "--tag", "fspf.pb"]);
        let mut child = std::process::Command::new(FSPF)
            .args(["addf", "fspf.pb", "/d", "orig", &env.p("vol")])
            .current_dir(env.root())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Spread over the run; the last steps wait long enough to land after the commit point
        // even on a loaded machine.
        std::thread::sleep(if step < 10 { full * step / 8 } else { full * 4 });
        let _ = child.kill();
        let _ = child.wait();
        let after = env.ok(["show", "--tag", "fspf.pb"]);
        states.insert(before == after);
        let v = env.run(["verify", "fspf.pb"]);
        assert!(
            v.status.success(),
            "step {step}: state after kill does not verify:\n{}{}",
            stdout(&v),
            stderr(&v)
        );
        let c = env.run(["cat", "fspf.pb", "/d/d1/f5"]);
        assert!(c.status.success(), "step {step}: {}", stderr(&c));
        assert!(
            c.stdout == pattern(20_000 + 5 * 37, 5),
            "step {step}: wrong plaintext"
        );
    }
    // Both outcomes happened at least once (killed before and after the commit point).
    assert_eq!(
        states.len(),
        2,
        "kill timing never hit both sides: {states:?}"
    );
}

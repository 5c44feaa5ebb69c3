//! `fspf image protect | verify | exec` on images built here: OCI layouts and docker archives
//! with whiteouts, opaque directories, replaced files, hard links and gzip layers; attacks on
//! the protected archive by someone who can rewrite it and fix every digest (a registry, a
//! backup); members that would escape the root. The podman tests (`podman_*`) run the
//! protected images for real.
use crate::harness::*;
use serde_json::{json, Value};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

fn sha256(b: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b);
    format!(
        "sha256:{}",
        d.as_ref()
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    )
}

/// A layer's members, written as an uncompressed tar.
#[derive(Default)]
pub struct Layer(Vec<u8>);

impl Layer {
    /// A member with `name` written as given (no validation: escapes are built this way).
    fn raw(
        mut self,
        name: &[u8],
        kind: tar::EntryType,
        content: &[u8],
        link: &[u8],
        mode: u32,
    ) -> Self {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(content.len() as u64);
        h.set_mtime(1_700_000_000);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(content);
        self.0.resize(self.0.len().div_ceil(512) * 512, 0);
        self
    }
    pub fn file(self, name: &str, content: &[u8]) -> Self {
        self.raw(
            name.as_bytes(),
            tar::EntryType::Regular,
            content,
            b"",
            0o644,
        )
    }
    pub fn dir(self, name: &str) -> Self {
        self.raw(name.as_bytes(), tar::EntryType::Directory, b"", b"", 0o755)
    }
    pub fn symlink(self, name: &str, target: &str) -> Self {
        self.raw(
            name.as_bytes(),
            tar::EntryType::Symlink,
            b"",
            target.as_bytes(),
            0o777,
        )
    }
    pub fn hardlink(self, name: &str, target: &str) -> Self {
        self.raw(
            name.as_bytes(),
            tar::EntryType::Link,
            b"",
            target.as_bytes(),
            0o644,
        )
    }
    /// A member through the tar crate's builder (GNU long names), with pax records before it.
    pub fn long(mut self, name: &str, content: &[u8], pax: &[(&str, &[u8])]) -> Self {
        let mut b = tar::Builder::new(std::mem::take(&mut self.0));
        if !pax.is_empty() {
            b.append_pax_extensions(pax.iter().map(|(k, v)| (*k, *v)))
                .unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, content).unwrap();
        self.0 = b.into_inner().unwrap();
        // `into_inner` ended the archive (two zero blocks): more members follow.
        self.0.truncate(self.0.len() - 1024);
        self
    }
    pub fn bytes(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0u8; 1024]);
        self.0
    }
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn gunzip_if(b: &[u8]) -> Vec<u8> {
    if b.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(b)
            .read_to_end(&mut out)
            .unwrap();
        out
    } else {
        b.to_vec()
    }
}

/// An OCI image layout directory.
pub struct Oci(pub PathBuf);

impl Oci {
    fn blob(&self, b: &[u8]) -> String {
        let d = sha256(b);
        let dir = self.0.join("blobs/sha256");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(&d[7..]), b).unwrap();
        d
    }
    fn read_blob(&self, d: &str) -> Vec<u8> {
        fs::read(self.0.join("blobs/sha256").join(&d[7..])).unwrap()
    }

    /// Write an image with these layers (`(tar, gzip it)`) and `config.config` = `cfg`.
    pub fn write(dir: &Path, layers: &[(Vec<u8>, bool)], cfg: Value) -> Oci {
        let o = Oci(dir.to_path_buf());
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let mut descs = Vec::new();
        let mut diffs = Vec::new();
        for (tar, gz) in layers {
            diffs.push(sha256(tar));
            let blob = if *gz { gzip(tar) } else { tar.clone() };
            let mt = if *gz {
                "application/vnd.oci.image.layer.v1.tar+gzip"
            } else {
                "application/vnd.oci.image.layer.v1.tar"
            };
            descs.push(json!({"mediaType": mt, "digest": o.blob(&blob), "size": blob.len()}));
        }
        let config = json!({"architecture": "amd64", "os": "linux", "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": diffs}, "history": []});
        o.set(config, descs, Some("localhost/test:1"));
        o
    }

    fn set(&self, config: Value, layers: Vec<Value>, name: Option<&str>) {
        let cb = serde_json::to_vec(&config).unwrap();
        let cd = self.blob(&cb);
        let m = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cb.len()},
            "layers": layers});
        let mb = serde_json::to_vec(&m).unwrap();
        let md = self.blob(&mb);
        let mut desc = json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mb.len()});
        if let Some(n) = name {
            desc["annotations"] = json!({"org.opencontainers.image.ref.name": n});
        }
        fs::write(
            self.0.join("index.json"),
            json!({"schemaVersion": 2, "manifests": [desc]}).to_string(),
        )
        .unwrap();
    }

    /// An OCI archive (`DST` of `fspf image protect`) unpacked into a layout directory.
    pub fn unpack(archive: &Path, dir: &Path) -> Oci {
        fs::create_dir_all(dir).unwrap();
        let st = Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success());
        Oci(dir.to_path_buf())
    }

    fn manifest(&self) -> Value {
        let idx: Value =
            serde_json::from_slice(&fs::read(self.0.join("index.json")).unwrap()).unwrap();
        serde_json::from_slice(&self.read_blob(idx["manifests"][0]["digest"].as_str().unwrap()))
            .unwrap()
    }
    pub fn config(&self) -> Value {
        serde_json::from_slice(
            &self.read_blob(self.manifest()["config"]["digest"].as_str().unwrap()),
        )
        .unwrap()
    }
    pub fn layer_count(&self) -> usize {
        self.manifest()["layers"].as_array().unwrap().len()
    }
    /// Layer `i`'s uncompressed tar.
    pub fn layer(&self, i: usize) -> Vec<u8> {
        gunzip_if(&self.read_blob(self.manifest()["layers"][i]["digest"].as_str().unwrap()))
    }

    /// What an attacker who can rewrite the image does: replace layer `i` by `tar` and fix
    /// every digest (layer, diff_id, config, manifest, index).
    pub fn replace_layer(&self, i: usize, tar: &[u8]) {
        let mut m = self.manifest();
        let mut c = self.config();
        let d = self.blob(tar);
        m["layers"][i] = json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": tar.len()});
        c["rootfs"]["diff_ids"][i] = json!(d);
        self.set(c, m["layers"].as_array().unwrap().clone(), None);
    }

    /// Layer `i` rewritten member by member: `f(name, content)` returns the new content, or
    /// `None` to drop the member.
    pub fn edit_layer(&self, i: usize, mut f: impl FnMut(&str, Vec<u8>) -> Option<Vec<u8>>) {
        let old = self.layer(i);
        let mut ar = tar::Archive::new(&old[..]);
        let mut b = tar::Builder::new(Vec::new());
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            let mut content = Vec::new();
            e.read_to_end(&mut content).unwrap();
            let mut h = e.header().clone();
            let link = e.link_name().unwrap().map(|l| l.into_owned());
            let Some(new) = f(&name, content) else {
                continue;
            };
            h.set_size(new.len() as u64);
            if let Some(l) = link {
                b.append_link(&mut h, &name, l).unwrap();
            } else {
                b.append_data(&mut h, &name, &new[..]).unwrap();
            }
        }
        self.replace_layer(i, &b.into_inner().unwrap());
    }

    /// Add a layer on top (below the shield's layer, as a rebuilt image would).
    pub fn insert_layer(&self, at: usize, tar: &[u8]) {
        let mut m = self.manifest();
        let mut c = self.config();
        let d = self.blob(tar);
        m["layers"].as_array_mut().unwrap().insert(at, json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": tar.len()}));
        c["rootfs"]["diff_ids"]
            .as_array_mut()
            .unwrap()
            .insert(at, json!(d));
        self.set(c, m["layers"].as_array().unwrap().clone(), None);
    }
}

/// Two layers exercising every merge rule; `/app` is to be encrypted.
fn two_layer_image(dir: &Path) -> Oci {
    let l0 = Layer::default()
        .dir("etc/")
        .file("etc/a", b"a0")
        .file("etc/gone", b"removed by the upper layer")
        .dir("opt/")
        .dir("opt/x/")
        .file("opt/x/y", b"hidden by the opaque directory")
        .dir("app/")
        .file("app/secret.txt", b"TOPSECRET-OLD version")
        .file("app/keep.txt", b"TOPSECRET-KEEP")
        .file("usr/lib/plain", b"implicit parents")
        .bytes();
    let l1 = Layer::default()
        .file("etc/a", b"a1")
        .file("etc/.wh.gone", b"")
        .file("opt/.wh..wh..opq", b"")
        .file("opt/z", b"new in the opaque directory")
        .file("app/secret.txt", b"TOPSECRET-NEW version")
        .file("lib/hard", b"linked twice")
        .hardlink("lib/link", "lib/hard")
        .file("app/h1", b"TOPSECRET-LINKED")
        .hardlink("app/h2", "app/h1")
        .symlink("bin", "usr/bin")
        .bytes();
    Oci::write(
        dir,
        &[(l0, true), (l1, false)],
        json!({"Cmd": ["/bin/true"]}),
    )
}

/// `fspf image protect SRC out.tar --encrypt /app` in `env`; returns (key, tag).
fn protect(env: &Env, src: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec![
        "image",
        "protect",
        src,
        "out.tar",
        "--key-file",
        "key",
        "--tag-file",
        "tag",
    ];
    args.extend_from_slice(extra);
    let out = env.ok(args);
    assert!(out.contains("Protected image"), "{out}");
    let key = String::from_utf8(env.read("key"))
        .unwrap()
        .trim()
        .to_string();
    let tag = String::from_utf8(env.read("tag"))
        .unwrap()
        .trim()
        .to_string();
    assert!(out.contains(&tag), "{out}");
    assert!(!out.contains(&key), "the key is printed: {out}");
    (key, tag)
}

/// The entries of the fspf inside a protected layout (path -> JSON entry).
fn listed(env: &Env, oci: &Oci, key: &str, tag: &str) -> std::collections::BTreeMap<String, Value> {
    let top = oci.layer(oci.layer_count() - 1);
    let mut ar = tar::Archive::new(&top[..]);
    let dir = env.mkdir("fspf-out");
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        if let Some(rel) = name.strip_prefix(".fspf/") {
            if rel.starts_with("fspf.pb") && e.header().entry_type() == tar::EntryType::Regular {
                let p = dir.join(rel);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                e.unpack(&p).unwrap();
            }
        }
    }
    env.write("show-key", key);
    let out = env.run_env(
        [
            "show",
            "fspf-out/fspf.pb",
            "--key-file",
            "show-key",
            "--json",
        ],
        &[("SCONE_FSPF_TAG", tag)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap().to_string(), f.clone()))
        .collect()
}

/// The bytes of member `name` of the tar `layer` (empty when it has none).
fn member_bytes(layer: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in tar::Archive::new(layer).entries().unwrap() {
        let mut e = e.unwrap();
        if &*e.path_bytes() == name {
            out.clear();
            e.read_to_end(&mut out).unwrap();
        }
    }
    out
}

fn verify(env: &Env, image: &str) -> std::process::Output {
    env.run([
        "image",
        "verify",
        image,
        "--key-file",
        "key",
        "--tag-file",
        "tag",
    ])
}

#[test]
fn image_protect_lists_what_the_container_sees_whiteouts_opaque_dirs_replaced_files_hard_links() {
    let env = Env::new();
    two_layer_image(&env.path("src"));
    let (key, tag) = protect(&env, "src", &["--encrypt", "/app"]);
    let out = verify(&env, "out.tar");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("OK: "), "{}", stdout(&out));
    let oci = Oci::unpack(&env.path("out.tar"), &env.path("unpacked"));
    let files = listed(&env, &oci, &key, &tag);
    for p in [
        "/etc/a",
        "/opt/z",
        "/app/secret.txt",
        "/app/keep.txt",
        "/lib/hard",
        "/lib/link",
        "/app/h1",
        "/app/h2",
        "/bin",
        "/usr",
        "/usr/lib",
        "/usr/lib/plain",
    ] {
        assert!(files.contains_key(p), "{p} not listed: {:?}", files.keys());
    }
    for p in [
        "/etc/gone",
        "/opt/x",
        "/opt/x/y",
        "/.fspf",
        "/.fspf/fspf.pb",
    ] {
        assert!(!files.contains_key(p), "{p} listed");
    }
    assert_eq!(files["/etc/a"]["size"], 2);
    assert_eq!(files["/app/secret.txt"]["size"], 21);
    // A hard link of an encrypted region is one (kind 5), nothing stored at its name (a
    // whiteout instead of the member); in an authenticated region, whose layer keeps its bytes,
    // it stays an entry sharing the file's content.
    assert_eq!(files["/app/h2"]["kind"], "link", "{:?}", files["/app/h2"]);
    assert_eq!(files["/app/h2"]["target"], "/app/h1");
    assert_eq!(files["/app/h1"]["kind"], "file");
    assert_eq!(files["/lib/link"]["kind"], "file");
    let members = |i: usize| -> Vec<String> {
        let l = oci.layer(i);
        tar::Archive::new(&l[..])
            .entries()
            .unwrap()
            .map(|e| String::from_utf8_lossy(&e.unwrap().path_bytes()).into_owned())
            .collect()
    };
    let l1 = members(1);
    assert!(l1.iter().any(|n| n == "app/.wh.h2"), "{l1:?}");
    assert!(!l1.iter().any(|n| n == "app/h2"), "{l1:?}");
    assert!(l1.iter().any(|n| n == "lib/link"), "{l1:?}");
    // The wrapped entrypoint runs the image's own command under the shield.
    let cfg = oci.config();
    let ep: Vec<String> = serde_json::from_value(cfg["config"]["Entrypoint"].clone()).unwrap();
    // Through the C library and loader bundled in /.fspf/lib, so that it starts in any image.
    assert_eq!(
        ep[..3],
        [
            "/.fspf/lib/ld-linux-x86-64.so.2",
            "--library-path",
            "/.fspf/lib"
        ]
    );
    assert_eq!(
        ep[3..],
        ["/.fspf/bin/fspf", "image", "exec", "--tag", &tag, "--"]
    );
    assert_eq!(cfg["config"]["Cmd"], json!(["/bin/true"]));
    // Both source layers hold /app files: both are rewritten; no plaintext of /app anywhere.
    for i in 0..oci.layer_count() {
        let l = oci.layer(i);
        assert!(
            !l.windows(9).any(|w| w == b"TOPSECRET"),
            "layer {i} holds plaintext of /app"
        );
    }
}

#[test]
fn image_verify_detects_every_tampering_even_with_all_digests_fixed() {
    let env = Env::new();
    two_layer_image(&env.path("src"));
    protect(&env, "src", &["--encrypt", "/app"]);
    let fresh = |name: &str| Oci::unpack(&env.path("out.tar"), &env.path(name));
    type Attack = (&'static str, &'static str, Box<dyn Fn(&Oci)>);
    let attacks: Vec<Attack> = vec![
        (
            "a changed byte of an authenticated file",
            "/etc/a",
            Box::new(|o: &Oci| {
                o.edit_layer(1, |n, c| {
                    Some(if n == "etc/a" { b"a2".to_vec() } else { c })
                })
            }),
        ),
        (
            "an authenticated file removed (the lower copy shows)",
            "/etc/a",
            Box::new(|o: &Oci| o.edit_layer(1, |n, c| (n != "etc/a").then_some(c))),
        ),
        (
            "a file listed in the fspf removed from every layer",
            "/lib/hard",
            Box::new(|o: &Oci| {
                o.edit_layer(1, |n, c| (n != "lib/hard" && n != "lib/link").then_some(c));
            }),
        ),
        (
            "two encrypted files swapped",
            "/app/keep.txt",
            Box::new(|o: &Oci| {
                let old_secret = member_bytes(&o.layer(0), b"app/secret.txt");
                o.edit_layer(0, |n, c| {
                    Some(if n == "app/keep.txt" {
                        old_secret.clone()
                    } else {
                        c
                    })
                })
            }),
        ),
        (
            "plaintext of an encrypted path put back into a lower layer",
            "/app/secret.txt",
            Box::new(|o: &Oci| {
                o.edit_layer(0, |n, c| {
                    Some(if n == "app/secret.txt" {
                        b"TOPSECRET-OLD version".to_vec()
                    } else {
                        c
                    })
                })
            }),
        ),
        (
            "an unlisted plaintext file added to an encrypted region",
            "/app/added",
            Box::new(|o: &Oci| {
                o.insert_layer(
                    2,
                    &Layer::default()
                        .file("app/added", b"not ciphertext")
                        .bytes(),
                )
            }),
        ),
        (
            "a file planted at a hard link's name (fspf ciphertext of the file it links)",
            "/app/h2",
            Box::new(|o: &Oci| {
                let h1 = member_bytes(&o.layer(1), b"app/h1");
                o.insert_layer(2, &Layer::default().file("app/h2", &h1).bytes())
            }),
        ),
        (
            "a file changed in a layer added on top",
            "/etc/a",
            Box::new(|o: &Oci| o.insert_layer(2, &Layer::default().file("etc/a", b"evil").bytes())),
        ),
        (
            "an older fspf.pb",
            "fspf",
            Box::new(|o: &Oci| {
                let n = o.layer_count() - 1;
                o.edit_layer(n, |name, mut c| {
                    if name == ".fspf/fspf.pb" {
                        let k = c.len() / 2;
                        c[k] ^= 1;
                    }
                    Some(c)
                })
            }),
        ),
    ];
    for (i, (what, path, attack)) in attacks.iter().enumerate() {
        let o = fresh(&format!("attack{i}"));
        attack(&o);
        let out = verify(&env, &format!("attack{i}"));
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert!(!out.status.success(), "{what}: not detected:\n{text}");
        assert!(
            text.contains(path),
            "{what}: the report does not name {path}:\n{text}"
        );
    }
    // The untouched copy still verifies (the attacks, not the unpacking, were detected).
    fresh("untouched");
    let out = verify(&env, "untouched");
    assert!(out.status.success(), "{}", stdout(&out));
}

#[test]
fn image_protect_refuses_members_that_would_escape_the_root() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "..",
            Layer::default()
                .raw(b"../evil", tar::EntryType::Regular, b"x", b"", 0o644)
                .bytes(),
        ),
        (
            "absolute",
            Layer::default()
                .raw(b"/etc/evil", tar::EntryType::Regular, b"x", b"", 0o644)
                .bytes(),
        ),
        (
            "hard link",
            Layer::default()
                .raw(b"a", tar::EntryType::Link, b"", b"../../etc/shadow", 0o644)
                .bytes(),
        ),
        (
            "symlink",
            Layer::default()
                .symlink("usr/x", "../../../etc/shadow")
                .bytes(),
        ),
    ];
    for (what, layer) in cases {
        let env = Env::new();
        Oci::write(&env.path("src"), &[(layer, false)], json!({}));
        let out = env.run(["image", "protect", "src", "out.tar", "--key-file", "key"]);
        assert!(!out.status.success(), "{what}: accepted");
        assert!(
            stderr(&out).contains("escape the image root"),
            "{what}: {}",
            stderr(&out)
        );
        assert!(
            !env.path("out.tar").exists() && !env.path("key").exists(),
            "{what}: output written"
        );
        let leftovers: Vec<_> = fs::read_dir(env.root())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with(".fspf-image"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "{what}: temporaries left: {leftovers:?}"
        );
    }
}

#[test]
fn image_protect_refuses_a_source_layer_whose_digest_does_not_match() {
    let env = Env::new();
    let o = Oci::write(
        &env.path("src"),
        &[(Layer::default().file("etc/a", b"abc").bytes(), false)],
        json!({}),
    );
    let d = o.manifest()["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let p = env.path("src/blobs/sha256").join(&d[7..]);
    let mut b = fs::read(&p).unwrap();
    let i = b.windows(3).position(|w| w == b"abc").unwrap();
    b[i] = b'x';
    fs::write(&p, b).unwrap();
    let out = env.run(["image", "protect", "src", "out.tar", "--key-file", "key"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("digest mismatch"), "{}", stderr(&out));
    assert!(!env.path("out.tar").exists());
}

#[test]
fn image_protect_reads_docker_save_archives() {
    let env = Env::new();
    let layer = Layer::default()
        .dir("app/")
        .file("app/data.txt", b"TOPSECRET docker")
        .file("etc/os", b"x")
        .bytes();
    let diff = sha256(&layer);
    let cfg = json!({"architecture": "amd64", "os": "linux", "config": {"Entrypoint": ["/app/run"], "Cmd": ["--flag"]},
        "rootfs": {"type": "layers", "diff_ids": [diff]}});
    let cfg_b = serde_json::to_vec(&cfg).unwrap();
    let cfg_name = format!("{}.json", &sha256(&cfg_b)[7..]);
    let manifest = json!([{"Config": cfg_name, "RepoTags": ["localhost/dock:2"], "Layers": ["abc/layer.tar"]}]);
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data).unwrap();
    };
    add(&cfg_name, &cfg_b);
    add(&format!("{}.tar", &diff[7..]), &layer);
    add("manifest.json", manifest.to_string().as_bytes());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "abc/layer.tar", format!("../{}.tar", &diff[7..]))
        .unwrap();
    fs::write(env.path("docker.tar"), b.into_inner().unwrap()).unwrap();
    let (_, tag) = protect(&env, "docker.tar", &["--encrypt", "/app"]);
    assert!(verify(&env, "out.tar").status.success());
    let oci = Oci::unpack(&env.path("out.tar"), &env.path("u"));
    let ep = oci.config()["config"]["Entrypoint"].as_array().unwrap()[3..].to_vec();
    assert_eq!(
        json!(ep),
        json!([
            "/.fspf/bin/fspf",
            "image",
            "exec",
            "--tag",
            tag,
            "--",
            "/app/run"
        ])
    );
    assert_eq!(oci.config()["config"]["Cmd"], json!(["--flag"]));
    let idx = fs::read_to_string(env.path("u/index.json")).unwrap();
    assert!(idx.contains("localhost/dock:2-fspf"), "{idx}");
    assert!(!oci.layer(0).windows(9).any(|w| w == b"TOPSECRET"));
}

#[test]
fn image_rewritten_layers_keep_long_names_and_pax_xattrs() {
    let env = Env::new();
    let long = format!("app/{}/file.txt", "d".repeat(120));
    let cap: &[u8] = b"\x01\x00\x00\x02\x00\x20\x00\x00";
    let layer = Layer::default()
        .long(&long, b"TOPSECRET long", &[])
        .long(
            "usr/bin/ping",
            b"binary",
            &[("SCHILY.xattr.security.capability", cap)],
        )
        .bytes();
    Oci::write(&env.path("src"), &[(layer, false)], json!({}));
    protect(&env, "src", &["--encrypt", "/app"]);
    assert!(verify(&env, "out.tar").status.success());
    let oci = Oci::unpack(&env.path("out.tar"), &env.path("u"));
    let l0 = oci.layer(0);
    let mut ar = tar::Archive::new(&l0[..]);
    let (mut saw_long, mut saw_cap) = (false, false);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        saw_long |= name == long;
        if name == "usr/bin/ping" {
            let x = e.pax_extensions().unwrap().expect("pax records");
            let all: Vec<(String, Vec<u8>)> = x
                .map(|r| r.unwrap())
                .map(|r| (r.key().unwrap().to_string(), r.value_bytes().to_vec()))
                .collect();
            saw_cap = all
                .iter()
                .any(|(k, v)| k == "SCHILY.xattr.security.capability" && v == cap);
        }
    }
    assert!(saw_long, "the long name was lost");
    assert!(saw_cap, "the file capability (pax xattr) was lost");
}

#[test]
fn image_exec_without_the_key_says_how_to_mount_it() {
    let env = Env::new();
    let out = env.run([
        "image",
        "exec",
        "--key-file",
        "/nonexistent/fspf-key",
        "--tag",
        "00",
        "--",
        "true",
    ]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("protected by fspf") && e.contains("/run/secrets/fspf-key:ro"),
        "{e}"
    );
}

#[test]
fn image_protect_needs_a_key_file_and_absolute_region_paths() {
    let env = Env::new();
    Oci::write(
        &env.path("src"),
        &[(Layer::default().file("a", b"x").bytes(), false)],
        json!({}),
    );
    let out = env.run(["image", "protect", "src", "out.tar"]);
    assert!(stderr(&out).contains("--key-file"), "{}", stderr(&out));
    let out = env.run([
        "image",
        "protect",
        "src",
        "out.tar",
        "--key-file",
        "k",
        "--encrypt",
        "app",
    ]);
    assert!(stderr(&out).contains("absolute"), "{}", stderr(&out));
    let out = env.run([
        "image",
        "protect",
        "src",
        "out.tar",
        "--key-file",
        "k",
        "--encrypt",
        "/.fspf/x",
    ]);
    assert!(
        stderr(&out).contains("holds the shield"),
        "{}",
        stderr(&out)
    );
    let out = env.run([
        "image",
        "protect",
        "nonexistent",
        "out.tar",
        "--key-file",
        "k",
    ]);
    assert!(
        !out.status.success() && stderr(&out).contains("nonexistent"),
        "{}",
        stderr(&out)
    );
    assert!(!env.path("out.tar").exists() && !env.path("k").exists());
}

#[test]
fn image_exclude_hides_paths_and_drops_excluded_encrypted_plaintext() {
    let env = Env::new();
    let layer = Layer::default()
        .file("usr/share/doc/README", b"docs")
        .file("usr/bin/tool", b"tool")
        .file("app/cache/TOPSECRET.tmp", b"TOPSECRET cache")
        .file("app/main", b"TOPSECRET main")
        .bytes();
    Oci::write(&env.path("src"), &[(layer, false)], json!({}));
    let (key, tag) = protect(
        &env,
        "src",
        &[
            "--encrypt",
            "/app",
            "--exclude",
            "/usr/share/doc",
            "--exclude",
            "/app/cache/*.tmp",
        ],
    );
    let out = verify(&env, "out.tar");
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("1 visible members not listed"),
        "{}",
        stdout(&out)
    );
    let oci = Oci::unpack(&env.path("out.tar"), &env.path("u"));
    let files = listed(&env, &oci, &key, &tag);
    assert!(files.contains_key("/usr/bin/tool") && files.contains_key("/app/main"));
    assert!(
        !files.contains_key("/usr/share/doc/README")
            && !files.contains_key("/app/cache/TOPSECRET.tmp")
    );
    assert!(!oci.layer(0).windows(9).any(|w| w == b"TOPSECRET"));
}

#[test]
fn image_protect_warns_about_paths_and_patterns_that_match_nothing() {
    let env = Env::new();
    let layer = Layer::default()
        .file("app/main", b"x")
        .file("usr/share/doc/a", b"d")
        .bytes();
    Oci::write(&env.path("src"), &[(layer, false)], json!({}));
    let out = env.run([
        "image",
        "protect",
        "src",
        "out.tar",
        "--key-file",
        "key",
        "--encrypt",
        "/app",
        "--encrypt",
        "/aap",
        "--exclude",
        "/usr/share/doc",
        "--exclude",
        "/usr/share/dox/**",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("--encrypt /aap: no file of the image is there"),
        "{e}"
    );
    assert!(e.contains("--exclude /usr/share/dox/**: no file"), "{e}");
    assert!(
        !e.contains("--encrypt /app:") && !e.contains("--exclude /usr/share/doc:"),
        "{e}"
    );
}

//! Protected images run by a real container runtime: Debian's podman with runc. The images are
//! built here from this machine's files (`tests/images/rootfs.sh`, `podman import`), saved as
//! OCI archives, protected by `fspf image protect`, loaded back and run.
//!
//! Two workarounds for this sandbox (documented in docs/IMAGE.md): a `CONTAINERS_CONF` with
//! `[containers] default_ulimits = []`, and `podman --runtime /usr/sbin/runc` (crun refuses the
//! hybrid cgroups here). A missing podman or runc fails the tests; `.ci/run` installs them.
use crate::harness::*;
use crate::image::{Layer, Oci};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const SRC: &str = "localhost/fspf-test-python:src";
const PROTECTED: &str = "localhost/fspf-test-python:protected";
const TAMPERED: &str = "localhost/fspf-test-python:tampered";
const BB_PROTECTED: &str = "localhost/fspf-test-busybox:protected";
const BB_TAMPERED: &str = "localhost/fspf-test-busybox:tampered";

/// The protected python image, built once per test run.
struct Fixture {
    dir: PathBuf,
    tag: String,
}

fn podman(dir: &Path) -> Command {
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", dir.join("containers.conf"))
        .arg("--runtime")
        .arg("/usr/sbin/runc");
    c
}

fn run_ok(c: &mut Command, what: &str) -> Output {
    let o = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        o.status.success(),
        "{what} failed:\n{}{}",
        stdout(&o),
        stderr(&o)
    );
    o
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        for (cmd, pkg) in [
            ("podman", "podman"),
            ("/usr/sbin/runc", "runc"),
            ("busybox", "busybox-static"),
        ] {
            crate::fuse::need(cmd, pkg);
        }
        // One fixed directory, emptied first: the images are large, and runs must not pile up.
        let dir = std::env::temp_dir().join("fspf-podman-tests");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("containers.conf"),
            "[containers]\ndefault_ulimits = []\n",
        )
        .unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/images/rootfs.sh");
        run_ok(
            Command::new("bash")
                .arg(&script)
                .arg("python")
                .arg(dir.join("rootfs")),
            "rootfs.sh python",
        );
        run_ok(
            Command::new("tar")
                .arg("-C")
                .arg(dir.join("rootfs"))
                .args(["-cf"])
                .arg(dir.join("rootfs.tar"))
                .arg("."),
            "tar",
        );
        for img in [SRC, PROTECTED, TAMPERED, BB_PROTECTED, BB_TAMPERED] {
            let _ = podman(&dir).args(["rmi", "-f", img]).output();
        }
        run_ok(
            podman(&dir)
                .args([
                    "import",
                    "-q",
                    "-c",
                    r#"CMD ["python3", "/app/app.py"]"#,
                    "-c",
                    "ENV PATH=/usr/bin:/bin",
                ])
                .arg(dir.join("rootfs.tar"))
                .arg(SRC),
            "podman import",
        );
        run_ok(
            podman(&dir)
                .args(["save", "-q", "--format", "oci-archive", "-o"])
                .arg(dir.join("src.tar"))
                .arg(SRC),
            "podman save",
        );
        let o = run_ok(
            Command::new(FSPF).current_dir(&dir).args([
                "image",
                "protect",
                "src.tar",
                "protected.tar",
                "--encrypt",
                "/app",
                "--key-file",
                "key",
                "--tag-file",
                "tag",
                "--name",
                PROTECTED,
            ]),
            "fspf image protect",
        );
        assert!(stdout(&o).contains("Protected image"), "{}", stdout(&o));
        run_ok(
            podman(&dir)
                .args(["load", "-q", "-i"])
                .arg(dir.join("protected.tar")),
            "podman load",
        );
        // The static busybox image: no C library at all.
        run_ok(
            Command::new("bash")
                .arg(&script)
                .arg("busybox")
                .arg(dir.join("bbroot")),
            "rootfs.sh busybox",
        );
        fs::write(dir.join("bbroot/etc/motd"), "busybox says hello\n").unwrap();
        run_ok(
            Command::new("tar")
                .arg("-C")
                .arg(dir.join("bbroot"))
                .args(["-cf"])
                .arg(dir.join("bbroot.tar"))
                .arg("."),
            "tar",
        );
        run_ok(
            podman(&dir)
                .args(["import", "-q", "-c", r#"CMD ["cat", "/etc/motd"]"#])
                .arg(dir.join("bbroot.tar"))
                .arg("localhost/fspf-test-busybox:src"),
            "podman import",
        );
        run_ok(
            podman(&dir)
                .args(["save", "-q", "--format", "oci-archive", "-o"])
                .arg(dir.join("bb-src.tar"))
                .arg("localhost/fspf-test-busybox:src"),
            "podman save",
        );
        run_ok(
            Command::new(FSPF).current_dir(&dir).args([
                "image",
                "protect",
                "bb-src.tar",
                "bb-protected.tar",
                "--key-file",
                "bb-key",
                "--tag-file",
                "bb-tag",
                "--name",
                BB_PROTECTED,
            ]),
            "fspf image protect (busybox)",
        );
        run_ok(
            podman(&dir)
                .args(["load", "-q", "-i"])
                .arg(dir.join("bb-protected.tar")),
            "podman load",
        );
        let tag = fs::read_to_string(dir.join("tag"))
            .unwrap()
            .trim()
            .to_string();
        Fixture { dir, tag }
    })
}

/// `podman run --rm [-v key:/run/secrets/fspf-key:ro] EXTRA… IMAGE ARGS…`.
fn run(f: &Fixture, with_key: bool, extra: &[&str], image: &str, args: &[&str]) -> Output {
    let mut c = podman(&f.dir);
    c.args(["run", "--rm", "--network", "none"]);
    if with_key {
        c.arg("-v").arg(format!(
            "{}:/run/secrets/fspf-key:ro",
            f.dir.join("key").display()
        ));
    }
    c.args(extra).arg(image).args(args);
    c.output().expect("podman run")
}

#[test]
fn podman_protected_python_prints_hello_world_from_encrypted_app_and_refuses_without_key() {
    let f = fixture();
    let o = run(f, true, &[], PROTECTED, &[]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(stdout(&o).trim(), "Hello World", "{}", stderr(&o));
    let o = run(f, false, &[], PROTECTED, &[]);
    assert!(!o.status.success(), "ran without the key: {}", stdout(&o));
    assert!(
        stderr(&o).contains("protected by fspf") && stderr(&o).contains("/run/secrets/fspf-key"),
        "{}",
        stderr(&o)
    );
    // A tag mounted beside the key pins the image: the right one runs, another is refused.
    fs::write(f.dir.join("good-tag"), format!("{}\n", f.tag)).unwrap();
    fs::write(f.dir.join("bad-tag"), "00112233445566778899aabbccddeeff\n").unwrap();
    for (t, ok) in [("good-tag", true), ("bad-tag", false)] {
        let v = format!("{}:/run/secrets/fspf-tag:ro", f.dir.join(t).display());
        let o = run(f, true, &["-v", &v], PROTECTED, &[]);
        assert_eq!(o.status.success(), ok, "{t}: {}{}", stdout(&o), stderr(&o));
    }
}

#[test]
fn podman_stdlib_module_changed_in_a_rebuilt_layer_fails_with_eio() {
    let f = fixture();
    let env = Env::new();
    let oci = Oci::unpack(&f.dir.join("protected.tar"), &env.path("oci"));
    // The attacker rebuilds the image with one more layer (below the shield's), changing
    // json/__init__.py and its cached bytecode, and fixes every digest.
    let lib = fs::read_dir(f.dir.join("rootfs/usr/lib"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.starts_with("python3"))
        .unwrap();
    let src = f.dir.join(format!("rootfs/usr/lib/{lib}/json/__init__.py"));
    let mut py = fs::read(&src).unwrap();
    py.extend_from_slice(b"\nprint('tampered')\n");
    let pyc_dir = f.dir.join(format!("rootfs/usr/lib/{lib}/json/__pycache__"));
    let pyc_name = fs::read_dir(&pyc_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.starts_with("__init__."))
        .unwrap();
    let mut pyc = fs::read(pyc_dir.join(&pyc_name)).unwrap();
    let mid = pyc.len() / 2;
    pyc[mid] ^= 0x40;
    let layer = Layer::default()
        .file(&format!("usr/lib/{lib}/json/__init__.py"), &py)
        .file(&format!("usr/lib/{lib}/json/__pycache__/{pyc_name}"), &pyc)
        .bytes();
    let n = oci.layer_count();
    oci.insert_layer(n - 1, &layer);
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(env.path("oci"))
            .arg("-cf")
            .arg(env.path("tampered.tar"))
            .arg("."),
        "tar",
    );
    // `fspf image verify` finds it offline...
    let o = Command::new(FSPF)
        .args(["image", "verify"])
        .arg(env.path("tampered.tar"))
        .arg("--key-file")
        .arg(f.dir.join("key"))
        .output()
        .unwrap();
    assert!(
        !o.status.success() && stdout(&o).contains("json/__init__"),
        "{}",
        stdout(&o)
    );
    // ...and the shield at run time: the import fails with EIO, it never runs the changed code.
    let _ = podman(&f.dir).args(["rmi", "-f", TAMPERED]).output();
    let o = run_ok(
        podman(&f.dir)
            .args(["load", "-q", "-i"])
            .arg(env.path("tampered.tar")),
        "podman load",
    );
    let id = stdout(&o).split_whitespace().last().unwrap().to_string();
    run_ok(podman(&f.dir).args(["tag", &id, TAMPERED]), "podman tag");
    let o = run(
        f,
        true,
        &[],
        TAMPERED,
        &["python3", "-c", "import json; print('imported')"],
    );
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        !o.status.success(),
        "the changed module was imported: {all}"
    );
    assert!(
        !all.contains("tampered") && !all.contains("imported"),
        "{all}"
    );
    assert!(
        all.contains("Input/output error") || all.contains("Errno 5"),
        "{all}"
    );
    // The untouched image still runs.
    let o = run(
        f,
        true,
        &[],
        PROTECTED,
        &["python3", "-c", "import json; print('imported')"],
    );
    assert_eq!(stdout(&o).trim(), "imported", "{}", stderr(&o));
}

#[test]
fn podman_files_added_at_run_time_outside_the_mutable_regions_are_refused() {
    let f = fixture();
    let o = run(
        f,
        true,
        &[],
        PROTECTED,
        &["python3", "-c", "open('/new.txt', 'w').write('x')"],
    );
    assert!(
        !o.status.success() && stderr(&o).contains("Read-only file system"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    // A file put into the image's tree at run time (a bind mount) is not in the fspf.
    fs::write(f.dir.join("evil.py"), "print('evil')\n").unwrap();
    let v = format!("{}:/app/evil.py:ro", f.dir.join("evil.py").display());
    let o = run(
        f,
        true,
        &["-v", &v],
        PROTECTED,
        &["python3", "/app/evil.py"],
    );
    assert!(
        !o.status.success() && !stdout(&o).contains("evil"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    assert!(stderr(&o).contains("No such file"), "{}", stderr(&o));
    // /tmp is not protected: scratch files work.
    let o = run(
        f,
        true,
        &[],
        PROTECTED,
        &[
            "python3",
            "-c",
            "open('/tmp/t', 'w').write('ok'); print(open('/tmp/t').read())",
        ],
    );
    assert_eq!(stdout(&o).trim(), "ok", "{}", stderr(&o));
}

#[test]
fn podman_without_the_shield_the_container_sees_only_ciphertext_under_app() {
    let f = fixture();
    let o = run(
        f,
        false,
        &["--entrypoint", "sh"],
        PROTECTED,
        &["-c", "cat /app/data.txt /app/app.py"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("fspfE"), "not fspf ciphertext: {out:?}");
    assert!(
        !out.contains("Hello") && !out.contains("print"),
        "plaintext visible: {out:?}"
    );
    // Authenticated files stay readable plaintext (integrity, not confidentiality).
    let o = run(
        f,
        false,
        &["--entrypoint", "sh"],
        PROTECTED,
        &["-c", "cat /etc/passwd"],
    );
    assert!(stdout(&o).starts_with("root:"), "{}", stdout(&o));
}

#[test]
fn podman_fspf_image_verify_accepts_the_protected_archive() {
    let f = fixture();
    let o = Command::new(FSPF)
        .current_dir(&f.dir)
        .args([
            "image",
            "verify",
            "protected.tar",
            "--key-file",
            "key",
            "--tag-file",
            "tag",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("OK: "), "{}", stdout(&o));
}

/// Load `oci` (an unpacked layout) as `name`.
fn load_as(f: &Fixture, env: &Env, oci: &str, name: &str) {
    let tar = env.path(format!("{oci}.tar"));
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(env.path(oci))
            .arg("-cf")
            .arg(&tar)
            .arg("."),
        "tar",
    );
    let _ = podman(&f.dir).args(["rmi", "-f", name]).output();
    let o = run_ok(
        podman(&f.dir).args(["load", "-q", "-i"]).arg(&tar),
        "podman load",
    );
    let id = stdout(&o).split_whitespace().last().unwrap().to_string();
    run_ok(podman(&f.dir).args(["tag", &id, name]), "podman tag");
}

#[test]
fn podman_static_busybox_runs_under_the_fuse_shield_inside_the_container() {
    let f = fixture();
    let fuse = ["--device", "/dev/fuse", "--cap-add", "SYS_ADMIN"];
    // Without /dev/fuse the static program is refused, with a hint, rather than run unshielded.
    let o = run_bb(f, &[], BB_PROTECTED, &[]);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(stderr(&o).contains("--device /dev/fuse"), "{}", stderr(&o));
    let o = run_bb(f, &fuse, BB_PROTECTED, &[]);
    assert_eq!(stdout(&o).trim(), "busybox says hello", "{}", stderr(&o));
    // Nothing outside the fspf can be added; /tmp (not protected) works.
    let o = run_bb(
        f,
        &fuse,
        BB_PROTECTED,
        &["sh", "-c", "echo x > /new; echo t > /tmp/t && cat /tmp/t"],
    );
    assert!(
        stderr(&o).contains("Read-only file system"),
        "{}",
        stderr(&o)
    );
    assert_eq!(stdout(&o).trim(), "t", "{}", stderr(&o));
    // A changed file in a rebuilt layer: EIO, not its content.
    let env = Env::new();
    let oci = Oci::unpack(&f.dir.join("bb-protected.tar"), &env.path("oci"));
    let n = oci.layer_count();
    oci.insert_layer(
        n - 1,
        &Layer::default()
            .file("etc/motd", b"busybox says EVIL\n")
            .bytes(),
    );
    load_as(f, &env, "oci", BB_TAMPERED);
    let o = run_bb(f, &fuse, BB_TAMPERED, &[]);
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(!o.status.success() && !all.contains("EVIL"), "{all}");
    assert!(
        all.contains("I/O error") || all.contains("Input/output error"),
        "{all}"
    );
}

fn run_bb(f: &Fixture, extra: &[&str], image: &str, args: &[&str]) -> Output {
    let mut c = podman(&f.dir);
    c.args(["run", "--rm", "--network", "none"])
        .arg("-v")
        .arg(format!(
            "{}:/run/secrets/fspf-key:ro",
            f.dir.join("bb-key").display()
        ))
        .args(extra)
        .arg(image)
        .args(args);
    c.output().expect("podman run")
}

//! Adversary matrix: every attack of docs/THREAT-MODEL.md against every way a program reaches a
//! protected file, for every region class. One test; it prints exactly one summary line
//! `attacks: N tried, N detected, N silent` (stderr; visible with `--nocapture`) and fails listing
//! every silent (class | access path | attack) triple. `FSPF_MATRIX_VERBOSE=1` prints every
//! triple with its exit status and verdict.
//! `cargo test -p fspf --test integration matrix -- --nocapture`
//!
//! **Classes** (region `/r`, kernel dir `k/`, `/` not-protected): encrypted and authenticated,
//! each with 512-byte chunks (`addr -c 512`, the minimum) and with the default chunk length
//! (4096 encrypted, 65536 authenticated); the four run in parallel threads. Every file of the
//! region is a shell script that prints a heredoc, so the same file is data for the read paths
//! and a program for the exec path: `a.sh` and its twin `b.sh` (3½ chunks), `c.sh` (exactly 2
//! chunks), `e.sh` (300 bytes, under one chunk), `sub/d.sh` (1½ chunks) and `empty` (0 bytes).
//! `a.sh` is a second version: the state before its update is kept for the rollback attacks.
//!
//! **Access paths**: the CLI (`fspf cat`, `fspf verify`, `fspf export` of the whole region), and
//! programs under the shield (`fspf run -- …`): `cat FILE` (open/read), `cat FILE` under plain
//! `LD_PRELOAD` + `SCONE_FSPF_*` (the shield's own key/tag checks, not `fspf run`'s), a C program
//! that `mmap`s the file, stdin redirection (`sh -c 'wc -c < FILE'`, `sh -c 'cat < FILE'`), an
//! inherited fd (`sh -c 'exec 3<FILE; cat <&3'` and the same with fd 7, python
//! `subprocess.run(['cat'], stdin=open(F))`) and exec of the script itself (`sh -c FILE`). The
//! paths of one attack run concurrently, with one deadline.
//!
//! **Attacks**: bit flips, chunk swaps within and across files, whole-file swaps, truncation and
//! extension at and off chunk boundaries, an older valid version of a file, an older `fspf.pb`
//! under the current tag (alone, and with the whole older tree), deleted listed files and
//! directories, unlisted files, a renamed directory, a directory or a file replaced by a symlink
//! to a valid copy outside the region, a FIFO in place of a file / the outboard tree / `fspf.pb`,
//! a wrong key and a wrong tag. For authenticated regions also flips, truncation, extension,
//! deletion and swaps of the Merkle outboards.
//!
//! **Verdict.** An attack is DETECTED on a path when the access fails and shows no wrong data:
//! * the process ends by itself within 10 s (a hang is killed with its process group: SILENT),
//! * with a non-zero status (exit 0 is SILENT, even with the true bytes: the disk was not what the
//!   fspf vouches for, and the program was told it was), and
//! * its output holds no wrong byte: `fspf cat` prints nothing at all; `fspf export` leaves only
//!   listed files whose content is exactly the true content (a file it could not verify must
//!   not appear, not even partially); `wc -c` prints nothing or the true count; every other
//!   shield path may print at most a prefix of what it prints on the intact tree (a reader that
//!   fails at chunk k may already have written the verified chunks before k). `fspf verify`'s
//!   output is a report and is not judged.
//!
//! One exception, stated where it applies: when an attack only adds unlisted files, `fspf
//! export` (which reads the listing, not the directory) may succeed, but must not export them.
//! Detections by a crash (exit 101, a signal) count as detected and are listed in a note.
//!
//! **Coverage.** Every file (both twins, the small, the exact and the nested one; the encrypted
//! empty file's 40 bytes all) gets ≥ 50 bit flips spread over header, first and last chunk and
//! every chunk boundary, each through `fspf cat` and `fspf verify` only; seven representative
//! flips of `a.sh` (header/first byte, file id or last byte of chunk 0, both sides of a chunk
//! boundary, a tag or the last chunk, the last byte) go through every path. Likewise every node
//! of the outboards of `a.sh`, `c.sh` and `sub/d.sh` is flipped through cat/verify, a leaf and an
//! inner node of `a.sh`'s through every path. All other attacks go through every path.
//! Impossible combinations are skipped where they arise, with a comment (the authenticated empty
//! file has no byte to flip; chunks of unequal length are not swapped).
//! Before the attacks and after them, every path must read every file of the intact tree
//! exactly: a path that always fails would otherwise "detect" everything. A path that fails on
//! the intact tree is not used for the attacks of that class (counted as "not tried") and fails
//! the test.
use crate::harness::{last_word, pattern, Env, KeyTag, HDR, TAG};
use crate::shielded::{
    cc, fspf_run, need, preload, real_python, start, Anchor, Ended, Finished, Running,
};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protection {
    Encrypted,
    Authenticated,
}

/// A region class: protection and chunk length (`None`: the `addr` default).
#[derive(Clone, Copy, Debug)]
struct Class {
    protection: Protection,
    chunk_arg: Option<u32>,
}

const CLASSES: [Class; 4] = [
    Class {
        protection: Protection::Encrypted,
        chunk_arg: Some(512),
    },
    Class {
        protection: Protection::Encrypted,
        chunk_arg: None,
    },
    Class {
        protection: Protection::Authenticated,
        chunk_arg: Some(512),
    },
    Class {
        protection: Protection::Authenticated,
        chunk_arg: None,
    },
];

impl Class {
    fn chunk(&self) -> usize {
        match (self.chunk_arg, self.protection) {
            (Some(c), _) => c as usize,
            (None, Protection::Encrypted) => 4096,
            (None, Protection::Authenticated) => 65536,
        }
    }

    fn name(&self) -> String {
        let p = match self.protection {
            Protection::Encrypted => "encrypted",
            Protection::Authenticated => "authenticated",
        };
        match self.chunk_arg {
            Some(c) => format!("{p}/c{c}"),
            None => format!("{p}/default-c{}", self.chunk()),
        }
    }

    fn encrypted(&self) -> bool {
        self.protection == Protection::Encrypted
    }

    /// Length on disk of a file of `size` plaintext bytes.
    fn disk_len(&self, size: usize) -> usize {
        if self.encrypted() {
            HDR + size + size.div_ceil(self.chunk()).max(1) * TAG
        } else {
            size
        }
    }

    /// Offset and length on disk of chunk `i` of a file of `size` bytes (tag included).
    fn chunk_span(&self, size: usize, i: usize) -> (usize, usize) {
        let c = self.chunk();
        let n = size.div_ceil(c).max(1);
        let body = if i + 1 == n { size - i * c } else { c };
        if self.encrypted() {
            (HDR + i * (c + TAG), body + TAG)
        } else {
            (i * c, body)
        }
    }
}

/// The files of region `/r` for chunk length `c`: (path below `/r`, size, pattern seed).
fn file_set(c: usize) -> Vec<(&'static str, usize, u8)> {
    vec![
        ("a.sh", 3 * c + c / 2, 1),
        ("b.sh", 3 * c + c / 2, 2),
        ("c.sh", 2 * c, 3),
        ("e.sh", 300, 4),
        ("sub/d.sh", c + c / 2, 5),
        ("empty", 0, 6),
    ]
}

const SCRIPT_HEAD: &[u8] = b"#!/bin/sh\ncat <<'EOF'\n";
const SCRIPT_TAIL: &[u8] = b"\nEOF\n";

/// A shell script of exactly `size` bytes printing a heredoc of lower-case letters and digits
/// (so no line can be `EOF`), different for every seed.
fn script(size: usize, seed: u8) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    let body_len = size - SCRIPT_HEAD.len() - SCRIPT_TAIL.len();
    let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let raw = pattern(body_len, seed);
    let body = raw.iter().enumerate().map(|(i, b)| {
        if i % 64 == 63 {
            b'\n'
        } else {
            alphabet[*b as usize % alphabet.len()]
        }
    });
    SCRIPT_HEAD
        .iter()
        .copied()
        .chain(body)
        .chain(SCRIPT_TAIL.iter().copied())
        .collect()
}

/// What executing [`script`] prints: the heredoc body and its newline.
fn script_output(content: &[u8]) -> Vec<u8> {
    if content.is_empty() {
        return Vec::new();
    }
    content[SCRIPT_HEAD.len()..content.len() - SCRIPT_TAIL.len() + 1].to_vec()
}

const MMAP_C: &str = r#"
#include <stdio.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) { perror("open"); return 1; }
    struct stat st;
    if (fstat(fd, &st) != 0) { perror("fstat"); return 1; }
    if (st.st_size == 0) return 0;
    const char *p = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) { perror("mmap"); return 1; }
    size_t off = 0;
    while (off < (size_t)st.st_size) {
        ssize_t n = write(1, p + off, st.st_size - off);
        if (n <= 0) { perror("write"); return 1; }
        off += n;
    }
    return 0;
}
"#;

fn mmap_prog() -> &'static Path {
    static P: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    P.get_or_init(|| cc("fspf-matrix-mmap", MMAP_C))
}

const FD_PY: &str = "import subprocess, sys\nwith open(sys.argv[1], 'rb') as f:\n    subprocess.run(['cat'], stdin=f, check=True)\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    CliCat,
    CliVerify,
    CliExport,
    ShieldCat,
    PreloadEnvCat,
    ShieldMmap,
    StdinWc,
    StdinCat,
    InheritedFd3Sh,
    InheritedFd7Sh,
    InheritedFdPython,
    Exec,
}

const EVERY_PATH: [Access; 12] = [
    Access::CliCat,
    Access::CliVerify,
    Access::CliExport,
    Access::ShieldCat,
    Access::PreloadEnvCat,
    Access::ShieldMmap,
    Access::StdinWc,
    Access::StdinCat,
    Access::InheritedFd3Sh,
    Access::InheritedFd7Sh,
    Access::InheritedFdPython,
    Access::Exec,
];

const CLI_CAT_VERIFY: [Access; 2] = [Access::CliCat, Access::CliVerify];

impl Access {
    fn name(self) -> &'static str {
        match self {
            Access::CliCat => "fspf cat",
            Access::CliVerify => "fspf verify",
            Access::CliExport => "fspf export",
            Access::ShieldCat => "run: cat FILE (open/read)",
            Access::PreloadEnvCat => "LD_PRELOAD+SCONE_FSPF_*: cat FILE",
            Access::ShieldMmap => "run: mmap",
            Access::StdinWc => "run: sh -c 'wc -c < FILE'",
            Access::StdinCat => "run: sh -c 'cat < FILE'",
            Access::InheritedFd3Sh => "run: sh -c 'exec 3<FILE; cat <&3'",
            Access::InheritedFd7Sh => "run: sh -c 'exec 7<FILE; cat <&7'",
            Access::InheritedFdPython => "run: python subprocess(cat, stdin=open(F))",
            Access::Exec => "run: exec FILE",
        }
    }

    /// Whether the path reads one file (the attack's target) rather than the whole region.
    fn per_file(self) -> bool {
        !matches!(self, Access::CliVerify | Access::CliExport)
    }

    fn command(self, w: &World, target: &str, anchor: &Anchor, outdir: &Path) -> Command {
        let embed = format!("/r/{target}");
        let cli = |args: &[&str]| {
            let mut c = Command::new(crate::harness::FSPF);
            c.current_dir(w.env.root())
                .env_remove("SCONE_FSPF_KEY")
                .env_remove("SCONE_FSPF_TAG")
                .env_remove("SCONE_FSPF")
                .args(args)
                .args(["--key", &anchor.key, "--tag", &anchor.tag])
                .stdin(Stdio::null());
            c
        };
        let fspf = w.env.fspf_path();
        let run = |argv: &[&str]| fspf_run(w.env.root(), &fspf, anchor, false, None, argv);
        let out = outdir.to_str().expect("utf-8 temp path");
        match self {
            Access::CliCat => cli(&["cat", "fspf.pb", &embed]),
            Access::CliVerify => cli(&["verify", "fspf.pb"]),
            Access::CliExport => cli(&["export", "fspf.pb", "/r", out]),
            Access::ShieldCat => run(&["cat", &embed]),
            Access::PreloadEnvCat => {
                let mut c = Command::new("cat");
                c.arg(&embed)
                    .current_dir(w.env.root())
                    .env("LD_PRELOAD", preload())
                    .env("LC_ALL", "C")
                    .env("SCONE_FSPF", &fspf)
                    .env("SCONE_FSPF_KEY", &anchor.key)
                    .env("SCONE_FSPF_TAG", &anchor.tag)
                    .env_remove("SCONE_FSPF_MUTABLE")
                    .env_remove("FSPF_ANCHOR_FD")
                    .env_remove("FSPF_KEY_FD")
                    .stdin(Stdio::null());
                c
            }
            Access::ShieldMmap => run(&[mmap_prog().to_str().expect("utf-8"), &embed]),
            Access::StdinWc => run(&["sh", "-c", &format!("wc -c < {embed}")]),
            Access::StdinCat => run(&["sh", "-c", &format!("cat < {embed}")]),
            Access::InheritedFd3Sh => run(&["sh", "-c", &format!("exec 3< {embed}; cat <&3")]),
            Access::InheritedFd7Sh => run(&["sh", "-c", &format!("exec 7< {embed}; cat <&7")]),
            Access::InheritedFdPython => {
                run(&[real_python().to_str().expect("utf-8"), "-c", FD_PY, &embed])
            }
            Access::Exec => run(&["sh", "-c", &embed]),
        }
    }

    /// What a per-file path prints for a file with this true content.
    fn output_for(self, content: &[u8]) -> Vec<u8> {
        match self {
            Access::StdinWc => format!("{}\n", content.len()).into_bytes(),
            Access::Exec => script_output(content),
            _ => content.to_vec(),
        }
    }
}

/// One entry of a directory tree, as saved by [`Snapshot`].
#[derive(Clone)]
enum Node {
    Dir(u32),
    File(Vec<u8>, u32),
    Symlink(PathBuf),
}

/// Everything an attack may touch: `fspf.pb`, the kernel dir `k/` and the outboards.
#[derive(Clone, Default)]
struct Snapshot {
    /// (path relative to the test dir, entry), parents before children.
    entries: Vec<(String, Node)>,
}

const SNAPSHOT_ROOTS: [&str; 3] = ["fspf.pb", "k", "fspf.pb.trees"];

impl Snapshot {
    fn take(root: &Path) -> Snapshot {
        fn walk(root: &Path, rel: &str, out: &mut Vec<(String, Node)>) {
            let p = root.join(rel);
            let Ok(m) = fs::symlink_metadata(&p) else {
                return;
            };
            let mode = m.permissions().mode() & 0o7777;
            if m.file_type().is_symlink() {
                out.push((
                    rel.into(),
                    Node::Symlink(fs::read_link(&p).expect("readlink")),
                ));
            } else if m.is_dir() {
                out.push((rel.into(), Node::Dir(mode)));
                let mut names: Vec<String> = fs::read_dir(&p)
                    .expect("read_dir")
                    .map(|e| e.expect("dirent").file_name().into_string().expect("utf-8"))
                    .collect();
                names.sort();
                for n in names {
                    walk(root, &format!("{rel}/{n}"), out);
                }
            } else {
                out.push((rel.into(), Node::File(fs::read(&p).expect("read"), mode)));
            }
        }
        let mut entries = Vec::new();
        for r in SNAPSHOT_ROOTS {
            walk(root, r, &mut entries);
        }
        Snapshot { entries }
    }

    fn get(&self, rel: &str) -> &Node {
        &self
            .entries
            .iter()
            .find(|(r, _)| r == rel)
            .unwrap_or_else(|| panic!("{rel} not in snapshot"))
            .1
    }

    fn bytes(&self, rel: &str) -> Vec<u8> {
        match self.get(rel) {
            Node::File(b, _) => b.clone(),
            _ => panic!("{rel} is not a file in the snapshot"),
        }
    }

    /// Put `rel` (and everything below it) back as saved; whatever is there now goes first.
    fn restore(&self, root: &Path, rel: &str) {
        remove_any(&root.join(rel));
        let below = format!("{rel}/");
        for (r, node) in &self.entries {
            if r != rel && !r.starts_with(&below) {
                continue;
            }
            let p = root.join(r);
            match node {
                Node::Dir(mode) => {
                    fs::create_dir_all(&p).expect("mkdir");
                    fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).expect("chmod");
                }
                Node::File(b, mode) => {
                    fs::write(&p, b).expect("write");
                    fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).expect("chmod");
                }
                Node::Symlink(t) => std::os::unix::fs::symlink(t, &p).expect("symlink"),
            }
        }
    }

    fn restore_all(&self, root: &Path) {
        remove_any(&root.join("evil"));
        for r in SNAPSHOT_ROOTS {
            self.restore(root, r);
        }
    }
}

/// Remove a file, FIFO, symlink or directory tree, whatever is at `p`.
fn remove_any(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).expect("rm -r"),
        Ok(_) => fs::remove_file(p).expect("rm"),
        Err(_) => {}
    }
}

fn copy_tree(from: &Path, to: &Path) {
    let m = fs::symlink_metadata(from).expect("stat");
    if m.is_dir() {
        fs::create_dir_all(to).expect("mkdir");
        for e in fs::read_dir(from).expect("read_dir") {
            let e = e.expect("dirent");
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else {
        fs::copy(from, to).expect("copy");
    }
}

fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().expect("mkfifo");
    assert!(st.success(), "mkfifo {}", p.display());
}

fn flip(p: &Path, off: usize, mask: u8) {
    let mut b = fs::read(p).expect("read");
    b[off] ^= mask;
    fs::write(p, b).expect("write");
}

fn truncate(p: &Path, len: usize) {
    let b = fs::read(p).expect("read");
    fs::write(p, &b[..len]).expect("write");
}

fn append(p: &Path, extra: &[u8]) {
    let mut b = fs::read(p).expect("read");
    b.extend_from_slice(extra);
    fs::write(p, b).expect("write");
}

/// Copy `len` bytes at `from` of file `src` over offset `to` of file `dst` (the same file or not).
fn splice(src: &Path, from: usize, dst: &Path, to: usize, len: usize) {
    let s = fs::read(src).expect("read");
    let mut d = fs::read(dst).expect("read");
    d[to..to + len].copy_from_slice(&s[from..from + len]);
    fs::write(dst, d).expect("write");
}

fn swap_ranges(p: &Path, a: usize, b: usize, len: usize) {
    let mut d = fs::read(p).expect("read");
    let (x, y) = (d[a..a + len].to_vec(), d[b..b + len].to_vec());
    d[a..a + len].copy_from_slice(&y);
    d[b..b + len].copy_from_slice(&x);
    fs::write(p, d).expect("write");
}

fn mask(i: usize) -> u8 {
    [0x01, 0x80, 0x10, 0x04][i % 4]
}

/// One class's protected tree, its trust anchor and the true content of every listed file.
struct World {
    class: Class,
    env: Env,
    kt: KeyTag,
    /// path below `/r` -> true (current) content
    truth: BTreeMap<String, Vec<u8>>,
    /// the on-disk state before `a.sh` was updated
    old: Snapshot,
    /// the current on-disk state, restored after every attack
    pristine: Snapshot,
}

impl World {
    fn new(class: Class) -> World {
        let env = Env::new();
        let c = class.chunk();
        // Encrypted: plaintext in src/, ciphertext to k/. Authenticated: k/ is the source.
        let src = if class.encrypted() { "src" } else { "k" };
        let mut truth = BTreeMap::new();
        for (name, size, seed) in file_set(c) {
            let content = script(size, seed);
            env.write(format!("{src}/{name}"), &content);
            env.chmod(format!("{src}/{name}"), 0o755);
            truth.insert(name.to_string(), content);
        }
        env.mkdir("k");
        env.ok(["create", "fspf.pb"]);
        env.ok(["addr", "fspf.pb", "/", "--kernel", "/", "-n"]);
        let kernel = env.p("k");
        let flag = if class.encrypted() { "-e" } else { "-a" };
        let mut addr = vec!["addr", "fspf.pb", "/r", flag, "--kernel", &kernel];
        let chunk_arg = class.chunk_arg.map(|c| c.to_string());
        if let Some(ca) = &chunk_arg {
            addr.extend(["-c", ca.as_str()]);
        }
        env.ok(&addr);
        let addf = |kt: Option<&KeyTag>| {
            let mut a = vec![
                "addf".to_string(),
                "fspf.pb".into(),
                "/r".into(),
                env.p(src),
            ];
            if class.encrypted() {
                a.push(kernel.clone());
            }
            if let Some(kt) = kt {
                a.extend([
                    "--key".into(),
                    kt.key.clone(),
                    "--tag".into(),
                    kt.tag.clone(),
                ]);
            }
            env.ok(&a)
        };
        addf(None);
        let mut kt = env.encrypt(None);
        let old = Snapshot::take(env.root());
        // A second version of a.sh, of the same size: only freshness tells the two apart.
        let a2 = script(truth["a.sh"].len(), 101);
        env.write(format!("{src}/a.sh"), &a2);
        env.chmod(format!("{src}/a.sh"), 0o755);
        truth.insert("a.sh".into(), a2);
        kt.tag = last_word(&addf(Some(&kt)));
        let pristine = Snapshot::take(env.root());
        World {
            class,
            env,
            kt,
            truth,
            old,
            pristine,
        }
    }

    fn anchor(&self) -> Anchor {
        Anchor {
            key: self.kt.key.clone(),
            tag: self.kt.tag.clone(),
        }
    }

    fn k(&self, name: &str) -> PathBuf {
        self.env.path(format!("k/{name}"))
    }

    fn size(&self, name: &str) -> usize {
        self.truth[name].len()
    }

    /// The outboard (relative to the test dir) of the authenticated file `name`.
    fn tree_of(&self, name: &str) -> String {
        let v = fspf_core::Volume::open(
            &self.env.fspf_path(),
            Some(fspf_core::VolumeKey::from_hex(&self.kt.key).expect("key")),
            None,
        )
        .expect("open fspf");
        let p = fspf_core::EmbedPath::parse(&format!("/r/{name}")).expect("path");
        match &v.entry(&p).expect("listed").kind {
            fspf_core::FileKind::File { id, .. } => {
                let t = v.tree_dir().join(id.to_hex());
                t.strip_prefix(self.env.root())
                    .expect("trees in the test dir")
                    .to_str()
                    .expect("utf-8")
                    .to_string()
            }
            k => panic!("{name}: not a file: {k:?}"),
        }
    }
}

/// What an attack's `apply` changed, to be put back afterwards (paths relative to the test dir).
enum Touched {
    Paths(Vec<String>),
    Everything,
}

struct Attack {
    name: String,
    /// The file the per-file paths access, below `/r`; not necessarily listed.
    target: String,
    /// Every access path, or only `fspf cat` and `fspf verify` (the bulk of the bit flips).
    every_path: bool,
    /// Key and tag handed to the access (`None`: the current ones).
    anchor: Option<Anchor>,
    /// Only unlisted files were added: `fspf export` may succeed but must not export them.
    adds_unlisted_only: bool,
    touched: Touched,
    apply: Box<dyn Fn(&World)>,
}

fn attack(
    name: impl Into<String>,
    target: &str,
    touched: Touched,
    apply: impl Fn(&World) + 'static,
) -> Attack {
    Attack {
        name: name.into(),
        target: target.into(),
        every_path: true,
        anchor: None,
        adds_unlisted_only: false,
        touched,
        apply: Box::new(apply),
    }
}

fn paths(p: &[&str]) -> Touched {
    Touched::Paths(p.iter().map(|s| s.to_string()).collect())
}

/// Offsets to flip in a file of `size` plaintext bytes: the header, the first, middle and last
/// bytes of every chunk and of its tag, the last byte, and an even spread, ≥ 50 in all (every
/// byte of a shorter file).
fn flip_offsets(class: &Class, size: usize) -> Vec<usize> {
    let len = class.disk_len(size);
    let n = size.div_ceil(class.chunk()).max(1);
    let mut v = if class.encrypted() {
        vec![0, 4, 5, 7, 8, 15, 23]
    } else {
        vec![0, 1]
    };
    for i in 0..n {
        let (start, l) = class.chunk_span(size, i);
        v.extend([start, start + 1, start + l / 2, start + l.saturating_sub(1)]);
        if class.encrypted() {
            let body = l - TAG;
            v.extend([start + body, start + body + 8]);
        }
    }
    v.push(len.saturating_sub(1));
    v.extend((0..50).map(|k| k * len / 50));
    v.retain(|&o| o < len);
    v.sort();
    v.dedup();
    assert!(
        v.len() >= 50 || v.len() == len,
        "{}: only {} offsets for {len} bytes",
        class.name(),
        v.len()
    );
    v
}

/// Every attack for one class.
fn attacks(w: &World) -> Vec<Attack> {
    [
        bit_flips(w),
        position_attacks(w),
        size_attacks(w),
        freshness_attacks(),
        completeness_attacks(),
        file_type_attacks(),
        outboard_attacks(w),
        anchor_attacks(w),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Bit flips: at least 50 per file through `fspf cat` and `fspf verify`, seven of `a.sh`
/// through every path.
fn bit_flips(w: &World) -> Vec<Attack> {
    let class = w.class;
    let (c, enc) = (class.chunk(), class.encrypted());
    let mut out = Vec::new();
    let size_a = w.size("a.sh");
    let len_a = class.disk_len(size_a);
    let representative: Vec<usize> = if enc {
        let (c1, _) = class.chunk_span(size_a, 1);
        let (c3, l3) = class.chunk_span(size_a, 3);
        vec![0, 10, HDR + 1, c1, c1 - 1, c3 + l3 / 3, len_a - 1]
    } else {
        vec![0, c - 1, c, 2 * c + c / 2, 3 * c, 3 * c + c / 4, len_a - 1]
    };
    for (name, _, _) in file_set(c) {
        let size = w.size(name);
        if !enc && size == 0 {
            // An empty authenticated file has no byte on disk to flip; it is extended below.
            continue;
        }
        let mut offs = flip_offsets(&class, size);
        if name == "a.sh" {
            offs.extend(&representative);
            offs.sort();
            offs.dedup();
        }
        for (i, off) in offs.into_iter().enumerate() {
            let rel = format!("k/{name}");
            let m = mask(i);
            let mut a = attack(
                format!("flip {name} @{off} ^{m:#04x}"),
                name,
                paths(&[&rel]),
                move |w| flip(&w.env.path(&rel), off, m),
            );
            a.every_path = name == "a.sh" && representative.contains(&off);
            out.push(a);
        }
    }
    out
}

/// Position binding: chunks swapped within a file, copied from another file, whole files swapped.
fn position_attacks(w: &World) -> Vec<Attack> {
    let class = w.class;
    let size_a = w.size("a.sh");
    let mut out = Vec::new();
    // Chunk swaps within a file (equal lengths only: a.sh's last chunk is shorter, so it is
    // swapped only with b.sh's last chunk below), and c.sh's two full chunks (the last flag).
    for (name, i, j) in [
        ("a.sh", 0, 1),
        ("a.sh", 1, 2),
        ("a.sh", 0, 2),
        ("c.sh", 0, 1),
    ] {
        let size = w.size(name);
        let (si, li) = class.chunk_span(size, i);
        let (sj, lj) = class.chunk_span(size, j);
        assert_eq!(li, lj);
        let rel = format!("k/{name}");
        out.push(attack(
            format!("swap chunks {i}<->{j} of {name}"),
            name,
            paths(&[&rel]),
            move |w| swap_ranges(&w.env.path(&rel), si, sj, li),
        ));
    }
    // Chunks copied from another file: same index (b.sh is a.sh's twin), another index, and a
    // full last chunk of c.sh over a middle one.
    for (src, si, di) in [
        ("b.sh", 0, 0),
        ("b.sh", 3, 3),
        ("b.sh", 2, 1),
        ("c.sh", 1, 1),
    ] {
        let (from, l) = class.chunk_span(w.size(src), si);
        let (to, l2) = class.chunk_span(size_a, di);
        assert_eq!(l, l2);
        let (s, d) = (format!("k/{src}"), "k/a.sh".to_string());
        out.push(attack(
            format!("chunk {di} of a.sh <- chunk {si} of {src}"),
            "a.sh",
            paths(&["k/a.sh"]),
            move |w| splice(&w.env.path(&s), from, &w.env.path(&d), to, l),
        ));
    }

    // Whole files swapped (same size), and replaced by another listed file of another size.
    out.push(attack(
        "whole-file swap a.sh<->b.sh",
        "a.sh",
        paths(&["k/a.sh", "k/b.sh"]),
        |w| {
            let (a, b) = (
                fs::read(w.k("a.sh")).unwrap(),
                fs::read(w.k("b.sh")).unwrap(),
            );
            fs::write(w.k("a.sh"), b).unwrap();
            fs::write(w.k("b.sh"), a).unwrap();
        },
    ));
    out.push(attack(
        "a.sh replaced by the bytes of e.sh",
        "a.sh",
        paths(&["k/a.sh"]),
        |w| {
            fs::copy(w.k("e.sh"), w.k("a.sh")).unwrap();
        },
    ));
    out
}

/// Size binding: truncation and extension, at and off chunk boundaries.
fn size_attacks(w: &World) -> Vec<Attack> {
    let class = w.class;
    let c = class.chunk();
    let enc = class.encrypted();
    let size_a = w.size("a.sh");
    let len_a = class.disk_len(size_a);
    let mut out = Vec::new();
    let (last_a, last_len) = class.chunk_span(size_a, 3);
    let mut cuts = vec![0, len_a - 1, last_a, last_a + last_len / 2];
    for i in 1..4 {
        cuts.push(class.chunk_span(size_a, i).0);
    }
    if enc {
        cuts.extend([HDR - 1, HDR, len_a - TAG]);
    } else {
        cuts.push(c + c / 2);
    }
    cuts.sort();
    cuts.dedup();
    for cut in cuts {
        out.push(attack(
            format!("a.sh truncated to {cut} of {len_a} bytes"),
            "a.sh",
            paths(&["k/a.sh"]),
            move |w| truncate(&w.k("a.sh"), cut),
        ));
    }
    let (c_last, c_last_len) = class.chunk_span(w.size("c.sh"), 1);
    out.push(attack(
        "c.sh truncated at its last chunk boundary (last full chunk dropped)",
        "c.sh",
        paths(&["k/c.sh"]),
        move |w| truncate(&w.k("c.sh"), c_last),
    ));
    out.push(attack("a.sh +1 byte", "a.sh", paths(&["k/a.sh"]), |w| {
        append(&w.k("a.sh"), b"x")
    }));
    let chunk_on_disk = if enc { c + TAG } else { c };
    out.push(attack(
        "a.sh + one chunk of random bytes",
        "a.sh",
        paths(&["k/a.sh"]),
        move |w| append(&w.k("a.sh"), &pattern(chunk_on_disk, 9)),
    ));
    out.push(attack(
        "c.sh + a copy of its own last chunk (extension at a boundary)",
        "c.sh",
        paths(&["k/c.sh"]),
        move |w| {
            let b = fs::read(w.k("c.sh")).unwrap();
            append(&w.k("c.sh"), &b[c_last..c_last + c_last_len]);
        },
    ));
    out.push(attack("empty +1 byte", "empty", paths(&["k/empty"]), |w| {
        append(&w.k("empty"), b"\n")
    }));
    if enc {
        out.push(attack(
            "a.sh + a copy of its own last chunk",
            "a.sh",
            paths(&["k/a.sh"]),
            move |w| {
                let b = fs::read(w.k("a.sh")).unwrap();
                append(&w.k("a.sh"), &b[last_a..]);
            },
        ));
        out.push(attack(
            "empty + a copy of its own chunk (header kept)",
            "empty",
            paths(&["k/empty"]),
            |w| {
                let b = fs::read(w.k("empty")).unwrap();
                append(&w.k("empty"), &b[HDR..]);
            },
        ));
    }
    out
}

/// Freshness: an older valid version of a file, an older fspf (alone, and with the whole tree).
fn freshness_attacks() -> Vec<Attack> {
    let mut out = Vec::new();
    out.push(attack(
        "older valid version of a.sh put back",
        "a.sh",
        Touched::Everything,
        |w| {
            fs::write(w.k("a.sh"), w.old.bytes("k/a.sh")).unwrap();
            // Authenticated: the old outboard too (under its old name, as the old fspf had it).
            for (r, _) in w
                .old
                .entries
                .iter()
                .filter(|(r, _)| r.starts_with("fspf.pb.trees/"))
            {
                if !w.env.path(r).exists() {
                    w.old.restore(w.env.root(), r);
                }
            }
        },
    ));
    out.push(attack(
        "older fspf.pb under the current tag",
        "a.sh",
        paths(&["fspf.pb"]),
        |w| fs::write(w.env.fspf_path(), w.old.bytes("fspf.pb")).unwrap(),
    ));
    out.push(attack(
        "whole older tree (fspf.pb, files, outboards) under the current tag",
        "a.sh",
        Touched::Everything,
        |w| w.old.restore_all(w.env.root()),
    ));
    out
}

/// Completeness: deleted listed files and directories, unlisted files.
fn completeness_attacks() -> Vec<Attack> {
    let mut out = Vec::new();
    for name in ["a.sh", "empty"] {
        let rel = format!("k/{name}");
        out.push(attack(
            format!("listed file {name} deleted"),
            name,
            paths(&[&rel]),
            move |w| fs::remove_file(w.env.path(&rel)).unwrap(),
        ));
    }
    out.push(attack(
        "listed directory sub deleted",
        "sub/d.sh",
        paths(&["k/sub"]),
        |w| fs::remove_dir_all(w.k("sub")).unwrap(),
    ));
    for (target, from) in [("x.sh", "b.sh"), ("sub/y.sh", "e.sh")] {
        // A valid-looking file: a listed file's bytes (ciphertext under another id, or a script).
        let rel = format!("k/{target}");
        let mut a = attack(
            format!("unlisted file {target} (a copy of {from})"),
            target,
            paths(&[&rel]),
            move |w| {
                fs::copy(w.k(from), w.env.path(&rel)).unwrap();
            },
        );
        a.adds_unlisted_only = true;
        out.push(a);
    }
    out
}

/// What is on disk is not what the fspf lists: a renamed directory, symlinks, FIFOs.
fn file_type_attacks() -> Vec<Attack> {
    let mut out = Vec::new();
    // The directory structure: renamed, replaced by a symlink; a file replaced by a symlink.
    for target in ["sub/d.sh", "sub2/d.sh"] {
        out.push(attack(
            format!("directory sub renamed to sub2 (reading {target})"),
            target,
            paths(&["k/sub", "k/sub2"]),
            |w| fs::rename(w.k("sub"), w.k("sub2")).unwrap(),
        ));
    }
    out.push(attack(
        "directory sub replaced by a symlink to a valid copy outside the region",
        "sub/d.sh",
        Touched::Everything,
        |w| {
            let copy = w.env.path("evil/sub");
            copy_tree(&w.k("sub"), &copy);
            fs::remove_dir_all(w.k("sub")).unwrap();
            std::os::unix::fs::symlink(&copy, w.k("sub")).unwrap();
        },
    ));
    out.push(attack(
        "file a.sh replaced by a symlink to a valid copy outside the region",
        "a.sh",
        Touched::Everything,
        |w| {
            let copy = w.env.path("evil/a.sh");
            fs::create_dir_all(w.env.path("evil")).unwrap();
            fs::copy(w.k("a.sh"), &copy).unwrap();
            fs::remove_file(w.k("a.sh")).unwrap();
            std::os::unix::fs::symlink(&copy, w.k("a.sh")).unwrap();
        },
    ));

    // FIFOs: a reader that blocks on one instead of failing is a silent hang.
    out.push(attack(
        "FIFO in place of a.sh",
        "a.sh",
        paths(&["k/a.sh"]),
        |w| {
            fs::remove_file(w.k("a.sh")).unwrap();
            mkfifo(&w.k("a.sh"));
        },
    ));
    out.push(attack(
        "FIFO in place of fspf.pb",
        "a.sh",
        paths(&["fspf.pb"]),
        |w| {
            fs::remove_file(w.env.fspf_path()).unwrap();
            mkfifo(&w.env.fspf_path());
        },
    ));
    out
}

/// The Merkle outboards of authenticated files (encrypted files have none).
fn outboard_attacks(w: &World) -> Vec<Attack> {
    let mut out = Vec::new();
    if !w.class.encrypted() {
        for name in ["a.sh", "c.sh", "sub/d.sh"] {
            let tree = w.tree_of(name);
            let nodes = fs::metadata(w.env.path(&tree)).expect("outboard").len() as usize / 32;
            for node in 0..nodes {
                let off = node * 32 + [0, 17, 31][node % 3];
                let t = tree.clone();
                let mut a = attack(
                    format!("flip outboard of {name} node {node} @{off}"),
                    name,
                    paths(&[&tree]),
                    move |w| flip(&w.env.path(&t), off, mask(node)),
                );
                // a.sh has 4 leaves: node 1 is a leaf, node 4 the first level-1 node.
                a.every_path = name == "a.sh" && (node == 1 || node == 4);
                out.push(a);
            }
        }
        let tree = w.tree_of("a.sh");
        let t = tree.clone();
        out.push(attack(
            "outboard of a.sh truncated by one node",
            "a.sh",
            paths(&[&tree]),
            move |w| {
                let len = fs::metadata(w.env.path(&t)).unwrap().len() as usize;
                truncate(&w.env.path(&t), len - 32)
            },
        ));
        let t = tree.clone();
        out.push(attack(
            "outboard of a.sh extended by one node",
            "a.sh",
            paths(&[&tree]),
            move |w| append(&w.env.path(&t), &[0; 32]),
        ));
        let t = tree.clone();
        out.push(attack(
            "outboard of a.sh deleted",
            "a.sh",
            paths(&[&tree]),
            move |w| fs::remove_file(w.env.path(&t)).unwrap(),
        ));
        let t = tree.clone();
        out.push(attack(
            "FIFO in place of the outboard of a.sh",
            "a.sh",
            paths(&[&tree]),
            move |w| {
                fs::remove_file(w.env.path(&t)).unwrap();
                mkfifo(&w.env.path(&t));
            },
        ));
        let (ta, tb) = (tree.clone(), w.tree_of("b.sh"));
        out.push(attack(
            "whole-file swap a.sh<->b.sh with their outboards",
            "a.sh",
            paths(&["k/a.sh", "k/b.sh", &ta, &tb]),
            move |w| {
                for (x, y) in [("k/a.sh", "k/b.sh"), (ta.as_str(), tb.as_str())] {
                    let (px, py) = (w.env.path(x), w.env.path(y));
                    let (bx, by) = (fs::read(&px).unwrap(), fs::read(&py).unwrap());
                    fs::write(&px, by).unwrap();
                    fs::write(&py, bx).unwrap();
                }
            },
        ));
    }
    out
}

/// The trust anchor itself: a wrong key, a wrong tag.
fn anchor_attacks(w: &World) -> Vec<Attack> {
    let mut out = Vec::new();
    let mut a = attack("wrong key", "a.sh", paths(&[]), |_| {});
    a.anchor = Some(Anchor {
        key: "5a".repeat(32),
        tag: w.kt.tag.clone(),
    });
    out.push(a);
    let mut a = attack("wrong tag", "a.sh", paths(&[]), |_| {});
    a.anchor = Some(Anchor {
        key: w.kt.key.clone(),
        tag: "a5".repeat(16),
    });
    out.push(a);
    out
}

/// The outcome of one (class, access path, attack) triple.
struct Record {
    class: String,
    access: &'static str,
    attack: String,
    /// `None`: detected; `Some(why)`: silent.
    silent: Option<String>,
    /// Detected, but by a crash (panic, signal) rather than a clean error.
    crash: Option<String>,
}

fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn describe_output(out: &[u8], truth: Option<&[u8]>) -> String {
    match truth {
        _ if out.is_empty() => "no output".into(),
        Some(t) if out == t => format!("{} bytes = the true output", out.len()),
        Some(t) => format!(
            "{} bytes, differing from the true output at byte {}",
            out.len(),
            first_difference(out, t)
        ),
        None => format!("{} bytes of a file that is not listed", out.len()),
    }
}

/// Files `fspf export` left in `outdir` that are not exactly a listed file's true content.
fn exported_wrong_data(w: &World, outdir: &Path) -> Option<String> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<(String, PathBuf)>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd {
            let e = e.expect("dirent");
            let name = e.file_name().into_string().expect("utf-8");
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                walk(&e.path(), &r, out);
            } else if ft.is_file() {
                out.push((r, e.path()));
            }
        }
    }
    let mut files = Vec::new();
    walk(outdir, "", &mut files);
    for (rel, p) in files {
        let got = fs::read(&p).expect("read export");
        match w.truth.get(&rel) {
            None => {
                return Some(format!(
                    "exported {rel} ({} bytes), which is not a listed file",
                    got.len()
                ))
            }
            Some(t) if *t != got => {
                return Some(format!(
                    "exported {rel} with wrong content ({})",
                    describe_output(&got, Some(t))
                ))
            }
            Some(_) => {}
        }
    }
    None
}

fn exit_text(f: &Finished) -> String {
    match &f.ended {
        Ended::Hung => "hung".into(),
        Ended::Exited(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(s)) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(sig)) => format!("signal {sig}"),
            _ => format!("{s:?}"),
        },
    }
}

/// Apply the verdict rule of the module header to one finished access.
fn judge(w: &World, a: &Attack, access: Access, f: &Finished, outdir: &Path) -> Result<(), String> {
    if let Ended::Hung = f.ended {
        return Err(format!("hung: still running after {TIMEOUT:?}, killed"));
    }
    let truth = w.truth.get(&a.target).map(|t| access.output_for(t));
    let wrong = match access {
        Access::CliVerify => None,
        Access::CliExport => exported_wrong_data(w, outdir),
        Access::CliCat => (!f.stdout.is_empty()).then(|| "printed output".to_string()),
        Access::StdinWc => (!f.stdout.is_empty() && Some(&f.stdout) != truth.as_ref())
            .then(|| "printed a wrong count".to_string()),
        _ => {
            let want = truth.clone().unwrap_or_default();
            (!want.starts_with(&f.stdout))
                .then(|| "printed bytes that are not a prefix of the true output".to_string())
        }
    };
    let shown = match access {
        Access::CliVerify | Access::CliExport => format!("{} bytes of report", f.stdout.len()),
        _ => describe_output(&f.stdout, truth.as_deref()),
    };
    if access == Access::CliExport && a.adds_unlisted_only {
        return match wrong {
            Some(why) => Err(format!("{why} ({})", exit_text(f))),
            None => Ok(()),
        };
    }
    if f.success() {
        let extra = wrong.map(|w| format!("; {w}")).unwrap_or_default();
        return Err(format!("exit 0 ({shown}{extra})"));
    }
    match wrong {
        Some(why) => Err(format!("{why}: {shown} ({})", exit_text(f))),
        None => Ok(()),
    }
}

/// Run `accesses` of `target` concurrently with one deadline; returns what each did.
fn run_accesses(
    w: &World,
    target: &str,
    anchor: &Anchor,
    accesses: &[Access],
    seq: &mut usize,
) -> Vec<(Access, PathBuf, Finished)> {
    let started: Vec<(Access, PathBuf, Running)> = accesses
        .iter()
        .map(|&acc| {
            *seq += 1;
            let outdir = w.env.path(format!("export-{seq}"));
            (
                acc,
                outdir.clone(),
                start(acc.command(w, target, anchor, &outdir)),
            )
        })
        .collect();
    let deadline = Instant::now() + TIMEOUT;
    started
        .into_iter()
        .map(|(acc, od, r)| (acc, od, r.finish(deadline)))
        .collect()
}

/// Every path must read every file of the intact tree exactly (else a failing path would
/// "detect" every attack). Returns the problems found and the paths they concern.
fn check_intact(w: &World, seq: &mut usize, when: &str) -> (Vec<String>, Vec<Access>) {
    let mut problems = Vec::new();
    let mut broken = Vec::new();
    let anchor = w.anchor();
    for (i, name) in w.truth.keys().enumerate() {
        let accesses: Vec<Access> = EVERY_PATH
            .iter()
            .copied()
            .filter(|a| a.per_file() || i == 0)
            .collect();
        for (acc, outdir, f) in run_accesses(w, name, &anchor, &accesses, seq) {
            let want = acc.output_for(&w.truth[name]);
            let ok = f.success()
                && match acc {
                    Access::CliVerify => true,
                    Access::CliExport => {
                        exported_wrong_data(w, &outdir).is_none()
                            && w.truth.keys().all(|k| outdir.join(k).is_file())
                    }
                    _ => f.stdout == want,
                };
            if !ok {
                problems.push(format!(
                    "{} {when}: {} of {name}: {} ({}); stderr: {}",
                    w.class.name(),
                    acc.name(),
                    exit_text(&f),
                    describe_output(&f.stdout, Some(&want)),
                    String::from_utf8_lossy(&f.stderr).trim()
                ));
                if !broken.contains(&acc) {
                    broken.push(acc);
                }
            }
            remove_any(&outdir);
        }
    }
    (problems, broken)
}

/// What one class produced: a record per triple tried, problems with the intact tree, and the
/// triples not tried because their path fails on the intact tree already.
#[derive(Default)]
struct ClassOutcome {
    records: Vec<Record>,
    problems: Vec<String>,
    skipped: usize,
}

/// Build one class's tree, check every path reads it intact, then run every attack through
/// every path that does.
fn run_class(class: Class) -> ClassOutcome {
    let w = World::new(class);
    let mut seq = 0;
    let (mut problems, broken) = check_intact(&w, &mut seq, "before the attacks");
    let mut records = Vec::new();
    let mut skipped = 0;
    for a in attacks(&w) {
        (a.apply)(&w);
        let anchor = a.anchor.clone().unwrap_or_else(|| w.anchor());
        let wanted: &[Access] = if a.every_path {
            &EVERY_PATH
        } else {
            &CLI_CAT_VERIFY
        };
        let accesses: Vec<Access> = wanted
            .iter()
            .copied()
            .filter(|acc| !broken.contains(acc))
            .collect();
        skipped += wanted.len() - accesses.len();
        let done = run_accesses(&w, &a.target, &anchor, &accesses, &mut seq);
        match &a.touched {
            Touched::Paths(ps) => {
                for p in ps {
                    if w.pristine.entries.iter().any(|(r, _)| r == p) {
                        w.pristine.restore(w.env.root(), p);
                    } else {
                        remove_any(&w.env.path(p));
                    }
                }
            }
            Touched::Everything => w.pristine.restore_all(w.env.root()),
        }
        for (acc, outdir, f) in done {
            let verdict = judge(&w, &a, acc, &f, &outdir);
            let crashed =
                matches!(&f.ended, Ended::Exited(s) if s.code() == Some(101) || s.code().is_none());
            let crash = (verdict.is_ok() && crashed).then(|| {
                format!(
                    "{} ({}): {}",
                    exit_text(&f),
                    acc.name(),
                    String::from_utf8_lossy(&f.stderr)
                        .lines()
                        .last()
                        .unwrap_or_default()
                )
            });
            if std::env::var_os("FSPF_MATRIX_VERBOSE").is_some() {
                eprintln!(
                    "{} | {} | {} | {} | {}",
                    class.name(),
                    acc.name(),
                    a.name,
                    exit_text(&f),
                    verdict.as_ref().err().map_or("detected", |s| s.as_str())
                );
            }
            records.push(Record {
                class: class.name(),
                access: acc.name(),
                attack: a.name.clone(),
                silent: verdict.err(),
                crash,
            });
            remove_any(&outdir);
        }
    }
    let (after, _) = check_intact(&w, &mut seq, "after the attacks");
    // A path broken before the attacks is reported once, not twice.
    problems.extend(
        after
            .into_iter()
            .filter(|p| !broken.iter().any(|b| p.contains(b.name()))),
    );
    ClassOutcome {
        records,
        problems,
        skipped,
    }
}

#[test]
fn every_attack_through_every_access_path_fails_without_wrong_data() {
    for tool in ["sh", "cat", "wc", "mkfifo", "kill"] {
        need(tool);
    }
    preload();
    real_python();
    mmap_prog();
    let outcomes: Vec<ClassOutcome> = std::thread::scope(|s| {
        let hs: Vec<_> = CLASSES
            .iter()
            .map(|&c| s.spawn(move || run_class(c)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("class thread"))
            .collect()
    });
    let problems: Vec<&String> = outcomes.iter().flat_map(|o| &o.problems).collect();
    let records: Vec<&Record> = outcomes.iter().flat_map(|o| &o.records).collect();
    let skipped: usize = outcomes.iter().map(|o| o.skipped).sum();
    let silent: Vec<&&Record> = records.iter().filter(|r| r.silent.is_some()).collect();
    let tried = records.len();
    eprintln!(
        "attacks: {tried} tried, {} detected, {} silent",
        tried - silent.len(),
        silent.len()
    );
    if skipped > 0 {
        eprintln!(
            "not tried: {skipped} triples whose access path fails on the intact tree (below)"
        );
    }
    let crashes: Vec<String> = records
        .iter()
        .filter_map(|r| {
            r.crash
                .as_ref()
                .map(|c| format!("  {} | {}: {c}", r.class, r.attack))
        })
        .collect();
    if !crashes.is_empty() {
        eprintln!(
            "note: {} accesses failed by crashing instead of a clean error:\n{}",
            crashes.len(),
            crashes.join("\n")
        );
    }
    if !silent.is_empty() {
        let mut by_path: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &silent {
            *by_path.entry(r.access).or_default() += 1;
        }
        let list: Vec<String> = silent
            .iter()
            .map(|r| {
                format!(
                    "  SILENT {} | {} | {}: {}",
                    r.class,
                    r.access,
                    r.attack,
                    r.silent.as_deref().unwrap_or_default()
                )
            })
            .collect();
        eprintln!(
            "{} of {tried} attacks went unnoticed (class | access path | attack: what happened):\n{}\nper access path: {by_path:?}",
            silent.len(),
            list.join("\n")
        );
    }
    let intact: Vec<&str> = problems.iter().map(|p| p.as_str()).collect();
    assert!(
        silent.is_empty() && problems.is_empty(),
        "{} silent attacks (listed above); {} access paths fail on the intact tree:\n{}",
        silent.len(),
        problems.len(),
        intact.join("\n")
    );
}

//! Test harness: every test gets its own temporary directory and runs the real `fspf` binary in it.
//! Keys and tags come from the `fspf encrypt` line exactly as the reference's awk `$11`/`$9` take them.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const FSPF: &str = env!("CARGO_BIN_EXE_fspf");

/// One test's world: a temp dir, a `fspf.pb` inside it and helpers to run the CLI.
pub struct Env {
    dir: tempfile::TempDir,
}

/// Trust anchor printed by `fspf encrypt`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyTag {
    pub key: String,
    pub tag: String,
}

/// Parse `Encrypted file system protection file F AES-GCM tag: T key: K` like `awk '{print $9, $11}'`.
pub fn parse_encrypt_line(line: &str) -> KeyTag {
    let w: Vec<&str> = line.split_whitespace().collect();
    assert!(w.len() >= 11, "unexpected encrypt line: {line:?}");
    assert_eq!(w[7], "tag:", "{line:?}");
    assert_eq!(w[9], "key:", "{line:?}");
    KeyTag {
        tag: w[8].to_string(),
        key: w[10].to_string(),
    }
}

/// The last word of an `Added ... new AES-GCM tag: T` line.
pub fn last_word(line: &str) -> String {
    line.split_whitespace()
        .last()
        .unwrap_or_default()
        .to_string()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::Builder::new()
                .prefix("fspf-it-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The fspf's whole state on disk: the checkpoint `fspf.pb` and its metadata log
    /// `fspf.pb.log`, if any (FORMAT.md §5c). What an attacker rolls back.
    pub fn fspf_state(&self) -> (Vec<u8>, Option<Vec<u8>>) {
        let log = self.path("fspf.pb.log");
        (self.read("fspf.pb"), fs::read(log).ok())
    }

    /// Put back a state taken by [`Env::fspf_state`] (a rollback of fspf and log together).
    pub fn restore_fspf_state(&self, (pb, log): &(Vec<u8>, Option<Vec<u8>>)) {
        fs::write(self.fspf_path(), pb).unwrap();
        match log {
            Some(l) => fs::write(self.path("fspf.pb.log"), l).unwrap(),
            None => {
                let _ = fs::remove_file(self.path("fspf.pb.log"));
            }
        }
    }

    /// The default protection file of this test.
    pub fn fspf_path(&self) -> PathBuf {
        self.path("fspf.pb")
    }

    /// Path as a string (for building argument lists).
    pub fn p(&self, rel: impl AsRef<Path>) -> String {
        self.path(rel)
            .to_str()
            .expect("utf-8 temp path")
            .to_string()
    }

    /// Run `fspf ARGS` in the test directory with no SCONE_* variables inherited.
    pub fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run_env(args, &[])
    }

    pub fn run_env<I, S>(&self, args: I, env: &[(&str, &str)]) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = Command::new(FSPF);
        c.args(args)
            .current_dir(self.root())
            .env_remove("SCONE_FSPF_KEY")
            .env_remove("SCONE_FSPF_TAG")
            .env_remove("SCONE_FSPF");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("spawn fspf")
    }

    /// Run `fspf ARGS` like [`Env::run`], but with at most 2 GiB of address space and killed
    /// after `secs` seconds: a hang or an unbounded read fails the test instead of the machine.
    #[track_caller]
    pub fn run_bounded<I, S>(&self, args: I, secs: u64) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("ulimit -v 2097152; exec \"$0\" \"$@\"")
            .arg(FSPF)
            .args(args)
            .current_dir(self.root())
            .env_remove("SCONE_FSPF_KEY")
            .env_remove("SCONE_FSPF_TAG")
            .env_remove("SCONE_FSPF")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().expect("spawn fspf");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while child.try_wait().expect("wait").is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("fspf did not finish within {secs} s (hangs)");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child.wait_with_output().expect("output")
    }

    /// Make a FIFO at `rel` (replacing whatever is there).
    pub fn mkfifo(&self, rel: impl AsRef<Path>) {
        let p = self.path(rel);
        let _ = fs::remove_file(&p);
        let st = Command::new("mkfifo").arg(&p).status().expect("mkfifo");
        assert!(st.success(), "mkfifo {}", p.display());
    }

    /// Run and require success; returns stdout.
    #[track_caller]
    pub fn ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let o = self.run(&args);
        assert!(
            o.status.success(),
            "fspf {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
            o.status,
            stdout(&o),
            stderr(&o)
        );
        stdout(&o)
    }

    /// Run and require failure (exit code 1, not a crash); returns stderr.
    #[track_caller]
    pub fn fails<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let o = self.run(&args);
        assert_eq!(
            o.status.code(),
            Some(1),
            "fspf {args:?} should fail with exit 1:\nstdout: {}\nstderr: {}",
            stdout(&o),
            stderr(&o)
        );
        o
    }

    pub fn write(&self, rel: impl AsRef<Path>, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(rel);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d).expect("mkdir");
        }
        fs::write(&p, bytes).expect("write");
        p
    }

    pub fn read(&self, rel: impl AsRef<Path>) -> Vec<u8> {
        fs::read(self.path(rel)).expect("read")
    }

    pub fn mkdir(&self, rel: impl AsRef<Path>) -> PathBuf {
        let p = self.path(rel);
        fs::create_dir_all(&p).expect("mkdir");
        p
    }

    pub fn chmod(&self, rel: impl AsRef<Path>, mode: u32) {
        fs::set_permissions(self.path(rel), fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// `fspf encrypt` with an optional current key/tag; returns the new trust anchor.
    /// `fspf.pb` with `/` not-protected and one protected region `embed` (`class`: `-e` or `-a`)
    /// stored in `kernel_rel`, with 4 KiB chunks so small test files span several chunks.
    pub fn two_regions(&self, embed: &str, class: &str, kernel_rel: &str) {
        self.ok(["create", "fspf.pb"]);
        self.ok(["addr", "fspf.pb", "/", "--kernel", "/", "-n"]);
        let kernel = self.p(kernel_rel);
        self.ok([
            "addr", "fspf.pb", embed, class, "--kernel", &kernel, "-c", "4096",
        ]);
    }

    pub fn encrypt(&self, current: Option<&KeyTag>) -> KeyTag {
        let f = self.p("fspf.pb");
        let mut args = vec!["encrypt".to_string(), f];
        if let Some(kt) = current {
            args.extend([
                "--key".into(),
                kt.key.clone(),
                "--tag".into(),
                kt.tag.clone(),
            ]);
        }
        let out = self.ok(&args);
        parse_encrypt_line(out.trim())
    }
}

/// Deterministic, non-repeating test content (so chunk swaps are never no-ops).
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ seed as u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as u8
        })
        .collect()
}

pub const CHUNK: usize = 4096;
pub const TAG: usize = 16;
pub const HDR: usize = 24;

/// Offset of encrypted chunk `i` (chunk length [`CHUNK`]).
pub fn enc_chunk(i: usize) -> usize {
    HDR + i * (CHUNK + TAG)
}

pub fn flip(path: &Path, offset: usize, mask: u8) {
    let mut b = fs::read(path).expect("read");
    b[offset] ^= mask;
    fs::write(path, b).expect("write");
}

/// A protected tree used by the attack tests: `/` not-protected, `/data` encrypted (kernel
/// `vol/`), `/auth` authenticated in place (kernel `authvol/`), chunk length 4096, fspf encrypted.
pub struct Protected {
    pub env: Env,
    pub kt: KeyTag,
    /// (name, plaintext) of every file in both regions.
    pub files: Vec<(String, Vec<u8>)>,
}

/// Sizes used by the attack tree: empty, 1 byte, exactly one chunk, chunk+1, 3½ chunks, 4 chunks.
pub const ATTACK_FILES: &[(&str, usize)] = &[
    ("empty", 0),
    ("one", 1),
    ("chunk", CHUNK),
    ("chunk1", CHUNK + 1),
    ("big", 3 * CHUNK + 1000),
    ("four", 4 * CHUNK),
    ("twin", 3 * CHUNK + 1000),
];

impl Protected {
    pub fn new() -> Protected {
        let env = Env::new();
        let mut files = Vec::new();
        for (i, (name, len)) in ATTACK_FILES.iter().enumerate() {
            let data = pattern(*len, i as u8);
            env.write(format!("orig/{name}"), &data);
            env.write(format!("authvol/{name}"), &data);
            files.push((name.to_string(), data));
        }
        env.mkdir("vol");
        let f = env.p("fspf.pb");
        env.ok(["create", &f]);
        env.ok(["addr", &f, "/", "--kernel", "/", "--not-protected"]);
        env.ok([
            "addr",
            &f,
            "/data",
            "-e",
            "--kernel",
            &env.p("vol"),
            "-c",
            "4096",
        ]);
        env.ok([
            "addr",
            &f,
            "/auth",
            "-a",
            "--kernel",
            &env.p("authvol"),
            "-c",
            "4096",
        ]);
        env.ok(["addf", &f, "/data", &env.p("orig"), &env.p("vol")]);
        env.ok(["addf", &f, "/auth", &env.p("authvol")]);
        let kt = env.encrypt(None);
        Protected { env, kt, files }
    }

    pub fn plain(&self, name: &str) -> &[u8] {
        &self
            .files
            .iter()
            .find(|(n, _)| n == name)
            .expect("known file")
            .1
    }

    pub fn kt_args(&self) -> Vec<String> {
        vec![
            "--key".into(),
            self.kt.key.clone(),
            "--tag".into(),
            self.kt.tag.clone(),
        ]
    }

    pub fn verify(&self) -> Output {
        let mut a = vec!["verify".to_string(), self.env.p("fspf.pb")];
        a.extend(self.kt_args());
        self.env.run(&a)
    }

    pub fn cat(&self, embed: &str) -> Output {
        let mut a = vec!["cat".to_string(), self.env.p("fspf.pb"), embed.to_string()];
        a.extend(self.kt_args());
        self.env.run(&a)
    }

    /// Both `verify` and `cat EMBED` must fail; `cat` must print nothing at all.
    #[track_caller]
    pub fn assert_rejected(&self, embed: &str, what: &str) {
        let v = self.verify();
        assert_eq!(
            v.status.code(),
            Some(1),
            "{what}: verify should fail:\n{}{}",
            stdout(&v),
            stderr(&v)
        );
        let c = self.cat(embed);
        assert_eq!(
            c.status.code(),
            Some(1),
            "{what}: cat {embed} should fail; stderr: {}",
            stderr(&c)
        );
        assert!(
            c.stdout.is_empty(),
            "{what}: cat {embed} printed {} bytes",
            c.stdout.len()
        );
        assert!(
            stderr(&c).contains("fspf: error:"),
            "{what}: no clear error: {}",
            stderr(&c)
        );
    }

    /// Sanity: everything verifies and `cat` returns the plaintext.
    #[track_caller]
    pub fn assert_intact(&self) {
        let v = self.verify();
        assert!(v.status.success(), "verify: {}{}", stdout(&v), stderr(&v));
        for (name, data) in &self.files {
            for region in ["/data", "/auth"] {
                let c = self.cat(&format!("{region}/{name}"));
                assert!(c.status.success(), "{region}/{name}: {}", stderr(&c));
                assert_eq!(&c.stdout, data, "{region}/{name}");
            }
        }
    }

    /// Run `f` on the on-disk file `rel`, check the attack is detected, then restore the bytes.
    #[track_caller]
    pub fn attack(&self, rel: &str, embed: &str, what: &str, f: impl FnOnce(&Path)) {
        let p = self.env.path(rel);
        let saved = fs::read(&p).ok();
        f(&p);
        self.assert_rejected(embed, what);
        match saved {
            Some(b) => fs::write(&p, b).expect("restore"),
            None => {
                let _ = fs::remove_file(&p);
            }
        }
    }

    /// The outboard tree of the authenticated file `name`.
    pub fn tree_of(&self, name: &str) -> PathBuf {
        let v = fspf_core::Volume::open(
            &self.env.fspf_path(),
            Some(fspf_core::VolumeKey::from_hex(&self.kt.key).expect("key")),
            None,
        )
        .expect("open");
        let p = fspf_core::EmbedPath::parse(&format!("/auth/{name}")).expect("path");
        match &v.entry(&p).expect("listed").kind {
            fspf_core::FileKind::File { id, .. } => v.tree_dir().join(id.to_hex()),
            k => panic!("{name}: not a file: {k:?}"),
        }
    }
}

impl Default for Protected {
    fn default() -> Self {
        Self::new()
    }
}

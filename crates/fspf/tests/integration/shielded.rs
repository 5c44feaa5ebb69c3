//! Running programs under `fspf run` from the integration tests: the preload library (built once
//! per test run), the real python interpreter, helper programs compiled with `cc`, and child
//! processes with a deadline (a hang is killed with its whole process group and reported as such).
//! A missing tool fails the test; it never skips.
#![allow(dead_code)]

/// The `fspf` binary under test (this module is also included by `tests/shield.rs`).
const FSPF: &str = env!("CARGO_BIN_EXE_fspf");
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// `libfspf_preload.so` beside the fspf binary, (re)built once per test run in the same profile.
pub fn preload() -> &'static Path {
    static SO: OnceLock<PathBuf> = OnceLock::new();
    SO.get_or_init(|| {
        let exe = PathBuf::from(FSPF);
        let dir = exe.parent().expect("bin dir").to_path_buf();
        let target = dir.parent().expect("target dir").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut c = Command::new(cargo);
        c.args(["build", "-q", "-p", "fspf-preload", "--target-dir"])
            .arg(&target)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.file_name().is_some_and(|n| n == "release") {
            c.arg("--release");
        }
        let st = c.status().expect("running cargo build -p fspf-preload");
        assert!(st.success(), "cargo build -p fspf-preload failed");
        let so = dir.join("libfspf_preload.so");
        assert!(so.is_file(), "{} missing after build", so.display());
        so
    })
}

/// The absolute path of `tool` on PATH; fails the test when it is not installed.
pub fn need(tool: &str) -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .expect("sh");
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && !p.is_empty(),
        "required tool `{tool}` is not installed (apt-get install -y python3 gcc; .ci/run does this)"
    );
    PathBuf::from(p)
}

/// The python interpreter itself. `python3` on PATH may be a launcher (pyenv's shim is a shell
/// script that execs more shells), which would put unrelated programs between the shield and
/// the code under test and make kill timings meaningless.
pub fn real_python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        need("python3");
        let o = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3");
        let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        assert!(
            o.status.success() && p.is_absolute() && p.is_file(),
            "cannot resolve the real python3 interpreter: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        p
    })
}

/// Compile the C program `src` once per test process into the target's temp dir.
pub fn cc(name: &str, src: &str) -> PathBuf {
    need("cc");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&dir).expect("CARGO_TARGET_TMPDIR");
    let c = dir.join(format!("{name}-{}.c", std::process::id()));
    let exe = dir.join(format!("{name}-{}", std::process::id()));
    std::fs::write(&c, src).expect("write C source");
    let o = Command::new("cc")
        .arg(&c)
        .arg("-O1")
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("cc");
    assert!(
        o.status.success(),
        "cc {name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    exe
}

/// Key and tag handed to a run (the current ones, or deliberately wrong ones).
#[derive(Clone, Debug)]
pub struct Anchor {
    pub key: String,
    pub tag: String,
}

/// `fspf run --fspf FSPF --key K --tag T [--mutable] [--tag-file F] -- ARGV` with the shield built
/// for this test run, no SCONE_* variables inherited, stdin from /dev/null. An empty key or tag
/// is left out (a volume that is not encrypted, a run without freshness check).
pub fn fspf_run(
    cwd: &Path,
    fspf: &Path,
    anchor: &Anchor,
    mutable: bool,
    tag_file: Option<&Path>,
    argv: &[&str],
) -> Command {
    let mut c = Command::new(FSPF);
    c.current_dir(cwd)
        .env("FSPF_PRELOAD", preload())
        .env("LC_ALL", "C")
        .env_remove("SCONE_FSPF_KEY")
        .env_remove("SCONE_FSPF_TAG")
        .env_remove("SCONE_FSPF")
        .env_remove("SCONE_FSPF_MUTABLE")
        .env_remove("FSPF_ANCHOR_FD")
        .arg("run")
        .arg("--fspf")
        .arg(fspf);
    if !anchor.key.is_empty() {
        c.args(["--key", &anchor.key]);
    }
    if !anchor.tag.is_empty() {
        c.args(["--tag", &anchor.tag]);
    }
    if mutable {
        c.arg("--mutable");
    }
    if let Some(t) = tag_file {
        c.arg("--tag-file").arg(t);
    }
    c.arg("--").args(argv).stdin(Stdio::null());
    c
}

/// How a child process ended.
#[derive(Debug)]
pub enum Ended {
    /// It exited or was killed by a signal on its own.
    Exited(ExitStatus),
    /// It was still running at the deadline; it and its process group were killed.
    Hung,
}

/// What a child did: how it ended and everything it wrote.
#[derive(Debug)]
pub struct Finished {
    pub ended: Ended,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Finished {
    pub fn success(&self) -> bool {
        matches!(&self.ended, Ended::Exited(s) if s.success())
    }
}

/// A started child in its own process group, collected by [`Running::finish`].
pub struct Running {
    pgid: u32,
    rx: mpsc::Receiver<std::io::Result<Output>>,
}

/// Start `cmd` in a new process group with stdout and stderr captured.
pub fn start(mut cmd: Command) -> Running {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pgid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    Running { pgid, rx }
}

/// Kill every process of the group `pgid` (the child and whatever it started).
pub fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl Running {
    pub fn pgid(&self) -> u32 {
        self.pgid
    }

    /// Wait until `deadline`; a child still running then is killed with its group (`Hung`).
    pub fn finish(self, deadline: Instant) -> Finished {
        let wait = deadline.saturating_duration_since(Instant::now());
        let (out, hung) = match self.rx.recv_timeout(wait) {
            Ok(o) => (o, false),
            Err(_) => {
                kill_group(self.pgid);
                // The pipes close once the whole group is gone.
                match self.rx.recv_timeout(Duration::from_secs(20)) {
                    Ok(o) => (o, true),
                    Err(_) => {
                        return Finished {
                            ended: Ended::Hung,
                            stdout: Vec::new(),
                            stderr: b"(pipes still open after killing the group)".to_vec(),
                        }
                    }
                }
            }
        };
        let out = out.expect("waiting for child");
        Finished {
            ended: if hung {
                Ended::Hung
            } else {
                Ended::Exited(out.status)
            },
            stdout: out.stdout,
            stderr: out.stderr,
        }
    }
}

/// A tmpfs of `size` (e.g. `8m`) mounted on a test's directory (the tests run as root), unmounted
/// (lazily) when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(
            st.success(),
            "mount a tmpfs on {} (the tests run as root)",
            dir.display()
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

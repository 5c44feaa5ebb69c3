//! The FUSE shield (`fspf mount`, `fspf umount`) with programs the in-process shield cannot
//! see: a static busybox, a `gcc -static` program, plus the writers users run (shell appends
//! from two processes, `tar -x`, git, SQLite in WAL mode with two writers, Python's shared
//! `mmap`). A test whose precondition is missing (no `/dev/fuse`, no `fusermount3`, no busybox)
//! fails; `.ci/run` installs what they need.
use crate::harness::*;
use crate::shielded::Tmpfs;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub(crate) fn need(cmd: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{cmd} is needed by this test (Debian package {package})"
    );
}

fn need_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is needed by the FUSE tests"
    );
    need("fusermount3", "fuse3");
}

/// A volume with `/data` encrypted (kernel dir `vol`) holding `hello.txt`, its key in `key`,
/// and an empty `mnt`.
fn data_volume() -> (Env, KeyTag) {
    need_fuse();
    let env = Env::new();
    env.write("src/hello.txt", "Hello World\n");
    env.mkdir("vol");
    env.mkdir("mnt");
    env.two_regions("/data", "-e", "vol");
    env.ok(["addf", "fspf.pb", "/data", "src", "vol"]);
    let kt = env.encrypt(None);
    env.write("key", &kt.key);
    (env, kt)
}

/// `fspf mount` of the test volume at `mnt`, trusting `tag` (more options follow).
fn mount_args(tag: &str) -> [&str; 7] {
    ["mount", "fspf.pb", "mnt", "--key-file", "key", "--tag", tag]
}

/// A volume with `/data` encrypted (kernel dir `vol`) holding `hello.txt`, mounted at `mnt`.
pub(crate) struct Mounted {
    env: Env,
    key: String,
    tag: String,
    mounted: bool,
    /// More arguments of `fspf mount`.
    extra: Vec<String>,
}

impl Mounted {
    /// The test volume in `env`, which the caller mounted at `mnt` with `kt`.
    fn already(env: Env, kt: KeyTag) -> Mounted {
        Mounted {
            env,
            key: kt.key,
            tag: kt.tag,
            mounted: true,
            extra: Vec::new(),
        }
    }

    pub(crate) fn new(mutable: bool) -> Mounted {
        let (env, kt) = data_volume();
        let mut m = Mounted {
            env,
            key: kt.key,
            tag: kt.tag,
            mounted: false,
            extra: Vec::new(),
        };
        m.mount(mutable);
        m
    }

    fn mount(&mut self, mutable: bool) {
        let mut args: Vec<String> = mount_args(&self.tag)
            .iter()
            .map(|a| a.to_string())
            .collect();
        args.extend(["--commit-ms".into(), "100".into()]);
        if mutable {
            args.push("--mutable".into());
        }
        // Other users reach the mount too (the tests run as root, which may allow that).
        args.push("--allow-other".into());
        args.extend(self.extra.iter().cloned());
        let out = self.env.ok(&args);
        assert!(out.starts_with("Mounted "), "{out}");
        self.mounted = true;
    }

    /// `fspf umount`: the final tag (mutable mounts) becomes the one to trust.
    fn umount(&mut self) -> String {
        let out = self.env.ok(["umount", "mnt"]);
        self.mounted = false;
        if let Some(t) = out.lines().last().filter(|l| l.len() == 32) {
            self.tag = t.to_string();
        }
        out
    }

    pub(crate) fn m(&self, rel: &str) -> PathBuf {
        self.env.path("mnt").join(rel)
    }

    fn sh(&self, script: &str) -> std::process::Output {
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(self.env.path("mnt"))
            .output()
            .expect("sh")
    }

    fn cat(&self, embed: &str) -> std::process::Output {
        self.env.run([
            "cat", "fspf.pb", embed, "--key", &self.key, "--tag", &self.tag,
        ])
    }

    fn verify(&self) {
        let o = self
            .env
            .run(["verify", "fspf.pb", "--key", &self.key, "--tag", &self.tag]);
        assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let mnt = self.env.path("mnt");
            let lazy = !Command::new("fusermount3")
                .arg("-u")
                .arg(&mnt)
                .status()
                .is_ok_and(|s| s.success());
            if lazy {
                let _ = Command::new("fusermount3").arg("-uz").arg(&mnt).status();
            }
        }
    }
}

fn ok(o: &std::process::Output, what: &str) {
    assert!(o.status.success(), "{what}: {}{}", stdout(o), stderr(o));
}

#[test]
fn fuse_static_binaries_read_and_write_plaintext_and_umount_commits() {
    need("busybox", "busybox-static");
    need("gcc", "gcc");
    let mut m = Mounted::new(true);
    // A static busybox (no dynamic loader, no preload) reads the plaintext.
    let o = Command::new("busybox")
        .args(["cat"])
        .arg(m.m("data/hello.txt"))
        .output()
        .unwrap();
    ok(&o, "busybox cat");
    assert_eq!(stdout(&o), "Hello World\n");
    let o = Command::new("busybox")
        .args(["sha256sum"])
        .arg(m.m("data/hello.txt"))
        .output()
        .unwrap();
    assert!(
        stdout(&o).starts_with("d2a84f4b8b650937ec8f73cd8be2c74add5a911ba64df27458ed8229da804a26"),
        "{}",
        stdout(&o)
    );
    // A gcc -static program reads one file and writes another.
    let src = m.env.write(
        "copy.c",
        "#include <stdio.h>\nint main(int c,char**v){FILE*i=fopen(v[1],\"r\");FILE*o=fopen(v[2],\"w\");\
         if(!i||!o)return 2;int ch;while((ch=fgetc(i))!=EOF)fputc(ch>='a'&&ch<='z'?ch-32:ch,o);\
         return fclose(o)?3:0;}\n",
    );
    let bin = m.env.path("copy");
    let o = Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .unwrap();
    ok(&o, "gcc -static");
    let o = Command::new(&bin)
        .arg(m.m("data/hello.txt"))
        .arg(m.m("data/upper.txt"))
        .output()
        .unwrap();
    ok(&o, "static copy");
    // Nothing of it is plaintext on disk.
    let plain_on_disk = Command::new("grep")
        .args(["-r", "-l", "HELLO WORLD"])
        .arg(m.env.path("vol"))
        .output()
        .unwrap();
    assert!(
        stdout(&plain_on_disk).is_empty(),
        "plaintext on disk: {}",
        stdout(&plain_on_disk)
    );
    let out = m.umount();
    assert_ne!(m.tag, "", "{out}");
    m.verify();
    let o = m.cat("/data/upper.txt");
    ok(&o, "cat after umount");
    assert_eq!(stdout(&o), "HELLO WORLD\n");
}

#[test]
fn fuse_tampered_files_fail_with_eio_and_unlisted_files_are_not_there() {
    let mut m = Mounted::new(false);
    m.umount();
    // Flip a byte of the ciphertext, drop an unlisted file beside it.
    let f = m.env.path("vol/hello.txt");
    flip(&f, 40, 0x01);
    m.env.write("vol/planted.txt", "planted\n");
    m.mount(false);
    let e = fs::read(m.m("data/hello.txt")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let e = fs::read(m.m("data/planted.txt")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    let names: Vec<_> = fs::read_dir(m.m("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["hello.txt"]);
    // Immutable: kernel regions take no writes.
    let e = fs::write(m.m("data/new"), "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
}

#[test]
fn fuse_mount_refuses_a_rolled_back_fspf() {
    let mut m = Mounted::new(true);
    let old = m.env.fspf_state();
    let old_tag = m.tag.clone();
    fs::write(m.m("data/new.txt"), "new\n").unwrap();
    m.umount();
    assert_ne!(m.tag, old_tag);
    m.env.restore_fspf_state(&old);
    let o = m.env.run([
        "mount",
        "fspf.pb",
        "mnt",
        "--key-file",
        "key",
        "--tag",
        &m.tag,
    ]);
    assert!(!o.status.success(), "a rolled-back fspf was mounted");
    assert!(stderr(&o).contains("tag"), "{}", stderr(&o));
}

#[test]
fn fuse_two_processes_appending_to_one_log_keep_every_line() {
    let mut m = Mounted::new(true);
    let o = m.sh(
        "for p in a b; do (i=0; while [ $i -lt 200 ]; do echo $p$i >> data/log; i=$((i+1)); done) & done; wait",
    );
    ok(&o, "appenders");
    let log = fs::read_to_string(m.m("data/log")).unwrap();
    assert_eq!(log.lines().count(), 400, "{log}");
    m.umount();
    let o = m.cat("/data/log");
    assert_eq!(stdout(&o).lines().count(), 400);
}

#[test]
fn fuse_tar_x_of_thousands_of_files_survives_a_remount() {
    need("tar", "tar");
    let mut m = Mounted::new(true);
    let src = m.env.mkdir("tree");
    for i in 0..2000 {
        m.env.write(
            format!("tree/d{}/f{i}", i % 40),
            format!("file {i}\n").repeat(i % 7 + 1),
        );
    }
    let o = Command::new("tar")
        .arg("-C")
        .arg(&src)
        .args(["-cf"])
        .arg(m.env.path("tree.tar"))
        .arg(".")
        .output()
        .unwrap();
    ok(&o, "tar c");
    fs::create_dir(m.m("data/x")).unwrap();
    let o = Command::new("tar")
        .arg("-C")
        .arg(m.m("data/x"))
        .arg("-xf")
        .arg(m.env.path("tree.tar"))
        .output()
        .unwrap();
    ok(&o, "tar x into the mount");
    m.umount();
    m.verify();
    m.mount(false);
    let o = Command::new("diff")
        .arg("-r")
        .arg(&src)
        .arg(m.m("data/x"))
        .output()
        .unwrap();
    ok(&o, "diff -r after remount");
}

#[test]
fn fuse_git_init_add_commit_fsck() {
    need("git", "git");
    let mut m = Mounted::new(true);
    let o = m.sh(
        "set -e; mkdir data/repo; cd data/repo; git init -q; echo 'int main(){}' > m.c; \
         git add m.c; git -c user.name=t -c user.email=t@e commit -q -m one; \
         echo more >> m.c; git -c user.name=t -c user.email=t@e commit -q -am two; git fsck --strict; \
         git log --oneline | wc -l",
    );
    ok(&o, "git");
    assert_eq!(stdout(&o).trim(), "2");
    m.umount();
    m.mount(false);
    let o = m.sh("cd data/repo && git fsck --strict && git log --oneline | wc -l");
    ok(&o, "git fsck after remount");
    assert_eq!(stdout(&o).trim(), "2");
}

#[test]
fn fuse_sqlite_wal_with_two_concurrent_writers_keeps_every_increment() {
    need("sqlite3", "sqlite3");
    let mut m = Mounted::new(true);
    let o = m.sh(
        "sqlite3 data/c.db 'PRAGMA journal_mode=WAL; CREATE TABLE c(n INTEGER); INSERT INTO c VALUES(0);' >/dev/null",
    );
    ok(&o, "create");
    let o = m.sh(
        "for p in 1 2; do (i=0; while [ $i -lt 100 ]; do \
         sqlite3 -cmd '.timeout 10000' data/c.db 'UPDATE c SET n = n + 1;' || exit 1; i=$((i+1)); done) & done; wait",
    );
    ok(&o, "writers");
    let o = m.sh("sqlite3 data/c.db 'SELECT n FROM c;'");
    assert_eq!(stdout(&o).trim(), "200", "{}", stderr(&o));
    m.umount();
    // A WAL database is opened read-write even to read it (its -shm index).
    m.mount(true);
    let o = m.sh("sqlite3 data/c.db 'PRAGMA integrity_check; SELECT n FROM c;'");
    assert_eq!(stdout(&o).trim(), "ok\n200", "{}", stderr(&o));
}

#[test]
fn fuse_python_shared_mmap_writes_are_read_back_after_remount() {
    let py = crate::shielded::real_python();
    let mut m = Mounted::new(true);
    let script = "import mmap\n\
        f = open('data/m.bin', 'w+b'); f.write(b'\\0' * 65536); f.flush()\n\
        mm = mmap.mmap(f.fileno(), 65536, mmap.MAP_SHARED)\n\
        mm[100:105] = b'hello'; mm[65000:65003] = b'end'; mm.flush(); mm.close(); f.close()\n";
    let o = Command::new(py)
        .arg("-c")
        .arg(script)
        .current_dir(m.env.path("mnt"))
        .output()
        .unwrap();
    ok(&o, "python mmap");
    m.umount();
    m.mount(false);
    let b = fs::read(m.m("data/m.bin")).unwrap();
    assert_eq!(b.len(), 65536);
    assert_eq!(&b[100..105], b"hello");
    assert_eq!(&b[65000..65003], b"end");
}

/// `fspf run --mount-namespace`: the reference's C example, built static (the preload cannot
/// see it), reads the plaintext at the region's own path, encrypted in place (embed path =
/// kernel path); outside the program's namespace the same path holds ciphertext. A write made
/// inside is committed, and the tag file names the new state.
#[test]
fn mount_namespace_runs_a_static_program_on_the_region_at_its_own_path() {
    need_fuse();
    need("gcc", "gcc");
    need("unshare", "util-linux");
    assert!(
        rustix::process::geteuid().is_root(),
        "--mount-namespace needs root; the test runs as root in CI"
    );
    let env = Env::new();
    // The region is encrypted in place: its embed path is its kernel directory.
    let data = env.mkdir("data");
    let ep = data.to_str().unwrap().to_string();
    env.write("plain/hello.txt", "Hello World\n");
    env.ok(["create", "fspf.pb"]);
    env.ok(["addr", "fspf.pb", "/", "--kernel", "/", "-n"]);
    env.ok(["addr", "fspf.pb", &ep, "-e", "--kernel", &ep]);
    env.ok(["addf", "fspf.pb", &ep, "plain", &ep]);
    let kt = env.encrypt(None);
    env.write("key", &kt.key);
    let src = env.write(
        "example.c",
        "#include <stdio.h>\n#include <string.h>\nint main(int c, char** v) {\n\
         char p[4096]; snprintf(p, sizeof p, \"%s/hello.txt\", v[1]);\n\
         FILE* f = fopen(p, \"r\"); if (!f) return 2; char b[100] = {0};\n\
         fread(b, 1, 99, f); fclose(f); printf(\"%s\", b);\n\
         snprintf(p, sizeof p, \"%s/out.txt\", v[1]); f = fopen(p, \"w\"); if (!f) return 3;\n\
         fputs(\"written inside\\n\", f); return fclose(f) ? 4 : 0; }\n",
    );
    let bin = env.path("example");
    let o = Command::new("gcc")
        .args(["-static", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .unwrap();
    ok(&o, "gcc -static");
    let o = env.run([
        "run",
        "--fspf",
        "fspf.pb",
        "--key-file",
        "key",
        "--tag",
        &kt.tag,
        "--mutable",
        "--tag-file",
        "tag",
        "--mount-namespace",
        "--",
        bin.to_str().unwrap(),
        &ep,
    ]);
    ok(&o, "fspf run --mount-namespace");
    assert_eq!(stdout(&o), "Hello World\n");
    // Outside, the kernel directory holds ciphertext, and no plaintext of the new file.
    let raw = fs::read(data.join("hello.txt")).unwrap();
    assert!(!raw.windows(5).any(|w| w == b"Hello"), "plaintext on disk");
    let out = fs::read(data.join("out.txt")).unwrap();
    assert!(
        !out.windows(7).any(|w| w == b"written"),
        "plaintext on disk"
    );
    let tag = fs::read_to_string(env.path("tag"))
        .unwrap()
        .trim()
        .to_string();
    assert_ne!(tag, kt.tag);
    let o = env.run([
        "cat",
        "fspf.pb",
        &format!("{ep}/out.txt"),
        "--key",
        &kt.key,
        "--tag",
        &tag,
    ]);
    ok(&o, "cat the file written inside");
    assert_eq!(stdout(&o), "written inside\n");
    // The namespace ended with the program: nothing is mounted at the region's path any more.
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&ep), "{mounts}");
}

/// A file with a 255-byte name could never be staged: its shadow name `.NAME.fspf-<id>` was
/// longer than a file name may be, every commit failed with `EIO` and the file was lost at
/// unmount (found by pjdfstest). The shadow name now keeps only the first 216 bytes of `NAME`.
#[test]
fn a_255_byte_name_could_not_be_staged_and_was_lost_at_unmount() {
    let mut m = Mounted::new(true);
    let name = "n".repeat(255);
    fs::write(m.m(&format!("data/{name}")), "long\n").unwrap();
    let f = fs::File::open(m.m(&format!("data/{name}"))).unwrap();
    f.sync_all().expect("fsync commits it");
    drop(f);
    let out = m.umount();
    assert!(!out.contains("failed"), "{out}");
    m.verify();
    let o = m.cat(&format!("/data/{name}"));
    ok(&o, "cat the long name");
    assert_eq!(stdout(&o), "long\n");
}

/// A mutable mount of `data_volume`'s fspf at `mnt` by a daemon in the foreground (its tag file
/// `tag`, a commit every `commit_ms`, `vars` in its environment), once the mount shows.
fn foreground_daemon(
    env: &Env,
    kt: &KeyTag,
    commit_ms: &str,
    vars: &[(&str, &str)],
) -> std::process::Child {
    let daemon = Command::new(FSPF)
        .args(mount_args(&kt.tag))
        .args([
            "--mutable",
            "--foreground",
            "--tag-file",
            "tag",
            "--commit-ms",
            commit_ms,
        ])
        .envs(vars.iter().copied())
        .current_dir(env.root())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !env.path("mnt/data/hello.txt").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the mount did not appear"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    daemon
}

/// SIGTERM (or Ctrl-C) to a foreground `fspf mount` unmounted nothing and lost what was staged
/// since the last commit; it now unmounts, so the session ends through its final commit, and the
/// tag file names the new state.
#[test]
fn sigterm_to_the_daemon_lost_what_was_written_since_the_last_commit() {
    let (env, kt) = data_volume();
    let mut daemon = foreground_daemon(&env, &kt, "600000", &[]);
    // Written and closed, not fsync'd; the commit interval is ten minutes away.
    fs::write(env.path("mnt/data/late.txt"), "late\n").unwrap();
    let o = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(o.success());
    let st = daemon.wait().unwrap();
    assert!(st.success(), "{st}");
    let tag = fs::read_to_string(env.path("tag"))
        .unwrap()
        .trim()
        .to_string();
    assert_ne!(tag, kt.tag, "nothing was committed");
    let o = env.run([
        "cat",
        "fspf.pb",
        "/data/late.txt",
        "--key",
        &kt.key,
        "--tag",
        &tag,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "late\n");
}

/// Owners and special files live in the fspf: `chown`, a file created by another user, a fifo
/// and a character device survive a remount, and the kernel enforces the owners' permissions
/// (another user cannot write a 0644 file it does not own, nor delete from a sticky directory).
#[test]
fn fuse_owners_and_special_files_are_recorded_and_enforced() {
    need("setpriv", "util-linux");
    let mut m = Mounted::new(true);
    let o = m.sh(
        "set -e; mkdir -m 1777 data/tmp; echo mine > data/tmp/root-file; \
         chown 65534:65534 data/hello.txt; mkfifo -m 0640 data/fifo; mknod -m 0600 data/null c 1 3; \
         setpriv --reuid 65534 --regid 65534 --clear-groups sh -c 'echo theirs > data/tmp/their-file'",
    );
    ok(&o, "chown, mkfifo, mknod, a file made by another user");
    m.umount();
    m.verify();
    m.mount(true);
    let st = |p: &str| {
        let o = m.sh(&format!("stat -c '%u:%g %F %a %t,%T' {p}"));
        stdout(&o).trim().to_string()
    };
    assert_eq!(st("data/hello.txt"), "65534:65534 regular file 644 0,0");
    assert_eq!(
        st("data/tmp/their-file"),
        "65534:65534 regular file 644 0,0"
    );
    assert_eq!(st("data/fifo"), "0:0 fifo 640 0,0");
    assert_eq!(st("data/null"), "0:0 character special file 600 1,3");
    // The fifo is a real pipe on the mount.
    let o = m.sh("(echo through > data/fifo &) ; cat data/fifo");
    assert_eq!(stdout(&o), "through\n");
    // Permissions are the owners': user 65534 may not write root's file, nor remove it from
    // the sticky directory; it may remove its own.
    let as_nobody = |script: &str| {
        m.sh(&format!(
            "setpriv --reuid 65534 --regid 65534 --clear-groups sh -c '{script}'"
        ))
    };
    assert!(!as_nobody("echo x >> data/tmp/root-file").status.success());
    assert!(!as_nobody("rm -f data/tmp/root-file").status.success());
    ok(&as_nobody("rm data/tmp/their-file"), "remove its own file");
    m.umount();
    let o = m.cat("/data/tmp/root-file");
    assert_eq!(stdout(&o), "mine\n");
}

/// pjdfstest found three times that did not move: a directory made since the last commit showed
/// the mount's start time, `O_TRUNC` left the modification time of a file as it was, and
/// `utimensat` on a symlink itself (`touch -h`) was dropped.
#[test]
fn new_directories_truncation_and_symlinks_showed_stale_times() {
    let m = Mounted::new(true);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let o = m.sh(
        "set -e; before=$(date +%s); mkdir data/d; stat -c %Y data/d; \
         echo old > data/t; touch -m -d @1000000000 data/t; : > data/t; stat -c %Y data/t; \
         ln -s t data/l; touch -h -m -d @1500000000 data/l; stat -c %Y data/l; echo $before",
    );
    ok(&o, "times");
    let v: Vec<i64> = stdout(&o)
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let before = v[3];
    assert!(
        v[0] >= before,
        "new directory's mtime {} before {before}",
        v[0]
    );
    assert!(v[1] >= before, "O_TRUNC kept the old mtime {}", v[1]);
    assert_eq!(v[2], 1_500_000_000, "the symlink's own mtime");
}

/// A mutable mount whose `/data/big` holds `n` bytes of a pattern (returned), written through
/// it and committed: mounted again, so it is a committed format-2 file and nothing is buffered.
fn mounted_with_big(n: usize) -> (Mounted, Vec<u8>) {
    let mut m = Mounted::new(true);
    let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    fs::write(m.m("data/big"), &data).unwrap();
    m.umount();
    m.mount(true);
    (m, data)
}

/// A large file changed through the mount while a reader holds it open: the change is an
/// in-place update (the kernel file keeps its inode), the open reader sees the new bytes, and
/// everything reads back after a remount.
#[test]
fn fuse_a_large_file_is_updated_in_place_and_an_open_reader_follows() {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::{FileExt, MetadataExt};
    let n = 2 << 20;
    let (mut m, data) = mounted_with_big(n);
    let kernel = m.env.path("vol/big");
    let ino = fs::metadata(&kernel).unwrap().ino();
    let mut reader = fs::File::open(m.m("data/big")).unwrap();
    let mut head = [0u8; 10];
    reader.read_exact(&mut head).unwrap();
    {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(m.m("data/big"))
            .unwrap();
        f.write_all_at(b"CHANGED!", 700_000).unwrap();
        f.sync_all().unwrap();
    }
    {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(m.m("data/big"))
            .unwrap();
        f.write_all(b"tail\n").unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(
        fs::metadata(&kernel).unwrap().ino(),
        ino,
        "updated in place"
    );
    let mut want = data.clone();
    want[700_000..700_008].copy_from_slice(b"CHANGED!");
    want.extend_from_slice(b"tail\n");
    // The reader opened before the updates (the kernel's page cache of the mount may still
    // hold what it read; direct reads of other ranges come from the daemon).
    reader.seek(SeekFrom::Start(700_000)).unwrap();
    let mut got = [0u8; 8];
    reader.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"CHANGED!");
    drop(reader);
    m.umount();
    m.mount(false);
    assert!(fs::read(m.m("data/big")).unwrap() == want);
    m.verify();
}

/// Update journals in the volume's tree directory.
fn journal_files(m: &Mounted) -> Vec<PathBuf> {
    fs::read_dir(m.env.path("fspf.pb.trees"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "journal"))
                .collect()
        })
        .unwrap_or_default()
}

/// The marks (`user.fspf.mark`: boot id, applied root, durable root) of the chunk trees in
/// the volume's tree directory (FORMAT.md §5b, "Journals in the log").
fn tree_marks(m: &Mounted) -> Vec<Vec<u8>> {
    fs::read_dir(m.env.path("fspf.pb.trees"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_none())
        .filter_map(|p| {
            let f = fs::File::open(&p).unwrap();
            let mut b = vec![0u8; 80];
            let n = rustix::fs::fgetxattr(&f, "user.fspf.mark", &mut b[..]).ok()?;
            b.truncate(n);
            Some(b)
        })
        .collect()
}

/// The daemon applies an in-place update's journal (carried by the commit's log record)
/// without syncing the file, and the unmount leaves the chain to the log, which keeps it until
/// a checkpoint (FORMAT.md §5b, chains and "Journals in the log"): no journal file at any
/// point, the tree's mark names the last root as applied but not as durable, and the content
/// is right after a remount.
#[test]
fn fuse_in_place_updates_keep_their_journals_in_the_log_not_in_files() {
    use std::os::unix::fs::FileExt;
    let n = 2 << 20;
    let (mut m, data) = mounted_with_big(n);
    let mut want = data.clone();
    {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(m.m("data/big"))
            .unwrap();
        for k in 0..5usize {
            let at = 100_000 + k * 300_000;
            f.write_all_at(&[b'a' + k as u8; 64], at as u64).unwrap();
            want[at..at + 64].fill(b'a' + k as u8);
            f.sync_all().unwrap();
        }
    }
    assert!(journal_files(&m).is_empty(), "the journals are in the log");
    let marks = tree_marks(&m);
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert_ne!(marks[0][16..48], marks[0][48..80], "applied, not synced");
    m.umount();
    assert!(journal_files(&m).is_empty(), "{:?}", journal_files(&m));
    let after = tree_marks(&m);
    assert_eq!(
        after[0][16..48],
        marks[0][16..48],
        "the unmount applied nothing more"
    );
    assert_ne!(
        after[0][16..48],
        after[0][48..80],
        "and left the chain to the log"
    );
    m.mount(false);
    assert!(fs::read(m.m("data/big")).unwrap() == want);
    m.verify();
}

/// Read opens of an unchanged committed version keep the kernel's page cache of it
/// (`FOPEN_KEEP_CACHE`); every change through the mount (rewrite, rename over it, an in-place
/// update of a format-2 file, a truncation) shows at the next read, never a stale page.
#[test]
fn fuse_a_reread_file_keeps_the_page_cache_only_while_its_version_is_unchanged() {
    use std::os::unix::fs::FileExt;
    let mut m = Mounted::new(true);
    let big: Vec<u8> = (0..(300u32 << 10)).map(|i| (i % 253) as u8).collect();
    fs::write(m.m("data/f"), "one\n").unwrap();
    fs::write(m.m("data/big"), &big).unwrap();
    m.umount();
    m.mount(true);
    for _ in 0..3 {
        assert_eq!(fs::read_to_string(m.m("data/f")).unwrap(), "one\n");
        assert!(fs::read(m.m("data/big")).unwrap() == big);
    }
    // Rewritten by another process through the mount.
    ok(&m.sh("printf 'two, longer\\n' > data/f"), "rewrite");
    assert_eq!(fs::read_to_string(m.m("data/f")).unwrap(), "two, longer\n");
    // Another file renamed over it.
    fs::write(m.m("data/g"), "gee\n").unwrap();
    fs::rename(m.m("data/g"), m.m("data/f")).unwrap();
    assert_eq!(fs::read_to_string(m.m("data/f")).unwrap(), "gee\n");
    // A format-2 file updated in place and truncated, each by its own open.
    {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(m.m("data/big"))
            .unwrap();
        f.write_all_at(b"NEW", 100_000).unwrap();
        f.sync_all().unwrap();
    }
    let mut want = big.clone();
    want[100_000..100_003].copy_from_slice(b"NEW");
    assert!(fs::read(m.m("data/big")).unwrap() == want);
    ok(&m.sh("truncate -s 5000 data/big"), "truncate");
    assert!(fs::read(m.m("data/big")).unwrap() == want[..5000]);
    // All of it committed: the same after a remount (no cache).
    m.umount();
    m.mount(false);
    assert_eq!(fs::read_to_string(m.m("data/f")).unwrap(), "gee\n");
    assert!(fs::read(m.m("data/big")).unwrap() == want[..5000]);
}

/// Regression: a file written, synced and then closed (`dd conv=fsync`) kept its plaintext
/// buffer in the daemon until some later commit: the daemon held the whole file in memory and
/// served reads from it instead of from the committed, verified file (which the page cache
/// could then have kept).
#[test]
fn fuse_a_file_synced_before_its_close_stayed_in_the_daemons_memory() {
    use std::io::Write;
    let m = Mounted::new(true);
    {
        let mut f = fs::File::create(m.m("data/synced")).unwrap();
        f.write_all(&vec![7u8; 100_000]).unwrap();
        f.sync_all().unwrap();
    }
    // The committed file on disk is what reads now come from (once the kernel's verified
    // pages of it are dropped): tampered, it fails verification.
    flip(&m.env.path("vol/synced"), 5000, 0x01);
    fs::write("/proc/sys/vm/drop_caches", "1")
        .expect("drop the page cache (the tests run as root)");
    match fs::read(m.m("data/synced")) {
        Ok(d) => panic!("{} bytes served from the daemon's buffer", d.len()),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
}

/// A file written through the mount and committed keeps the kernel's pages of it for the next
/// read open; a second writer's change, committed, is what the next read shows.
#[test]
fn fuse_a_file_written_through_the_mount_reads_back_its_committed_content() {
    let m = Mounted::new(true);
    for round in 0..3 {
        let body: Vec<u8> = (0..200_000u32)
            .map(|i| ((i + round * 7) % 251) as u8)
            .collect();
        let p = m.m("data/w");
        fs::write(&p, &body).unwrap();
        // A commit point (fsync of the directory), then read twice.
        fs::File::open(m.m("data")).unwrap().sync_all().unwrap();
        assert!(fs::read(&p).unwrap() == body, "round {round}");
        assert!(fs::read(&p).unwrap() == body, "round {round}");
        // Another process changes the middle in place.
        ok(
            &m.sh("printf XYZ | dd of=data/w bs=1 seek=100000 conv=notrunc status=none"),
            "dd",
        );
        let mut want = body.clone();
        want[100_000..100_003].copy_from_slice(b"XYZ");
        assert!(fs::read(&p).unwrap() == want, "round {round}");
    }
}

/// The daemon of `m`: the process with a `/dev/fuse` descriptor whose command line names this
/// volume's fspf, once its session threads run (`fspf mount` returns when the kernel's INIT is
/// answered; they start right after). Returns its pid and the numbers of its `/dev/fuse`
/// descriptors (the session's, its duplicate lent to the spin, and one clone per further
/// session thread).
fn daemon_of(m: &Mounted) -> (u32, Vec<String>) {
    let (pid, _) = find_daemon(m);
    for _ in 0..500 {
        if !session_threads(pid).is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    find_daemon(m)
}

fn find_daemon(m: &Mounted) -> (u32, Vec<String>) {
    let fspf = m.env.path("fspf.pb");
    let fspf = fspf.to_string_lossy();
    for p in fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.contains(" mount ") || !cmd.contains("fspf.pb") {
            continue;
        }
        let cwd = fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
        if !fspf.starts_with(&*cwd.to_string_lossy()) && !cmd.contains(&*fspf) {
            continue;
        }
        let fds: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|fd| fs::read_link(fd.path()).is_ok_and(|t| t == Path::new("/dev/fuse")))
            .map(|fd| fd.file_name().to_string_lossy().into_owned())
            .collect();
        if !fds.is_empty() {
            return (pid, fds);
        }
    }
    panic!("no daemon serving {fspf}");
}

/// Is the daemon's `/dev/fuse` descriptor `fd` in non-blocking mode (`O_NONBLOCK` in its
/// fdinfo)?
fn nonblocking(pid: u32, fd: &str) -> bool {
    let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).expect("fdinfo");
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .expect("flags line");
    u32::from_str_radix(flags.trim(), 8).expect("octal flags") & 0o4000 != 0
}

/// Is one of the daemon's `/dev/fuse` descriptors in non-blocking mode (a thread polls)?
fn polling(pid: u32, fds: &[String]) -> bool {
    fds.iter().any(|fd| nonblocking(pid, fd))
}

/// The names of the daemon's threads that serve FUSE requests (fuser's `fuser-N`).
fn session_threads(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("fuser-"))
        .collect()
}

/// CPU time of `pid` so far, in clock ticks (utime + stime).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// While requests come close together the session thread polls `/dev/fuse` (non-blocking
/// reads: no wake-up per request); once they stop it sleeps in `read` again and the idle daemon
/// uses no CPU.
#[test]
fn fuse_the_daemon_polls_while_requests_come_close_together_and_sleeps_when_idle() {
    let m = Mounted::new(false);
    let (pid, fds) = daemon_of(&m);
    let file = m.m("data/hello.txt");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (file, stop) = (file.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // open, read, flush and release: requests the kernel cannot answer itself
                let _ = fs::read(&file);
            }
        })
    };
    let mut seen = false;
    let mut others_sleep = false;
    for _ in 0..200 {
        if polling(pid, &fds) {
            seen = true;
            // One thread polls; the others read descriptors of their own, which stay
            // blocking (they sleep between requests).
            others_sleep = fds.iter().any(|fd| !nonblocking(pid, fd));
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().expect("reader");
    assert!(
        seen,
        "the session thread never polled during a burst of requests"
    );
    assert!(
        others_sleep,
        "every session thread polled: {} /dev/fuse descriptors, all non-blocking",
        fds.len()
    );
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(
        !polling(pid, &fds),
        "still polling 50 ms after the last request"
    );
    let before = cpu_ticks(pid);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let used = cpu_ticks(pid) - before;
    assert!(
        used <= 5,
        "the idle daemon used {used} ticks of CPU in 500 ms"
    );
}

/// Bytes the kernel allocated to the daemon's write buffers (its `fspf-fuse` memfds, each
/// counted once however many descriptors it has).
fn buffer_bytes(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let files: std::collections::BTreeMap<u64, u64> = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("daemon fds")
        .flatten()
        .filter(|fd| {
            fs::read_link(fd.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:fspf-fuse"))
        })
        .filter_map(|fd| fs::metadata(fd.path()).ok())
        .map(|m| (m.ino(), m.blocks() * 512))
        .collect();
    files.values().sum()
}

/// The most [`buffer_bytes`] of a daemon seen, sampled every 2 ms until [`PeakBuffers::stop`].
struct PeakBuffers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampler: std::thread::JoinHandle<u64>,
}

impl PeakBuffers {
    fn watch(pid: u32) -> PeakBuffers {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let sampler = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(buffer_bytes(pid));
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            peak
        });
        PeakBuffers { stop, sampler }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.sampler.join().expect("the sampler thread")
    }
}

/// A writer of a large file holds, in the daemon, what it wrote since the last commit: the
/// buffer is not loaded at open, reads of what was not written come from the committed file
/// (verified), and a commit gives the written bytes' memory back.
#[test]
fn fuse_a_writer_of_a_large_file_holds_what_it_wrote_not_the_file() {
    use std::os::unix::fs::FileExt;
    let n = 8 << 20;
    let (mut m, data) = mounted_with_big(n);
    let (pid, _) = daemon_of(&m);
    let mut want = data.clone();
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.m("data/big"))
        .unwrap();
    f.write_all_at(b"middle", 3_000_000).unwrap();
    want[3_000_000..3_000_006].copy_from_slice(b"middle");
    f.write_all_at(b"tail", n as u64).unwrap();
    want.extend_from_slice(b"tail");
    f.set_len(n as u64 + 2).unwrap();
    want.truncate(n + 2);
    f.write_all_at(b"past", n as u64 + 10).unwrap();
    want.resize(n + 10, 0);
    want.extend_from_slice(b"past");
    // (The page cache of the mount would serve the reads below: read around it.)
    fs::write("/proc/sys/vm/drop_caches", "1").expect("drop the page cache (root)");
    let held = buffer_bytes(pid);
    assert!(
        held <= 256 << 10,
        "{held} bytes held for a few written bytes"
    );
    let mut got = vec![0u8; want.len()];
    f.read_exact_at(&mut got, 0).unwrap();
    assert!(got == want, "read back through the unloaded buffer");
    f.sync_all().unwrap();
    assert!(buffer_bytes(pid) <= held, "a commit keeps nothing more");
    f.write_all_at(b"again", 10).unwrap();
    want[10..15].copy_from_slice(b"again");
    drop(f);
    m.umount();
    m.mount(false);
    assert!(fs::read(m.m("data/big")).unwrap() == want);
    m.verify();
}

/// Regression: a volume whose only region is `/data` (no region at `/`) mounted with a root
/// that could not be looked up: `ls MNT` failed with `ENOENT`, and so did every path below.
#[test]
fn fuse_the_mount_root_of_a_volume_without_a_root_region_was_not_found() {
    need_fuse();
    let env = Env::new();
    env.write("src/hello.txt", "Hello World\n");
    env.mkdir("vol");
    env.mkdir("mnt");
    env.ok(["create", "fspf.pb"]);
    let kernel = env.p("vol");
    env.ok(["addr", "fspf.pb", "/data", "-e", "--kernel", &kernel]);
    env.ok(["addf", "fspf.pb", "/data", "src", "vol"]);
    let kt = env.encrypt(None);
    env.write("key", &kt.key);
    let out = env.ok([
        "mount",
        "fspf.pb",
        "mnt",
        "--key-file",
        "key",
        "--tag",
        &kt.tag,
        "--mutable",
        "--allow-other",
    ]);
    assert!(out.starts_with("Mounted "), "{out}");
    let m = Mounted::already(env, kt);
    let names: Vec<_> = fs::read_dir(m.env.path("mnt"))
        .expect("the mount's root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["data"]);
    assert_eq!(
        fs::read_to_string(m.m("data/hello.txt")).unwrap(),
        "Hello World\n"
    );
    assert!(fs::metadata(m.m("etc")).is_err());
    // Nothing can be made outside the regions, even in a mutable mount.
    assert!(fs::create_dir(m.m("x")).is_err());
    assert!(fs::write(m.m("y"), "y").is_err());
}

/// A new file larger than the daemon's stream piece (32 MiB) is sealed while it is written:
/// the daemon never holds all of it; a read of the sealed part while it is written, a rewrite
/// below the sealed end and a truncation all see and keep the right bytes.
#[test]
fn fuse_a_new_large_file_is_sealed_while_written_and_never_held_whole() {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let mut m = Mounted::new(true);
    let (pid, _) = daemon_of(&m);
    let n: usize = 160 << 20;
    let block: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let stamped = |k: usize| {
        let mut b = block.clone();
        b[..8].copy_from_slice(&(k as u64).to_le_bytes());
        b
    };
    let peak = PeakBuffers::watch(pid);
    {
        let mut f = fs::File::create(m.m("data/large")).unwrap();
        for k in 0..n >> 20 {
            f.write_all(&stamped(k)).unwrap();
        }
        f.sync_all().unwrap();
    }
    let peak = peak.stop();
    assert!(
        peak < 100 << 20,
        "the daemon held {peak} bytes of a {n}-byte file"
    );
    // Another new file: read back while written, rewritten below its sealed end, truncated.
    {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(m.m("data/second"))
            .unwrap();
        for k in 0..80 {
            f.write_all(&stamped(k)).unwrap();
        }
        f.flush().unwrap();
        fs::write("/proc/sys/vm/drop_caches", "1").expect("drop the page cache (root)");
        let mut b = vec![0u8; 1 << 20];
        f.read_exact_at(&mut b, 3 << 20).unwrap();
        assert!(b == stamped(3), "the sealed part read back while written");
        f.write_all_at(b"REWRITE!", 5 << 20).unwrap();
        f.set_len(70 << 20).unwrap();
    }
    m.umount();
    m.mount(false);
    let got = fs::read(m.m("data/large")).unwrap();
    assert_eq!(got.len(), n);
    for (k, c) in got.chunks(1 << 20).enumerate() {
        assert!(c == stamped(k), "large: block {k}");
    }
    let got = fs::read(m.m("data/second")).unwrap();
    assert_eq!(got.len(), 70 << 20);
    for (k, c) in got.chunks(1 << 20).enumerate() {
        let mut want = stamped(k);
        if k == 5 {
            want[..8].copy_from_slice(b"REWRITE!");
        }
        assert!(c == want, "second: block {k}");
    }
    m.verify();
}

/// Appending much to a committed file commits every 32 MiB written (in-place updates whose
/// appended chunks are written once): the daemon holds about that much, not the append.
#[test]
fn fuse_a_large_append_to_a_committed_file_is_committed_in_pieces() {
    use std::io::Write;
    let mut m = Mounted::new(true);
    let base: Vec<u8> = (0..(4u32 << 20) + 100).map(|i| (i % 241) as u8).collect();
    fs::write(m.m("data/log"), &base).unwrap();
    m.umount();
    m.mount(true);
    let (pid, _) = daemon_of(&m);
    let block: Vec<u8> = (0..1 << 20).map(|i| (i % 239) as u8).collect();
    let peak = PeakBuffers::watch(pid);
    {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(m.m("data/log"))
            .unwrap();
        for _ in 0..128 {
            f.write_all(&block).unwrap();
        }
        f.sync_all().unwrap();
    }
    let peak = peak.stop();
    assert!(
        peak < 80 << 20,
        "the daemon held {peak} bytes of a 128 MiB append"
    );
    m.umount();
    m.mount(false);
    let got = fs::read(m.m("data/log")).unwrap();
    assert_eq!(got.len(), base.len() + (128 << 20));
    assert!(got[..base.len()] == base[..]);
    assert!(got[base.len()..].chunks(1 << 20).all(|c| c == &block[..]));
    m.verify();
}

/// A new file sealed as a stream and held open without a sync is still committed by the commit
/// interval once its grace (`FSPF_FUSE_STREAM_GRACE_MS`) is over: a daemon killed with
/// `kill -9` afterwards leaves it in the fspf. (Without the grace, the interval left open
/// streams alone for as long as they stayed open, and such a writer lost everything.)
#[test]
fn fuse_a_stream_held_open_without_sync_was_never_committed_by_the_interval() {
    use std::io::Write;
    let (env, kt) = data_volume();
    let mut daemon = foreground_daemon(&env, &kt, "100", &[("FSPF_FUSE_STREAM_GRACE_MS", "300")]);
    let block: Vec<u8> = (0..1 << 20).map(|i| (i % 233) as u8).collect();
    let mut f = fs::File::create(env.path("mnt/data/stream")).unwrap();
    for _ in 0..40 {
        f.write_all(&block).unwrap();
    }
    f.flush().unwrap();
    // Held open, never synced: the grace and a few intervals pass.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    Command::new("kill")
        .args(["-KILL", &daemon.id().to_string()])
        .status()
        .unwrap();
    let _ = daemon.wait();
    drop(f);
    let _ = Command::new("fusermount3")
        .arg("-uz")
        .arg(env.path("mnt"))
        .status();
    let tags = fs::read_to_string(env.path("tag")).unwrap();
    // The last tag named (the file is padded with empty lines while mounted).
    let tag = tags
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap()
        .to_string();
    let o = env.run([
        "cat",
        "fspf.pb",
        "/data/stream",
        "--key",
        &kt.key,
        "--tag",
        &tag,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // What the daemon had received when the interval committed it: the kernel's writeback
    // cache may still have held the last pages (never synced), so a prefix (31 MiB of the 40
    // in one run on a busy machine; without the grace, nothing).
    let n = o.stdout.len();
    assert!(n >= 8 << 20, "{n} bytes committed");
    assert!(o.stdout.chunks(1 << 20).all(|c| c == &block[..c.len()]));
}

/// Hard links were refused (`EPERM`) and every link count was 1: `ln`, `cp -al`, package
/// managers and pjdfstest's `link/*` failed. Now a file has several names, one inode, one
/// content, and its link count; they survive a remount.
#[test]
fn fuse_hard_links_are_one_file_under_several_names_and_survive_a_remount() {
    let mut m = Mounted::new(true);
    let st = |m: &Mounted, p: &str| {
        let o = m.sh(&format!("stat -c '%h %i %a' {p}"));
        assert!(o.status.success(), "stat {p}: {}", stderr(&o));
        stdout(&o).trim().to_string()
    };
    let o = m.sh(
        "set -e; cd data; echo one > a; mkdir sub; ln a b; ln b sub/c; echo two >> b; \
         chmod 600 sub/c",
    );
    ok(&o, "ln, append through a link, chmod through another");
    let a = st(&m, "data/a");
    assert!(a.starts_with("3 ") && a.ends_with(" 600"), "{a}");
    assert_eq!(st(&m, "data/b"), a);
    assert_eq!(st(&m, "data/sub/c"), a);
    assert_eq!(stdout(&m.sh("cat data/sub/c")), "one\ntwo\n");
    // The first name goes: the file lives on under the others.
    ok(&m.sh("rm data/a"), "rm the first name");
    assert!(st(&m, "data/b").starts_with("2 "));
    m.umount();
    m.verify();
    assert_eq!(stdout(&m.cat("/data/sub/c")), "one\ntwo\n");
    assert!(!m.env.path("vol/a").exists() && !m.env.path("vol/sub/c").exists());
    m.mount(true);
    assert!(st(&m, "data/sub/c").starts_with("2 "));
    // Two names of one file: `mv` changes nothing; a directory cannot be linked.
    // (`mv` refuses two names of one file itself: the call.)
    ok(
        &m.sh("perl -e 'rename \"data/sub/c\", \"data/b\" or die \"$!\"'"),
        "rename between two names of one file",
    );
    assert!(st(&m, "data/sub/c").starts_with("2 "));
    let o = m.sh("perl -e 'link \"data/sub\", \"data/sub2\" or die \"$!\n\"'");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not permitted"), "{}", stderr(&o));
    ok(&m.sh("rm data/b data/sub/c"), "rm the last names");
    m.umount();
    m.verify();
    assert!(!m.cat("/data/b").status.success());
}

/// `script` run by the real Python interpreter in the mount's directory.
fn python_in_mount(m: &Mounted, script: &str) -> std::process::Output {
    Command::new(crate::shielded::real_python())
        .arg("-c")
        .arg(script)
        .current_dir(m.env.path("mnt"))
        .output()
        .expect("python")
}

/// `fstat` of an open file whose last name was removed failed with `ENOENT` (the daemon
/// answered by the removed path); the kernel shows such a file with no links, and the size its
/// handle sees.
#[test]
fn fstat_of_an_open_file_whose_name_was_removed_failed() {
    let m = Mounted::new(true);
    let script = "import os\n\
        open('data/x', 'w').write('hello'); open('data/y', 'w').write('abc')\n\
        r = os.open('data/x', os.O_RDONLY); w = os.open('data/y', os.O_WRONLY | os.O_APPEND)\n\
        os.unlink('data/x'); os.unlink('data/y'); os.write(w, b'defg')\n\
        a = os.fstat(r); b = os.fstat(w)\n\
        print(a.st_nlink, a.st_size, b.st_nlink, b.st_size)\n";
    let o = python_in_mount(&m, script);
    ok(&o, "fstat of open unlinked files");
    assert_eq!(stdout(&o), "0 5 0 7\n");
}

/// An open file whose last name was removed, and a new file made at the same path: `fsync`,
/// `ftruncate` and `close` of the old one failed with `ENOENT` (the daemon looked its inode up
/// by the removed path; `fsync` and `close` send the file's times), and the new file got the
/// old one's inode number, so the kernel took both for one file (SQLite with two processes
/// lost increments when one removed the WAL another was about to sync).
#[test]
fn fsync_of_an_open_file_whose_name_was_removed_failed_and_a_new_file_there_shared_its_inode() {
    let m = Mounted::new(true);
    let script = "import os\n\
        old = os.open('data/x', os.O_CREAT | os.O_RDWR, 0o644); os.write(old, b'hello')\n\
        os.unlink('data/x')\n\
        new = os.open('data/x', os.O_CREAT | os.O_RDWR, 0o644); os.write(new, b'new')\n\
        os.write(old, b' world'); os.fsync(old); os.ftruncate(old, 8)\n\
        a = os.fstat(old); b = os.fstat(new)\n\
        print(a.st_ino != b.st_ino, a.st_nlink, a.st_size, os.pread(old, 100, 0).decode())\n\
        os.close(old); os.fsync(new); os.close(new)\n\
        print(open('data/x').read())\n";
    let o = python_in_mount(&m, script);
    ok(&o, "sync, truncate and close of an open unlinked file");
    assert_eq!(stdout(&o), "True 0 8 hello wo\nnew\n");
}

/// The daemon serves requests on several threads (`fspf_fuse::Config::threads`, 2 by default):
/// two large protected files read at once both come back whole, and a read of an open file is
/// served while a commit holds the daemon's state lock (here: blocked in opening the tag file,
/// which the test made a fifo). A single-threaded daemon answered that read only once the
/// commit was over.
#[test]
fn fuse_requests_are_served_by_several_threads_at_once() {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::sync::mpsc;
    use std::time::Duration;
    let n = 16 << 20;
    let mut m = Mounted::new(true);
    let a: Vec<u8> = pattern(n, 1);
    let b: Vec<u8> = pattern(n, 2);
    fs::write(m.m("data/a"), &a).unwrap();
    fs::write(m.m("data/b"), &b).unwrap();
    m.umount();
    let tag_file = m.env.path("tag");
    m.extra = vec!["--tag-file".into(), tag_file.to_string_lossy().into_owned()];
    m.mount(true);
    let (pid, _) = daemon_of(&m);
    // (`daemon_of` waits for the first session thread; the others start right after it.)
    let mut threads = session_threads(pid);
    for _ in 0..100 {
        if threads.len() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        threads = session_threads(pid);
    }
    assert!(
        threads.len() >= 2,
        "the daemon serves requests on {threads:?}"
    );
    // Two large files read at once, each by a thread of its own.
    let readers: Vec<_> = [("data/a", a.clone()), ("data/b", b.clone())]
        .into_iter()
        .map(|(rel, want)| {
            let p = m.m(rel);
            std::thread::spawn(move || fs::read(&p).map(|got| got == want))
        })
        .collect();
    for r in readers {
        assert!(r.join().expect("reader").expect("read"), "wrong bytes");
    }
    // A file open for reading (O_DIRECT: every read reaches the daemon).
    let reader = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.m("data/a"))
        .unwrap();
    let mut head = vec![0u8; 4096];
    reader.read_exact_at(&mut head, 0).unwrap();
    assert!(head == a[..4096]);
    // The next commit blocks in opening the tag file (a fifo nobody reads), holding the state.
    fs::remove_file(&tag_file).unwrap();
    let st = Command::new("mkfifo").arg(&tag_file).status().unwrap();
    assert!(st.success(), "mkfifo");
    let w = m.m("data/w");
    let (done_tx, done_rx) = mpsc::channel();
    let writer = std::thread::spawn(move || {
        let r = fs::File::create(&w).and_then(|f| {
            use std::io::Write;
            (&f).write_all(b"w")?;
            f.sync_all()
        });
        let _ = done_tx.send(());
        r
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        done_rx.try_recv().is_err(),
        "the fsync did not wait for the tag file: the commit did not block"
    );
    // Meanwhile a read of the open file is served.
    let (read_tx, read_rx) = mpsc::channel();
    let want = a[8 << 20..(8 << 20) + (256 << 10)].to_vec();
    let read = std::thread::spawn(move || {
        let mut got = vec![0u8; 256 << 10];
        let r = reader
            .read_exact_at(&mut got, 8 << 20)
            .map(|()| got == want);
        let _ = read_tx.send(r.is_ok_and(|same| same));
    });
    let served = read_rx.recv_timeout(Duration::from_secs(10));
    let commit_still_blocked = done_rx.try_recv().is_err();
    // Let the commit go on (a reader of the fifo): it finds a fifo, not a file, and fails.
    // The fifo keeps a reader until it is gone, so that no later commit blocks in it.
    let fifo = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&tag_file)
        .unwrap();
    let _ = writer.join().expect("writer");
    fs::remove_file(&tag_file).unwrap();
    drop(fifo);
    let _ = read.join();
    assert_eq!(
        served,
        Ok(true),
        "a read of an open file waited for a commit"
    );
    assert!(
        commit_still_blocked,
        "the read was served only after the commit"
    );
    // The mount goes on: a commit writes the tag file again, and the files read back.
    fs::write(m.m("data/w2"), "w2").unwrap();
    fs::File::open(m.m("data")).unwrap().sync_all().unwrap();
    assert!(fs::metadata(&tag_file).unwrap().is_file());
    m.umount();
    m.mount(false);
    assert!(fs::read(m.m("data/b")).unwrap() == b);
    assert_eq!(fs::read_to_string(m.m("data/w2")).unwrap(), "w2");
}

/// Small new files are staged by the commit, together (their shadows written on the daemon's
/// pool), not one by one at their close: after the closes and before a commit, nothing of them
/// is on disk; renames and removals made meanwhile are what the commit records.
#[test]
fn fuse_small_files_closed_are_staged_together_by_the_commit() {
    // No commit by the interval during the test: only the directory's `fsync` below.
    let mut m = mounted_without_interval("");
    fs::create_dir(m.m("data/s")).unwrap();
    let body = |i: usize| format!("small file {i}\n").repeat(i + 1).into_bytes();
    for i in 0..20 {
        fs::write(m.m(&format!("data/s/f{i}")), body(i)).unwrap();
    }
    // (A close's release reaches the daemon after the close returns: give it time.)
    std::thread::sleep(std::time::Duration::from_millis(300));
    let on_disk = |m: &Mounted| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(m.env.path("vol/s"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert!(
        on_disk(&m).is_empty(),
        "staged at the close: {:?}",
        on_disk(&m)
    );
    // Read back before the commit, from the daemon's buffers.
    assert_eq!(fs::read(m.m("data/s/f7")).unwrap(), body(7));
    fs::rename(m.m("data/s/f1"), m.m("data/s/g1")).unwrap();
    fs::remove_file(m.m("data/s/f2")).unwrap();
    fs::File::open(m.m("data/s")).unwrap().sync_all().unwrap();
    let mut want: Vec<String> = (0..20)
        .filter(|i| *i != 1 && *i != 2)
        .map(|i| format!("f{i}"))
        .chain(["g1".to_string()])
        .collect();
    want.sort();
    assert_eq!(on_disk(&m), want, "the commit wrote each file at its name");
    m.umount();
    m.verify();
    m.mount(true);
    for i in (0..20).filter(|i| *i != 1 && *i != 2) {
        assert_eq!(
            fs::read(m.m(&format!("data/s/f{i}"))).unwrap(),
            body(i),
            "f{i}"
        );
    }
    assert_eq!(fs::read(m.m("data/s/g1")).unwrap(), body(1));
    assert!(!m.m("data/s/f1").exists() && !m.m("data/s/f2").exists());
}

/// A mutable mount that commits only when asked (no commit by the interval during a test), its
/// daemon started by `sh -c "{shell}exec fspf mount …"` (e.g. `ulimit -Sn 64 && `).
fn mounted_without_interval(shell: &str) -> Mounted {
    let mut m = Mounted::new(true);
    m.umount();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{shell}exec \"$@\""))
        .arg("sh")
        .arg(FSPF)
        .args(mount_args(&m.tag))
        .args(["--commit-ms", "600000", "--mutable"])
        .current_dir(m.env.root())
        .output()
        .expect("sh");
    ok(&out, &format!("fspf mount under `{shell}`"));
    m.mounted = true;
    m
}

/// The daemon holds a memfd per file buffer (a batch of up to 500 files between commits): one
/// started under a low soft limit on open files (as services often are) failed every further
/// create with `EIO` once the buffers had used the limit up (the 54th small file under 64).
/// It raises its soft limit to the hard one.
#[test]
fn a_daemon_started_with_a_low_open_file_limit_failed_with_eio_after_fifty_files() {
    let mut m = mounted_without_interval("ulimit -Sn 64 && ");
    small_files_survive_a_remount(&mut m, 200);
}

/// A daemon whose hard limit on open files was used up by its buffers (a memfd each) answered
/// every further create with `EIO`, as if data were damaged. It now commits what is staged or
/// waiting when it runs out (which lets the buffers nobody writes go), from descriptors it keeps
/// in reserve for that, and creates go on; if none come free, the program sees `EMFILE`.
#[test]
fn a_daemon_out_of_descriptors_failed_every_create_with_eio() {
    let mut m = mounted_without_interval("ulimit -n 64 && ");
    small_files_survive_a_remount(&mut m, 300);
}

/// Write `n` small files through `m`, unmount, verify, mount again and read them back.
fn small_files_survive_a_remount(m: &mut Mounted, n: usize) {
    for i in 0..n {
        fs::write(m.m(&format!("data/f{i}")), format!("file {i}\n"))
            .unwrap_or_else(|e| panic!("file {i}: {e}"));
    }
    m.umount();
    m.verify();
    m.mount(true);
    for i in 0..n {
        assert_eq!(
            fs::read_to_string(m.m(&format!("data/f{i}"))).unwrap(),
            format!("file {i}\n")
        );
    }
}

/// A mutable mount without the commit interval whose kernel directory `vol` is a tmpfs of
/// `size` (e.g. `8m`); the tmpfs is unmounted when the guard drops (before the mount).
fn mounted_on_tmpfs(size: &str) -> (Mounted, Tmpfs) {
    need_fuse();
    let env = Env::new();
    env.write("src/hello.txt", "Hello World\n");
    env.mkdir("vol");
    env.mkdir("mnt");
    let tmpfs = Tmpfs::mount(&env.path("vol"), size);
    env.two_regions("/data", "-e", "vol");
    env.ok(["addf", "fspf.pb", "/data", "src", "vol"]);
    let kt = env.encrypt(None);
    env.write("key", &kt.key);
    let mut args = mount_args(&kt.tag).to_vec();
    args.extend(["--commit-ms", "600000", "--mutable"]);
    env.ok(&args);
    (Mounted::already(env, kt), tmpfs)
}

/// Write `body` to `name` in `m` and `fsync` it.
fn put_synced(m: &Mounted, name: &str, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = fs::File::create(m.m(name))?;
    f.write_all(body)?;
    f.sync_all()
}

/// A file that found no room on the kernel side (`fsync` answered `ENOSPC`) still found none
/// after the program removed another file to make room: the removal was queued behind the
/// failed stage and freed nothing until the next commit. As on a plain file system, the second
/// `fsync` now succeeds.
#[test]
fn fsync_after_removing_a_file_to_make_room_still_failed_with_enospc() {
    let (mut m, _tmpfs) = mounted_on_tmpfs("8m");
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    put_synced(&m, "data/a", &body).unwrap();
    put_synced(&m, "data/b", &body).unwrap();
    let e = put_synced(&m, "data/c", &body).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    fs::remove_file(m.m("data/a")).unwrap();
    fs::File::open(m.m("data/c"))
        .unwrap()
        .sync_all()
        .expect("fsync after a removal made room");
    m.umount();
    m.verify();
    m.mount(true);
    assert!(fs::read(m.m("data/c")).unwrap() == body);
    assert!(fs::read(m.m("data/b")).unwrap() == body);
    assert!(!m.m("data/a").exists());
}

/// The daemon's commit stages every changed file: one that found no room (a large file that
/// stays in memory) made every other file's `fsync` answer `ENOSPC` too, though they were
/// committed. Each `fsync` now answers for its own file.
#[test]
fn fsync_of_a_small_file_failed_with_enospc_because_a_large_one_found_no_room() {
    let (mut m, _tmpfs) = mounted_on_tmpfs("8m");
    let big = vec![7u8; 20 << 20];
    let e = put_synced(&m, "data/big", &big).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    put_synced(&m, "data/small", b"fits\n").expect("fsync of a file that fits");
    // The large file is still there, whole, in memory.
    assert!(fs::read(m.m("data/big")).unwrap() == big);
    fs::remove_file(m.m("data/big")).unwrap();
    m.umount();
    m.verify();
    m.mount(true);
    assert_eq!(fs::read(m.m("data/small")).unwrap(), b"fits\n");
    assert!(!m.m("data/big").exists());
}

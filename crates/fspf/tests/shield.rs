//! End-to-end tests of the in-process shield: real programs (cc-compiled C, python3, coreutils,
//! sqlite3, sh) under `fspf run` / `LD_PRELOAD=libfspf_preload.so`. Each test has its own temp
//! dir. A missing tool fails the test (CI installs them), it never skips.
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn fspf_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fspf"))
}

// The preload library, the tool check and the real interpreter are shared with the integration
// suite (`tests/integration/shielded.rs`).
#[path = "integration/shielded.rs"]
mod shielded;
use shielded::{need, preload, real_python, Tmpfs};

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({:?})\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// One test's world: a temp dir holding an fspf, its key and current tag.
struct World {
    dir: tempfile::TempDir,
    fspf: PathBuf,
    key: String,
    tag: String,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let fspf = dir.path().join("fspf.pb");
        World {
            dir,
            fspf,
            key: String::new(),
            tag: String::new(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn p(&self, rel: &str) -> String {
        self.path(rel).display().to_string()
    }

    /// Run the fspf CLI; must succeed.
    fn cli(&self, args: &[&str]) -> String {
        let o = Command::new(fspf_bin())
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("SCONE_FSPF_KEY")
            .env_remove("SCONE_FSPF_TAG")
            .env_remove("SCONE_FSPF")
            .output()
            .expect("fspf");
        ok(&o, &format!("fspf {args:?}"));
        stdout(&o)
    }

    fn create(&self) {
        self.cli(&["create", "fspf.pb"]);
    }

    fn addr(&self, args: &[&str]) {
        let mut a = vec!["addr", "fspf.pb"];
        a.extend_from_slice(args);
        self.cli(&a);
    }

    /// `fspf encrypt`; remembers key and tag (awk $9 / $11 as in the reference).
    fn encrypt(&mut self) {
        let out = self.cli(&["encrypt", "fspf.pb"]);
        let w: Vec<&str> = out.split_whitespace().collect();
        self.tag = w[8].to_string();
        self.key = w[10].to_string();
    }

    fn tag_on_disk(&self) -> String {
        self.cli(&["show", "--tag", "fspf.pb"]).trim().to_string()
    }

    fn write(&self, rel: &str, data: &[u8]) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, data).expect("write");
    }

    /// `fspf run` with this world's key and tag; `mutable` adds --mutable.
    fn run_opts(&self, mutable: bool, tag: &str, argv: &[&str]) -> Output {
        shielded::fspf_run(
            self.dir.path(),
            &self.fspf,
            &self.anchor_with(tag),
            mutable,
            None,
            argv,
        )
        .output()
        .expect("fspf run")
    }

    /// This world's key with `tag`.
    fn anchor_with(&self, tag: &str) -> shielded::Anchor {
        shielded::Anchor {
            key: self.key.clone(),
            tag: tag.to_string(),
        }
    }

    fn run(&self, argv: &[&str]) -> Output {
        self.run_opts(false, &self.tag, argv)
    }

    /// Mutable run; afterwards the world's tag is the one on disk.
    fn run_mut(&mut self, argv: &[&str]) -> Output {
        let o = self.run_opts(true, &self.tag.clone(), argv);
        self.tag = self.tag_on_disk();
        o
    }

    /// The shielded program under plain LD_PRELOAD + SCONE_FSPF_* (the reference's way).
    fn preload_env(&self, argv: &[&str], mutable: bool) -> Output {
        let mut c = Command::new(argv[0]);
        c.args(&argv[1..])
            .current_dir(self.dir.path())
            .env("LD_PRELOAD", preload())
            .env("LC_ALL", "C")
            .env("SCONE_FSPF", &self.fspf)
            .env("SCONE_FSPF_KEY", &self.key)
            .env("SCONE_FSPF_TAG", &self.tag)
            .env_remove("FSPF_ANCHOR_FD")
            .stdin(Stdio::null());
        if mutable {
            c.env("SCONE_FSPF_MUTABLE", "1");
        }
        c.output().expect("spawn")
    }

    /// Compile a C program into the temp dir (at test time, with cc).
    fn cc(&self, name: &str, src: &str, extra: &[&str]) -> String {
        need("cc");
        let c = self.path(&format!("{name}.c"));
        std::fs::write(&c, src).expect("write c");
        let exe = self.p(name);
        let o = Command::new("cc")
            .arg(&c)
            .arg("-o")
            .arg(&exe)
            .args(extra)
            .output()
            .expect("cc");
        ok(&o, "cc");
        exe
    }

    /// Flip one byte in the middle of a kernel file.
    fn tamper(&self, rel: &str) {
        let p = self.path(rel);
        let mut b = std::fs::read(&p).expect("read for tamper");
        let i = b.len() / 2 + 8;
        let i = i.min(b.len() - 1);
        b[i] ^= 0x20;
        std::fs::write(&p, b).expect("tamper");
    }
}

const HELLO: &str = "Hello World\n";
const WORLD_PY: &str = "f = open('/data/hello.txt', 'r')\nprint(str(f.read()))\n";

/// The reference's first example: /data encrypted, kernel dir `vol` (embed path /data does not
/// exist on the host).
fn data_world() -> World {
    let mut w = World::new();
    w.write("data-original/hello.txt", HELLO.as_bytes());
    w.write("data-original/world.py", WORLD_PY.as_bytes());
    std::fs::create_dir_all(w.path("vol")).expect("vol");
    w.create();
    w.addr(&["/", "--kernel", "/", "--not-protected"]);
    w.addr(&["/data", "--encrypted", "--kernel", &w.p("vol")]);
    w.cli(&["addf", "fspf.pb", "/data", "data-original", &w.p("vol")]);
    w.encrypt();
    w
}

const EXAMPLE_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>

void printfile(const char* fn) {
    FILE *fp = fopen(fn, "r");
    if (!fp) { perror(fn); exit(1); }
    int c;
    while((c=fgetc(fp))!=EOF){
        printf("%c",c);
    }
    if (ferror(fp)) { perror(fn); exit(2); }
    fclose(fp);
}

int main() {
    printfile("/data/hello.txt");
    printfile("/data/world.py");
}
"#;

#[test]
fn reference_c_example_prints_plaintext_only_under_the_shield() {
    let w = data_world();
    let exe = w.cc("example", EXAMPLE_C, &[]);
    let o = w.run(&[&exe]);
    ok(&o, "shielded example");
    assert_eq!(stdout(&o), format!("{HELLO}{WORLD_PY}"));
    // Same program via plain env vars, as in the reference.
    let o = w.preload_env(&[&exe], false);
    ok(&o, "LD_PRELOAD example");
    assert_eq!(stdout(&o), format!("{HELLO}{WORLD_PY}"));
    // Without the shield /data does not exist here; the kernel files are ciphertext.
    let o = Command::new(&exe).output().expect("run");
    assert!(!o.status.success());
    let raw = std::fs::read(w.path("vol/hello.txt")).expect("cipher");
    assert!(
        !raw.windows(5).any(|x| x == b"Hello"),
        "ciphertext leaks plaintext"
    );
}

#[test]
fn reference_c_example_fails_on_tampered_ciphertext() {
    let w = data_world();
    let exe = w.cc("example", EXAMPLE_C, &[]);
    w.tamper("vol/hello.txt");
    let o = w.run(&[&exe]);
    assert!(!o.status.success(), "tampered file was read");
    assert!(
        !stdout(&o).contains("Hello"),
        "wrong bytes printed: {}",
        stdout(&o)
    );
}

#[test]
fn python_runs_an_encrypted_script_reading_an_encrypted_file() {
    need("python3");
    let w = data_world();
    let o = w.run(&["python3", "/data/world.py"]);
    ok(&o, "python3 /data/world.py");
    assert_eq!(stdout(&o), "Hello World\n\n");
    w.tamper("vol/world.py");
    let o = w.run(&["python3", "/data/world.py"]);
    assert!(!o.status.success());
    assert!(!stdout(&o).contains("Hello"));
}

#[test]
fn bad_key_or_old_tag_is_refused() {
    need("cat");
    let w = data_world();
    let o = w.run_opts(
        false,
        "00112233445566778899aabbccddeeff",
        &["cat", "/data/hello.txt"],
    );
    assert!(!o.status.success());
    assert!(!stdout(&o).contains("Hello"));
    // Directly under LD_PRELOAD with a wrong tag: fail safe (EACCES), one clear line.
    let mut bad = World {
        dir: tempfile::tempdir().expect("tmp"),
        fspf: w.fspf.clone(),
        key: w.key.clone(),
        tag: "00112233445566778899aabbccddeeff".into(),
    };
    bad.dir = tempfile::tempdir().expect("tmp");
    let o = bad.preload_env(&["cat", "/data/hello.txt"], false);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("tag mismatch"));
}

#[test]
fn coreutils_read_through_the_shield() {
    for t in [
        "cat",
        "cp",
        "ls",
        "sha256sum",
        "head",
        "tail",
        "dd",
        "mv",
        "rm",
    ] {
        need(t);
    }
    let mut w = data_world();
    let o = w.run(&["cat", "/data/hello.txt"]);
    ok(&o, "cat");
    assert_eq!(stdout(&o), HELLO);
    let o = w.run(&["sha256sum", "/data/hello.txt"]);
    ok(&o, "sha256sum");
    assert!(
        stdout(&o).starts_with("d2a84f4b8b650937ec8f73cd8be2c74add5a911ba64df27458ed8229da804a26")
    );
    let o = w.run(&["head", "-c", "5", "/data/hello.txt"]);
    assert_eq!(stdout(&o), "Hello");
    let o = w.run(&["tail", "-c", "6", "/data/hello.txt"]);
    assert_eq!(stdout(&o), "World\n");
    let o = w.run(&["dd", "if=/data/hello.txt", "bs=3", "status=none"]);
    ok(&o, "dd");
    assert_eq!(stdout(&o), HELLO);
    let o = w.run(&["ls", "-l", "/data"]);
    ok(&o, "ls -l");
    let s = stdout(&o);
    assert!(
        s.contains(" 12 ") && s.contains("hello.txt") && s.contains("world.py"),
        "{s}"
    );
    // cp out of the region yields plaintext; cp/mv/rm inside it need --mutable.
    let out = w.p("plain-copy.txt");
    ok(&w.run(&["cp", "/data/hello.txt", &out]), "cp out");
    assert_eq!(std::fs::read_to_string(&out).expect("copy"), HELLO);
    let o = w.run(&["cp", "/data/hello.txt", "/data/copy.txt"]);
    assert!(
        !o.status.success(),
        "write to a read-only protected region succeeded"
    );
    let o = w.run_mut(&[
        "sh",
        "-c",
        "cp /data/hello.txt /data/copy.txt && mv /data/copy.txt /data/moved.txt && rm /data/world.py && ls /data && cat /data/moved.txt",
    ]);
    ok(&o, "cp/mv/rm");
    assert_eq!(stdout(&o), format!("hello.txt\nmoved.txt\n{HELLO}"));
    let raw = std::fs::read(w.path("vol/moved.txt")).expect("moved on disk");
    assert!(!raw.windows(5).any(|x| x == b"Hello"));
    assert!(!w.path("vol/world.py").exists());
    let o = w.run(&["cat", "/data/moved.txt"]);
    assert_eq!(stdout(&o), HELLO);
    // Tampered: every tool fails rather than printing wrong bytes.
    w.tamper("vol/hello.txt");
    for argv in [
        vec!["cat", "/data/hello.txt"],
        vec!["sha256sum", "/data/hello.txt"],
        vec!["head", "-c", "5", "/data/hello.txt"],
        vec!["dd", "if=/data/hello.txt", "status=none"],
    ] {
        let o = w.run(&argv);
        assert!(!o.status.success(), "{argv:?} succeeded on a tampered file");
        assert!(
            !stdout(&o).contains("Hello"),
            "{argv:?} printed bytes of a tampered file"
        );
    }
    let o = w.run(&["cp", "/data/hello.txt", &w.p("bad-copy")]);
    assert!(!o.status.success());
}

#[test]
fn python_stdlib_copy_listdir_and_readonly_mmap() {
    need("python3");
    let w = data_world();
    let script = format!(
        r#"
import os, shutil, mmap
print(sorted(os.listdir('/data')))
shutil.copyfile('/data/hello.txt', '{out}')
with open('/data/hello.txt', 'rb') as f:
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    print(m[:11].decode())
print(os.path.getsize('/data/world.py'))
"#,
        out = w.p("copied.txt")
    );
    let o = w.run(&["python3", "-c", &script]);
    ok(&o, "python stdlib");
    assert_eq!(
        stdout(&o),
        format!(
            "['hello.txt', 'world.py']\nHello World\n{}\n",
            WORLD_PY.len()
        )
    );
    assert_eq!(
        std::fs::read_to_string(w.path("copied.txt")).expect("copy"),
        HELLO
    );
    w.tamper("vol/hello.txt");
    let o = w.run(&["python3", "-c", &script]);
    assert!(!o.status.success());
    assert!(!stdout(&o).contains("Hello"));
}

#[test]
fn python_writes_a_new_file_then_a_second_run_reads_it_with_the_new_tag() {
    need("python3");
    let mut w = data_world();
    let old_tag = w.tag.clone();
    let o = w.run_mut(&[
        "python3",
        "-c",
        "f = open('/data/helloworld.py', 'w')\nf.write('print(\"Hello World\")\\n')\nf.close()",
    ]);
    ok(&o, "writer");
    assert_ne!(w.tag, old_tag);
    let o = w.run(&["python3", "/data/helloworld.py"]);
    ok(&o, "reader with new tag");
    assert_eq!(stdout(&o), "Hello World\n");
    // The old tag is refused: the fspf on disk is newer than what it vouches for.
    let o = w.run_opts(false, &old_tag, &["python3", "/data/helloworld.py"]);
    assert!(!o.status.success());
    let o = w.preload_env(&["cat", "/data/hello.txt"], false);
    ok(&o, "new tag via env");
    let mut stale = World {
        dir: tempfile::tempdir().expect("tmp"),
        fspf: w.fspf.clone(),
        key: w.key.clone(),
        tag: old_tag,
    };
    stale.tag = stale.tag.clone();
    let o = stale.preload_env(&["cat", "/data/hello.txt"], false);
    assert!(!o.status.success(), "stale tag accepted");
    assert!(!stdout(&o).contains("Hello"));
    // Tampered new file: refused.
    w.tamper("vol/helloworld.py");
    let o = w.run(&["python3", "/data/helloworld.py"]);
    assert!(!o.status.success());
}

#[test]
fn authenticated_region_refuses_unlisted_files_and_runs_listed_ones() {
    need("python3");
    let mut w = World::new();
    w.write("app/helloworld.py", b"print(\"Hello World\")\n");
    w.create();
    w.addr(&["/", "--kernel", "/", "--not-protected"]);
    w.addr(&["/app", "--authenticated", "--kernel", &w.p("app")]);
    w.cli(&["addf", "fspf.pb", "/app", "app"]);
    w.encrypt();
    // Added after the fspf was sealed: not listed.
    w.write("app/helloworld-manual.py", b"print(\"Hello World\")\n");
    let o = w.run(&["python3", "/app/helloworld-manual.py"]);
    assert!(!o.status.success(), "unlisted file ran");
    assert!(String::from_utf8_lossy(&o.stderr).contains("No such file"));
    let o = w.run(&["python3", "/app/helloworld.py"]);
    ok(&o, "listed script");
    assert_eq!(stdout(&o), "Hello World\n");
    // Plaintext stays on disk in authenticated regions.
    assert!(std::fs::read_to_string(w.path("app/helloworld.py"))
        .expect("read")
        .contains("Hello"));
    // A mutable run adds a file the shield then accepts.
    let o = w.run_mut(&[
        "python3",
        "-c",
        "open('/app/added.py','w').write('print(\"added\")\\n')",
    ]);
    ok(&o, "add file");
    let o = w.run(&["python3", "/app/added.py"]);
    assert_eq!(stdout(&o), "added\n");
    w.tamper("app/helloworld.py");
    let o = w.run(&["python3", "/app/helloworld.py"]);
    assert!(!o.status.success(), "tampered authenticated file ran");
}

const WRITER_C: &str = r#"
#include <stdio.h>
int main() {
    FILE *fp = fopen("/mnt/authenticated/hello", "w");
    if (!fp) { perror("authenticated"); return 1; }
    fprintf(fp, "hello world\n");
    fclose(fp);

    fp = fopen("/mnt/encrypted/hello", "w");
    if (!fp) { perror("encrypted"); return 1; }
    fprintf(fp, "hello world\n");
    fclose(fp);
    return 0;
}
"#;

const CAT_C: &str = r#"
#include <stdio.h>
int main() {
    char buf[80];
    FILE *fp = fopen("/mnt/authenticated/hello", "r");
    if (!fp || !fgets(buf, sizeof(buf), fp)) { perror("authenticated"); return 1; }
    fclose(fp);
    printf("read: '%s'\n", buf);

    fp = fopen("/mnt/encrypted/hello", "r");
    if (!fp || !fgets(buf, sizeof(buf), fp)) { perror("encrypted"); return 1; }
    fclose(fp);
    printf("read: '%s'\n", buf);
    return 0;
}
"#;

const EPHEMERAL_C: &str = r#"
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
int main() {
    if (mkdir("/scratch", 0755)) { perror("mkdir"); return 1; }
    FILE *fp = fopen("/scratch/note", "w");
    if (!fp) { perror("open"); return 1; }
    fprintf(fp, "in memory\n");
    fclose(fp);
    char b[64] = {0};
    fp = fopen("/scratch/note", "r");
    if (!fp || !fgets(b, sizeof b, fp)) { perror("read"); return 1; }
    fclose(fp);
    printf("%s", b);
    struct stat st;
    if (stat("/scratch/note", &st) || st.st_size != 10) return 2;
    return 0;
}
"#;

#[test]
fn reference_extended_example_ephemeral_root_with_kernel_regions() {
    need("cat");
    let mut w = World::new();
    std::fs::create_dir_all(w.path("original")).expect("orig");
    std::fs::create_dir_all(w.path("mnt/authenticated")).expect("a");
    std::fs::create_dir_all(w.path("mnt/encrypted")).expect("e");
    w.create();
    w.addr(&["/", "-e", "--ephemeral"]);
    w.addr(&[
        "/mnt/authenticated",
        "-a",
        "--kernel",
        &w.p("mnt/authenticated"),
    ]);
    w.addr(&["/mnt/encrypted", "-e", "--kernel", &w.p("mnt/encrypted")]);
    w.cli(&["addf", "fspf.pb", "/mnt/authenticated", "./original"]);
    w.cli(&[
        "addf",
        "fspf.pb",
        "/mnt/encrypted",
        "./original",
        "./mnt/encrypted",
    ]);
    w.encrypt();
    let writer = w.cc("sgxex", WRITER_C, &[]);
    let reader = w.cc("sgxcat", CAT_C, &[]);
    let eph = w.cc("eph", EPHEMERAL_C, &[]);
    // The reference's way: env vars + SCONE_FSPF_MUTABLE=1.
    let o = w.preload_env(&[&writer], true);
    ok(&o, "writer");
    w.tag = w.tag_on_disk();
    let auth = std::fs::read_to_string(w.path("mnt/authenticated/hello")).expect("auth on disk");
    assert_eq!(auth, "hello world\n", "authenticated files stay plaintext");
    let enc = std::fs::read(w.path("mnt/encrypted/hello")).expect("enc on disk");
    assert!(
        !enc.windows(5).any(|x| x == b"hello"),
        "encrypted file is plaintext"
    );
    let o = w.run(&[&reader]);
    ok(&o, "shielded reader");
    assert_eq!(stdout(&o), "read: 'hello world\n'\nread: 'hello world\n'\n");
    // Ephemeral root: starts empty, lives in memory, gone at exit.
    for _ in 0..2 {
        let o = w.run(&[&eph]);
        ok(&o, "ephemeral");
        assert_eq!(stdout(&o), "in memory\n");
    }
    w.tamper("mnt/encrypted/hello");
    let o = w.run(&[&reader]);
    assert!(!o.status.success());
    assert!(!stdout(&o).contains("read: 'hello world\n'\nread: 'hello world"));
}

const SQL_FILL: &str = "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
BEGIN;
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<10000)
  INSERT INTO t SELECT x, 'row-' || x FROM c;
COMMIT;
SELECT count(*) FROM t;
PRAGMA integrity_check;
";

#[test]
fn sqlite3_database_in_an_encrypted_mutable_region() {
    need("sqlite3");
    let mut w = data_world();
    let o = w.run_mut(&["sqlite3", "/data/db.sqlite", SQL_FILL]);
    ok(&o, "sqlite fill");
    assert_eq!(stdout(&o), "10000\nok\n");
    let raw = std::fs::read(w.path("vol/db.sqlite")).expect("db on disk");
    assert!(
        !raw.windows(6).any(|x| x == b"row-42"),
        "database is plaintext on disk"
    );
    assert!(
        !w.path("vol/db.sqlite-journal").exists(),
        "journal left behind"
    );
    let o = w.run_mut(&[
        "sqlite3",
        "/data/db.sqlite",
        "INSERT INTO t(v) VALUES('more'); SELECT count(*), max(id) FROM t WHERE v LIKE 'row-9999' OR v='more'; PRAGMA integrity_check;",
    ]);
    ok(&o, "sqlite second run");
    assert_eq!(stdout(&o), "2|10001\nok\n");
    let o = w.run(&[
        "sqlite3",
        "/data/db.sqlite",
        "SELECT v FROM t WHERE id=1234;",
    ]);
    ok(&o, "sqlite read-only run");
    assert_eq!(stdout(&o), "row-1234\n");
    w.tamper("vol/db.sqlite");
    let o = w.run(&[
        "sqlite3",
        "/data/db.sqlite",
        "SELECT count(*) FROM t; PRAGMA integrity_check;",
    ]);
    assert!(!o.status.success(), "tampered db read: {}", stdout(&o));
    assert!(!stdout(&o).contains("10001"));
}

const THREADS_C: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
static int bad = 0;
static void *worker(void *arg) {
    (void)arg;
    for (int i = 0; i < 200; i++) {
        char b[64] = {0};
        int fd = open("/data/hello.txt", O_RDONLY);
        if (fd < 0) { bad = 1; return NULL; }
        ssize_t n = pread(fd, b, sizeof b - 1, 0);
        close(fd);
        if (n != 12 || strcmp(b, "Hello World\n")) { bad = 1; return NULL; }
    }
    return NULL;
}
int main() {
    pthread_t t[8];
    for (int i = 0; i < 8; i++) pthread_create(&t[i], NULL, worker, NULL);
    for (int i = 0; i < 8; i++) pthread_join(t[i], NULL);
    puts(bad ? "bad" : "ok");
    return bad;
}
"#;

#[test]
fn multithreaded_reader() {
    let w = data_world();
    let exe = w.cc("threads", THREADS_C, &["-pthread"]);
    let o = w.run(&[&exe]);
    ok(&o, "threads");
    assert_eq!(stdout(&o), "ok\n");
    w.tamper("vol/hello.txt");
    let o = w.run(&[&exe]);
    assert!(!o.status.success());
}

/// Large reads lend their second half to the process's read helper thread. The thread stays
/// out of the program's way: a forked child and several reading threads read the file right; a
/// process-directed signal the program collects with `sigwait` is not run on the helper (whose
/// default action would kill the process); and the thread exits when idle, leaving the program
/// single-threaded again.
#[test]
fn large_reads_use_a_helper_thread_that_survives_fork_and_never_takes_a_signal() {
    let mut w = data_world();
    let pyb = python_bin();
    let write = "import os, hashlib
d = os.urandom((6 << 20) + 12345)
open('/data/big', 'wb').write(d)
open('big.sha', 'w').write(hashlib.sha256(d).hexdigest())
";
    ok(
        &w.run_tagged(&[], &[&pyb, "-c", write]),
        "write the big file",
    );
    let read = "import os, signal, hashlib, threading, time
want = open('big.sha').read()
def digest():
    d = hashlib.sha256()
    with open('/data/big', 'rb', buffering=0) as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return d.hexdigest()
            d.update(b)
assert digest() == want, 'first read'
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
assert digest() == want, 'second read'
os.kill(os.getpid(), signal.SIGUSR1)
assert signal.sigwait([signal.SIGUSR1]) == signal.SIGUSR1
pid = os.fork()
if pid == 0:
    os._exit(0 if digest() == want and digest() == want else 3)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, 'forked child'
got = []
ts = [threading.Thread(target=lambda: got.append(digest())) for _ in range(3)]
[t.start() for t in ts]
[t.join() for t in ts]
assert got == [want] * 3, 'threads'
time.sleep(1.6)
tasks = os.listdir('/proc/self/task')
assert len(tasks) == 1, tasks
print('ok')
";
    let o = w.run(&[&pyb, "-c", read]);
    ok(&o, "large reads with the helper");
    assert_eq!(stdout(&o), "ok\n");
}

#[test]
fn shell_pipeline_of_shielded_children() {
    need("sh");
    let w = data_world();
    let o = w.run(&[
        "sh",
        "-c",
        "cat /data/hello.txt | tr a-z A-Z | sed 's/WORLD/THERE/'; wc -c < /data/world.py",
    ]);
    ok(&o, "pipeline");
    assert_eq!(stdout(&o), format!("HELLO THERE\n{}\n", WORLD_PY.len()));
    w.tamper("vol/hello.txt");
    need("bash");
    let o = w.run(&[
        "bash",
        "-c",
        "set -o pipefail; cat /data/hello.txt | tr a-z A-Z",
    ]);
    assert!(
        !o.status.success(),
        "the tampered read fails the pipeline: {o:?}"
    );
    assert!(!stdout(&o).contains("HELLO"));
}

#[test]
fn python_writer_then_subprocess_cat_sees_the_new_file() {
    need("python3");
    need("cat");
    let mut w = data_world();
    let o = w.run_mut(&[
        "python3",
        "-c",
        "import subprocess\nwith open('/data/fresh.txt','w') as f: f.write('fresh data\\n')\nr = subprocess.run(['cat', '/data/fresh.txt'], capture_output=True, check=True)\nprint(r.stdout.decode(), end='')\n",
    ]);
    ok(&o, "writer + subprocess");
    assert_eq!(stdout(&o), "fresh data\n");
    let o = w.run(&["cat", "/data/fresh.txt"]);
    assert_eq!(stdout(&o), "fresh data\n");
    w.tamper("vol/fresh.txt");
    let o = w.run(&[
        "python3",
        "-c",
        "import subprocess, sys\nr = subprocess.run(['cat', '/data/fresh.txt'], capture_output=True)\nsys.stdout.write(r.stdout.decode())\nsys.exit(r.returncode)",
    ]);
    assert!(!o.status.success());
    assert!(!stdout(&o).contains("fresh"));
}

#[test]
fn two_concurrent_writers_both_survive() {
    need("sh");
    need("python3");
    let mut w = data_world();
    let o = w.run_mut(&[
        "sh",
        "-c",
        "python3 -c \"open('/data/w1.txt','w').write('one\\n')\" & python3 -c \"open('/data/w2.txt','w').write('two\\n')\" & wait",
    ]);
    ok(&o, "two writers");
    let o = w.run(&["cat", "/data/w1.txt", "/data/w2.txt"]);
    ok(&o, "both files");
    assert_eq!(stdout(&o), "one\ntwo\n");
}

#[test]
fn key_file_is_passed_by_memfd_not_environment() {
    need("sh");
    let w = data_world();
    let kf = w.path("keytag");
    std::fs::write(&kf, format!("tag: {} key: {}\n", w.tag, w.key)).expect("keyfile");
    let o = Command::new(fspf_bin())
        .current_dir(w.dir.path())
        .env("FSPF_PRELOAD", preload())
        .env_remove("SCONE_FSPF_KEY")
        .args(["run", "--fspf", "fspf.pb", "--key-file"])
        .arg(&kf)
        .args([
            "--tag",
            &w.tag,
            "--",
            "sh",
            "-c",
            "env | grep -c SCONE_FSPF_KEY; cat /data/hello.txt",
        ])
        .output()
        .expect("run");
    ok(&o, "key file run");
    assert_eq!(stdout(&o), format!("0\n{HELLO}"));
}

#[test]
fn shell_redirections_into_and_out_of_protected_files() {
    need("sh");
    need("tr");
    need("python3");
    let mut w = data_world();
    let o = w.run_mut(&[
        "sh",
        "-c",
        "tr a-z A-Z < /data/hello.txt > /data/up.txt; tr A-Z a-z < /data/hello.txt >> /data/up.txt; echo done >> /data/up.txt; python3 -c 'print(input()[::-1])' < /data/hello.txt > /data/rev.txt; wc -c < /data/up.txt",
    ]);
    ok(&o, "redirections");
    assert_eq!(stdout(&o), "29\n");
    let o = w.run(&["cat", "/data/up.txt", "/data/rev.txt"]);
    ok(&o, "read back");
    assert_eq!(stdout(&o), "HELLO WORLD\nhello world\ndone\ndlroW olleH\n");
    let raw = std::fs::read(w.path("vol/up.txt")).expect("on disk");
    assert!(!raw.windows(5).any(|x| x == b"HELLO"));
    w.tamper("vol/hello.txt");
    let o = w.run(&["sh", "-c", "wc -c < /data/hello.txt"]);
    assert!(!o.status.success() || stdout(&o).trim() != "12");
}

#[test]
fn cd_into_a_protected_region_is_inherited_by_children() {
    need("sh");
    need("python3");
    let w = data_world();
    let o = w.run(&[
        "sh",
        "-c",
        "cd /data && cat hello.txt && cat ../data/world.py && python3 -c 'import os; print(os.getcwd(), sorted(os.listdir(\".\")))'",
    ]);
    ok(&o, "cd /data");
    assert_eq!(
        stdout(&o),
        format!("{HELLO}{WORLD_PY}/data ['hello.txt', 'world.py']\n")
    );
}

#[test]
fn rollback_of_the_fspf_during_a_run_is_refused() {
    need("sh");
    need("cp");
    let mut w = data_world();
    let old = w.p("fspf-old.pb");
    std::fs::copy(&w.fspf, &old).expect("save old fspf");
    // A writer commits (the anchor moves), then the attacker swaps the old state back in: the
    // fspf as it was, which had no metadata log (a sealed fspf's commit appends to one).
    assert!(!w.fspf.with_extension("pb.log").exists());
    let script = format!(
        "echo new > /data/new.txt && cp {old} {fspf} && rm -f {fspf}.log && cat /data/hello.txt",
        fspf = w.fspf.display()
    );
    let o = w.run_mut(&["sh", "-c", &script]);
    // The run's processes keep reading the state the run trusts (its frozen index), never the
    // swapped-in fspf; the swap itself is reported when the run ends (and refused by the next
    // commit of the run, and by the next run under the run's tag).
    assert!(!o.status.success(), "rolled-back fspf accepted");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("replaced or rolled back during the run"),
        "{o:?}"
    );
}

#[test]
fn ephemeral_region_lives_in_memory_and_forked_children_get_a_copy() {
    need("python3");
    let mut w = World::new();
    w.create();
    w.addr(&["/", "--kernel", "/", "--not-protected"]);
    w.addr(&["/scratch", "--encrypted", "--ephemeral"]);
    w.encrypt();
    let script = r#"
import os
os.makedirs('/scratch/a/b')
with open('/scratch/a/b/f.txt', 'w') as f:
    f.write('secret\n')
os.rename('/scratch/a/b/f.txt', '/scratch/a/g.txt')
print(sorted(os.listdir('/scratch/a')), os.path.getsize('/scratch/a/g.txt'))
pid = os.fork()
if pid == 0:
    with open('/scratch/a/g.txt', 'a') as f:
        f.write('child\n')
    print('child sees', open('/scratch/a/g.txt').read().split())
    os._exit(0)
os.waitpid(pid, 0)
print('parent sees', open('/scratch/a/g.txt').read().split())
os.remove('/scratch/a/g.txt')
os.rmdir('/scratch/a/b')
print(os.listdir('/scratch/a'))
"#;
    let o = w.run(&["python3", "-c", script]);
    ok(&o, "ephemeral");
    assert_eq!(
        stdout(&o),
        "['b', 'g.txt'] 7\nchild sees ['secret', 'child']\nparent sees ['secret']\n[]\n"
    );
    // Nothing of it reached the disk or the fspf, and the next run starts empty.
    let o = w.run(&["python3", "-c", "import os; print(os.listdir('/scratch'))"]);
    ok(&o, "second run");
    assert_eq!(stdout(&o), "[]\n");
    w.tag = w.tag_on_disk();
}

#[test]
fn unencrypted_fspf_needs_no_key_and_trusts_the_tag_on_disk() {
    need("cat");
    let w = {
        let w = World::new();
        w.write("src/readme.txt", b"plain but authenticated\n");
        w.create();
        w.addr(&["/", "--kernel", "/", "--not-protected"]);
        w.addr(&["/docs", "--authenticated", "--kernel", &w.p("src")]);
        w.cli(&["addf", "fspf.pb", "/docs", "src"]);
        w
    };
    let o = w.run_opts(false, "", &["cat", "/docs/readme.txt"]);
    ok(&o, "unencrypted run");
    assert_eq!(stdout(&o), "plain but authenticated\n");
    w.tamper("src/readme.txt");
    let o = w.run_opts(false, "", &["cat", "/docs/readme.txt"]);
    assert!(!o.status.success());
    assert!(!stdout(&o).contains("plain"));
}

#[test]
fn fspf_log_names_the_reason_and_writable_shared_mmap_writes_the_file() {
    need("python3");
    need("cat");
    let mut w = data_world();
    // A description open for writing maps its buffer shared: writes through the mapping are
    // committed like writes; a read-only one is refused, as the kernel does.
    let o = w.run_mut(&[
        "python3",
        "-c",
        "import mmap\nr = open('/data/world.py', 'rb')\ntry:\n    mmap.mmap(r.fileno(), 0)\n    print('mapped')\nexcept PermissionError:\n    print('refused')\nf = open('/data/hello.txt', 'r+b')\nm = mmap.mmap(f.fileno(), 0)\nm[0:1] = b'J'\nm.flush(); m.close(); f.close()\ng = open('/data/hello.txt', 'rb')\np = mmap.mmap(g.fileno(), 0, flags=mmap.MAP_PRIVATE)\nprint(p[:5].decode())",
    ]);
    ok(&o, "mmap");
    assert_eq!(stdout(&o), "refused\nJello\n");
    let o = w.run(&["cat", "/data/hello.txt"]);
    ok(&o, "committed through the mapping");
    assert_eq!(stdout(&o), "Jello World\n");
    w.tamper("vol/hello.txt");
    let o = Command::new(fspf_bin())
        .current_dir(w.dir.path())
        .env("FSPF_PRELOAD", preload())
        .env("FSPF_LOG", "1")
        .args([
            "run", "--fspf", "fspf.pb", "--key", &w.key, "--tag", &w.tag, "--",
        ])
        .args(["cat", "/data/hello.txt"])
        .output()
        .expect("run");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/data/hello.txt") && err.contains("failed authentication"),
        "{err}"
    );
}

#[test]
fn sqlite_wal_mode_works_in_a_mutable_encrypted_region() {
    need("sqlite3");
    let mut w = data_world();
    let o = w.sh_tagged("sh", "sqlite3 /data/w.db 'PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES(1),(2);' && sqlite3 /data/w.db 'INSERT INTO t VALUES(3); SELECT count(*) FROM t; PRAGMA integrity_check;'");
    ok(&o, "WAL");
    assert_eq!(stdout(&o), "wal\n3\nok\n");
    let o = w.run_tagged(
        &[],
        &[
            "sqlite3",
            "/data/w.db",
            "SELECT sum(x) FROM t; PRAGMA journal_mode;",
        ],
    );
    ok(&o, "WAL, next run");
    assert_eq!(stdout(&o), "6\nwal\n");
}

const HELLO_C: &str = r#"
#include <stdio.h>
int main(int argc, char **argv) { printf("hello from %s\n", argc > 1 ? argv[1] : "c"); return 0; }
"#;

#[test]
fn programs_in_a_protected_region_run_from_verified_copies() {
    need("sh");
    need("python3");
    let mut w = World::new();
    let exe = w.cc("hello", HELLO_C, &[]);
    w.write("tools/hello.sh", b"#!/bin/sh\necho \"script says $1\"\n");
    std::fs::copy(&exe, w.path("tools/hello")).expect("copy exe");
    for f in ["tools/hello", "tools/hello.sh"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(w.path(f), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    std::fs::create_dir_all(w.path("enc")).expect("enc");
    w.create();
    w.addr(&["/", "--kernel", "/", "--not-protected"]);
    w.addr(&["/opt/tools", "--authenticated", "--kernel", &w.p("tools")]);
    w.addr(&["/opt/enc", "--encrypted", "--kernel", &w.p("enc")]);
    w.cli(&["addf", "fspf.pb", "/opt/tools", "tools"]);
    w.cli(&["addf", "fspf.pb", "/opt/enc", "tools", &w.p("enc")]);
    w.encrypt();
    let script = "/opt/tools/hello x; /opt/tools/hello.sh y; /opt/enc/hello z; PATH=/opt/enc:$PATH; hello.sh w; python3 -c \"import subprocess; subprocess.run(['/opt/enc/hello', 'py'], check=True)\"";
    let o = w.run(&["sh", "-c", script]);
    ok(&o, "protected programs");
    assert_eq!(
        stdout(&o),
        "hello from x\nscript says y\nhello from z\nscript says w\nhello from py\n"
    );
    // A tampered program is not run.
    w.tamper("tools/hello");
    let o = w.run(&["sh", "-c", "/opt/tools/hello x"]);
    assert!(!o.status.success());
    assert!(!stdout(&o).contains("hello from"));
    w.tag = w.tag_on_disk();
}

const EXECL_C: &str = r#"
#include <unistd.h>
#include <stdio.h>
#include <sys/wait.h>
extern char **environ;
static int waitok(void) { int st; wait(&st); return WIFEXITED(st) && WEXITSTATUS(st) == 0; }
int main() {
    if (fork() == 0) { execlp("cat", "cat", "/data/hello.txt", (char*)0); perror("execlp"); _exit(1); }
    if (!waitok()) return 1;
    if (fork() == 0) {
        execl("/bin/sh", "sh", "-c", "cat /data/world.py; echo $0 $1 $2 $3 $4 $5 $6",
              "a1", "a2", "a3", "a4", "a5", "a6", "a7", (char*)0);
        perror("execl"); _exit(1);
    }
    if (!waitok()) return 1;
    if (fork() == 0) { execle("/bin/cat", "cat", "/data/hello.txt", (char*)0, environ); perror("execle"); _exit(1); }
    if (!waitok()) return 1;
    return 0;
}
"#;

#[test]
fn execl_family_children_keep_the_key_passed_by_key_file() {
    let w = data_world();
    let exe = w.cc("execl", EXECL_C, &[]);
    let kf = w.path("keytag");
    std::fs::write(&kf, format!("{}\n", w.key)).expect("keyfile");
    let o = Command::new(fspf_bin())
        .current_dir(w.dir.path())
        .env("FSPF_PRELOAD", preload())
        .env_remove("SCONE_FSPF_KEY")
        .args(["run", "--fspf", "fspf.pb", "--key-file"])
        .arg(&kf)
        .args(["--tag", &w.tag, "--", &exe])
        .output()
        .expect("run");
    ok(&o, "execl family");
    assert_eq!(
        stdout(&o),
        format!("{HELLO}{WORLD_PY}a1 a2 a3 a4 a5 a6 a7\n{HELLO}")
    );
}

#[test]
fn kill_9_keeps_what_was_fsynced_and_nothing_half_written() {
    need("python3");
    let mut w = data_world();
    let o = w.run_mut(&[
        "python3",
        "-c",
        "import os, signal\nf = open('/data/log.txt', 'w')\nf.write('durable\\n'); f.flush(); os.fsync(f.fileno())\nf.write('lost\\n'); f.flush()\ng = open('/data/other.txt', 'w'); g.write('never committed\\n'); g.close()\nos.kill(os.getpid(), signal.SIGKILL)",
    ]);
    assert!(!o.status.success());
    let o = w.run(&["cat", "/data/log.txt"]);
    ok(&o, "after kill -9");
    assert_eq!(stdout(&o), "durable\n");
    let o = w.run(&["cat", "/data/other.txt"]);
    assert!(
        !o.status.success(),
        "uncommitted file visible after a crash"
    );
    let v = w.cli(&["verify", "fspf.pb", "--key", &w.key, "--tag", &w.tag]);
    assert!(v.contains("OK"), "{v}");
}

const SCANDIR_GLOB_C: &str = r#"
#include <dirent.h>
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
static int nodot(const struct dirent *d) { return d->d_name[0] != '.'; }
int main() {
    struct dirent **nl;
    int n = scandir("/data", &nl, nodot, alphasort);
    if (n < 0) { perror("scandir"); return 1; }
    for (int i = 0; i < n; i++) { printf("%s\n", nl[i]->d_name); free(nl[i]); }
    free(nl);
    glob_t g;
    if (glob("/data/*.py", 0, NULL, &g)) { puts("glob failed"); return 1; }
    for (size_t i = 0; i < g.gl_pathc; i++) printf("glob: %s\n", g.gl_pathv[i]);
    globfree(&g);
    return 0;
}
"#;

#[test]
fn scandir_and_glob_list_the_fspf_not_the_kernel_directory() {
    let w = data_world();
    // An unlisted file on disk must stay invisible.
    w.write("vol/intruder.txt", b"not listed\n");
    let exe = w.cc("scan", SCANDIR_GLOB_C, &[]);
    let o = w.run(&[&exe]);
    ok(&o, "scandir/glob");
    assert_eq!(stdout(&o), "hello.txt\nworld.py\nglob: /data/world.py\n");
}

const MKSTEMP_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main() {
    char t[] = "/data/tmpXXXXXX";
    int fd = mkstemp(t);
    if (fd < 0) { perror("mkstemp"); return 1; }
    if (write(fd, "temporary secret\n", 17) != 17) { perror("write"); return 1; }
    close(fd);
    if (rename(t, "/data/final.txt")) { perror("rename"); return 1; }
    char d[] = "/data/dirXXXXXX";
    if (!mkdtemp(d)) { perror("mkdtemp"); return 1; }
    FILE *f = tmpfile();
    if (!f) { perror("tmpfile"); return 1; }
    fputs("scratch\n", f);
    rewind(f);
    char b[32] = {0};
    fgets(b, sizeof b, f);
    fclose(f);
    printf("%s", b);
    return 0;
}
"#;

#[test]
fn mkstemp_and_mkdtemp_create_shielded_files() {
    let mut w = data_world();
    let exe = w.cc("mkstemp", MKSTEMP_C, &[]);
    let o = w.run_mut(&[&exe]);
    ok(&o, "mkstemp");
    assert_eq!(stdout(&o), "scratch\n");
    let o = w.run(&["cat", "/data/final.txt"]);
    assert_eq!(stdout(&o), "temporary secret\n");
    for e in std::fs::read_dir(w.path("vol")).expect("vol") {
        let p = e.expect("entry").path();
        if p.is_file() {
            let b = std::fs::read(&p).expect("read");
            assert!(
                !b.windows(9).any(|x| x == b"temporary"),
                "plaintext in {}",
                p.display()
            );
        }
    }
    let o = w.run(&["sh", "-c", "ls -d /data/dir*"]);
    ok(&o, "mkdtemp dir listed");
}

#[test]
fn swapped_or_rolled_back_files_are_refused() {
    need("sh");
    let mut w = data_world();
    // Swap: one valid encrypted file copied over another.
    std::fs::copy(w.path("vol/hello.txt"), w.path("vol/world.py")).expect("swap");
    let o = w.run(&["cat", "/data/world.py"]);
    assert!(!o.status.success(), "swapped file accepted");
    assert!(!stdout(&o).contains("Hello"));
    // Per-file rollback: an older, once valid version of the same file.
    let o = w.run_mut(&["sh", "-c", "echo version1 > /data/v.txt"]);
    ok(&o, "v1");
    let v1 = std::fs::read(w.path("vol/v.txt")).expect("v1");
    let o = w.run_mut(&["sh", "-c", "echo version2 > /data/v.txt"]);
    ok(&o, "v2");
    std::fs::write(w.path("vol/v.txt"), v1).expect("roll back");
    let o = w.run(&["cat", "/data/v.txt"]);
    assert!(!o.status.success(), "rolled-back file accepted");
    assert!(!stdout(&o).contains("version"));
    // Deleted listed file: an error, not an empty file.
    std::fs::remove_file(w.path("vol/hello.txt")).expect("rm");
    let o = w.run(&["cat", "/data/hello.txt"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("Input/output error"));
}

#[test]
fn bash_builtins_write_through_redirected_fds() {
    need("bash");
    let mut w = data_world();
    // bash's echo/printf write with glibc stdio, which bypasses the hooks: the shielded fd is
    // a memfd description of the file's buffer, so the bytes land there anyway.
    let o = w.run_mut(&[
        "bash",
        "-c",
        "exec 3>/dev/null; echo y > /data/b.txt; echo a >> /data/b.txt; printf '%s\\n' b >> /data/b.txt; exec 4>>/data/b.txt; echo c >&4; echo d >&4; exec 4>&-; cat /data/b.txt; while read l; do echo \"<$l>\"; done < /data/hello.txt",
    ]);
    ok(&o, "bash");
    assert_eq!(stdout(&o), "y\na\nb\nc\nd\n<Hello World>\n");
    let o = w.run(&["cat", "/data/b.txt"]);
    assert_eq!(stdout(&o), "y\na\nb\nc\nd\n");
    let raw = std::fs::read(w.path("vol/b.txt")).expect("on disk");
    assert!(!raw.windows(4).any(|x| x == b"y\na\n"));
}

const THREAD_WRITERS_C: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <stdlib.h>
static void *worker(void *arg) {
    long id = (long)arg;
    char p[64], b[64];
    for (int i = 0; i < 50; i++) {
        snprintf(p, sizeof p, "/data/t%ld-%d.txt", id, i);
        int fd = open(p, O_WRONLY|O_CREAT|O_TRUNC, 0644);
        if (fd < 0) { perror(p); exit(1); }
        int n = snprintf(b, sizeof b, "thread %ld file %d\n", id, i);
        if (write(fd, b, n) != n) { perror("write"); exit(1); }
        if (i % 10 == 0 && fsync(fd)) { perror("fsync"); exit(1); }
        close(fd);
        fd = open(p, O_RDONLY);
        char r[64] = {0};
        if (read(fd, r, sizeof r) != n || memcmp(r, b, n)) { fprintf(stderr, "mismatch %s\n", p); exit(1); }
        close(fd);
    }
    return NULL;
}
int main() {
    pthread_t t[8];
    for (long i = 0; i < 8; i++) pthread_create(&t[i], NULL, worker, (void*)i);
    for (int i = 0; i < 8; i++) pthread_join(t[i], NULL);
        puts("ok");
    return 0;
}
"#;

#[test]
fn multithreaded_writers_with_fsync() {
    let mut w = data_world();
    let exe = w.cc("twriters", THREAD_WRITERS_C, &["-pthread"]);
    let o = w.run_mut(&[&exe]);
    ok(&o, "threaded writers");
    assert_eq!(stdout(&o), "ok\n");
    let o = w.run(&[
        "sh",
        "-c",
        "ls /data | grep -c '^t'; cat /data/t3-17.txt /data/t7-49.txt",
    ]);
    ok(&o, "read back");
    assert_eq!(stdout(&o), "400\nthread 3 file 17\nthread 7 file 49\n");
}

const STDIN_C: &str = r#"
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
int main() {
    int fd = open("/data/hello.txt", O_RDONLY);
    if (fd < 0 || dup2(fd, 0) < 0) { perror("open/dup2"); return 1; }
    close(fd);
    char b[64];
    if (!fgets(b, sizeof b, stdin)) { puts("empty"); return 1; }
    printf("stdin: %s", b);
    return 0;
}
"#;

#[test]
fn stdio_reads_a_protected_file_dup2ed_onto_stdin() {
    let w = data_world();
    let exe = w.cc("stdin", STDIN_C, &[]);
    let o = w.run(&[&exe]);
    ok(&o, "stdin");
    assert_eq!(stdout(&o), format!("stdin: {HELLO}"));
    w.tamper("vol/hello.txt");
    let o = w.run(&[&exe]);
    assert!(!o.status.success());
    assert!(!stdout(&o).contains("Hello"));
}

/// Large files (> 1 MiB: sealed straight from the buffer, fingerprinted by times; >= 8 MiB:
/// written with O_DIRECT): sequential write + fsync, then a seek back and an overwrite in the
/// middle, a bypassing-size change by truncate, and a second run reading it all back; kill -9
/// during a large rewrite leaves the committed version.
#[test]
fn large_files_round_trip_and_survive_kill_9_mid_rewrite() {
    need("python3");
    let mut w = data_world();
    let script = r#"
import hashlib, os
blk = bytes(range(256)) * 4096            # 1 MiB
data = bytearray()
with open('/data/big.bin', 'wb') as f:
    for i in range(20):
        b = bytes([i]) + blk[1:]
        f.write(b); data += b
    f.write(b'tail' * 1000); data += b'tail' * 1000
    f.flush(); os.fsync(f.fileno())
    f.seek(5 * 1048576 + 7)
    f.write(b'X' * 70000); data[5 * 1048576 + 7:5 * 1048576 + 7 + 70000] = b'X' * 70000
with open('/data/mid.bin', 'wb') as f:
    f.write(blk * 3)
os.truncate('/data/mid.bin', 2 * 1048576 + 5)
print(hashlib.sha256(data).hexdigest(), hashlib.sha256((blk * 3)[:2 * 1048576 + 5]).hexdigest())
"#;
    let o = w.run_mut(&["python3", "-c", script]);
    ok(&o, "large write");
    let want = stdout(&o);
    let check = "import hashlib\nprint(hashlib.sha256(open('/data/big.bin','rb').read()).hexdigest(), hashlib.sha256(open('/data/mid.bin','rb').read()).hexdigest())";
    let o = w.run(&["python3", "-c", check]);
    ok(&o, "large read back");
    assert_eq!(stdout(&o), want);
    let v = w.cli(&["verify", "fspf.pb", "--key", &w.key, "--tag", &w.tag]);
    assert!(v.contains("OK"), "{v}");
    // Rewrite big.bin with 30 MiB of other bytes and die before any commit point.
    let o = w.run_mut(&[
        "python3",
        "-c",
        "import os, signal\nf = open('/data/big.bin', 'wb')\nfor i in range(30): f.write(b'Z' * 1048576)\nf.flush()\nos.kill(os.getpid(), signal.SIGKILL)",
    ]);
    assert!(!o.status.success());
    let o = w.run(&["python3", "-c", check]);
    ok(&o, "after kill -9");
    assert_eq!(
        stdout(&o),
        want,
        "old version must survive a crash before commit"
    );
}

/// A same-size overwrite of a large (> 1 MiB, fingerprinted by times) buffer that bypasses the
/// hooks (a raw pwrite64 system call) after a commit point is still sealed at close.
#[test]
fn large_buffer_bypassing_write_after_fsync_is_sealed() {
    need("python3");
    let mut w = data_world();
    let script = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open('/data/raw.bin', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, b'a' * (3 << 20))
os.fsync(fd)
buf = ctypes.create_string_buffer(b'Q' * 10)
n = libc.syscall(18, fd, buf, ctypes.c_size_t(10), ctypes.c_long(100))
assert n == 10, n
os.close(fd)
"#;
    let o = w.run_mut(&["python3", "-c", script]);
    ok(&o, "raw write");
    let o = w.run(&[
        "python3",
        "-c",
        "d = open('/data/raw.bin','rb').read(); print(len(d), d[95:115])",
    ]);
    ok(&o, "read back");
    assert_eq!(stdout(&o).trim(), "3145728 b'aaaaaQQQQQQQQQQaaaaa'");
}

#[test]
fn tag_file_receives_the_new_tag_and_never_the_programs_stdout() {
    let w = data_world();
    let tag_file = w.path("newtag");
    let o = Command::new(fspf_bin())
        .current_dir(w.dir.path())
        .env("FSPF_PRELOAD", preload())
        .env_remove("SCONE_FSPF_KEY")
        .env_remove("SCONE_FSPF_TAG")
        .env_remove("SCONE_FSPF")
        .args([
            "run",
            "--fspf",
            "fspf.pb",
            "--key",
            &w.key,
            "--tag",
            &w.tag,
            "--mutable",
        ])
        .arg("--tag-file")
        .arg(&tag_file)
        .args([
            "--",
            "sh",
            "-c",
            "echo appended >> /data/hello.txt; cat /data/hello.txt",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("fspf run");
    ok(&o, "mutable run with --tag-file");
    assert_eq!(stdout(&o), "Hello World\nappended\n", "program output only");
    let written = std::fs::read_to_string(&tag_file).expect("tag file");
    let on_disk = w.tag_on_disk();
    assert_eq!(
        written.trim(),
        on_disk,
        "--tag-file holds the committed tag"
    );
    assert_ne!(on_disk, w.tag, "the run committed a new fspf");
    // The new tag opens the new state; the old tag is now a rollback and is refused.
    let o = w.run_opts(false, &on_disk, &["cat", "/data/hello.txt"]);
    ok(&o, "read with the new tag");
    assert_eq!(stdout(&o), "Hello World\nappended\n");
    let o = w.run_opts(false, &w.tag, &["cat", "/data/hello.txt"]);
    assert!(!o.status.success(), "old tag must be refused");
    assert!(stdout(&o).is_empty(), "nothing read under the old tag");
}

// --- Regressions from the attacker's report and the data-loss reports (issues 6 and 9) -------

/// Python prelude for the tests below: `code_name(f)` runs `f` and gives 0 or the errno's name.
const PY_ERRNO: &str = "import os, errno\n\
    def code_name(f):\n\
    \x20   try:\n\
    \x20       f(); return 0\n\
    \x20   except OSError as e:\n\
    \x20       return errno.errorcode[e.errno]\n";

/// The real interpreter behind `python3` (this machine's `python3` may be a launcher script).
fn python_bin() -> String {
    real_python().to_string_lossy().into_owned()
}

impl World {
    /// [`World::run_tagged`] of `shell -c script`, no extra environment.
    fn sh_tagged(&mut self, shell: &str, script: &str) -> Output {
        self.run_tagged(&[], &[shell, "-c", script])
    }

    /// `fspf run --mutable --tag-file TAGFILE` with extra environment; the world's tag is then
    /// read from the tag file (the trusted channel), not from disk.
    fn run_tagged(&mut self, env: &[(&str, &str)], argv: &[&str]) -> Output {
        let tf = self.path("run.tag");
        let anchor = self.anchor_with(&self.tag);
        let mut c = shielded::fspf_run(self.dir.path(), &self.fspf, &anchor, true, Some(&tf), argv);
        let o = c.envs(env.iter().copied()).output().expect("fspf run");
        let t = std::fs::read_to_string(&tf).expect("tag file");
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 1, "the run settled on one tag: {t:?}");
        self.tag = lines[0].to_string();
        o
    }

    fn big_world() -> World {
        let mut w = World::new();
        let big: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        w.write("data-original/big.txt", big.as_bytes());
        w.write("data-original/hello.txt", HELLO.as_bytes());
        std::fs::create_dir_all(w.path("vol")).expect("vol");
        w.create();
        w.addr(&["/", "--kernel", "/", "--not-protected"]);
        w.addr(&["/data", "--encrypted", "--kernel", &w.p("vol")]);
        w.cli(&["addf", "fspf.pb", "/data", "data-original", &w.p("vol")]);
        w.encrypt();
        w
    }
}

#[test]
fn tampered_file_redirected_to_stdin_is_not_read_as_empty_with_exit_0() {
    need("bash");
    let py = python_bin();
    let w = World::big_world();
    w.tamper("vol/big.txt");
    for argv in [
        vec!["sh", "-c", "wc -c < /data/big.txt"],
        vec!["bash", "-c", "wc -c < /data/big.txt"],
        vec!["sh", "-c", "exec 3</data/big.txt; cat <&3"],
        vec![
            &py,
            "-c",
            "import subprocess; subprocess.run(['wc','-c'], stdin=open('/data/big.txt'))",
        ],
    ] {
        let o = w.run(&argv);
        assert!(!o.status.success(), "{argv:?} must fail: {o:?}");
        assert!(!stdout(&o).contains("line 1"), "{argv:?}: no plaintext");
    }
}

#[test]
fn tampered_input_piped_through_tr_into_a_protected_file_fails_the_run() {
    let mut w = World::big_world();
    w.tamper("vol/big.txt");
    let o = w.run_tagged(
        &[],
        &["sh", "-c", "tr a-z A-Z < /data/big.txt > /data/out.txt"],
    );
    assert!(!o.status.success(), "{o:?}");
}

#[test]
fn write_only_stdout_inherited_by_an_exec_is_committed() {
    need("bash");
    let mut w = data_world();
    let o = w.sh_tagged("bash", "cat /data/hello.txt > /data/x; /bin/echo appended >> /data/x; printf 'a\\nb\\n' | cat > /data/y");
    ok(&o, "bash redirections into execs");
    let o = w.run(&["cat", "/data/x", "/data/y"]);
    ok(&o, "read back");
    assert_eq!(stdout(&o), "Hello World\nappended\na\nb\n");
}

#[test]
fn fsync_of_a_read_only_fd_commits_what_an_earlier_writer_closed() {
    let py = python_bin();
    let mut w = data_world();
    let script = "import os\n\
        f = open('/data/synced.txt', 'w'); f.write('durable\\n'); f.close()\n\
        fd = os.open('/data/synced.txt', os.O_RDONLY); os.fsync(fd)\n\
        os.kill(os.getpid(), 9)\n";
    let o = w.run_tagged(&[], &[&py, "-c", script]);
    assert_eq!(o.status.code(), Some(137), "killed: {o:?}");
    let o = w.run(&["cat", "/data/synced.txt"]);
    ok(&o, "fsync'd file survives kill -9");
    assert_eq!(stdout(&o), "durable\n");
}

#[test]
fn crash_after_the_commit_point_leaves_a_tag_file_that_opens_the_fspf() {
    let mut w = data_world();
    let before = w.tag.clone();
    let o = w.run_tagged(
        &[("FSPF_TEST_CRASH", "after-commit-point")],
        &["sh", "-c", "echo new > /data/n1; echo new > /data/n2"],
    );
    assert!(!o.status.success(), "the committer was killed: {o:?}");
    assert_ne!(w.tag, before, "the commit passed its commit point");
    let o = w.run(&["cat", "/data/n1", "/data/n2"]);
    ok(&o, "the tag from --tag-file opens the committed state");
    assert_eq!(stdout(&o), "new\nnew\n");
}

#[test]
fn the_committing_process_writes_the_tag_file_both_tags_across_the_window() {
    // Kill the whole run (the `fspf run` parent too) right after the commit point: the tag file
    // was written by the committer itself and names the state on disk.
    let w = data_world();
    let tf = w.path("run.tag");
    let o = Command::new("sh")
        .current_dir(w.dir.path())
        .env("FSPF_PRELOAD", preload())
        .args([
            "-c",
            &format!(
                "{} run --fspf fspf.pb --key {} --tag {} --mutable --tag-file {} -- sh -c 'echo a > /data/a; kill -9 $PPID; echo b > /data/b; sleep 5'",
                fspf_bin().display(),
                w.key,
                w.tag,
                tf.display()
            ),
        ])
        .env("FSPF_TEST_CRASH", "after-commit-point")
        .env_remove("SCONE_FSPF")
        .output()
        .expect("sh");
    assert!(!o.status.success());
    let t = std::fs::read_to_string(&tf).expect("tag file");
    let disk = w.tag_on_disk();
    assert!(
        t.lines().any(|l| l == disk),
        "the tag file {t:?} names the fspf on disk {disk}"
    );
}

#[test]
fn a_failed_commit_before_exec_fails_the_run_instead_of_dropping_changes() {
    let w = data_world();
    // A directory where the lock file should be: every commit of the run fails.
    let _ = std::fs::remove_file(w.path("fspf.pb.lock"));
    std::fs::create_dir(w.path("fspf.pb.lock")).expect("lock dir");
    let o = w.run_opts(
        true,
        &w.tag,
        &["sh", "-c", "echo x > /data/lost; /bin/true; echo after"],
    );
    assert!(!o.status.success(), "changes were lost: {o:?}");
}

#[test]
fn forked_child_of_a_process_that_got_eio_can_exit_0() {
    let py = python_bin();
    let w = World::big_world();
    w.tamper("vol/big.txt");
    let script = "import os\n\
        try:\n    open('/data/big.txt').read()\nexcept OSError as e:\n    print('caught', e.errno)\n\
        pid = os.fork()\n\
        if pid == 0:\n    os._exit(0)\n\
        print('child', os.waitpid(pid, 0)[1])\n";
    let o = w.run(&[&py, "-c", script]);
    assert_eq!(stdout(&o), "caught 5\nchild 0\n", "{o:?}");
    assert!(!o.status.success(), "the parent itself got EIO");
}

#[test]
fn unlinking_the_lock_file_does_not_lose_fsynced_files_of_concurrent_writers() {
    let py = python_bin();
    let mut w = data_world();
    let writer = "import os, sys\n\
        n = sys.argv[1]\n\
        for i in range(25):\n\
        \x20   p = '/data/%s-%d' % (n, i)\n\
        \x20   f = open(p, 'w'); f.write(p); f.flush(); os.fsync(f.fileno()); f.close()\n\
        \x20   sys.stdout.write(p + '\\n'); sys.stdout.flush()\n";
    w.write("writer.py", writer.as_bytes());
    let lock = w.path("fspf.pb.lock");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let attacker = std::thread::spawn(move || {
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = std::fs::remove_file(&lock);
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    });
    let cmd = format!("{py} writer.py a & {py} writer.py b & {py} writer.py c & wait");
    let o = w.run_tagged(&[], &["sh", "-c", &cmd]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    attacker.join().expect("attacker");
    ok(&o, "three writers");
    let acked: Vec<String> = stdout(&o).lines().map(String::from).collect();
    assert_eq!(acked.len(), 75, "every write was acknowledged");
    let mut argv = vec!["cat"];
    argv.extend(acked.iter().map(|s| s.as_str()));
    let o = w.run(&argv);
    ok(&o, "every fsync'd file is present");
    assert_eq!(stdout(&o), acked.concat());
}

const EVIL_C: &str = r#"
#include <stdio.h>
int main() { puts("EVIL interpreter ran"); return 0; }
"#;

#[test]
fn shebang_interpreter_in_an_authenticated_region_is_verified_before_it_runs() {
    // An authenticated region in place (kernel path = embed point, as when `/` is protected):
    // the script's `#!` interpreter lies in the region too and must be verified like the script.
    let mut w = World::new();
    let tools = w.path("tools");
    std::fs::create_dir_all(&tools).expect("tools");
    let sh = std::fs::canonicalize(need("sh")).expect("sh");
    std::fs::copy(&sh, tools.join("myshell")).expect("copy sh");
    let script = format!(
        "#!{}/myshell -e\necho \"script ran with $1\"\n",
        tools.display()
    );
    w.write("tools/script.sh", script.as_bytes());
    for f in ["tools/myshell", "tools/script.sh"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(w.path(f), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let region = tools.display().to_string();
    w.create();
    w.addr(&["/", "--kernel", "/", "--not-protected"]);
    w.addr(&[&region, "--authenticated", "--kernel", &region]);
    w.cli(&["addf", "fspf.pb", &region, &region]);
    w.encrypt();
    // An unprotected script (outside the region) whose interpreter is protected.
    let outside = w.path("outside.sh");
    std::fs::write(&outside, script.as_bytes()).expect("outside script");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let outside = outside.display().to_string();
    let o = w.run(&[&outside, "out1"]);
    ok(&o, "unprotected script, verified interpreter");
    assert_eq!(stdout(&o), "script ran with out1\n");
    let target = format!("{region}/script.sh");
    let o = w.run(&[&target, "arg1"]);
    ok(&o, "verified script with a verified interpreter");
    assert_eq!(stdout(&o), "script ran with arg1\n");
    let o = w.run(&["sh", "-c", &format!("{target} arg2")]);
    ok(&o, "the same through a shell's exec");
    assert_eq!(stdout(&o), "script ran with arg2\n");
    // The attacker swaps the interpreter on disk.
    let evil = w.cc("evil", EVIL_C, &[]);
    std::fs::copy(&evil, tools.join("myshell")).expect("swap interpreter");
    let o = w.run(&[&target, "arg3"]);
    assert!(
        !o.status.success(),
        "a swapped interpreter must not run: {o:?}"
    );
    assert!(
        !stdout(&o).contains("EVIL"),
        "the swapped interpreter ran: {o:?}"
    );
    let o = w.run(&["sh", "-c", &target]);
    assert!(!o.status.success());
    assert!(!stdout(&o).contains("EVIL"), "{o:?}");
    for argv in [vec![outside.as_str()], vec!["sh", "-c", outside.as_str()]] {
        let o = w.run(&argv);
        assert!(!o.status.success(), "{argv:?}: {o:?}");
        assert!(!stdout(&o).contains("EVIL"), "{argv:?}: {o:?}");
    }
}

#[test]
fn shebang_chains_and_arguments_are_expanded_as_the_kernel_does() {
    let mut w = World::new();
    let tools = w.path("tools");
    std::fs::create_dir_all(&tools).expect("tools");
    let sh = std::fs::canonicalize(need("sh")).expect("sh");
    std::fs::copy(&sh, tools.join("myshell")).expect("copy sh");
    // argv printer in the region, as the interpreter of a script.
    w.write(
        "tools/show.sh",
        format!(
            "#!{}/myshell\nfor a in \"$@\"; do echo \"[$a]\"; done\n",
            tools.display()
        )
        .as_bytes(),
    );
    w.write(
        "tools/prog",
        format!("#!{}/show.sh  one arg  \nbody\n", tools.display()).as_bytes(),
    );
    for f in ["tools/myshell", "tools/show.sh", "tools/prog"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(w.path(f), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let region = tools.display().to_string();
    w.create();
    w.addr(&["/", "--kernel", "/", "--not-protected"]);
    w.addr(&[&region, "--authenticated", "--kernel", &region]);
    w.cli(&["addf", "fspf.pb", &region, &region]);
    w.encrypt();
    let o = w.run(&[&format!("{region}/prog"), "x"]);
    ok(&o, "chained #!");
    // Kernel semantics: show.sh gets "one arg" (one argument), the script path, then x.
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], "[one arg]");
    assert!(
        lines[1].starts_with("[/proc/self/fd/"),
        "the verified copy of prog: {out}"
    );
    assert_eq!(lines[2], "[x]");
}

#[test]
fn xattr_chown_mkfifo_mknod_and_bind_do_not_reach_the_kernel_directory() {
    let py = python_bin();
    let mut w = data_world();
    let script = PY_ERRNO.to_string()
        + "import socket\n\
        os.chdir('/data')\n\
        code = lambda f: (lambda n: 0 if n == 0 else getattr(errno, n))(code_name(f))\n\
        print(code(lambda: os.setxattr('hello.txt', 'user.leak', b'secret')) == errno.ENOTSUP)\n\
        print(code(lambda: os.setxattr('/data/hello.txt', 'user.leak', b'secret')) == errno.ENOTSUP)\n\
        print(code(lambda: os.removexattr('hello.txt', 'user.leak')) == errno.ENOTSUP)\n\
        print(code(lambda: os.chown('hello.txt', 1234, 1234)) == 0 and os.stat('hello.txt').st_uid == 1234)\n\
        print(code(lambda: os.lchown('hello.txt', -1, -1)) == 0)\n\
        import stat\n\
        print(code(lambda: os.mkfifo('fifo')) == 0 and stat.S_ISFIFO(os.stat('fifo').st_mode))\n\
        print(code(lambda: os.mknod('node')) == errno.EPERM)\n\
        s = socket.socket(socket.AF_UNIX)\n\
        print(code(lambda: s.bind('sock')) == 0 and stat.S_ISSOCK(os.stat('sock').st_mode))\n";
    let o = w.run_tagged(&[], &[&py, "-c", &script]);
    ok(&o, "refused calls");
    assert_eq!(stdout(&o), "True\n".repeat(8), "{o:?}");
    let vol = w.path("vol");
    // The owner is recorded in the fspf (root may give a file away), not on the kernel file.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(vol.join("hello.txt")).unwrap().uid(), 0);
    let o = w.run(&["stat", "-c", "%u:%g", "/data/hello.txt"]);
    assert_eq!(
        stdout(&o),
        "1234:1234\n",
        "the next run shows the recorded owner"
    );
    // FIFOs and sockets are fspf entries (the next run lists them); nothing is created in the
    // kernel directory.
    let o = w.run(&["stat", "-c", "%F", "/data/fifo", "/data/sock"]);
    assert_eq!(stdout(&o), "fifo\nsocket\n", "{o:?}");
    for name in ["fifo", "node", "sock"] {
        assert!(
            !vol.join(name).exists(),
            "{name} created in the kernel directory"
        );
    }
    let o = Command::new(&py)
        .args(["-c", "import os,sys; print(os.listxattr(sys.argv[1]))"])
        .arg(vol.join("hello.txt"))
        .output()
        .expect("listxattr");
    ok(&o, "listxattr");
    assert_eq!(stdout(&o), "[]\n", "no attribute on the ciphertext");
}

#[test]
fn cd_into_a_directory_a_child_just_created_works_under_dash() {
    need("dash");
    let mut w = data_world();
    let o = w.sh_tagged(
        "dash",
        "mkdir /data/src && cd /data/src && echo 'int main;' > main.c && pwd",
    );
    ok(&o, "mkdir && cd");
    assert_eq!(stdout(&o), "/data/src\n");
    let o = w.run(&["cat", "/data/src/main.c"]);
    ok(&o, "written inside the region");
    assert_eq!(stdout(&o), "int main;\n");
    assert!(
        !w.path("main.c").exists(),
        "nothing written in plaintext in the host directory"
    );
}

#[test]
fn symlinks_to_directories_are_followed_mid_path_loops_give_eloop_and_trailing_slashes_need_dirs() {
    let py = python_bin();
    let mut w = data_world();
    let script = PY_ERRNO.to_string()
        + "os.chdir('/data')\n\
        code = code_name\n\
        os.mkdir('d'); open('d/f', 'w').write('through the link\\n')\n\
        os.symlink('d', 'l'); os.symlink('/data/d', 'abs')\n\
        print(open('l/f').read(), end='')\n\
        print(open('/data/abs/f').read(), end='')\n\
        print(sorted(os.listdir('l')))\n\
        os.symlink('b', 'a'); os.symlink('a', 'b')\n\
        print(code(lambda: open('a/x')))\n\
        print(code(lambda: open('a')))\n\
        print(code(lambda: os.stat('hello.txt/')))\n\
        print(code(lambda: open('hello.txt/x')))\n\
        print(code(lambda: os.open('nx/', os.O_CREAT | os.O_WRONLY)))\n\
        print(os.path.exists('nx'))\n\
        print(code(lambda: os.stat('d/')))\n";
    let o = w.run_tagged(&[], &[&py, "-c", &script]);
    ok(&o, "symlink semantics");
    assert_eq!(
        stdout(&o),
        "through the link\nthrough the link\n['f']\nELOOP\nELOOP\nENOTDIR\nENOTDIR\nEISDIR\nFalse\n0\n"
    );
}

const STDIN_SUM_C: &str = r#"
#include <stdio.h>
#include <fcntl.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0 || dup2(fd, 0) != 0) { perror("dup2"); return 2; }
    close(fd);
    char buf[4096]; size_t n, total = 0; unsigned long sum = 0;
    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) {
        for (size_t i = 0; i < n; i++) sum = sum * 31 + (unsigned char)buf[i];
        total += n;
    }
    if (ferror(stdin)) { perror("fread"); return 1; }
    printf("%zu %lu\n", total, sum);
    return 0;
}
"#;

#[test]
fn a_protected_file_dup2ed_onto_stdin_is_read_lazily_through_stdio_and_dd() {
    let w = World::big_world();
    let prog = w.cc("stdin_sum", STDIN_SUM_C, &[]);
    let plain = std::fs::read(w.path("data-original/big.txt")).expect("plaintext");
    let mut sum: u64 = 0;
    for b in &plain {
        sum = sum.wrapping_mul(31).wrapping_add(u64::from(*b));
    }
    let o = w.run(&[&prog, "/data/big.txt"]);
    ok(&o, "fread(stdin) after dup2");
    assert_eq!(stdout(&o), format!("{} {sum}\n", plain.len()));
    let out = w.path("dd.out");
    let of = format!("of={}", out.display());
    let o = w.run(&["dd", "if=/data/big.txt", &of, "bs=64k"]);
    ok(&o, "dd if=");
    assert_eq!(std::fs::read(&out).expect("dd output"), plain);
    w.tamper("vol/big.txt");
    let o = w.run(&[&prog, "/data/big.txt"]);
    assert!(!o.status.success(), "{o:?}");
    let o = w.run(&["dd", "if=/data/big.txt", &of, "bs=64k"]);
    assert!(!o.status.success(), "{o:?}");
}

#[test]
fn rm_r_of_a_directory_holding_leftovers_frees_the_name_for_a_file() {
    let mut w = data_world();
    let o = w.run_tagged(
        &[],
        &["sh", "-c", "mkdir -p /data/T/sub && echo x > /data/T/sub/f"],
    );
    ok(&o, "make the tree");
    // A writer killed mid-commit leaves its shadow; an attacker may add unlisted junk too.
    w.write(
        "vol/T/sub/.g.fspf-0123456789abcdef0123456789abcdef",
        b"leftover",
    );
    w.write("vol/T/junk", b"unlisted");
    let o = w.sh_tagged("sh", "rm -rf /data/T && echo data > /data/T && cat /data/T");
    ok(&o, "rm -rf, then a file at the same name");
    assert_eq!(stdout(&o), "data\n");
    let o = w.run(&["cat", "/data/T"]);
    ok(&o, "the file is readable in the next run");
    assert_eq!(stdout(&o), "data\n");
}

#[test]
fn a_symlinked_region_directory_never_lets_the_shield_write_or_delete_outside_the_region() {
    let mut w = data_world();
    let o = w.sh_tagged(
        "sh",
        "mkdir /data/sub && echo one > /data/sub/a && echo two > /data/sub/b",
    );
    ok(&o, "make /data/sub");
    // The attacker swaps the kernel directory for a link to a victim directory holding a copy.
    let victim = w.path("victim");
    std::fs::create_dir_all(&victim).expect("victim");
    for f in ["a", "b"] {
        std::fs::copy(w.path(&format!("vol/sub/{f}")), victim.join(f)).expect("copy");
    }
    std::fs::write(victim.join("precious"), "keep me").expect("precious");
    std::fs::remove_dir_all(w.path("vol/sub")).expect("rm sub");
    std::os::unix::fs::symlink(&victim, w.path("vol/sub")).expect("symlink");
    let before: Vec<_> = {
        let mut v: Vec<_> = std::fs::read_dir(&victim)
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        v.sort();
        v
    };
    let _ = w.run_opts(
        true,
        &w.tag.clone(),
        &[
            "sh",
            "-c",
            "cat /data/sub/a; echo new > /data/sub/c; mv /data/sub/a /data/sub/z; rm -f /data/sub/b; mkdir /data/sub/d; rm -rf /data/sub",
        ],
    );
    let mut after: Vec<_> = std::fs::read_dir(&victim)
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    after.sort();
    assert_eq!(
        before, after,
        "nothing created, renamed or deleted in the victim directory"
    );
    assert_eq!(
        std::fs::read_to_string(victim.join("precious")).expect("precious"),
        "keep me"
    );
}

#[test]
fn shell_fd_3_and_close_fds_never_close_the_readers_own_file() {
    let py = python_bin();
    let w = data_world();
    for argv in [
        vec![
            "sh",
            "-c",
            "exec 3</data/hello.txt; cat <&3; exec 3<&-; echo closed",
        ],
        vec![
            "bash",
            "-c",
            "exec 3</data/hello.txt; cat <&3; exec 3<&-; echo closed",
        ],
    ] {
        let o = w.run(&argv);
        ok(&o, &format!("{argv:?}"));
        assert_eq!(stdout(&o), format!("{HELLO}closed\n"));
    }
    let o = w.run(&[
        &py,
        "-c",
        "import subprocess; subprocess.run(['cat'], stdin=open('/data/hello.txt', 'rb'), check=True)",
    ]);
    ok(&o, "python subprocess with close_fds");
    assert_eq!(stdout(&o), HELLO);
}

#[test]
fn the_runs_processes_start_from_the_frozen_index_without_parsing_the_fspf() {
    // Children started after the fspf on disk became unreadable still open protected files:
    // they map the run's frozen index (FSPF_INDEX_FD) instead of parsing the fspf. The damage is
    // reported by the next run (an immutable `fspf run` execs the program: nothing waits for
    // it to end).
    let w = data_world();
    let garbage = w.path("garbage");
    std::fs::write(&garbage, b"not an fspf").expect("garbage");
    let script = format!(
        "cat /data/hello.txt; cp {g} {f}; cat /data/hello.txt; sh -c 'cat /data/world.py'; ls /data",
        g = garbage.display(),
        f = w.fspf.display()
    );
    let o = w.run(&["sh", "-c", &script]);
    assert_eq!(
        stdout(&o),
        format!("{HELLO}{HELLO}{WORLD_PY}hello.txt\nworld.py\n")
    );
    ok(&o, "reads from the frozen index");
    let o = w.run(&["cat", "/data/hello.txt"]);
    assert!(!o.status.success(), "the damaged fspf is refused");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("fspf"), "{err}");
}

#[test]
fn removals_are_queued_to_the_next_commit_point_and_rm_r_commits_once() {
    let py = python_bin();
    let mut w = data_world();
    let make = "import os\n\
        for d in range(5):\n\
        \x20   os.makedirs('/data/t/d%d' % d)\n\
        \x20   for i in range(40):\n\
        \x20       open('/data/t/d%d/f%d' % (d, i), 'w').write('x')\n";
    let o = w.run_tagged(&[], &[&py, "-c", make]);
    ok(&o, "make 200 files");
    let before = w.tag.clone();
    // rm -r, then in the same process: the tree is gone, a file of the same name can be made.
    let script = "import os, shutil\n\
        shutil.rmtree('/data/t')\n\
        print(os.path.exists('/data/t'), os.listdir('/data'))\n\
        os.makedirs('/data/t/d1'); open('/data/t/d1/f1', 'w').write('again')\n\
        print(open('/data/t/d1/f1').read())\n";
    let o = w.run_tagged(&[], &[&py, "-c", script]);
    ok(&o, "rmtree");
    assert_eq!(stdout(&o), "False ['hello.txt', 'world.py']\nagain\n");
    assert_ne!(w.tag, before);
    let o = w.run(&["sh", "-c", "find /data | sort; cat /data/t/d1/f1"]);
    ok(&o, "next run");
    assert_eq!(
        stdout(&o),
        "/data\n/data/hello.txt\n/data/t\n/data/t/d1\n/data/t/d1/f1\n/data/world.py\nagain"
    );
    // Exit 0 (asserted by `cli`): every listed file verifies, nothing unlisted is left behind.
    w.cli(&["verify", "fspf.pb", "--key", &w.key, "--tag", &w.tag]);
    // A removal not yet committed when the process is killed is not applied, and nothing is lost.
    let o = w.run_tagged(
        &[],
        &[
            &py,
            "-c",
            "import os; os.remove('/data/hello.txt'); os.kill(os.getpid(), 9)",
        ],
    );
    assert_eq!(o.status.code(), Some(137));
    let o = w.run(&["cat", "/data/hello.txt"]);
    ok(&o, "uncommitted removal");
    assert_eq!(stdout(&o), HELLO);
}

#[test]
fn chmod_umask_and_mkdir_modes_are_recorded_and_honoured() {
    let py = python_bin();
    let mut w = data_world();
    let script = "import os, stat\n\
        os.umask(0o027)\n\
        os.mkdir('/data/d', 0o777)\n\
        fd = os.open('/data/d/new', os.O_CREAT | os.O_WRONLY, 0o666); os.write(fd, b'#!/bin/sh\\necho ran\\n'); os.close(fd)\n\
        m = lambda p: oct(stat.S_IMODE(os.stat(p).st_mode))\n\
        print(m('/data/d'), m('/data/d/new'))\n\
        os.chmod('/data/d/new', 0o755)\n\
        fd = os.open('/data/hello.txt', os.O_RDONLY); os.fchmod(fd, 0o600); os.close(fd)\n\
        print(m('/data/d/new'), m('/data/hello.txt'))\n";
    let o = w.run_tagged(&[], &[&py, "-c", script]);
    ok(&o, "modes");
    assert_eq!(stdout(&o), "0o750 0o640\n0o755 0o600\n");
    // The next run sees the modes, finds the executable and runs it.
    let o = w.run(&[
        "sh",
        "-c",
        "stat -c '%a %n' /data/d /data/d/new /data/hello.txt; find /data -perm -u+x -type f; /data/d/new",
    ]);
    ok(&o, "next run");
    assert_eq!(
        stdout(&o),
        "750 /data/d\n755 /data/d/new\n600 /data/hello.txt\n/data/d/new\nran\n"
    );
    // Read-only runs refuse chmod of protected files.
    let o = w.run(&["chmod", "644", "/data/hello.txt"]);
    assert!(!o.status.success());
}

#[test]
fn touch_and_utimensat_are_recorded_with_nanoseconds_and_make_rebuilds() {
    need("make");
    let py = python_bin();
    let mut w = data_world();
    let setup = "mkdir -p /data/p && cd /data/p && printf 'out: in\\n\\tcp in out\\n' > Makefile && echo one > in && make -s && cat out";
    let o = w.run_tagged(&[], &["sh", "-c", setup]);
    ok(&o, "first make");
    assert_eq!(stdout(&o), "one\n");
    // Up to date in the next run; after touch (in the same second) make rebuilds.
    let o = w.sh_tagged(
        "sh",
        "cd /data/p && make -q; echo up-to-date=$?; echo two > in; touch in; make -s && cat out",
    );
    ok(&o, "touch then make");
    assert_eq!(stdout(&o), "up-to-date=0\ntwo\n");
    let script = "import os\n\
        os.utime('/data/p/in', ns=(1, 1234567890123456789))\n\
        print(os.stat('/data/p/in').st_mtime_ns)\n";
    let o = w.run_tagged(&[], &[&py, "-c", script]);
    ok(&o, "utime ns");
    assert_eq!(stdout(&o), "1234567890123456789\n");
    let o = w.run(&[
        &py,
        "-c",
        "import os; print(os.stat('/data/p/in').st_mtime_ns)",
    ]);
    ok(&o, "recorded in the fspf");
    assert_eq!(stdout(&o), "1234567890123456789\n");
}

#[test]
fn two_processes_appending_to_one_log_keep_all_lines() {
    need("bash");
    let mut w = data_world();
    let o = w.run_tagged(&[], &["sh", "-c", "echo start > /data/log"]);
    ok(&o, "make the log");
    let script = "for i in $(seq 200); do echo A$i >> /data/log; done & \
                  for i in $(seq 200); do echo B$i >> /data/log; done & wait";
    let o = w.run_tagged(&[], &["bash", "-c", script]);
    ok(&o, "two appenders");
    let o = w.run(&["cat", "/data/log"]);
    ok(&o, "read the log");
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 401, "every appended line is kept");
    assert_eq!(lines[0], "start");
    for p in ["A", "B"] {
        let mine: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with(p)).collect();
        let want: Vec<String> = (1..=200).map(|i| format!("{p}{i}")).collect();
        assert_eq!(mine, want, "{p}'s lines, in order");
    }
}

#[test]
fn truncating_a_protected_file_to_petabytes_gives_efbig_instead_of_sealing_them() {
    let py = python_bin();
    let mut w = data_world();
    let script = PY_ERRNO.to_string()
        + "code = code_name\n\
        print(code(lambda: os.truncate('/data/hello.txt', 999999999999999)))\n\
        fd = os.open('/data/hello.txt', os.O_WRONLY)\n\
        print(code(lambda: os.ftruncate(fd, 1 << 50)))\n\
        print(code(lambda: os.pwrite(fd, b'x', 1 << 45)))\n\
        os.close(fd)\n\
        print(len(open('/data/hello.txt').read()))\n";
    let o = w.run_tagged(&[], &[&py, "-c", &script]);
    ok(&o, "efbig");
    assert_eq!(stdout(&o), "EFBIG\nEFBIG\nEFBIG\n12\n");
}

#[test]
fn an_overwrite_is_never_merged_as_an_append_with_another_processs_version() {
    let py = python_bin();
    let mut w = data_world();
    // A rewrites the first byte (not an append) while B appends and commits first.
    // B starts only once A has opened and written (else A could load B's committed version,
    // and the outcome would be a legitimate one this test does not mean: it flaked that way).
    let a = "import os, time\n\
        f = open('/data/f', 'r+'); f.write('X'); f.flush()\n\
        open('/tmp/fspf-a-ready-' + os.environ['T'], 'w').close()\n\
        while not os.path.exists('/tmp/fspf-b-done-' + os.environ['T']): time.sleep(0.01)\n\
        f.close()\n";
    let b = "import os, time\n\
        while not os.path.exists('/tmp/fspf-a-ready-' + os.environ['T']): time.sleep(0.01)\n\
        open('/data/f', 'a').write('B\\n')\n\
        fd = os.open('/data/f', os.O_RDONLY); os.fsync(fd); os.close(fd)\n\
        open('/tmp/fspf-b-done-' + os.environ['T'], 'w').close()\n";
    // With one buffer per process (no shared buffers: FSPF_BUFDIR unset for A and B, as when
    // the run's buffer directory cannot be used) the later committer wins whole (A); B's append
    // is not silently combined with A's overwrite, and A's overwrite is not dropped. With the
    // run's shared buffers both writes land in one file, as on a kernel file system.
    for (prefix, want) in [
        ("unset FSPF_BUFDIR; ", "X123456789\n"),
        ("", "X123456789\nB\n"),
    ] {
        let o = w.run_tagged(&[], &["sh", "-c", "echo 0123456789 > /data/f"]);
        ok(&o, "reset the file");
        let token = format!("{}-{}", std::process::id(), prefix.len());
        let cmd = format!("{prefix}{py} -c \"$A\" & {py} -c \"$B\"; wait");
        let o = w.run_tagged(&[("A", a), ("B", b), ("T", &token)], &["sh", "-c", &cmd]);
        let _ = std::fs::remove_file(format!("/tmp/fspf-b-done-{token}"));
        let _ = std::fs::remove_file(format!("/tmp/fspf-a-ready-{token}"));
        ok(&o, "A and B");
        let o = w.run(&["cat", "/data/f"]);
        ok(&o, "read");
        assert_eq!(stdout(&o), want, "{prefix:?}");
    }
}

#[test]
fn addf_records_the_sources_modification_times_which_python_pyc_checks_rely_on() {
    let mut w = World::new();
    w.write("src/m.py", b"X = 1\n");
    let t = 1_600_000_000; // 2020-09-13
    let o = Command::new("touch")
        .args(["-d", &format!("@{t}")])
        .arg(w.path("src/m.py"))
        .output()
        .expect("touch");
    ok(&o, "touch");
    std::fs::create_dir_all(w.path("vol")).expect("vol");
    w.create();
    w.addr(&["/", "--kernel", "/", "--not-protected"]);
    w.addr(&["/data", "--encrypted", "--kernel", &w.p("vol")]);
    w.cli(&["addf", "fspf.pb", "/data", "src", &w.p("vol")]);
    w.encrypt();
    let o = w.run(&["stat", "-c", "%Y", "/data/m.py"]);
    ok(&o, "stat");
    assert_eq!(stdout(&o).trim(), t.to_string());
}

/// Exported function names of a shared object (`nm -D --defined-only`).
fn exported(so: &Path) -> std::collections::BTreeSet<String> {
    need("nm");
    let o = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(so)
        .output()
        .expect("nm");
    ok(&o, "nm");
    stdout(&o)
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 3 && matches!(w[1], "T" | "W" | "i"))
                .then(|| w[2].split('@').next().unwrap_or_default().to_string())
        })
        .collect()
}

#[test]
fn every_path_taking_libc_function_is_in_the_table() {
    // glibc's headers name path parameters __file, __path, __name, ...: every exported function
    // with one must be in docs/SHIELD.md's table, so a new one (a glibc upgrade) is noticed.
    let libc_so = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
    assert!(
        libc_so.exists(),
        "glibc's libc.so.6 is where Debian puts it"
    );
    let exported_libc = exported(libc_so);
    let param = regex::Regex::new(
        r"char\s*\*\s*(__restrict\s*)?__(file|path|filename|name|dir|from|to|old|new|oldpath|newpath|template|pathname|dirname|fname|special)\b",
    )
    .unwrap();
    let proto = regex::Regex::new(
        r"(?s)extern[^;{}]*?\b(\w+)\s*\(([^;{}]*?)\)\s*(__THROW|__wur|__nonnull|__attr|;|__asm|__attribute)",
    )
    .unwrap();
    let comment = regex::Regex::new(r"(?s)/\*.*?\*/").unwrap();
    let mut headers = Vec::new();
    for dir in [
        "/usr/include",
        "/usr/include/x86_64-linux-gnu/sys",
        "/usr/include/x86_64-linux-gnu/bits",
    ] {
        let rd = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{dir}: {e} (libc6-dev)"));
        for e in rd {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "h") {
                headers.push(p);
            }
        }
    }
    let mut path_taking = std::collections::BTreeSet::new();
    for h in headers {
        let text = String::from_utf8_lossy(&std::fs::read(&h).expect("header")).into_owned();
        let text = comment.replace_all(&text, "");
        for c in proto.captures_iter(&text) {
            if param.is_match(&c[2]) && exported_libc.contains(&c[1]) {
                path_taking.insert(c[1].to_string());
            }
        }
    }
    assert!(
        path_taking.len() > 100,
        "the header scan found {}",
        path_taking.len()
    );
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/SHIELD.md"))
            .expect("SHIELD.md");
    let row = regex::Regex::new(r"(?m)^\| `(\w+)` \| ([a-z ]+) \|").unwrap();
    let table: std::collections::BTreeMap<String, String> = row
        .captures_iter(&doc)
        .map(|c| (c[1].to_string(), c[2].trim().to_string()))
        .collect();
    let missing: Vec<&String> = path_taking
        .iter()
        .filter(|n| !table.contains_key(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "path-taking libc functions missing from docs/SHIELD.md's table: {missing:?}"
    );
    let hooks = exported(preload());
    let unhooked: Vec<&String> = table
        .iter()
        .filter(|(n, t)| t.as_str() == "shielded" && !hooks.contains(*n))
        .map(|(n, _)| n)
        .collect();
    assert!(
        unhooked.is_empty(),
        "marked shielded but not exported by libfspf_preload.so: {unhooked:?}"
    );
}

const LEGACY_C: &str = r#"
#include <stdio.h>
#include <sys/time.h>
#include <sys/stat.h>
#include <utime.h>
#include <unistd.h>
#include <limits.h>
#include <stdlib.h>
int main(void) {
    struct timeval tv[2] = {{1, 0}, {1500000000, 250000}};
    if (utimes("/data/hello.txt", tv) != 0) { perror("utimes"); return 1; }
    struct stat st;
    if (stat("/data/hello.txt", &st) != 0) { perror("stat"); return 1; }
    printf("%ld %ld\n", (long)st.st_mtim.tv_sec, (long)st.st_mtim.tv_nsec);
    struct utimbuf u = {2, 1600000000};
    if (utime("/data/hello.txt", &u) != 0) { perror("utime"); return 1; }
    stat("/data/hello.txt", &st);
    printf("%ld\n", (long)st.st_mtime);
    if (symlink("hello.txt", "/data/ln") != 0) { perror("symlink"); return 1; }
    char buf[64];
    ssize_t n = readlink("/data/ln", buf, sizeof buf);
    printf("%.*s\n", (int)n, buf);
    char *r = realpath("/data/../data/hello.txt", NULL);
    printf("%s\n", r ? r : "NULL");
    return 0;
}
"#;

#[test]
fn utime_utimes_and_fortified_readlink_realpath_go_through_the_shield() {
    let mut w = data_world();
    // -D_FORTIFY_SOURCE=2 makes readlink/realpath call __readlink_chk/__realpath_chk, which glibc
    // implements with internal calls the hooks would not see.
    let prog = w.cc("legacy", LEGACY_C, &["-O2", "-D_FORTIFY_SOURCE=2"]);
    let o = w.run_tagged(&[], &[&prog]);
    ok(&o, "legacy entry points");
    assert_eq!(
        stdout(&o),
        "1500000000 250000000\n1600000000\nhello.txt\n/data/hello.txt\n"
    );
}

#[test]
fn git_gcc_tar_cp_a_and_a_python_venv_work_in_a_mutable_encrypted_region() {
    need("git");
    need("cc");
    need("tar");
    let py = python_bin();
    let mut w = data_world();
    let script = format!(
        "set -e; mkdir /data/p && cd /data/p\n\
         printf 'int main(void){{return 3;}}\\n' > m.c && cc -o m m.c && {{ ./m || echo gcc=$?; }}\n\
         git init -q . && git config user.email a@b && git config user.name t\n\
         printf '#!/bin/sh\\necho hook-ran\\n' > .git/hooks/pre-commit && chmod +x .git/hooks/pre-commit\n\
         echo one > f && git add f m.c && git commit -qm one && echo two >> f && git commit -qam two\n\
         git gc -q && git fsck --no-progress && echo commits=$(git log --oneline | wc -l)\n\
         mkdir t && echo x > t/a && tar czf t.tgz t && rm -r t && tar xzf t.tgz && cat t/a\n\
         cp -a t t2 && cat t2/a\n\
         {py} -m venv v && v/bin/pip --version | cut -c1-3 && v/bin/python -c 'import sys; print(sys.prefix)'\n"
    );
    let o = w.run_tagged(&[], &["bash", "-c", &script]);
    ok(&o, "programs");
    assert_eq!(
        stdout(&o),
        "gcc=3\ncommits=2\nx\nx\npip\n/data/p/v\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // git runs hooks with their output on stderr.
    assert_eq!(
        String::from_utf8_lossy(&o.stderr)
            .matches("hook-ran")
            .count(),
        2
    );
    // The next run sees the repository intact.
    let o = w.run(&[
        "sh",
        "-c",
        "cd /data/p && git fsck --no-progress && git log --format=%s",
    ]);
    ok(&o, "git, next run");
    assert_eq!(stdout(&o), "two\none\n");
}

/// An immutable `fspf run` becomes the program (nothing of the run can move its anchor, so there
/// is no final tag to wait for): the program's exit status and death by signal are its own, and
/// its parent is the caller. A mutable run stays the parent and reports a signal as 128 + n.
#[test]
fn immutable_run_execs_the_program_and_mutable_run_waits_for_it() {
    let mut w = data_world();
    let o = w.run(&["sh", "-c", "cat /data/hello.txt; kill -9 $$"]);
    assert_eq!(stdout(&o), HELLO);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(o.status.signal(), Some(9), "{o:?}");
    let o = w.run(&["sh", "-c", "exit 7"]);
    assert_eq!(o.status.code(), Some(7));
    let o = w.run_mut(&["sh", "-c", "echo new > /data/n; kill -9 $$"]);
    assert_eq!(o.status.code(), Some(137), "{o:?}");
}

/// The in-process shield had the same defect as the FUSE one: a 255-byte name made a shadow name
/// longer than a file name may be, so the file could not be staged and the run's commit failed.
#[test]
fn a_255_byte_name_could_not_be_staged_by_the_shield() {
    let mut w = data_world();
    let name = "m".repeat(255);
    let o = w.run_mut(&[
        "sh",
        "-c",
        &format!("echo long > /data/{name} && cat /data/{name}"),
    ]);
    ok(&o, "write a 255-byte name");
    assert_eq!(stdout(&o), "long\n");
    let o = w.run(&["cat", &format!("/data/{name}")]);
    ok(&o, "read it in the next run");
    assert_eq!(stdout(&o), "long\n");
}

/// Regression (pjdfstest under `fspf run`): the shield checked no permission for other users,
/// recorded no creator, failed a path through a file with ENOENT instead of ENOTDIR, accepted
/// names longer than 255 bytes, let a non-owner "chown" a file to its current owner, changed a
/// symlink instead of its target on `chown`, kept set-ID bits across a `chown`, and truncated
/// to length 0 when asked for a negative one.
/// Everything here is decided before a commit, so the child that drops to uid 65534 needs no
/// write access to the fspf.
#[test]
fn other_users_permissions_owners_enotdir_and_name_max_were_not_enforced() {
    let py = python_bin();
    let mut w = data_world();
    let script = PY_ERRNO.to_string()
        + "import sys\n\
        os.chdir('/data')\n\
        os.umask(0)\n\
        os.mkdir('closed', 0o755)\n\
        with open('secret', 'w') as f: f.write('x')\n\
        os.chmod('secret', 0o600)\n\
        st = os.stat('closed')\n\
        print(st.st_uid == 0 and st.st_gid == 0)\n\
        print(code_name(lambda: open('hello.txt/x')) == 'ENOTDIR')\n\
        print(code_name(lambda: open('n' * 256, 'w')) == 'ENAMETOOLONG')\n\
        print(code_name(lambda: os.truncate('hello.txt', -1)) == 'EINVAL')\n\
        os.symlink('secret', 'link')\n\
        os.chown('link', 123, 456)\n\
        print(os.stat('secret').st_uid == 123 and os.lstat('link').st_uid == 0)\n\
        os.chmod('secret', 0o6755)\n\
        os.chown('secret', 0, 0)\n\
        print(os.stat('secret').st_mode & 0o7777 == 0o755)\n\
        os.chmod('secret', 0o600)\n\
        sys.stdout.flush()\n\
        pid = os.fork()\n\
        if pid == 0:\n\
        \x20   os.setgid(65534); os.setuid(65534)\n\
        \x20   print(code_name(lambda: open('secret')) == 'EACCES')\n\
        \x20   print(code_name(lambda: open('closed/new', 'w')) == 'EACCES')\n\
        \x20   print(code_name(lambda: os.mkdir('closed/d')) == 'EACCES')\n\
        \x20   print(code_name(lambda: os.chmod('secret', 0o644)) == 'EPERM')\n\
        \x20   print(code_name(lambda: os.chown('secret', 0, 0)) == 'EPERM')\n\
        \x20   print(code_name(lambda: os.utime('secret', (1, 1))) == 'EPERM')\n\
        \x20   print(code_name(lambda: os.unlink('secret')) == 'EACCES')\n\
        \x20   sys.stdout.flush()\n\
        \x20   os._exit(0)\n\
        os.waitpid(pid, 0)\n";
    let o = w.run_tagged(&[], &[&py, "-c", &script]);
    ok(&o, "permission checks");
    assert_eq!(stdout(&o), "True\n".repeat(13), "{o:?}");
}

#[test]
fn two_sqlite3_processes_lost_increments_without_cross_process_locks() {
    need("sqlite3");
    need("bash");
    let mut w = data_world();
    let script = "sqlite3 /data/c.db 'CREATE TABLE t(n); INSERT INTO t VALUES (0);' || exit 9
        inc() { for i in $(seq 40); do
            sqlite3 /data/c.db 'PRAGMA busy_timeout=20000; UPDATE t SET n=n+1;' || echo FAILED; done; }
        inc & inc & wait";
    let o = w.sh_tagged("bash", script);
    ok(&o, "two sqlite3 writers");
    assert!(
        !stdout(&o).contains("FAILED"),
        "no transaction failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let writers = String::from_utf8_lossy(&o.stderr).into_owned();
    let o = w.run(&["sqlite3", "/data/c.db", "SELECT n FROM t"]);
    ok(&o, "read the counter");
    assert_eq!(
        stdout(&o).trim(),
        "80",
        "every increment of both processes is kept (the writers said: {writers})"
    );
}

/// `( flock 9; ... ) 9>lock` in several loops at once: each subshell truncates `lock` (a new
/// version, committed at once) while another holds the lock. `flock(1)`, started with the run's
/// state of a moment before, reloaded `lock` when it took the lock, found the kernel file of the
/// newer version and reported tampering (`flock: 9: Input/output error`); the increment of that
/// iteration was lost. A kernel file that fails at a process's own state is now opened again at
/// the run's current state.
#[test]
fn a_file_committed_by_another_process_meanwhile_was_reported_as_tampered() {
    need("flock");
    need("bash");
    let mut w = data_world();
    let script = "echo 0 > /data/m
        b() { for i in $(seq 80); do
            ( flock 9; m=$(cat /data/m); echo $((m+1)) > /data/m ) 9>/data/lock2; done; }
        b & b & b & b & b & wait; cat /data/m";
    let o = w.sh_tagged("bash", script);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("integrity violation"), "{err}");
    ok(&o, "flock loops");
    assert_eq!(stdout(&o), "400\n", "every increment is kept");
}

#[test]
fn flock_and_lockf_did_not_exclude_other_processes() {
    need("flock");
    need("bash");
    let mut w = data_world();
    // flock(1) on a path, and the `( flock 9; ... ) 9>lock` idiom (the shell's description is
    // locked by a child): a read-modify-write under the lock loses no increment.
    let script = "echo 0 > /data/n; echo 0 > /data/m
        a() { for i in $(seq 60); do
            flock /data/lock sh -c 'n=$(cat /data/n); echo $((n+1)) > /data/n'; done; }
        b() { for i in $(seq 60); do
            ( flock 9; m=$(cat /data/m); echo $((m+1)) > /data/m ) 9>/data/lock2; done; }
        a & a & b & b & wait; cat /data/n /data/m";
    let o = w.sh_tagged("bash", script);
    ok(&o, "flock writers");
    assert_eq!(
        stdout(&o),
        "120\n120\n",
        "flock excluded the other processes: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // lockf and fcntl record locks from Python, each process keeping its fd open: after taking
    // the lock a process reads what the previous holder wrote through its own fd.
    let py = "import fcntl, os, sys
f = open('/data/count', 'r+')
for i in range(100):
    fcntl.lockf(f, fcntl.LOCK_EX)
    f.seek(0)
    n = int(f.read() or '0')
    f.seek(0); f.truncate(); f.write(str(n + 1)); f.flush()
    fcntl.lockf(f, fcntl.LOCK_UN)
";
    w.write("count.py", py.as_bytes());
    let pyb = python_bin();
    let script =
        format!("echo 0 > /data/count; {pyb} count.py & {pyb} count.py & wait; cat /data/count");
    let o = w.sh_tagged("bash", &script);
    ok(&o, "lockf writers");
    assert_eq!(
        stdout(&o),
        "200",
        "lockf excluded the other process: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Two processes share the run's buffer of one file. The first exits: its final commit took a
/// snapshot of the buffer ("1") and then waited (here: `FSPF_TEST_PAUSE_AFTER_STAGE`; under
/// heavy I/O, for the run's commit lock or a `syncfs`). Meanwhile the second wrote "2" and
/// committed it at its exit. The first then committed its older snapshot after the newer one:
/// the file went back to "1" once both had exited. With `lockf` between two writers of a
/// counter this lost increments (192 of 200). Snapshots of shared buffers are now checked
/// again under the run's commit lock.
#[test]
fn a_shared_buffers_older_snapshot_was_committed_after_a_newer_one() {
    need("bash");
    let mut w = data_world();
    let py = python_bin();
    let script = format!(
        "echo 0 > /data/f
        FSPF_TEST_PAUSE_AFTER_STAGE=900 {py} -c \"import time
f = open('/data/f', 'r+'); f.write('1'); f.flush(); time.sleep(0.3)\" &
        sleep 0.1
        {py} -c \"import time
f = open('/data/f', 'r+'); time.sleep(0.5); f.seek(0); f.write('2'); f.flush()\" &
        wait"
    );
    let o = w.sh_tagged("bash", &script);
    ok(&o, "two writers of a shared buffer");
    let o = w.run_tagged(&[], &["cat", "/data/f"]);
    ok(&o, "read the file");
    assert_eq!(
        stdout(&o),
        "2\n",
        "the last write of the run is the committed content"
    );
}

/// A process created the run's buffer of a file and, before it locked it, a second process
/// opening the file found it, took it for the remains of a creator that died while filling it,
/// removed it and made its own: the two processes then wrote two buffers of one file, and one
/// of them was thrown away at its commit (two `lockf` writers of a counter each counted on
/// their own, 300 of 400). A buffer is now locked before it has a name.
#[test]
fn a_second_process_removed_the_buffer_its_creator_had_not_locked_yet() {
    need("bash");
    let mut w = data_world();
    let py = python_bin();
    let script = format!(
        "FSPF_TEST_PAUSE_CREATING_BUFFER=600 {py} -c \"import time
f = open('/data/log', 'a'); time.sleep(0.3); f.write('one\\n'); f.flush(); time.sleep(0.4)\" &
        sleep 0.2
        {py} -c \"import time
f = open('/data/log', 'a'); time.sleep(0.9); f.write('two\\n'); f.flush()\" &
        wait"
    );
    let o = w.sh_tagged("bash", &script);
    ok(&o, "two appenders");
    let o = w.run_tagged(&[], &["cat", "/data/log"]);
    ok(&o, "read the log");
    assert_eq!(stdout(&o), "one\ntwo\n", "both appends are kept");
}

#[test]
fn a_process_started_while_another_committed_refused_the_fspf() {
    need("bash");
    let mut w = data_world();
    // Processes start (read the run's anchor, open the fspf) while another process commits in
    // a loop: a start that fell between the two saw a newer fspf than the tag it had read.
    need("flock");
    let script = "w() { for i in $(seq 60); do ( echo $i > /data/w$1 ) 9>/data/lock$1; done; }
        r() { for i in $(seq 60); do
            flock /data/lock sh -c 'cat /data/hello.txt > /dev/null' || echo FAILED; done; }
        w 1 & w 2 & r & r & wait";
    let o = w.sh_tagged("bash", script);
    ok(&o, "readers beside a committer");
    assert!(
        !stdout(&o).contains("FAILED"),
        "no reader was refused: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn sqlite_wal_mode_with_two_writer_processes_failed_as_each_mapped_its_own_buffer() {
    need("bash");
    let mut w = data_world();
    let pyb = python_bin();
    let writer = "import sqlite3
c = sqlite3.connect('/data/w.db', timeout=60)
c.execute('PRAGMA journal_mode=WAL')
for i in range(100):
    with c:
        c.execute('UPDATE t SET n=n+1')
c.close()
";
    w.write("writer.py", writer.as_bytes());
    let setup = "import sqlite3
c = sqlite3.connect('/data/w.db')
assert c.execute('PRAGMA journal_mode=WAL').fetchone()[0] == 'wal'
c.execute('CREATE TABLE t(n)'); c.execute('INSERT INTO t VALUES (0)'); c.commit()
";
    w.write("setup.py", setup.as_bytes());
    // Two writer processes share the WAL index (-shm, a MAP_SHARED map) and the -wal file; a
    // reader started meanwhile sees committed transactions. The run's buffer directory is gone
    // afterwards.
    let script = format!(
        "echo \"$FSPF_BUFDIR\" > bufdir; {pyb} setup.py || exit 9
         {pyb} writer.py & {pyb} writer.py & wait"
    );
    let o = w.sh_tagged("bash", &script);
    ok(&o, "two WAL writers");
    let o = w.run_tagged(
        &[],
        &[
            &pyb,
            "-c",
            "import sqlite3; print(sqlite3.connect('/data/w.db').execute('SELECT n FROM t').fetchone()[0])",
        ],
    );
    ok(&o, "read the counter");
    assert_eq!(
        stdout(&o).trim(),
        "200",
        "every transaction of both writers is kept"
    );
    let dir = std::fs::read_to_string(w.path("bufdir")).expect("bufdir");
    let dir = dir.trim();
    assert!(
        dir.starts_with("/dev/shm/fspf-run-"),
        "a mutable run has a buffer directory: {dir:?}"
    );
    assert!(
        !Path::new(dir).exists(),
        "the run's buffer directory is removed at its end"
    );
}

#[test]
fn a_reader_did_not_see_what_another_process_of_the_run_had_written_but_not_committed() {
    let mut w = data_world();
    let py = python_bin();
    // A overwrites the start of a file and keeps it open (nothing committed); B, started
    // meanwhile, reads the file: as on a kernel file system it sees A's write.
    let a = "import os, time\n\
        f = open('/data/hello.txt', 'r+'); f.write('HELLO'); f.flush()\n\
        open(os.environ['W'] + '/a-ready', 'w').close()\n\
        while not os.path.exists(os.environ['W'] + '/b-done'): time.sleep(0.01)\n\
        f.close()\n";
    let script = format!(
        "{py} -c \"$A\" & while [ ! -e \"$W/a-ready\" ]; do sleep 0.01; done; \
         cat /data/hello.txt; touch \"$W/b-done\"; wait"
    );
    let wdir = w.p("");
    let o = w.run_tagged(&[("A", a), ("W", &wdir)], &["sh", "-c", &script]);
    ok(&o, "A and B");
    assert_eq!(stdout(&o), "HELLO World\n", "B read A's write");
    let o = w.run(&["cat", "/data/hello.txt"]);
    ok(&o, "read after the run");
    assert_eq!(stdout(&o), "HELLO World\n", "A's write was committed");
}

#[test]
fn chmod_chown_utimensat_and_rename_left_the_change_time_unchanged() {
    let mut w = data_world();
    let py = python_bin();
    // Each status change moves the change time (nanoseconds), whatever time utimensat sets,
    // and the last one survives the run (it is recorded in the fspf).
    let script = "import os, time
p = '/data/hello.txt'
c = [os.stat(p).st_ctime_ns]
for op in (lambda: os.chmod(p, 0o600), lambda: os.chown(p, 123, 456),
           lambda: os.utime(p, ns=(1, 1)), lambda: os.rename(p, '/data/moved.txt')):
    time.sleep(0.02)
    op()
    if not os.path.exists(p): p = '/data/moved.txt'
    c.append(os.stat(p).st_ctime_ns)
    fd = os.open(p, os.O_RDONLY); c.append(os.fstat(fd).st_ctime_ns); os.close(fd)
print(' '.join(map(str, c)))
";
    let o = w.run_tagged(&[], &[&py, "-c", script]);
    ok(&o, "status changes");
    let c: Vec<i64> = stdout(&o)
        .split_whitespace()
        .map(|v| v.parse().expect("ctime"))
        .collect();
    assert_eq!(c.len(), 9, "{c:?}");
    for i in 0..4 {
        let (before, after, fstat) = (c[2 * i], c[2 * i + 1], c[2 * i + 2]);
        assert!(
            after > before,
            "status change {i} moved the change time: {c:?}"
        );
        assert_eq!(after, fstat, "stat and fstat agree after change {i}: {c:?}");
    }
    let o = w.run(&[
        &py,
        "-c",
        "import os; print(os.stat('/data/moved.txt').st_ctime_ns)",
    ]);
    ok(&o, "next run");
    assert_eq!(
        stdout(&o).trim(),
        c[8].to_string(),
        "the change time is recorded"
    );
}

#[test]
fn a_reader_sharing_the_buffer_of_a_file_another_process_removed_brought_it_back() {
    let mut w = data_world();
    let py = python_bin();
    // B reads the file while A writes it (they share the run's buffer); A then removes it,
    // commits and exits. B's exit must not seal its view of the buffer under the removed name.
    let a = "import os, time\n\
        W = os.environ['W']\n\
        f = open('/data/hello.txt', 'r+'); f.write('A1'); f.flush()\n\
        open(W + '/a-ready', 'w').close()\n\
        while not os.path.exists(W + '/b-ready'): time.sleep(0.01)\n\
        f.write('A2'); f.flush(); f.close()\n\
        os.unlink('/data/hello.txt')\n\
        d = os.open('/data', os.O_RDONLY); os.fsync(d); os.close(d)\n\
        open(W + '/a-done', 'w').close()\n";
    let b = "import os, time\n\
        W = os.environ['W']\n\
        while not os.path.exists(W + '/a-ready'): time.sleep(0.01)\n\
        g = open('/data/hello.txt'); print(g.read()[:2])\n\
        open(W + '/b-ready', 'w').close()\n\
        while not os.path.exists(W + '/a-done'): time.sleep(0.01)\n";
    let wdir = w.p("");
    let cmd = format!("{py} -c \"$A\" & {py} -c \"$B\"; wait");
    let o = w.run_tagged(&[("A", a), ("B", b), ("W", &wdir)], &["sh", "-c", &cmd]);
    ok(&o, "A and B");
    assert_eq!(stdout(&o), "A1\n", "B read A's write");
    let o = w.run(&["cat", "/data/hello.txt"]);
    assert!(
        !o.status.success(),
        "the removed file stays removed: {}",
        stdout(&o)
    );
}

#[test]
fn a_killed_run_left_its_plaintext_buffers_in_dev_shm() {
    let mut w = data_world();
    // A mutable run holding a buffer is killed (`fspf run` itself, with SIGKILL: no cleanup).
    let anchor = w.anchor_with(&w.tag.clone());
    let mut run = shielded::fspf_run(
        w.dir.path(),
        &w.fspf,
        &anchor,
        true,
        None,
        &[
            "sh",
            "-c",
            "echo \"$FSPF_BUFDIR\" > bufdir.tmp; exec 3>>/data/hello.txt; echo more >&3; \
             mv bufdir.tmp bufdir; sleep 2",
        ],
    )
    .spawn()
    .expect("fspf run");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !w.path("bufdir").exists() {
        assert!(std::time::Instant::now() < deadline, "the run started");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let dir = std::fs::read_to_string(w.path("bufdir")).expect("bufdir");
    let dir = PathBuf::from(dir.trim());
    assert!(
        dir.join("data/hello.txt").exists(),
        "the buffer is in {dir:?}"
    );
    run.kill().expect("kill -9 fspf run");
    let _ = run.wait();
    assert!(dir.exists(), "nothing removed it yet");
    // The next mutable run of this user removes it. (The orphaned shell committed before it
    // started `mv`: trust the fspf on disk.)
    w.tag = w.tag_on_disk();
    let o = w.run_mut(&["true"]);
    ok(&o, "next run");
    assert!(!dir.exists(), "the killed run's buffers are gone: {dir:?}");
}

#[test]
fn creating_or_removing_an_entry_left_the_directorys_times_unchanged() {
    let mut w = data_world();
    let py = python_bin();
    // Each entry made in or removed from a directory moves its modification and change times
    // (at the call, before any close or commit); the last ones are recorded in the fspf.
    let script = "import os, time
d = '/data/dir'
os.mkdir(d)
t = [os.stat(d).st_mtime_ns]
def step(op):
    time.sleep(0.02)
    op()
    st = os.stat(d)
    assert st.st_ctime_ns >= st.st_mtime_ns
    t.append(st.st_mtime_ns)
f = None
def create():
    global f
    f = open(d + '/f', 'w')
step(create)
f.close()
step(lambda: os.rename(d + '/f', d + '/g'))
step(lambda: os.mkdir(d + '/sub'))
step(lambda: os.symlink('g', d + '/l'))
step(lambda: os.unlink(d + '/g'))
print(' '.join(map(str, t)))
";
    let o = w.run_tagged(&[], &[&py, "-c", script]);
    ok(&o, "entries made and removed");
    let t: Vec<i64> = stdout(&o)
        .split_whitespace()
        .map(|v| v.parse().expect("mtime"))
        .collect();
    assert_eq!(t.len(), 6, "{t:?}");
    for i in 1..t.len() {
        assert!(
            t[i] > t[i - 1],
            "step {i} moved the directory's time: {t:?}"
        );
    }
    let o = w.run(&[
        &py,
        "-c",
        "import os; print(os.stat('/data/dir').st_mtime_ns)",
    ]);
    ok(&o, "next run");
    assert_eq!(
        stdout(&o).trim(),
        t[5].to_string(),
        "the directory's time is recorded"
    );
}

#[test]
fn rename_or_rmdir_of_dot_or_dotdot_acted_on_the_directory_itself() {
    let mut w = data_world();
    let py = python_bin();
    let script = "import os, errno
os.makedirs('/data/a/b')
def err(f, *a):
    try:
        f(*a)
        return 'ok'
    except OSError as e:
        return errno.errorcode[e.errno]
print(err(os.rename, '/data/a/b/.', '/data/c'), err(os.rename, '/data/a/b/..', '/data/c'),
      err(os.rmdir, '/data/a/b/.'), err(os.rmdir, '/data/a/b/..'),
      os.path.isdir('/data/a/b'), os.path.exists('/data/c'))
";
    let o = w.run_tagged(&[], &[&py, "-c", script]);
    ok(&o, "dot and dotdot");
    assert_eq!(stdout(&o), "EINVAL EINVAL EINVAL ENOTEMPTY True False\n");
}

#[test]
fn rename_with_a_null_path_gave_exdev_instead_of_efault() {
    let w = data_world();
    let src = r#"
#include <errno.h>
#include <stdio.h>
#include <sys/syscall.h>
int main(void) {
    int a = rename("/data/hello.txt", NULL) == -1 ? errno : 0;
    int b = rename(NULL, "/data/hello.txt") == -1 ? errno : 0;
    printf("%d %d\n", a == EFAULT, b == EFAULT);
    return 0;
}
"#;
    let exe = w.cc("renull", src, &["-Wno-nonnull"]);
    let o = w.run(&[&exe]);
    ok(&o, "rename with NULL");
    assert_eq!(stdout(&o), "1 1\n");
}

/// Inode number of a kernel file (an in-place update keeps it; a whole new version is a new
/// file renamed into place).
fn inode(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).expect("stat").ino()
}

/// A mutable run with `env` set for `fspf run` itself; afterwards the world's tag is the one on
/// disk.
fn run_mut_env(w: &mut World, env: &[(&str, &str)], argv: &[&str]) -> Output {
    let mut c = shielded::fspf_run(
        w.dir.path(),
        &w.fspf,
        &w.anchor_with(&w.tag.clone()),
        true,
        None,
        argv,
    );
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("fspf run");
    w.tag = w.tag_on_disk();
    o
}

const BIG_PY: &str = r#"
import sys
n = int(sys.argv[1])
with open('/data/big', 'wb') as f:
    f.write(bytes((i * 7 + i // 4096) % 251 for i in range(n)))
"#;

fn big_expected(n: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 7 + i / 4096) % 251) as u8).collect()
}

/// The plaintext of `/data/big`, read back through a new run.
fn read_big(w: &World) -> Vec<u8> {
    let o = w.run(&[
        "python3",
        "-c",
        "import sys; sys.stdout.buffer.write(open('/data/big','rb').read())",
    ]);
    ok(&o, "read back");
    o.stdout
}

/// Private buffers (the process's hooks see every write: only those are staged) and the run's
/// shared buffers (the default under `fspf run --mutable`: the chunks that differ from the
/// committed state are staged).
const BUFFER_MODES: [&[(&str, &str)]; 2] = [&[("FSPF_SHARED_BUFFERS", "0")], &[]];

#[test]
fn an_append_to_a_large_file_is_an_in_place_update_that_keeps_its_inode() {
    need("python3");
    need("sh");
    for env in BUFFER_MODES {
        let n = 3 << 20;
        let mut w = big_world(n);
        let kernel = w.path("vol/big");
        let before = inode(&kernel);
        ok(
            &run_mut_env(&mut w, env, &["sh", "-c", "echo line >> /data/big"]),
            "append",
        );
        assert_eq!(
            inode(&kernel),
            before,
            "{env:?}: updated in place, not rewritten"
        );
        let mut want = big_expected(n);
        want.extend_from_slice(b"line\n");
        assert!(read_big(&w) == want, "{env:?}: content after the append");
        // No journal, shadow or temporary is left behind.
        let trees: Vec<_> = std::fs::read_dir(w.path("fspf.pb.trees"))
            .expect("trees")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(trees.iter().all(|n| !n.ends_with(".journal")), "{trees:?}");
        let vol: Vec<_> = std::fs::read_dir(w.path("vol"))
            .expect("vol")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(vol.iter().all(|n| !n.contains(".fspf-")), "{vol:?}");
    }
}

#[test]
fn random_writes_and_a_truncation_of_a_large_file_are_updated_in_place() {
    need("python3");
    for env in BUFFER_MODES {
        let n = 2 << 20;
        let mut w = big_world(n);
        let before = inode(&w.path("vol/big"));
        let script = r#"
import os
fd = os.open('/data/big', os.O_RDWR)
os.pwrite(fd, b'A' * 5000, 10)
os.pwrite(fd, b'B' * 3, 1_000_000)
os.fsync(fd)
os.pwrite(fd, b'C' * 4096, 2 * 4096)
os.ftruncate(fd, 1_500_000)
os.pwrite(fd, b'D' * 10, 1_600_000)
os.close(fd)
"#;
        ok(
            &run_mut_env(&mut w, env, &["python3", "-c", script]),
            "update",
        );
        assert_eq!(
            inode(&w.path("vol/big")),
            before,
            "{env:?}: updated in place"
        );
        let mut want = big_expected(n);
        want[10..5010].fill(b'A');
        want[1_000_000..1_000_003].fill(b'B');
        want[8192..12288].fill(b'C');
        want.truncate(1_500_000);
        want.resize(1_600_010, 0);
        want[1_600_000..].fill(b'D');
        assert!(read_big(&w) == want, "{env:?}: content after the updates");
    }
}

/// Update journals of the files a run changed in place, in `dir` (recursively).
fn journals_below(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(journals_below(&p));
        } else if p.extension().is_some_and(|x| x == "journal") {
            out.push(p);
        }
    }
    out
}

/// Marks (`user.fspf.mark`: boot id, applied root, durable root) of the chunk trees below
/// `dir` (FORMAT.md §5b, "Journals in the log").
fn tree_marks_below(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(tree_marks_below(&p));
        } else if p.extension().is_none()
            && p.parent()
                .is_some_and(|d| d.extension().is_some_and(|x| x == "trees"))
        {
            let f = std::fs::File::open(&p).expect("tree");
            let mut b = vec![0u8; 80];
            if let Ok(n) = rustix::fs::fgetxattr(&f, "user.fspf.mark", &mut b[..]) {
                b.truncate(n);
                out.push(b);
            }
        }
    }
    out
}

/// The data and tree files of an in-place update are not synced at each commit (FORMAT.md
/// §5b, chains): the journals ride in the log's records and no journal file is left; the end
/// of this run moves the index cache past those records (more than 16 KiB of log), which
/// settles the chain first (the tree's mark names the committed root as durable).
#[test]
fn a_run_that_updated_a_file_in_place_leaves_no_journal_file_and_its_index_cache_settles_it() {
    need("python3");
    let n = 2 << 20;
    let mut w = big_world(n);
    let script = r#"
import os
fd = os.open('/data/big', os.O_RDWR)
for k in range(20):
    os.pwrite(fd, bytes([65 + k]) * 100, 4096 * k * 7)
    os.fdatasync(fd)
os.close(fd)
"#;
    ok(
        &run_mut_env(&mut w, &[], &["python3", "-c", script]),
        "update",
    );
    let left = journals_below(w.dir.path());
    assert!(left.is_empty(), "journals left after the run: {left:?}");
    let marks = tree_marks_below(w.dir.path());
    assert!(!marks.is_empty(), "the journals were in the log");
    for m in &marks {
        assert_eq!(
            m[16..48],
            m[48..80],
            "settled: applied and durable at one root"
        );
    }
    let mut want = big_expected(n);
    for k in 0..20usize {
        want[4096 * k * 7..4096 * k * 7 + 100].fill(65 + k as u8);
    }
    assert!(read_big(&w) == want, "content after the updates");
}

#[test]
fn a_write_that_bypassed_the_hooks_into_a_tracked_buffer_is_not_lost() {
    need("python3");
    let n = 2 << 20;
    let mut w = big_world(n);
    // A hooked write, then one by raw system call that no hook sees: the buffer's times
    // tell the shield that its record of changes is incomplete, and it seals a whole version.
    // (With the file loaded whole at the open: a raw write into a part never loaded fails
    // the commit instead, `a_raw_write_into_a_part_never_loaded_fails_the_commit_and_never_commits_zeros`.)
    let script = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open('/data/big', os.O_RDWR)
os.pwrite(fd, b'hooked', 100)
buf = ctypes.create_string_buffer(b'RAW' * 4)
n = libc.syscall(18, fd, buf, ctypes.c_size_t(12), ctypes.c_long(1_500_000))
assert n == 12, n
os.close(fd)
"#;
    ok(
        &run_mut_env(
            &mut w,
            &[("FSPF_LAZY_RDWR", "0")],
            &["python3", "-c", script],
        ),
        "update",
    );
    let mut want = big_expected(n);
    want[100..106].copy_from_slice(b"hooked");
    want[1_500_000..1_500_012].copy_from_slice(b"RAWRAWRAWRAW");
    assert!(read_big(&w) == want, "both writes kept");
}

/// A world whose `/data/big` holds `n` bytes of [`BIG_PY`]'s pattern (format 2).
fn big_world(n: usize) -> World {
    need("python3");
    need("sh");
    let mut w = data_world();
    ok(
        &w.run_mut(&["python3", "-c", BIG_PY, &n.to_string()]),
        "write big",
    );
    w
}

/// Two Python scripts side by side in one mutable run with private buffers; `GO` and `DONE` in
/// them name two files (outside the shield) through which they take turns. Both must succeed.
fn side_by_side(w: &mut World, first: &str, second: &str) -> Output {
    let (go, done) = (w.p("go"), w.p("done"));
    let fill = |s: &str| s.replace("GO", &go).replace("DONE", &done);
    let o = run_mut_env(
        w,
        &[("FSPF_SHARED_BUFFERS", "0")],
        &[
            "sh",
            "-c",
            "python3 -c \"$1\" & python3 -c \"$2\" & wait %1 && wait %2",
            "sh",
            &fill(first),
            &fill(second),
        ],
    );
    ok(&o, "two processes");
    o
}

/// Waits for `GO`, the turn of the second script of [`side_by_side`].
const WAIT_GO: &str = "import os, time\nwhile not os.path.exists('GO'):\n    time.sleep(0.02)\n";

#[test]
fn two_processes_updating_different_ranges_of_one_file_keep_both() {
    let n = 2 << 20;
    let mut w = big_world(n);
    // The first writer loads the file, the second writes and commits, then the first commits:
    // its update was computed from a state that is no longer current and is applied again
    // onto the second's.
    let first = r#"
import os, time
fd = os.open('/data/big', os.O_RDWR)
os.pwrite(fd, b'first', 1000)
open('GO', 'w').close()
while not os.path.exists('DONE'):
    time.sleep(0.02)
os.fsync(fd)
os.close(fd)
"#;
    let second = format!(
        "{WAIT_GO}fd = os.open('/data/big', os.O_RDWR)\nos.pwrite(fd, b'second', 1_900_000)\nos.fsync(fd)\nos.close(fd)\nopen('DONE', 'w').close()\n"
    );
    side_by_side(&mut w, first, &second);
    let mut want = big_expected(n);
    want[1000..1005].copy_from_slice(b"first");
    want[1_900_000..1_900_006].copy_from_slice(b"second");
    assert!(read_big(&w) == want, "both writes kept");
}

#[test]
fn a_reader_of_a_file_another_process_updated_in_place_got_eio() {
    let n = 2 << 20;
    let mut w = big_world(n);
    // The reader opens the file and reads a little; another process then changes it in place
    // and commits (fsync: the other processes of a run see a change from its commit on); the
    // reader goes on reading the changed chunks (a kernel file shows the new
    // bytes) instead of failing them as tampered.
    let reader = format!(
        r#"
import os, time
f = open('/data/big', 'rb')
assert len(f.read(10)) == 10
open('GO', 'w').close()
while not os.path.exists('DONE'):
    time.sleep(0.02)
f.seek(0)
d = f.read()
assert len(d) == {n} + 5, len(d)
assert d[500_000:500_008] == b'CHANGED!', d[500_000:500_008]
assert d[-5:] == b'tail\n'
print('ok')
"#
    );
    let writer = format!(
        "{WAIT_GO}fd = os.open('/data/big', os.O_RDWR)\nos.pwrite(fd, b'CHANGED!', 500_000)\nos.pwrite(fd, b'tail\\n', {n})\nos.fsync(fd)\nos.close(fd)\nopen('DONE', 'w').close()\n"
    );
    let o = side_by_side(&mut w, &reader, &writer);
    assert_eq!(stdout(&o).trim(), "ok");
}

/// Every file of `dir` below the world (name -> bytes).
fn snapshot(w: &World, rel: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(w.path(rel))
        .expect("dir")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read"),
            )
        })
        .collect()
}

#[test]
fn an_updated_large_file_with_a_chunk_or_tree_rolled_back_or_flipped_is_refused() {
    need("python3");
    need("cat");
    let n = 1 << 20;
    let mut w = big_world(n);
    let old_data = std::fs::read(w.path("vol/big")).expect("data");
    let old_trees = snapshot(&w, "fspf.pb.trees");
    let private = [("FSPF_SHARED_BUFFERS", "0")];
    let script = "import os\nfd = os.open('/data/big', os.O_RDWR)\nos.pwrite(fd, b'new', 300000)\nos.close(fd)\n";
    ok(
        &run_mut_env(&mut w, &private, &["python3", "-c", script]),
        "update",
    );
    let new_data = std::fs::read(w.path("vol/big")).expect("data");
    let new_trees = snapshot(&w, "fspf.pb.trees");
    assert_eq!(
        old_trees.keys().collect::<Vec<_>>(),
        new_trees.keys().collect::<Vec<_>>()
    );
    let refused = |w: &World, what: &str| {
        let o = w.run(&["cat", "/data/big"]);
        assert!(!o.status.success(), "{what}: accepted");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("Input/output error"),
            "{what}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let restore = |w: &World| {
        std::fs::write(w.path("vol/big"), &new_data).expect("data");
        for (k, v) in &new_trees {
            std::fs::write(w.path(&format!("fspf.pb.trees/{k}")), v).expect("tree");
        }
    };
    // The updated chunk (chunk 73) put back as it was before the update.
    let mut d = new_data.clone();
    let c = 24 + 73 * 4096;
    d[c..c + 4096].copy_from_slice(&old_data[c..c + 4096]);
    std::fs::write(w.path("vol/big"), &d).expect("chunk");
    refused(&w, "chunk rolled back");
    restore(&w);
    // The tree rolled back (the whole file and tree as they were: an older valid state).
    std::fs::write(w.path("vol/big"), &old_data).expect("data");
    for (k, v) in &old_trees {
        std::fs::write(w.path(&format!("fspf.pb.trees/{k}")), v).expect("tree");
    }
    refused(&w, "file and tree rolled back");
    restore(&w);
    // One bit of the tree flipped.
    for (k, v) in &new_trees {
        let mut t = v.clone();
        t[100] ^= 1;
        std::fs::write(w.path(&format!("fspf.pb.trees/{k}")), t).expect("tree");
    }
    refused(&w, "tree page flipped");
    restore(&w);
    let o = w.run(&["cat", "/data/big"]);
    ok(&o, "restored");
}

#[test]
fn a_second_change_before_the_commit_rewrote_the_whole_file() {
    need("python3");
    for env in BUFFER_MODES {
        let n = 2 << 20;
        let mut w = big_world(n);
        let before = inode(&w.path("vol/big"));
        // Closed after the first change (staged as an update), opened again and appended to
        // before the commit at exit: one update with both changes, not a whole new version.
        let script = "import os\nfd = os.open('/data/big', os.O_RDWR)\nos.pwrite(fd, b'first', 123456)\nos.close(fd)\nopen('/data/big', 'ab').write(b'second\\n')\n";
        ok(
            &run_mut_env(&mut w, env, &["python3", "-c", script]),
            "two changes",
        );
        assert_eq!(
            inode(&w.path("vol/big")),
            before,
            "{env:?}: updated in place"
        );
        let mut want = big_expected(n);
        want[123_456..123_461].copy_from_slice(b"first");
        want.extend_from_slice(b"second\n");
        assert!(read_big(&w) == want, "{env:?}: both changes");
    }
}

/// Bytes the kernel allocated to the file behind `fd` (a raw `fstat`, which the shield does not
/// see: the buffer's memfd or the run's shared buffer file). Python, for the scripts below.
const ALLOCATED_PY: &str = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def allocated(fd):
    st = ctypes.create_string_buffer(144)
    assert libc.syscall(5, fd, st) == 0, ctypes.get_errno()
    return int.from_bytes(st.raw[64:72], 'little') * 512
def raw_write(fd, b):
    buf = ctypes.create_string_buffer(b)
    assert libc.syscall(1, fd, buf, ctypes.c_size_t(len(b))) == len(b)
def pattern(n):
    return bytes((i * 7 + i // 4096) % 251 for i in range(n))
"#;

#[test]
fn an_append_to_a_large_file_loads_only_its_end_and_whatever_reads_it_loads_the_rest() {
    need("python3");
    for env in BUFFER_MODES {
        let n = 3 << 20;
        let mut w = big_world(n);
        let script = format!(
            "{ALLOCATED_PY}{}",
            r#"
n = 3 << 20
fd = os.open('/data/big', os.O_WRONLY | os.O_APPEND)
os.write(fd, b'hooked ')
# Linux appends a pwrite on an O_APPEND description, whatever the offset.
os.pwrite(fd, b'pwrite ', 0)
raw_write(fd, b'raw ')
assert os.fstat(fd).st_size == n + 18, os.fstat(fd).st_size
# Only the last chunk and what was appended are in memory.
assert allocated(fd) <= 64 << 10, allocated(fd)
# A second appending description of the file in this process shares the buffer, unloaded.
fd2 = os.open('/data/big', os.O_WRONLY | os.O_APPEND)
os.write(fd2, b'second ')
assert allocated(fd) <= 64 << 10, allocated(fd)
# A reader loads what it reads, when it reads it: all of it here.
want = pattern(n) + b'hooked pwrite raw second '
with open('/data/big', 'rb') as r:
    assert allocated(fd) <= 64 << 10, allocated(fd)
    assert r.read() == want
    assert allocated(fd) >= n, allocated(fd)
os.write(fd, b'end')
os.close(fd2)
os.close(fd)
"#
        );
        ok(
            &run_mut_env(&mut w, env, &["python3", "-c", &script]),
            "append",
        );
        let mut want = big_expected(n);
        want.extend_from_slice(b"hooked pwrite raw second end");
        let got = read_big(&w);
        assert!(
            got == want,
            "{env:?}: content after the appends: {} bytes, want {}; tail {:?}",
            got.len(),
            want.len(),
            String::from_utf8_lossy(&got[got.len().saturating_sub(40)..])
        );
    }
}

#[test]
fn an_unloaded_buffer_is_loaded_before_a_truncation_a_seek_for_data_a_map_or_a_non_appending_write()
{
    need("python3");
    for env in BUFFER_MODES {
        let n = 3 << 20;
        let mut w = big_world(n);
        let script = format!(
            "{ALLOCATED_PY}{}",
            r#"
import fcntl, mmap
n = 3 << 20
want = bytearray(pattern(n))
def fresh():
    fd = os.open('/data/big', os.O_WRONLY | os.O_APPEND)
    assert allocated(fd) <= 64 << 10, allocated(fd)
    return fd
def done(fd):
    # Committed, and the buffer dropped: the next open makes a new one.
    os.fsync(fd)
    os.close(fd)
# A truncation below the end keeps the bytes before it.
fd = fresh()
os.ftruncate(fd, n - 100_000)
del want[n - 100_000:]
os.write(fd, b'T')
want += b'T'
done(fd)
# O_APPEND taken away: writes land at the offset.
fd = fresh()
fl = fcntl.fcntl(fd, fcntl.F_GETFL)
fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_APPEND)
os.pwrite(fd, b'XY', 5)
want[5:7] = b'XY'
done(fd)
# SEEK_DATA finds data at 0, not a hole.
fd = fresh()
assert os.lseek(fd, 0, os.SEEK_DATA) == 0
done(fd)
# A shared map of a read-write description (loaded at its open) sees the committed bytes.
fd = fresh()
rw = os.open('/data/big', os.O_RDWR)
m = mmap.mmap(rw, 0)
assert m[:7] == bytes(want[:7]), m[:7]
m[0:1] = b'M'
want[0:1] = b'M'
m.close()
os.close(rw)
done(fd)
with open('/data/big', 'rb') as r:
    assert r.read() == bytes(want)
open('WANT', 'wb').write(want)
"#
        )
        .replace("WANT", &w.p("want"));
        ok(
            &run_mut_env(&mut w, env, &["python3", "-c", &script]),
            "accesses",
        );
        let want = std::fs::read(w.path("want")).expect("want");
        assert!(read_big(&w) == want, "{env:?}: content after the accesses");
    }
}

#[test]
fn a_shell_appending_through_an_exec_and_a_fork_keeps_every_line_without_loading_the_file() {
    need("python3");
    need("bash");
    for env in BUFFER_MODES {
        let n = 3 << 20;
        let mut w = big_world(n);
        // bash opens the file, runs a builtin, then an exec'd program inherits the
        // description (`FSPF_INHERIT`), then a forked subshell appends through it too.
        let script = format!(
            "{ALLOCATED_PY}{}",
            r#"
import sys
fd = 1
os.write(fd, b'py ')
assert allocated(fd) <= 64 << 10, allocated(fd)
"#
        );
        let py = w.p("append.py");
        std::fs::write(&py, script).expect("script");
        let sh = format!(
            "{{ echo -n 'builtin '; python3 {py}; ( echo -n 'sub ' ); /bin/echo -n 'exec '; }} >> /data/big"
        );
        ok(
            &run_mut_env(&mut w, env, &["bash", "-c", &sh]),
            "shell appends",
        );
        let mut want = big_expected(n);
        want.extend_from_slice(b"builtin py sub exec ");
        assert!(
            read_big(&w) == want,
            "{env:?}: content after the shell appends"
        );
    }
}

/// A world with `/data/big` of `n` bytes, changed by Python `script` (after
/// [`ALLOCATED_PY`]) in a mutable run with `env` and buffers loaded whole at every open.
fn big_changed_by(n: usize, env: &[(&str, &str)], script: &str) -> World {
    let mut w = big_world(n);
    let env: Vec<_> = env
        .iter()
        .copied()
        .chain([("FSPF_LAZY_APPEND", "0"), ("FSPF_LAZY_RDWR", "0")])
        .collect();
    let script = format!("{ALLOCATED_PY}{script}");
    ok(
        &run_mut_env(&mut w, &env, &["python3", "-c", &script]),
        "writes",
    );
    w
}

#[test]
fn a_write_the_hooks_did_not_see_was_lost_when_a_hooked_write_followed_it() {
    need("python3");
    for env in BUFFER_MODES {
        let n = 2 << 20;
        let w = big_changed_by(
            n,
            env,
            r#"
fd = os.open('/data/big', os.O_RDWR)
os.pwrite(fd, b'one', 100)
os.lseek(fd, 1_000_000, os.SEEK_SET)
raw_write(fd, b'RAW')
os.pwrite(fd, b'two', 200)
os.close(fd)
"#,
        );
        let mut want = big_expected(n);
        want[100..103].copy_from_slice(b"one");
        want[1_000_000..1_000_003].copy_from_slice(b"RAW");
        want[200..203].copy_from_slice(b"two");
        assert!(read_big(&w) == want, "{env:?}: the unseen write is kept");
    }
}

#[test]
fn opening_a_large_file_to_read_and_write_loads_only_what_is_read_or_partly_written() {
    need("python3");
    for env in BUFFER_MODES {
        let n = 3 << 20;
        let mut w = big_world(n);
        let script = format!(
            "{ALLOCATED_PY}{}",
            r#"
n = 3 << 20
want = bytearray(pattern(n))
fd = os.open('/data/big', os.O_RDWR)
# Opened: only the last block is in memory.
assert allocated(fd) <= 64 << 10, allocated(fd)
# A read loads what it reads (whole blocks around it).
assert os.pread(fd, 100, 1_000_003) == want[1_000_003:1_000_103]
# A write loads the blocks it covers only partly; whole blocks it covers are not loaded.
os.pwrite(fd, b'partial', 2_000_005)
want[2_000_005:2_000_012] = b'partial'
os.pwrite(fd, b'W' * 8192, 1 << 20)
want[1 << 20:(1 << 20) + 8192] = b'W' * 8192
os.lseek(fd, 700_001, os.SEEK_SET)
os.write(fd, b'at the offset')
want[700_001:700_014] = b'at the offset'
assert allocated(fd) <= 128 << 10, allocated(fd)
# Another description shares the buffer and reads through its holes.
with open('/data/big', 'rb') as r:
    r.seek(1_999_990)
    assert r.read(40) == want[1_999_990:2_000_030]
# A child writes the shared buffer; the parent reads what it wrote and what it did not.
pid = os.fork()
if pid == 0:
    os.pwrite(fd, b'child', 2_200_001)
    os._exit(0)
assert os.waitpid(pid, 0)[1] == 0
want[2_200_001:2_200_006] = b'child'
assert os.pread(fd, 30, 2_199_990) == want[2_199_990:2_200_020]
# A commit in the middle, then a cut inside a part never loaded, then more writes.
os.fsync(fd)
os.ftruncate(fd, 2_500_003)
del want[2_500_003:]
os.pwrite(fd, b'after', 10)
want[10:15] = b'after'
assert allocated(fd) <= 256 << 10, allocated(fd)
os.close(fd)
"#
        );
        let o = run_mut_env(&mut w, env, &["python3", "-c", &script]);
        ok(&o, "read-write");
        let mut want = big_expected(n);
        want[2_000_005..2_000_012].copy_from_slice(b"partial");
        want[1 << 20..(1 << 20) + 8192].fill(b'W');
        want[700_001..700_014].copy_from_slice(b"at the offset");
        want[2_200_001..2_200_006].copy_from_slice(b"child");
        want.truncate(2_500_003);
        want[10..15].copy_from_slice(b"after");
        let got = read_big(&w);
        same_bytes(&got, &want, &format!("{env:?}"));
        // The same script with the file loaded whole at its open fails its first check.
        let mut w2 = big_world(n);
        let env2: Vec<_> = env
            .iter()
            .copied()
            .chain([("FSPF_LAZY_RDWR", "0")])
            .collect();
        let o = run_mut_env(&mut w2, &env2, &["python3", "-c", &script]);
        assert!(
            !o.status.success()
                && String::from_utf8_lossy(&o.stderr).contains("AssertionError: 3145728"),
            "{env:?}: loaded whole, the first allocation check must fail: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Threads of two processes read and write their own parts of one partly unloaded buffer at
/// once (parts that share blocks at their edges, writes of any length and offset): every byte
/// written is committed, every byte not written is the file's, and every read returns what the
/// writer's model says. The buffer's lock was an OFD lock on a description that a forked child
/// and every thread share: a write in progress in one of them looked like a write the shield
/// did not see to another, and the buffer was refused (`EIO`).
#[test]
fn a_forked_writer_of_a_partly_unloaded_file_was_refused_as_an_unseen_write() {
    need("python3");
    for env in BUFFER_MODES {
        let n = 3 << 20;
        let mut w = big_world(n);
        let models = w.p("models");
        std::fs::create_dir_all(&models).expect("models");
        let script = format!(
            "{ALLOCATED_PY}MODELS = {models:?}\n{}",
            r#"
import random, threading
n = 3 << 20
part = 400_001
base = pattern(n)
fd = os.open('/data/big', os.O_RDWR)
def work(k, failures):
    lo, hi = k * part, min((k + 1) * part, n)
    model = bytearray(base[lo:hi])
    rng = random.Random(k)
    for i in range(300):
        at = rng.randrange(lo, hi)
        ln = min(rng.randrange(1, 10_000), hi - at)
        data = rng.randbytes(ln)
        os.pwrite(fd, data, at)
        model[at - lo:at - lo + ln] = data
        if i % 7 == 0:
            a = rng.randrange(lo, hi)
            b = min(hi, a + rng.randrange(1, 20_000))
            if os.pread(fd, b - a, a) != model[a - lo:b - lo]:
                failures.append((k, i))
    open('%s/%d' % (MODELS, k), 'wb').write(model)
def run(ks):
    failures = []
    ts = [threading.Thread(target=work, args=(k, failures)) for k in ks]
    for t in ts: t.start()
    for t in ts: t.join()
    assert not failures, failures
pid = os.fork()
if pid == 0:
    run([5, 6])
    os._exit(0)
run([0, 1, 2, 3, 4])
assert os.waitpid(pid, 0)[1] == 0
os.close(fd)
"#
        );
        ok(
            &run_mut_env(&mut w, env, &["python3", "-c", &script]),
            "threads",
        );
        let mut want = big_expected(n);
        let part = 400_001;
        for k in 0..7 {
            let m = std::fs::read(format!("{models}/{k}")).expect("model");
            want[k * part..k * part + m.len()].copy_from_slice(&m);
        }
        let got = read_big(&w);
        same_bytes(&got, &want, &format!("{env:?}"));
        std::fs::remove_dir_all(&models).expect("models");
    }
}

/// `truncate(PATH)` opens the file write-only, which now leaves it unloaded; the cut went past
/// the loading of the new end's block and the commit refused the hole it left (pjdfstest
/// `truncate/00.t`, test 5).
#[test]
fn a_truncation_by_path_inside_the_unloaded_part_of_a_large_file_failed_its_commit() {
    need("python3");
    for env in BUFFER_MODES {
        let n = 3 << 20;
        let mut w = big_world(n);
        ok(
            &run_mut_env(
                &mut w,
                env,
                &[
                    "python3",
                    "-c",
                    "import os; os.truncate('/data/big', 1_234_567)",
                ],
            ),
            "truncate",
        );
        let mut want = big_expected(n);
        want.truncate(1_234_567);
        assert!(read_big(&w) == want, "{env:?}: cut by path");
    }
}

/// SQLite reads and rewrites pages of a 4 MB database opened read-write, which the shield no
/// longer loads whole: every transaction is kept and the database stays sound.
#[test]
fn a_large_sqlite_database_opened_read_write_without_loading_it_keeps_every_transaction() {
    need("python3");
    for env in BUFFER_MODES {
        let mut w = data_world();
        let create = "import sqlite3\nc = sqlite3.connect('/data/t.db', isolation_level=None)\nc.execute('CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER, pad BLOB)')\nc.execute('BEGIN')\nc.execute('WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM r WHERE i < 4000) INSERT INTO t SELECT i, 0, randomblob(1000) FROM r')\nc.execute('COMMIT')\n";
        ok(&w.run_mut(&["python3", "-c", create]), "create");
        let update = "import random, sqlite3\nc = sqlite3.connect('/data/t.db', isolation_level=None)\nrng = random.Random(7)\nfor _ in range(300):\n    c.execute('BEGIN')\n    assert c.execute('UPDATE t SET v = v + 1 WHERE id = ?', (rng.randint(1, 4000),)).rowcount == 1\n    c.execute('COMMIT')\n";
        ok(
            &run_mut_env(&mut w, env, &["python3", "-c", update]),
            "update",
        );
        let check = "import sqlite3\nc = sqlite3.connect('/data/t.db')\nprint(c.execute('SELECT sum(v), count(*) FROM t').fetchone(), c.execute('PRAGMA integrity_check').fetchone()[0])\n";
        let o = w.run(&["python3", "-c", check]);
        ok(&o, "check");
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            "(300, 4000) ok",
            "{env:?}"
        );
        assert!(
            std::fs::metadata(w.path("vol/t.db")).expect("db").len() > 2 << 20,
            "a database larger than HASH_MAX"
        );
    }
}

#[test]
fn a_raw_write_into_a_part_never_loaded_fails_the_commit_and_never_commits_zeros() {
    need("python3");
    for env in BUFFER_MODES {
        let n = 2 << 20;
        let mut w = big_world(n);
        // A raw write into a part that was read (loaded) is kept like any unseen write.
        let script = format!(
            "{ALLOCATED_PY}{}",
            r#"
fd = os.open('/data/big', os.O_RDWR)
os.pread(fd, 10, 1_000_000)
os.lseek(fd, 1_000_002, os.SEEK_SET)
raw_write(fd, b'RAW')
os.pwrite(fd, b'two', 200)
os.close(fd)
"#
        );
        ok(
            &run_mut_env(&mut w, env, &["python3", "-c", &script]),
            "raw write into a loaded part",
        );
        let mut want = big_expected(n);
        want[1_000_002..1_000_005].copy_from_slice(b"RAW");
        want[200..203].copy_from_slice(b"two");
        assert!(
            read_big(&w) == want,
            "{env:?}: the raw write into a loaded part is kept"
        );
        // One into a part never loaded: the other bytes of its page would be zeros, not the
        // file's. Nothing of it is committed; the program's close and the run fail.
        let script = format!(
            "{ALLOCATED_PY}{}",
            r#"
fd = os.open('/data/big', os.O_RDWR)
os.pwrite(fd, b'one', 100)
os.lseek(fd, 1_500_001, os.SEEK_SET)
raw_write(fd, b'HOLE')
try:
    os.pwrite(fd, b'three', 300)
    raise SystemExit('a write after it succeeded')
except OSError as e:
    assert e.errno == 5, e
try:
    os.close(fd)
    raise SystemExit('the close committed')
except OSError as e:
    assert e.errno == 5, e
print('refused')
"#
        );
        let o = run_mut_env(&mut w, env, &["python3", "-c", &script]);
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("refused"),
            "{env:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("a write it did not see"),
            "{env:?}: the reason is reported: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            read_big(&w) == want,
            "{env:?}: nothing of the refused buffer is committed"
        );
    }
}

#[test]
fn a_pwrite_on_an_o_append_descriptor_was_recorded_at_its_offset_instead_of_the_end() {
    need("python3");
    for env in BUFFER_MODES {
        let n = 2 << 20;
        let w = big_changed_by(
            n,
            env,
            r#"
fd = os.open('/data/big', os.O_WRONLY | os.O_APPEND)
os.pwrite(fd, b'appended', 0)
os.close(fd)
"#,
        );
        let mut want = big_expected(n);
        want.extend_from_slice(b"appended");
        assert!(read_big(&w) == want, "{env:?}: the pwrite appended");
    }
}

// ---- Large files sealed while written (crates/fspf-preload/src/stream.rs) ----

/// Streams start at 2 MiB buffered here (64 MiB by default), so small files exercise them.
const STREAM_2MB: &[(&str, &str)] = &[("FSPF_STREAM_MB", "2")];

/// [`STREAM_2MB`] with private buffers (`FSPF_SHARED_BUFFERS=0`).
fn stream_2mb_private() -> Vec<(&'static str, &'static str)> {
    STREAM_2MB
        .iter()
        .copied()
        .chain([("FSPF_SHARED_BUFFERS", "0")])
        .collect()
}

/// `script` run in a fresh world with streams off (files held whole) must fail with `needle`
/// on its stderr: its memory check is one that only streams pass.
fn fails_with_streams_off(script: &str, needle: &str) {
    let mut w = data_world();
    let o = run_mut_env(
        &mut w,
        &[("FSPF_STREAM_MB", "0")],
        &["python3", "-c", script],
    );
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains(needle),
        "held whole, the check must fail: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The byte at `i` of the files the stream tests write.
const STREAM_PY: &str = r#"
MB = 1 << 20
def piece(i, n=MB):
    return bytes(((i * 131 + k // 4096) % 251) for k in range(0, n, 4096)) * 4096 if n == MB else bytes([i % 251]) * n
"#;

fn stream_piece(i: usize) -> Vec<u8> {
    let mb = 1 << 20;
    let mut v = Vec::with_capacity(mb);
    for k in (0..mb).step_by(4096) {
        v.push(((i * 131 + k / 4096) % 251) as u8);
    }
    v.repeat(4096)
}

/// `got` equals `want`, or the failure says where they first differ.
fn same_bytes(got: &[u8], want: &[u8], what: &str) {
    assert!(
        got == want,
        "{what}: {} bytes read back, want {}; first difference at {:?}",
        got.len(),
        want.len(),
        got.iter().zip(want).position(|(a, b)| a != b)
    );
}

/// The plaintext of embed path `p`, read back through a new run.
fn read_back(w: &World, p: &str) -> Vec<u8> {
    let script = format!("import sys; sys.stdout.buffer.write(open('{p}','rb').read())");
    let o = w.run(&["python3", "-c", &script]);
    ok(&o, "read back");
    o.stdout
}

/// Issue 8 (bounded memory): a new 24 MiB file written in 1 MiB writes is sealed in pieces as
/// it is written; the run's buffer never holds more than the threshold and a write. The same
/// script with streams off holds the whole file (its check fails). No shadow is left.
#[test]
fn a_new_large_file_is_sealed_while_written_and_never_held_whole() {
    need("python3");
    let script = format!(
        "{ALLOCATED_PY}{STREAM_PY}{}",
        r#"
fd = os.open('/data/s', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
peak = 0
for i in range(24):
    os.write(fd, piece(i))
    peak = max(peak, allocated(fd))
assert peak <= 4 * MB, peak
os.close(fd)
print('peak', peak)
"#
    );
    // (Private buffers too: a process's own buffer streams as long as no other holds it.)
    let mut w = data_world();
    let o = run_mut_env(&mut w, &stream_2mb_private(), &["python3", "-c", &script]);
    ok(&o, "streamed write, private buffer");
    let o = run_mut_env(&mut w, STREAM_2MB, &["python3", "-c", &script]);
    ok(&o, "streamed write");
    let want: Vec<u8> = (0..24).flat_map(stream_piece).collect();
    assert!(read_back(&w, "/data/s") == want, "the content read back");
    // A file unlinked while it is sealed leaves nothing of its stream.
    let unlinked = format!(
        "{STREAM_PY}{}",
        r#"
import os
fd = os.open('/data/u', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for i in range(8):
    os.write(fd, piece(i))
os.unlink('/data/u')
os.write(fd, piece(9))
os.close(fd)
assert not os.path.exists('/data/u')
"#
    );
    ok(
        &run_mut_env(&mut w, STREAM_2MB, &["python3", "-c", &unlinked]),
        "unlinked while sealed",
    );
    let left: Vec<_> = std::fs::read_dir(w.path("vol"))
        .expect("vol")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".fspf-"))
        .collect();
    assert!(left.is_empty(), "shadows left: {left:?}");
    // Streams off: the buffer holds the file.
    fails_with_streams_off(&script, "AssertionError");
}

/// A file being sealed while written is read, overwritten and cut below its sealed part, read
/// by a second description and a forked child's append, and mapped at the end: every read
/// returns what the program's model says, and the committed file equals it.
#[test]
fn a_file_sealed_while_written_reads_writes_and_cuts_below_its_sealed_part() {
    need("python3");
    let script = format!(
        "{ALLOCATED_PY}{STREAM_PY}{}",
        r#"
import mmap
want = bytearray()
fd = os.open('/data/s', os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
for i in range(12):
    os.write(fd, piece(i)); want += piece(i)
assert allocated(fd) <= 4 * MB, allocated(fd)
# Below the sealed part: a read, then writes (the stream is committed first).
assert os.pread(fd, 100, 5) == bytes(want[5:105])
os.pwrite(fd, b'HEADER', 100); want[100:106] = b'HEADER'
os.pwrite(fd, b'middle', 5 * MB + 3); want[5 * MB + 3:5 * MB + 9] = b'middle'
os.ftruncate(fd, 9 * MB + 5); del want[9 * MB + 5:]
os.lseek(fd, 0, os.SEEK_END)
for i in range(12, 18):
    os.write(fd, piece(i)); want += piece(i)
with open('/data/s', 'rb') as r:
    assert r.read() == bytes(want)
pid = os.fork()
if pid == 0:
    os.write(fd, piece(40))
    os._exit(0)
assert os.waitpid(pid, 0)[1] == 0
want += piece(40)
# A new stream in a file that was emptied.
os.ftruncate(fd, 0); want = bytearray()
os.lseek(fd, 0, os.SEEK_SET)
for i in range(20, 30):
    os.write(fd, piece(i)); want += piece(i)
assert allocated(fd) <= 4 * MB, allocated(fd)
m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
assert m[:] == bytes(want)
m.close()
os.write(fd, b'end'); want += b'end'
os.close(fd)
print(len(want))
"#
    );
    let mut w = data_world();
    let o = run_mut_env(&mut w, STREAM_2MB, &["python3", "-c", &script]);
    ok(&o, "streamed file");
    let mut want: Vec<u8> = (20..30).flat_map(stream_piece).collect();
    want.extend_from_slice(b"end");
    let got = read_back(&w, "/data/s");
    same_bytes(&got, &want, "read back");
}

/// The stream's state is the run's, not its writer's: a writer killed with `kill -9` after
/// pieces were sealed leaves them, and the next process of the run that opens the file goes on
/// with the stream and commits the killed writer's bytes with its own.
#[test]
fn a_stream_whose_writer_was_killed_is_finished_by_the_next_process() {
    need("python3");
    need("sh");
    let mut w = data_world();
    let (ready, vol) = (w.p("ready"), w.p("vol"));
    let writer = format!(
        "{STREAM_PY}{}",
        r#"
import os, time, sys
fd = os.open('/data/k', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for i in range(10):
    os.write(fd, piece(i))
open(sys.argv[1], 'w').close()
time.sleep(60)
"#
    );
    let next = "import os\nfd = os.open('/data/k', os.O_WRONLY | os.O_CREAT | os.O_APPEND)\nos.write(fd, b'tail')\nos.close(fd)\n";
    let o = run_mut_env(
        &mut w,
        STREAM_2MB,
        &[
            "sh",
            "-c",
            "python3 -c \"$1\" \"$3\" & while [ ! -e \"$3\" ]; do sleep 0.05; done; ls -a \"$4\"; kill -9 $!; wait; python3 -c \"$2\"",
            "sh",
            &writer,
            next,
            &ready,
            &vol,
        ],
    );
    ok(&o, "killed writer, next process");
    assert!(
        stdout(&o).contains(".k.fspf-"),
        "the killed writer had sealed pieces: {}",
        stdout(&o)
    );
    let mut want: Vec<u8> = (0..10).flat_map(stream_piece).collect();
    want.extend_from_slice(b"tail");
    let got = read_back(&w, "/data/k");
    assert!(
        got == want,
        "{} bytes read back, want {}",
        got.len(),
        want.len()
    );
}

/// A chunk of a stream's shadow changed on storage before its commit (the attacker has the disk
/// while the program writes): the version committed is refused when read, never returned as
/// garbage, and so is the read that commits it.
#[test]
fn a_stream_chunk_changed_on_storage_before_its_commit_is_refused() {
    need("python3");
    let mut w = data_world();
    let (ready, go) = (w.p("ready"), w.p("go"));
    let script = format!(
        "{STREAM_PY}{}",
        r#"
import os, sys, time
fd = os.open('/data/t', os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
for i in range(10):
    os.write(fd, piece(i))
open(sys.argv[1], 'w').close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.02)
try:
    os.pread(fd, 4096, 5 * 4096)
    print('read back')
except OSError as e:
    print('refused', e.errno)
os.close(fd)
"#
    );
    let anchor = w.anchor_with(&w.tag.clone());
    let mut c = shielded::fspf_run(
        w.dir.path(),
        &w.fspf,
        &anchor,
        true,
        None,
        &["python3", "-c", &script, &ready, &go],
    );
    let child = c
        .envs(STREAM_2MB.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let t0 = std::time::Instant::now();
    while !std::path::Path::new(&ready).exists() {
        assert!(t0.elapsed().as_secs() < 60, "the writer never got ready");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let shadow = std::fs::read_dir(w.path("vol"))
        .expect("vol")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains(".t.fspf-"))
        .expect("the stream's shadow");
    let mut d = std::fs::read(&shadow).expect("shadow");
    d[24 + 5 * 4096 + 7] ^= 1;
    std::fs::write(&shadow, &d).expect("tamper");
    std::fs::write(&go, b"").expect("go");
    let o = child.wait_with_output().expect("wait");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("refused 5"),
        "the read after the tampering: {out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    w.tag = w.tag_on_disk();
    let o = w.run(&["cat", "/data/t"]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("Input/output error"),
        "the committed file with the changed chunk: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Past a commit point (an `fsync` in the middle of writing a new file, or the open of an
/// existing large file to append), what is buffered above the committed part is committed and
/// punched out each time it passes the threshold: a writer that keeps appending holds at most
/// about the threshold, and every byte is kept.
#[test]
fn appending_to_a_large_file_or_writing_on_after_an_fsync_holds_at_most_the_threshold() {
    need("python3");
    let script = format!(
        "{ALLOCATED_PY}{STREAM_PY}{}",
        r#"
fd = os.open('/data/s', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for i in range(6):
    os.write(fd, piece(i))
os.fsync(fd)
peak = 0
for i in range(6, 30):
    os.write(fd, piece(i))
    peak = max(peak, allocated(fd))
os.close(fd)
assert peak <= 5 * MB, ('after fsync', peak)
fd = os.open('/data/s', os.O_WRONLY | os.O_APPEND)
peak = 0
for i in range(30, 54):
    os.write(fd, piece(i))
    peak = max(peak, allocated(fd))
os.close(fd)
assert peak <= 5 * MB, ('appending', peak)
"#
    );
    let mut w = data_world();
    let o = run_mut_env(&mut w, &stream_2mb_private(), &["python3", "-c", &script]);
    ok(&o, "append and write on, private buffer");
    let o = run_mut_env(&mut w, STREAM_2MB, &["python3", "-c", &script]);
    ok(&o, "append and write on");
    let want: Vec<u8> = (0..54).flat_map(stream_piece).collect();
    let got = read_back(&w, "/data/s");
    same_bytes(&got, &want, "read back");
    // Streams off: the part written after the fsync is held (the check fails).
    fails_with_streams_off(&script, "after fsync");
}

/// A large file opened to read and write (left unloaded but for its last block) and cut to at
/// most 1 MiB kept holes below the new end, but a buffer that small is hashed whole at its
/// commit, and reading the holes failed: the close failed with `EIO` and the cut was lost.
#[test]
fn a_cut_of_a_lazily_loaded_file_to_at_most_1_mib_failed_its_commit() {
    need("python3");
    for env in BUFFER_MODES {
        let n = 3 << 20;
        let mut w = big_world(n);
        let script = "import os\nfd = os.open('/data/big', os.O_RDWR)\nos.ftruncate(fd, 500_001)\nos.pwrite(fd, b'end', 500_001)\nos.close(fd)\n";
        ok(
            &run_mut_env(&mut w, env, &["python3", "-c", script]),
            "cut to 500 001 bytes",
        );
        let mut want = big_expected(n);
        want.truncate(500_001);
        want.extend_from_slice(b"end");
        assert!(read_big(&w) == want, "{env:?}: the file after the cut");
    }
}

/// Hard links were refused (`EPERM`) under the shield and every link count was 1. Now `ln`
/// makes another name of the file: one content, one inode, its link count, across processes and
/// runs; a write or `chmod` through one name shows through the others.
#[test]
fn hard_links_under_the_shield_are_one_file_under_several_names() {
    need("sh");
    let mut w = data_world();
    let o = w.run_mut(&[
        "sh",
        "-c",
        "set -e; cd /data; echo one > a; ln a b; ln b c; echo two >> c; chmod 600 b; \
         stat -c '%h %i %a' a b c; cat a",
    ]);
    ok(&o, "ln, append and chmod through links");
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("3 ") && lines[0].ends_with(" 600"),
        "{out}"
    );
    assert_eq!(lines[0], lines[1]);
    assert_eq!(lines[1], lines[2]);
    assert_eq!(&lines[3..], ["one", "two"]);
    // Another run: the first name goes, the file lives on; two names of one file do not rename.
    let o = w.run_mut(&[
        "sh",
        "-c",
        "set -e; cd /data; rm a; perl -e 'rename \"c\", \"b\" or die \"$!\"'; stat -c '%h' b c; \
         cat c; perl -e 'link \"/data\", \"/data/dir\" or die \"$!\n\"' 2>&1 || true",
    ]);
    ok(&o, "rm the first name, mv between names");
    assert!(
        stdout(&o).starts_with("2\n2\none\ntwo\n") && stdout(&o).contains("not permitted"),
        "{}",
        stdout(&o)
    );
    assert!(!w.path("vol/a").exists() && !w.path("vol/c").exists());
    let o = w.run(&["cat", "/data/b", "/data/c"]);
    assert_eq!(stdout(&o), "one\ntwo\none\ntwo\n");
    // Attack: a file put on disk at a link's name (nothing is stored there) is never read
    // through the name, and `verify` reports it.
    std::fs::copy(w.path("vol/hello.txt"), w.path("vol/c")).expect("plant");
    let o = w.run(&["cat", "/data/c"]);
    assert_eq!(stdout(&o), "one\ntwo\n");
    let v = Command::new(fspf_bin())
        .args(["verify", "fspf.pb", "--key", &w.key, "--tag", &w.tag])
        .current_dir(w.path(""))
        .output()
        .expect("verify");
    assert_eq!(v.status.code(), Some(1), "{}", stdout(&v));
    assert!(stdout(&v).contains("/data/c"), "{}", stdout(&v));
}

/// `fstat` of an open file whose last name was removed showed one link; the kernel shows none.
#[test]
fn fstat_of_an_open_file_whose_name_was_removed_showed_a_link() {
    need("perl");
    let mut w = data_world();
    let o = w.run_mut(&[
        "sh",
        "-c",
        "set -e; printf hello > /data/x; \
         perl -e 'open(my $r, \"<\", \"/data/x\") or die \"$!\"; unlink \"/data/x\" or die \"$!\"; \
                  my @r = stat($r) or die \"$!\"; print \"$r[3] $r[7]\\n\"'",
    ]);
    ok(&o, "stat of an open unlinked file");
    assert_eq!(stdout(&o), "0 5\n");
}

/// After `mv app.log app.log.1` and a new `app.log`, both showed one inode number (the renamed
/// file keeps the number of its old name, and a new file there got the same): `cp` refused
/// ("are the same file"), and `tar` or `rsync -H` would have stored one as a hard link of the
/// other.
#[test]
fn a_new_file_at_a_renamed_files_old_name_had_its_inode_number() {
    need("sh");
    let mut w = data_world();
    let o = w.run_mut(&[
        "sh",
        "-c",
        "set -e; cd /data; echo old > app.log; mv app.log app.log.1; echo new > app.log; \
         stat -c %i app.log app.log.1; cp app.log app.log.1; cat app.log.1",
    ]);
    ok(&o, "log rotation");
    let out = stdout(&o);
    let l: Vec<&str> = out.lines().collect();
    assert_ne!(l[0], l[1], "{out}");
    assert_eq!(l[2], "new");
    // The numbers stay what they were in the next run.
    let o = w.run(&["stat", "-c", "%i", "/data/app.log", "/data/app.log.1"]);
    assert_eq!(stdout(&o).lines().collect::<Vec<_>>(), [l[0], l[1]]);
}

/// A world with `/data` encrypted in `vol`, a tmpfs of 8 MiB (unmounted when the guard drops).
fn world_on_a_small_tmpfs() -> (World, Tmpfs) {
    let mut w = World::new();
    std::fs::create_dir_all(w.path("vol")).expect("vol");
    let guard = Tmpfs::mount(&w.path("vol"), "8m");
    w.create();
    w.addr(&["/", "--kernel", "/", "--not-protected"]);
    w.addr(&["/data", "--encrypted", "--kernel", &w.p("vol")]);
    w.encrypt();
    (w, guard)
}

/// Python that writes `body` to a file and `fsync`s it, printing `NAME ok` or `NAME ERRNO`.
const PUT_PY: &str = r#"
import os
def put(n, body):
    fd = os.open(n, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    os.write(fd, body)
    try:
        os.fsync(fd)
        print(n, "ok")
    except OSError as e:
        print(n, e.errno)
    return fd
"#;

/// A file that found no room on the kernel side (`fsync` answered `ENOSPC`) still found none
/// after the program removed another file to make room: the removal was queued behind the
/// failed stage and freed nothing until the next commit. As on a plain file system, the second
/// `fsync` now succeeds (the FUSE shield's twin has the same name).
#[test]
fn fsync_after_removing_a_file_to_make_room_still_failed_with_enospc() {
    let (mut w, _tmpfs) = world_on_a_small_tmpfs();
    let script = format!(
        "{PUT_PY}{}",
        r#"
body = bytes(i % 251 for i in range(3_000_000))
put("/data/a", body); put("/data/b", body); fd = put("/data/c", body)
os.remove("/data/a")
os.fsync(fd)
print("again ok")
"#
    );
    let o = w.run_mut(&[&python_bin(), "-c", &script]);
    ok(&o, "writer");
    assert_eq!(
        stdout(&o),
        format!(
            "/data/a ok\n/data/b ok\n/data/c {}\nagain ok\n",
            libc::ENOSPC
        )
    );
    let o = w.run(&[
        &python_bin(),
        "-c",
        "import sys; sys.stdout.write(str(len(open('/data/c','rb').read())))",
    ]);
    ok(&o, "reader");
    assert_eq!(stdout(&o), "3000000");
}

/// A process's commit stages every file it changed: one that found no room (a large file that
/// stays in its buffer) made every other file's `fsync` answer `ENOSPC` too, though they were
/// committed. Each `fsync` now answers for its own file.
#[test]
fn fsync_of_a_small_file_failed_with_enospc_because_a_large_one_found_no_room() {
    let (mut w, _tmpfs) = world_on_a_small_tmpfs();
    let script = format!(
        "{PUT_PY}{}",
        r#"
big = put("/data/big", b"x" * (20 << 20))
put("/data/small", b"fits\n")
os.ftruncate(big, 0)
"#
    );
    let o = w.run_mut(&[&python_bin(), "-c", &script]);
    ok(&o, "writer");
    assert_eq!(
        stdout(&o),
        format!("/data/big {}\n/data/small ok\n", libc::ENOSPC)
    );
    let o = w.run(&["cat", "/data/small"]);
    ok(&o, "reader");
    assert_eq!(stdout(&o), "fits\n");
}

/// A world whose /data holds `n` small files, `d{i % 10}/f{i}` holding `file {i}\n`, with its
/// index cache written by a first run.
fn many_files_world(n: usize) -> World {
    let mut w = World::new();
    for i in 0..n {
        w.write(
            &format!("data-original/d{}/f{i}", i % 10),
            format!("file {i}\n").as_bytes(),
        );
    }
    std::fs::create_dir_all(w.path("vol")).expect("vol");
    w.create();
    w.addr(&["/", "--kernel", "/", "--not-protected"]);
    w.addr(&["/data", "--encrypted", "--kernel", &w.p("vol")]);
    w.cli(&["addf", "fspf.pb", "/data", "data-original", &w.p("vol")]);
    w.encrypt();
    ok(&w.run(&["true"]), "a first run writes the index cache");
    assert!(w.path("fspf.pb.index").exists(), "no index cache written");
    w
}

#[test]
fn a_run_decrypted_and_copied_the_whole_index_cache_at_every_start() {
    let w = many_files_world(3000);
    // The run's processes read the pages they need from the cache file itself; before, the
    // launcher decrypted all of it and copied it into a memfd for them, at every start.
    let o = w.run(&[
        "sh",
        "-c",
        "readlink /proc/self/fd/$FSPF_INDEX_FD; cat /data/d7/f2997",
    ]);
    ok(&o, "run");
    let out = stdout(&o);
    assert_eq!(
        out,
        format!("{}\nfile 2997\n", w.p("fspf.pb.index")),
        "the index the run's processes read"
    );
}

#[test]
fn an_index_cache_changed_during_a_run_stops_the_process_that_reads_it() {
    use std::io::{BufRead, Write};
    let w = many_files_world(3000);
    let cache = w.path("fspf.pb.index");
    let mut c = shielded::fspf_run(
        w.dir.path(),
        &w.fspf,
        &w.anchor_with(&w.tag),
        false,
        None,
        &["sh", "-c", "echo ready; read x; cat /data/d7/f2997"],
    );
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fspf run");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("ready");
    assert_eq!(line, "ready\n");
    // The run checked the cache whole at its start; now every page but the first changes,
    // in place (the run reads the same file).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cache)
            .expect("cache");
        let len = f.metadata().expect("len").len();
        let (head, stride) = (52u64, 4096u64 + 16);
        let mut at = head + stride + 7;
        while at < len {
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).expect("read");
            f.write_all_at(&[b[0] ^ 0x40], at).expect("flip");
            at += stride;
        }
    }
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"\n")
        .expect("go");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("rest");
    let o = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "the run succeeded over a changed cache"
    );
    assert!(err.contains("index cache no longer opens"), "stderr: {err}");
    assert!(!rest.contains("file"), "read past a changed cache: {rest}");
}

/// `cp` copies with `copy_file_range`, which the shield emulates with a buffer that starts
/// small and grows while reads fill it: files of every size around its steps copy whole, into
/// a protected region and out of it.
#[test]
fn cp_copies_files_of_every_size_through_copy_file_range() {
    let mut w = data_world();
    let sizes = [
        0usize,
        1,
        4095,
        65_535,
        65_536,
        65_537,
        200_000,
        1 << 20,
        3 << 20,
    ];
    let mut script = String::from("set -e\n");
    for n in sizes {
        let data: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
        w.write(&format!("plain/f{n}"), &data);
        script.push_str(&format!(
            "cp {dir}/plain/f{n} /data/f{n}; cp /data/f{n} {dir}/out{n}\n",
            dir = w.dir.path().display()
        ));
    }
    ok(&w.run_mut(&["sh", "-c", &script]), "cp in and out");
    for n in sizes {
        let want: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
        let got = std::fs::read(w.path(&format!("out{n}"))).expect("copy out");
        same_bytes(&got, &want, &format!("{n} bytes copied out"));
        let o = w.run(&["cat", &format!("/data/f{n}")]);
        ok(&o, "cat");
        same_bytes(&o.stdout, &want, &format!("{n} bytes in the region"));
    }
}

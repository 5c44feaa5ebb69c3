//! Crash safety of the shield's writes (P9 for `fspf run --mutable`), and a full disk.
//!
//! A python writer under `fspf run --mutable --tag-file T` creates, appends to, overwrites,
//! truncates, renames, hard-links and unlinks files of an encrypted kernel region, fsyncing each
//! change (and the directory after a rename, link or unlink; a change through one name of a file
//! is logged for all its names); some writes are deliberately never fsynced, and some
//! are large (2-3.5 MB, with streams starting at 2 MiB: sealed while written, or appended in
//! committed pieces). Before
//! each change it logs its intent (`I seq path sha256|-`), and after the fsync returned `D seq`,
//! to a file outside every protected region. The test kills it with SIGKILL after a random delay
//! — alternately the whole process group (`fspf run` too: a crash of everything, so nothing
//! writes the tag file) and only the writer (`fspf run` survives and writes the tag file) — and
//! then checks, under the trusted tag:
//! * the fspf opens and `fspf verify` passes;
//! * every path (read with `fspf cat`) holds the content of its last fsynced change, or of a
//!   change logged after it (a later commit point may have committed it); a path never fsynced
//!   in this run holds its previous content or a later one. A listed path that cannot be read
//!   counts as lost. After a verify failure the loop goes on with a fresh tree.
//!
//! The trusted tag is the one `--tag-file` holds. It is written when `fspf run` exits, so after a
//! crash of the whole group it is missing or stale: the tag on disk is then accepted so the loop
//! can go on, and such iterations are counted (`stale tag file`), separately from those where
//! the state had moved on since the run started (`… after commits`), where nothing trusted names
//! the current state. Iterations: `FSPF_CRASH_ITERS` (default 8), seed: `FSPF_CRASH_SEED` (it
//! fixes the writer's operations and the delays; the kills still land where the scheduler puts
//! them). `FSPF_CRASH_ITERS=200 cargo test --release -p fspf --test integration crash:: --
//! --nocapture` prints one `crash loop: …` line with the counts; `FSPF_CRASH_KEEP_LOGS=DIR`
//! keeps every iteration's writer log there.
//!
//! The full-disk tests mount a 2 MiB tmpfs as the kernel dir (and once for `fspf.pb` too): the
//! writer fsyncs 64 KiB files until a call fails; that call must fail with ENOSPC, the run's
//! final tag must open the fspf, verify must pass and every fsynced file must be intact. A
//! failing `mount` fails the test (root is needed); it is never skipped.
use crate::harness::{stdout, Env};
use crate::shielded::{fspf_run, kill_group, real_python, start, Anchor, Ended, Running};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The writer. `loop` mode changes files until killed; `fill` mode writes 64 KiB files until a
/// write, fsync or close fails, logs `E errno name`, and exits 3.
const WRITER_PY: &str = r#"
import errno, hashlib, os, random, sys
D = '/data'
log_path, seed, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
def note(*w):
    os.write(log, (' '.join(str(x) for x in w) + '\n').encode())
def digest(b):
    return hashlib.sha256(b).hexdigest()
def path(n):
    return D + '/' + n
def write_all(fd, b):
    while b:
        b = b[os.write(fd, b):]
def fsync_dir(n):
    fd = os.open(os.path.dirname(path(n)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
note('P', os.getpid())
rnd = random.Random(seed)
if mode in ('fill', 'fillbig'):
    i = 0
    try:
        while i < 1000:
            # fillbig: 3 MiB files in 256 KiB writes (sealed while written past 2 MiB).
            size = 65536 if mode == 'fill' else 3 << 20
            n, b = 'fill%d' % i, rnd.randbytes(size)
            note('I', i, n, digest(b))
            fd = os.open(path(n), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for k in range(0, len(b), 262144):
                    write_all(fd, b[k:k + 262144])
                os.fsync(fd)
                note('D', i)
            finally:
                os.close(fd)
            i += 1
    except OSError as e:
        note('E', e.errno, errno.errorcode.get(e.errno, '?'))
        sys.exit(3)
    sys.exit(4)
NAMES = ['f0', 'f1', 'f2', 'f3', 'd/g0', 'd/g1']
state = {}
# Which file each name is (hard links: names of one file share it), by inode number (a file
# with one name is its own).
grp = {}
for n in NAMES:
    try:
        with open(path(n), 'rb') as f:
            state[n] = f.read()
            st = os.fstat(f.fileno())
            grp[n] = st.st_ino if st.st_nlink > 1 else ('alone', n)
    except FileNotFoundError:
        pass
def names_of(n):
    # Every name of the file `n` names (a write through one changes all).
    return [m for m in state if grp[m] == grp[n]]
def wrote(seq, n, new):
    # Log and record a change of the file named `n`: every name of it shows it.
    for m in names_of(n):
        note('I', seq, m, digest(new))
    for m in names_of(n):
        state[m] = new
note('R')
# 70000 and 300000: format 2 (more than 16 chunks), changed in place by the later operations.
SIZES = [0, 1, 100, 4095, 4096, 4097, 10000, 70000, 300000]
def data():
    return rnd.randbytes(rnd.choice(SIZES))
seq = 0
while True:
    seq += 1
    present = sorted(state)
    ops = ['create', 'nosync', 'big']
    if present:
        ops += ['append', 'overwrite', 'truncate', 'rename', 'unlink', 'bigappend']
    if present and len(present) < len(NAMES):
        ops += ['link']
    op = rnd.choice(ops)
    if op in ('create', 'nosync', 'big'):
        n = rnd.choice(NAMES)
        if n not in state:
            grp[n] = ('new', seq)
    if op in ('big', 'bigappend'):
        # Large enough to be sealed while written (the writer runs with FSPF_STREAM_MB=2):
        # a new file streamed in pieces, or an append committed and punched past the threshold.
        n = n if op == 'big' else rnd.choice(present)
        b = rnd.randbytes(rnd.randint(2_200_000, 3_500_000))
        base = b'' if op == 'big' else state.get(n, b'')
        new = base + b
        # A write past the threshold may be committed before the fsync (as a kernel file
        # system writes dirty pages back): every prefix the writes leave may be what a kill
        # finds (a state logged before the final one is not acceptable once this is fsynced).
        state.setdefault(n, b'')
        for k in range(0, len(b), 262144):
            for m in names_of(n):
                note('I', seq, m, digest(base + b[:k]))
        wrote(seq, n, new)
        fl = os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if op == 'big' else os.O_APPEND)
        fd = os.open(path(n), fl, 0o644)
        for k in range(0, len(b), 262144):
            write_all(fd, b[k:k + 262144])
        os.fsync(fd)
        note('D', seq)
        os.close(fd)
    elif op in ('create', 'nosync'):
        new = data()
        state.setdefault(n, b'')
        wrote(seq, n, new)
        fd = os.open(path(n), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        write_all(fd, new)
        if op == 'create':
            os.fsync(fd)
            note('D', seq)
        os.close(fd)
    elif op == 'link':
        src = rnd.choice(present)
        dst = rnd.choice([n for n in NAMES if n not in state])
        note('I', seq, dst, digest(state[src]))
        os.link(path(src), path(dst))
        fsync_dir(dst)
        note('D', seq)
        state[dst] = state[src]
        grp[dst] = grp[src]
    elif op == 'rename':
        src = rnd.choice(present)
        dst = rnd.choice([n for n in NAMES if n != src])
        if dst in state and grp[dst] == grp[src]:
            continue  # two names of one file: rename does nothing
        note('I', seq, src, '-')
        note('I', seq, dst, digest(state[src]))
        os.rename(path(src), path(dst))
        fsync_dir(src)
        fsync_dir(dst)
        note('D', seq)
        state[dst] = state.pop(src)
        grp[dst] = grp.pop(src)
    elif op == 'unlink':
        n = rnd.choice(present)
        note('I', seq, n, '-')
        os.unlink(path(n))
        fsync_dir(n)
        note('D', seq)
        del state[n]
        del grp[n]
    else:
        n = rnd.choice(present)
        old = state[n]
        if op == 'append':
            b = data()
            new = old + b
            fd = os.open(path(n), os.O_WRONLY | os.O_APPEND)
        elif op == 'overwrite':
            b, pos = data(), rnd.randint(0, len(old))
            new = old[:pos] + b + old[pos + len(b):]
            fd = os.open(path(n), os.O_WRONLY)
            os.lseek(fd, pos, os.SEEK_SET)
        else:
            size = rnd.randint(0, len(old) + 5000)
            new = old[:size] + b'\0' * (size - len(old))
            fd = os.open(path(n), os.O_WRONLY)
        wrote(seq, n, new)
        if op == 'truncate':
            os.ftruncate(fd, size)
        else:
            write_all(fd, b)
        os.fsync(fd)
        note('D', seq)
        os.close(fd)
"#;

/// The six paths the writer uses, below `/data`.
const NAMES: [&str; 6] = ["f0", "f1", "f2", "f3", "d/g0", "d/g1"];

/// A file's content as the test tracks it: its sha256, or `None` for "does not exist".
type State = Option<String>;

fn sha256(b: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b)
        .as_ref()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// What the writer logged: its pid, its intents in order, and which of them it fsynced.
#[derive(Default)]
struct WriterLog {
    pid: Option<u32>,
    ready: bool,
    /// (seq, path, state after the change)
    intents: Vec<(u64, String, State)>,
    done: BTreeSet<u64>,
    error: Option<String>,
}

impl WriterLog {
    fn read(p: &Path) -> WriterLog {
        let text = fs::read_to_string(p).unwrap_or_default();
        let mut log = WriterLog::default();
        // Only complete lines: the last one may have been cut by the kill.
        for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            let w: Vec<&str> = line.split_whitespace().collect();
            match w.as_slice() {
                ["P", pid] => log.pid = pid.parse().ok(),
                ["R"] => log.ready = true,
                ["I", seq, path, sha] => log.intents.push((
                    seq.parse().expect("seq"),
                    path.to_string(),
                    (*sha != "-").then(|| sha.to_string()),
                )),
                ["D", seq] => {
                    log.done.insert(seq.parse().expect("seq"));
                }
                ["E", errno, name] => log.error = Some(format!("{name} ({errno})")),
                _ => panic!("unexpected writer log line {line:?}"),
            }
        }
        log
    }

    /// For each path, the states it may hold now: the last fsynced one (or `before`), and
    /// every state logged after it.
    fn acceptable(&self, before: &BTreeMap<String, State>) -> BTreeMap<String, Vec<State>> {
        let mut out = BTreeMap::new();
        for name in NAMES {
            let mine: Vec<&(u64, String, State)> =
                self.intents.iter().filter(|(_, p, _)| p == name).collect();
            let last_done = mine.iter().rposition(|(s, _, _)| self.done.contains(s));
            let mut ok = match last_done {
                Some(i) => vec![mine[i].2.clone()],
                None => vec![before.get(name).cloned().flatten()],
            };
            let later = last_done.map_or(0, |i| i + 1);
            ok.extend(mine[later..].iter().map(|(_, _, st)| st.clone()));
            out.insert(name.to_string(), ok);
        }
        out
    }
}

/// A small deterministic generator (xorshift64*) for delays and seeds.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An encrypted region `/data` (kernel dir `kernel`) holding `f0` and `d/g0`, `/` not-protected.
fn writable_world(env: &Env, kernel: &Path) -> Anchor {
    env.write("seed/f0", b"first version of f0\n");
    env.write("seed/d/g0", b"first version of g0\n");
    env.ok(["create", "fspf.pb"]);
    env.ok(["addr", "fspf.pb", "/", "--kernel", "/", "-n"]);
    let k = kernel.to_str().expect("utf-8 path");
    env.ok(["addr", "fspf.pb", "/data", "-e", "--kernel", k]);
    env.ok(["addf", "fspf.pb", "/data", &env.p("seed"), k]);
    let kt = env.encrypt(None);
    Anchor {
        key: kt.key,
        tag: kt.tag,
    }
}

fn tag_on_disk(env: &Env) -> String {
    env.ok(["show", "--tag", "fspf.pb"]).trim().to_string()
}

/// `fspf verify` under `anchor`: `Ok(())` or its output.
fn verify(env: &Env, anchor: &Anchor) -> Result<(), String> {
    let o = env.run([
        "verify",
        "fspf.pb",
        "--key",
        &anchor.key,
        "--tag",
        &anchor.tag,
    ]);
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            stdout(&o),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

/// The state of each of `names` below `/data`, read with `fspf cat` under `anchor`: its
/// sha256, `None` when it is not listed, or `UNREADABLE: why` when it is listed but cannot be read.
fn observe(env: &Env, anchor: &Anchor, names: &[&str]) -> BTreeMap<String, State> {
    let mut states = BTreeMap::new();
    for n in names {
        let embed = format!("/data/{n}");
        let o = env.run([
            "cat",
            "fspf.pb",
            &embed,
            "--key",
            &anchor.key,
            "--tag",
            &anchor.tag,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        let st = if o.status.success() {
            Some(sha256(&o.stdout))
        } else if err.contains("not listed") {
            None
        } else {
            Some(format!("UNREADABLE: {}", err.trim()))
        };
        states.insert(n.to_string(), st);
    }
    states
}

/// The writer under `fspf run --mutable --tag-file`, in its own process group.
/// `private`: without the run's shared buffers (each process's own buffers, whose writes the
/// shield tracks and stages as in-place updates of just those ranges).
fn start_writer(
    env: &Env,
    anchor: &Anchor,
    log: &Path,
    seed: u64,
    mode: &str,
    private: bool,
) -> Running {
    let py = real_python().to_str().expect("utf-8").to_string();
    let tag_file = env.path("tag-file");
    let _ = fs::remove_file(&tag_file);
    let mut cmd: Command = fspf_run(
        env.root(),
        &env.fspf_path(),
        anchor,
        true,
        Some(&tag_file),
        &[
            &py,
            "-c",
            WRITER_PY,
            log.to_str().expect("utf-8"),
            &seed.to_string(),
            mode,
        ],
    );
    if private {
        cmd.env("FSPF_SHARED_BUFFERS", "0");
    }
    // Streams start at 2 MiB (64 by default), so the writer's large files are sealed while
    // written and its large appends committed in pieces.
    cmd.env("FSPF_STREAM_MB", "2");
    start(cmd)
}

/// Counts of the crash loop, printed as one line.
#[derive(Default, Debug)]
struct Tally {
    iterations: usize,
    /// iterations run with private buffers
    private_buffers: usize,
    /// iterations where the writer had logged at least one fsynced change
    with_fsyncs: usize,
    fsynced_changes: usize,
    whole_group_kills: usize,
    writer_only_kills: usize,
    verify_failures: Vec<String>,
    lost_writes: Vec<String>,
    /// the tag file was missing or did not open the fspf
    stale_tag_file: usize,
    /// ... and the run had committed, so the starting tag did not open it either
    stale_tag_file_after_commits: usize,
    /// of the writer-only kills (where `fspf run` exits normally), how many left a stale tag file
    stale_tag_file_writer_only: usize,
}

#[test]
fn writer_killed_at_random_points_keeps_every_fsynced_write() {
    let iterations: usize = std::env::var("FSPF_CRASH_ITERS")
        .ok()
        .map(|v| v.parse().expect("FSPF_CRASH_ITERS is a number"))
        .unwrap_or(8);
    let seed: u64 = std::env::var("FSPF_CRASH_SEED")
        .ok()
        .map(|v| v.parse().expect("FSPF_CRASH_SEED is a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64
                | 1
        });
    let mut rng = Rng(seed);
    let mut env = Env::new();
    let mut anchor = writable_world(&env, &env.path("k"));
    let mut before = observe(&env, &anchor, &NAMES);
    let mut t = Tally::default();
    for it in 0..iterations {
        let log = env.path(format!("writer-{it}.log"));
        // Every third iteration with private buffers (tracked in-place updates), else with the
        // run's shared buffers (updates found by comparison).
        let private = it % 3 == 1;
        t.private_buffers += usize::from(private);
        let run = start_writer(&env, &anchor, &log, rng.next() >> 1, "loop", private);
        // Wait for the writer to have read the state, then a random 0..1.2 s.
        let ready_by = Instant::now() + Duration::from_secs(20);
        while !WriterLog::read(&log).ready && Instant::now() < ready_by {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.below(1200)));
        let whole_group = it % 2 == 0;
        if whole_group {
            kill_group(run.pgid());
            t.whole_group_kills += 1;
        } else {
            let pid = WriterLog::read(&log).pid.expect("writer logged its pid");
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            t.writer_only_kills += 1;
        }
        let fin = run.finish(Instant::now() + Duration::from_secs(20));
        assert!(
            !matches!(fin.ended, Ended::Hung),
            "iteration {it}: fspf run did not end after the writer was killed"
        );
        let wlog = WriterLog::read(&log);
        if let Ok(keep) = std::env::var("FSPF_CRASH_KEEP_LOGS") {
            // For a failure's post-mortem: every iteration's writer log.
            let _ = fs::create_dir_all(&keep);
            let _ = fs::copy(&log, Path::new(&keep).join(format!("writer-{it}.log")));
        }
        assert!(
            wlog.ready,
            "iteration {it}: the writer never started: {}",
            String::from_utf8_lossy(&fin.stderr)
        );
        t.iterations += 1;
        t.fsynced_changes += wlog.done.len();
        if !wlog.done.is_empty() {
            t.with_fsyncs += 1;
        }
        // The trusted tag: the tag file, else (counted) the tag on disk.
        let disk = tag_on_disk(&env);
        let from_file = fs::read_to_string(env.path("tag-file")).ok();
        // A tag opens the fspf exactly when it is the tag on disk (the key is unchanged). After
        // a kill inside a commit window the file names both states (old and new), one per line.
        let trusted = match from_file
            .as_deref()
            .and_then(|s| s.lines().map(str::trim).find(|l| *l == disk))
        {
            Some(tag) => tag.to_string(),
            None => {
                t.stale_tag_file += 1;
                if disk != anchor.tag {
                    t.stale_tag_file_after_commits += 1;
                }
                if !whole_group {
                    t.stale_tag_file_writer_only += 1;
                }
                disk
            }
        };
        anchor.tag = trusted;
        let what = format!(
            "iteration {it} (seed {seed}, {} kill, {} fsynced changes)",
            if whole_group { "group" } else { "writer" },
            wlog.done.len()
        );
        let verified = verify(&env, &anchor);
        if let Err(e) = &verified {
            t.verify_failures
                .push(format!("{what}: verify failed:\n{e}"));
        }
        let now = observe(&env, &anchor, &NAMES);
        for (name, ok) in wlog.acceptable(&before) {
            let got = now.get(&name).cloned().flatten();
            if !ok.contains(&got) {
                t.lost_writes.push(format!(
                    "{what}: /data/{name} holds {got:?}, expected one of {ok:?}"
                ));
            }
        }
        before = now;
        if verified.is_err() {
            // Start over from a fresh tree so the remaining iterations still mean something.
            env = Env::new();
            anchor = writable_world(&env, &env.path("k"));
            before = observe(&env, &anchor, &NAMES);
        }
    }
    eprintln!(
        "crash loop: {} iterations (seed {seed}; {} with private buffers; {} whole-group kills, {} writer-only kills; {} with fsynced changes, {} fsynced changes), {} verify failures, {} lost fsynced writes (paths in neither their fsynced state nor a later one), {} stale tag file ({} after commits; {} of them after writer-only kills)",
        t.iterations,
        t.private_buffers,
        t.whole_group_kills,
        t.writer_only_kills,
        t.with_fsyncs,
        t.fsynced_changes,
        t.verify_failures.len(),
        t.lost_writes.len(),
        t.stale_tag_file,
        t.stale_tag_file_after_commits,
        t.stale_tag_file_writer_only
    );
    assert!(
        t.with_fsyncs > 0,
        "no iteration got as far as an fsync: the kills came too early to test anything"
    );
    assert_eq!(
        t.stale_tag_file, 0,
        "the tag file (the trusted channel) did not name the fspf on disk (rerun with FSPF_CRASH_SEED={seed})"
    );
    assert!(
        t.verify_failures.is_empty() && t.lost_writes.is_empty(),
        "crash loop (rerun with FSPF_CRASH_SEED={seed}):\n{}\n{}",
        t.verify_failures.join("\n"),
        t.lost_writes.join("\n")
    );
}

/// A tmpfs mounted for one test, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: PathBuf, size: &str) -> Tmpfs {
        fs::create_dir_all(&dir).expect("mount point");
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .expect("running mount");
        assert!(
            o.status.success(),
            "cannot mount a {size} tmpfs on {} (the full-disk test needs root and mount(8); it must not be skipped): {}",
            dir.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Fill a kernel directory of `size` (and, with `fspf_on_it`, put `fspf.pb` there too) with the
/// files of the writer's `mode` until a write fails; what was fsynced before must stay readable
/// and verified.
fn full_disk(fspf_on_it: bool, mode: &str, size: &str) {
    let env = Env::new();
    let small = Tmpfs::mount(env.path("small"), size);
    let kernel = small.dir.join("k");
    fs::create_dir_all(&kernel).expect("kernel dir");
    let mut anchor = writable_world(&env, &kernel);
    if fspf_on_it {
        // The fspf, its lock, temporaries and outboards live on the full file system too.
        fs::copy(env.fspf_path(), small.dir.join("fspf.pb")).expect("copy fspf");
        fs::remove_file(env.fspf_path()).expect("move fspf");
    }
    let fspf_for_run = if fspf_on_it {
        small.dir.join("fspf.pb")
    } else {
        env.fspf_path()
    };
    let log = env.path("fill.log");
    let tag_file = env.path("tag-file");
    let py = real_python().to_str().expect("utf-8").to_string();
    let mut cmd = fspf_run(
        env.root(),
        &fspf_for_run,
        &anchor,
        true,
        Some(&tag_file),
        &[
            &py,
            "-c",
            WRITER_PY,
            log.to_str().expect("utf-8"),
            "7",
            mode,
        ],
    );
    cmd.env("FSPF_STREAM_MB", "2");
    let run = start(cmd);
    let fin = run.finish(Instant::now() + Duration::from_secs(120));
    let wlog = WriterLog::read(&log);
    let stderr = String::from_utf8_lossy(&fin.stderr).into_owned();
    assert!(
        !matches!(fin.ended, Ended::Hung),
        "the writer hung on a full disk; log: {} fsynced; stderr: {stderr}",
        wlog.done.len()
    );
    let error = wlog.error.clone().unwrap_or_else(|| {
        panic!(
            "the writer filled {size} with {} fsynced files ({mode}) and never saw an error ({:?}); stderr: {stderr}",
            wlog.done.len(),
            fin.ended
        )
    });
    eprintln!(
        "full disk (fspf.pb {}): {} files fsynced, then {error}; run ended {:?}",
        if fspf_on_it {
            "on the full tmpfs"
        } else {
            "elsewhere"
        },
        wlog.done.len(),
        fin.ended
    );
    assert!(
        !wlog.done.is_empty(),
        "not a single file ({mode}) fitted into {size}: {error}; stderr: {stderr}"
    );
    let tag = fs::read_to_string(&tag_file)
        .unwrap_or_else(|e| panic!("fspf run wrote no tag file ({e}); stderr: {stderr}"));
    anchor.tag = tag.trim().to_string();
    if fspf_on_it {
        // The checks below read `env`'s fspf path (fspf refuses a symlinked fspf.pb): copy the
        // fspf the run left on the full file system back there (the region has no outboards),
        // with its metadata log.
        fs::copy(small.dir.join("fspf.pb"), env.fspf_path()).expect("copy the fspf back");
        if small.dir.join("fspf.pb.log").exists() {
            fs::copy(small.dir.join("fspf.pb.log"), env.path("fspf.pb.log"))
                .expect("copy the log back");
        }
    }
    if let Err(e) = verify(&env, &anchor) {
        panic!("after the full disk, verify fails under the run's final tag:\n{e}\nwriter stderr: {stderr}");
    }
    let names: Vec<String> = wlog.intents.iter().map(|(_, n, _)| n.clone()).collect();
    let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let now = observe(&env, &anchor, &names);
    for (seq, name, want) in &wlog.intents {
        let got = now.get(name).cloned().flatten();
        if wlog.done.contains(seq) {
            assert_eq!(&got, want, "/data/{name} was fsynced but is lost or wrong");
        } else {
            assert!(
                got.is_none() || &got == want,
                "/data/{name}, whose fsync failed, holds wrong content"
            );
        }
    }
    assert!(
        error.starts_with("ENOSPC"),
        "the writer's error on a full disk was {error}, not ENOSPC; fspf run's stderr: {stderr}"
    );
}

#[test]
fn a_full_kernel_dir_fails_writes_with_enospc_and_keeps_what_was_fsynced() {
    full_disk(false, "fill", "2m");
}

#[test]
fn a_full_disk_under_the_fspf_too_fails_writes_and_keeps_what_was_fsynced() {
    full_disk(true, "fill", "2m");
}

/// 3 MiB files sealed while written (streams at 2 MiB) into 8 MiB: a piece that does not fit
/// gives the stream up (the file is held whole again), and the `fsync` that seals it fails with
/// `ENOSPC`; what was fsynced before stays, and no shadow of the failed file is committed.
#[test]
fn a_full_disk_while_large_files_are_sealed_as_written_fails_with_enospc_and_keeps_what_was_fsynced(
) {
    full_disk(false, "fillbig", "8m");
}

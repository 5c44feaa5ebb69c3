//! Scrubbing a key given on the command line from this process's own argument area.
//!
//! `/proc/PID/cmdline` is readable by every user and shows the argument strings the kernel
//! copied onto the process's stack at exec. Overwriting those bytes (through `/proc/self/mem`,
//! which needs no unsafe code) removes the key from it for the rest of the run: `fspf run` stays
//! the parent of the shielded program for its whole life. What remains is the short window
//! between exec and this call, hence the warning that points to `--key-file` and `--key-fd`.
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;

/// Start and end of this process's argument area (fields 48 and 49 of `/proc/self/stat`).
fn arg_area() -> io::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/self/stat");
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = stat.rsplit_once(')').ok_or_else(bad)?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> io::Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(bad)
    };
    Ok((field(48)?, field(49)?))
}

/// Overwrite with `x` every argument equal to `secret`, and the value of `--key=SECRET`, in the
/// argument area; returns how many were overwritten.
pub fn scrub(secret: &str) -> io::Result<usize> {
    if secret.is_empty() {
        return Ok(0);
    }
    let (start, end) = arg_area()?;
    let len = usize::try_from(end.saturating_sub(start))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "argument area too large"))?;
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/mem")?;
    let mut area = zeroize::Zeroizing::new(vec![0u8; len]);
    mem.read_exact_at(&mut area, start)?;
    let secret = secret.as_bytes();
    let mut hits = Vec::new();
    let mut at = 0usize;
    for arg in area.split(|b| *b == 0) {
        let off = if arg == secret {
            Some(0)
        } else if arg.strip_prefix(b"--key=") == Some(secret) {
            Some(b"--key=".len())
        } else {
            None
        };
        if let Some(off) = off {
            hits.push(at + off);
        }
        at += arg.len() + 1;
    }
    let mask = vec![b'x'; secret.len()];
    for h in &hits {
        mem.write_all_at(&mask, start + *h as u64)?;
    }
    Ok(hits.len())
}

//! Writing large shadows with `O_DIRECT`: the ciphertext goes from the sealing buffer to the
//! device without a copy into the page cache.
//!
//! On the machines measured (bench/RESULTS.md) copying a freshly sealed 1 GiB file into new
//! page-cache pages cost more than sealing it, and that copy ran on the one writer thread; a
//! direct write hands the buffer to the device instead. Direct I/O needs the buffer, the file
//! offset and the length aligned, so [`DirectWriter`] collects the byte stream in an aligned
//! buffer and writes whole aligned blocks; the unaligned tail is written through the page
//! cache at [`DirectWriter::finish`] (`O_DIRECT` cleared). A file system that refuses direct
//! I/O (open or write fails with `EINVAL`) gets the same bytes through the page cache.
//! Durability is unchanged: shadows are made durable by the caller (`syncfs` or `fsync`).
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Alignment of buffer, offsets and lengths for direct writes (covers 512 B and 4 KiB sectors).
const ALIGN: usize = 4096;
/// Bytes collected before a direct write.
const BLOCK: usize = 4 << 20;

/// A `Write` into a new file that uses direct I/O for aligned blocks.
pub struct DirectWriter {
    file: File,
    /// Backing storage; the aligned window starts at `start`.
    mem: Vec<u8>,
    start: usize,
    len: usize,
    direct: bool,
    /// Bytes written to the file so far (where the buffered bytes go).
    pos: u64,
}

impl DirectWriter {
    /// Create (truncate) `p` with `mode`, opened with `O_DIRECT` when the file system allows it.
    pub fn create(p: &Path, mode: u32) -> io::Result<DirectWriter> {
        Self::create_with(|direct| {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .custom_flags(if direct { libc_o_direct() } else { 0 })
                .open(p)
        })
    }

    /// Like [`DirectWriter::create`] with the file opened by `open(direct)`: first with
    /// `direct = true` (add `O_DIRECT`), again with `false` if that open fails with `EINVAL`.
    pub fn create_with(open: impl Fn(bool) -> io::Result<File>) -> io::Result<DirectWriter> {
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(EINVAL) => (open(false)?, false),
            Err(e) => return Err(e),
        };
        let mem = vec![0u8; BLOCK + 2 * ALIGN];
        let start = mem.as_ptr().align_offset(ALIGN);
        Ok(DirectWriter {
            file,
            mem,
            start,
            len: 0,
            direct,
            pos: 0,
        })
    }

    /// The bytes written but not in the file yet, and the file offset they go to.
    pub fn unwritten(&self) -> (u64, &[u8]) {
        (self.pos, &self.mem[self.start..self.start + self.len])
    }

    /// Was the file opened for direct I/O (false after a fallback)?
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    fn buf(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + BLOCK + ALIGN]
    }

    /// Stop using direct I/O: the rest goes through the page cache.
    fn buffered(&mut self) -> io::Result<()> {
        if self.direct {
            let fl = rustix::fs::fcntl_getfl(&self.file).map_err(io::Error::from)?;
            rustix::fs::fcntl_setfl(&self.file, fl - rustix::fs::OFlags::DIRECT)
                .map_err(io::Error::from)?;
            self.direct = false;
        }
        Ok(())
    }

    /// Write the aligned prefix of the buffer (all of it when `all`), keep the rest.
    fn drain(&mut self, all: bool) -> io::Result<()> {
        loop {
            let n = if all || !self.direct {
                self.len
            } else {
                self.len / ALIGN * ALIGN
            };
            if n == 0 {
                return Ok(());
            }
            let s = self.start;
            match self.file.write(&self.mem[s..s + n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => {
                    self.mem.copy_within(s + k..s + self.len, s);
                    self.len -= k;
                    self.pos += k as u64;
                    // A short direct write leaves an unaligned remainder: finish it buffered.
                    if self.direct && k % ALIGN != 0 {
                        self.buffered()?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A file system that takes the flag but refuses the write: page cache.
                Err(e) if self.direct && e.raw_os_error() == Some(EINVAL) => self.buffered()?,
                Err(e) => return Err(e),
            }
        }
    }

    /// Write what is left and return the file (not synced).
    pub fn finish(mut self) -> io::Result<File> {
        if self.len > 0 {
            self.buffered()?;
            self.drain(true)?;
        }
        Ok(self.file)
    }
}

impl Write for DirectWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = BLOCK + ALIGN - self.len;
        let k = data.len().min(room);
        let at = self.len;
        self.buf()[at..at + k].copy_from_slice(&data[..k]);
        self.len += k;
        if self.len >= BLOCK {
            self.drain(false)?;
        }
        Ok(k)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const EINVAL: i32 = 22;

/// Is direct I/O worth it for a new file at `p`? Not on tmpfs and ramfs, where the "device" is
/// the page cache (direct writes there would only add a copy into the aligned buffer).
pub fn worthwhile(p: &Path) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let dir = p.parent().unwrap_or(Path::new("."));
    match rustix::fs::statfs(dir) {
        // f_type's width differs between targets.
        #[allow(clippy::unnecessary_cast)]
        Ok(st) => {
            let t = st.f_type as i64;
            t != TMPFS_MAGIC && t != RAMFS_MAGIC
        }
        Err(_) => true,
    }
}

/// [`worthwhile`] for a new file in the directory `dir`.
pub fn worthwhile_at(dir: &std::os::fd::OwnedFd) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    match rustix::fs::fstatfs(dir) {
        // f_type's width differs between targets.
        #[allow(clippy::unnecessary_cast)]
        Ok(st) => {
            let t = st.f_type as i64;
            t != TMPFS_MAGIC && t != RAMFS_MAGIC
        }
        Err(_) => true,
    }
}

fn libc_o_direct() -> i32 {
    rustix::fs::OFlags::DIRECT.bits() as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4099) as u8).collect()
    }

    #[test]
    fn writes_every_byte_in_order_for_odd_sizes_and_pieces() {
        let dir = tempfile::tempdir().unwrap();
        for (size, piece) in [
            (0usize, 1usize),
            (24, 24),
            (4095, 1000),
            (BLOCK - 1, 65552),
            (BLOCK + 24, 4096),
            (3 * BLOCK + 12345, 65552 * 64),
        ] {
            let p = dir.path().join(format!("f{size}"));
            let data = pattern(size);
            let mut w = DirectWriter::create(&p, 0o600).unwrap();
            for c in data.chunks(piece.max(1)) {
                w.write_all(c).unwrap();
            }
            w.finish().unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), data, "size {size}");
        }
    }

    #[test]
    #[allow(clippy::unnecessary_cast)]
    fn not_worthwhile_on_tmpfs() {
        // The precondition is checked, not assumed: a machine without a tmpfs at /dev/shm fails
        // this test instead of passing it without looking.
        let shm = Path::new("/dev/shm/x");
        let fs = rustix::fs::statfs(Path::new("/dev/shm")).expect("statfs /dev/shm");
        assert_eq!(
            fs.f_type as i64, 0x0102_1994,
            "/dev/shm must be a tmpfs for this test"
        );
        assert!(!worthwhile(shm));
    }
}

//! Writing tar members: a POSIX pax header (`x`) carries long names, long link targets and the
//! source's pax records (xattrs such as `security.capability`); the ustar header after it holds
//! the rest. And an OCI archive writer that streams a blob of unknown size and digest into the
//! archive and patches its header afterwards (the archive is a seekable file).
use aws_lc_rs::digest;
use std::io::{self, Write};

pub const BLOCK: u64 = 512;

/// Zero bytes that pad `size` bytes of content to a whole block.
pub fn padding(size: u64) -> usize {
    ((BLOCK - size % BLOCK) % BLOCK) as usize
}

/// One member's header fields.
#[derive(Debug, Clone)]
pub struct Member<'a> {
    pub name: &'a [u8],
    pub kind: tar::EntryType,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub size: u64,
    pub link: Option<&'a [u8]>,
    pub uname: Option<&'a [u8]>,
    pub gname: Option<&'a [u8]>,
    pub dev: Option<(u32, u32)>,
    /// pax records to keep (never `path`, `linkpath` or `size`: those are written from the fields).
    pub pax: Vec<(String, Vec<u8>)>,
}

impl<'a> Member<'a> {
    /// A plain member (`kind`, `name`, `mode`, `size`), owned by root, time 0.
    pub fn plain(name: &'a [u8], kind: tar::EntryType, mode: u32, size: u64) -> Self {
        Member {
            name,
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            size,
            link: None,
            uname: None,
            gname: None,
            dev: None,
            pax: Vec::new(),
        }
    }
}

/// One pax record, `LEN key=value\n`, where LEN counts the whole record including itself.
fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn ustar(m: &Member, name: &[u8], link: Option<&[u8]>) -> io::Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(m.kind);
    h.set_mode(m.mode);
    h.set_uid(m.uid);
    h.set_gid(m.gid);
    h.set_mtime(m.mtime);
    h.set_size(m.size);
    {
        let old = h.as_old_mut();
        let n = name.len().min(old.name.len());
        old.name[..n].copy_from_slice(&name[..n]);
        if let Some(l) = link {
            let n = l.len().min(old.linkname.len());
            old.linkname[..n].copy_from_slice(&l[..n]);
        }
    }
    if let Some(u) = m.uname {
        h.set_username(std::str::from_utf8(u).unwrap_or("")).ok();
    }
    if let Some(g) = m.gname {
        h.set_groupname(std::str::from_utf8(g).unwrap_or("")).ok();
    }
    if let Some((ma, mi)) = m.dev {
        h.set_device_major(ma)?;
        h.set_device_minor(mi)?;
    }
    h.set_cksum();
    Ok(h)
}

/// Write `m`'s header(s); the caller writes `m.size` bytes of content and [`padding`] after it.
/// Returns the bytes written.
pub fn write_header(w: &mut dyn Write, m: &Member) -> io::Result<u64> {
    let long_name = m.name.len() > 100 || !m.name.is_ascii();
    let long_link = m.link.is_some_and(|l| l.len() > 100 || !l.is_ascii());
    let mut written = 0;
    if long_name || long_link || !m.pax.is_empty() {
        let mut rec = Vec::new();
        if long_name {
            pax_record(&mut rec, "path", m.name);
        }
        if let (true, Some(l)) = (long_link, m.link) {
            pax_record(&mut rec, "linkpath", l);
        }
        for (k, v) in &m.pax {
            pax_record(&mut rec, k, v);
        }
        let mut x = Member::plain(
            b"././@PaxHeader",
            tar::EntryType::XHeader,
            0o644,
            rec.len() as u64,
        );
        x.mtime = m.mtime;
        let h = ustar(&x, x.name, None)?;
        w.write_all(h.as_bytes())?;
        w.write_all(&rec)?;
        w.write_all(&[0u8; BLOCK as usize][..padding(rec.len() as u64)])?;
        written += BLOCK + rec.len() as u64 + padding(rec.len() as u64) as u64;
    }
    let h = ustar(m, m.name, m.link)?;
    w.write_all(h.as_bytes())?;
    Ok(written + BLOCK)
}

/// Write a whole small member.
pub fn write_member(w: &mut dyn Write, m: &Member, content: &[u8]) -> io::Result<u64> {
    debug_assert_eq!(m.size, content.len() as u64);
    let n = write_header(w, m)?;
    w.write_all(content)?;
    w.write_all(&[0u8; BLOCK as usize][..padding(content.len() as u64)])?;
    Ok(n + content.len() as u64 + padding(content.len() as u64) as u64)
}

/// `sha256:HEX` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(digest::digest(&digest::SHA256, bytes))
    )
}

/// SHA-256 and length of the bytes given to [`Sha256::update`].
pub struct Sha256 {
    ctx: digest::Context,
    pub len: u64,
}

impl Sha256 {
    pub fn new() -> Self {
        Sha256 {
            ctx: digest::Context::new(&digest::SHA256),
            len: 0,
        }
    }
    /// `sha256:HEX` of everything given so far.
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.ctx.clone().finish()))
    }
    pub fn update(&mut self, b: &[u8]) {
        self.ctx.update(b);
        self.len += b.len() as u64;
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

/// An OCI archive being written: a tar of `oci-layout`, `index.json` and `blobs/sha256/*`,
/// written with positioned writes, so that a blob's content can be written by its own thread
/// while its header is patched in afterwards.
pub struct ArchiveWriter {
    file: std::sync::Arc<std::fs::File>,
    pos: u64,
    blobs: std::collections::HashSet<String>,
}

/// A blob being streamed into the archive: buffered here, hashed and written by a thread of
/// its own (SHA-256 and the copy into the page cache overlap with the caller's work).
/// [`ArchiveWriter::finish_blob`] names it.
pub struct BlobSink {
    start: u64,
    buf: Vec<u8>,
    /// Bytes accepted so far.
    pub len: u64,
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    worker: Option<std::thread::JoinHandle<io::Result<String>>>,
}

const SINK_CHUNK: usize = 1 << 20;

impl Write for BlobSink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        self.len += b.len() as u64;
        if self.buf.len() >= SINK_CHUNK {
            self.send()?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlobSink {
    fn send(&mut self) -> io::Result<()> {
        let chunk = std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(SINK_CHUNK + BLOCK as usize),
        );
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| io::Error::other("blob already finished"))?;
        if tx.send(chunk).is_err() {
            // The writer thread stopped on an error: report it.
            return Err(self
                .join()
                .err()
                .unwrap_or_else(|| io::Error::other("blob writer stopped")));
        }
        Ok(())
    }

    fn join(&mut self) -> io::Result<String> {
        self.tx = None;
        match self.worker.take() {
            Some(w) => w
                .join()
                .map_err(|_| io::Error::other("blob writer panicked"))?,
            None => Err(io::Error::other("blob already finished")),
        }
    }

    /// Everything written: returns `sha256:HEX` of the blob.
    fn finish(&mut self) -> io::Result<String> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        self.join()
    }
}

impl ArchiveWriter {
    pub fn new(file: std::fs::File) -> io::Result<Self> {
        let mut a = ArchiveWriter {
            file: std::sync::Arc::new(file),
            pos: 0,
            blobs: Default::default(),
        };
        a.add_file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        for d in ["blobs/", "blobs/sha256/"] {
            let m = Member::plain(d.as_bytes(), tar::EntryType::Directory, 0o755, 0);
            let mut b = Vec::new();
            write_member(&mut b, &m, &[])?;
            a.append(&b)?;
        }
        Ok(a)
    }

    fn append(&mut self, b: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(b, self.pos)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    pub fn add_file(&mut self, name: &str, content: &[u8]) -> io::Result<()> {
        let m = Member::plain(
            name.as_bytes(),
            tar::EntryType::Regular,
            0o644,
            content.len() as u64,
        );
        let mut b = Vec::with_capacity(content.len() + 2 * BLOCK as usize);
        write_member(&mut b, &m, content)?;
        self.append(&b)
    }

    /// A small blob: returns its digest and size.
    pub fn add_blob(&mut self, content: &[u8]) -> io::Result<(String, u64)> {
        let d = sha256_digest(content);
        if self.blobs.insert(d.clone()) {
            let name = format!("blobs/sha256/{}", &d["sha256:".len()..]);
            self.add_file(&name, content)?;
        }
        Ok((d, content.len() as u64))
    }

    /// Start a streamed blob: its header is written by [`Self::finish_blob`]. One at a time.
    pub fn begin_blob(&mut self) -> io::Result<BlobSink> {
        let start = self.pos;
        let file = self.file.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let worker = std::thread::spawn(move || -> io::Result<String> {
            use std::os::unix::fs::FileExt;
            let mut h = Sha256::new();
            let mut off = start + BLOCK;
            for chunk in rx {
                h.update(&chunk);
                file.write_all_at(&chunk, off)?;
                off += chunk.len() as u64;
            }
            Ok(h.digest())
        });
        Ok(BlobSink {
            start,
            buf: Vec::with_capacity(SINK_CHUNK + BLOCK as usize),
            len: 0,
            tx: Some(tx),
            worker: Some(worker),
        })
    }

    /// The streamed blob is complete: pad it and write its real header. Returns its digest and
    /// size. A blob already in the archive is cut off again.
    pub fn finish_blob(&mut self, mut sink: BlobSink) -> io::Result<(String, u64)> {
        use std::os::unix::fs::FileExt;
        let digest = sink.finish()?;
        let len = sink.len;
        if !self.blobs.insert(digest.clone()) {
            self.truncate(sink.start)?;
            return Ok((digest, len));
        }
        let pad = padding(len);
        self.file
            .write_all_at(&[0u8; BLOCK as usize][..pad], sink.start + BLOCK + len)?;
        let name = format!("blobs/sha256/{}", &digest["sha256:".len()..]);
        let m = Member::plain(name.as_bytes(), tar::EntryType::Regular, 0o644, len);
        let mut h = Vec::new();
        let n = write_header(&mut h, &m)?;
        debug_assert_eq!(n, BLOCK);
        self.file.write_all_at(&h, sink.start)?;
        self.pos = sink.start + BLOCK + len + pad as u64;
        Ok((digest, len))
    }

    /// Drop a streamed blob: the archive ends where it began.
    pub fn abandon_blob(&mut self, mut sink: BlobSink) -> io::Result<()> {
        sink.buf.clear();
        let _ = sink.join();
        self.truncate(sink.start)
    }

    fn truncate(&mut self, at: u64) -> io::Result<()> {
        self.file.set_len(at)?;
        self.pos = at;
        Ok(())
    }

    /// End the archive and make it durable.
    pub fn finish(mut self) -> io::Result<()> {
        self.append(&[0u8; 2 * BLOCK as usize])?;
        self.file.set_len(self.pos)?;
        self.file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_lengths_count_themselves() {
        for n in [0usize, 1, 90, 95, 96, 97, 995, 996, 9995] {
            let mut r = Vec::new();
            pax_record(&mut r, "path", &vec![b'a'; n]);
            let sp = r.iter().position(|&b| b == b' ').unwrap();
            let len: usize = std::str::from_utf8(&r[..sp]).unwrap().parse().unwrap();
            assert_eq!(len, r.len(), "value of {n} bytes");
        }
    }

    #[test]
    fn long_names_and_links_read_back_through_the_tar_crate() {
        let long = format!("usr/{}/file", "d".repeat(150));
        let link = format!("../{}", "t".repeat(120));
        let mut buf = Vec::new();
        let mut m = Member::plain(long.as_bytes(), tar::EntryType::Symlink, 0o777, 0);
        m.link = Some(link.as_bytes());
        m.pax.push(("SCHILY.xattr.user.x".into(), b"v".to_vec()));
        write_member(&mut buf, &m, &[]).unwrap();
        let m2 = Member::plain(b"short", tar::EntryType::Regular, 0o600, 3);
        write_member(&mut buf, &m2, b"abc").unwrap();
        buf.extend_from_slice(&[0u8; 1024]);
        let mut a = tar::Archive::new(&buf[..]);
        let mut es = a.entries().unwrap();
        let mut e = es.next().unwrap().unwrap();
        assert_eq!(&*e.path_bytes(), long.as_bytes());
        assert_eq!(&*e.link_name_bytes().unwrap(), link.as_bytes());
        let x: Vec<_> = e
            .pax_extensions()
            .unwrap()
            .unwrap()
            .map(|r| r.unwrap().key().unwrap().to_string())
            .collect();
        assert!(x.contains(&"SCHILY.xattr.user.x".to_string()), "{x:?}");
        let mut e = es.next().unwrap().unwrap();
        assert_eq!(&*e.path_bytes(), b"short");
        let mut s = String::new();
        std::io::Read::read_to_string(&mut e, &mut s).unwrap();
        assert_eq!(s, "abc");
    }
}

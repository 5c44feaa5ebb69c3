//! Writing tar members: a POSIX pax header (`x`) carries long names, long link targets and the
//! source's pax records (xattrs such as `security.capability`); the ustar header after it holds
//! the rest. And an OCI archive writer that streams a blob of unknown size and digest into the
//! archive and patches its header afterwards (the archive is a seekable file).
use aws_lc_rs::digest;
use std::io::{self, Seek, SeekFrom, Write};

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

/// A writer that hashes (SHA-256) and counts what passes through it.
pub struct Hashing<W> {
    pub inner: W,
    ctx: digest::Context,
    pub len: u64,
}

impl<W> Hashing<W> {
    pub fn new(inner: W) -> Self {
        Hashing {
            inner,
            ctx: digest::Context::new(&digest::SHA256),
            len: 0,
        }
    }
    /// `sha256:HEX` of everything written so far.
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.ctx.clone().finish()))
    }
    pub fn update(&mut self, b: &[u8]) {
        self.ctx.update(b);
        self.len += b.len() as u64;
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// An OCI archive being written: a tar of `oci-layout`, `index.json` and `blobs/sha256/*`.
pub struct ArchiveWriter {
    out: io::BufWriter<std::fs::File>,
    pos: u64,
    blobs: std::collections::HashSet<String>,
}

/// A blob being streamed into the archive; [`ArchiveWriter::finish_blob`] names it.
pub struct BlobStart(u64);

impl ArchiveWriter {
    pub fn new(file: std::fs::File) -> io::Result<Self> {
        let mut a = ArchiveWriter {
            out: io::BufWriter::with_capacity(1 << 20, file),
            pos: 0,
            blobs: Default::default(),
        };
        a.add_file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        for d in ["blobs/", "blobs/sha256/"] {
            let m = Member::plain(d.as_bytes(), tar::EntryType::Directory, 0o755, 0);
            a.pos += write_member(&mut a.out, &m, &[])?;
        }
        Ok(a)
    }

    pub fn add_file(&mut self, name: &str, content: &[u8]) -> io::Result<()> {
        let m = Member::plain(
            name.as_bytes(),
            tar::EntryType::Regular,
            0o644,
            content.len() as u64,
        );
        self.pos += write_member(&mut self.out, &m, content)?;
        Ok(())
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

    /// Start a streamed blob: a placeholder header, then the content through [`Self::sink`].
    pub fn begin_blob(
        &mut self,
    ) -> io::Result<(BlobStart, Hashing<&mut io::BufWriter<std::fs::File>>)> {
        let start = self.pos;
        self.out.write_all(&[0u8; BLOCK as usize])?;
        Ok((BlobStart(start), Hashing::new(&mut self.out)))
    }

    /// The streamed blob is complete (`digest`, `len` from its [`Hashing`] sink): pad it and
    /// write its real header. A blob already in the archive is cut off again.
    pub fn finish_blob(&mut self, start: BlobStart, digest: &str, len: u64) -> io::Result<()> {
        if !self.blobs.insert(digest.to_string()) {
            return self.abandon_blob(start);
        }
        self.out.write_all(&[0u8; BLOCK as usize][..padding(len)])?;
        let end = start.0 + BLOCK + len + padding(len) as u64;
        let name = format!("blobs/sha256/{}", &digest["sha256:".len()..]);
        let m = Member::plain(name.as_bytes(), tar::EntryType::Regular, 0o644, len);
        self.out.seek(SeekFrom::Start(start.0))?;
        let n = write_header(&mut self.out, &m)?;
        debug_assert_eq!(n, BLOCK);
        self.out.seek(SeekFrom::Start(end))?;
        self.pos = end;
        Ok(())
    }

    /// Drop a streamed blob: the archive ends where it began.
    pub fn abandon_blob(&mut self, start: BlobStart) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().set_len(start.0)?;
        self.out.seek(SeekFrom::Start(start.0))?;
        self.pos = start.0;
        Ok(())
    }

    /// End the archive and make it durable.
    pub fn finish(mut self) -> io::Result<()> {
        self.out.write_all(&[0u8; 2 * BLOCK as usize])?;
        let f = self.out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
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

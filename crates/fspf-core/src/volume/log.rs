//! The metadata log `FSPF.log` (FORMAT.md §5c): a commit of a sealed fspf appends one sealed
//! record holding the entries it changed, chained to the tag of the state before it, instead of
//! re-sealing every entry. The fspf file itself is the *checkpoint*; the current state is the
//! checkpoint with the log's records applied in order, and its tag (the trust anchor) is the
//! last record's GCM tag. When the log outgrows a fraction of the checkpoint, the next commit
//! writes a new checkpoint instead (the whole fspf, as every commit did before), which makes the
//! old log stale: its header names the old checkpoint's tag.
use super::kernel_fs;
use super::store::open_error;
use super::Volume;
use crate::crypto::{self, AeadKey, Tag, VolumeKey, NONCE_LEN, TAG_LEN};
use crate::error::{Error, Result};
use crate::format::header::{MAX_FSPF_LEN, VERSION_3};
use crate::format::log::{self as framing, Frame, LOG_HEADER_LEN};
use crate::format::metadata::{entry_from_pb, entry_to_pb, FileEntry, LogRecordPb};
use crate::policy::EmbedPath;
use prost::Message;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const INFO: &[u8] = b"fspf v3 metadata log";
/// The log may grow to this many bytes whatever the checkpoint's size.
pub const LOG_MIN_LIMIT: u64 = 128 << 10;

/// Where a volume's state lies in the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LogPos {
    /// Tag of the checkpoint (the fspf file) the log continues; `None` until known (a volume
    /// over a frozen index that has not caught up yet).
    pub base: Option<Tag>,
    /// Offset just after the record whose tag is the volume's tag ([`LOG_HEADER_LEN`] at the
    /// checkpoint itself); 0 while no log continues `base` (the next append writes the header).
    pub end: u64,
    /// Length of the checkpoint file (the log is compacted relative to it).
    pub checkpoint_len: u64,
    /// Format version of the checkpoint: only a version-3 checkpoint is continued by a log
    /// (an older reader would not see the log, FORMAT.md §8).
    pub checkpoint_version: u16,
    /// Version of the log's header (5: its records may carry journals and small files; 4: an
    /// older writer's log, continued without files; 3: without journals either); 0 while
    /// unknown or no log.
    pub log_version: u8,
    /// Bytes of journals and files in the log's records up to `end` (those this volume
    /// applied).
    pub journal_bytes: u64,
}

/// The log, open, with its length, as a look under the fspf's lock found it.
#[derive(Debug)]
pub(crate) struct OpenLog {
    pub file: File,
    pub len: u64,
}

/// What [`Volume::disk_tag_locked`] found under `FSPF.lock`: the disk holds the volume's own
/// state (tag `tag`), and the log is open for writing. Valid while that lock is held (it
/// borrows it), for the one commit it is handed to.
#[derive(Debug)]
pub struct CurrentOnDisk<'l> {
    tag: Tag,
    log: OpenLog,
    _lock: std::marker::PhantomData<&'l super::FspfLock>,
}

impl CurrentOnDisk<'_> {
    /// The open log, if the volume still has the state that was found on disk.
    pub(crate) fn log_for(self, tag: Tag) -> Option<OpenLog> {
        (self.tag == tag).then_some(self.log)
    }
}

/// `FSPF.log` beside `fspf`.
pub fn log_path(fspf: &Path) -> PathBuf {
    super::store::sibling(fspf, ".log")
}

fn log_key(vk: &VolumeKey) -> Result<AeadKey> {
    let mut k = zeroize::Zeroizing::new([0u8; 32]);
    crypto::hkdf_sha256(vk.as_bytes(), b"", INFO, &mut k[..])?;
    AeadKey::new(&k[..])
}

/// Largest log a commit appends to before it writes a checkpoint instead: an eighth of the
/// checkpoint, at least [`LOG_MIN_LIMIT`]. Replaying the log then costs at most about that
/// fraction of parsing the checkpoint, and the checkpoints' cost spread over the commits that
/// filled the log is a constant factor of what those commits wrote.
pub fn log_limit(checkpoint_len: u64) -> u64 {
    (checkpoint_len / 8).max(LOG_MIN_LIMIT)
}

/// The bytes of the log if there is one and it continues the checkpoint with tag `base`
/// (`None`: no log, or a stale one left by an earlier checkpoint).
pub(crate) fn read_log(fspf: &Path, base: &Tag) -> Result<Option<Vec<u8>>> {
    let p = log_path(fspf);
    let f = match kernel_fs::open_regular_path(&p) {
        Ok(f) => f,
        Err(kernel_fs::OpenError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(open_error(&p, e)),
    };
    let len = f.metadata().map_err(|e| Error::io(&p, e))?.len();
    if len > MAX_FSPF_LEN {
        return Err(Error::FspfTooLarge {
            path: p,
            len,
            max: MAX_FSPF_LEN,
        });
    }
    let mut b = Vec::with_capacity(len as usize);
    f.take(len)
        .read_to_end(&mut b)
        .map_err(|e| Error::io(&p, e))?;
    Ok((framing::parse_header(&b) == Some(*base)).then_some(b))
}

/// The state on disk as one read gives it: the checkpoint (tag, length, version) and the bytes
/// of the log that continues it. Read once and handed on ([`Volume::catch_up_to`]), so that
/// a caller that checks the tag and then applies the records reads the log once.
#[derive(Debug, Clone)]
pub struct DiskState {
    checkpoint: Tag,
    checkpoint_len: u64,
    version: u16,
    log: Option<Vec<u8>>,
    /// The log's complete records, walked once (each walk hashes every record's bytes).
    frames: Vec<Frame>,
}

impl DiskState {
    /// Read the checkpoint and its log as one consistent pair: a checkpoint written by another
    /// process between the two reads (which replaces the fspf, then removes the log) is
    /// noticed by reading the checkpoint's tag again, and both are read anew. Logs are only
    /// read for version-3 checkpoints.
    pub fn read(fspf: &Path) -> Result<DiskState> {
        let mut last = None;
        for _ in 0..64 {
            let (c, len, version) = super::store::read_checkpoint_tag(fspf)?;
            let log = if version < VERSION_3 {
                None
            } else {
                read_log(fspf, &c)?
            };
            let again = super::store::read_checkpoint_tag(fspf)?;
            if again == (c, len, version) {
                let frames = log
                    .as_deref()
                    .map(|b| framing::frames(b, LOG_HEADER_LEN).collect())
                    .unwrap_or_default();
                return Ok(DiskState {
                    checkpoint: c,
                    checkpoint_len: len,
                    version,
                    log,
                    frames,
                });
            }
            last = Some(again.0);
        }
        Err(Error::Other(format!(
            "{}: the fspf kept changing while it was read (last tag {})",
            fspf.display(),
            last.map(|t| t.to_hex()).unwrap_or_default()
        )))
    }

    /// The tag of the current state (keyless: the last complete record's, else the
    /// checkpoint's; nothing is authenticated).
    pub fn tag(&self) -> Tag {
        self.last_record().map_or(self.checkpoint, |f| f.tag)
    }

    /// The log's last complete record: past it lie zeros (preallocated) or a torn tail.
    fn last_record(&self) -> Option<Frame> {
        self.frames.last().cloned()
    }

    /// The checkpoint's tag.
    pub(crate) fn checkpoint(&self) -> Tag {
        self.checkpoint
    }

    /// Bytes of log after the record whose tag is `t` (after the header when `t` is the
    /// checkpoint's); `None` when `t` is not in the log.
    pub(crate) fn log_after(&self, t: Tag) -> Option<u64> {
        let len = match &self.log {
            Some(_) => self.last_record().map_or(LOG_HEADER_LEN, |f| f.end) as u64,
            None => 0,
        };
        if t == self.checkpoint {
            return Some(len.saturating_sub(LOG_HEADER_LEN as u64));
        }
        self.log.as_ref()?;
        let end = self
            .frames
            .iter()
            .find(|f| f.tag == t)
            .map(|f| f.end as u64);
        end.map(|e| len - e)
    }
}

/// One authenticated record: what it changes, the tag after it, and where it ends.
struct Opened {
    removed: Vec<EmbedPath>,
    put: Vec<(EmbedPath, FileEntry)>,
    journals: Vec<Vec<u8>>,
    files: Vec<Vec<u8>>,
    boot: Vec<u8>,
    journal_bytes: u64,
    generation: u64,
    tag: Tag,
    end: u64,
}

impl Volume {
    /// Bring this volume to the state on disk by applying the log records after its own
    /// state, each authenticated and chained to the one before (O(records applied)). Returns
    /// `false`, changing nothing, when its state is not in the log on disk (a checkpoint was
    /// written since, or the fspf was replaced or rolled back): the caller opens the fspf anew,
    /// with the tag checks of [`Volume::open`]. A complete record that fails authentication is
    /// an error ([`Error::LogDamaged`]); nothing is applied then.
    pub fn catch_up(&mut self) -> Result<bool> {
        let st = DiskState::read(&self.path)?;
        self.catch_up_to(st)
    }

    /// [`Volume::catch_up`] to a state the caller has read (and checked) already.
    pub fn catch_up_to(&mut self, st: DiskState) -> Result<bool> {
        let DiskState {
            checkpoint: c,
            checkpoint_len: cp_len,
            version,
            log: bytes,
            frames,
        } = st;
        let Some(key) = self
            .key
            .clone()
            .filter(|_| self.log_enabled() && version >= VERSION_3)
        else {
            if c == self.tag {
                self.log = LogPos {
                    base: Some(c),
                    end: 0,
                    checkpoint_len: cp_len,
                    checkpoint_version: version,
                    log_version: 0,
                    journal_bytes: 0,
                };
            }
            return Ok(c == self.tag);
        };
        let mut replay_prev = self.tag;
        let from = if self.tag == c {
            LOG_HEADER_LEN as u64
        } else {
            let Some(b) = &bytes else {
                return Ok(false);
            };
            let end = self.log.end as usize;
            let ours = self.log.base == Some(c)
                && end >= LOG_HEADER_LEN + framing::RECORD_OVERHEAD
                && framing::tag_range(end).and_then(|r| b.get(r)) == Some(&self.tag.0[..]);
            if ours {
                self.log.end
            } else {
                // Opened from the record that made this state (its entries are not applied
                // again): it tells the journals it carries and the log's journal bytes so far,
                // which a volume over a frozen index does not know. Not a large one (an
                // import's thousands of entries): what it would tell only saves work (the
                // index's maker applied its chains, FORMAT.md §5b), and opening it costs
                // what the index saved.
                let mut prev = c;
                let mut found = None;
                for f in &frames {
                    if f.tag == self.tag {
                        found = Some((f, prev));
                        break;
                    }
                    prev = f.tag;
                }
                match found {
                    Some((f, p)) if f.n as usize <= REOPEN_MAX => {
                        replay_prev = p;
                        f.start as u64
                    }
                    Some((f, _)) => f.end as u64,
                    None => return Ok(false),
                }
            }
        };
        let has_log = bytes.is_some();
        let log_version = bytes
            .as_deref()
            .and_then(framing::header_version)
            .unwrap_or(0);
        let journal_bytes_before = if from == LOG_HEADER_LEN as u64 {
            // From the checkpoint on: what this volume knew of another log is stale.
            self.logj.clear();
            0
        } else {
            self.log.journal_bytes
        };
        let opened = match bytes {
            Some(mut b) => {
                let todo: Vec<Frame> = frames
                    .into_iter()
                    .filter(|f| f.start as u64 >= from)
                    .collect();
                self.open_records(&key, &mut b, todo, replay_prev)?
            }
            None => Vec::new(),
        };
        let end = match opened.last() {
            Some(o) => o.end,
            // No log continues the checkpoint: the next append writes its header.
            None if !has_log => 0,
            None => from,
        };
        let journal_bytes = opened
            .last()
            .map_or(journal_bytes_before, |o| o.journal_bytes);
        let path = log_path(&self.path);
        let start = self.tag;
        for o in opened {
            self.logj
                .record(o.journals, o.files, &o.boot, &o.put)
                .map_err(|reason| Error::LogDamaged {
                    path: path.clone(),
                    offset: o.end,
                    reason,
                })?;
            if o.tag == start {
                // The record that made this volume's state, opened for its journals only.
                continue;
            }
            for p in o.removed {
                self.raw_set(p, None);
            }
            for (p, e) in o.put {
                self.raw_set(p, Some(e));
            }
            self.meta.generation = o.generation;
            self.tag = o.tag;
        }
        self.log = LogPos {
            base: Some(c),
            end,
            checkpoint_len: cp_len,
            checkpoint_version: version,
            log_version,
            journal_bytes,
        };
        Ok(true)
    }

    /// Is this volume's state the one on disk, told without reading the log: the checkpoint is
    /// the one its position names and the log ends right after its own record (O(1): two
    /// small reads and a `stat`). `false` means "not known": the caller reads the log.
    pub fn is_current_on_disk(&self) -> Result<bool> {
        Ok(self.current_log(false)?.is_some())
    }

    /// [`Volume::is_current_on_disk`], keeping the log it looked at open (for writing with
    /// `write`) with its length.
    fn current_log(&self, write: bool) -> Result<Option<OpenLog>> {
        let (Some(base), true) = (self.log.base, self.log.end > 0) else {
            return Ok(None);
        };
        let (c, _, _) = super::store::read_checkpoint_tag(&self.path)?;
        if c != base {
            return Ok(None);
        }
        let p = log_path(&self.path);
        let opened = if write {
            kernel_fs::open_rw_existing_path(&p)
        } else {
            kernel_fs::open_regular_path(&p)
        };
        let Ok(f) = opened else {
            return Ok(None);
        };
        let len = f.metadata().map_or(0, |m| m.len());
        if len < self.log.end {
            return Ok(None);
        }
        let mut t = [0u8; TAG_LEN];
        let Some(r) = framing::tag_range(self.log.end as usize) else {
            return Ok(None);
        };
        if f.read_exact_at(&mut t, r.start as u64).is_err() || t != self.tag.0 {
            return Ok(None);
        }
        // Past this volume's last record the file holds zeros (preallocated, FORMAT.md §5c)
        // unless another writer appended since: a record's length field is never zero.
        let mut n = [0u8; 4];
        let current =
            len == self.log.end || f.read_exact_at(&mut n, self.log.end).is_ok() && n == [0; 4];
        Ok(current.then_some(OpenLog { file: f, len }))
    }

    /// The tag of the state on disk (keyless, like [`Volume::read_tag`]), in O(1) when it is
    /// this volume's own state ([`Volume::is_current_on_disk`]), else by reading the log.
    pub fn disk_tag(&self) -> Result<Tag> {
        if self.is_current_on_disk()? {
            return Ok(self.tag);
        }
        Ok(DiskState::read(&self.path)?.tag())
    }

    /// [`Volume::disk_tag`] under the fspf's lock, for a commit under the same lock: when the
    /// disk holds this volume's own state, the answer says so and keeps the log open, and
    /// [`Volume::commit_announced`] given it neither looks at the disk again nor opens the log
    /// again (one look per commit instead of two).
    pub fn disk_tag_locked<'l>(
        &self,
        _lock: &'l super::FspfLock,
    ) -> Result<(Tag, Option<CurrentOnDisk<'l>>)> {
        if let Some(log) = self.current_log(true)? {
            let proof = CurrentOnDisk {
                tag: self.tag,
                log,
                _lock: std::marker::PhantomData,
            };
            return Ok((self.tag, Some(proof)));
        }
        Ok((DiskState::read(&self.path)?.tag(), None))
    }

    /// The records `frames` of `bytes`, chained from `prev`, opened and checked.
    fn open_records(
        &self,
        key: &VolumeKey,
        bytes: &mut [u8],
        frames: Vec<Frame>,
        mut prev: Tag,
    ) -> Result<Vec<Opened>> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let k = log_key(key)?;
        let path = log_path(&self.path);
        let damaged = |f: &Frame, reason: String| Error::LogDamaged {
            path: path.clone(),
            offset: f.start as u64,
            reason,
        };
        let mut out = Vec::with_capacity(frames.len());
        for f in frames {
            let aad = framing::aad(&prev, f.n);
            let sealed = &mut bytes[f.sealed()];
            let n = k.open(f.nonce, &aad, sealed).ok_or_else(|| {
                damaged(
                    &f,
                    "a record fails authentication: modified, reordered, replayed or forked".into(),
                )
            })?;
            let rec = LogRecordPb::decode(&sealed[..n]);
            zeroize::Zeroize::zeroize(&mut sealed[..n]);
            let rec = rec.map_err(|e| damaged(&f, e.to_string()))?;
            let mut removed = Vec::with_capacity(rec.removed.len());
            for p in rec.removed {
                removed.push(EmbedPath::from_bytes(&p).map_err(|e| damaged(&f, e.to_string()))?);
            }
            let mut put = Vec::with_capacity(rec.put.len());
            for e in rec.put {
                put.push(entry_from_pb(e, &self.meta.regions).map_err(|e| damaged(&f, e))?);
            }
            out.push(Opened {
                removed,
                put,
                journals: rec.journals,
                files: rec.files,
                boot: rec.boot,
                journal_bytes: rec.journal_bytes,
                generation: rec.generation,
                tag: f.tag,
                end: f.end as u64,
            });
            prev = f.tag;
        }
        Ok(out)
    }

    /// Does this volume commit through the log? Only sealed fspfs do (the log is keyed by the
    /// volume key; an unsealed fspf is rewritten whole, as before).
    pub(crate) fn log_enabled(&self) -> bool {
        self.key.is_some()
    }

    /// Would a record of about `len` bytes of entries and `journals` bytes of journals still
    /// fit in the log before the next checkpoint? Entries count against [`log_limit`],
    /// journals against [`log_journals_limit`].
    pub(crate) fn log_has_room(&self, len: u64, journals: u64) -> bool {
        let at = self.log.end.max(LOG_HEADER_LEN as u64);
        let entries_at = at.saturating_sub(self.log.journal_bytes);
        len + journals <= framing::MAX_RECORD as u64
            && self.log.base.is_some()
            && self.log.checkpoint_version >= VERSION_3
            && entries_at + len + framing::RECORD_OVERHEAD as u64
                <= log_limit(self.log.checkpoint_len)
            && self.log.journal_bytes + journals
                <= log_journals_limit(self.log.checkpoint_len).max(self.opts.log_journals)
    }

    /// May the next record carry journals? Only in a version-4 log (or a new one) and where
    /// the marks that tell applied journals of the log apart can be kept.
    pub(crate) fn log_takes_journals(&self) -> bool {
        (self.log.end == 0 || self.log.log_version >= 4) && self.logj.marks_supported(&self.path)
    }

    /// May the next record carry whole small files (FORMAT.md §5b, "Files in the log")? Only
    /// in a version-5 log (or a new one) of a volume that commits through the log.
    pub fn log_takes_files(&self) -> bool {
        self.opts.log
            && self.log_enabled()
            && self.log.base.is_some()
            && (self.log.end == 0 || self.log.log_version >= 5)
            && super::update::boot_id().is_some()
    }

    /// Append the record of a commit that changed the entries at `touched` (their current
    /// values are recorded; a path no longer listed as removed). `announce` learns the new tag
    /// before the commit point, which is the record being durable (fdatasync).
    pub(crate) fn append_log(
        &mut self,
        touched: &std::collections::BTreeSet<EmbedPath>,
        journals: &[std::sync::Arc<[u8]>],
        files: &[std::sync::Arc<[u8]>],
        open: Option<OpenLog>,
        announce: &mut dyn FnMut(Tag) -> Result<()>,
    ) -> Result<()> {
        let key = self.key.clone().ok_or(Error::KeyRequired {
            path: self.path.clone(),
        })?;
        let base = self
            .log
            .base
            .ok_or_else(|| Error::Other("log position unknown".into()))?;
        let jlen: u64 = journals.iter().chain(files).map(|j| j.len() as u64).sum();
        let mut rec = LogRecordPb {
            generation: self.meta.generation,
            journals: journals.iter().map(|j| j.to_vec()).collect(),
            files: files.iter().map(|f| f.to_vec()).collect(),
            boot: match (files.is_empty(), super::update::boot_id()) {
                (false, Some(b)) => b.to_vec(),
                _ => Vec::new(),
            },
            journal_bytes: self.log.journal_bytes + jlen,
            ..Default::default()
        };
        for p in touched {
            match self.lookup(p) {
                Some(e) => rec.put.push(entry_to_pb(p, &e)),
                None => rec.removed.push(p.as_bytes().to_vec()),
            }
        }
        let mut body = zeroize::Zeroizing::new(rec.encode_to_vec());
        let n =
            u32::try_from(body.len()).map_err(|_| Error::Other("log record too large".into()))?;
        let mut nonce = [0u8; NONCE_LEN];
        crypto::random_bytes(&mut nonce)?;
        let tag = log_key(&key)?.seal(nonce, &framing::aad(&self.tag, n), &mut body)?;
        let mut sealed = std::mem::take(&mut *body);
        sealed.extend_from_slice(&tag);
        let record = framing::encode_record(&nonce, &sealed);
        debug_assert_eq!(
            record.len(),
            sealed.len() - TAG_LEN + framing::RECORD_OVERHEAD
        );
        announce(Tag(tag))?;
        let p = log_path(&self.path);
        if self.log.end == 0 {
            // A log that does not continue this checkpoint (a stale one, left by a crash after
            // a checkpoint) is removed, never overwritten in place: its complete records after
            // the new one would fail the chain and make the state unreadable (to a reader in
            // between, or after a crash that kept the writes but not the truncation).
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&p, e)),
            }
        }
        // The log a look under the lock found current is written through as it was opened.
        let (f, created, len) = match open.filter(|_| self.log.end > 0) {
            Some(o) => (o.file, false, Some(o.len)),
            None => {
                let (f, created) = open_log_rw(&p)?;
                (f, created, None)
            }
        };
        if self.log.end == 0 && !created {
            return Err(Error::Other(format!(
                "{}: created by another writer while the fspf was locked",
                p.display()
            )));
        }
        if created {
            // The log is readable by whoever may read the fspf (a run's processes that change
            // uid; regression `a_commit_made_the_fspf_0600_and_locked_out_the_other_users`).
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::symlink_metadata(&self.path)
                .map_or(0o600, |m| m.permissions().mode() & 0o666);
            if mode != 0o600 {
                f.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(|e| Error::io(&p, e))?;
            }
        }
        let (at, bytes) = if created {
            let mut b = framing::header(&base).to_vec();
            b.extend_from_slice(&record);
            (0, b)
        } else {
            (self.log.end, record)
        };
        let new_end = at + bytes.len() as u64;
        // The record goes over zeros preallocated in LOG_PREALLOC steps: the file's length (an
        // inode write at every fdatasync) changes once per step, not at every commit. Nothing
        // is truncated: past the new record lie zeros or a torn record, which readers skip.
        let res = len
            .map_or_else(|| f.metadata().map(|m| m.len()), Ok)
            .and_then(|len| {
                if len < new_end {
                    let target = new_end.div_ceil(LOG_PREALLOC) * LOG_PREALLOC;
                    let zeros = vec![0u8; usize::try_from(target - len).unwrap_or(0)];
                    f.write_all_at(&zeros, len)?;
                }
                f.write_all_at(&bytes, at)?;
                f.sync_data()
            });
        if let Err(e) = res {
            // Best effort: no half-written or unsynced record stays visible as the state.
            let _ = f.set_len(if created { 0 } else { self.log.end });
            return Err(Error::io(&p, e));
        }
        if created {
            super::store::sync_dir(&p)?;
        }
        self.tag = Tag(tag);
        self.log.end = new_end;
        self.log.journal_bytes += jlen;
        if created {
            self.log.log_version = 5;
        }
        Ok(())
    }
}

/// Bytes of journals and small files the records of one log may carry before the next commit
/// writes a checkpoint (which makes their files durable first): twice the entries'
/// [`log_limit`], at least 256 KiB. Every process that opens the volume reads and checks the whole log, and
/// decrypts the records after its index: journals make the log longer, this bounds by how
/// much (a 1 MiB budget cost a shielded `echo >> F` about a millisecond of hashing).
pub fn log_journals_limit(checkpoint_len: u64) -> u64 {
    2 * log_limit(checkpoint_len)
}

/// Largest record a volume over a frozen index opens again to learn the journals of the state
/// it starts from ([`Volume::catch_up_to`]).
const REOPEN_MAX: usize = 256 << 10;

/// Step in which the log file is extended with zeros ahead of its records (FORMAT.md §5c).
const LOG_PREALLOC: u64 = 64 << 10;

/// Open (create) the log for writing: never through a symlink, only a regular file. Returns
/// whether it was created.
fn open_log_rw(p: &Path) -> Result<(File, bool)> {
    match kernel_fs::open_rw_path(p, true) {
        Ok(f) => Ok((f, true)),
        Err(kernel_fs::OpenError::Io(e)) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let f = kernel_fs::open_rw_path(p, false).map_err(|e| open_error(p, e))?;
            Ok((f, false))
        }
        Err(e) => Err(open_error(p, e)),
    }
}

//! The table of directory streams the shield serves (`DIR*` of protected directories), below
//! the hooks: the directory hooks fill and read it; `fork` holds its lock across the call.
use fspf_core::EmbedPath;
use libc::c_int;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;

/// One open directory stream: its entries (name, `d_type`) and the position of `readdir`.
pub(crate) struct DirStream {
    pub fd: c_int,
    pub path: EmbedPath,
    pub entries: Vec<(Vec<u8>, u8)>,
    pub pos: usize,
    pub ent: libc::dirent64,
}

static STREAMS: Mutex<BTreeMap<usize, Box<DirStream>>> = Mutex::new(BTreeMap::new());
pub(crate) static N_STREAMS: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn streams() -> std::sync::MutexGuard<'static, BTreeMap<usize, Box<DirStream>>> {
    STREAMS.lock().unwrap_or_else(|e| e.into_inner())
}

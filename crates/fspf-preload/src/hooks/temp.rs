//! Temporary files: glibc's mkstemp family and tmpfile create files with internal calls, which
//! would put plaintext into the kernel directory of a protected region (unlisted, so not even
//! readable back). In shielded regions they are created through the shield.
use super::{fail, fail_ptr};
use crate::files;
use crate::opening::{release, shield_open};
use crate::shield::{self, Route};
use crate::stdio::cookie_file;
use crate::{enter, real};
use libc::{c_char, c_int, FILE};
use std::ffi::CStr;

const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

fn fill_random(x: &mut [u8]) {
    let mut r = vec![0u8; x.len()];
    // SAFETY: getrandom into our own buffer.
    unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) };
    for (c, b) in x.iter_mut().zip(r) {
        *c = LETTERS[b as usize % LETTERS.len()];
    }
}

/// The six `X`s before `suffix_len` trailing bytes of `t`, or EINVAL.
fn x_range(t: &[u8], suffix_len: usize) -> Result<std::ops::Range<usize>, c_int> {
    let end = t.len().checked_sub(suffix_len).ok_or(libc::EINVAL)?;
    let start = end.checked_sub(6).ok_or(libc::EINVAL)?;
    if &t[start..end] != b"XXXXXX" {
        return Err(libc::EINVAL);
    }
    Ok(start..end)
}

/// mkstemp family: `Some(result)` when the template is in a shielded region.
unsafe fn shield_mkstemp(
    t: *mut c_char,
    suffix: c_int,
    flags: c_int,
    dir: bool,
) -> Option<Result<c_int, c_int>> {
    if t.is_null() {
        return None;
    }
    let sh = shield::get();
    let ep = match sh.route(libc::AT_FDCWD, t) {
        Route::Shield(ep) => ep,
        Route::Deny(e) => return Some(Err(e)),
        _ => return None,
    };
    // SAFETY: the program's NUL-terminated, writable template.
    let len = unsafe { CStr::from_ptr(t) }.to_bytes().len();
    // SAFETY: as above; we only rewrite the XXXXXX bytes in place.
    let bytes = unsafe { std::slice::from_raw_parts_mut(t.cast::<u8>(), len) };
    let range = match x_range(bytes, suffix.max(0) as usize) {
        Ok(r) => r,
        Err(e) => return Some(Err(e)),
    };
    let _ = ep;
    for _ in 0..100 {
        fill_random(&mut bytes[range.clone()]);
        let Route::Shield(ep) = sh.route(libc::AT_FDCWD, t) else {
            return Some(Err(libc::EXDEV));
        };
        let r = if dir {
            crate::namespace::do_mkdir(sh, ep, 0o700).map(|()| 0)
        } else {
            shield_open(
                sh,
                ep,
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | flags,
                0o600,
            )
        };
        match r {
            Err(libc::EEXIST) => continue,
            r => return Some(r),
        }
    }
    Some(Err(libc::EEXIST))
}

macro_rules! mkstemp_hook {
    ($name:ident ( $($a:ident : $t:ty),* ) => suffix $s:expr, flags $f:expr) => {
        #[no_mangle]
        pub unsafe extern "C" fn $name(t: *mut c_char $(, $a: $t)*) -> c_int {
            if let Some(_g) = enter() {
                // SAFETY: the program's template.
                if let Some(r) = unsafe { shield_mkstemp(t, $s, $f, false) } {
                    return r.unwrap_or_else(fail);
                }
            }
            // SAFETY: the caller's template and arguments, unchanged, to glibc's own function of
            // this name (resolved with RTLD_NEXT), whose contract is this function's contract.
            unsafe { real::$name(t $(, $a)*) }
        }
    };
}

mkstemp_hook!(mkstemp() => suffix 0, flags 0);
mkstemp_hook!(mkstemp64() => suffix 0, flags 0);
mkstemp_hook!(mkostemp(f: c_int) => suffix 0, flags f);
mkstemp_hook!(mkostemp64(f: c_int) => suffix 0, flags f);
mkstemp_hook!(mkstemps(s: c_int) => suffix s, flags 0);
mkstemp_hook!(mkstemps64(s: c_int) => suffix s, flags 0);
mkstemp_hook!(mkostemps(s: c_int, f: c_int) => suffix s, flags f);
mkstemp_hook!(mkostemps64(s: c_int, f: c_int) => suffix s, flags f);

#[no_mangle]
pub unsafe extern "C" fn mkdtemp(t: *mut c_char) -> *mut c_char {
    if let Some(_g) = enter() {
        // SAFETY: the program's template.
        match unsafe { shield_mkstemp(t, 0, 0, true) } {
            Some(Ok(_)) => return t,
            Some(Err(e)) => return fail_ptr(e),
            None => {}
        }
    }
    // SAFETY: the caller's arguments, unchanged, to glibc's own `mkdtemp` (resolved
    // with RTLD_NEXT): the caller's contract for this call is that function's contract.
    unsafe { real::mkdtemp(t) }
}

/// tmpfile: an unnamed file in `/tmp`; when `/tmp` is shielded, a shielded file that is
/// unlinked at once (it lives on in the process until closed, never on disk).
unsafe fn tmpfile_common(real_call: impl Fn() -> *mut FILE) -> *mut FILE {
    let Some(_g) = enter() else {
        return real_call();
    };
    let mut t = *b"/tmp/tmpfXXXXXX\0";
    // SAFETY: our own template.
    let fd = match unsafe { shield_mkstemp(t.as_mut_ptr().cast(), 0, libc::O_CLOEXEC, false) } {
        None => return real_call(),
        Some(Ok(fd)) => fd,
        Some(Err(e)) => return fail_ptr(e),
    };
    // The buffer stays with the fd; the name goes away.
    let sh = shield::get();
    if let Route::Shield(ep) = sh.route(libc::AT_FDCWD, t.as_ptr().cast()) {
        let _ = crate::namespace::do_unlink(sh, ep, false);
    }
    // SAFETY: fd is our shielded fd; the stream owns it.
    let f = unsafe { cookie_file(fd, c"w+".as_ptr()) };
    if f.is_null() {
        if let Some(h) = files::remove(fd) {
            let _ = release(h);
        }
    }
    f
}

#[no_mangle]
pub unsafe extern "C" fn tmpfile() -> *mut FILE {
    // SAFETY: `tmpfile_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { tmpfile_common(|| real::tmpfile()) }
}
#[no_mangle]
pub unsafe extern "C" fn tmpfile64() -> *mut FILE {
    // SAFETY: `tmpfile_common` has this function's contract and gets the caller's pointers
    // unchanged (other arguments are constants or values we made valid).
    unsafe { tmpfile_common(|| real::tmpfile64()) }
}

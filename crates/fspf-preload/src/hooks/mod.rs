//! The exported libc hooks, grouped by family. Each hook first checks [`crate::enter`] (shield
//! active, not re-entered) and otherwise calls the real function unchanged.
pub mod dir;
pub mod io;
pub mod legacy;
pub mod meta;
pub mod ns;
pub mod open;
pub mod process;
pub mod stat;
pub mod temp;

use crate::shield::{self, Route, Shield};
pub(crate) use crate::{fail, fail_isize, fail_ptr};
use fspf_core::EmbedPath;
use libc::{c_char, c_int};

/// The shape shared by path calls that return an int: outside the shield, or for paths that
/// pass through, call `real(dirfd, path)`; in a not-protected region with another kernel path,
/// call it on that path; refuse denied paths; otherwise `shielded` serves the embed path.
///
/// # Safety
/// `path` must be what the program passed to the hook (a C string, or null).
pub(crate) unsafe fn by_route(
    dirfd: c_int,
    path: *const c_char,
    real: impl Fn(c_int, *const c_char) -> c_int,
    shielded: impl FnOnce(&'static Shield, EmbedPath) -> c_int,
) -> c_int {
    // SAFETY: this function's contract.
    unsafe { by_route_as(false, dirfd, path, real, shielded) }
}

/// [`by_route`] of a name: a hard link is not replaced by its target ([`Shield::route_name`]).
///
/// # Safety
/// `path` must be what the program passed to the hook (a C string, or null).
pub(crate) unsafe fn by_route_as(
    name: bool,
    dirfd: c_int,
    path: *const c_char,
    real: impl Fn(c_int, *const c_char) -> c_int,
    shielded: impl FnOnce(&'static Shield, EmbedPath) -> c_int,
) -> c_int {
    let Some(g) = crate::enter() else {
        return real(dirfd, path);
    };
    let sh = shield::get();
    let route = match name {
        true => sh.route_name(dirfd, path),
        false => sh.route(dirfd, path),
    };
    match route {
        Route::Pass => {
            drop(g);
            real(dirfd, path)
        }
        Route::Kernel(k, _) => real(libc::AT_FDCWD, k.as_ptr()),
        Route::Deny(e) => fail(e),
        Route::Shield(ep) => {
            let denied = crate::perm::check_search(sh, &sh.lock(), &ep).err();
            match denied {
                Some(e) => fail(e),
                None => shielded(sh, ep),
            }
        }
    }
}

/// Map an `Ok(int)`/`Err(errno)` to the C convention.
pub(crate) fn ret(r: Result<c_int, c_int>) -> c_int {
    r.unwrap_or_else(fail)
}

//! The exported libc hooks, grouped by family. Each hook first checks [`crate::enter`] (shield
//! active, not re-entered) and otherwise calls the real function unchanged.
pub mod dir;
pub mod io;
pub mod ns;
pub mod open;
pub mod process;
pub mod stat;
pub mod temp;

use crate::set_errno;
use libc::c_int;

/// Return -1 with `errno = e`.
pub(crate) fn fail(e: c_int) -> c_int {
    set_errno(e);
    -1
}

pub(crate) fn fail_isize(e: c_int) -> isize {
    set_errno(e);
    -1
}

pub(crate) fn fail_ptr<T>(e: c_int) -> *mut T {
    set_errno(e);
    std::ptr::null_mut()
}

/// Map an `Ok(int)`/`Err(errno)` to the C convention.
pub(crate) fn ret(r: Result<c_int, c_int>) -> c_int {
    r.unwrap_or_else(fail)
}

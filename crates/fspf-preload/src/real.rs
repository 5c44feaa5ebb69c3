//! The next definition of each hooked libc symbol (glibc's), resolved once with dlsym(RTLD_NEXT).
//! A missing symbol makes the call fail with ENOSYS instead of crashing.
#![allow(clippy::too_many_arguments, dead_code)]
use libc::{c_char, c_int, c_long, c_uint, c_ulong, c_void, mode_t, off_t, size_t, ssize_t, FILE};

pub trait Fail {
    fn fail() -> Self;
}
impl Fail for c_int {
    fn fail() -> Self {
        -1
    }
}
impl Fail for isize {
    fn fail() -> Self {
        -1
    }
}
impl Fail for i64 {
    fn fail() -> Self {
        -1
    }
}
/// `umask` cannot fail; a missing symbol reports the conventional default.
impl Fail for mode_t {
    fn fail() -> Self {
        0o022
    }
}
impl<T> Fail for *mut T {
    fn fail() -> Self {
        std::ptr::null_mut()
    }
}

macro_rules! reals {
    ($( fn $name:ident($($a:ident : $t:ty),*) -> $r:ty ;)*) => {
        $(
        pub unsafe fn $name($($a: $t),*) -> $r {
            use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
            static P: AtomicUsize = AtomicUsize::new(0);
            let mut p = P.load(Relaxed);
            if p == 0 {
                // SAFETY: dlsym with a NUL-terminated literal; RTLD_NEXT skips this library.
                p = unsafe { libc::dlsym(libc::RTLD_NEXT, concat!(stringify!($name), "\0").as_ptr().cast()) } as usize;
                P.store(p, Relaxed);
            }
            if p == 0 {
                crate::set_errno(libc::ENOSYS);
                return <$r as Fail>::fail();
            }
            // SAFETY: glibc's symbol of this name has exactly this C signature on x86_64.
            let f: unsafe extern "C" fn($($t),*) -> $r = unsafe { std::mem::transmute(p) };
            // SAFETY: the caller passes the arguments it was given by the program.
            unsafe { f($($a),*) }
        }
        )*
    };
}

reals! {
    fn open(p: *const c_char, f: c_int, m: mode_t) -> c_int;
    fn open64(p: *const c_char, f: c_int, m: mode_t) -> c_int;
    fn openat(d: c_int, p: *const c_char, f: c_int, m: mode_t) -> c_int;
    fn openat64(d: c_int, p: *const c_char, f: c_int, m: mode_t) -> c_int;
    fn creat(p: *const c_char, m: mode_t) -> c_int;
    fn creat64(p: *const c_char, m: mode_t) -> c_int;
    fn __open_2(p: *const c_char, f: c_int) -> c_int;
    fn __open64_2(p: *const c_char, f: c_int) -> c_int;
    fn __openat_2(d: c_int, p: *const c_char, f: c_int) -> c_int;
    fn __openat64_2(d: c_int, p: *const c_char, f: c_int) -> c_int;
    fn fopen(p: *const c_char, m: *const c_char) -> *mut FILE;
    fn fopen64(p: *const c_char, m: *const c_char) -> *mut FILE;
    fn freopen(p: *const c_char, m: *const c_char, s: *mut FILE) -> *mut FILE;
    fn freopen64(p: *const c_char, m: *const c_char, s: *mut FILE) -> *mut FILE;
    fn fdopen(fd: c_int, m: *const c_char) -> *mut FILE;
    fn read(fd: c_int, b: *mut c_void, n: size_t) -> ssize_t;
    fn __read_chk(fd: c_int, b: *mut c_void, n: size_t, bl: size_t) -> ssize_t;
    fn pread(fd: c_int, b: *mut c_void, n: size_t, o: off_t) -> ssize_t;
    fn pread64(fd: c_int, b: *mut c_void, n: size_t, o: off_t) -> ssize_t;
    fn readv(fd: c_int, v: *const libc::iovec, n: c_int) -> ssize_t;
    fn preadv(fd: c_int, v: *const libc::iovec, n: c_int, o: off_t) -> ssize_t;
    fn preadv64(fd: c_int, v: *const libc::iovec, n: c_int, o: off_t) -> ssize_t;
    fn write(fd: c_int, b: *const c_void, n: size_t) -> ssize_t;
    fn pwrite(fd: c_int, b: *const c_void, n: size_t, o: off_t) -> ssize_t;
    fn pwrite64(fd: c_int, b: *const c_void, n: size_t, o: off_t) -> ssize_t;
    fn writev(fd: c_int, v: *const libc::iovec, n: c_int) -> ssize_t;
    fn pwritev(fd: c_int, v: *const libc::iovec, n: c_int, o: off_t) -> ssize_t;
    fn pwritev64(fd: c_int, v: *const libc::iovec, n: c_int, o: off_t) -> ssize_t;
    fn lseek(fd: c_int, o: off_t, w: c_int) -> off_t;
    fn lseek64(fd: c_int, o: off_t, w: c_int) -> off_t;
    fn close(fd: c_int) -> c_int;
    fn close_range(a: c_uint, b: c_uint, f: c_int) -> c_int;
    fn dup(fd: c_int) -> c_int;
    fn dup2(a: c_int, b: c_int) -> c_int;
    fn dup3(a: c_int, b: c_int, f: c_int) -> c_int;
    fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int;
    fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int;
    fn flock(fd: c_int, op: c_int) -> c_int;
    fn lockf(fd: c_int, cmd: c_int, len: off_t) -> c_int;
    fn ioctl(fd: c_int, req: c_ulong, arg: c_ulong) -> c_int;
    fn ftruncate(fd: c_int, l: off_t) -> c_int;
    fn ftruncate64(fd: c_int, l: off_t) -> c_int;
    fn truncate(p: *const c_char, l: off_t) -> c_int;
    fn truncate64(p: *const c_char, l: off_t) -> c_int;
    fn fallocate(fd: c_int, m: c_int, o: off_t, l: off_t) -> c_int;
    fn fallocate64(fd: c_int, m: c_int, o: off_t, l: off_t) -> c_int;
    fn posix_fallocate(fd: c_int, o: off_t, l: off_t) -> c_int;
    fn posix_fallocate64(fd: c_int, o: off_t, l: off_t) -> c_int;
    fn fsync(fd: c_int) -> c_int;
    fn fdatasync(fd: c_int) -> c_int;
    fn syncfs(fd: c_int) -> c_int;
    fn stat(p: *const c_char, s: *mut libc::stat) -> c_int;
    fn stat64(p: *const c_char, s: *mut libc::stat) -> c_int;
    fn lstat(p: *const c_char, s: *mut libc::stat) -> c_int;
    fn lstat64(p: *const c_char, s: *mut libc::stat) -> c_int;
    fn fstat(fd: c_int, s: *mut libc::stat) -> c_int;
    fn fstat64(fd: c_int, s: *mut libc::stat) -> c_int;
    fn fstatat(d: c_int, p: *const c_char, s: *mut libc::stat, f: c_int) -> c_int;
    fn fstatat64(d: c_int, p: *const c_char, s: *mut libc::stat, f: c_int) -> c_int;
    fn statx(d: c_int, p: *const c_char, f: c_int, m: c_uint, s: *mut libc::statx) -> c_int;
    fn access(p: *const c_char, m: c_int) -> c_int;
    fn faccessat(d: c_int, p: *const c_char, m: c_int, f: c_int) -> c_int;
    fn euidaccess(p: *const c_char, m: c_int) -> c_int;
    fn rename(a: *const c_char, b: *const c_char) -> c_int;
    fn renameat(da: c_int, a: *const c_char, db: c_int, b: *const c_char) -> c_int;
    fn renameat2(da: c_int, a: *const c_char, db: c_int, b: *const c_char, f: c_uint) -> c_int;
    fn unlink(p: *const c_char) -> c_int;
    fn unlinkat(d: c_int, p: *const c_char, f: c_int) -> c_int;
    fn remove(p: *const c_char) -> c_int;
    fn mkdir(p: *const c_char, m: mode_t) -> c_int;
    fn mkdirat(d: c_int, p: *const c_char, m: mode_t) -> c_int;
    fn rmdir(p: *const c_char) -> c_int;
    fn chdir(p: *const c_char) -> c_int;
    fn fchdir(fd: c_int) -> c_int;
    fn getcwd(b: *mut c_char, n: size_t) -> *mut c_char;
    fn readlink(p: *const c_char, b: *mut c_char, n: size_t) -> ssize_t;
    fn readlinkat(d: c_int, p: *const c_char, b: *mut c_char, n: size_t) -> ssize_t;
    fn realpath(p: *const c_char, r: *mut c_char) -> *mut c_char;
    fn chmod(p: *const c_char, m: mode_t) -> c_int;
    fn fchmod(fd: c_int, m: mode_t) -> c_int;
    fn fchmodat(d: c_int, p: *const c_char, m: mode_t, f: c_int) -> c_int;
    fn utimensat(d: c_int, p: *const c_char, t: *const libc::timespec, f: c_int) -> c_int;
    fn futimens(fd: c_int, t: *const libc::timespec) -> c_int;
    fn getxattr(p: *const c_char, n: *const c_char, v: *mut c_void, s: size_t) -> ssize_t;
    fn lgetxattr(p: *const c_char, n: *const c_char, v: *mut c_void, s: size_t) -> ssize_t;
    fn fgetxattr(fd: c_int, n: *const c_char, v: *mut c_void, s: size_t) -> ssize_t;
    fn listxattr(p: *const c_char, l: *mut c_char, s: size_t) -> ssize_t;
    fn llistxattr(p: *const c_char, l: *mut c_char, s: size_t) -> ssize_t;
    fn flistxattr(fd: c_int, l: *mut c_char, s: size_t) -> ssize_t;
    fn opendir(p: *const c_char) -> *mut libc::DIR;
    fn fdopendir(fd: c_int) -> *mut libc::DIR;
    fn readdir(d: *mut libc::DIR) -> *mut libc::dirent64;
    fn readdir64(d: *mut libc::DIR) -> *mut libc::dirent64;
    fn closedir(d: *mut libc::DIR) -> c_int;
    fn dirfd(d: *mut libc::DIR) -> c_int;
    fn rewinddir(d: *mut libc::DIR) -> ();
    fn telldir(d: *mut libc::DIR) -> c_long;
    fn seekdir(d: *mut libc::DIR, p: c_long) -> ();
    fn sendfile(o: c_int, i: c_int, off: *mut off_t, n: size_t) -> ssize_t;
    fn sendfile64(o: c_int, i: c_int, off: *mut off_t, n: size_t) -> ssize_t;
    fn copy_file_range(i: c_int, io: *mut off_t, o: c_int, oo: *mut off_t, n: size_t, f: c_uint) -> ssize_t;
    fn splice(i: c_int, io: *mut off_t, o: c_int, oo: *mut off_t, n: size_t, f: c_uint) -> ssize_t;
    fn mmap(a: *mut c_void, l: size_t, p: c_int, f: c_int, fd: c_int, o: off_t) -> *mut c_void;
    fn mmap64(a: *mut c_void, l: size_t, p: c_int, f: c_int, fd: c_int, o: off_t) -> *mut c_void;
    fn posix_fadvise(fd: c_int, o: off_t, l: off_t, a: c_int) -> c_int;
    fn posix_fadvise64(fd: c_int, o: off_t, l: off_t, a: c_int) -> c_int;
    fn fork() -> c_int;
    fn execve(p: *const c_char, a: *const *const c_char, e: *const *const c_char) -> c_int;
    fn execvpe(p: *const c_char, a: *const *const c_char, e: *const *const c_char) -> c_int;
    fn posix_spawn(pid: *mut libc::pid_t, p: *const c_char, fa: *const c_void, at: *const c_void, a: *const *mut c_char, e: *const *mut c_char) -> c_int;
    fn posix_spawnp(pid: *mut libc::pid_t, p: *const c_char, fa: *const c_void, at: *const c_void, a: *const *mut c_char, e: *const *mut c_char) -> c_int;
    fn system(c: *const c_char) -> c_int;
    fn popen(c: *const c_char, m: *const c_char) -> *mut FILE;
}
impl Fail for () {
    fn fail() -> Self {}
}
reals! {
    fn link(a: *const c_char, b: *const c_char) -> c_int;
    fn linkat(da: c_int, a: *const c_char, db: c_int, b: *const c_char, f: c_int) -> c_int;
    fn symlink(t: *const c_char, p: *const c_char) -> c_int;
    fn symlinkat(t: *const c_char, d: c_int, p: *const c_char) -> c_int;
}
pub type DirFilter = Option<unsafe extern "C" fn(*const libc::dirent64) -> c_int>;
pub type DirCompar =
    Option<unsafe extern "C" fn(*mut *const libc::dirent64, *mut *const libc::dirent64) -> c_int>;
reals! {
    fn scandir(d: *const c_char, nl: *mut *mut *mut libc::dirent64, f: DirFilter, c: DirCompar) -> c_int;
    fn scandir64(d: *const c_char, nl: *mut *mut *mut libc::dirent64, f: DirFilter, c: DirCompar) -> c_int;
    fn scandirat(fd: c_int, d: *const c_char, nl: *mut *mut *mut libc::dirent64, f: DirFilter, c: DirCompar) -> c_int;
    fn glob(p: *const c_char, f: c_int, e: *mut c_void, g: *mut c_void) -> c_int;
    fn glob64(p: *const c_char, f: c_int, e: *mut c_void, g: *mut c_void) -> c_int;
}
reals! {
    fn mkstemp(t: *mut c_char) -> c_int;
    fn mkstemp64(t: *mut c_char) -> c_int;
    fn mkostemp(t: *mut c_char, f: c_int) -> c_int;
    fn mkostemp64(t: *mut c_char, f: c_int) -> c_int;
    fn mkstemps(t: *mut c_char, s: c_int) -> c_int;
    fn mkstemps64(t: *mut c_char, s: c_int) -> c_int;
    fn mkostemps(t: *mut c_char, s: c_int, f: c_int) -> c_int;
    fn mkostemps64(t: *mut c_char, s: c_int, f: c_int) -> c_int;
    fn mkdtemp(t: *mut c_char) -> *mut c_char;
    fn tmpfile() -> *mut FILE;
    fn tmpfile64() -> *mut FILE;
}
reals! {
    fn statfs(p: *const c_char, b: *mut libc::statfs) -> c_int;
    fn statfs64(p: *const c_char, b: *mut libc::statfs) -> c_int;
    fn statvfs(p: *const c_char, b: *mut libc::statvfs) -> c_int;
    fn statvfs64(p: *const c_char, b: *mut libc::statvfs) -> c_int;
}
reals! {
    fn _exit(s: c_int) -> ();
    fn umask(m: mode_t) -> mode_t;
    fn pathconf(p: *const c_char, n: c_int) -> c_long;
    fn execveat(d: c_int, p: *const c_char, a: *const *const c_char, e: *const *const c_char, f: c_int) -> c_int;
}
reals! {
    fn chown(p: *const c_char, u: libc::uid_t, g: libc::gid_t) -> c_int;
    fn lchown(p: *const c_char, u: libc::uid_t, g: libc::gid_t) -> c_int;
    fn fchown(fd: c_int, u: libc::uid_t, g: libc::gid_t) -> c_int;
    fn fchownat(d: c_int, p: *const c_char, u: libc::uid_t, g: libc::gid_t, f: c_int) -> c_int;
    fn setxattr(p: *const c_char, n: *const c_char, v: *const c_void, s: size_t, f: c_int) -> c_int;
    fn lsetxattr(p: *const c_char, n: *const c_char, v: *const c_void, s: size_t, f: c_int) -> c_int;
    fn fsetxattr(fd: c_int, n: *const c_char, v: *const c_void, s: size_t, f: c_int) -> c_int;
    fn removexattr(p: *const c_char, n: *const c_char) -> c_int;
    fn lremovexattr(p: *const c_char, n: *const c_char) -> c_int;
    fn fremovexattr(fd: c_int, n: *const c_char) -> c_int;
    fn mkfifo(p: *const c_char, m: mode_t) -> c_int;
    fn mkfifoat(d: c_int, p: *const c_char, m: mode_t) -> c_int;
    fn mknod(p: *const c_char, m: mode_t, dev: libc::dev_t) -> c_int;
    fn mknodat(d: c_int, p: *const c_char, m: mode_t, dev: libc::dev_t) -> c_int;
    fn bind(fd: c_int, a: *const libc::sockaddr, l: libc::socklen_t) -> c_int;
}

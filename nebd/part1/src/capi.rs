//! The C ABI of libnebd (header: `include/libnebd.h`), in the shape of Curve's libnebd:
//! `nebd_lib_init`, `nebd_lib_open`, `nebd_lib_pread`, `nebd_lib_aio_pwrite`, ...
//! Every call returns 0 (or a count, an fd, a size) on success and `-errno` on failure.

use std::ffi::{CStr, c_char, c_int, c_void};

use parking_lot::Mutex;

use crate::{Nebd, NebdError, Options};

static CLIENT: Mutex<Option<Nebd>> = Mutex::new(None);

fn client() -> Result<Nebd, c_int> {
    CLIENT.lock().clone().ok_or(-libc::ENOTCONN)
}

fn fd_of(fd: c_int) -> Result<u32, c_int> {
    u32::try_from(fd).map_err(|_| -libc::EBADF)
}

/// The client and a valid fd, or the -errno to return.
fn client_fd(fd: c_int) -> Result<(Nebd, u32), c_int> {
    Ok((client()?, fd_of(fd)?))
}

fn neg(e: &NebdError) -> c_int {
    -e.errno()
}

/// Asynchronous operation kinds (`LIBAIO_OP` in the header).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibAioOp {
    /// Read.
    Read = 0,
    /// Write.
    Write = 1,
    /// Discard.
    Discard = 2,
    /// Flush.
    Flush = 3,
}

/// Completion callback.
pub type LibAioCallBack = extern "C" fn(*mut NebdClientAioContext);

/// An asynchronous request, owned by the caller until its callback runs.
#[repr(C)]
#[derive(Debug)]
pub struct NebdClientAioContext {
    /// Offset in the volume.
    pub offset: libc::off_t,
    /// Length in bytes.
    pub length: libc::size_t,
    /// Set before the callback: 0 or -errno.
    pub ret: c_int,
    /// Operation.
    pub op: LibAioOp,
    /// Called once, on a library thread, when the request completes.
    pub cb: LibAioCallBack,
    /// Data buffer of `length` bytes (read into / written from).
    pub buf: *mut c_void,
    /// Unused; kept for layout compatibility with Curve's header.
    pub retry_count: libc::c_uint,
}

/// A context pointer handed to the completion thread.
struct Ctx(*mut NebdClientAioContext);
// SAFETY: the caller guarantees the context and its buffer stay valid and untouched until the
// callback runs; only the completion thread uses the pointer, once.
unsafe impl Send for Ctx {}

impl Ctx {
    fn finish(self, ret: c_int, data: Option<&[u8]>) {
        // SAFETY: valid until the callback returns (the caller's contract), used by one thread.
        let ctx = unsafe { &mut *self.0 };
        if let Some(d) = data {
            let n = d.len().min(ctx.length);
            // SAFETY: buf holds `length` writable bytes (the caller's contract).
            unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), ctx.buf.cast::<u8>(), n) };
        }
        ctx.ret = ret;
        (ctx.cb)(self.0);
    }
}

/// Starts the library against part2's socket (`<run-dir>/nebd.sock`).
///
/// # Safety
/// `socket_path` must be a valid NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nebd_lib_init(socket_path: *const c_char) -> c_int {
    if socket_path.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: non-null and NUL-terminated (the caller's contract).
    let path = unsafe { CStr::from_ptr(socket_path) };
    let Ok(path) = path.to_str() else {
        return -libc::EINVAL;
    };
    let mut c = CLIENT.lock();
    if c.is_none() {
        *c = Some(Nebd::new(Options::new(path)));
    }
    0
}

/// Stops the library; pending requests complete with -ESHUTDOWN.
#[unsafe(no_mangle)]
pub extern "C" fn nebd_lib_uninit() {
    let c = CLIENT.lock().take();
    drop(c);
}

/// Opens a volume (e.g. `file:/path`); returns an fd or -errno.
///
/// # Safety
/// `filename` must be a valid NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nebd_lib_open(filename: *const c_char) -> c_int {
    if filename.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: non-null and NUL-terminated (the caller's contract).
    let Ok(name) = unsafe { CStr::from_ptr(filename) }.to_str() else {
        return -libc::EINVAL;
    };
    match client().map(|c| c.open(name)) {
        Ok(Ok(info)) => info.fd as c_int,
        Ok(Err(e)) => neg(&e),
        Err(e) => e,
    }
}

/// Closes an fd.
#[unsafe(no_mangle)]
pub extern "C" fn nebd_lib_close(fd: c_int) -> c_int {
    match client_fd(fd) {
        Ok((c, fd)) => c.close(fd).map_or_else(|e| neg(&e), |()| 0),
        Err(e) => e,
    }
}

/// Reads `length` bytes at `offset`; returns `length` or -errno.
///
/// # Safety
/// `buf` must be valid for `length` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nebd_lib_pread(
    fd: c_int,
    buf: *mut c_void,
    offset: libc::off_t,
    length: libc::size_t,
) -> libc::ssize_t {
    let (c, fd) = match client_fd(fd) {
        Ok((c, fd)) => (c, fd),
        Err(e) => return e as libc::ssize_t,
    };
    if buf.is_null() || offset < 0 {
        return -libc::EINVAL as libc::ssize_t;
    }
    // SAFETY: valid for `length` bytes (the caller's contract).
    let b = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), length) };
    match c.pread(fd, b, offset as u64) {
        Ok(()) => length as libc::ssize_t,
        Err(e) => neg(&e) as libc::ssize_t,
    }
}

/// Writes `length` bytes at `offset`; returns `length` or -errno.
///
/// # Safety
/// `buf` must be valid for `length` bytes of reads.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nebd_lib_pwrite(
    fd: c_int,
    buf: *const c_void,
    offset: libc::off_t,
    length: libc::size_t,
) -> libc::ssize_t {
    let (c, fd) = match client_fd(fd) {
        Ok((c, fd)) => (c, fd),
        Err(e) => return e as libc::ssize_t,
    };
    if buf.is_null() || offset < 0 {
        return -libc::EINVAL as libc::ssize_t;
    }
    // SAFETY: valid for `length` bytes (the caller's contract).
    let b = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), length) };
    match c.pwrite(fd, b, offset as u64, false) {
        Ok(()) => length as libc::ssize_t,
        Err(e) => neg(&e) as libc::ssize_t,
    }
}

fn aio(fd: c_int, ctx: *mut NebdClientAioContext, op: LibAioOp) -> c_int {
    let (c, fd) = match client_fd(fd) {
        Ok((c, fd)) => (c, fd),
        Err(e) => return e,
    };
    if ctx.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: non-null and valid until its callback (the caller's contract).
    let (offset, length, buf) = unsafe { ((*ctx).offset, (*ctx).length, (*ctx).buf) };
    if offset < 0 || (buf.is_null() && matches!(op, LibAioOp::Read | LibAioOp::Write)) {
        return -libc::EINVAL;
    }
    // SAFETY: as above; op is written before the request is submitted.
    unsafe { (*ctx).op = op };
    let ctx = Ctx(ctx);
    let unit = |ctx: Ctx| {
        move |r: Result<(), NebdError>| ctx.finish(r.map_or_else(|e| neg(&e), |()| 0), None)
    };
    match op {
        LibAioOp::Read => c.aio_read(fd, offset as u64, length, move |r| match r {
            Ok(data) if data.len() == length => ctx.finish(0, Some(&data)),
            Ok(_) => ctx.finish(-libc::EIO, None),
            Err(e) => ctx.finish(neg(&e), None),
        }),
        LibAioOp::Write => {
            // SAFETY: buf is valid for `length` bytes of reads (the caller's contract); the
            // bytes are copied into the request before this returns.
            let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), length) };
            c.aio_write(fd, offset as u64, data, false, unit(ctx));
        }
        LibAioOp::Discard => c.aio_discard(fd, offset as u64, length as u64, unit(ctx)),
        LibAioOp::Flush => c.aio_flush(fd, unit(ctx)),
    }
    0
}

/// Starts an asynchronous read into `context->buf`.
#[unsafe(no_mangle)]
pub extern "C" fn nebd_lib_aio_pread(fd: c_int, context: *mut NebdClientAioContext) -> c_int {
    aio(fd, context, LibAioOp::Read)
}

/// Starts an asynchronous write of `context->buf`.
#[unsafe(no_mangle)]
pub extern "C" fn nebd_lib_aio_pwrite(fd: c_int, context: *mut NebdClientAioContext) -> c_int {
    aio(fd, context, LibAioOp::Write)
}

/// Starts an asynchronous discard of `context->offset`, `context->length`.
#[unsafe(no_mangle)]
pub extern "C" fn nebd_lib_discard(fd: c_int, context: *mut NebdClientAioContext) -> c_int {
    aio(fd, context, LibAioOp::Discard)
}

/// Starts an asynchronous flush.
#[unsafe(no_mangle)]
pub extern "C" fn nebd_lib_flush(fd: c_int, context: *mut NebdClientAioContext) -> c_int {
    aio(fd, context, LibAioOp::Flush)
}

/// Size in bytes, or -errno.
#[unsafe(no_mangle)]
pub extern "C" fn nebd_lib_filesize(fd: c_int) -> i64 {
    match client_fd(fd) {
        Ok((c, fd)) => c
            .info(fd)
            .map_or_else(|e| i64::from(neg(&e)), |i| i.size as i64),
        Err(e) => i64::from(e),
    }
}

/// Logical block size, or -errno.
#[unsafe(no_mangle)]
pub extern "C" fn nebd_lib_blocksize(fd: c_int) -> i64 {
    match client_fd(fd) {
        Ok((c, fd)) => c
            .info(fd)
            .map_or_else(|e| i64::from(neg(&e)), |i| i64::from(i.block_size)),
        Err(e) => i64::from(e),
    }
}

/// Grows the volume to `size` bytes.
#[unsafe(no_mangle)]
pub extern "C" fn nebd_lib_resize(fd: c_int, size: i64) -> c_int {
    let Ok(size) = u64::try_from(size) else {
        return -libc::EINVAL;
    };
    match client_fd(fd) {
        Ok((c, fd)) => c.resize(fd, size).map_or_else(|e| neg(&e), |_| 0),
        Err(e) => e,
    }
}

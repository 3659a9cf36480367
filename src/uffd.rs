//! The kernel's userfaultfd and PAGEMAP_SCAN interfaces (linux/userfaultfd.h,
//! linux/fs.h), in one place for the modules that use them: the restore's
//! page placing (`Uffd`), write tracking (`resources::memtrack`), the lazy
//! restore (`lazy`) and `check`. Layouts are x86-64's.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `UFFD_API`, the version UFFDIO_API agrees on.
pub const API: u64 = 0xaa;

pub const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
pub const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
pub const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
pub const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
pub const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
pub const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
pub const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;

pub const REGISTER_MODE_MISSING: u64 = 1;
pub const REGISTER_MODE_WP: u64 = 2;
pub const WRITEPROTECT_MODE_WP: u64 = 1;
/// UFFDIO_COPY_MODE_DONTWAKE: nobody waits on the pages copied.
pub const COPY_MODE_DONTWAKE: u64 = 1;

pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// Protection markers on pages not populated yet, so that a VMA walked by
/// PAGEMAP_SCAN counts as write-protectable (PAGE_IS_WPALLOWED).
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;

/// userfaultfd(2) flag: only the faults of user mode, allowed to tasks
/// where vm.unprivileged_userfaultfd is 0 (async write faults are resolved
/// by the kernel for user and kernel writes alike).
pub const USER_MODE_ONLY: u64 = 1;

#[repr(C)]
pub struct Api {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Range {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
pub struct Register {
    pub range: Range,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
pub struct Copy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

#[repr(C)]
pub struct Writeprotect {
    pub range: Range,
    pub mode: u64,
}

/// _IOWR('f', 16, struct pm_scan_arg)
pub const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A new userfaultfd of this process (`flags`: O_CLOEXEC, O_NONBLOCK,
/// USER_MODE_ONLY).
pub fn create(flags: u64) -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd(2) returns a new fd or -1.
    let fd = check(unsafe { libc::syscall(libc::SYS_userfaultfd, flags) })?;
    // SAFETY: fd was just created and is ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The UFFDIO_API handshake, asking for `features`; returns those the
/// kernel gives (all of them, or the call fails).
pub fn api(fd: BorrowedFd, features: u64) -> io::Result<u64> {
    let mut a = Api {
        api: API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one uffdio_api.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut a) } as libc::c_long)?;
    Ok(a.features)
}

/// Registers `[start, start+len)`, all of it inside one mapping of the
/// userfaultfd's process, in `mode`.
pub fn register(fd: BorrowedFd, start: u64, len: u64, mode: u64) -> io::Result<()> {
    let mut r = Register {
        range: Range { start, len },
        mode,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut r) } as libc::c_long)?;
    Ok(())
}

/// Write-protects `[start, start+len)`, registered in REGISTER_MODE_WP.
pub fn writeprotect(fd: BorrowedFd, start: u64, len: u64) -> io::Result<()> {
    let wp = Writeprotect {
        range: Range { start, len },
        mode: WRITEPROTECT_MODE_WP,
    };
    // SAFETY: UFFDIO_WRITEPROTECT reads one uffdio_writeprotect.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &wp) } as libc::c_long)?;
    Ok(())
}

/// A userfaultfd that places pages: UFFDIO_COPY allocates each page of a
/// range registered for missing pages and copies into it, without first
/// zeroing it as a fault would.
pub struct Uffd(OwnedFd);

impl Uffd {
    pub fn new() -> io::Result<Self> {
        // Only copies are made through it, no faults handled: user-mode
        // only is enough, and allowed where kernel faults would not be.
        let fd = create(libc::O_CLOEXEC as u64 | USER_MODE_ONLY)?;
        api(fd.as_fd(), 0)?;
        Ok(Uffd(fd))
    }

    /// Registers `[start, start+len)`, all of it inside one mapping, for
    /// missing pages.
    pub fn register_missing(&self, start: u64, len: u64) -> io::Result<()> {
        register(self.0.as_fd(), start, len, REGISTER_MODE_MISSING)
    }

    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let r = Range { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads one uffdio_range.
        check(unsafe { libc::ioctl(self.0.as_raw_fd(), UFFDIO_UNREGISTER, &r) } as libc::c_long)?;
        Ok(())
    }

    /// Fills the missing pages `[dst, dst+len)` with the `len` bytes at `src`.
    pub fn copy(&self, mut dst: u64, mut src: u64, mut len: u64) -> io::Result<()> {
        while len > 0 {
            let mut c = Copy {
                dst,
                src,
                len,
                mode: COPY_MODE_DONTWAKE,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads and writes one uffdio_copy; the
            // caller vouches for both ranges.
            let r = unsafe { libc::ioctl(self.0.as_raw_fd(), UFFDIO_COPY, &mut c) };
            let done = if r == 0 {
                len
            } else {
                let e = io::Error::last_os_error();
                // Stopped part way (the mappings were changing): on with the rest.
                if e.raw_os_error() != Some(libc::EAGAIN) {
                    return Err(e);
                }
                c.copy.max(0) as u64
            };
            dst += done;
            src += done;
            len -= done;
        }
        Ok(())
    }
}

//! eventfd: its counter and flags (EFD_SEMAPHORE, O_NONBLOCK), from fdinfo.

use std::os::fd::OwnedFd;

use anyhow::Result;

use super::files::{FdProbe, FileKind, RestoreCtx, info_get, new_fd};
use crate::images::pb::EventFd;
use crate::images::pb::fd_entry::File as FdFile;

pub struct EventFdKind;

impl FileKind for EventFdKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if p.link != "anon_inode:[eventfd]" {
            return Ok(None);
        }
        let count = p.info_hex("eventfd-count")?;
        Ok(Some(FdFile::Eventfd(EventFd {
            count,
            semaphore: info_get(p.info, "eventfd-semaphore") == Some("1"),
            flags: p.flags & libc::O_NONBLOCK as u32,
        })))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Eventfd(x) = f else { return None };
        Some(format!(
            "eventfd count {} semaphore {} flags {:#o}",
            x.count, x.semaphore, x.flags
        ))
    }

    fn restore(&self, f: &FdFile, _: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Eventfd(e) = f else {
            return Ok(None);
        };
        let mut flags = libc::EFD_CLOEXEC | (e.flags as i32 & libc::O_NONBLOCK);
        if e.semaphore {
            flags |= libc::EFD_SEMAPHORE;
        }
        // SAFETY: eventfd(2) returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, flags) };
        let fd = new_fd(fd as i64, "an eventfd")?;
        // The counter is 64 bits, eventfd's initial value only 32: write it.
        if e.count != 0 {
            nix::unistd::write(&fd, &e.count.to_ne_bytes())?;
        }
        Ok(Some(fd))
    }
}

//! The owner of an open file's signals: who gets SIGIO/SIGURG for the
//! description (F_SETOWN_EX), with which signal (F_SETSIG), and O_ASYNC.
//! Read on a copy of the fd taken with pidfd_getfd, set on the restored fd.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result, bail};

use crate::images::pb::FdOwner;

// fcntl(2) commands and struct f_owner_ex, which the libc crate lacks.
const F_SETSIG: libc::c_int = 10;
const F_GETSIG: libc::c_int = 11;
const F_SETOWN_EX: libc::c_int = 15;
const F_GETOWN_EX: libc::c_int = 16;
#[repr(C)]
struct FOwnerEx {
    type_: libc::c_int,
    pid: libc::pid_t,
}

/// Who gets the description's SIGIO (F_GETOWN_EX) and with which signal
/// (F_GETSIG), read on a copy of the fd; None when nobody does.
pub fn dump_owner(pidfd: &OwnedFd, pid: i32, fd: RawFd, flags: u32) -> Result<Option<FdOwner>> {
    let copy = crate::sys::pidfd_getfd(pidfd, fd)
        .with_context(|| format!("taking a copy of PID {pid} fd {fd}"))?;
    let mut own = FOwnerEx { type_: 0, pid: 0 };
    // SAFETY: F_GETOWN_EX writes one f_owner_ex; F_GETSIG takes nothing.
    let (r, sig) = unsafe {
        (
            libc::fcntl(copy.as_raw_fd(), F_GETOWN_EX, &mut own),
            libc::fcntl(copy.as_raw_fd(), F_GETSIG),
        )
    };
    let is_async = flags & libc::O_ASYNC as u32 != 0;
    if r < 0 || sig < 0 || (own.pid == 0 && sig == 0 && !is_async) {
        return Ok(None);
    }
    Ok(Some(FdOwner {
        kind: own.type_,
        pid: own.pid,
        signal: sig,
        r#async: is_async,
    }))
}

/// Gives a description back its owner, signal and O_ASYNC. The owner may be
/// a process of the tree that is not forked yet: wait for it a little.
pub fn restore_owner(fd: RawFd, o: &FdOwner) -> Result<()> {
    let own = FOwnerEx {
        type_: o.kind,
        pid: o.pid,
    };
    let mut tries = 0;
    // SAFETY: F_SETOWN_EX reads one f_owner_ex.
    while o.pid != 0 && unsafe { libc::fcntl(fd, F_SETOWN_EX, &own) } < 0 {
        tries += 1;
        if tries > 200 {
            bail!(
                "fd {fd}: giving its signals to {} again (F_SETOWN_EX): {}",
                o.pid,
                std::io::Error::last_os_error()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // SAFETY: plain fcntls on our own fd.
    unsafe {
        if o.signal != 0 && libc::fcntl(fd, F_SETSIG, o.signal) < 0 {
            bail!(
                "fd {fd}: F_SETSIG {}: {}",
                o.signal,
                std::io::Error::last_os_error()
            );
        }
        if o.r#async {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_ASYNC);
        }
    }
    Ok(())
}

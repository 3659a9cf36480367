//! epoll: its watched fds with their events and data, from fdinfo. The set
//! is recreated empty and filled in `finish`, once every fd of the task is
//! back at its number.

use std::os::fd::{OwnedFd, RawFd};

use anyhow::{Result, bail};

use super::files::{FdProbe, FileKind, RestoreCtx, new_fd};
use crate::images::pb::fd_entry::File as FdFile;
use crate::images::pb::{Epoll, EpollTarget};

pub struct EpollKind;

impl FileKind for EpollKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if p.link != "anon_inode:[eventpoll]" {
            return Ok(None);
        }
        let mut targets = Vec::new();
        // "tfd:        5 events:       19 data:                5  pos:0 ino:..."
        for (k, v) in p.info.iter().filter(|(k, _)| k == "tfd") {
            let _ = k;
            let w: Vec<&str> = v.split_whitespace().collect();
            let field = |name: &str| {
                w.iter()
                    .position(|x| *x == name)
                    .and_then(|i| w.get(i + 1))
                    .copied()
            };
            let (Some(fd), Some(events), Some(data)) =
                (w.first(), field("events:"), field("data:"))
            else {
                bail!(
                    "PID {} fd {}: cannot read an epoll target from fdinfo ({v})",
                    p.pid,
                    p.fd
                );
            };
            // "ino:61b": the target file's inode, in hex.
            let ino = w
                .iter()
                .find_map(|x| x.strip_prefix("ino:"))
                .and_then(|x| u64::from_str_radix(x, 16).ok())
                .unwrap_or(0);
            targets.push(EpollTarget {
                fd: fd.parse()?,
                events: u32::from_str_radix(events, 16)?,
                data: u64::from_str_radix(data, 16)?,
                ino,
            });
        }
        Ok(Some(FdFile::Epoll(Epoll {
            flags: p.flags & libc::O_NONBLOCK as u32,
            targets,
        })))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Epoll(x) = f else { return None };
        let t: Vec<String> = x
            .targets
            .iter()
            .map(|t| format!("fd {} events {:#x} data {:#x}", t.fd, t.events, t.data))
            .collect();
        Some(format!("epoll [{}]", t.join(", ")))
    }

    fn restore(&self, f: &FdFile, _: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Epoll(_) = f else { return Ok(None) };
        // SAFETY: epoll_create1 returns a new fd or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        Ok(Some(new_fd(fd as i64, "an epoll set")?))
    }

    fn finish(&self, f: &FdFile, fd: RawFd) -> Result<()> {
        let FdFile::Epoll(e) = f else { return Ok(()) };
        fill(fd, e, |t| Some(t.fd))
    }
}

/// Adds the targets of the dumped set `e` to the epoll set `fd`, each
/// watched through the fd `target` finds for it (in a restored task, the
/// target's own fd number), and sets the set's flags.
pub fn fill(fd: RawFd, e: &Epoll, target: impl Fn(&EpollTarget) -> Option<RawFd>) -> Result<()> {
    for t in &e.targets {
        let Some(tfd) = target(t) else {
            bail!(
                "the epoll set watches fd {} (inode {}), which crust did not make",
                t.fd,
                t.ino
            );
        };
        let mut ev = libc::epoll_event {
            events: t.events,
            u64: t.data,
        };
        // SAFETY: epoll_ctl reads one epoll_event.
        if unsafe { libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, tfd, &mut ev) } < 0 {
            bail!(
                "adding fd {} to the epoll set at fd {fd}: {}",
                t.fd,
                std::io::Error::last_os_error()
            );
        }
    }
    if e.flags & libc::O_NONBLOCK as u32 != 0 {
        // SAFETY: fcntl on an fd of ours.
        unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
    }
    Ok(())
}

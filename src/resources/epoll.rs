//! epoll: its watched fds with their events and data, from fdinfo. The set
//! is recreated empty and filled in `finish`, once every fd of the task is
//! back at its number.
//!
//! A set keys each target by (file, fd number it was added with), and
//! fdinfo shows that number: the task may have closed it since, or put
//! another file there (even one that is also a target under the same
//! number). At dump, kcmp(KCMP_EPOLL_TFD) finds an fd of the task that
//! still holds each target's file; at restore that file is put at the old
//! number for the EPOLL_CTL_ADD, and whatever the number holds now is put
//! back after.

use std::collections::HashMap;
use std::fs;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use anyhow::{Context, Result, bail};

use super::files::{FdProbe, FileKind, RestoreCtx, new_fd};
use crate::images::pb::fd_entry::File as FdFile;
use crate::images::pb::{Epoll, EpollTarget};

pub struct EpollKind;

const KCMP_EPOLL_TFD: i32 = 7;

/// struct kcmp_epoll_slot of the kernel: a target of the set at `efd`, the
/// `toff`th (in the set's order) of those added as fd `tfd`.
#[repr(C)]
struct KcmpEpollSlot {
    efd: u32,
    tfd: u32,
    toff: u32,
}

/// Whether fd `fd` of `pid` is the file of the `toff`th target added as
/// `tfd` to the epoll set at `efd` of `pid`.
fn holds_target(pid: i32, fd: RawFd, efd: RawFd, tfd: RawFd, toff: u32) -> bool {
    let slot = KcmpEpollSlot {
        efd: efd as u32,
        tfd: tfd as u32,
        toff,
    };
    // SAFETY: kcmp reads one kcmp_epoll_slot of ours and compares kernel
    // objects; it writes no memory.
    unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_EPOLL_TFD,
            fd,
            &slot as *const KcmpEpollSlot,
        ) == 0
    }
}

/// The fds of a task with the inode number of their file.
fn fds_by_inode(pid: i32) -> Result<Vec<(RawFd, u64)>> {
    let dir = format!("/proc/{pid}/fd");
    let mut out: Vec<(RawFd, u64)> = fs::read_dir(&dir)
        .with_context(|| format!("listing {dir}"))?
        .filter_map(|e| {
            let e = e.ok()?;
            let fd = e.file_name().to_str()?.parse().ok()?;
            Some((fd, fs::metadata(e.path()).ok()?.ino()))
        })
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// The fdinfo value after `name` in a target line.
fn field<'a>(w: &[&'a str], name: &str) -> Option<&'a str> {
    w.iter()
        .position(|x| *x == name)
        .and_then(|i| w.get(i + 1))
        .copied()
}

impl FileKind for EpollKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if p.link != "anon_inode:[eventpoll]" {
            return Ok(None);
        }
        let mut targets = Vec::new();
        // How many targets added as each fd number were seen so far: the
        // `toff` of the next one.
        let mut seen: HashMap<RawFd, u32> = HashMap::new();
        let mut fds = None;
        // "tfd:        5 events:       19 data:                5  pos:0 ino:b3e sdev:d"
        for (_, v) in p.info.iter().filter(|(k, _)| k == "tfd") {
            let w: Vec<&str> = v.split_whitespace().collect();
            let ino = w
                .iter()
                .find_map(|x| x.strip_prefix("ino:"))
                .and_then(|x| u64::from_str_radix(x, 16).ok());
            let (Some(fd), Some(events), Some(data), Some(ino)) = (
                w.first().and_then(|x| x.parse::<RawFd>().ok()),
                field(&w, "events:"),
                field(&w, "data:"),
                ino,
            ) else {
                bail!(
                    "PID {} fd {}: cannot read an epoll target from fdinfo ({v})",
                    p.pid,
                    p.fd
                );
            };
            let toff = seen.entry(fd).or_default();
            let this = *toff;
            *toff += 1;
            if fds.is_none() {
                fds = Some(fds_by_inode(p.pid)?);
            }
            let held = fds.as_deref().unwrap_or_default();
            // The number it was added as first: mostly it still holds it.
            let source = std::iter::once(fd)
                .chain(
                    held.iter()
                        .filter(|&&(f, i)| i == ino && f != fd)
                        .map(|&(f, _)| f),
                )
                .find(|&f| holds_target(p.pid, f, p.fd, fd, this));
            let Some(source) = source else {
                bail!(
                    "PID {} epoll fd {}: its target added as fd {fd} (inode {ino}) is held by no fd of the task any more, so crust cannot add it to the set again; keep an fd of it open or leave the process out",
                    p.pid,
                    p.fd
                );
            };
            targets.push(EpollTarget {
                fd,
                events: u32::from_str_radix(events, 16)?,
                data: u64::from_str_radix(data, 16)?,
                source_fd: Some(source),
                ino,
            });
        }
        Ok(Some(FdFile::Epoll(Epoll {
            flags: p.flags & libc::O_NONBLOCK as u32,
            targets,
            pid: p.pid,
        })))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Epoll(x) = f else { return None };
        let t: Vec<String> = x
            .targets
            .iter()
            .map(|t| {
                let src = match t.source_fd {
                    Some(s) if s != t.fd => format!(" (the file of fd {s})"),
                    _ => String::new(),
                };
                format!("fd {}{src} events {:#x} data {:#x}", t.fd, t.events, t.data)
            })
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
        if e.flags & libc::O_NONBLOCK as u32 != 0 {
            // SAFETY: fcntl on an fd of ours.
            unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
        }
        // The source fds are numbers of the process that dumped the set;
        // the others holding it (shared since a fork) find it filled.
        if e.pid != 0 && e.pid != std::process::id() as i32 {
            return Ok(());
        }
        for t in &e.targets {
            add_target(fd, t).with_context(|| {
                let src = match t.source_fd {
                    Some(s) if s != t.fd => format!(" (the file of fd {s})"),
                    _ => String::new(),
                };
                format!("adding fd {}{src} to the epoll set at fd {fd}", t.fd)
            })?;
        }
        Ok(())
    }
}

/// EPOLL_CTL_ADD of one target under its old number, with its file taken
/// from its source fd when that is another one: the number's current
/// holder (if any) is moved aside for the call and put back after.
fn add_target(epfd: RawFd, t: &EpollTarget) -> Result<()> {
    let mut ev = libc::epoll_event {
        events: t.events,
        u64: t.data,
    };
    let src = t.source_fd.unwrap_or(t.fd);
    if src == t.fd {
        // SAFETY: epoll_ctl reads one epoll_event.
        if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, t.fd, &mut ev) } < 0 {
            bail!("{}", std::io::Error::last_os_error());
        }
        return Ok(());
    }
    // SAFETY: F_GETFD only reads the fd's flags (-1: the number is free).
    let holder_flags = unsafe { libc::fcntl(t.fd, libc::F_GETFD) };
    let parked = if holder_flags >= 0 {
        // SAFETY: a copy of the holder at a free number, closed below.
        let n = unsafe { libc::fcntl(t.fd, libc::F_DUPFD_CLOEXEC, 0) };
        if n < 0 {
            bail!(
                "moving fd {} aside: {}",
                t.fd,
                std::io::Error::last_os_error()
            );
        }
        Some(n)
    } else {
        None
    };
    // The number may be the set's own (it was the target's before).
    let ep = if epfd == t.fd {
        parked.unwrap_or(epfd)
    } else {
        epfd
    };
    // SAFETY: dup2 of a task fd onto a number whose holder is parked (or
    // that is free), then epoll_ctl reading one epoll_event.
    let r = unsafe {
        if libc::dup2(src, t.fd) < 0 || libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, t.fd, &mut ev) < 0
        {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: putting the parked holder back at its number with its
    // flags (dup2 clears close-on-exec), or freeing the number again.
    unsafe {
        match parked {
            Some(n) => {
                if libc::dup2(n, t.fd) < 0 {
                    bail!(
                        "putting fd {} back: {}",
                        t.fd,
                        std::io::Error::last_os_error()
                    );
                }
                libc::fcntl(t.fd, libc::F_SETFD, holder_flags);
                libc::close(n);
            }
            None => {
                libc::close(t.fd);
            }
        }
    }
    Ok(r?)
}

/// Adds the targets of the dumped set `e` to the epoll set `fd` when the
/// set was in flight (sent with SCM_RIGHTS): no fd table its target numbers
/// belong to, so `target` finds each target's file in crust (by inode).
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

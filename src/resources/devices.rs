//! Character devices: terminals the tree shares with the shell that started
//! it (`--shell-job`: crust's own terminal stands in), and devices that
//! carry no state of their own (/dev/null and the like), reopened by path.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use anyhow::{Result, bail};

use super::files::{FdProbe, FileKind, RestoreCtx, open_fd};
use crate::images::pb::fd_entry::File as FdFile;
use crate::images::pb::{CharDevice, Tty};

fn is_tty_rdev(rdev: u64) -> bool {
    let major = libc::major(rdev);
    // 4: virtual consoles and serial ttys, 5: /dev/tty and ptmx, 136-143: pty slaves.
    major == 4 || major == 5 || (136..=143).contains(&major)
}

pub struct TtyKind;

impl FileKind for TtyKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if !p.meta.file_type().is_char_device() || !is_tty_rdev(p.meta.rdev()) {
            return Ok(None);
        }
        if !p.ctx.shell_job {
            bail!(
                "PID {} fd {} is the terminal {}; dump a process started from a shell with --shell-job",
                p.pid,
                p.fd,
                p.link
            );
        }
        Ok(Some(FdFile::Tty(Tty {
            path: p.link.to_string(),
            flags: p.open_flags(),
            rdev: p.meta.rdev(),
        })))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Tty(t) = f else { return None };
        Some(format!(
            "terminal {} flags {:#o} (shell job)",
            t.path, t.flags
        ))
    }

    fn restore(&self, f: &FdFile, ctx: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Tty(t) = f else { return Ok(None) };
        let Some(tty) = ctx.tty else {
            bail!(
                "the images hold the terminal {}; restore with --shell-job from a terminal",
                t.path
            );
        };
        // SAFETY: duplicating crust's own terminal fd.
        let fd = unsafe { libc::fcntl(tty, libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            bail!(
                "duplicating crust's terminal: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: fd was just created and is owned by no one else.
        Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

/// Character devices that carry no state of their own.
const STATELESS_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

pub struct CharDeviceKind;

impl FileKind for CharDeviceKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if !p.meta.file_type().is_char_device() || !STATELESS_DEVICES.contains(&p.link) {
            return Ok(None);
        }
        Ok(Some(FdFile::Chardev(CharDevice {
            path: p.link.to_string(),
            flags: p.open_flags(),
            rdev: p.meta.rdev(),
            pos: p.pos,
        })))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Chardev(c) = f else { return None };
        Some(format!("device {} flags {:#o}", c.path, c.flags))
    }

    fn restore(&self, f: &FdFile, _: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Chardev(c) = f else {
            return Ok(None);
        };
        Ok(Some(open_fd(&c.path, c.flags)?))
    }
}

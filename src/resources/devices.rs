//! Character devices:
//! - the terminal the tree shares with the shell that started it
//!   (`--shell-job`): crust's own terminal stands in for it, given the
//!   settings the shell's terminal had (a program in raw mode stays so);
//! - /dev/tty, reopened as /dev/tty (the task's controlling terminal: the
//!   shell's with `--shell-job`, or a pty pair of the tree);
//! - devices that carry no state of their own (/dev/null and the like) and
//!   terminals opened by path that are no one's controlling terminal, or
//!   the tree's own session's (a console, a virtual terminal): reopened by
//!   path, and checked to be the same device.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use anyhow::{Context, Result, bail};

use super::files::{FdProbe, FileKind, RestoreCtx, TreeImages, TreeObjects, open_fd, seek_to};
use crate::images::pb::fd_entry::File as FdFile;
use crate::images::pb::{CharDevice, Tty};

fn is_tty_rdev(rdev: u64) -> bool {
    let major = libc::major(rdev);
    // 4: virtual consoles and serial ttys, 5: /dev/tty, console and ptmx,
    // 136-143: pty slaves.
    major == 4 || major == 5 || (136..=143).contains(&major)
}

const DEV_TTY: (u32, u32) = (5, 0);

/// The controlling terminal of `pid` as a device number (stat's tty_nr), 0
/// when it has none.
pub fn ctty_rdev(pid: i32) -> u64 {
    let Ok(f) = crate::proc::stat_fields(pid) else {
        return 0;
    };
    let tty_nr = crate::proc::stat_field(&f, 7) as u32;
    if tty_nr == 0 {
        return 0;
    }
    let major = (tty_nr >> 8) & 0xfff;
    let minor = (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00);
    libc::makedev(major, minor)
}

/// Makes the terminal at `path` the controlling terminal of the calling
/// session leader.
pub fn take_ctty(path: &str) -> Result<()> {
    let fd = open_fd(path, libc::O_RDWR as u32)?;
    // SAFETY: TIOCSCTTY with argument 0 on our own fd.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSCTTY, 0) } < 0 {
        bail!(
            "making {path} the controlling terminal: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

pub struct TtyKind;

impl FileKind for TtyKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        let rdev = p.meta.rdev();
        if !p.meta.file_type().is_char_device() || !is_tty_rdev(rdev) {
            return Ok(None);
        }
        let ctty = ctty_rdev(p.pid);
        let current = (libc::major(rdev), libc::minor(rdev)) == DEV_TTY;
        // A console or virtual terminal of a session led in the tree is
        // the tree's, a device it opened by path (CharDeviceKind's), taken
        // again after setsid (`take_ctty`). A pty slave whose master is
        // outside the tree is the terminal emulator's: the shell job's.
        let sid = crate::proc::stat_fields(p.pid)
            .map(|f| crate::proc::stat_field(&f, 6) as i32)
            .unwrap_or(0);
        let own_terminal = p.ctx.tree.contains(&sid) && super::pty::pts_index(rdev).is_none();
        if !current && (rdev != ctty || own_terminal) {
            return Ok(None);
        }
        let tree_pty =
            super::pty::pts_index(ctty).is_some_and(|i| super::pty::master_in_tree(p.ctx.tree, i));
        if !(p.ctx.shell_job || current && tree_pty) {
            bail!(
                "PID {} fd {} is the terminal {}; dump a process started from a shell with --shell-job",
                p.pid,
                p.fd,
                p.link
            );
        }
        // The settings the shell's terminal has now, which the program
        // running on it may have changed (raw mode), read on a copy of the
        // fd.
        let (termios, winsize) = if current {
            (Vec::new(), Vec::new())
        } else {
            let pidfd = crate::sys::pidfd_open(p.pid)?;
            let copy = crate::sys::pidfd_getfd(&pidfd, p.fd)?;
            super::pty::tty_settings(copy.as_raw_fd())
                .with_context(|| format!("PID {} fd {}: the settings of {}", p.pid, p.fd, p.link))?
        };
        Ok(Some(FdFile::Tty(Tty {
            path: p.link.to_string(),
            flags: p.open_flags(),
            rdev,
            current,
            termios,
            winsize,
        })))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Tty(t) = f else { return None };
        Some(if t.current {
            format!("/dev/tty flags {:#o}", t.flags)
        } else {
            format!(
                "terminal {} flags {:#o} (shell job) winsize {:?}",
                t.path, t.flags, t.winsize
            )
        })
    }

    /// Gives crust's terminal the settings the shell's had at the dump. Its
    /// window size stays the new terminal's own (the restore sends SIGWINCH
    /// when it differs, and the program redraws), unless it has none.
    fn prepare(&self, t: &TreeImages, _: &mut TreeObjects) -> Result<()> {
        let Some(tty) = t.tty else { return Ok(()) };
        let Some(saved) = t.files().find_map(|(_, _, f)| match f {
            FdFile::Tty(t) if !t.termios.is_empty() => Some(t),
            _ => None,
        }) else {
            return Ok(());
        };
        super::pty::set_termios(tty, &saved.termios, "crust's terminal")?;
        if let Some(ws) = super::pty::winsize_of(&saved.winsize) {
            // SAFETY: winsize is plain data for which all-zero is valid.
            let mut now: libc::winsize = unsafe { std::mem::zeroed() };
            // SAFETY: TIOCGWINSZ writes one winsize; TIOCSWINSZ reads one.
            unsafe {
                libc::ioctl(tty, libc::TIOCGWINSZ, &mut now);
                if now.ws_row == 0 && now.ws_col == 0 {
                    libc::ioctl(tty, libc::TIOCSWINSZ, &ws);
                }
            }
        }
        Ok(())
    }

    fn restore(&self, f: &FdFile, ctx: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Tty(t) = f else { return Ok(None) };
        if t.current {
            return open_fd("/dev/tty", t.flags).map(Some).map_err(|e| {
                e.context("the restored task has no controlling terminal for /dev/tty")
            });
        }
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
        let ft = p.meta.file_type();
        // Terminals reach here when TtyKind left them: opened by path and
        // no one's (or the tree's own session's) controlling terminal.
        let by_path = STATELESS_DEVICES.contains(&p.link)
            || (is_tty_rdev(p.meta.rdev())
                && p.link.starts_with('/')
                && !p.link.ends_with(" (deleted)"));
        if !ft.is_char_device() || !by_path {
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
        Some(format!(
            "device {} ({}:{}) flags {:#o}",
            c.path,
            libc::major(c.rdev),
            libc::minor(c.rdev),
            c.flags
        ))
    }

    fn check(&self, f: &FdFile) -> Result<()> {
        let FdFile::Chardev(c) = f else { return Ok(()) };
        match std::fs::metadata(&c.path) {
            Ok(m) if m.file_type().is_char_device() && m.rdev() == c.rdev => Ok(()),
            Ok(_) => bail!(
                "{} is no longer the device {}:{}; restore the device node",
                c.path,
                libc::major(c.rdev),
                libc::minor(c.rdev)
            ),
            Err(e) => bail!("device {} is gone ({e}); restore the device node", c.path),
        }
    }

    fn restore(&self, f: &FdFile, _: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Chardev(c) = f else {
            return Ok(None);
        };
        let fd = open_fd(&c.path, c.flags)?;
        if c.pos != 0 && !is_tty_rdev(c.rdev) {
            seek_to(fd.as_raw_fd(), c.pos, &c.path)?;
        }
        Ok(Some(fd))
    }
}

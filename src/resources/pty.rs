//! Pseudo-terminal pairs whose master the tree holds (a terminal emulator,
//! tmux, an expect script), with the slave's termios and window size, packet
//! mode and lock state, and the sessions they are the controlling terminal
//! of. A terminal whose master is outside the tree is the shell's
//! (`--shell-job`, `files::TtyKind`).
//!
//! Dump: the master fd is duplicated into crust with pidfd_getfd (reopening
//! /dev/ptmx would make a new pair) for its ioctls; a slave is claimed when
//! a process of the tree holds its master.
//! Restore: before the tree forks, crust opens /dev/ptmx until the kernel
//! hands out the dumped index (the lowest free one comes first; the extra
//! pairs are closed again), and sets termios, window size and packet mode.
//! Tasks dup the master and open the slave by path (O_NOCTTY); a session
//! leader takes its controlling terminal with TIOCSCTTY right after setsid.
//! Bytes queued in the pair are not carried (reading them would take them).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use anyhow::{Context, Result, bail};
use tracing::warn;

use super::files::{
    FdProbe, FileKind, ObjKey, RestoreCtx, TreeImages, TreeObjects, info_get, new_fd,
};
use crate::images::pb::PtyEnd;
use crate::images::pb::fd_entry::File as FdFile;

/// The tree object of a pty master crust made.
fn master_key(index: u32) -> ObjKey {
    ("pty", index as u64, 0)
}

/// The kernel's struct termios (TCGETS/TCSETS) is 36 bytes on x86-64.
const TERMIOS_LEN: usize = 36;
/// Major numbers of Unix98 pty slaves (/dev/pts/N).
const PTS_MAJORS: std::ops::RangeInclusive<u32> = 136..=143;

pub struct PtyKind;

fn pts_index(rdev: u64) -> Option<u32> {
    let major = libc::major(rdev);
    PTS_MAJORS
        .contains(&major)
        .then(|| (major - 136) * 256 + libc::minor(rdev))
}

fn is_ptmx(link: &str) -> bool {
    link == "/dev/ptmx" || link == "/dev/pts/ptmx"
}

/// The pty index of PID's fd if it is a master (fdinfo tty-index).
fn master_index(pid: i32, fd: &str) -> Option<u32> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    if !is_ptmx(&link.to_string_lossy()) {
        return None;
    }
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("tty-index:"))?
        .trim()
        .parse()
        .ok()
}

/// Whether a process of `tree` holds the master of pty `index`.
pub fn master_in_tree(tree: &[i32], index: u32) -> bool {
    tree.iter().any(|&pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.filter_map(|e| e.ok())
                .any(|e| master_index(pid, &e.file_name().to_string_lossy()) == Some(index))
        })
    })
}

/// PID's fd `fd`, duplicated into crust (same open file description).
fn steal_fd(pid: i32, fd: RawFd) -> Result<OwnedFd> {
    let pidfd = crate::sys::pidfd_open(pid)?;
    crate::sys::pidfd_getfd(&pidfd, fd)
        .with_context(|| format!("taking a copy of PID {pid} fd {fd}"))
}

fn ioctl_int(fd: RawFd, req: libc::c_ulong, what: &str) -> Result<i32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the ioctl writes one int.
    if unsafe { libc::ioctl(fd, req, &mut v) } < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(v)
}

impl FileKind for PtyKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if !p.meta.file_type().is_char_device() {
            return Ok(None);
        }
        let flags = p.open_flags();
        if is_ptmx(p.link) {
            let index = info_get(p.info, "tty-index")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| p.unreadable("tty-index"))?;
            let m = steal_fd(p.pid, p.fd)?;
            let fd = m.as_raw_fd();
            let mut termios = [0u8; 64];
            // SAFETY: TCGETS writes a kernel struct termios (36 bytes).
            if unsafe { libc::ioctl(fd, libc::TCGETS, termios.as_mut_ptr()) } < 0 {
                bail!(
                    "PID {} fd {}: reading the termios of /dev/pts/{index}: {}",
                    p.pid,
                    p.fd,
                    std::io::Error::last_os_error()
                );
            }
            // SAFETY: winsize is plain data for which all-zero is valid.
            let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
            // SAFETY: TIOCGWINSZ writes one struct winsize.
            if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } < 0 {
                bail!(
                    "reading the window size of /dev/pts/{index}: {}",
                    std::io::Error::last_os_error()
                );
            }
            return Ok(Some(FdFile::Pty(PtyEnd {
                index,
                master: true,
                flags,
                termios: termios[..TERMIOS_LEN].to_vec(),
                winsize: vec![
                    ws.ws_row.into(),
                    ws.ws_col.into(),
                    ws.ws_xpixel.into(),
                    ws.ws_ypixel.into(),
                ],
                packet_mode: ioctl_int(fd, libc::TIOCGPKT, "TIOCGPKT")? != 0,
                locked: ioctl_int(fd, libc::TIOCGPTLCK, "TIOCGPTLCK")? != 0,
            })));
        }
        let Some(index) = pts_index(p.meta.rdev()) else {
            return Ok(None);
        };
        if !master_in_tree(p.ctx.tree, index) {
            // The shell's terminal: TtyKind's, with --shell-job.
            return Ok(None);
        }
        Ok(Some(FdFile::Pty(PtyEnd {
            index,
            master: false,
            flags,
            ..Default::default()
        })))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Pty(p) = f else { return None };
        Some(if p.master {
            format!(
                "pty master of /dev/pts/{} flags {:#o} winsize {:?} packet {} locked {}",
                p.index, p.flags, p.winsize, p.packet_mode, p.locked
            )
        } else {
            format!("pty /dev/pts/{} flags {:#o}", p.index, p.flags)
        })
    }

    fn prepare(&self, t: &TreeImages, objects: &mut TreeObjects) -> Result<()> {
        for (_, _, file) in t.files() {
            let FdFile::Pty(p) = file else { continue };
            if p.master && !objects.contains(master_key(p.index)) {
                objects.insert(master_key(p.index), create_pty(p)?);
            }
        }
        Ok(())
    }

    fn restore(&self, f: &FdFile, ctx: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Pty(e) = f else { return Ok(None) };
        let keep = (libc::O_NONBLOCK | libc::O_APPEND) as u32;
        let fd = if e.master {
            // A dup: opening the master again through /proc would make a
            // new pair.
            let m = ctx
                .objects
                .need(master_key(e.index), &format!("pty {}", e.index))?;
            // SAFETY: duplicating the master crust made before the fork.
            new_fd(
                unsafe { libc::fcntl(m, libc::F_DUPFD_CLOEXEC, 0) } as i64,
                "a copy of a pty master",
            )?
        } else {
            open_slave(e.index, e.flags as i32 & libc::O_ACCMODE)?
        };
        // SAFETY: setting status flags of the description we hold.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, (e.flags & keep) as i32) };
        Ok(Some(fd))
    }

    /// The lock goes back last, once the task's own slave fds are open.
    fn finish(&self, f: &FdFile, fd: RawFd) -> Result<()> {
        if let FdFile::Pty(e) = f
            && e.master
            && e.locked
        {
            let one: libc::c_int = 1;
            // SAFETY: TIOCSPTLCK reads one int.
            unsafe { libc::ioctl(fd, libc::TIOCSPTLCK, &one) };
        }
        Ok(())
    }
}

fn open_slave(index: u32, access: i32) -> Result<OwnedFd> {
    let path = std::ffi::CString::new(format!("/dev/pts/{index}"))?;
    // SAFETY: open(2) of a NUL-terminated path. O_NOCTTY: a session leader
    // takes its terminal explicitly (`take_ctty`), never by accident.
    let fd = unsafe { libc::open(path.as_ptr(), access | libc::O_NOCTTY | libc::O_CLOEXEC) };
    new_fd(fd as i64, &format!("opening /dev/pts/{index}"))
}

/// Makes a pty pair whose master the tree holds, with its dumped index,
/// termios, window size and packet mode, before anything forks.
fn create_pty(p: &PtyEnd) -> Result<OwnedFd> {
    {
        let m = open_master_with_index(p.index)?;
        let fd = m.as_raw_fd();
        let zero: libc::c_int = 0;
        // SAFETY: each ioctl reads the value passed; on our own master.
        unsafe {
            libc::ioctl(fd, libc::TIOCSPTLCK, &zero);
            let mut t = [0u8; 64];
            let n = p.termios.len().min(TERMIOS_LEN);
            t[..n].copy_from_slice(&p.termios[..n]);
            if libc::ioctl(fd, libc::TCSETS, t.as_ptr()) < 0 {
                bail!(
                    "setting the termios of /dev/pts/{}: {}",
                    p.index,
                    std::io::Error::last_os_error()
                );
            }
            if let [row, col, x, y] = p.winsize[..] {
                let ws = libc::winsize {
                    ws_row: row as u16,
                    ws_col: col as u16,
                    ws_xpixel: x as u16,
                    ws_ypixel: y as u16,
                };
                libc::ioctl(fd, libc::TIOCSWINSZ, &ws);
            }
            let pkt: libc::c_int = p.packet_mode as libc::c_int;
            libc::ioctl(fd, libc::TIOCPKT, &pkt);
        }
        Ok(m)
    }
}

/// Opens /dev/ptmx until the kernel hands out `index` (it gives the lowest
/// free one); the pairs opened on the way are closed again.
fn open_master_with_index(index: u32) -> Result<OwnedFd> {
    let mut extra = Vec::new();
    loop {
        // SAFETY: open(2) of a constant path.
        let fd = unsafe {
            libc::open(
                c"/dev/ptmx".as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        };
        let m = new_fd(fd as i64, "opening /dev/ptmx")?;
        let got = ioctl_int(m.as_raw_fd(), libc::TIOCGPTN, "TIOCGPTN")? as u32;
        if got == index {
            return Ok(m);
        }
        if got > index || extra.len() > 4096 {
            bail!(
                "pseudo-terminal /dev/pts/{index} is in use by another process; close it and restore again"
            );
        }
        extra.push(m);
    }
}

/// The controlling terminal of session leader `pid` if it is one of the
/// tree's ptys (`masters`): (index, foreground process group).
pub fn ctty_of(pid: i32, masters: &[u32]) -> Option<(u32, i32)> {
    // Fields 7 and 8 of stat: tty_nr and tpgid.
    let f = crate::proc::stat_fields(pid).ok()?;
    let tty_nr = crate::proc::stat_field(&f, 7) as u32;
    let tpgid = crate::proc::stat_field(&f, 8) as i32;
    let major = (tty_nr >> 8) & 0xfff;
    let minor = (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00);
    let index = pts_index(libc::makedev(major, minor))?;
    masters.contains(&index).then_some((index, tpgid))
}

/// Makes pty `index` the controlling terminal of the calling session leader.
pub fn take_ctty(index: u32) -> Result<()> {
    let fd = open_slave(index, libc::O_RDWR)?;
    // SAFETY: TIOCSCTTY with argument 0 on our own fd.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSCTTY, 0) } < 0 {
        bail!(
            "making /dev/pts/{index} the controlling terminal: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Gives pty `index` its foreground process group back; the group may not
/// exist yet when its leader is forked late, so this waits a little.
pub fn set_foreground(index: u32, pgrp: i32) {
    let Ok(fd) = open_slave(index, libc::O_RDWR) else {
        return;
    };
    for _ in 0..100 {
        if nix::unistd::tcsetpgrp(&fd, nix::unistd::Pid::from_raw(pgrp)).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    warn!("could not make group {pgrp} the foreground of /dev/pts/{index}");
}

//! Pseudo-terminal pairs whose master the tree holds (a terminal emulator,
//! tmux, an expect script), with the slave's termios and window size, packet
//! mode and lock state, the slave node's owner and mode, the bytes queued in
//! both directions, and the sessions they are the controlling terminal of.
//! A slave whose master was closed (hung up) comes back hung up. A terminal
//! whose master is outside the tree is the shell's (`--shell-job`,
//! `devices::TtyKind`).
//!
//! Dump: the master fd is duplicated into crust with pidfd_getfd (reopening
//! /dev/ptmx would make a new pair) for its ioctls; a slave is claimed when
//! a process of the tree holds its master.
//! Restore: before the tree forks, crust opens /dev/ptmx until the kernel
//! hands out the dumped index (the lowest free one comes first; the extra
//! pairs are closed again), and sets termios, window size and packet mode.
//! Tasks dup the master and open the slave by path (O_NOCTTY); a session
//! leader takes its controlling terminal with TIOCSCTTY right after setsid.
//! Queued bytes: the kernel only hands them out by taking them, so the dump
//! reads them (the slave side with the line discipline briefly
//! non-canonical, so a partial line comes too) and writes them back if the
//! tree runs on; the restore writes them into the new pair with echo,
//! signals and output processing off, then sets the termios.

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

pub fn pts_index(rdev: u64) -> Option<u32> {
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
            let (termios, winsize) = tty_settings(fd).with_context(|| {
                format!(
                    "PID {} fd {}: the settings of /dev/pts/{index}",
                    p.pid, p.fd
                )
            })?;
            let (uid, gid, mode) = std::fs::metadata(format!("/dev/pts/{index}"))
                .map(|m| (m.uid(), m.gid(), m.mode() & 0o7777))
                .unwrap_or((0, 0, 0o620));
            let (slave_input, master_input) = if p.ctx.first_time(("pty-data", index as u64, 0)) {
                let (s, m_in) = take_queued(&m, index, &termios).with_context(|| {
                    format!(
                        "PID {} fd {}: the bytes queued in /dev/pts/{index}",
                        p.pid, p.fd
                    )
                })?;
                if !s.is_empty() || !m_in.is_empty() {
                    let (s2, m2, t2) = (s.clone(), m_in.clone(), termios.clone());
                    p.ctx
                        .on_resume(Box::new(move || refill(&m, index, &t2, &s2, &m2)));
                }
                (s, m_in)
            } else {
                (Vec::new(), Vec::new())
            };
            return Ok(Some(FdFile::Pty(PtyEnd {
                index,
                master: true,
                flags,
                termios,
                winsize,
                packet_mode: ioctl_int(fd, libc::TIOCGPKT, "TIOCGPKT")? != 0,
                locked: ioctl_int(fd, libc::TIOCGPTLCK, "TIOCGPTLCK")? != 0,
                uid,
                gid,
                mode,
                slave_input,
                master_input,
                orphan: false,
            })));
        }
        let Some(index) = pts_index(p.meta.rdev()) else {
            return Ok(None);
        };
        // The slave's node goes away with its master: a slave of a closed
        // master, hung up.
        let orphan = p.link.ends_with(" (deleted)");
        if !orphan && !master_in_tree(p.ctx.tree, index) {
            // The shell's terminal (TtyKind's, with --shell-job), or a
            // terminal opened by path (CharDeviceKind's).
            return Ok(None);
        }
        Ok(Some(FdFile::Pty(PtyEnd {
            index,
            master: false,
            flags,
            orphan,
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
        // A hung-up slave: a pair with its index (crust and the tasks hold
        // the master until their fds are in place; when the last copy goes,
        // the slaves are hung up again).
        for (_, _, file) in t.files() {
            let FdFile::Pty(p) = file else { continue };
            if p.orphan && !objects.contains(orphan_key(p.index)) {
                let m = open_master_with_index(p.index)?;
                let zero: libc::c_int = 0;
                // SAFETY: TIOCSPTLCK reads one int; on our own master.
                unsafe { libc::ioctl(m.as_raw_fd(), libc::TIOCSPTLCK, &zero) };
                objects.insert(orphan_key(p.index), m);
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

/// The tree object of a hung-up slave's (temporary) master.
fn orphan_key(index: u32) -> ObjKey {
    ("pty-orphan", index as u64, 0)
}

/// The dumped termios with echo, signals, flow control and output
/// processing off: queued bytes written back in this state are queued as
/// they are, and nothing is echoed or turned into a signal.
fn quiet_termios(t: &[u8]) -> [u8; 64] {
    let mut q = [0u8; 64];
    let n = t.len().min(TERMIOS_LEN);
    q[..n].copy_from_slice(&t[..n]);
    let word = |q: &[u8; 64], at: usize| u32::from_ne_bytes(q[at..at + 4].try_into().unwrap());
    let iflag = word(&q, 0) & !libc::IXON;
    let oflag = word(&q, 4) & !libc::OPOST;
    let lflag = word(&q, 12)
        & !(libc::ECHO
            | libc::ECHOE
            | libc::ECHOK
            | libc::ECHONL
            | libc::ECHOCTL
            | libc::ECHOKE
            | libc::ISIG);
    q[0..4].copy_from_slice(&iflag.to_ne_bytes());
    q[4..8].copy_from_slice(&oflag.to_ne_bytes());
    q[12..16].copy_from_slice(&lflag.to_ne_bytes());
    q
}

/// Sets a terminal's termios (on a pty master: its slave's) to the dumped
/// kernel struct termios `t`; `what` names it in errors.
pub fn set_termios(fd: RawFd, t: &[u8], what: &str) -> Result<()> {
    let mut buf = [0u8; 64];
    let n = t.len().min(TERMIOS_LEN);
    buf[..n].copy_from_slice(&t[..n]);
    // SAFETY: TCSETS reads a kernel termios; on a master it sets the slave's.
    if unsafe { libc::ioctl(fd, libc::TCSETS, buf.as_ptr()) } < 0 {
        bail!(
            "setting the termios of {what}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A terminal's termios (kernel struct) and window size, for the images.
pub fn tty_settings(fd: RawFd) -> Result<(Vec<u8>, Vec<u32>)> {
    let mut termios = [0u8; 64];
    // SAFETY: TCGETS writes a kernel struct termios (36 bytes).
    if unsafe { libc::ioctl(fd, libc::TCGETS, termios.as_mut_ptr()) } < 0 {
        bail!("TCGETS: {}", std::io::Error::last_os_error());
    }
    // SAFETY: winsize is plain data for which all-zero is valid.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one struct winsize.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } < 0 {
        bail!("TIOCGWINSZ: {}", std::io::Error::last_os_error());
    }
    Ok((
        termios[..TERMIOS_LEN].to_vec(),
        vec![
            ws.ws_row.into(),
            ws.ws_col.into(),
            ws.ws_xpixel.into(),
            ws.ws_ypixel.into(),
        ],
    ))
}

/// The struct winsize of a dumped (rows, cols, xpixel, ypixel).
pub fn winsize_of(w: &[u32]) -> Option<libc::winsize> {
    match *w {
        [row, col, x, y] => Some(libc::winsize {
            ws_row: row as u16,
            ws_col: col as u16,
            ws_xpixel: x as u16,
            ws_ypixel: y as u16,
        }),
        _ => None,
    }
}

/// Reads out what is queued in pair `index` (through a copy of its master):
/// (what the slave would read, what the master would read). The slave side
/// is read with the line discipline briefly non-canonical, so that a line
/// not finished yet comes too; the termios goes back to `termios` after.
fn take_queued(master: &OwnedFd, index: u32, termios: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    let m = master.as_raw_fd();
    let master_input = read_available(m)?;
    // A slave that cannot be opened (locked, or no one ever opened it)
    // holds nothing to read.
    let Ok(slave) = open_slave(index, libc::O_RDONLY | libc::O_NONBLOCK) else {
        return Ok((Vec::new(), master_input));
    };
    let mut raw = quiet_termios(termios);
    let lflag = u32::from_ne_bytes(raw[12..16].try_into().unwrap()) & !libc::ICANON;
    raw[12..16].copy_from_slice(&lflag.to_ne_bytes());
    set_termios(m, &raw, &format!("/dev/pts/{index}"))?;
    let slave_input = read_available(slave.as_raw_fd());
    set_termios(m, termios, &format!("/dev/pts/{index}"))?;
    Ok((slave_input?, master_input))
}

/// Reads what the tty fd has queued now (FIONREAD says how much, so a
/// blocking description is never blocked on).
fn read_available(fd: RawFd) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let n = ioctl_int(fd, libc::FIONREAD, "FIONREAD")?;
        if n <= 0 {
            return Ok(out);
        }
        let at = out.len();
        out.resize(at + n as usize, 0);
        // SAFETY: read(2) into the part of our buffer just grown.
        let r = unsafe { libc::read(fd, out[at..].as_mut_ptr().cast(), n as usize) };
        if r <= 0 {
            out.truncate(at);
            return Ok(out);
        }
        out.truncate(at + r as usize);
    }
}

/// Queues bytes in pair `index` again: `slave_input` for the slave's
/// readers (written into the master), `master_input` for the master's
/// (written into the slave), with the line discipline quiet; then the
/// termios is set to `termios`.
fn refill(
    master: &OwnedFd,
    index: u32,
    termios: &[u8],
    slave_input: &[u8],
    master_input: &[u8],
) -> Result<()> {
    let m = master.as_raw_fd();
    if !slave_input.is_empty() || !master_input.is_empty() {
        set_termios(m, &quiet_termios(termios), &format!("/dev/pts/{index}"))?;
        let slave = open_slave(index, libc::O_RDWR | libc::O_NONBLOCK)?;
        for (fd, data, side) in [
            (m, slave_input, "slave"),
            (slave.as_raw_fd(), master_input, "master"),
        ] {
            let n = nix::unistd::write(
                // SAFETY: fds we hold for the duration of this call.
                unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
                data,
            )
            .with_context(|| format!("queueing bytes for the {side} of /dev/pts/{index}"))?;
            if n != data.len() {
                bail!(
                    "queueing bytes for the {side} of /dev/pts/{index}: {n} of {} fit",
                    data.len()
                );
            }
        }
        // The line discipline takes written bytes in later, from a kernel
        // worker: wait until it has, before echo comes back on.
        let lines = complete_lines_len(termios, slave_input);
        let t0 = std::time::Instant::now();
        while (ioctl_int(slave.as_raw_fd(), libc::FIONREAD, "FIONREAD")? as usize) < lines
            || (ioctl_int(m, libc::FIONREAD, "FIONREAD")? as usize) < master_input.len()
        {
            if t0.elapsed() > std::time::Duration::from_secs(2) {
                bail!("the bytes queued again in /dev/pts/{index} were not taken in within 2 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if lines < slave_input.len() {
            // A partial line counts nowhere; it went in with the lines
            // before it, or alone: give the worker a moment.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    set_termios(m, termios, &format!("/dev/pts/{index}"))
}

/// How many of the bytes queued for a slave reader FIONREAD will count once
/// taken in: all of them in non-canonical mode; in canonical mode those up
/// to the end of the last whole line.
fn complete_lines_len(termios: &[u8], data: &[u8]) -> usize {
    let lflag = termios
        .get(12..16)
        .map_or(0, |b| u32::from_ne_bytes(b.try_into().unwrap()));
    if lflag & libc::ICANON == 0 {
        return data.len();
    }
    // c_cc starts at byte 17 of the kernel struct termios.
    let cc = |i: usize| termios.get(17 + i).copied().unwrap_or(0);
    let ends = [b'\n', cc(libc::VEOL), cc(libc::VEOL2), cc(libc::VEOF)];
    data.iter()
        .rposition(|b| *b != 0 && ends.contains(b))
        .map_or(0, |i| i + 1)
}

/// Makes a pty pair whose master the tree holds, with its dumped index,
/// termios, window size, packet mode, queued bytes and slave node owner,
/// before anything forks.
fn create_pty(p: &PtyEnd) -> Result<OwnedFd> {
    {
        let m = open_master_with_index(p.index)?;
        let fd = m.as_raw_fd();
        let zero: libc::c_int = 0;
        // SAFETY: TIOCSPTLCK reads one int; on our own master.
        unsafe { libc::ioctl(fd, libc::TIOCSPTLCK, &zero) };
        refill(&m, p.index, &p.termios, &p.slave_input, &p.master_input)?;
        let node = format!("/dev/pts/{}", p.index);
        if p.mode != 0 {
            std::os::unix::fs::chown(&node, Some(p.uid), Some(p.gid))
                .and_then(|_| {
                    std::fs::set_permissions(
                        &node,
                        std::os::unix::fs::PermissionsExt::from_mode(p.mode),
                    )
                })
                .with_context(|| format!("giving {node} its owner and mode"))?;
        }
        // SAFETY: each ioctl reads the value passed; on our own master.
        unsafe {
            if let Some(ws) = winsize_of(&p.winsize) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn termios(lflag: u32) -> Vec<u8> {
        let mut t = vec![0u8; TERMIOS_LEN];
        t[12..16].copy_from_slice(&lflag.to_ne_bytes());
        t[17 + libc::VEOF] = 4;
        t
    }

    #[test]
    fn lines_counted_as_fionread_will() {
        let canon = termios(libc::ICANON);
        assert_eq!(complete_lines_len(&canon, b"one\ntwo\npart"), 8);
        assert_eq!(complete_lines_len(&canon, b"partial"), 0);
        assert_eq!(complete_lines_len(&canon, b"eof\x04"), 4);
        assert_eq!(complete_lines_len(&termios(0), b"raw\nbytes"), 9);
    }

    #[test]
    fn quiet_termios_keeps_canonical_mode() {
        let t = termios(libc::ICANON | libc::ECHO | libc::ISIG);
        let q = quiet_termios(&t);
        let lflag = u32::from_ne_bytes(q[12..16].try_into().unwrap());
        assert_eq!(lflag, libc::ICANON);
        assert_eq!(q[17 + libc::VEOF], 4);
    }
}

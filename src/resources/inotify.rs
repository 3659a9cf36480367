//! inotify: an instance and its watches, with their watch descriptors.
//!
//! Dump: fdinfo lists each watch (wd, mask, and the watched inode as a file
//! handle on device sdev); crust opens the handle (open_by_handle_at, on a
//! mount of that device) to learn the inode's path. Restore: the watches are
//! added in wd order; the kernel hands out wds in increasing order, so a wd
//! below the dumped one is removed and the watch added again until it
//! matches. The IN_IGNORED events those removals queue are drained before
//! the task gets the fd. Events queued at the dump are not carried.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use anyhow::{Context, Result, bail};

use super::files::{FdProbe, FileKind, RestoreCtx, new_fd};
use crate::images::pb::fd_entry::File as FdFile;
use crate::images::pb::{Inotify, InotifyWatch};

pub struct InotifyKind;

/// One `inotify wd:..` line of fdinfo, all fields hexadecimal.
struct WatchLine {
    wd: i32,
    sdev: u32,
    mask: u32,
    handle_type: i32,
    handle: Vec<u8>,
}

/// The hexadecimal value of `key:` among the space-separated fields of an
/// fdinfo mark line (inotify and fanotify print them alike).
pub(super) fn mark_field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| u64::from_str_radix(v, 16).ok())
}

/// The file handle of a mark line (fhandle-bytes, fhandle-type, f_handle).
pub(super) fn mark_handle(line: &str) -> Option<(i32, Vec<u8>)> {
    let h = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("f_handle:"))?;
    let handle = (0..h.len() / 2)
        .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    if handle.len() as u64 != mark_field(line, "fhandle-bytes")? {
        return None;
    }
    Some((mark_field(line, "fhandle-type")? as i32, handle))
}

fn parse_watch(line: &str) -> Option<WatchLine> {
    let rest = line.strip_prefix("inotify ")?;
    let (handle_type, handle) = mark_handle(rest)?;
    Some(WatchLine {
        wd: mark_field(rest, "wd")? as i32,
        sdev: mark_field(rest, "sdev")? as u32,
        mask: mark_field(rest, "mask")? as u32,
        handle_type,
        handle,
    })
}

/// A mount of the device the kernel calls `sdev` (major << 20 | minor).
pub(super) fn mount_of(sdev: u32) -> Result<OwnedFd> {
    let (_, point) = mount_point_of_dev(sdev)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        // Not O_PATH: open_by_handle_at refuses an O_PATH mount fd.
        .custom_flags(libc::O_DIRECTORY)
        .open(&point)
        .with_context(|| format!("opening mount {point}"))?;
    Ok(OwnedFd::from(f))
}

/// (mount id, mount point) of a mount of device `sdev`.
pub(super) fn mount_point_of_dev(sdev: u32) -> Result<(u32, String)> {
    let want = format!("{}:{}", sdev >> 20, sdev & 0xfffff);
    mountinfo_find(|f| f[2] == want)
        .with_context(|| format!("no mount of device {want} for a watch"))
}

/// (mount id, mount point) of the first /proc/self/mountinfo line whose
/// fields `pick` accepts.
pub(super) fn mountinfo_find(pick: impl Fn(&[&str]) -> bool) -> Option<(u32, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 4 && pick(f))
        .and_then(|f| Some((f[0].parse().ok()?, f[4].to_string())))
}

/// The path of the inode a watch is on.
fn watched_path(w: &WatchLine) -> Result<String> {
    inode_path(w.sdev, w.handle_type, &w.handle)
}

/// The path of the inode a file handle on device `sdev` names.
pub(super) fn inode_path(sdev: u32, handle_type: i32, handle: &[u8]) -> Result<String> {
    let mnt = mount_of(sdev)?;
    // struct file_handle: u32 handle_bytes, i32 handle_type, then the bytes.
    let mut fh = Vec::with_capacity(8 + handle.len());
    fh.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
    fh.extend_from_slice(&handle_type.to_ne_bytes());
    fh.extend_from_slice(handle);
    // SAFETY: open_by_handle_at reads a file_handle of the size it states.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mnt.as_raw_fd(),
            fh.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    let fd = new_fd(fd, "a handle to a watched inode")?;
    let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?
        .to_string_lossy()
        .into_owned();
    Ok(path)
}

impl FileKind for InotifyKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if p.link != "anon_inode:inotify" {
            return Ok(None);
        }
        let info = std::fs::read_to_string(format!("/proc/{}/fdinfo/{}", p.pid, p.fd))?;
        let mut watches = Vec::new();
        for line in info.lines().filter(|l| l.starts_with("inotify ")) {
            let w = parse_watch(line).ok_or_else(|| p.unreadable("inotify watch"))?;
            let path = watched_path(&w)
                .with_context(|| format!("PID {} fd {}: inotify watch {}", p.pid, p.fd, w.wd))?;
            if path.ends_with(" (deleted)") || !path.starts_with('/') {
                bail!(
                    "PID {} fd {} watches {path} with inotify, which has no path any more; crust cannot restore the watch",
                    p.pid,
                    p.fd
                );
            }
            watches.push(InotifyWatch {
                wd: w.wd,
                mask: w.mask,
                path,
            });
        }
        watches.sort_by_key(|w| w.wd);
        Ok(Some(FdFile::Inotify(Inotify {
            flags: p.flags & libc::O_NONBLOCK as u32,
            watches,
        })))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Inotify(n) = f else { return None };
        let w: Vec<String> = n
            .watches
            .iter()
            .map(|w| format!("wd {} mask {:#x} {}", w.wd, w.mask, w.path))
            .collect();
        Some(format!("inotify flags {:#o} [{}]", n.flags, w.join(", ")))
    }

    fn restore(&self, f: &FdFile, _: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Inotify(n) = f else {
            return Ok(None);
        };
        // SAFETY: inotify_init1 returns a new fd or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        let fd = new_fd(fd as i64, "an inotify instance")?;
        for w in &n.watches {
            add_watch_as(fd.as_raw_fd(), w)?;
        }
        drain(fd.as_raw_fd());
        let flags = n.flags as i32 & libc::O_NONBLOCK;
        // SAFETY: setting status flags of the instance we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) };
        Ok(Some(fd))
    }
}

/// Adds the watch until the kernel gives it the dumped wd.
fn add_watch_as(fd: RawFd, w: &InotifyWatch) -> Result<()> {
    let path = std::ffi::CString::new(w.path.as_str())?;
    for _ in 0..1 << 20 {
        // SAFETY: inotify_add_watch with a NUL-terminated path.
        let got = unsafe { libc::inotify_add_watch(fd, path.as_ptr(), w.mask) };
        if got < 0 {
            bail!(
                "watching {} with inotify: {}",
                w.path,
                std::io::Error::last_os_error()
            );
        }
        if got == w.wd {
            return Ok(());
        }
        if got > w.wd {
            bail!(
                "inotify gave watch descriptor {got} to {}, past the dumped {}",
                w.path,
                w.wd
            );
        }
        // SAFETY: removing the watch just added.
        unsafe { libc::inotify_rm_watch(fd, got) };
    }
    bail!("inotify never gave watch descriptor {} to {}", w.wd, w.path)
}

/// Reads away the events the restore itself queued (IN_IGNORED).
fn drain(fd: RawFd) {
    let mut buf = [0u8; 4096];
    // SAFETY: reading into our buffer from a non-blocking fd we own.
    while unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
}

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
    ino: u64,
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
        ino: mark_field(rest, "ino")?,
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

/// The path of the inode a file handle on device `sdev` names.
pub(super) fn inode_path(sdev: u32, handle_type: i32, handle: &[u8]) -> Result<String> {
    let fd = open_handle(sdev, handle_type, handle)?;
    let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?
        .to_string_lossy()
        .into_owned();
    Ok(path)
}

/// The kernel's device number (major << 20 | minor) in st_dev's encoding.
pub(super) fn sdev_to_dev(sdev: u32) -> u64 {
    libc::makedev(sdev >> 20, sdev & 0xfffff)
}

/// `--force-irmap`: finds a path to inode `ino` of device `sdev` by
/// walking the `roots` (directories first met first), for a watch whose
/// file handle does not open.
fn irmap_scan(sdev: u32, ino: u64, roots: &[std::path::PathBuf]) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = sdev_to_dev(sdev);
    let mut todo: std::collections::VecDeque<std::path::PathBuf> = roots.iter().cloned().collect();
    let mut seen = 0usize;
    while let Some(dir) = todo.pop_front() {
        if let Ok(m) = std::fs::symlink_metadata(&dir)
            && m.dev() == dev
            && m.ino() == ino
        {
            return Some(dir.to_string_lossy().into_owned());
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            seen += 1;
            // A bound on the walk: a scan root is a directory, not a disk.
            if seen > 1 << 20 {
                return None;
            }
            let Ok(m) = e.metadata() else { continue };
            if m.dev() == dev && m.ino() == ino {
                return Some(e.path().to_string_lossy().into_owned());
            }
            if m.is_dir() {
                todo.push_back(e.path());
            }
        }
    }
    None
}

/// Opens (O_PATH) the inode a file handle on device `sdev` names.
fn open_handle(sdev: u32, handle_type: i32, handle: &[u8]) -> Result<OwnedFd> {
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
    new_fd(fd, "a handle to a watched inode")
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
            let whose = format!("PID {} fd {}: inotify watch {}", p.pid, p.fd, w.wd);
            watches.push(dump_watch(&w, p, &whose).with_context(|| whose.clone())?);
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

    fn restore(&self, f: &FdFile, ctx: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Inotify(n) = f else {
            return Ok(None);
        };
        // SAFETY: inotify_init1 returns a new fd or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        let fd = new_fd(fd as i64, "an inotify instance")?;
        for w in &n.watches {
            // A deleted file is watched through the file crust made again.
            let path = if w.ghost {
                let made = ctx.objects.need(
                    super::ghost::ghost_key(w.dev, w.ino),
                    &format!("the deleted file {} that inotify watches", w.path),
                )?;
                format!("/proc/self/fd/{made}")
            } else {
                w.path.clone()
            };
            add_watch_as(fd.as_raw_fd(), w, &path)?;
        }
        drain(fd.as_raw_fd());
        let flags = n.flags as i32 & libc::O_NONBLOCK;
        // SAFETY: setting status flags of the instance we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) };
        Ok(Some(fd))
    }
}

/// One watch: the path of its inode, from its file handle; a deleted file
/// stored as a file without a name; with `--force-irmap`, a handle that does
/// not open found by scanning the `--irmap-scan-path` directories.
fn dump_watch(w: &WatchLine, p: &FdProbe, whose: &str) -> Result<InotifyWatch> {
    let opened = open_handle(w.sdev, w.handle_type, &w.handle);
    let path = match &opened {
        Ok(fd) => std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?
            .to_string_lossy()
            .into_owned(),
        Err(e) if p.ctx.force_irmap => irmap_scan(w.sdev, w.ino, &p.ctx.irmap_scan_paths)
            .with_context(|| {
                format!(
                    "its file handle does not open ({e:#}) and no --irmap-scan-path holds inode {}",
                    w.ino
                )
            })?,
        Err(e) => bail!(
            "its file handle does not open ({e:#}); dump with --force-irmap and --irmap-scan-path DIR to find the file by scanning DIR"
        ),
    };
    let mut watch = InotifyWatch {
        wd: w.wd,
        mask: w.mask,
        path: path.trim_end_matches(" (deleted)").to_string(),
        ..Default::default()
    };
    if path.ends_with(" (deleted)") {
        let fd = opened.context("a deleted file opened by handle")?;
        let (dev, ino, _) = p.ctx.ghosts.add(
            &format!("/proc/self/fd/{}", fd.as_raw_fd()),
            &path,
            whose,
            None,
        )?;
        (watch.ghost, watch.dev, watch.ino) = (true, dev, ino);
    } else if !path.starts_with('/') {
        bail!("it watches {path}, which has no path crust can open again");
    }
    Ok(watch)
}

/// Adds the watch on `path` until the kernel gives it the dumped wd.
fn add_watch_as(fd: RawFd, w: &InotifyWatch, path: &str) -> Result<()> {
    let path = std::ffi::CString::new(path)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn irmap_scan_finds_an_inode_below_its_roots() {
        let root = std::env::temp_dir().join(format!("crust-irmap-{}", std::process::id()));
        let deep = root.join("a/b/c");
        std::fs::create_dir_all(&deep).unwrap();
        let file = deep.join("watched");
        std::fs::write(&file, b"x").unwrap();
        let m = std::fs::metadata(&file).unwrap();
        let sdev = (libc::major(m.dev()) << 20) | libc::minor(m.dev());
        assert_eq!(sdev_to_dev(sdev), m.dev());
        assert_eq!(
            irmap_scan(sdev, m.ino(), std::slice::from_ref(&root)),
            Some(file.to_string_lossy().into_owned())
        );
        assert_eq!(irmap_scan(sdev, m.ino(), &[root.join("a/b/nothing")]), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}

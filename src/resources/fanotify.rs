//! fanotify: a group with its init flags and marks on inodes, mounts and
//! filesystems.
//!
//! Dump: fdinfo gives the group's flags and every mark: an inode mark as a
//! file handle on a device (its path found as for inotify), a mount mark by
//! mount id, a filesystem mark by device (both found in mountinfo).
//! Restore: fanotify_init with the same flags, then fanotify_mark for each
//! mark and its ignored mask. Queued events, and permission events waiting
//! for an answer, are not carried.

use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{Context, Result, bail};

use super::files::{FdProbe, FileKind, RestoreCtx, new_fd, set_status_flags};
use super::inotify::{inode_path, mark_field, mark_handle, mount_point_of_dev, mountinfo_find};
use crate::images::pb::fd_entry::File as FdFile;
use crate::images::pb::{Fanotify, FanotifyMark};

pub struct FanotifyKind;

const FAN_MARK_ADD: u32 = 0x1;
const FAN_MARK_MOUNT: u32 = 0x10;
const FAN_MARK_IGNORED_MASK: u32 = 0x20;
const FAN_MARK_FILESYSTEM: u32 = 0x100;

fn parse_mark(pid: i32, fd: i32, rest: &str) -> Result<FanotifyMark> {
    let bad = || anyhow::anyhow!("PID {pid} fd {fd}: cannot read the fanotify mark {rest:?}");
    let mflags = mark_field(rest, "mflags").ok_or_else(bad)? as u32;
    let mask = mark_field(rest, "mask").ok_or_else(bad)?;
    let ignored_mask = mark_field(rest, "ignored_mask").ok_or_else(bad)?;
    let (target, path) = if rest.starts_with("ino:") {
        let (t, h) = mark_handle(rest).ok_or_else(bad)?;
        let sdev = mark_field(rest, "sdev").ok_or_else(bad)? as u32;
        (0, inode_path(sdev, t, &h)?)
    } else if let Some(id) = mark_field(rest, "mnt_id") {
        let want = id.to_string();
        let (_, point) = mountinfo_find(|f| f[0] == want).with_context(|| {
            format!(
                "PID {pid} fd {fd}: fanotify marks mount {id}, which is not in this mount namespace"
            )
        })?;
        (FAN_MARK_MOUNT, point)
    } else {
        let sdev = mark_field(rest, "sdev").ok_or_else(bad)? as u32;
        (FAN_MARK_FILESYSTEM, mount_point_of_dev(sdev)?.1)
    };
    if path.ends_with(" (deleted)") || !path.starts_with('/') {
        bail!(
            "PID {pid} fd {fd}: fanotify marks {path}, which has no path any more; crust cannot restore the mark"
        );
    }
    Ok(FanotifyMark {
        target,
        path,
        mflags,
        mask,
        ignored_mask,
    })
}

impl FileKind for FanotifyKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if p.link != "anon_inode:[fanotify]" {
            return Ok(None);
        }
        let info = std::fs::read_to_string(format!("/proc/{}/fdinfo/{}", p.pid, p.fd))?;
        let mut group = Fanotify {
            flags: p.flags & libc::O_NONBLOCK as u32,
            ..Default::default()
        };
        for line in info.lines() {
            let Some(rest) = line.strip_prefix("fanotify ") else {
                continue;
            };
            if rest.starts_with("flags:") {
                let f = mark_field(rest, "flags").ok_or_else(|| p.unreadable("fanotify flags"))?;
                // As given to fanotify_init: fdinfo shows them, and the
                // fd's own close-on-exec and O_NONBLOCK are set apart.
                group.init_flags = f as u32;
                group.event_flags = mark_field(rest, "event-flags")
                    .ok_or_else(|| p.unreadable("fanotify event flags"))?
                    as u32;
            } else {
                group.marks.push(parse_mark(p.pid, p.fd, rest)?);
            }
        }
        Ok(Some(FdFile::Fanotify(group)))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Fanotify(g) = f else { return None };
        let m: Vec<String> = g
            .marks
            .iter()
            .map(|m| {
                format!(
                    "{} mask {:#x} ignored {:#x}",
                    m.path, m.mask, m.ignored_mask
                )
            })
            .collect();
        Some(format!(
            "fanotify flags {:#x} [{}]",
            g.init_flags,
            m.join(", ")
        ))
    }

    fn restore(&self, f: &FdFile, _: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Fanotify(g) = f else {
            return Ok(None);
        };
        // SAFETY: fanotify_init returns a new fd or -1.
        let fd = unsafe { libc::fanotify_init(g.init_flags, g.event_flags) };
        let fd = new_fd(fd as i64, "a fanotify group")?;
        // The fd's O_NONBLOCK may differ from FAN_NONBLOCK since (fcntl);
        // close-on-exec is set per fd with the table.
        set_status_flags(fd.as_raw_fd(), g.flags, "a fanotify group")?;
        // fdinfo lists the newest mark first: add them oldest first.
        for m in g.marks.iter().rev() {
            let path = std::ffi::CString::new(m.path.as_str())?;
            let base = FAN_MARK_ADD | m.target | m.mflags;
            for (extra, mask) in [(0, m.mask), (FAN_MARK_IGNORED_MASK, m.ignored_mask)] {
                if mask == 0 {
                    continue;
                }
                // SAFETY: fanotify_mark with a NUL-terminated path.
                let r = unsafe {
                    libc::fanotify_mark(
                        fd.as_raw_fd(),
                        base | extra,
                        mask,
                        libc::AT_FDCWD,
                        path.as_ptr(),
                    )
                };
                if r < 0 {
                    bail!(
                        "marking {} with fanotify (mask {mask:#x}): {}",
                        m.path,
                        std::io::Error::last_os_error()
                    );
                }
            }
        }
        Ok(Some(fd))
    }
}

//! Files that have no name any more: regular files deleted while open
//! ("ghost files") and memfds. Their contents are read through
//! /proc/PID/fd/N at dump and travel in the files image; on restore a ghost
//! file is recreated unnamed (O_TMPFILE) in its old directory and a memfd
//! with memfd_create, refilled, sealed as it was, and reopened with the
//! task's flags and offset. Mappings of such files are refused for now.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use anyhow::{Context, Result, bail};

use super::files::{FdProbe, FileKind, RestoreCtx};
use crate::images::pb::GhostFile;
use crate::images::pb::fd_entry::File as FdFile;

/// Largest ghost file carried in the images.
const GHOST_LIMIT: u64 = 64 << 20;
const DELETED: &str = " (deleted)";

pub struct GhostFileKind;

impl FileKind for GhostFileKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        let Some(path) = p.link.strip_suffix(DELETED) else {
            return Ok(None);
        };
        if !p.meta.is_file() {
            return Ok(None);
        }
        if p.meta.size() > GHOST_LIMIT {
            bail!(
                "PID {} fd {} is the deleted file {path} of {} bytes; crust carries deleted files up to {GHOST_LIMIT} bytes",
                p.pid,
                p.fd,
                p.meta.size()
            );
        }
        let proc_path = format!("/proc/{}/fd/{}", p.pid, p.fd);
        let mut f =
            std::fs::File::open(&proc_path).with_context(|| format!("reopening {proc_path}"))?;
        let mut data = Vec::new();
        f.read_to_end(&mut data)
            .with_context(|| format!("reading the deleted file {path}"))?;
        let memfd = path.starts_with("/memfd:");
        // SAFETY: F_GET_SEALS on an fd we own; -1 (EINVAL) for non-memfds.
        let seals = if memfd {
            unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) }.max(0) as u32
        } else {
            0
        };
        Ok(Some(FdFile::Ghost(GhostFile {
            path: path.strip_prefix("/memfd:").unwrap_or(path).to_string(),
            flags: p.flags & !(libc::O_CLOEXEC as u32),
            pos: p.pos,
            mode: p.meta.mode() & 0o7777,
            data,
            memfd,
            seals,
        })))
    }

    fn restore(&self, f: &FdFile, _: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Ghost(g) = f else { return Ok(None) };
        let made = if g.memfd {
            let name = std::ffi::CString::new(g.path.as_str())?;
            // SAFETY: memfd_create with a NUL-terminated name.
            let fd = unsafe {
                libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
            };
            if fd < 0 {
                bail!(
                    "creating memfd {}: {}",
                    g.path,
                    std::io::Error::last_os_error()
                );
            }
            // SAFETY: fd was just created and is owned by no one else.
            unsafe { OwnedFd::from_raw_fd(fd) }
        } else {
            let dir = std::path::Path::new(&g.path)
                .parent()
                .context("a deleted file without a directory")?;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_TMPFILE)
                .open(dir)
                .with_context(|| {
                    format!(
                        "recreating the deleted file {} in {}",
                        g.path,
                        dir.display()
                    )
                })?;
            f.set_permissions(std::fs::Permissions::from_mode(g.mode))?;
            OwnedFd::from(f)
        };
        let mut file = std::fs::File::from(made);
        file.write_all(&g.data)
            .with_context(|| format!("refilling {}", g.path))?;
        if g.seals != 0 {
            // SAFETY: F_ADD_SEALS on a memfd we own.
            if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, g.seals as i32) } < 0 {
                bail!(
                    "sealing memfd {}: {}",
                    g.path,
                    std::io::Error::last_os_error()
                );
            }
        }
        // The task's own description: reopened with its access mode and flags.
        let reopen = format!("/proc/self/fd/{}", file.as_raw_fd());
        let flags =
            (g.flags as i32 & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL)) | libc::O_CLOEXEC;
        let c = std::ffi::CString::new(reopen)?;
        // SAFETY: open(2) of a NUL-terminated path.
        let fd = unsafe { libc::open(c.as_ptr(), flags) };
        if fd < 0 {
            bail!("reopening {}: {}", g.path, std::io::Error::last_os_error());
        }
        // SAFETY: fd was just opened and is owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: lseek on an fd we own.
        if unsafe { libc::lseek(fd.as_raw_fd(), g.pos as i64, libc::SEEK_SET) } < 0 {
            bail!(
                "seeking {} to {}: {}",
                g.path,
                g.pos,
                std::io::Error::last_os_error()
            );
        }
        Ok(Some(fd))
    }
}

use std::os::unix::fs::OpenOptionsExt;

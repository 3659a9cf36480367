//! FIFOs (named pipes), opened by their path, with the bytes sitting in
//! their buffer and its capacity.
//!
//! Dump: the path, the flags, and the buffer copied with `tee` (as for
//! pipes, `pipes::copy_pipe_buffer`). Restore: before the tree forks, crust
//! opens each FIFO once read-write ("keeper": it never blocks, and keeps the
//! buffer alive while nobody else holds the FIFO), gives it its capacity
//! and refills it; every task then opens the path with its own flags, which
//! does not block since the keeper is both a reader and a writer. The
//! tasks drop their copies of the keeper once their fds are in place.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use anyhow::{Context, Result, bail};

use super::files::{FdProbe, FileKind, RestoreCtx};
use crate::images::pb::fd_entry::File as FdFile;
use crate::images::pb::{FdTable, Fifo};

pub struct FifoKind;

fn open_path(path: &str, flags: i32) -> Result<OwnedFd> {
    let c = std::ffi::CString::new(path)?;
    // SAFETY: open(2) of a NUL-terminated path.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        bail!("opening FIFO {path}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl FileKind for FifoKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if !p.meta.file_type().is_fifo() || p.link.starts_with("pipe:[") {
            return Ok(None);
        }
        if !p.link.starts_with('/') || p.link.ends_with(" (deleted)") {
            bail!(
                "PID {} fd {} is the FIFO {}, which has no path any more; crust cannot restore it",
                p.pid,
                p.fd,
                p.link
            );
        }
        let (capacity, data) = super::pipes::copy_pipe_buffer(p.pid, p.fd)?;
        Ok(Some(FdFile::Fifo(Fifo {
            path: p.link.to_string(),
            flags: p.flags & !(libc::O_CLOEXEC as u32),
            dev: p.meta.dev(),
            ino: p.meta.ino(),
            data,
            capacity,
        })))
    }

    fn restore(&self, f: &FdFile, ctx: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Fifo(e) = f else { return Ok(None) };
        if !ctx.inodes.contains_key(&(e.dev, e.ino)) {
            bail!("FIFO {} was not prepared before the fork", e.path);
        }
        // The keeper holds both ends: opening does not block, whatever the
        // access mode. The task's own O_NONBLOCK is set afterwards.
        let fd = open_path(
            &e.path,
            (e.flags as i32 & libc::O_ACCMODE) | libc::O_NONBLOCK,
        )?;
        let keep = (libc::O_NONBLOCK | libc::O_APPEND | libc::O_DIRECT) as u32;
        // SAFETY: setting status flags of the description we hold.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, (e.flags & keep) as i32) } < 0 {
            bail!(
                "setting the flags of FIFO {}: {}",
                e.path,
                std::io::Error::last_os_error()
            );
        }
        Ok(Some(fd))
    }
}

/// Opens every FIFO the tree holds once, read-write, with its capacity and
/// the bytes its buffer held; keyed by the dumped (dev, ino).
pub fn open_fifo_keepers<'a>(
    tables: impl Iterator<Item = &'a FdTable>,
) -> Result<HashMap<(u64, u64), RawFd>> {
    let mut out = HashMap::new();
    for e in tables.flat_map(|t| &t.fds) {
        let Some(FdFile::Fifo(f)) = &e.file else {
            continue;
        };
        if out.contains_key(&(f.dev, f.ino)) {
            continue;
        }
        match std::fs::metadata(&f.path) {
            Ok(m) if m.file_type().is_fifo() => {}
            _ => bail!(
                "FIFO {} is gone or no longer a FIFO; recreate it (mkfifo {}) and restore again",
                f.path,
                f.path
            ),
        }
        let keeper = open_path(&f.path, libc::O_RDWR | libc::O_NONBLOCK)?;
        // SAFETY: fcntl on a FIFO we hold.
        if unsafe { libc::fcntl(keeper.as_raw_fd(), libc::F_SETPIPE_SZ, f.capacity as i32) } < 0 {
            bail!(
                "giving FIFO {} its capacity of {} bytes: {}",
                f.path,
                f.capacity,
                std::io::Error::last_os_error()
            );
        }
        let n = nix::unistd::write(&keeper, &f.data)
            .with_context(|| format!("refilling FIFO {}", f.path))?;
        if n != f.data.len() {
            bail!(
                "refilling FIFO {}: {n} of {} bytes fit; something else filled it",
                f.path,
                f.data.len()
            );
        }
        out.insert((f.dev, f.ino), keeper.into_raw_fd());
    }
    Ok(out)
}

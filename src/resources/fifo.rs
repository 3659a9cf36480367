//! FIFOs (named pipes), opened by their path, with the bytes sitting in
//! their buffer and its capacity. A FIFO deleted while held is made again
//! without a name (`ghost`) and reopened from that.
//!
//! Dump: the path, the flags, and the buffer copied with `tee` (as for
//! pipes, `pipes::copy_pipe_buffer`). Restore: before the tree forks, crust
//! opens each FIFO once read-write ("keeper": it never blocks, and keeps the
//! buffer alive while nobody else holds the FIFO), gives it its capacity
//! and refills it; every task then opens the path with its own flags, which
//! does not block since the keeper is both a reader and a writer. The
//! tasks drop their copies of the keeper once their fds are in place.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use anyhow::{Context, Result, bail};

use super::files::{
    FdProbe, FileKind, ObjKey, RestoreCtx, TreeImages, TreeObjects, dup_fd, reopen,
    set_status_flags,
};
use crate::images::pb::Fifo;
use crate::images::pb::fd_entry::File as FdFile;

/// The tree object of a FIFO's keeper.
fn keeper_key(f: &Fifo) -> ObjKey {
    ("fifo", f.dev, f.ino)
}

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
        let ghost = super::ghost::is_ghost_path(p.link);
        if ghost {
            let whose = format!("PID {} fd {}", p.pid, p.fd);
            p.ctx.ghosts.add(&p.proc_path(), p.link, &whose, None)?;
        } else if !p.link.starts_with('/') {
            bail!(
                "PID {} fd {} is the FIFO {}, which has no path; crust cannot restore it",
                p.pid,
                p.fd,
                p.link
            );
        }
        let (capacity, data) = super::pipes::copy_pipe_buffer(p.pid, p.fd)?;
        Ok(Some(FdFile::Fifo(Fifo {
            path: p.link.trim_end_matches(" (deleted)").to_string(),
            flags: p.open_flags(),
            dev: p.meta.dev(),
            ino: p.meta.ino(),
            data,
            capacity,
            ghost,
        })))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Fifo(f) = f else { return None };
        Some(format!(
            "FIFO {}{} flags {:#o}, {} bytes buffered (capacity {})",
            f.path,
            if f.ghost { " (deleted)" } else { "" },
            f.flags,
            f.data.len(),
            f.capacity
        ))
    }

    fn prepare(&self, t: &TreeImages, objects: &mut TreeObjects) -> Result<()> {
        for (_, _, file) in t.files() {
            let FdFile::Fifo(f) = file else { continue };
            if !objects.contains(keeper_key(f)) {
                let keeper = open_keeper(f, objects)?;
                objects.insert(keeper_key(f), keeper);
            }
        }
        Ok(())
    }

    fn restore(&self, f: &FdFile, ctx: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Fifo(e) = f else { return Ok(None) };
        let keeper = ctx
            .objects
            .need(keeper_key(e), &format!("the keeper of FIFO {}", e.path))?;
        // The keeper holds both ends: opening does not block, whatever the
        // access mode. The task's own O_NONBLOCK is set afterwards.
        let access = (e.flags as i32 & libc::O_ACCMODE) | libc::O_NONBLOCK;
        let fd = if e.ghost {
            reopen(keeper, access, &e.path)?
        } else {
            open_path(&e.path, access)?
        };
        set_status_flags(fd.as_raw_fd(), e.flags, &format!("FIFO {}", e.path))?;
        Ok(Some(fd))
    }
}

/// Opens a FIFO once read-write (a deleted one: the one `ghost` made), with
/// its capacity and the bytes its buffer held.
fn open_keeper(f: &Fifo, objects: &TreeObjects) -> Result<OwnedFd> {
    let keeper = if f.ghost {
        let made = objects.need(
            super::ghost::ghost_key(f.dev, f.ino),
            &format!("the deleted FIFO {}", f.path),
        )?;
        dup_fd(made)?
    } else {
        match std::fs::metadata(&f.path) {
            Ok(m) if m.file_type().is_fifo() => {}
            _ => bail!(
                "FIFO {} is gone or no longer a FIFO; recreate it (mkfifo {}) and restore again",
                f.path,
                f.path
            ),
        }
        open_path(&f.path, libc::O_RDWR | libc::O_NONBLOCK)?
    };
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
    Ok(keeper)
}

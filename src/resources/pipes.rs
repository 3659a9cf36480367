//! Pipes: both ends anywhere in the dumped tree, with the bytes sitting in
//! the buffer and the buffer's capacity.
//!
//! Dump: crust opens the pipe through /proc/PID/fd/N and `tee`s its buffer
//! into a pipe of its own, which copies the data without taking it from
//! the task. Restore: crust makes one pipe per dumped inode before the tree
//! is forked, refills it, and every task dups the end it held; tasks that
//! shared an end share one open file description again.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};

use anyhow::{Context, Result, bail};

use super::files::{
    FdProbe, FileKind, ObjKey, RestoreCtx, TreeImages, TreeObjects, dup_fd, reopen,
    set_status_flags,
};
use crate::images::pb::fd_entry::File as FdFile;
use crate::images::pb::{FdTable, PipeData, PipeEnd};

pub struct PipeKind;

/// The tree object of a pipe's end crust made.
fn end_key(ino: u64, write: bool) -> ObjKey {
    (if write { "pipe-w" } else { "pipe-r" }, ino, 0)
}

impl FileKind for PipeKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if !p.meta.file_type().is_fifo() || !p.link.starts_with("pipe:[") {
            return Ok(None);
        }
        let ino = p.meta.ino();
        if p.ctx.first_time(("pipe", ino, 0)) {
            let (capacity, data) = copy_pipe_buffer(p.pid, p.fd)?;
            p.ctx.new_pipes.borrow_mut().push(PipeData {
                ino,
                capacity,
                data,
            });
        }
        let write = p.flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32;
        Ok(Some(FdFile::Pipe(PipeEnd {
            ino,
            write,
            flags: p.open_flags(),
            external: false,
            original: p.ctx.first_time(("pipe-end", ino, write as u64)),
        })))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Pipe(p) = f else { return None };
        Some(format!(
            "pipe:[{}] {} end flags {:#o}{}",
            p.ino,
            if p.write { "write" } else { "read" },
            p.flags,
            if p.external {
                " (other end outside the tree)"
            } else {
                ""
            }
        ))
    }

    fn prepare(&self, t: &TreeImages, objects: &mut TreeObjects) -> Result<()> {
        for (ino, (r, w)) in create_pipes(t.tables.iter().copied(), t.inherit_fds)? {
            for (fd, write) in [(r, false), (w, true)] {
                if fd >= 0 {
                    // SAFETY: the fds create_pipes made are crust's alone.
                    objects.insert(end_key(ino, write), unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        Ok(())
    }

    fn restore(&self, f: &FdFile, ctx: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Pipe(e) = f else { return Ok(None) };
        let side = if e.write { "write" } else { "read" };
        let end = ctx.objects.need(
            end_key(e.ino, e.write),
            &format!("the {side} end of pipe {}", e.ino),
        )?;
        let what = format!("pipe {}", e.ino);
        // The first description of the end is crust's end itself; any
        // other gets a description of its own, opened non-blocking (crust
        // holds the other end, or the process outside does, so it would
        // not block anyway). A pipe whose other end is gone altogether
        // cannot be opened like this, and shares crust's description.
        let access = if e.write {
            libc::O_WRONLY
        } else {
            libc::O_RDONLY
        };
        let fd = match e.original {
            true => dup_fd(end)?,
            false => reopen(end, access | libc::O_NONBLOCK, &what).or_else(|_| dup_fd(end))?,
        };
        set_status_flags(fd.as_raw_fd(), e.flags, &what)?;
        Ok(Some(fd))
    }
}

/// Copies what is buffered in the pipe or FIFO behind PID's fd, leaving it
/// there; returns the pipe's capacity and the bytes.
pub fn copy_pipe_buffer(pid: i32, fd: RawFd) -> Result<(u32, Vec<u8>)> {
    let path = format!("/proc/{pid}/fd/{fd}");
    let whose = format!("PID {pid} fd {fd}");
    let src = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .with_context(|| format!("opening {path}"))?;
    // SAFETY: fcntl on an fd we own.
    let capacity = unsafe { libc::fcntl(src.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if capacity < 0 {
        bail!(
            "reading the pipe capacity of {whose}: {}",
            std::io::Error::last_os_error()
        );
    }
    let (tmp_r, tmp_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    // SAFETY: fcntl on an fd we own; a smaller copy pipe only limits tee below.
    unsafe { libc::fcntl(tmp_w.as_raw_fd(), libc::F_SETPIPE_SZ, capacity) };
    // SAFETY: tee between two pipes; no user memory is involved.
    let n = unsafe {
        libc::tee(
            src.as_raw_fd(),
            tmp_w.as_raw_fd(),
            capacity as usize,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    let n = match n {
        n if n >= 0 => n as usize,
        _ if std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) => 0,
        _ => bail!(
            "copying the pipe buffer of {whose}: {}",
            std::io::Error::last_os_error()
        ),
    };
    let mut data = vec![0u8; n];
    std::fs::File::from(tmp_r)
        .read_exact(&mut data)
        .context("reading a pipe's buffer")?;
    Ok((capacity as u32, data))
}

/// Which ends of each pipe the tree holds: (read, write).
fn ends_held<'a>(tables: impl Iterator<Item = &'a FdTable>) -> HashMap<u64, (bool, bool)> {
    let mut ends: HashMap<u64, (bool, bool)> = HashMap::new();
    for t in tables {
        for e in &t.fds {
            if let Some(FdFile::Pipe(p)) = &e.file {
                let x = ends.entry(p.ino).or_default();
                if p.write { x.1 = true } else { x.0 = true }
            }
        }
    }
    ends
}

/// A process outside `tree` that holds pipe `ino` open, if any.
fn outside_holder(ino: u64, tree: &[i32]) -> Option<i32> {
    let link = format!("pipe:[{ino}]");
    for p in std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
    {
        if tree.contains(&p) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{p}/fd")) else {
            continue;
        };
        if fds
            .filter_map(|e| e.ok())
            .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == link.as_str()))
        {
            return Some(p);
        }
    }
    None
}

/// Marks the pipes whose other end a process outside the tree holds
/// (`PipeEnd.external`; a shell's `producer | task`, a logger reading the
/// task's stdout): the restore connects them to a pipe from the user
/// (`--inherit-fd`), or else gives the tree a fresh pipe with the bytes
/// that were buffered. A pipe whose other end is closed everywhere (make's
/// "bad stdin", say) stays the tree's own.
pub fn mark_external_pipes(tree: &[i32], tables: &mut [FdTable]) {
    let external: Vec<u64> = ends_held(tables.iter())
        .into_iter()
        .filter(|&(ino, (r, w))| !(r && w) && outside_holder(ino, tree).is_some())
        .map(|(ino, _)| ino)
        .collect();
    for t in tables.iter_mut() {
        for e in &mut t.fds {
            if let Some(FdFile::Pipe(p)) = &mut e.file
                && external.contains(&p.ino)
            {
                p.external = true;
            }
        }
    }
}

/// Makes the tree's pipes in crust, refilled, before anything forks; every
/// restored task inherits them and opens the ends it held.
fn create_pipes<'a>(
    tables: impl Iterator<Item = (i32, &'a FdTable)> + Clone,
    inherited: &[(RawFd, String)],
) -> Result<HashMap<u64, (RawFd, RawFd)>> {
    let mut out = HashMap::new();
    for (ino, (r, w)) in ends_held(tables.clone().map(|(_, t)| t)) {
        let Some((pid, fd)) = tables.clone().find_map(|(pid, t)| {
            t.fds.iter().find_map(|e| match &e.file {
                Some(FdFile::Pipe(p)) if p.ino == ino && p.external => Some((pid, e.fd)),
                _ => None,
            })
        }) else {
            continue;
        };
        let key = format!("pipe:[{ino}]");
        let Some(&(given, _)) = inherited.iter().find(|(_, k)| *k == key) else {
            // As criu: a fresh pipe, refilled; its other end stays closed.
            tracing::warn!(
                "PID {pid} fd {fd} held the pipe {key}, whose other end was outside the dumped tree; it gets a fresh pipe with the bytes that were buffered (its other end closed); to connect it to a pipe of your own, restore with --inherit-fd fd[N]:{key}"
            );
            continue;
        };
        // SAFETY: fcntl on an fd the user handed to crust.
        let acc = unsafe { libc::fcntl(given, libc::F_GETFL) };
        let want = if w { libc::O_WRONLY } else { libc::O_RDONLY };
        if acc < 0
            || (acc & libc::O_ACCMODE != want && acc & libc::O_ACCMODE != libc::O_RDWR)
            || r && w
        {
            bail!(
                "--inherit-fd fd[{given}]:{key}: fd {given} is not open for {} (the end the tree held)",
                if w { "writing" } else { "reading" }
            );
        }
        // SAFETY: a copy of the user's fd, owned by crust like its own pipes.
        let copy = unsafe { libc::fcntl(given, libc::F_DUPFD_CLOEXEC, 0) };
        if copy < 0 {
            bail!(
                "duplicating --inherit-fd fd[{given}]: {}",
                std::io::Error::last_os_error()
            );
        }
        out.insert(ino, if w { (-1, copy) } else { (copy, -1) });
    }
    for d in tables.flat_map(|(_, t)| t.pipes.iter()) {
        if out.contains_key(&d.ino) {
            // Connected to the user's pipe: its buffer is that pipe's.
            continue;
        }
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        // SAFETY: fcntl on a pipe we own.
        if unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, d.capacity as i32) } < 0 {
            bail!(
                "giving pipe {} its capacity of {} bytes: {}",
                d.ino,
                d.capacity,
                std::io::Error::last_os_error()
            );
        }
        nix::unistd::write(&w, &d.data).with_context(|| format!("refilling pipe {}", d.ino))?;
        // The fds live as long as crust; the forked tasks close their copies.
        out.insert(
            d.ino,
            (
                std::os::fd::IntoRawFd::into_raw_fd(r),
                std::os::fd::IntoRawFd::into_raw_fd(w),
            ),
        );
    }
    Ok(out)
}

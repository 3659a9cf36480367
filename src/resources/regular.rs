//! Regular files, directories, and symlinks held with O_PATH|O_NOFOLLOW,
//! opened by path: reopened at their path with their flags and offset. A
//! file replaced at its path, or resized, since the dump is refused by name
//! (the task would see other data).
//!
//! A file under /proc/N/ of a task N of the tree (its stat, maps, an fdinfo)
//! names a task that exists again only as the tree is rebuilt: it is not
//! checked before the restore, and is opened in its task once every other
//! fd is in place (fdinfo/M needs fd M), waiting for another task N to
//! appear.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::files::{FdProbe, FileKind, RestoreCtx, open_fd, seek_to, try_open};
use crate::images::pb::fd_entry::File as FdFile;
use crate::images::pb::{RegularFile, TreeProcPath};
use crate::proc;

pub struct RegularFileKind;

/// How long a task waits for another task of the tree whose /proc file it
/// opens (or for that task's fd, for its fdinfo) to be there.
const PROC_WAIT: Duration = Duration::from_secs(10);

/// Whether the file now at a dumped path is another one than the dumped
/// (dev, ino): on the same filesystem a new inode means the path was
/// replaced. On another filesystem (images moved to another host, say)
/// inodes say nothing, and the size check is what remains.
pub fn replaced(now: &fs::Metadata, dev: u64, ino: u64) -> bool {
    now.dev() == dev && now.ino() != ino
}

/// Whether `tid` is a thread (not the leader) of process `pid`.
fn thread_of(pid: i32, tid: i32) -> bool {
    tid != pid && Path::new(&format!("/proc/{pid}/task/{tid}")).exists()
}

/// The /proc/N/ part of an fd's path when N is a task of the tree.
fn tree_proc_path(p: &FdProbe) -> Result<Option<TreeProcPath>> {
    let Some((n, rest)) = proc::split_pid_path(p.link) else {
        return Ok(None);
    };
    if !proc::on_fs(&p.proc_path(), nix::sys::statfs::PROC_SUPER_MAGIC) {
        return Ok(None);
    }
    if !p.ctx.tree.iter().any(|&t| t == n || thread_of(t, n)) {
        return Ok(None);
    }
    // The holder's own other threads are made last, by the restorer: none
    // exists while its fds are opened.
    let tid = rest
        .strip_prefix("task/")
        .and_then(|r| r.split('/').next()?.parse().ok())
        .filter(|_| n == p.pid)
        .unwrap_or(n);
    if thread_of(p.pid, tid) {
        bail!(
            "PID {} fd {} is {}, a file of its own thread {tid}, which is made again only after the fds; crust cannot reopen it; close it or open it through the process (/proc/{}/...)",
            p.pid,
            p.fd,
            p.link,
            p.pid
        );
    }
    Ok(Some(TreeProcPath {
        pid: n,
        rest: rest.to_string(),
    }))
}

/// Opens a /proc file of a task of the tree: one of another task waits
/// until that task (or its fd, for an fdinfo) is there.
fn open_tree_proc(r: &RegularFile, pp: &TreeProcPath) -> Result<OwnedFd> {
    let own = pp.pid == std::process::id() as i32;
    let t0 = Instant::now();
    loop {
        match try_open(&r.path, r.flags) {
            Ok(fd) => return Ok(fd),
            Err(e)
                if !own && e.raw_os_error() == Some(libc::ENOENT) && t0.elapsed() < PROC_WAIT =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) if own => bail!("opening {}: {e}", r.path),
            Err(e) => bail!(
                "opening {} (of task {} of the tree): {e}, after waiting {:?} for it (a thread is made again only after its process's fds: two processes that hold files of each other's threads cannot be restored)",
                r.path,
                pp.pid,
                t0.elapsed()
            ),
        }
    }
}

impl FileKind for RegularFileKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        let ft = p.meta.file_type();
        // Only a path can be opened again (a namespace file shows as
        // net:[INO], say).
        if !(ft.is_file() || ft.is_dir() || ft.is_symlink()) || !p.link.starts_with('/') {
            return Ok(None);
        }
        Ok(Some(FdFile::Regular(RegularFile {
            path: p.link.to_string(),
            flags: p.open_flags(),
            pos: p.pos,
            size: if p.meta.is_file() { p.meta.size() } else { 0 },
            dev: p.meta.dev(),
            ino: p.meta.ino(),
            proc: tree_proc_path(p)?,
        })))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Regular(r) = f else { return None };
        let of = match &r.proc {
            Some(pp) => format!(" (of task {} of the tree)", pp.pid),
            None => String::new(),
        };
        Some(format!(
            "file {}{of} flags {:#o} pos {} size {}",
            r.path, r.flags, r.pos, r.size
        ))
    }

    fn check(&self, f: &FdFile) -> Result<()> {
        let FdFile::Regular(r) = f else { return Ok(()) };
        if r.proc.is_some() {
            // Its task is not there yet; /proc has no sizes or lasting inodes.
            return Ok(());
        }
        // A symlink held itself (O_PATH|O_NOFOLLOW) is checked as the link.
        let nofollow = r.flags & libc::O_NOFOLLOW as u32 != 0 && r.flags & libc::O_PATH as u32 != 0;
        let md = if nofollow {
            fs::symlink_metadata(&r.path)
        } else {
            fs::metadata(&r.path)
        }
        .map_err(|err| {
            anyhow::anyhow!("file {} is gone ({err}); put it back to restore", r.path)
        })?;
        if replaced(&md, r.dev, r.ino) {
            bail!(
                "file {} was replaced by another file since the dump; restore the original file",
                r.path
            );
        }
        if md.is_file() && md.size() != r.size {
            bail!(
                "file {} changed size since the dump ({} bytes, now {}); restore the original file",
                r.path,
                r.size,
                md.size()
            );
        }
        Ok(())
    }

    fn opens_late(&self, f: &FdFile) -> bool {
        matches!(f, FdFile::Regular(r) if r.proc.is_some())
    }

    fn restore(&self, f: &FdFile, _: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Regular(r) = f else {
            return Ok(None);
        };
        let fd = match &r.proc {
            Some(pp) => open_tree_proc(r, pp)?,
            None => open_fd(&r.path, r.flags)?,
        };
        // An O_PATH fd has no offset; some /proc files cannot seek at all.
        if r.flags & libc::O_PATH as u32 == 0 && (r.pos != 0 || r.proc.is_none()) {
            seek_to(fd.as_raw_fd(), r.pos, &r.path)?;
        }
        Ok(Some(fd))
    }
}

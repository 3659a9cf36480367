//! Files that have no name any more: regular files deleted while open or
//! mapped ("ghost files") and memfds. Their contents are read through
//! /proc/PID/fd/N (an fd) or /proc/PID/map_files (a mapping) at dump and
//! travel in the files or mm image. On restore crust recreates each mapped
//! one once for the whole tree before anything forks (`create_tree_ghosts`,
//! by dev/ino, so every mapping and fd of it shares one file again); a
//! ghost only held by fds is recreated by the fd's restore. A ghost file
//! comes back unnamed (O_TMPFILE) in its old directory, a memfd with
//! memfd_create, refilled and sealed as it was.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};

use anyhow::{Context, Result, bail};

use super::files::{FdProbe, FileKind, RestoreCtx};
use crate::images::pb::fd_entry::File as FdFile;
use crate::images::pb::{GhostData, GhostFile, MmEntry};

/// Largest ghost file carried in the images.
const GHOST_LIMIT: u64 = 64 << 20;
const DELETED: &str = " (deleted)";
const MEMFD: &str = "/memfd:";

/// Whether a /proc link or maps path names a file with no name.
pub fn is_ghost_path(shown: &str) -> bool {
    shown.ends_with(DELETED) || shown.starts_with(MEMFD)
}

/// Reads the nameless file `shown` (as /proc shows it) through `proc_path`;
/// `whose` names the holder in errors.
pub fn read_ghost(proc_path: &str, shown: &str, whose: &str) -> Result<GhostData> {
    let mut f = std::fs::File::open(proc_path).with_context(|| format!("reopening {proc_path}"))?;
    let meta = f.metadata()?;
    let path = shown.strip_suffix(DELETED).unwrap_or(shown);
    if !meta.is_file() {
        bail!("{whose} is {shown}, which crust cannot restore");
    }
    if meta.size() > GHOST_LIMIT {
        bail!(
            "{whose} is the deleted file {path} of {} bytes; crust carries deleted files up to {GHOST_LIMIT} bytes",
            meta.size()
        );
    }
    let mut data = Vec::new();
    f.read_to_end(&mut data)
        .with_context(|| format!("reading the deleted file {path}"))?;
    let memfd = path.starts_with(MEMFD);
    // SAFETY: F_GET_SEALS on an fd we own.
    let seals = if memfd {
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) }.max(0) as u32
    } else {
        0
    };
    Ok(GhostData {
        dev: meta.dev(),
        ino: meta.ino(),
        path: path.strip_prefix(MEMFD).unwrap_or(path).to_string(),
        memfd,
        seals,
        mode: meta.mode() & 0o7777,
        data,
    })
}

/// Creates the file anew, unnamed, filled and sealed; read-write.
pub fn create_ghost(g: &GhostData) -> Result<OwnedFd> {
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
    Ok(OwnedFd::from(file))
}

/// Opens a new description of the file crust holds as `fd`, with `flags`.
pub fn reopen(fd: RawFd, flags: i32, name: &str) -> Result<OwnedFd> {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}"))?;
    let flags = (flags & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL)) | libc::O_CLOEXEC;
    // SAFETY: open(2) of a NUL-terminated path.
    let fd = unsafe { libc::open(path.as_ptr(), flags) };
    if fd < 0 {
        bail!("reopening {name}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates every nameless file the tree maps, once per (dev, ino); crust
/// holds them (the tasks inherit the fds at fork) until the tree is built.
pub fn create_tree_ghosts<'a>(
    mms: impl Iterator<Item = &'a MmEntry>,
) -> Result<HashMap<(u64, u64), RawFd>> {
    let mut out = HashMap::new();
    for g in mms.flat_map(|mm| &mm.ghosts) {
        if let std::collections::hash_map::Entry::Vacant(e) = out.entry((g.dev, g.ino)) {
            // Held read-only: a file open for writing anywhere cannot become
            // a task's executable again (PR_SET_MM_MAP denies it).
            let rw = create_ghost(g)?;
            e.insert(reopen(rw.as_raw_fd(), libc::O_RDONLY, &g.path)?.into_raw_fd());
        }
    }
    Ok(out)
}

pub struct GhostFileKind;

impl FileKind for GhostFileKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if !is_ghost_path(p.link) || !p.meta.is_file() {
            return Ok(None);
        }
        let proc_path = format!("/proc/{}/fd/{}", p.pid, p.fd);
        let whose = format!("PID {} fd {}", p.pid, p.fd);
        Ok(Some(FdFile::Ghost(GhostFile {
            file: Some(read_ghost(&proc_path, p.link, &whose)?),
            flags: p.flags & !(libc::O_CLOEXEC as u32),
            pos: p.pos,
        })))
    }

    fn restore(&self, f: &FdFile, ctx: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Ghost(g) = f else { return Ok(None) };
        let data = g
            .file
            .as_ref()
            .context("a ghost fd entry without its file")?;
        // The file the tree maps, if it does; else a file of this fd's own.
        let own;
        let made = match ctx.inodes.get(&(data.dev, data.ino)) {
            Some(&fd) => fd,
            None => {
                own = create_ghost(data)?;
                own.as_raw_fd()
            }
        };
        let fd = reopen(made, g.flags as i32, &data.path)?;
        // SAFETY: lseek on an fd we own.
        if unsafe { libc::lseek(fd.as_raw_fd(), g.pos as i64, libc::SEEK_SET) } < 0 {
            bail!(
                "seeking {} to {}: {}",
                data.path,
                g.pos,
                std::io::Error::last_os_error()
            );
        }
        Ok(Some(fd))
    }
}

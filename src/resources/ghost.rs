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
use crate::images::pb::{FdTable, GhostData, GhostDir, GhostFile, MmEntry};

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
    // O_NOFOLLOW would refuse the /proc magic link itself (sqlite opens its
    // temporary files with it); it says nothing about the open file.
    let flags = (flags & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_NOFOLLOW))
        | libc::O_CLOEXEC;
    // SAFETY: open(2) of a NUL-terminated path.
    let fd = unsafe { libc::open(path.as_ptr(), flags) };
    if fd < 0 {
        bail!("reopening {name}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the directory behind a /proc link (`proc_path`, shown as
/// `shown`) was deleted: the link says so and the directory has no links.
pub fn is_ghost_dir(proc_path: &str, shown: &str) -> bool {
    shown.ends_with(DELETED)
        && std::fs::metadata(proc_path).is_ok_and(|m| m.is_dir() && m.nlink() == 0)
}

/// Describes the deleted directory behind a /proc link.
pub fn dump_ghost_dir(proc_path: &str, shown: &str) -> Result<GhostDir> {
    let md = std::fs::metadata(proc_path).with_context(|| format!("stat {proc_path}"))?;
    Ok(GhostDir {
        path: shown.strip_suffix(DELETED).unwrap_or(shown).to_string(),
        dev: md.dev(),
        ino: md.ino(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        flags: 0,
        pos: 0,
    })
}

/// Makes a deleted directory again: created at its old path (beside it,
/// under a temporary name, when something else has that path now; missing
/// parents are made and removed again), given its mode and owner, opened
/// (O_PATH) and removed. The holders then get a directory with no name, as
/// they had.
pub fn create_ghost_dir(g: &GhostDir) -> Result<OwnedFd> {
    let path = std::path::Path::new(&g.path);
    let mut made: Vec<&std::path::Path> = path
        .ancestors()
        .skip(1)
        .take_while(|a| !a.as_os_str().is_empty() && std::fs::symlink_metadata(a).is_err())
        .collect();
    made.reverse();
    for a in &made {
        std::fs::create_dir(a)
            .with_context(|| format!("making {} for a deleted directory", a.display()))?;
    }
    let tmp;
    let at = if std::fs::symlink_metadata(path).is_ok() {
        tmp = std::path::PathBuf::from(format!("{}.crust-{}", g.path, std::process::id()));
        tmp.as_path()
    } else {
        path
    };
    let made_at = std::fs::create_dir(at)
        .with_context(|| format!("making the deleted directory {} again", g.path))
        .and_then(|_| {
            std::fs::set_permissions(at, std::fs::Permissions::from_mode(g.mode))?;
            std::os::unix::fs::chown(at, Some(g.uid), Some(g.gid))?;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
                .open(at)?;
            Ok(OwnedFd::from(f))
        });
    let _ = std::fs::remove_dir(at);
    for a in made.iter().rev() {
        let _ = std::fs::remove_dir(a);
    }
    made_at.with_context(|| format!("making the deleted directory {} again", g.path))
}

/// The deleted directories a table holds: cwd, root and open fds.
fn ghost_dirs(t: &FdTable) -> impl Iterator<Item = &GhostDir> {
    t.cwd_ghost
        .iter()
        .chain(t.root_ghost.iter())
        .chain(t.fds.iter().filter_map(|e| match &e.file {
            Some(FdFile::GhostDir(g)) => Some(g),
            _ => None,
        }))
}

/// Creates every nameless file the tree maps and every deleted directory
/// it holds, once per (dev, ino); crust holds them (the tasks inherit the
/// fds at fork) until the tree is built.
pub fn create_tree_ghosts<'a>(
    mms: impl Iterator<Item = &'a MmEntry>,
    tables: impl Iterator<Item = &'a FdTable>,
) -> Result<HashMap<(u64, u64), RawFd>> {
    let mut out = HashMap::new();
    for g in tables.flat_map(ghost_dirs) {
        if let std::collections::hash_map::Entry::Vacant(e) = out.entry((g.dev, g.ino)) {
            e.insert(create_ghost_dir(g)?.into_raw_fd());
        }
    }
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

/// An open fd of a deleted directory.
pub struct GhostDirKind;

impl FileKind for GhostDirKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        let proc_path = format!("/proc/{}/fd/{}", p.pid, p.fd);
        if !p.meta.is_dir() || !is_ghost_dir(&proc_path, p.link) {
            return Ok(None);
        }
        let mut g = dump_ghost_dir(&proc_path, p.link)?;
        g.flags = p.flags & !(libc::O_CLOEXEC as u32);
        g.pos = p.pos;
        Ok(Some(FdFile::GhostDir(g)))
    }

    fn restore(&self, f: &FdFile, ctx: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::GhostDir(g) = f else {
            return Ok(None);
        };
        let made = ctx
            .inodes
            .get(&(g.dev, g.ino))
            .with_context(|| format!("the deleted directory {} was not made again", g.path))?;
        let fd = reopen(*made, g.flags as i32, &g.path)?;
        // SAFETY: lseek on an fd we own (a directory's readdir position).
        if g.flags & libc::O_PATH as u32 == 0
            && unsafe { libc::lseek(fd.as_raw_fd(), g.pos as i64, libc::SEEK_SET) } < 0
        {
            bail!(
                "seeking the deleted directory {} to {}: {}",
                g.path,
                g.pos,
                std::io::Error::last_os_error()
            );
        }
        Ok(Some(fd))
    }
}

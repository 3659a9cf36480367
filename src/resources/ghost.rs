//! Files that have no name any more ("ghost files"): regular files deleted
//! while open or mapped, memfds, deleted device nodes and symlinks, and
//! deleted directories (as an fd, a cwd or a root).
//!
//! Dump: every such file the tree holds, by an fd or a mapping, is stored
//! once per inode (`GhostStore`): its type, mode, owner and times in
//! ghosts.img, and for a regular file or memfd its data runs (found with
//! SEEK_DATA/SEEK_HOLE, so holes stay holes and only data counts against
//! `--ghost-limit`) in ghost-ID.img. A file deleted at its path but still
//! linked elsewhere is the same inode as that other name: with
//! `--link-remap` it is linked back under a temporary name, which the
//! restore opens and removes; without, the dump refuses.
//!
//! Restore: before the tree forks, crust makes each one again
//! (`GhostFileKind::prepare`): a regular file unnamed (O_TMPFILE) in its old
//! directory, a memfd with memfd_create, a device, FIFO or symlink under a
//! temporary name that is removed at once; then the data, owner, mode,
//! times and seals. Every fd and mapping of the tree reopens that one file
//! (through /proc/self/fd), so they share it as they did.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::files::{
    FdProbe, FileKind, ObjKey, RestoreCtx, TreeImages, TreeObjects, dup_fd, new_fd, reopen,
    seek_to, set_status_flags,
};
use crate::images::pb::fd_entry::File as FdFile;
use crate::images::pb::{Extent, FdTable, GhostData, GhostDir, GhostFile, GhostTable};
use crate::images::{ImageDir, ImageKind, RawReader, RawWriter};

const DELETED: &str = " (deleted)";
const MEMFD: &str = "/memfd:";

/// The tree object of a ghost file (`files::TreeObjects`).
pub fn ghost_key(dev: u64, ino: u64) -> ObjKey {
    ("ghost", dev, ino)
}

/// The tree object of a deleted directory.
pub fn dir_key(g: &GhostDir) -> ObjKey {
    ("ghost-dir", g.dev, g.ino)
}

/// Whether a /proc link or maps path names a file with no name.
pub fn is_ghost_path(shown: &str) -> bool {
    shown.ends_with(DELETED) || shown.starts_with(MEMFD)
}

fn file_type_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "file",
        libc::S_IFIFO => "FIFO",
        libc::S_IFCHR => "character device",
        libc::S_IFBLK => "block device",
        libc::S_IFLNK => "symlink",
        libc::S_IFDIR => "directory",
        _ => "special file",
    }
}

fn ns(sec: i64, nsec: i64) -> i64 {
    sec * 1_000_000_000 + nsec
}

/// The files without a name met during a dump, stored once per inode.
pub struct GhostStore {
    dir: ImageDir,
    limit: u64,
    link_remap: bool,
    ghosts: RefCell<Vec<GhostData>>,
    /// Memfds whose first read-write description was given the original.
    originals: RefCell<HashSet<(u64, u64)>>,
    /// The dump succeeded: the link-remap names stay for the restore.
    kept: Cell<bool>,
}

impl GhostStore {
    pub fn new(dir: &ImageDir, limit: u64, link_remap: bool) -> Self {
        GhostStore {
            dir: ImageDir {
                path: dir.path.clone(),
            },
            limit,
            link_remap,
            ghosts: RefCell::new(Vec::new()),
            originals: RefCell::new(HashSet::new()),
            kept: Cell::new(false),
        }
    }

    /// Stores the nameless file behind `proc_path` (/proc/PID/fd/N or
    /// /proc/PID/map_files/..., shown by /proc as `shown`) unless it is
    /// stored already; `held` is a copy of the task's fd, when there is one
    /// (a symlink's target is read through it). Returns its mode.
    pub fn add(
        &self,
        proc_path: &str,
        shown: &str,
        whose: &str,
        held: Option<&OwnedFd>,
    ) -> Result<(u64, u64, u32)> {
        let md = match held {
            // The fd itself: a symlink held with O_PATH|O_NOFOLLOW is the link.
            Some(fd) => std::fs::File::from(fd.try_clone()?).metadata()?,
            None => std::fs::metadata(proc_path).with_context(|| format!("stat {proc_path}"))?,
        };
        let key = (md.dev(), md.ino());
        if let Some(g) = self.ghosts.borrow().iter().find(|g| (g.dev, g.ino) == key) {
            return Ok((g.dev, g.ino, g.mode));
        }
        let memfd = shown.starts_with(MEMFD);
        let path = shown.strip_suffix(DELETED).unwrap_or(shown);
        let mut g = GhostData {
            dev: md.dev(),
            ino: md.ino(),
            path: path.strip_prefix(MEMFD).unwrap_or(path).to_string(),
            memfd,
            mode: md.mode(),
            id: self.ghosts.borrow().len() as u32 + 1,
            uid: md.uid(),
            gid: md.gid(),
            atime_ns: ns(md.atime(), md.atime_nsec()),
            mtime_ns: ns(md.mtime(), md.mtime_nsec()),
            size: md.size(),
            rdev: md.rdev(),
            ..Default::default()
        };
        let ft = md.file_type();
        if !memfd && ft.is_file() && md.nlink() > 0 {
            g.link_remap = self.link_back(proc_path, &g, whose)?;
        } else if ft.is_file() {
            let f = std::fs::File::open(proc_path)
                .with_context(|| format!("{whose}: reopening {proc_path}"))?;
            if memfd {
                // SAFETY: F_GET_SEALS on an fd we own.
                g.seals = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) }.max(0) as u32;
            }
            self.copy_data(&f, &mut g, whose)?;
        } else if ft.is_symlink() {
            let fd = held.context("a deleted symlink held without an fd")?;
            g.target = read_link_of(fd).with_context(|| format!("{whose}: reading its target"))?;
        } else if !(ft.is_fifo() || ft.is_char_device() || ft.is_block_device()) {
            bail!(
                "{whose} is the deleted {} {path}, which crust cannot make again",
                file_type_name(g.mode)
            );
        }
        let out = (g.dev, g.ino, g.mode);
        self.ghosts.borrow_mut().push(g);
        Ok(out)
    }

    /// --link-remap: gives a file deleted at its path but linked elsewhere
    /// a name again beside its old one, for the restore to open.
    fn link_back(&self, proc_path: &str, g: &GhostData, whose: &str) -> Result<String> {
        if !self.link_remap {
            bail!(
                "{whose} is {}, deleted but still linked elsewhere (the same file under another name); dump with --link-remap to link it back under a temporary name until the restore",
                g.path
            );
        }
        let parent = Path::new(&g.path).parent().unwrap_or(Path::new("/"));
        let name = parent.join(format!(".crust-link-remap.{}.{}", g.dev, g.ino));
        let from = std::ffi::CString::new(proc_path)?;
        let to = std::ffi::CString::new(name.as_os_str().as_encoded_bytes())?;
        // SAFETY: linkat with two NUL-terminated paths.
        if unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        } < 0
        {
            bail!(
                "{whose}: linking {} back as {} (--link-remap): {}",
                g.path,
                name.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(name.to_string_lossy().into_owned())
    }

    /// Copies the data runs of `f` into ghost-ID.img.
    fn copy_data(&self, f: &std::fs::File, g: &mut GhostData, whose: &str) -> Result<()> {
        let fd = f.as_raw_fd();
        let mut off = 0i64;
        while (off as u64) < g.size {
            // SAFETY: lseek on an fd we own.
            let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
            if data < 0 {
                break; // ENXIO: no data past `off`.
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let end = if hole < 0 { g.size as i64 } else { hole };
            g.extents.push(Extent {
                offset: data as u64,
                len: (end - data) as u64,
            });
            off = end;
        }
        let total: u64 = g.extents.iter().map(|e| e.len).sum();
        if total > self.limit {
            bail!(
                "{whose} is the deleted file {} with {total} bytes of data; crust carries up to {} bytes (raise it with --ghost-limit)",
                g.path,
                self.limit
            );
        }
        let mut w = RawWriter::create(&self.dir, ImageKind::GhostData, g.id as i32)?;
        let mut buf = vec![0u8; 1 << 20];
        for e in &g.extents {
            let mut done = 0;
            while done < e.len {
                let n = ((e.len - done) as usize).min(buf.len());
                std::os::unix::fs::FileExt::read_exact_at(f, &mut buf[..n], e.offset + done)
                    .with_context(|| format!("reading the deleted file {}", g.path))?;
                w.write(&buf[..n])?;
                done += n as u64;
            }
        }
        w.finish()
    }

    /// The first read-write description of a memfd gets the original file
    /// (see `GhostFile.original`); true when this one does.
    fn claim_original(&self, dev: u64, ino: u64) -> bool {
        self.originals.borrow_mut().insert((dev, ino))
    }

    /// Writes ghosts.img (none when the tree holds no such file).
    pub fn write(&self) -> Result<()> {
        if self.ghosts.borrow().is_empty() {
            return Ok(());
        }
        self.dir.write_msg(
            ImageKind::Ghosts,
            0,
            &GhostTable {
                ghosts: self.ghosts.borrow().clone(),
            },
        )
    }

    /// The dump succeeded: the link-remap names stay for the restore.
    pub fn keep(&self) {
        self.kept.set(true);
    }
}

impl Drop for GhostStore {
    /// A failed dump leaves no link-remap name behind.
    fn drop(&mut self) {
        if !self.kept.get() {
            for g in self.ghosts.borrow().iter() {
                if !g.link_remap.is_empty() {
                    let _ = std::fs::remove_file(&g.link_remap);
                }
            }
        }
    }
}

/// A symlink's target, read through an fd of the link itself.
fn read_link_of(fd: &OwnedFd) -> Result<String> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: readlinkat with an empty path reads the link the fd names
    // into our buffer.
    let n = unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        bail!("readlinkat: {}", std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The ghosts of a dump (ghosts.img); none in a dump that has none.
pub fn load(dir: &ImageDir) -> Result<Vec<GhostData>> {
    if !dir.file(ImageKind::Ghosts, 0).exists() {
        return Ok(Vec::new());
    }
    let t: GhostTable = dir.read_msg(ImageKind::Ghosts, 0)?;
    Ok(t.ghosts)
}

/// A name beside `path` for a file that is made and removed at once.
fn temp_name(path: &str, id: u32) -> Result<(PathBuf, std::ffi::CString)> {
    let parent = Path::new(path).parent().unwrap_or(Path::new("/"));
    let p = parent.join(format!(".crust-ghost.{}.{id}", std::process::id()));
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())?;
    Ok((p, c))
}

/// Gives a made file the dumped owner and mode (owner first: chown clears
/// the set-id bits).
fn set_owner_mode(fd: RawFd, g: &GhostData) -> Result<()> {
    // SAFETY: fchown and fchmod on an fd we own.
    unsafe {
        if libc::fchown(fd, g.uid, g.gid) < 0 {
            bail!(
                "giving {} its owner {}:{}: {}",
                g.path,
                g.uid,
                g.gid,
                std::io::Error::last_os_error()
            );
        }
        if libc::fchmod(fd, g.mode & 0o7777) < 0 {
            bail!(
                "giving {} its mode {:o}: {}",
                g.path,
                g.mode & 0o7777,
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

fn set_times(fd: RawFd, g: &GhostData) -> Result<()> {
    let ts = |n: i64| libc::timespec {
        tv_sec: n.div_euclid(1_000_000_000),
        tv_nsec: n.rem_euclid(1_000_000_000),
    };
    let times = [ts(g.atime_ns), ts(g.mtime_ns)];
    // SAFETY: futimens reads two timespecs.
    if unsafe { libc::futimens(fd, times.as_ptr()) } < 0 {
        bail!(
            "giving {} its times: {}",
            g.path,
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Writes the dumped data runs into the made file, checking the checksum.
fn fill(fd: RawFd, g: &GhostData, dir: &ImageDir) -> Result<()> {
    // SAFETY: ftruncate on an fd we own.
    if unsafe { libc::ftruncate(fd, g.size as i64) } < 0 {
        bail!(
            "sizing {} to {} bytes: {}",
            g.path,
            g.size,
            std::io::Error::last_os_error()
        );
    }
    let mut r = RawReader::open(dir, ImageKind::GhostData, g.id as i32)?;
    // SAFETY: the file is ours; File does not close it (into_raw_fd below).
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    let res = copy_extents(&mut r, &f, g);
    let _ = f.into_raw_fd();
    res?;
    r.finish()
}

fn copy_extents(r: &mut RawReader, f: &std::fs::File, g: &GhostData) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    for e in &g.extents {
        let mut done = 0;
        while done < e.len {
            let n = ((e.len - done) as usize).min(buf.len());
            r.read(&mut buf[..n])?;
            std::os::unix::fs::FileExt::write_all_at(f, &buf[..n], e.offset + done)
                .with_context(|| format!("refilling {}", g.path))?;
            done += n as u64;
        }
    }
    Ok(())
}

/// Makes one ghost file again; the fd crust holds for the tree.
fn create(g: &GhostData, dir: &ImageDir) -> Result<OwnedFd> {
    if !g.link_remap.is_empty() {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&g.link_remap)
            .with_context(|| {
                format!(
                    "opening {} (the --link-remap name of {})",
                    g.link_remap, g.path
                )
            })?;
        let md = f.metadata()?;
        if (md.dev(), md.ino()) != (g.dev, g.ino) && md.dev() == g.dev {
            bail!(
                "{} is another file than the one linked there at the dump; the images belong to another filesystem state",
                g.link_remap
            );
        }
        return Ok(OwnedFd::from(f));
    }
    match g.mode & libc::S_IFMT {
        libc::S_IFREG if g.memfd => {
            let name = std::ffi::CString::new(g.path.as_str())?;
            // SAFETY: memfd_create with a NUL-terminated name.
            let fd = unsafe {
                libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
            };
            let fd = new_fd(fd as i64, &format!("memfd {}", g.path))?;
            fill(fd.as_raw_fd(), g, dir)?;
            set_owner_mode(fd.as_raw_fd(), g)?;
            set_times(fd.as_raw_fd(), g)?;
            // SAFETY: F_ADD_SEALS on a memfd we own.
            if g.seals != 0
                && unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, g.seals as i32) } < 0
            {
                bail!(
                    "sealing memfd {}: {}",
                    g.path,
                    std::io::Error::last_os_error()
                );
            }
            // The memfd_create file itself: it does not count as a writer,
            // so the memfd can still be executed or become an executable.
            Ok(fd)
        }
        libc::S_IFREG => {
            let dir_of = Path::new(&g.path)
                .parent()
                .context("a deleted file without a directory")?;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_TMPFILE)
                .open(dir_of)
                .with_context(|| {
                    format!(
                        "making the deleted file {} again in {}",
                        g.path,
                        dir_of.display()
                    )
                })?;
            fill(f.as_raw_fd(), g, dir)?;
            set_owner_mode(f.as_raw_fd(), g)?;
            set_times(f.as_raw_fd(), g)?;
            // Held read-only: a file open for writing anywhere cannot become
            // a task's executable again (PR_SET_MM_MAP denies it).
            reopen(f.as_raw_fd(), libc::O_RDONLY, &g.path)
        }
        libc::S_IFIFO | libc::S_IFCHR | libc::S_IFBLK | libc::S_IFLNK => {
            let (tmp, c) = temp_name(&g.path, g.id)?;
            // SAFETY: mknod/symlink with NUL-terminated paths.
            let r = unsafe {
                if g.mode & libc::S_IFMT == libc::S_IFLNK {
                    let target = std::ffi::CString::new(g.target.as_str())?;
                    libc::symlink(target.as_ptr(), c.as_ptr())
                } else {
                    libc::mknod(c.as_ptr(), g.mode, g.rdev)
                }
            };
            if r < 0 {
                bail!(
                    "making the deleted {} {} again: {}",
                    file_type_name(g.mode),
                    g.path,
                    std::io::Error::last_os_error()
                );
            }
            let opened = open_made(&c, g, &tmp);
            let _ = std::fs::remove_file(&tmp);
            opened
        }
        _ => bail!(
            "ghosts.img holds a {} {}, which crust cannot make; the images are corrupt",
            file_type_name(g.mode),
            g.path
        ),
    }
}

/// Gives a node just made under a temporary name its owner and mode, and
/// opens it the way crust holds it for the tree.
fn open_made(c: &std::ffi::CStr, g: &GhostData, tmp: &Path) -> Result<OwnedFd> {
    // SAFETY: lchown/chmod/open with a NUL-terminated path.
    unsafe {
        libc::lchown(c.as_ptr(), g.uid, g.gid);
        if g.mode & libc::S_IFMT != libc::S_IFLNK {
            libc::chmod(c.as_ptr(), g.mode & 0o7777);
        }
    }
    let flags = match g.mode & libc::S_IFMT {
        // A FIFO is held read-write: the keeper of its buffer.
        libc::S_IFIFO => libc::O_RDWR | libc::O_NONBLOCK,
        libc::S_IFLNK => libc::O_PATH | libc::O_NOFOLLOW,
        _ => libc::O_PATH,
    };
    // SAFETY: as above.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    new_fd(fd as i64, &format!("opening {}", tmp.display()))
}

/// Removes the --link-remap names once the restore is done.
pub fn remove_link_remaps(ghosts: &[GhostData]) {
    for g in ghosts.iter().filter(|g| !g.link_remap.is_empty()) {
        if let Err(e) = std::fs::remove_file(&g.link_remap) {
            tracing::warn!("removing the --link-remap name {}: {e}", g.link_remap);
        }
    }
}

/// Whether a deleted character device is a terminal: those are the pty and
/// tty kinds' (a pty slave's node goes away with its master).
fn is_tty_device(rdev: u64) -> bool {
    let major = libc::major(rdev);
    major == 4 || major == 5 || (136..=143).contains(&major)
}

/// An fd of a file without a name (not a directory or a FIFO: those have
/// kinds of their own).
pub struct GhostFileKind;

impl FileKind for GhostFileKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        let ft = p.meta.file_type();
        if !is_ghost_path(p.link)
            || ft.is_dir()
            || ft.is_fifo()
            || (ft.is_char_device() && is_tty_device(p.meta.rdev()))
            || (ft.is_symlink() && !p.link.ends_with(DELETED))
        {
            return Ok(None);
        }
        if ft.is_file() && p.meta.nlink() > 0 && !p.link.starts_with(MEMFD) {
            // Deleted at this path, linked elsewhere: `add` decides.
        } else if !(ft.is_file() || ft.is_char_device() || ft.is_block_device() || ft.is_symlink())
        {
            return Ok(None);
        }
        let whose = format!("PID {} fd {}", p.pid, p.fd);
        let held = if ft.is_symlink() {
            let pidfd = crate::sys::pidfd_open(p.pid)?;
            Some(crate::sys::pidfd_getfd(&pidfd, p.fd)?)
        } else {
            None
        };
        let (dev, ino, mode) = p
            .ctx
            .ghosts
            .add(&p.proc_path(), p.link, &whose, held.as_ref())?;
        let original = p.link.starts_with(MEMFD)
            && p.flags & libc::O_ACCMODE as u32 == libc::O_RDWR as u32
            && p.ctx.ghosts.claim_original(dev, ino);
        Ok(Some(FdFile::Ghost(GhostFile {
            dev,
            ino,
            flags: p.open_flags(),
            pos: p.pos,
            mode,
            original,
        })))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Ghost(g) = f else { return None };
        Some(format!(
            "nameless {} {}:{} (ghosts.img) flags {:#o} pos {}{}",
            file_type_name(g.mode),
            g.dev,
            g.ino,
            g.flags,
            g.pos,
            if g.original {
                " (the memfd itself)"
            } else {
                ""
            }
        ))
    }

    /// Makes every ghost of the tree, mapped or open, once.
    fn prepare(&self, t: &TreeImages, objects: &mut TreeObjects) -> Result<()> {
        for g in t.ghosts {
            let key = ghost_key(g.dev, g.ino);
            if !objects.contains(key) {
                objects.insert(key, create(g, t.dir)?);
            }
        }
        Ok(())
    }

    fn restore(&self, f: &FdFile, ctx: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Ghost(g) = f else { return Ok(None) };
        let what = format!(
            "the nameless {} {}:{}",
            file_type_name(g.mode),
            g.dev,
            g.ino
        );
        let made = ctx.objects.need(ghost_key(g.dev, g.ino), &what)?;
        let fd = if g.mode & libc::S_IFMT == libc::S_IFLNK {
            // An O_PATH fd of the link itself: nothing in it to keep apart.
            dup_fd(made)?
        } else if g.original {
            let fd = dup_fd(made)?;
            set_status_flags(fd.as_raw_fd(), g.flags, &what)?;
            fd
        } else {
            reopen(made, g.flags as i32, &what)?
        };
        if g.mode & libc::S_IFMT == libc::S_IFREG && g.flags & libc::O_PATH as u32 == 0 {
            seek_to(fd.as_raw_fd(), g.pos, &what)?;
        }
        Ok(Some(fd))
    }
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
fn create_ghost_dir(g: &GhostDir) -> Result<OwnedFd> {
    let path = Path::new(&g.path);
    let mut made: Vec<&Path> = path
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
        tmp = PathBuf::from(format!("{}.crust-{}", g.path, std::process::id()));
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

/// An open fd of a deleted directory (cwd and root: `fs::FsDirs`).
pub struct GhostDirKind;

impl FileKind for GhostDirKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        let proc_path = p.proc_path();
        if !p.meta.is_dir() || !is_ghost_dir(&proc_path, p.link) {
            return Ok(None);
        }
        let mut g = dump_ghost_dir(&proc_path, p.link)?;
        g.flags = p.open_flags();
        g.pos = p.pos;
        Ok(Some(FdFile::GhostDir(g)))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::GhostDir(g) = f else { return None };
        Some(format!(
            "deleted directory {} mode {:o} flags {:#o} pos {}",
            g.path, g.mode, g.flags, g.pos
        ))
    }

    /// Every deleted directory of the tree (fds, cwds, roots), once.
    fn prepare(&self, t: &TreeImages, objects: &mut TreeObjects) -> Result<()> {
        for g in t.tables.iter().flat_map(|(_, tb)| ghost_dirs(tb)) {
            if !objects.contains(dir_key(g)) {
                objects.insert(dir_key(g), create_ghost_dir(g)?);
            }
        }
        Ok(())
    }

    fn restore(&self, f: &FdFile, ctx: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::GhostDir(g) = f else {
            return Ok(None);
        };
        let made = ctx
            .objects
            .need(dir_key(g), &format!("the deleted directory {}", g.path))?;
        let fd = reopen(made, g.flags as i32, &g.path)?;
        if g.flags & libc::O_PATH as u32 == 0 {
            seek_to(fd.as_raw_fd(), g.pos, &g.path)?;
        }
        Ok(Some(fd))
    }
}

//! Files: the fd table, cwd, root and umask of a task.
//!
//! Each kind of open file is one `FileKind`: it recognises an fd at dump and
//! reopens it at restore. Adding a kind means adding one implementation to
//! `KINDS`; nothing else in the tree changes.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use anyhow::{Context, Result, bail};

use crate::images::pb::{
    CharDevice, FdEntry, FdOwner, FdTable, FileLock, RegularFile, Tty, fd_entry::File as FdFile,
};
use crate::proc;

/// What a `FileKind` sees of one fd at dump.
pub struct FdProbe<'a> {
    pub pid: i32,
    pub fd: RawFd,
    /// The /proc/PID/fd/N link text.
    pub link: &'a str,
    pub meta: &'a fs::Metadata,
    /// open(2) flags from fdinfo, O_CLOEXEC included.
    pub flags: u32,
    pub pos: u64,
    /// Every `key: value` line of fdinfo.
    pub info: &'a [(String, String)],
    pub shell_job: bool,
    /// Pipe inodes already seen anywhere in the tree, and the buffers of
    /// those first seen in this process.
    pub seen_pipes: &'a std::cell::RefCell<std::collections::HashSet<u64>>,
    pub new_pipes: &'a std::cell::RefCell<Vec<crate::images::pb::PipeData>>,
    /// Every process of the dumped tree.
    pub tree: &'a [i32],
}

impl FdProbe<'_> {
    /// A hexadecimal fdinfo value the kind cannot do without.
    pub fn info_hex(&self, key: &str) -> Result<u64> {
        info_get(self.info, key)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .ok_or_else(|| self.unreadable(key))
    }

    /// The error for fdinfo that lacks what a kind needs.
    pub fn unreadable(&self, what: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "PID {} fd {} ({}): cannot read its {what} from fdinfo",
            self.pid,
            self.fd,
            self.link
        )
    }
}

/// What a `FileKind` is given at restore.
pub struct RestoreCtx<'a> {
    /// crust's own terminal, for `--shell-job`.
    pub tty: Option<RawFd>,
    /// Open file descriptions shared by several processes of the tree, by
    /// `description_id`, opened by crust before the tree forks.
    pub shared: &'a std::collections::HashMap<u64, RawFd>,
    /// The tree's pipes by inode: (read end, write end), made by crust.
    pub pipes: &'a std::collections::HashMap<u64, (RawFd, RawFd)>,
    /// Files crust made or opened per dumped inode, (dev, ino), before the
    /// tree forks: nameless files the tree maps (`ghost::create_tree_ghosts`)
    /// and a keeper of each FIFO, refilled (`fifo::open_fifo_keepers`).
    pub inodes: &'a std::collections::HashMap<(u64, u64), RawFd>,
    /// The tree's pty masters by index, made by crust (`pty::create_ptys`).
    pub ptys: &'a std::collections::HashMap<u32, RawFd>,
}

pub trait FileKind: Sync {
    /// Claims the fd, returning its image entry, or None when it is not of this kind.
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>>;
    /// Opens a new file description for the entry.
    fn restore(&self, f: &FdFile, ctx: &RestoreCtx) -> Result<Option<OwnedFd>>;
    /// Runs once every fd of the task is in place (an epoll set adds its
    /// targets here, by their fd numbers).
    fn finish(&self, _f: &FdFile, _fd: RawFd) -> Result<()> {
        Ok(())
    }
}

/// Takes ownership of an fd a system call just returned, or reports why
/// creating `what` failed.
pub fn new_fd(fd: i64, what: &str) -> Result<OwnedFd> {
    if fd < 0 {
        bail!("creating {what}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the caller passes an fd that was just created and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The value of one fdinfo key.
pub fn info_get<'a>(info: &'a [(String, String)], key: &str) -> Option<&'a str> {
    info.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

const O_CLOEXEC: u32 = libc::O_CLOEXEC as u32;
/// Flags that must not be replayed when reopening a file.
const OPEN_ONLY: u32 = (libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY) as u32;

fn open_fd(path: &str, flags: u32) -> Result<OwnedFd> {
    let c = std::ffi::CString::new(path)?;
    // SAFETY: a plain open(2) of a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            ((flags & !OPEN_ONLY & !O_CLOEXEC) | O_CLOEXEC) as i32,
        )
    };
    if fd < 0 {
        bail!("opening {path}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

struct RegularFileKind;
impl FileKind for RegularFileKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if !p.meta.file_type().is_file() && !p.meta.file_type().is_dir() {
            return Ok(None);
        }
        Ok(Some(FdFile::Regular(RegularFile {
            path: p.link.to_string(),
            flags: p.flags & !O_CLOEXEC,
            pos: p.pos,
            size: if p.meta.is_file() { p.meta.size() } else { 0 },
            dev: p.meta.dev(),
            ino: p.meta.ino(),
        })))
    }
    fn restore(&self, f: &FdFile, _: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Regular(r) = f else {
            return Ok(None);
        };
        let fd = open_fd(&r.path, r.flags)?;
        // An O_PATH fd has no offset.
        let o_path = r.flags & libc::O_PATH as u32 != 0;
        // SAFETY: lseek on an fd we own.
        if !o_path && unsafe { libc::lseek(fd.as_raw_fd(), r.pos as i64, libc::SEEK_SET) } < 0 {
            bail!(
                "seeking {} to {}: {}",
                r.path,
                r.pos,
                std::io::Error::last_os_error()
            );
        }
        Ok(Some(fd))
    }
}

fn is_tty_rdev(rdev: u64) -> bool {
    let major = libc::major(rdev);
    // 4: virtual consoles and serial ttys, 5: /dev/tty and ptmx, 136-143: pty slaves.
    major == 4 || major == 5 || (136..=143).contains(&major)
}

struct TtyKind;
impl FileKind for TtyKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if !p.meta.file_type().is_char_device() || !is_tty_rdev(p.meta.rdev()) {
            return Ok(None);
        }
        if !p.shell_job {
            bail!(
                "PID {} fd {} is the terminal {}; dump a process started from a shell with --shell-job",
                p.pid,
                p.fd,
                p.link
            );
        }
        Ok(Some(FdFile::Tty(Tty {
            path: p.link.to_string(),
            flags: p.flags & !O_CLOEXEC,
            rdev: p.meta.rdev(),
        })))
    }
    fn restore(&self, f: &FdFile, ctx: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Tty(t) = f else { return Ok(None) };
        let Some(tty) = ctx.tty else {
            bail!(
                "the images hold the terminal {}; restore with --shell-job from a terminal",
                t.path
            );
        };
        // SAFETY: duplicating crust's own terminal fd.
        let fd = unsafe { libc::fcntl(tty, libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            bail!(
                "duplicating crust's terminal: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: fd was just created and is owned by no one else.
        Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

/// Character devices that carry no state of their own.
const STATELESS_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

struct CharDeviceKind;
impl FileKind for CharDeviceKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if !p.meta.file_type().is_char_device() || !STATELESS_DEVICES.contains(&p.link) {
            return Ok(None);
        }
        Ok(Some(FdFile::Chardev(CharDevice {
            path: p.link.to_string(),
            flags: p.flags & !O_CLOEXEC,
            rdev: p.meta.rdev(),
            pos: p.pos,
        })))
    }
    fn restore(&self, f: &FdFile, _: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Chardev(c) = f else {
            return Ok(None);
        };
        Ok(Some(open_fd(&c.path, c.flags)?))
    }
}

/// Every kind of file crust knows; the first to claim an fd dumps it.
static KINDS: &[&dyn FileKind] = &[
    &super::eventfd::EventFdKind,
    &super::signals::SignalFdKind,
    &super::timers::TimerFdKind,
    &super::epoll::EpollKind,
    &super::inotify::InotifyKind,
    &super::fanotify::FanotifyKind,
    &super::ghost::GhostFileKind,
    &super::ghost::GhostDirKind,
    &RegularFileKind,
    &super::pty::PtyKind,
    &TtyKind,
    &CharDeviceKind,
    &super::pipes::PipeKind,
    &super::fifo::FifoKind,
];

fn describe_unsupported(link: &str) -> &'static str {
    if link.starts_with("pipe:") {
        "a pipe"
    } else if link.starts_with("socket:") {
        "a socket"
    } else if link.starts_with("anon_inode:") {
        "an anonymous-inode file (eventfd, epoll, signalfd, timerfd...)"
    } else {
        "a file of a kind"
    }
}

/// Collects the fd table and fs state of a task.
/// (pid, fd, description id) of one fd of a description.
type DescriptionRef = (i32, RawFd, u64);

/// The open file descriptions seen so far in the tree, by the (dev, inode)
/// of their file: (pid, fd, description id) of one fd of each.
#[derive(Default)]
pub struct Descriptions {
    by_file: std::cell::RefCell<std::collections::HashMap<(u64, u64), Vec<DescriptionRef>>>,
    next_id: std::cell::Cell<u64>,
}

pub fn dump_fd_table(
    pid: i32,
    shell_job: bool,
    file_locks: bool,
    seen_pipes: &std::cell::RefCell<std::collections::HashSet<u64>>,
    descriptions: &Descriptions,
    tree: &[i32],
) -> Result<FdTable> {
    let new_pipes = std::cell::RefCell::new(Vec::new());
    let mut fds: Vec<RawFd> = fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    let fs_link = |name: &str| -> Result<(String, Option<crate::images::pb::GhostDir>)> {
        let proc_path = format!("/proc/{pid}/{name}");
        let link = fs::read_link(&proc_path)
            .with_context(|| format!("reading {proc_path}"))?
            .to_string_lossy()
            .into_owned();
        let ghost = super::ghost::is_ghost_dir(&proc_path, &link)
            .then(|| super::ghost::dump_ghost_dir(&proc_path, &link))
            .transpose()?;
        Ok((link, ghost))
    };
    let (cwd, cwd_ghost) = fs_link("cwd")?;
    let (root, root_ghost) = fs_link("root")?;
    let mut table = FdTable {
        cwd,
        root,
        umask: proc::status(pid)?.umask,
        fds: Vec::new(),
        pipes: Vec::new(),
        cwd_ghost,
        root_ghost,
    };
    let pidfd = crate::sys::pidfd_open(pid).with_context(|| format!("pidfd of {pid}"))?;
    for fd in fds {
        let path = format!("/proc/{pid}/fd/{fd}");
        let link = fs::read_link(&path)?.to_string_lossy().into_owned();
        let info = proc::fdinfo(pid, fd)?;
        let get = |k: &str| {
            info.iter()
                .find(|(a, _)| a == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let flags = u32::from_str_radix(&get("flags"), 8).unwrap_or(0);
        let pos = get("pos").parse().unwrap_or(0);
        let what = describe_unsupported(&link);
        let meta = fs::metadata(&path).with_context(|| {
            format!("PID {pid} fd {fd} is {what} ({link}) crust cannot dump yet")
        })?;
        let key = (meta.dev(), meta.ino());
        // Only fds on the same file can share a description: kcmp just those.
        let same = descriptions.by_file.borrow().get(&key).and_then(|v| {
            v.iter()
                .find(|&&(p, f, _)| same_file(p, f, pid, fd))
                .copied()
        });
        if let Some((p, f, id)) = same.filter(|&(p, _, _)| p == pid) {
            let _ = p;
            let first = table
                .fds
                .iter()
                .find(|e| e.fd == f)
                .expect("an fd of this table");
            let (first_fd, file) = (first.fd, first.file.clone());
            let description_id = id;
            table.fds.push(FdEntry {
                fd,
                cloexec: flags & O_CLOEXEC != 0,
                file,
                dup_of: Some(first_fd),
                description_id,
                locks: Vec::new(),
                owner: None,
            });
            continue;
        }
        // The same description in an earlier process of the tree, or a new one.
        let description_id = match same {
            Some((_, _, id)) => id,
            None => {
                let id = descriptions.next_id.get() + 1;
                descriptions.next_id.set(id);
                descriptions
                    .by_file
                    .borrow_mut()
                    .entry(key)
                    .or_default()
                    .push((pid, fd, id));
                id
            }
        };
        let probe = FdProbe {
            pid,
            fd,
            link: &link,
            meta: &meta,
            flags,
            pos,
            info: &info,
            shell_job,
            seen_pipes,
            new_pipes: &new_pipes,
            tree,
        };
        let mut entry = None;
        for k in KINDS {
            if let Some(f) = k.dump(&probe)? {
                entry = Some(f);
                break;
            }
        }
        let Some(file) = entry else {
            bail!(
                "PID {pid} fd {fd} is {what} ({link}) that crust cannot dump yet; close it or leave the process out"
            );
        };
        table.fds.push(FdEntry {
            fd,
            cloexec: flags & O_CLOEXEC != 0,
            file: Some(file),
            dup_of: None,
            description_id,
            locks: dump_locks(pid, fd, &link, &info, file_locks)?,
            owner: dump_owner(&pidfd, pid, fd, flags)?,
        });
    }
    table.pipes = new_pipes.into_inner();
    Ok(table)
}

// fcntl(2) commands and struct f_owner_ex, which the libc crate lacks.
const F_SETSIG: libc::c_int = 10;
const F_GETSIG: libc::c_int = 11;
const F_SETOWN_EX: libc::c_int = 15;
const F_GETOWN_EX: libc::c_int = 16;
#[repr(C)]
struct FOwnerEx {
    type_: libc::c_int,
    pid: libc::pid_t,
}

/// Who gets the description's SIGIO (F_GETOWN_EX) and with which signal
/// (F_GETSIG), read on a copy of the fd; None when nobody does.
fn dump_owner(pidfd: &OwnedFd, pid: i32, fd: RawFd, flags: u32) -> Result<Option<FdOwner>> {
    let copy = crate::sys::pidfd_getfd(pidfd, fd)
        .with_context(|| format!("taking a copy of PID {pid} fd {fd}"))?;
    let mut own = FOwnerEx { type_: 0, pid: 0 };
    // SAFETY: F_GETOWN_EX writes one f_owner_ex; F_GETSIG takes nothing.
    let (r, sig) = unsafe {
        (
            libc::fcntl(copy.as_raw_fd(), F_GETOWN_EX, &mut own),
            libc::fcntl(copy.as_raw_fd(), F_GETSIG),
        )
    };
    let is_async = flags & libc::O_ASYNC as u32 != 0;
    if r < 0 || sig < 0 || (own.pid == 0 && sig == 0 && !is_async) {
        return Ok(None);
    }
    Ok(Some(FdOwner {
        kind: own.type_,
        pid: own.pid,
        signal: sig,
        r#async: is_async,
    }))
}

/// Gives a description back its owner, signal and O_ASYNC. The owner may be
/// a process of the tree that is not forked yet: wait for it a little.
fn restore_owner(fd: RawFd, o: &FdOwner) -> Result<()> {
    let own = FOwnerEx {
        type_: o.kind,
        pid: o.pid,
    };
    let mut tries = 0;
    // SAFETY: F_SETOWN_EX reads one f_owner_ex.
    while o.pid != 0 && unsafe { libc::fcntl(fd, F_SETOWN_EX, &own) } < 0 {
        tries += 1;
        if tries > 200 {
            bail!(
                "fd {fd}: giving its signals to {} again (F_SETOWN_EX): {}",
                o.pid,
                std::io::Error::last_os_error()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // SAFETY: plain fcntls on our own fd.
    unsafe {
        if o.signal != 0 && libc::fcntl(fd, F_SETSIG, o.signal) < 0 {
            bail!(
                "fd {fd}: F_SETSIG {}: {}",
                o.signal,
                std::io::Error::last_os_error()
            );
        }
        if o.r#async {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_ASYNC);
        }
    }
    Ok(())
}

/// The locks held through an fd, from its fdinfo `lock:` lines
/// ("1: POSIX  ADVISORY  WRITE 1234 fe:00:5678 5 14").
fn dump_locks(
    pid: i32,
    fd: RawFd,
    link: &str,
    info: &[(String, String)],
    take: bool,
) -> Result<Vec<FileLock>> {
    let mut out = Vec::new();
    for (_, v) in info.iter().filter(|(k, _)| k == "lock") {
        let w: Vec<&str> = v.split_whitespace().collect();
        if w.len() < 8 {
            bail!("PID {pid} fd {fd}: cannot read the lock {v:?}");
        }
        let kind = w[1].to_string();
        // A POSIX lock of another process on the same file is not ours.
        if kind == "POSIX" && w[4].parse::<i32>().ok() != Some(pid) {
            continue;
        }
        if !matches!(kind.as_str(), "FLOCK" | "POSIX" | "OFDLCK") || w[2] != "ADVISORY" {
            bail!(
                "PID {pid} fd {fd} ({link}) holds a {} {} lock, which crust cannot restore",
                w[2],
                kind
            );
        }
        if !take {
            bail!(
                "PID {pid} fd {fd} ({link}) holds a {kind} lock; dump with --file-locks to take it along"
            );
        }
        out.push(FileLock {
            kind,
            write: w[3] == "WRITE",
            start: w[6].parse().unwrap_or(0),
            end: if w[7] == "EOF" {
                -1
            } else {
                w[7].parse().unwrap_or(-1)
            },
        });
    }
    Ok(out)
}

/// Takes the locks of an fd again, in the restored process.
fn restore_locks(e: &FdEntry) -> Result<()> {
    for l in &e.locks {
        let r = match l.kind.as_str() {
            "FLOCK" => {
                let op = if l.write {
                    libc::LOCK_EX
                } else {
                    libc::LOCK_SH
                };
                // SAFETY: flock on an fd of ours.
                unsafe { libc::flock(e.fd, op | libc::LOCK_NB) }
            }
            kind => {
                // SAFETY: flock is plain data; zero is a valid start.
                let mut fl: libc::flock = unsafe { std::mem::zeroed() };
                fl.l_type = if l.write {
                    libc::F_WRLCK
                } else {
                    libc::F_RDLCK
                } as i16;
                fl.l_whence = libc::SEEK_SET as i16;
                fl.l_start = l.start as i64;
                fl.l_len = if l.end < 0 {
                    0
                } else {
                    l.end - l.start as i64 + 1
                };
                let cmd = if kind == "OFDLCK" {
                    libc::F_OFD_SETLK
                } else {
                    libc::F_SETLK
                };
                // SAFETY: fcntl reads one struct flock.
                unsafe { libc::fcntl(e.fd, cmd, &fl) }
            }
        };
        if r < 0 {
            bail!(
                "taking the {} lock on fd {} again: {}; is the original still holding it?",
                l.kind,
                e.fd,
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Whether fd `a` of `pa` and fd `b` of `pb` are one open file description.
fn same_file(pa: i32, a: RawFd, pb: i32, b: RawFd) -> bool {
    const KCMP_FILE: i32 = 0;
    // SAFETY: kcmp only compares kernel objects; it reads no memory of ours.
    unsafe { libc::syscall(libc::SYS_kcmp, pa, pb, KCMP_FILE, a, b) == 0 }
}

/// Checks, before anything is created, that the files the table names are
/// still there and the same size.
/// Whether the file now at a dumped path is another one than the dumped
/// (dev, ino): on the same filesystem a new inode means the path was
/// replaced. On another filesystem (images moved to another host, say)
/// inodes say nothing, and the size check is what remains.
pub fn replaced(now: &fs::Metadata, dev: u64, ino: u64) -> bool {
    now.dev() == dev && now.ino() != ino
}

pub fn check_fd_table(table: &FdTable) -> Result<()> {
    for e in &table.fds {
        if let Some(FdFile::Regular(r)) = &e.file {
            let md = fs::metadata(&r.path).map_err(|err| {
                anyhow::anyhow!(
                    "file {} (fd {}) is gone ({err}); put it back to restore",
                    r.path,
                    e.fd
                )
            })?;
            if replaced(&md, r.dev, r.ino) {
                bail!(
                    "file {} (fd {}) was replaced by another file since the dump; restore the original file",
                    r.path,
                    e.fd
                );
            }
            if md.is_file() && md.size() != r.size {
                bail!(
                    "file {} (fd {}) changed size since the dump ({} bytes, now {}); restore the original file",
                    r.path,
                    e.fd,
                    r.size,
                    md.size()
                );
            }
        }
    }
    Ok(())
}

/// Rebuilds the fd table in the current (restored) process. Every fd not in
/// the table and not in `keep` is closed.
pub fn restore_fd_table(table: &FdTable, ctx: &RestoreCtx, keep: &[RawFd]) -> Result<()> {
    // The fds entries are made from (crust's pipe ends and shared
    // descriptions, inherited at any number) move above every number in play.
    let high = table
        .fds
        .iter()
        .map(|e| e.fd)
        .chain(keep.iter().copied())
        .max()
        .unwrap_or(0)
        + 1;
    let lift = |fd: RawFd| -> Result<RawFd> {
        if fd < 0 {
            return Ok(fd);
        }
        // SAFETY: duplicating then closing an fd crust handed down.
        let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, high) };
        if n < 0 {
            bail!(
                "moving fd {fd} out of the way: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: fd is replaced by n.
        unsafe { libc::close(fd) };
        Ok(n)
    };
    let mut pipes = std::collections::HashMap::new();
    for (ino, &(r, w)) in ctx.pipes {
        pipes.insert(*ino, (lift(r)?, lift(w)?));
    }
    let mut shared = std::collections::HashMap::new();
    for (id, &fd) in ctx.shared {
        shared.insert(*id, lift(fd)?);
    }
    let mut inodes = std::collections::HashMap::new();
    for (id, &fd) in ctx.inodes {
        inodes.insert(*id, lift(fd)?);
    }
    let mut ptys = std::collections::HashMap::new();
    for (id, &fd) in ctx.ptys {
        ptys.insert(*id, lift(fd)?);
    }
    let sources: Vec<RawFd> = pipes
        .values()
        .flat_map(|&(r, w)| [r, w])
        .chain(shared.values().copied())
        .chain(inodes.values().copied())
        .chain(ptys.values().copied())
        .filter(|&fd| fd >= 0)
        .collect();
    let lifted = RestoreCtx {
        tty: ctx.tty,
        pipes: &pipes,
        shared: &shared,
        inodes: &inodes,
        ptys: &ptys,
    };
    for fd in own_fds()? {
        if !keep.contains(&fd) && !sources.contains(&fd) {
            // SAFETY: closing an fd of crust's that the task must not inherit.
            unsafe { libc::close(fd) };
        }
    }
    // In ascending order, each new file lands at or below its number (every
    // lower number of the table is taken already), so placing it with dup2
    // never overwrites one still to come, and no fd is held twice: a task
    // with as many fds as its limit allows restores within that limit.
    let mut order: Vec<&FdEntry> = table.fds.iter().collect();
    order.sort_by_key(|e| e.fd);
    for e in order {
        let fd = if let Some(of) = e.dup_of {
            dup_fd(of)?
        } else if let Some(&src) = shared.get(&e.description_id) {
            dup_fd(src)?
        } else {
            let file = e.file.as_ref().context("fd entry without a file")?;
            open_entry(file, &lifted).with_context(|| format!("restoring fd {}", e.fd))?
        };
        let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
        if raw != e.fd {
            // SAFETY: dup2 onto the task's fd number, then closing our copy.
            unsafe {
                if libc::dup2(raw, e.fd) < 0 {
                    bail!("placing fd {}: {}", e.fd, std::io::Error::last_os_error());
                }
                libc::close(raw);
            }
        }
        let flag = if e.cloexec { libc::FD_CLOEXEC } else { 0 };
        // SAFETY: setting the close-on-exec flag of an fd we own.
        unsafe { libc::fcntl(e.fd, libc::F_SETFD, flag) };
    }
    for fd in sources {
        // SAFETY: crust's copies; every task fd made from them is a dup.
        unsafe { libc::close(fd) };
    }
    for e in table.fds.iter().filter(|e| e.dup_of.is_none()) {
        restore_locks(e)?;
        if let Some(o) = &e.owner {
            restore_owner(e.fd, o)?;
        }
        if let Some(file) = &e.file {
            for k in KINDS {
                k.finish(file, e.fd)
                    .with_context(|| format!("finishing fd {}", e.fd))?;
            }
        }
    }
    Ok(())
}

fn dup_fd(fd: RawFd) -> Result<OwnedFd> {
    // SAFETY: duplicating an fd of ours.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if n < 0 {
        bail!("duplicating fd {fd}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: n was just created and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Opens a new file description for an fd entry, by the kind that knows it.
pub fn open_entry(file: &FdFile, ctx: &RestoreCtx) -> Result<OwnedFd> {
    for k in KINDS {
        if let Some(f) = k.restore(file, ctx)? {
            return Ok(f);
        }
    }
    bail!("fd entry of no known kind")
}

/// Descriptions that processes of the tree share: opened once, by crust,
/// before the tree forks (`description_id`s seen in more than one process).
pub fn open_shared<'a>(
    tables: impl Iterator<Item = &'a FdTable>,
    ctx: &RestoreCtx,
) -> Result<std::collections::HashMap<u64, RawFd>> {
    let mut by_id: std::collections::HashMap<u64, (usize, &FdEntry)> =
        std::collections::HashMap::new();
    for t in tables {
        let mut ids: Vec<u64> = t.fds.iter().map(|e| e.description_id).collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            let first = t
                .fds
                .iter()
                .find(|e| e.description_id == id)
                .expect("an id of this table");
            by_id.entry(id).or_insert((0, first)).0 += 1;
        }
    }
    let mut out = std::collections::HashMap::new();
    for (id, (procs, e)) in by_id {
        if procs < 2 || id == 0 {
            continue;
        }
        let file = e.file.as_ref().context("fd entry without a file")?;
        let fd = open_entry(file, ctx)
            .with_context(|| format!("opening the file of fd {} shared in the tree", e.fd))?;
        out.insert(id, std::os::fd::IntoRawFd::into_raw_fd(fd));
    }
    Ok(out)
}

fn own_fds() -> Result<Vec<RawFd>> {
    Ok(fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// A task's root and working directory, opened (O_PATH) before its fd
/// table is rebuilt: both paths are crust's view, and the cwd may lie
/// outside the root. `apply` moves the task into them.
pub struct FsDirs {
    root: Option<OwnedFd>,
    cwd: OwnedFd,
    umask: u32,
}

impl FsDirs {
    /// Opens the dumped root and cwd (a deleted one: the directory crust
    /// made again, from `inodes`), above fd `min`.
    pub fn open(
        table: &FdTable,
        inodes: &std::collections::HashMap<(u64, u64), RawFd>,
        min: RawFd,
    ) -> Result<Self> {
        let open = |path: &str, ghost: Option<&crate::images::pb::GhostDir>, what: &str| {
            let fd = match ghost {
                Some(g) => {
                    let made = inodes.get(&(g.dev, g.ino)).with_context(|| {
                        format!("the deleted {what} {} was not made again", g.path)
                    })?;
                    super::ghost::reopen(*made, libc::O_PATH | libc::O_DIRECTORY, &g.path)?
                }
                None => open_fd(path, (libc::O_PATH | libc::O_DIRECTORY) as u32).map_err(|e| {
                    anyhow::anyhow!("{what} {path} is gone ({e:#}); create it to restore")
                })?,
            };
            // SAFETY: duplicating an fd we own above the task's fds.
            let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
            new_fd(high as i64, what)
        };
        let root = (table.root != "/" || table.root_ghost.is_some())
            .then(|| open(&table.root, table.root_ghost.as_ref(), "root directory"))
            .transpose()?;
        let cwd = open(&table.cwd, table.cwd_ghost.as_ref(), "working directory")?;
        Ok(FsDirs {
            root,
            cwd,
            umask: table.umask,
        })
    }

    /// The fds to keep while the fd table is rebuilt.
    pub fn fds(&self) -> Vec<RawFd> {
        self.root
            .iter()
            .chain([&self.cwd])
            .map(|f| f.as_raw_fd())
            .collect()
    }

    /// chroot into the root, chdir into the cwd, set the umask.
    pub fn apply(self) -> Result<()> {
        if let Some(root) = &self.root {
            nix::unistd::fchdir(root.as_raw_fd()).context("entering the root directory")?;
            nix::unistd::chroot(".").context("chroot to the dumped root")?;
        }
        nix::unistd::fchdir(self.cwd.as_raw_fd()).context("entering the working directory")?;
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(self.umask));
        Ok(())
    }
}

//! Files: the fd table of a task, and the framework every kind of open file
//! plugs into.
//!
//! Each kind of open file is one `FileKind`, in its own module with its image
//! message: it recognises an fd at dump, describes its entry for `crust
//! show`, checks before a restore that what it needs is there, makes what the
//! whole tree shares before the tree forks (a pipe, a pty pair, a recreated
//! deleted file), opens the fd again in the restored task, and finishes it
//! once every fd is in place. Adding a kind is one module, its message in the
//! `FdEntry.file` oneof, and one line in `KINDS`.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use anyhow::{Context, Result, bail};

use crate::images::ImageDir;
use crate::images::pb::{FdEntry, FdTable, GhostData, PipeData, fd_entry::File as FdFile};
use crate::proc;

/// What the dump of the tree's fd tables knows beyond one fd: the tree, the
/// options, the images directory, and what kinds collect once per tree.
pub struct DumpCtx<'a> {
    /// Every live process of the dumped tree.
    pub tree: &'a [i32],
    /// The tree's zombies (restored as zombies with their PIDs).
    pub zombies: &'a [i32],
    pub shell_job: bool,
    pub file_locks: bool,
    /// `--force-irmap`: a watched inode whose file handle does not open is
    /// looked for in `irmap_scan_paths`.
    pub force_irmap: bool,
    pub irmap_scan_paths: Vec<std::path::PathBuf>,
    /// `--ext-unix-sk[=INO,...]`: None without it; the inodes listed.
    pub ext_unix_sk: Option<Vec<u64>>,
    /// `--tcp-established`: TCP connections are dumped through repair
    /// mode; `--tcp-close`: they are dumped to come back closed;
    /// `--skip-in-flight`: connections not accepted yet are left out.
    pub tcp_established: bool,
    pub tcp_close: bool,
    pub skip_in_flight: bool,
    /// What the dump of inet sockets asks the kernel once for the tree.
    pub inet: super::inet::InetDumpState,
    /// Objects dumped once for the whole tree (a pipe's buffer...), by a
    /// kind's tag and numbers.
    pub seen: RefCell<HashSet<ObjKey>>,
    /// Pipe buffers first seen in the process being read (`FdTable.pipes`).
    pub new_pipes: RefCell<Vec<PipeData>>,
    /// Files without a name that the tree holds (deleted, memfds), stored
    /// once per inode (`ghost`).
    pub ghosts: &'a super::ghost::GhostStore,
    descriptions: Descriptions,
    /// What the dump took out of the live tree (bytes read out of a pty
    /// pair, a connection's repair mode): given back when the tree runs on
    /// (`give_back`, or on drop), that is unless the dump succeeded and
    /// kills it (`tree_ends`).
    put_backs: RefCell<Vec<PutBack>>,
    /// What is done to what the tree held once the dump killed it
    /// (`tree_ends`): connections back in repair mode before their last
    /// close.
    at_end: RefCell<Vec<PutBack>>,
    /// The dump's guardian, told of what must be undone should crust die
    /// (connections put in repair mode).
    pub guardian: &'a crate::guardian::Guardian,
}

/// Gives back to the live tree something the dump took from it.
pub type PutBack = Box<dyn FnOnce() -> Result<()>>;

impl Drop for DumpCtx<'_> {
    fn drop(&mut self) {
        self.give_back();
    }
}

impl<'a> DumpCtx<'a> {
    pub fn new(
        tree: &'a [i32],
        zombies: &'a [i32],
        opts: &crate::dump::DumpOpts,
        ghosts: &'a super::ghost::GhostStore,
        guardian: &'a crate::guardian::Guardian,
    ) -> Self {
        DumpCtx {
            tree,
            zombies,
            shell_job: opts.shell_job,
            file_locks: opts.file_locks,
            force_irmap: opts.force_irmap,
            irmap_scan_paths: opts.irmap_scan_paths.clone(),
            ext_unix_sk: opts.ext_unix_sk.clone(),
            tcp_established: opts.tcp_established,
            tcp_close: opts.tcp_close,
            skip_in_flight: opts.skip_in_flight,
            inet: Default::default(),
            seen: RefCell::new(HashSet::new()),
            new_pipes: RefCell::new(Vec::new()),
            ghosts,
            descriptions: Descriptions::default(),
            put_backs: RefCell::new(Vec::new()),
            at_end: RefCell::new(Vec::new()),
            guardian,
        }
    }

    /// Registers what gives back something taken from the live tree, should
    /// it run on.
    pub fn on_resume(&self, f: PutBack) {
        self.put_backs.borrow_mut().push(f);
    }

    /// Registers what is done once the dump killed the tree.
    pub fn on_tree_end(&self, f: PutBack) {
        self.at_end.borrow_mut().push(f);
    }

    /// The tree runs on: what the dump took is given back now.
    pub fn give_back(&self) {
        for f in self.put_backs.take() {
            if let Err(e) = f() {
                tracing::warn!("giving back what the dump took: {e:#}");
            }
        }
    }

    /// Whether `tree_ends` has work that must wait for the killed tree to
    /// be dead (crust's copies of its connections).
    pub fn holds_for_restore(&self) -> bool {
        !self.at_end.borrow().is_empty()
    }

    /// The dump is done and killed the tree: nothing is given back, and
    /// what the tree held is left as the restore needs it.
    pub fn tree_ends(&self) -> Result<()> {
        self.put_backs.borrow_mut().clear();
        let mut first_err = None;
        for f in self.at_end.take() {
            if let Err(e) = f() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Records `key` as dumped; false when it was already.
    pub fn first_time(&self, key: ObjKey) -> bool {
        self.seen.borrow_mut().insert(key)
    }
}

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
    pub ctx: &'a DumpCtx<'a>,
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

    /// /proc/PID/fd/N of this fd.
    pub fn proc_path(&self) -> String {
        format!("/proc/{}/fd/{}", self.pid, self.fd)
    }

    /// The open(2) flags to keep in an image (close-on-exec is per fd).
    pub fn open_flags(&self) -> u32 {
        self.flags & !O_CLOEXEC
    }
}

/// Names an object made for the whole tree before it forks: a kind's tag
/// and two numbers of its choosing (a pipe's inode, a pty's index...).
pub type ObjKey = (&'static str, u64, u64);

/// The objects crust makes before the tree forks, which every restored task
/// inherits and dups or reopens: crust holds them until the tree is built.
#[derive(Default)]
pub struct TreeObjects(HashMap<ObjKey, RawFd>);

impl TreeObjects {
    pub fn get(&self, key: ObjKey) -> Option<RawFd> {
        self.0.get(&key).copied()
    }

    pub fn contains(&self, key: ObjKey) -> bool {
        self.0.contains_key(&key)
    }

    pub fn insert(&mut self, key: ObjKey, fd: OwnedFd) {
        if let Some(old) = self.0.insert(key, fd.into_raw_fd()) {
            // SAFETY: the fd this map held for the key, replaced.
            unsafe { libc::close(old) };
        }
    }

    /// The fd of `key`, or an error naming `what` was not made.
    pub fn need(&self, key: ObjKey, what: &str) -> Result<RawFd> {
        self.get(key)
            .with_context(|| format!("{what} was not made before the tree forked"))
    }

    /// Makes object `key` with `make`, unless an earlier fd (of this task
    /// or another) had it made already.
    pub fn make_once(&mut self, key: ObjKey, make: impl FnOnce() -> Result<OwnedFd>) -> Result<()> {
        if !self.contains(key) {
            let fd = make()?;
            self.insert(key, fd);
        }
        Ok(())
    }

    /// A copy of object `key` for one fd of a restored task.
    pub fn dup_of(&self, key: ObjKey, what: &str) -> Result<OwnedFd> {
        dup_fd(self.need(key, what)?)
    }

    pub fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.0.values().copied()
    }

    /// Closes crust's copies (the tree holds its own).
    pub fn close_all(&mut self) {
        for (_, fd) in self.0.drain() {
            // SAFETY: fds this map owns.
            unsafe { libc::close(fd) };
        }
    }
}

/// Everything a restore read about the tree's files, for the kinds to make
/// what the tree shares (`FileKind::prepare`).
pub struct TreeImages<'a> {
    /// (PID, fd table) of every live process.
    pub tables: Vec<(i32, &'a FdTable)>,
    /// The files without a name the tree holds (`ghost`).
    pub ghosts: &'a [GhostData],
    pub dir: &'a ImageDir,
    /// `--inherit-fd`: crust's fd N stands in for KEY.
    pub inherit_fds: &'a [(RawFd, String)],
    /// crust's own terminal, for `--shell-job`.
    pub tty: Option<RawFd>,
    /// `--ext-unix-sk`: sockets connected outside the tree are connected
    /// again by name.
    pub ext_unix_sk: bool,
}

impl TreeImages<'_> {
    /// Every fd entry's file in the tree, with the PID and fd holding it,
    /// and the files carried inside them (in flight in a socket's queue:
    /// with the PID holding the socket).
    pub fn files(&self) -> impl Iterator<Item = (i32, &FdEntry, &FdFile)> {
        let mut out = Vec::new();
        for (pid, t) in &self.tables {
            for e in &t.fds {
                with_carried(e, &mut |e, f| out.push((*pid, e, f)));
            }
        }
        out.into_iter()
    }
}

/// Calls `f` on an entry's file and on every file carried inside it, depth
/// first.
pub fn with_carried<'a>(e: &'a FdEntry, f: &mut dyn FnMut(&'a FdEntry, &'a FdFile)) {
    let Some(file) = e.file.as_ref() else { return };
    f(e, file);
    for k in KINDS {
        for c in k.carried(file) {
            with_carried(c, f);
        }
    }
}

/// What a `FileKind` is given at restore.
pub struct RestoreCtx<'a> {
    /// crust's own terminal, for `--shell-job`.
    pub tty: Option<RawFd>,
    /// Open file descriptions shared by several processes of the tree, by
    /// `description_id`, opened by crust before the tree forks.
    pub shared: &'a HashMap<u64, RawFd>,
    /// What the kinds made for the whole tree (`FileKind::prepare`).
    pub objects: &'a TreeObjects,
}

pub trait FileKind: Sync {
    /// Claims the fd, returning its image entry, or None when it is not of this kind.
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>>;
    /// The description of `f`, which this kind dumped from another process
    /// of the tree, is held by `pid` as `fd` too: refuses it when it cannot
    /// be opened by crust before the tree forks, as shared descriptions are.
    fn check_shared(&self, _f: &FdFile, _pid: i32, _fd: RawFd) -> Result<()> {
        Ok(())
    }
    /// One line for `crust show`, or None when the entry is not of this kind.
    fn describe(&self, f: &FdFile) -> Option<String>;
    /// Before anything is made: refuses a restore that cannot work (a file
    /// gone or replaced since the dump).
    fn check(&self, _f: &FdFile) -> Result<()> {
        Ok(())
    }
    /// Makes, once for the whole tree and before it forks, the objects
    /// several fds or tasks share.
    fn prepare(&self, _t: &TreeImages, _objects: &mut TreeObjects) -> Result<()> {
        Ok(())
    }
    /// Opens a new file description for the entry.
    fn restore(&self, f: &FdFile, ctx: &RestoreCtx) -> Result<Option<OwnedFd>>;
    /// Whether the entry is opened only once every other fd of the task is
    /// in place (a /proc file of the task's own fd needs that fd). Such a
    /// file cannot be opened by crust before the tree forks: its
    /// description is never shared by processes.
    fn opens_late(&self, _f: &FdFile) -> bool {
        false
    }
    /// Runs once every fd of the task is in place (an epoll set adds its
    /// targets here, by their fd numbers).
    fn finish(&self, _f: &FdFile, _fd: RawFd) -> Result<()> {
        Ok(())
    }
    /// The files this one carries, which are no fd of any task (those in
    /// flight in a socket's queue): their kinds prepare and check them too.
    fn carried<'a>(&self, _f: &'a FdFile) -> Vec<&'a FdEntry> {
        Vec::new()
    }
    /// Runs once at dump, when every process's fd table has been read (in
    /// the order of `ctx.tree`): what spans processes is checked here (a
    /// socket whose peer is held outside the tree).
    fn tree_read(&self, _tables: &mut [FdTable], _ctx: &DumpCtx) -> Result<()> {
        Ok(())
    }
    /// Runs in crust once the whole tree is rebuilt, just before it runs
    /// (and once the network lock is lifted), once per open file
    /// description: `copy` gives crust a copy of the restored fd
    /// (pidfd_getfd), taken only when the kind asks for it.
    fn resume(&self, _f: &FdFile, _copy: &mut dyn FnMut() -> Result<OwnedFd>) -> Result<()> {
        Ok(())
    }
}

/// Every kind of file crust knows; the first to claim an fd dumps it.
static KINDS: &[&dyn FileKind] = &[
    &super::eventfd::EventFdKind,
    &super::pidfd::PidFdKind,
    &super::signals::SignalFdKind,
    &super::timers::TimerFdKind,
    &super::epoll::EpollKind,
    &super::inotify::InotifyKind,
    &super::fanotify::FanotifyKind,
    &super::ghost::GhostFileKind,
    &super::ghost::GhostDirKind,
    &super::nsfile::NsFileKind,
    &super::regular::RegularFileKind,
    &super::pty::PtyKind,
    &super::devices::TtyKind,
    &super::devices::CharDeviceKind,
    &super::pipes::PipeKind,
    &super::fifo::FifoKind,
    &super::inet::InetKind,
    &super::packet_sk::PacketSkKind,
    &super::netlink_sk::NetlinkSkKind,
    // Last: its prepare sends the files in flight in the tree's sockets,
    // made by the kinds above.
    &super::unix_sk::UnixSkKind,
];

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

pub const O_CLOEXEC: u32 = libc::O_CLOEXEC as u32;
/// Flags that must not be replayed when reopening a file.
const OPEN_ONLY: u32 = (libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY) as u32;

/// Opens `path` with dumped open(2) flags (those that only matter at open
/// time dropped), close-on-exec, and O_NOCTTY: a terminal reopened in a
/// restored session leader must not become its controlling terminal by
/// accident (that is `pty::take_ctty`'s, explicitly).
pub fn open_fd(path: &str, flags: u32) -> Result<OwnedFd> {
    try_open(path, flags).with_context(|| format!("opening {path}"))
}

/// `open_fd` with the bare error, for callers that look at the errno.
pub fn try_open(path: &str, flags: u32) -> std::io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path)?;
    let flags = (flags & !OPEN_ONLY) | O_CLOEXEC | libc::O_NOCTTY as u32;
    // SAFETY: a plain open(2) of a NUL-terminated path.
    let fd = unsafe { libc::open(c.as_ptr(), flags as i32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a new description of the file crust holds as `fd`, with `flags`
/// (through /proc/self/fd: the same inode, whatever its name).
pub fn reopen(fd: RawFd, flags: i32, name: &str) -> Result<OwnedFd> {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}"))?;
    // O_NOFOLLOW would refuse the /proc magic link itself (sqlite opens its
    // temporary files with it), O_TMPFILE would make a new file: neither
    // says anything about the open file.
    let mut drop = libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_NOFOLLOW;
    // O_TMPFILE is __O_TMPFILE | O_DIRECTORY: a directory keeps its O_DIRECTORY.
    const O_TMPFILE_BIT: i32 = 0o20000000;
    if flags & O_TMPFILE_BIT != 0 {
        drop |= libc::O_TMPFILE;
    }
    // SAFETY: open(2) of a NUL-terminated path.
    let fd = unsafe { libc::open(path.as_ptr(), (flags & !drop) | libc::O_CLOEXEC) };
    if fd < 0 {
        bail!("reopening {name}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the status flags (O_NONBLOCK, O_APPEND, O_DIRECT, O_NOATIME) of a
/// description to the dumped ones.
pub fn set_status_flags(fd: RawFd, flags: u32, what: &str) -> Result<()> {
    let settable = (libc::O_NONBLOCK | libc::O_APPEND | libc::O_DIRECT | libc::O_NOATIME) as u32;
    // SAFETY: fcntl on an fd of ours.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, (flags & settable) as i32) } < 0 {
        bail!(
            "setting the flags of {what}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Seeks a description to its dumped offset.
pub fn seek_to(fd: RawFd, pos: u64, what: &str) -> Result<()> {
    // SAFETY: lseek on an fd of ours.
    if unsafe { libc::lseek(fd, pos as i64, libc::SEEK_SET) } < 0 {
        bail!(
            "seeking {what} to {pos}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A new fd of the description crust holds as `fd` (dup, close-on-exec).
pub fn dup_fd(fd: RawFd) -> Result<OwnedFd> {
    // SAFETY: duplicating an fd of ours.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    new_fd(n as i64, &format!("a copy of fd {fd}"))
}

fn describe_unsupported(link: &str) -> &'static str {
    if link.starts_with("pipe:") {
        "a pipe"
    } else if link.starts_with("socket:") {
        "a socket"
    } else if link.starts_with("anon_inode:") {
        "an anonymous-inode file"
    } else {
        "a file of a kind"
    }
}

/// (pid, fd, description id) of one fd of a description.
type DescriptionRef = (i32, RawFd, u64);

/// The open file descriptions seen so far in the tree, by the (dev, inode)
/// of their file: (pid, fd, description id) of one fd of each.
#[derive(Default)]
struct Descriptions {
    by_file: RefCell<HashMap<(u64, u64), Vec<DescriptionRef>>>,
    /// The image entry of each description, by id: a description met again
    /// in another process is the same entry.
    files: RefCell<HashMap<u64, FdFile>>,
    next_id: Cell<u64>,
}

/// What /proc tells of one fd: its link, its fdinfo lines, its status
/// flags and its offset.
struct FdStatus {
    link: String,
    info: Vec<(String, String)>,
    flags: u32,
    pos: u64,
}

fn fd_status(pid: i32, fd: RawFd) -> Result<FdStatus> {
    let link = fs::read_link(format!("/proc/{pid}/fd/{fd}"))?
        .to_string_lossy()
        .into_owned();
    let info = proc::fdinfo(pid, fd)?;
    let flags = info_get(&info, "flags")
        .and_then(|v| u32::from_str_radix(v, 8).ok())
        .unwrap_or(0);
    let pos = info_get(&info, "pos")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(FdStatus {
        link,
        info,
        flags,
        pos,
    })
}

/// Collects the fd table and fs state of a task.
pub fn dump_fd_table(pid: i32, ctx: &DumpCtx) -> Result<FdTable> {
    let mut fds: Vec<RawFd> = fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    let mut table = super::fs::dump_fs(pid)?;
    let pidfd = crate::sys::pidfd_open(pid).with_context(|| format!("pidfd of {pid}"))?;
    let descriptions = &ctx.descriptions;
    for fd in fds {
        let path = format!("/proc/{pid}/fd/{fd}");
        let FdStatus {
            link,
            info,
            flags,
            pos,
        } = fd_status(pid, fd)?;
        let what = describe_unsupported(&link);
        // Not followed when it is a symlink held with O_PATH|O_NOFOLLOW: the
        // magic link then leads to the symlink itself.
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
        if let Some((_, f, id)) = same.filter(|&(p, _, _)| p == pid) {
            let first = table
                .fds
                .iter()
                .find(|e| e.fd == f)
                .expect("an fd of this table");
            let (first_fd, file) = (first.fd, first.file.clone());
            table.fds.push(FdEntry {
                fd,
                cloexec: flags & O_CLOEXEC != 0,
                file,
                dup_of: Some(first_fd),
                description_id: id,
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
            ctx,
        };
        let mut entry = descriptions.files.borrow().get(&description_id).cloned();
        if let Some(f) = &entry {
            for k in KINDS {
                k.check_shared(f, pid, fd)?;
            }
        }
        if let (Some(f), Some((other, other_fd, _))) = (&entry, same)
            && KINDS.iter().any(|k| k.opens_late(f))
        {
            bail!(
                "PID {pid} fd {fd} ({link}) is the same open file as fd {other_fd} of PID {other}; crust opens such a file in each task after its other fds and cannot share it between processes; close it in one of them"
            );
        }
        for k in KINDS.iter().filter(|_| entry.is_none()) {
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
        descriptions
            .files
            .borrow_mut()
            .insert(description_id, file.clone());
        let mut locks = super::locks::dump_locks(pid, fd, &link, flags, &info, ctx.file_locks)?;
        // What belongs to the description (its owner, its flock, OFD locks
        // and leases) is given back once, by the first process of the tree
        // that holds it: a lease taken again in a second process would make
        // that one its holder, and a lease's break signal could reach a
        // process that is not the one waiting for it.
        let first_holder = same.is_none();
        if !first_holder {
            locks.retain(super::locks::per_process);
        }
        let owner = if first_holder {
            super::fown::dump_owner(&pidfd, pid, fd, flags)?
        } else {
            None
        };
        table.fds.push(FdEntry {
            fd,
            cloexec: flags & O_CLOEXEC != 0,
            file: Some(file),
            dup_of: None,
            description_id,
            locks,
            owner,
        });
    }
    table.pipes = ctx.new_pipes.take();
    Ok(table)
}

/// Dumps a file crust itself holds as `fd` (one in flight, which a socket
/// handed over when peeked), through the kinds like any fd of the tree.
/// `whose` names where it was found, for errors.
pub fn dump_carried(fd: RawFd, ctx: &DumpCtx, whose: &str) -> Result<FdFile> {
    let pid = std::process::id() as i32;
    let path = format!("/proc/{pid}/fd/{fd}");
    let FdStatus {
        link,
        info,
        flags,
        pos,
    } = fd_status(pid, fd)?;
    let what = describe_unsupported(&link);
    let meta = fs::metadata(&path)
        .with_context(|| format!("{whose}: {what} ({link}) crust cannot dump yet"))?;
    let probe = FdProbe {
        pid,
        fd,
        link: &link,
        meta: &meta,
        flags,
        pos,
        info: &info,
        ctx,
    };
    for k in KINDS {
        if let Some(f) = k.dump(&probe).with_context(|| format!("{whose}: {link}"))? {
            return Ok(f);
        }
    }
    bail!("{whose} is {what} ({link}) that crust cannot dump yet")
}

/// Lets every kind check what spans the tree's fd tables, once all are read.
pub fn tree_read(tables: &mut [FdTable], ctx: &DumpCtx) -> Result<()> {
    for k in KINDS {
        k.tree_read(tables, ctx)?;
    }
    Ok(())
}

/// Whether fd `a` of `pa` and fd `b` of `pb` are one open file description.
pub fn same_file(pa: i32, a: RawFd, pb: i32, b: RawFd) -> bool {
    const KCMP_FILE: i32 = 0;
    // SAFETY: kcmp only compares kernel objects; it reads no memory of ours.
    unsafe { libc::syscall(libc::SYS_kcmp, pa, pb, KCMP_FILE, a, b) == 0 }
}

/// One line describing an fd entry's file, by the kind that knows it.
pub fn describe_file(f: &FdFile) -> String {
    KINDS
        .iter()
        .find_map(|k| k.describe(f))
        .unwrap_or_else(|| "a file of no known kind".into())
}

/// Checks, before anything is made, that every file of the table can come
/// back (each kind's `check`).
pub fn check_fd_table(table: &FdTable) -> Result<()> {
    for e in table.fds.iter().filter(|e| e.dup_of.is_none()) {
        let mut files = Vec::new();
        with_carried(e, &mut |_, f| files.push(f));
        for f in files {
            for k in KINDS {
                k.check(f).with_context(|| format!("fd {}", e.fd))?;
            }
        }
    }
    Ok(())
}

/// Makes what the tree's files share, before it forks (each kind's
/// `prepare`, in `KINDS` order).
pub fn prepare_tree(t: &TreeImages) -> Result<TreeObjects> {
    let mut objects = TreeObjects::default();
    for k in KINDS {
        if let Err(e) = k.prepare(t, &mut objects) {
            objects.close_all();
            return Err(e);
        }
    }
    Ok(objects)
}

/// Rebuilds the fd table in the current (restored) process. Every fd not in
/// the table and not in `keep` is closed.
pub fn restore_fd_table(table: &FdTable, ctx: &RestoreCtx, keep: &[RawFd]) -> Result<()> {
    // The fds entries are made from (crust's objects and shared
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
    let mut shared = HashMap::new();
    for (id, &fd) in ctx.shared {
        shared.insert(*id, lift(fd)?);
    }
    let mut objects = TreeObjects::default();
    for (key, &fd) in &ctx.objects.0 {
        objects.0.insert(*key, lift(fd)?);
    }
    let sources: Vec<RawFd> = shared.values().copied().chain(objects.fds()).collect();
    let lifted = RestoreCtx {
        tty: ctx.tty,
        shared: &shared,
        objects: &objects,
    };
    for fd in own_fds()? {
        if !keep.contains(&fd) && !sources.contains(&fd) {
            // SAFETY: closing an fd of crust's that the task must not inherit.
            unsafe { libc::close(fd) };
        }
    }
    // In ascending order, each new file lands at or below its number (every
    // lower number of the table is taken already, or left for the late
    // pass), so placing it with dup2 never overwrites one still to come, and
    // no fd is held twice: a task with as many fds as its limit allows
    // restores within that limit. Files a kind opens late (a /proc file of
    // one of the task's fds needs that fd) come after all the others.
    let mut order: Vec<&FdEntry> = table.fds.iter().collect();
    order.sort_by_key(|e| (opens_late(e), e.fd));
    for e in order {
        let fd = if let Some(of) = e.dup_of {
            dup_fd(of)?
        } else if let Some(&src) = shared.get(&e.description_id) {
            dup_fd(src)?
        } else {
            let file = e.file.as_ref().context("fd entry without a file")?;
            open_entry(file, &lifted).with_context(|| format!("restoring fd {}", e.fd))?
        };
        let raw = fd.into_raw_fd();
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
        // SAFETY: crust's copies; every task fd made from them is a dup or reopen.
        unsafe { libc::close(fd) };
    }
    for e in table.fds.iter().filter(|e| e.dup_of.is_none()) {
        if let Some(file) = &e.file {
            for k in KINDS {
                k.finish(file, e.fd)
                    .with_context(|| format!("finishing fd {}", e.fd))?;
            }
        }
    }
    // After every `finish`: one may move fds about (an epoll target put
    // back at its old number), and closing any fd of a file drops the
    // process's POSIX locks on it.
    for e in table.fds.iter().filter(|e| e.dup_of.is_none()) {
        super::locks::restore_locks(e)?;
        if let Some(o) = &e.owner {
            super::fown::restore_owner(e.fd, o)?;
        }
    }
    Ok(())
}

/// Whether an entry (or the fd it is a dup of) is opened in the late pass.
fn opens_late(e: &FdEntry) -> bool {
    e.file
        .as_ref()
        .is_some_and(|f| KINDS.iter().any(|k| k.opens_late(f)))
}

/// Each kind's `resume` for every open file description of the restored
/// tree, which is stopped and about to run.
pub fn resume_tree<'a>(tables: impl Iterator<Item = (i32, &'a FdTable)>) -> Result<()> {
    let mut seen = HashSet::new();
    for (pid, t) in tables {
        let mut pidfd: Option<OwnedFd> = None;
        for e in t.fds.iter().filter(|e| e.dup_of.is_none()) {
            let Some(f) = &e.file else { continue };
            if !seen.insert(e.description_id) {
                continue;
            }
            let mut copy = || -> Result<OwnedFd> {
                if pidfd.is_none() {
                    pidfd = Some(
                        crate::sys::pidfd_open(pid).with_context(|| format!("pidfd of {pid}"))?,
                    );
                }
                let pfd = pidfd.as_ref().expect("opened above");
                crate::sys::pidfd_getfd(pfd, e.fd)
                    .with_context(|| format!("taking a copy of restored PID {pid} fd {}", e.fd))
            };
            for k in KINDS {
                k.resume(f, &mut copy)
                    .with_context(|| format!("restored PID {pid} fd {}", e.fd))?;
            }
        }
    }
    Ok(())
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
) -> Result<HashMap<u64, RawFd>> {
    let mut by_id: HashMap<u64, (usize, &FdEntry)> = HashMap::new();
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
    let mut out = HashMap::new();
    for (id, (procs, e)) in by_id {
        if procs < 2 || id == 0 {
            continue;
        }
        let file = e.file.as_ref().context("fd entry without a file")?;
        if opens_late(e) {
            bail!(
                "fd {} ({}) is shared by several processes of the tree, but crust opens it in its task only and cannot share it (a dump refuses such a tree)",
                e.fd,
                describe_file(file)
            );
        }
        let fd = open_entry(file, ctx)
            .with_context(|| format!("opening the file of fd {} shared in the tree", e.fd))?;
        out.insert(id, fd.into_raw_fd());
    }
    Ok(out)
}

fn own_fds() -> Result<Vec<RawFd>> {
    Ok(fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_objects_own_their_fds() {
        let mut o = TreeObjects::default();
        let (r, w) = nix::unistd::pipe().unwrap();
        let rr = std::os::fd::AsRawFd::as_raw_fd(&r);
        o.insert(("pipe-r", 7, 0), r);
        o.insert(("pipe-w", 7, 0), w);
        assert_eq!(o.get(("pipe-r", 7, 0)), Some(rr));
        assert!(o.contains(("pipe-w", 7, 0)));
        let e = o.need(("pty", 1, 0), "pty 1").unwrap_err().to_string();
        assert!(e.contains("pty 1 was not made"), "{e}");
        assert_eq!(o.fds().count(), 2);
        o.close_all();
        assert_eq!(o.fds().count(), 0);
    }
}

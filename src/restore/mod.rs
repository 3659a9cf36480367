//! `crust restore`: read and check the images, fork the task with its PID,
//! rebuild it (`task::build_task`, in the child), hand over to the restorer
//! blob, and watch it return into the task's own code.

pub mod pidns;
pub mod plan;
pub mod task;

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use nix::sys::ptrace;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use tracing::info;

use crate::abi;
use crate::actions::{Action, Actions};
use crate::images::pb::{FdTable, Inventory, MmEntry, TaskCore, TaskRef, VmaKind};
use crate::images::{self, ImageDir, ImageKind};
use crate::resources::{files, memory};
use crate::seize::SeizedTask;
use crate::stats::Stats;

pub struct RestoreOpts {
    pub dir: PathBuf,
    pub detach: bool,
    /// `--restore-sibling`: the root is made a child of crust's parent.
    pub sibling: bool,
    pub shell_job: bool,
    /// `--leave-stopped`: the tree is left stopped (SIGSTOP).
    pub leave_stopped: bool,
    pub pidfile: Option<PathBuf>,
    /// Restore into a new PID namespace (`--pid-ns`), under a crust init.
    pub pid_ns: bool,
    /// `--inherit-fd fd[N]:KEY`: crust's fd N stands in for the resource
    /// KEY outside the tree (a pipe's other end: "pipe:[INO]").
    pub inherit_fds: Vec<(std::os::fd::RawFd, String)>,
    /// `--link-remap`: the images may hold files linked back at the dump;
    /// the restore opens them and removes those links.
    pub link_remap: bool,
    /// `--file-locks`: the images may hold file locks and leases.
    pub file_locks: bool,
    /// `--action-script`s.
    pub actions: Actions,
    /// `--ext-unix-sk`: unix sockets connected outside the tree are
    /// connected to their peers' names again.
    pub ext_unix_sk: bool,
    /// `--tcp-established`: restore the connections of the images;
    /// `--tcp-close`: restore them closed.
    pub tcp_established: bool,
    pub tcp_close: bool,
    /// How the connections are locked until the tree runs.
    pub network_lock: crate::resources::netlock::Method,
    /// `--lazy-pages`: the lazy-pages daemon's socket; private memory is
    /// left to it (`crate::lazy`).
    pub lazy_pages: Option<PathBuf>,
}

impl RestoreOpts {
    /// What a task below the root needs of the options: only --shell-job
    /// matters there, and only the root's stdio is crust's terminal.
    pub fn inherit() -> Self {
        RestoreOpts {
            dir: PathBuf::new(),
            detach: false,
            shell_job: true,
            pidfile: None,
            pid_ns: false,
            inherit_fds: Vec::new(),
            link_remap: false,
            sibling: false,
            leave_stopped: false,
            file_locks: false,
            actions: Actions::none(),
            ext_unix_sk: false,
            tcp_established: false,
            tcp_close: false,
            network_lock: crate::resources::netlock::Method::Skip,
            lazy_pages: None,
        }
    }
}

/// Everything read from the images for one task.
pub struct TaskImages {
    pub core: TaskCore,
    pub mm: MmEntry,
    pub files: FdTable,
    pub pages: images::PagesImage,
    /// The older images of the chain `mm.prev_pages` are read from.
    pub chain: Vec<crate::images::chain::Link>,
}

fn load_task(dir: &ImageDir, pid: i32) -> Result<TaskImages> {
    let core: TaskCore = dir.read_msg(ImageKind::Core, pid)?;
    let mm: MmEntry = dir.read_msg(ImageKind::Mm, pid)?;
    let files: FdTable = dir.read_msg(ImageKind::Files, pid)?;
    let pages = images::PagesImage::open(dir, pid)?;
    let chain = crate::images::chain::load(dir, pid, &mm.prev_pages)?;
    if core.threads.is_empty()
        || core
            .threads
            .iter()
            .any(|t| t.regs.is_none() || t.creds.is_none())
    {
        bail!(
            "{}: missing registers or credentials; the images are corrupt",
            dir.file(ImageKind::Core, pid).display()
        );
    }
    Ok(TaskImages {
        core,
        mm,
        files,
        pages,
        chain,
    })
}

/// The process holding `pid`, if any. A task of the dumped tree that the
/// dump's kill left dying (a dump does not wait for a big address space to
/// be torn down) or a zombie (init reaps orphans late) is given a few
/// seconds to be gone.
fn pid_holder(pid: i32) -> Option<String> {
    /// PF_EXITING in the flags of /proc/PID/stat: the task is in exit(),
    /// its memory and files not yet released.
    const PF_EXITING: u64 = 0x4;
    let t = std::time::Instant::now();
    while t.elapsed() < std::time::Duration::from_secs(5) {
        match crate::proc::state_and_flags(pid) {
            Ok((state, flags)) if matches!(state, 'Z' | 'X') || flags & PF_EXITING != 0 => {}
            _ => break,
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    if t.elapsed() >= std::time::Duration::from_millis(5) {
        tracing::debug!(
            "PID {pid} was held by a task exiting or a zombie; waited {:?}",
            t.elapsed()
        );
    }
    pid_comm(pid)
}

fn pid_comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// All a restore works from: the tree and each live task's images and plan.
pub struct RestoreSet {
    pub inv: Inventory,
    pub tasks: HashMap<i32, TaskImages>,
    pub plans: HashMap<i32, plan::RestorePlan>,
    /// Shared anonymous memory, by (dev, inode) of its shmem file: created
    /// by crust before the tree is forked, so every task that maps it maps
    /// the same object.
    pub shared: HashMap<(u64, u64), (u64, u64)>,
    /// What the tree's files share, made by crust before anything forks
    /// (pipes, pty pairs, files without a name...: `FileKind::prepare`).
    pub objects: files::TreeObjects,
    /// Open file descriptions several processes share, by description id.
    pub shared_files: HashMap<u64, std::os::fd::RawFd>,
    /// Where processes sharing an fd table or fs context wait for each other.
    pub rendezvous: crate::resources::fdt::Rendezvous,
    /// `--lazy-pages`: the link to the lazy-pages daemon.
    pub lazy: Option<crate::lazy::RestoreLink>,
}

impl RestoreSet {
    pub fn children_of(&self, pid: i32) -> impl Iterator<Item = &TaskRef> {
        self.inv
            .tasks
            .iter()
            .filter(move |t| t.ppid == pid && t.pid != pid)
    }
    pub fn task_ref(&self, pid: i32) -> &TaskRef {
        self.inv
            .tasks
            .iter()
            .find(|t| t.pid == pid)
            .expect("pid of the tree")
    }
    /// The fd table `pid` has: its own, or the one of the process it
    /// shares it with (CLONE_FILES).
    pub fn fd_table(&self, pid: i32) -> &FdTable {
        let of = self.task_ref(pid).files_of;
        &self.tasks[&if of != 0 { of } else { pid }].files
    }
    /// The processes that share `pid`'s fd table (its members), and those
    /// that share its fs context.
    pub fn files_members(&self, pid: i32) -> impl Iterator<Item = &TaskRef> {
        self.inv.tasks.iter().filter(move |t| t.files_of == pid)
    }
    pub fn fs_members(&self, pid: i32) -> impl Iterator<Item = &TaskRef> {
        self.inv.tasks.iter().filter(move |t| t.fs_of == pid)
    }
    pub fn in_tree(&self, pid: i32) -> bool {
        self.inv.tasks.iter().any(|t| t.pid == pid)
    }
    /// Whether `pgid` is a group whose leader is dead (see `dead_groups`).
    pub fn is_dead_group(&self, pgid: i32) -> bool {
        dead_groups(&self.inv).iter().any(|&(g, _)| g == pgid)
    }
}

/// Checks that the tree's sessions and groups can be rebuilt: every task's
/// session and group lead by a task of the tree, or inherited from outside
/// by the root.
fn check_tree(inv: &Inventory) -> Result<()> {
    let root = inv.tasks.first().context("the inventory names no task")?;
    if root.pid != inv.root_pid {
        bail!("inventory.img: the first task is not the root; the images are corrupt");
    }
    let has = |pid: i32| inv.tasks.iter().any(|t| t.pid == pid);
    for t in &inv.tasks[1..] {
        if !has(t.ppid) {
            bail!(
                "inventory.img: task {} has parent {} outside the tree; the images are corrupt",
                t.pid,
                t.ppid
            );
        }
        if t.sid != root.sid && !has(t.sid) {
            bail!(
                "task {} is in session {}, which no task of the tree leads; crust cannot rebuild it",
                t.pid,
                t.sid
            );
        }
    }
    crate::resources::fdt::check_sharing(inv)?;
    for (pgid, creator) in dead_groups(inv) {
        let sid = inv.tasks.iter().find(|t| t.pid == creator).map(|t| t.sid);
        if let Some(t) = inv
            .tasks
            .iter()
            .find(|t| t.pgid == pgid && !t.zombie && Some(t.sid) != sid)
        {
            bail!(
                "task {} is in process group {pgid}, whose leader is dead, from another session than its parent {}; crust cannot rebuild it",
                t.pid,
                creator
            );
        }
    }
    Ok(())
}

/// Process groups whose leader is dead (no task of the tree, not the
/// root's group), each with the task that makes a stand-in leader for it:
/// the parent of its first member. The stand-in has the leader's PID,
/// creates the group, waits for the members to join and exits; its parent
/// reaps it before it runs its own code again.
pub fn dead_groups(inv: &Inventory) -> Vec<(i32, i32)> {
    let Some(root) = inv.tasks.first() else {
        return Vec::new();
    };
    let mut out: Vec<(i32, i32)> = Vec::new();
    // Zombies count: they are made again in their group before they die.
    for t in &inv.tasks {
        if t.pgid != root.pgid
            && !inv.tasks.iter().any(|l| l.pid == t.pgid)
            && !out.iter().any(|&(g, _)| g == t.pgid)
        {
            out.push((t.pgid, t.ppid));
        }
    }
    out
}

/// Creates one shared anonymous object per shmem inode the tree maps. An
/// object the tree also holds another way (an fd or a private mapping of
/// its /proc/PID/map_files, "/dev/zero (deleted)") is the file crust made
/// again for those (`ghost`), mapped shared: all of them see one object.
fn create_shared_anon(
    tasks: &HashMap<i32, TaskImages>,
    objects: &files::TreeObjects,
) -> Result<HashMap<(u64, u64), (u64, u64)>> {
    let mut sizes: HashMap<(u64, u64), u64> = HashMap::new();
    for img in tasks.values() {
        for v in img
            .mm
            .vmas
            .iter()
            .filter(|v| v.kind() == VmaKind::VmaAnonShared)
        {
            let e = sizes.entry((v.dev, v.ino)).or_default();
            *e = (*e).max(v.pgoff + v.end - v.start);
        }
    }
    let mut out = HashMap::new();
    for (key, size) in sizes {
        let file = match objects.get(crate::resources::ghost::ghost_key(key.0, key.1)) {
            Some(made) => {
                let rw = files::reopen(made, libc::O_RDWR, "a shared memory object")?;
                let f = File::from(rw);
                if f.metadata()?.len() < size {
                    f.set_len(size)?;
                }
                Some(f)
            }
            None => None,
        };
        let (flags, fd) = match &file {
            Some(f) => (libc::MAP_SHARED, std::os::fd::AsRawFd::as_raw_fd(f)),
            None => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a new shared mapping of crust's; the forked tasks inherit
        // it and drop it with the rest of crust's memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!(
                "creating {size} bytes of shared memory: {}",
                std::io::Error::last_os_error()
            );
        }
        out.insert(key, (p as u64, size));
    }
    Ok(out)
}

/// Restores the dump in `opts.dir`; returns the exit code crust should
/// exit with. The progress line ends once the tree runs.
pub fn restore(
    opts: &RestoreOpts,
    stats: Option<&mut Stats>,
    progress: crate::progress::Progress,
) -> Result<i32> {
    // Before anything forks (the init of --pid-ns too): the tree's network
    // namespace, when it had one of its own.
    let inv: Inventory = ImageDir::open(&opts.dir)?.read_msg(ImageKind::Inventory, 0)?;
    if inv.pre_dump {
        crate::refuse!(
            "{} holds a pre-dump (memory only); restore the final dump taken with --prev-images-dir",
            opts.dir.display()
        );
    }
    if inv.deduplicated {
        crate::refuse!(
            "{}: a dedup removed the pages a later dump of its chain replaced; restore that later dump",
            opts.dir.display()
        );
    }
    crate::resources::netlock::enter_tree_netns(&inv)?;
    if opts.pid_ns {
        drop(progress);
        return pidns::restore_in_new_pid_ns(opts);
    }
    let root = restore_tree(opts, stats)?;
    drop(progress);
    if let Some(p) = &opts.pidfile {
        write_pidfile(p, root.as_raw())?;
    }
    if opts.detach {
        return Ok(0);
    }
    wait_exit_code(root)
}

/// Written whole and renamed into place: a reader never sees it empty.
fn write_pidfile(p: &std::path::Path, pid: i32) -> Result<()> {
    let tmp = p.with_extension("crust-tmp");
    std::fs::write(&tmp, format!("{pid}\n"))
        .and_then(|_| std::fs::rename(&tmp, p))
        .with_context(|| format!("writing pidfile {}", p.display()))
}

/// The signals crust passes on to the restored tree while it waits for it
/// (Ctrl-C on crust must reach the program, not orphan it).
const FORWARDED: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// Waits for a child of crust's; its exit code as a shell would give it.
/// Meanwhile SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to crust are passed
/// on to the child, and crust keeps waiting: a terminal's Ctrl-C reaches
/// the child itself when it is in crust's process group, and is not sent
/// twice then.
pub(crate) fn wait_exit_code(child: Pid) -> Result<i32> {
    let mut set = nix::sys::signal::SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.thread_block()?;
    let sfd = nix::sys::signalfd::SignalFd::with_flags(
        &set,
        nix::sys::signalfd::SfdFlags::SFD_NONBLOCK | nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
    )?;
    let same_group = nix::unistd::getpgid(Some(child)).ok() == Some(nix::unistd::getpgrp());
    loop {
        // The child's whole life: no deadline but its own end.
        match crate::sys::wait_child(
            Some(child),
            nix::sys::wait::WaitPidFlag::empty(),
            std::time::Duration::from_millis(200),
        ) {
            Ok(Some(WaitStatus::Exited(_, code))) => return Ok(code),
            Ok(Some(WaitStatus::Signaled(_, sig, _))) => return Ok(128 + sig as i32),
            Ok(_) => {}
            Err(e) => bail!("waiting for restored task {child}: {e}"),
        }
        while let Ok(Some(info)) = sfd.read_signal() {
            let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
                continue;
            };
            // SI_KERNEL: from the terminal, to the whole foreground group.
            let from_terminal = info.ssi_code == libc::SI_KERNEL;
            if !(same_group && from_terminal) {
                let _ = kill(child, sig);
            }
        }
    }
}

/// Rebuilds the tree as a child of crust and lets it run; returns its root.
fn restore_tree(opts: &RestoreOpts, mut stats: Option<&mut Stats>) -> Result<Pid> {
    let dir = ImageDir::open(&opts.dir)?;
    let inv: Inventory = dir.read_msg(ImageKind::Inventory, 0)?;
    // The lock the dump left (when it is here): lifted once the tree runs,
    // or when this restore fails.
    let dumped_lock = inv
        .net_lock
        .as_ref()
        .and_then(crate::resources::netlock::NetLock::adopt);
    check_tree(&inv)?;
    if inv.shell_job && !opts.shell_job {
        crate::refuse!("the images were dumped with --shell-job; restore with --shell-job");
    }
    opts.actions.set_init_pid(inv.root_pid);
    let ghosts = crate::resources::ghost::load(&dir)?;
    if !opts.link_remap
        && let Some(g) = ghosts.iter().find(|g| !g.link_remap.is_empty())
    {
        bail!(
            "the images hold {} (--link-remap at the dump of {}); restore with --link-remap, which removes that link once the restore is done",
            g.link_remap,
            g.path
        );
    }
    let mut tasks = HashMap::new();
    for t in inv.tasks.iter().filter(|t| !t.zombie) {
        let img = load_task(&dir, t.pid)?;
        if !img.mm.lazy_pages.is_empty() && opts.lazy_pages.is_none() {
            crate::refuse!(
                "the images were dumped with --lazy-pages: the private memory of PID {} is with the dump; restore with --lazy-pages beside `crust lazy-pages --page-server`",
                t.pid
            );
        }
        memory::check_mapped_files(&img.mm)?;
        files::check_fd_table(&img.files)?;
        memory::vdso_target(&img.mm)?;
        crate::resources::timers::check_posix_timers(&img.core)?;
        tasks.insert(t.pid, img);
    }
    let net_lock = connections(&inv, &mut tasks, opts, dumped_lock)?;
    // After the lock: a pre-restore script that brings the tree's addresses
    // up here (a migration) exposes no connection to its peer before the
    // restored socket exists, or the peer would get a reset.
    opts.actions.run(Action::PreRestore)?;
    let thread_ids = tasks
        .values()
        .flat_map(|t| t.core.threads.iter().skip(1).map(|th| th.tid));
    for tid in thread_ids {
        if let Some(holder) = pid_holder(tid) {
            bail!(
                "thread id {tid} of the images is taken by a running process ({holder}); stop it (kill {tid}) and restore again"
            );
        }
    }
    for (pid, d) in tasks
        .iter()
        .filter_map(|(p, t)| Some((p, t.files.cwd_dead_proc.as_ref()?)))
    {
        if let Some(holder) = pid_holder(d.pid) {
            bail!(
                "PID {} is taken by a running process ({holder}); task {pid} needs it for a moment (its working directory is /proc/{} of a task that died); stop it (kill {}) and restore again",
                d.pid,
                d.pid,
                d.pid
            );
        }
    }
    for t in &inv.tasks {
        if let Some(holder) = pid_holder(t.pid) {
            bail!(
                "PID {} is taken by a running process ({holder}); stop it (kill {}) and restore again",
                t.pid,
                t.pid
            );
        }
    }
    let tty = [0, 1, 2]
        .into_iter()
        .find(|&fd| opts.shell_job && nix::unistd::isatty(fd).unwrap_or(false));
    let mut objects = files::prepare_tree(&files::TreeImages {
        tables: tasks.iter().map(|(p, t)| (*p, &t.files)).collect(),
        ghosts: &ghosts,
        dir: &dir,
        inherit_fds: &opts.inherit_fds,
        tty,
        ext_unix_sk: opts.ext_unix_sk,
    })?;
    // Held until the tree has attached its SysV segments itself; what it
    // made again goes away again if the restore fails.
    let mut sysv = crate::resources::sysv::prepare(
        tasks.values().map(|t| &t.mm),
        &inv.sysv_sems,
        &inv.sysv_msgs,
    )
    .inspect_err(|_| objects.close_all())?;
    if !opts.file_locks
        && let Some((pid, e)) = tasks
            .iter()
            .find_map(|(p, t)| Some((p, t.files.fds.iter().find(|e| !e.locks.is_empty())?)))
    {
        objects.close_all();
        crate::refuse!(
            "PID {pid} fd {} holds a file lock or lease in the images; restore with --file-locks",
            e.fd
        );
    }
    let shared = create_shared_anon(&tasks, &objects).inspect_err(|_| objects.close_all())?;
    let no_shared = HashMap::new();
    let ctx = files::RestoreCtx {
        tty,
        shared: &no_shared,
        objects: &objects,
    };
    let shared_files = files::open_shared(tasks.values().map(|t| &t.files), &ctx)
        .inspect_err(|_| objects.close_all())?;
    // Mapped before the holes are planned: they must not overlap it.
    let rendezvous = crate::resources::fdt::Rendezvous::new(&inv, BUILD_TIMEOUT)
        .inspect_err(|_| objects.close_all())?;
    let mut plans = HashMap::new();
    let mut holes = Vec::new();
    for (pid, img) in &tasks {
        let plan = plan::make_plan(img, &holes)?;
        holes.push((plan.hole_start, plan.hole_end));
        plans.insert(*pid, plan);
    }
    // Before the tree forks: every task sends its userfaultfd on it.
    let lazy = opts
        .lazy_pages
        .as_deref()
        .map(crate::lazy::RestoreLink::connect)
        .transpose()
        .inspect_err(|_| objects.close_all())?;
    let mut set = RestoreSet {
        inv,
        tasks,
        plans,
        shared,
        objects,
        shared_files,
        rendezvous,
        lazy,
    };
    let pid = set.inv.root_pid;

    let (status_rd, status_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (sync_rd, sync_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    crate::progress::add_tasks(set.tasks.len() as u64);
    crate::progress::add_bytes(set.tasks.values().map(|t| t.pages.len()).sum());
    if let Some(s) = stats.as_mut() {
        s.stage("reading images, shared objects");
        s.count("tasks", set.tasks.len() as u64);
        s.count(
            "threads",
            set.tasks
                .values()
                .map(|t| t.core.threads.len() as u64)
                .sum(),
        );
        s.count(
            "pages restored",
            set.tasks.values().map(|t| t.pages.len() / 4096).sum(),
        );
    }
    let forked = if opts.sibling {
        crate::sys::fork_sibling_with_pid(pid)
    } else {
        crate::sys::fork_with_pid(pid)
    };
    let child = match forked {
        Ok(0) => {
            drop(status_rd);
            drop(sync_wr);
            task::run_child(&set, pid, opts, status_wr, Some(sync_rd), None)
        }
        Ok(child) => child,
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            bail!(
                "PID {pid} is taken by {}; stop it and restore again",
                pid_comm(pid).unwrap_or_else(|| "a process that just exited".into())
            )
        }
        Err(e) => bail!(
            "creating task {pid} with clone3(set_tid): {e}; crust needs CAP_CHECKPOINT_RESTORE"
        ),
    };
    drop(status_wr);
    drop(sync_rd);
    if let Some(l) = set.lazy.as_mut() {
        l.forked(child);
    }
    // The tree holds its files now; crust's copies would keep them open
    // (a pipe's reader would never see EOF).
    set.objects.close_all();
    for &fd in set.shared_files.values() {
        let _ = nix::unistd::close(fd);
    }
    let child = Pid::from_raw(child);
    // A shell job that held its terminal gets crust's: its group becomes
    // the foreground before it runs, or its first read stops it (SIGTTIN).
    let root_ref = set.task_ref(pid);
    let foreground = tty
        .filter(|_| set.inv.shell_job_foreground && root_ref.pgid == pid && root_ref.sid != pid)
        .map(|fd| (fd, Pid::from_raw(pid)));
    // Once the tree is rebuilt and before it runs: the lock is lifted, then
    // the connections leave repair mode, so that their window probes reach
    // the peers.
    let mut net_lock = net_lock;
    let mut before_run = || -> Result<()> {
        if let Some(l) = net_lock.take()
            && let Err(e) = l.release()
        {
            tracing::warn!("the restored tree's connections stay locked: {e:#}");
        }
        // As with criu: a tree with a network namespace of its own has its
        // network-unlock scripts run before it runs.
        if set.inv.net_ns != 0 && set.inv.net_ns != set.inv.crust_net_ns {
            opts.actions.run(Action::NetworkUnlock)?;
        }
        files::resume_tree(set.tasks.iter().map(|(p, t)| (*p, &t.files)))
    };
    if let Err(e) = finish_tree(
        child,
        &set,
        sync_wr,
        status_rd,
        foreground,
        opts,
        &mut before_run,
    ) {
        // Nothing lost: what this restore created goes away again (the rest
        // of the tree is traced with PTRACE_O_EXITKILL and dies with crust).
        let _ = kill(child, Signal::SIGKILL);
        // (A sibling's parent reaps it; its threads are crust's tracees.)
        reap_killed_root(child);
        if set.lazy.as_ref().is_some_and(|l| l.daemon_died()) {
            return Err(e.context(
                "the lazy-pages daemon went away before the tree ran; its memory cannot come back",
            ));
        }
        return Err(e);
    }
    if let Some(l) = set.lazy.take() {
        // The tree runs; the daemon copies the rest of its memory now.
        l.tree_runs()?;
    }
    sysv.keep();
    crate::resources::ghost::remove_link_remaps(&ghosts);
    if let Some(tty) = tty {
        winch_if_resized(&set, tty);
    }
    if let Some(s) = stats.as_mut() {
        s.stage("forking and rebuilding");
    }
    // The tree runs: a failing post-resume script is reported, and undoes
    // nothing.
    if let Err(e) = opts.actions.run(Action::PostResume) {
        tracing::error!("{e:#}");
    }
    info!("restored {} task(s), root PID {pid}", set.inv.tasks.len());
    Ok(child)
}

/// The TCP connections of the images: refused without --tcp-established
/// (or --tcp-close, which makes them closed sockets), and locked until the
/// tree runs (the dump's lock, when it is still here, is taken over).
fn connections(
    inv: &Inventory,
    tasks: &mut HashMap<i32, TaskImages>,
    opts: &RestoreOpts,
    dumped: Option<crate::resources::netlock::NetLock>,
) -> Result<Option<crate::resources::netlock::NetLock>> {
    use crate::resources::{inet, netlock};
    let conns = inet::tcp::image_connections(
        tasks
            .values()
            .flat_map(|t| &t.files.fds)
            .filter_map(|e| e.file.as_ref()),
    );
    if conns.is_empty() {
        return Ok(dumped);
    }
    if opts.tcp_close {
        for t in tasks.values_mut() {
            inet::tcp::close_connections(&mut t.files);
        }
        return Ok(dumped);
    }
    if !opts.tcp_established {
        bail!(
            "the images hold {} TCP connection(s) (dumped with --tcp-established); restore with --tcp-established, or with --tcp-close to have them closed",
            conns.len()
        );
    }
    if dumped.is_some() {
        return Ok(dumped);
    }
    Ok(Some(netlock::NetLock::take(
        opts.network_lock,
        &netlock::lock_name(inv.root_pid),
        &conns,
        None,
    )?))
}

/// How long the restored tree may go without a single event (a thread's
/// final trap, a fork): a task filling gigabytes of memory sends none
/// meanwhile.
pub const BUILD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Reaps the killed root of a failed restore. Its threads are crust's
/// tracees: each must be reaped (__WALL) before the root itself can be.
fn reap_killed_root(root: Pid) {
    use nix::sys::wait::WaitPidFlag;
    let now = Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG);
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_secs(10) {
        match waitpid(root, now) {
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => return,
            Err(e) if e != nix::errno::Errno::EINTR => return,
            _ => {}
        }
        let threads = std::fs::read_dir(format!("/proc/{root}/task"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&t| t != root.as_raw());
        for t in threads {
            let _ = waitpid(Pid::from_raw(t), now);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Where a restored thread is after the restorer's final trap: between
/// system calls, inside one (the SIGTRAP action put back), inside
/// rt_sigreturn, or parked at its exit, back in the task's own code.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Finishing {
    Between,
    InOther,
    InSigreturn,
    Parked,
}

/// The signal that stops a restored task again: the one that stopped it,
/// when it still would. SIGTSTP, SIGTTIN and SIGTTOU stop only where their
/// handler is the default, they are not blocked, and the group is not
/// orphaned (the kernel discards them there); SIGSTOP always stops.
fn stop_signal(set: &RestoreSet, img: &TaskImages) -> Signal {
    let me = set.task_ref(img.core.pid);
    let Ok(sig) = Signal::try_from(me.stop_signo) else {
        return Signal::SIGSTOP;
    };
    if sig == Signal::SIGSTOP {
        return sig;
    }
    let bit = 1u64 << (sig as i32 - 1);
    let default = img
        .core
        .sigactions
        .iter()
        .find(|a| a.signo == sig as u32)
        .is_none_or(|a| a.handler == 0);
    let blocked = img.core.threads[0].sigmask & bit != 0;
    // A group is orphaned unless a member's parent is in another group of
    // the same session (the root's parent, outside the tree, cannot count).
    let orphaned = !set.inv.tasks.iter().any(|t| {
        t.pgid == me.pgid
            && set
                .inv
                .tasks
                .iter()
                .any(|p| p.pid == t.ppid && p.pgid != t.pgid && p.sid == t.sid)
    });
    if default && !blocked && !orphaned {
        sig
    } else {
        Signal::SIGSTOP
    }
}

/// A shell job restored onto a terminal of another size than the one it was
/// dumped from gets SIGWINCH (its group), as on any resize: a full-screen
/// program redraws for the new size.
fn winch_if_resized(set: &RestoreSet, tty: std::os::fd::RawFd) {
    let dumped = set
        .tasks
        .values()
        .flat_map(|t| &t.files.fds)
        .find_map(|e| match &e.file {
            Some(crate::images::pb::fd_entry::File::Tty(t)) if !t.winsize.is_empty() => {
                crate::resources::pty::winsize_of(&t.winsize)
            }
            _ => None,
        });
    let Some(dumped) = dumped else { return };
    // SAFETY: winsize is plain data for which all-zero is valid.
    let mut now: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize.
    if unsafe { libc::ioctl(tty, libc::TIOCGWINSZ, &mut now) } < 0 {
        return;
    }
    if (now.ws_row, now.ws_col) != (dumped.ws_row, dumped.ws_col) {
        let root = set.task_ref(set.inv.root_pid);
        let _ = kill(Pid::from_raw(-root.pgid), Signal::SIGWINCH);
    }
}

/// Reads why the child failed: a text message from crust's code in the
/// child, or a step record from the restorer.
fn child_failure(mut status: File, died: &str) -> anyhow::Error {
    // Other tasks of the tree still hold the pipe: read what is there, not
    // to the end (a moment for the failing task's message to land).
    std::thread::sleep(std::time::Duration::from_millis(50));
    // SAFETY: setting O_NONBLOCK on our own pipe end.
    unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&status),
            libc::F_SETFL,
            libc::O_NONBLOCK,
        )
    };
    let mut buf = Vec::new();
    let _ = status.read_to_end(&mut buf);
    if buf.len() == abi::RESTORER_FAILURE_LEN && buf[0] != b'E' {
        let word = |i: usize| i32::from_le_bytes(buf[i * 4..i * 4 + 4].try_into().unwrap());
        return anyhow::anyhow!(
            "restored task {}: the restorer failed while {}: {}",
            word(2),
            abi::restorer_step_name(word(0) as u32),
            std::io::Error::from_raw_os_error(word(1))
        );
    }
    match buf.strip_prefix(b"E") {
        Some(msg) => anyhow::anyhow!("{}", String::from_utf8_lossy(msg)),
        None => anyhow::anyhow!("{died} before it was rebuilt, without saying why"),
    }
}

/// Watches every thread of the tree through the restorer's final trap and
/// rt_sigreturn (new processes and threads are traced from birth through
/// PTRACE_O_TRACEFORK/TRACECLONE), then removes each task's restorer and
/// lets the tree run.
fn finish_tree(
    root: Pid,
    set: &RestoreSet,
    sync_wr: OwnedFd,
    status_rd: OwnedFd,
    foreground: Option<(std::os::fd::RawFd, Pid)>,
    opts: &RestoreOpts,
    before_run: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    // SAFETY: status_rd is an fd we own; File takes it over.
    let status = unsafe { File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(status_rd)) };
    let mut popts = ptrace::Options::PTRACE_O_TRACESYSGOOD
        | ptrace::Options::PTRACE_O_EXITKILL
        | ptrace::Options::PTRACE_O_TRACECLONE
        | ptrace::Options::PTRACE_O_TRACEFORK;
    // Filters the restorer installs must not bite before the task is let go
    // (the restorer's later steps, the remote munmap of the hole).
    if crate::resources::seccomp::any_seccomp(set.tasks.values().map(|t| &t.core)) {
        popts |= crate::resources::seccomp::SUSPEND_SECCOMP;
    }
    ptrace::seize(root, popts).context("seizing the restored task")?;
    nix::unistd::write(&sync_wr, b"g")?;
    drop(sync_wr);
    // Zombies die again at once, stand-in group leaders once their group is
    // whole, the stand-in of a dead task's /proc directory once its task
    // entered it: these exits are part of the restore.
    let zombies: Vec<Pid> = set
        .inv
        .tasks
        .iter()
        .filter(|t| t.zombie)
        .map(|t| t.pid)
        .chain(dead_groups(&set.inv).into_iter().map(|(g, _)| g))
        .chain(
            set.tasks
                .values()
                .filter_map(|t| Some(t.files.cwd_dead_proc.as_ref()?.pid)),
        )
        .map(Pid::from_raw)
        .collect();
    let expected: usize = set.tasks.values().map(|t| t.core.threads.len()).sum();
    // Per thread, from its final trap on: where it is in the restorer's
    // last system calls (rt_sigaction of SIGTRAP, then rt_sigreturn).
    let mut stage: HashMap<Pid, Finishing> = HashMap::new();
    let parked = |stage: &HashMap<Pid, Finishing>| {
        stage.values().filter(|&&s| s == Finishing::Parked).count()
    };
    while parked(&stage) < expected {
        let st = crate::sys::wait_child(None, nix::sys::wait::WaitPidFlag::__WALL, BUILD_TIMEOUT)
            .context("waiting for the restored tree")?
            .with_context(|| {
                format!(
                    "the restored tree made no progress for {} s ({} of {expected} threads done); a task is stuck rebuilding itself",
                    BUILD_TIMEOUT.as_secs(),
                    parked(&stage)
                )
            })?;
        match st {
            WaitStatus::Stopped(tid, Signal::SIGTRAP) => {
                stage.insert(tid, Finishing::Between);
                ptrace::syscall(tid, None)?;
            }
            WaitStatus::PtraceSyscall(tid) => {
                let s = stage.entry(tid).or_insert(Finishing::Between);
                *s = match *s {
                    Finishing::Between => {
                        let nr = ptrace::getregs(tid)?.orig_rax;
                        if nr == libc::SYS_rt_sigreturn as u64 {
                            Finishing::InSigreturn
                        } else {
                            Finishing::InOther
                        }
                    }
                    Finishing::InOther => Finishing::Between,
                    Finishing::InSigreturn | Finishing::Parked => Finishing::Parked,
                };
                if *s != Finishing::Parked {
                    ptrace::syscall(tid, None)?;
                } else if set.tasks.contains_key(&tid.as_raw()) {
                    crate::progress::task_done();
                }
            }
            // A zombie of the tree died as it should; its parent reaps it.
            WaitStatus::Exited(p, _) | WaitStatus::Signaled(p, _, _) if zombies.contains(&p) => {}
            // A zombie killing itself with its signal: deliver it.
            WaitStatus::Stopped(p, sig) if zombies.contains(&p) => ptrace::cont(p, Some(sig))?,
            WaitStatus::Exited(p, code) => {
                return Err(child_failure(
                    status,
                    &format!("restored task {p} exited with status {code}"),
                ));
            }
            WaitStatus::Signaled(p, sig, _) => {
                return Err(child_failure(
                    status,
                    &format!("restored task {p} was killed by {sig:?}"),
                ));
            }
            WaitStatus::Stopped(tid, sig) => {
                let rip = ptrace::getregs(tid).map(|r| r.rip).unwrap_or(0);
                bail!("restored thread {tid} got {sig:?} at {rip:#x} before it could run");
            }
            // Fork and clone events, and the first stop of a new task.
            WaitStatus::PtraceEvent(tid, ..) => ptrace::cont(tid, None)?,
            other => bail!("the restored tree stopped with {other:?}"),
        }
    }
    for pid in set.tasks.keys() {
        let plan = &set.plans[pid];
        let leader = SeizedTask::from_stopped(Pid::from_raw(*pid))?;
        let r = crate::parasite_ctl::remote_syscall(
            &leader,
            libc::SYS_munmap,
            [plan.hole_start, plan.hole_end - plan.hole_start, 0, 0, 0, 0],
        )?;
        leader.forget();
        if r < 0 {
            bail!(
                "unmapping the restorer from restored task {pid}: errno {}",
                -r
            );
        }
    }
    // The tree is whole and held: a post-restore script may still refuse
    // it (the restore then fails and kills it); pre-resume must not fail.
    opts.actions.run(Action::PostRestore)?;
    if let Err(e) = opts.actions.run(Action::PreResume) {
        tracing::error!("{e:#}");
    }
    if let Some((tty, pgrp)) = foreground {
        // SAFETY: the fd is crust's own terminal, borrowed for this call.
        let tty = unsafe { std::os::fd::BorrowedFd::borrow_raw(tty) };
        if let Err(e) = nix::unistd::tcsetpgrp(tty, pgrp) {
            tracing::warn!("making group {pgrp} the foreground of crust's terminal: {e}");
        }
    }
    before_run()?;
    for (pid, img) in &set.tasks {
        let mut leader = SeizedTask::from_stopped(Pid::from_raw(*pid))?;
        // A task stopped by job control gets its stop signal while still
        // held, so it stops again before it runs a single instruction;
        // with --leave-stopped every task does.
        if set.task_ref(*pid).stopped {
            kill(Pid::from_raw(*pid), stop_signal(set, img))?;
        } else if opts.leave_stopped {
            kill(Pid::from_raw(*pid), Signal::SIGSTOP)?;
        }
        // A thread stopped in an interruptible syscall goes back into the
        // kernel's signal code with its orig_rax, as the freeze found it:
        // the kernel restarts the syscall, or returns EINTR into a handler
        // if a signal comes first.
        let with_syscall = |t: &mut SeizedTask, core: &crate::images::pb::ThreadCore| {
            if let Some(g) = &core.regs {
                t.stop_regs.orig_rax = g.orig_rax;
            }
        };
        for t in img.core.threads.iter().skip(1) {
            let mut th = SeizedTask::from_stopped(Pid::from_raw(t.tid))?;
            with_syscall(&mut th, t);
            th.release()
                .with_context(|| format!("releasing restored thread {}", t.tid))?;
        }
        with_syscall(&mut leader, &img.core.threads[0]);
        leader.release()?;
    }
    Ok(())
}

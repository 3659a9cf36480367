//! The restored task's side of a restore, run in the child crust forked with
//! the task's PID: rebuild memory (premapped in the hole), files, fs state
//! and limits, set up the restorer's args, and jump into the restorer.

use std::io::Read;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result, bail};

use super::plan::{RESTORER_STACK, RestorePlan, THREAD_STACK};
use super::{RestoreOpts, RestoreSet, TaskImages};
use crate::abi::{IoVec, MAX_AUXV, PrctlMmMap, RestorerArgs, RseqConf, ThreadArgs, VmaMove};
use crate::blobs::RESTORER_BLOB;
use crate::images::pb::ThreadCore;
use crate::resources::{
    creds, fdt, files, membarrier, memory, prctl, regs, sched, seccomp, signals, timers,
};
use crate::sys;
use nix::unistd::Pid;
use std::os::fd::FromRawFd;

/// Entry of a restored process (a copy of crust made with the task's PID):
/// never returns. It joins its session and group, premaps and fills its
/// memory (starting from `parent`'s where they shared it), forks its
/// children with their PIDs (each runs this again, inheriting that memory),
/// then rebuilds the rest of itself. A failure is reported through `status`
/// as "E<message>" and ends the process.
pub fn run_child(
    set: &RestoreSet,
    pid: i32,
    opts: &RestoreOpts,
    status: OwnedFd,
    sync: Option<OwnedFd>,
    parent: Option<&memory::Premapped>,
) -> ! {
    crate::log::own_file_for(pid);
    // Above every fd the task will have, so that rebuilding its fd table
    // leaves the pipe in place and a failure at any step can be reported.
    let status_fd = match set.tasks.get(&pid) {
        Some(_) => move_fd_above(status.into_raw_fd(), top_fd(set.fd_table(pid))).unwrap_or(-1),
        None => status.into_raw_fd(),
    };
    let err = match start_task(set, pid, sync) {
        Ok(()) => rebuild_memory(set, pid, parent)
            .and_then(|mem| {
                let standins = fork_children(set, pid, status_fd, mem.as_ref())?;
                Ok((mem, standins))
            })
            .and_then(|(mem, standins)| {
                let img = &set.tasks[&pid];
                let mem = mem.context("a live task without images")?;
                build_task(img, &set.plans[&pid], &mem, &standins, set, opts, status_fd)
            })
            .unwrap_err(),
        Err(e) => e,
    };
    let msg = format!("Erestored task {pid}: {:#}", err);
    // SAFETY: writing a byte buffer to our status pipe.
    unsafe {
        libc::write(status_fd, msg.as_ptr().cast(), msg.len());
        libc::_exit(1)
    }
}

fn start_task(set: &RestoreSet, pid: i32, sync: Option<OwnedFd>) -> Result<()> {
    // Signals stay blocked until rt_sigreturn installs the task's own mask.
    // All 64: glibc's sigprocmask leaves its own two (32 and 33) unblocked,
    // and 32 is the signal of glibc's SIGEV_THREAD timers, which the
    // restorer arms again: one firing before the task is whole would stop
    // its thread in the restorer.
    let all: u64 = !0;
    // SAFETY: rt_sigprocmask reads one 8-byte mask of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_BLOCK,
            &all as *const u64,
            std::ptr::null_mut::<u64>(),
            8,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("blocking every signal");
    }
    if let Some(sync) = sync {
        // The root waits until crust traces it (its descendants are traced
        // from birth): the restorer's final trap needs a tracer.
        let mut b = [0u8; 1];
        std::fs::File::from(sync)
            .read_exact(&mut b)
            .context("waiting for crust to trace the new task")?;
    }
    join_session(set, pid)
}

/// Reserves the hole and premaps and fills the task's memory, before its
/// children are forked, so that they inherit it (None for a zombie).
fn rebuild_memory<'a>(
    set: &'a RestoreSet,
    pid: i32,
    parent: Option<&memory::Premapped>,
) -> Result<Option<memory::Premapped<'a>>> {
    let Some(img) = set.tasks.get(&pid) else {
        return Ok(None);
    };
    let plan = &set.plans[&pid];
    reserve_hole(plan)?;
    let hole = (plan.premap_at, plan.restorer_at);
    let mem = memory::premap_vmas(
        &img.mm,
        hole,
        &set.shared,
        &set.objects,
        parent,
        set.lazy.is_some(),
    )?;
    memory::fill_pages(&mem, &img.pages)?;
    memory::fill_from_chain(&mem, &img.chain)?;
    Ok(Some(mem))
}

/// Forks a stand-in leader for each process group with a dead leader
/// this task is to make (`super::dead_groups`); returns their PIDs, which
/// this task reaps before it runs its own code again.
fn fork_group_standins(set: &RestoreSet, pid: i32) -> Result<Vec<Pid>> {
    let mut out = Vec::new();
    for (pgid, _) in super::dead_groups(&set.inv)
        .into_iter()
        .filter(|&(_, creator)| creator == pid)
    {
        match sys::fork_with_pid(pgid) {
            Ok(0) => group_standin(set, pgid),
            Ok(c) => out.push(Pid::from_raw(c)),
            Err(e) => bail!(
                "creating a stand-in with PID {pgid} for process group {pgid}, whose leader is dead: {e}; PID {pgid} must be free"
            ),
        }
    }
    Ok(out)
}

/// The stand-in leader of group `pgid`: creates the group and exits once
/// every live member has joined it.
fn group_standin(set: &RestoreSet, pgid: i32) -> ! {
    let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
    let members: Vec<i32> = set
        .inv
        .tasks
        .iter()
        .filter(|t| t.pgid == pgid)
        .map(|t| t.pid)
        .collect();
    let joined =
        |m: &i32| nix::unistd::getpgid(Some(Pid::from_raw(*m))).ok() == Some(Pid::from_raw(pgid));
    let t0 = std::time::Instant::now();
    while !members.iter().all(joined) && t0.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // SAFETY: the stand-in ends here without running crust's exit handlers.
    unsafe { libc::_exit(0) }
}

/// Forks the task's children with their PIDs; each inherits `mem`.
fn fork_children(
    set: &RestoreSet,
    pid: i32,
    status_fd: RawFd,
    mem: Option<&memory::Premapped>,
) -> Result<Vec<Pid>> {
    let standins = fork_group_standins(set, pid)?;
    for child in set.children_of(pid) {
        // A child sharing this task's fd table or fs context shares it from
        // birth (`fdt`).
        match sys::fork_with_pid_sharing(child.pid, fdt::clone_flags(child)) {
            Ok(0) => {
                if child.zombie {
                    // In its session and group first: a zombie keeps them.
                    let _ = join_session(set, child.pid);
                    die_as_zombie(child.exit_status)
                }
                // SAFETY: dup of our status pipe for the child to own.
                let st = unsafe {
                    OwnedFd::from_raw_fd(libc::fcntl(status_fd, libc::F_DUPFD_CLOEXEC, 0))
                };
                run_child(set, child.pid, &RestoreOpts::inherit(), st, None, mem)
            }
            Ok(c) => {
                // Put the child in its group from this side too (as shells
                // do), so the group exists before the next sibling, which
                // may join it, is forked.
                let c = Pid::from_raw(c);
                if child.sid != child.pid {
                    if child.pgid == child.pid {
                        let _ = nix::unistd::setpgid(c, c);
                    } else if set.in_tree(child.pgid) || set.is_dead_group(child.pgid) {
                        let _ = nix::unistd::setpgid(c, Pid::from_raw(child.pgid));
                    }
                }
            }
            Err(e) => bail!(
                "creating task {} (child of {pid}) with its PID: {e}",
                child.pid
            ),
        }
    }
    Ok(standins)
}

/// Sessions and groups: a session leader starts its session, a group leader
/// its group; a task in a group led by an earlier task joins it. The root
/// of a tree that is no session leader stays in crust's session and group.
fn join_session(set: &RestoreSet, pid: i32) -> Result<()> {
    let me = set.task_ref(pid);
    if me.sid == pid {
        nix::unistd::setsid().with_context(|| format!("task {pid}: setsid"))?;
        if me.ctty_pty > 0 {
            crate::resources::pty::take_ctty(me.ctty_pty as u32 - 1)
                .with_context(|| format!("task {pid}"))?;
        } else if !me.ctty_path.is_empty() {
            crate::resources::devices::take_ctty(&me.ctty_path)
                .with_context(|| format!("task {pid}"))?;
        }
    } else if me.pgid == pid {
        nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0))
            .with_context(|| format!("task {pid}: setpgid"))?;
    } else if set.in_tree(me.pgid) && nix::unistd::getpgrp().as_raw() != me.pgid {
        nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(me.pgid))
            .with_context(|| format!("task {pid}: joining process group {}", me.pgid))?;
    } else if set.is_dead_group(me.pgid) {
        // The stand-in may not have made the group yet.
        let t0 = std::time::Instant::now();
        while let Err(e) = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(me.pgid)) {
            if t0.elapsed() > std::time::Duration::from_secs(5) {
                bail!(
                    "task {pid}: joining process group {} (leader dead): {e}",
                    me.pgid
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    Ok(())
}

/// A zombie of the tree: dies at once the way it died, and stays a zombie
/// until its restored parent reaps it.
fn die_as_zombie(status: i32) -> ! {
    let sig = status & 0x7f;
    // SAFETY: the process ends here; nothing of crust's runs after this.
    unsafe {
        if sig != 0 {
            // Dying of SIGSEGV and the like must not write a core file.
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
        }
        libc::_exit((status >> 8) & 0xff)
    }
}

/// The lowest fd number above every fd of a table (and above stdio).
fn top_fd(table: &crate::images::pb::FdTable) -> RawFd {
    table.fds.iter().map(|e| e.fd).max().unwrap_or(2).max(2) + 1
}

/// Moves an fd of ours to a number at or above `min`.
fn move_fd_above(fd: RawFd, min: RawFd) -> Result<RawFd> {
    // SAFETY: duplicating and closing fds this process owns.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
    if n < 0 {
        bail!("moving fd {fd}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is ours and replaced by n.
    unsafe { libc::close(fd) };
    Ok(n)
}

fn build_task(
    img: &TaskImages,
    plan: &RestorePlan,
    mem: &memory::Premapped,
    standins: &[Pid],
    set: &RestoreSet,
    opts: &RestoreOpts,
    status_fd: RawFd,
) -> Result<std::convert::Infallible> {
    let moves = &mem.moves;

    let pid = img.core.pid;
    let me = set.task_ref(pid);
    // Whether other processes use this fd table: then nothing of crust's
    // in it is closed but by the owner's rebuild, when they wait (`fdt`).
    let shared_table = me.files_of != 0 || set.files_members(pid).next().is_some();
    let exe = memory::open_exe(&img.mm, &set.objects)?;
    let top_fd = top_fd(set.fd_table(pid));
    let exe_fd = move_fd_above(exe.into_raw_fd(), top_fd)?;
    let log_fd = crate::log::relocate_above(top_fd, !shared_table);
    let mut keep = vec![exe_fd, status_fd, log_fd];
    // Lazy restore: a userfaultfd of this mm for the daemon, which the
    // restorer registers the lazy VMAs with and then closes.
    let uffd = match &set.lazy {
        Some(link) if mem.lazy.iter().any(|&l| l) => {
            let u = crate::lazy::make_uffd().with_context(|| format!("task {pid}"))?;
            link.send_uffd(pid, u.as_raw_fd())?;
            let fd = move_fd_above(u.into_raw_fd(), top_fd)?;
            keep.push(fd);
            fd as i64
        }
        _ => -1,
    };
    let holds_tty =
        img.files.fds.iter().any(
            |e| matches!(&e.file, Some(crate::images::pb::fd_entry::File::Tty(t)) if !t.current),
        );
    let tty = if opts.shell_job && holds_tty {
        let src = [0, 1, 2]
            .into_iter()
            .find(|&fd| nix::unistd::isatty(fd).unwrap_or(false));
        let Some(src) = src else {
            bail!("--shell-job needs crust to run on a terminal, but none of its fds 0-2 is one");
        };
        // SAFETY: duplicating our own terminal fd above the task's fds.
        let t = unsafe { libc::fcntl(src, libc::F_DUPFD_CLOEXEC, top_fd) };
        keep.push(t);
        Some(t)
    } else {
        None
    };

    load_restorer(img, plan, moves, exe_fd, status_fd, log_fd, uffd)?;
    // The owner of a shared fs context moves all its sharers into it.
    let dirs = (me.fs_of == 0)
        .then(|| crate::resources::fs::FsDirs::open(&img.files, &set.objects, top_fd))
        .transpose()?;
    keep.extend(dirs.iter().flat_map(|d| d.fds()));

    if me.files_of != 0 {
        // The owner rebuilds the table for all; this task touches it no
        // more until it has.
        set.rendezvous.member_files(pid, me.files_of, &keep)?;
    } else {
        if shared_table {
            keep.extend(
                set.rendezvous
                    .owner_wait_files(pid, set.files_members(pid))?,
            );
        }
        files::restore_fd_table(
            &img.files,
            &files::RestoreCtx {
                tty,
                shared: &set.shared_files,
                objects: &set.objects,
            },
            &keep,
        )?;
        if shared_table {
            set.rendezvous.owner_files_done(pid);
        }
    }
    if let Some(t) = tty {
        // SAFETY: closing our extra copy of the terminal.
        unsafe { libc::close(t) };
    }
    if me.ctty_pty > 0 && me.tty_fg_pgrp > 0 && me.tty_fg_pgrp != me.pgid {
        crate::resources::pty::set_foreground(me.ctty_pty as u32 - 1, me.tty_fg_pgrp);
    }
    nix::sys::prctl::set_name(&std::ffi::CString::new(img.core.comm.as_str())?)?;
    // SAFETY: personality(2) with the dumped persona.
    unsafe { libc::personality(img.core.personality as libc::c_ulong) };
    creds::restore_rlimits(&img.core)?;
    creds::restore_loginuid(&img.core)?;
    membarrier::restore_membarrier(&img.core)?;
    prctl::restore_oom_score_adj(&img.core)?;
    // Last of what reads paths in crust's view (/proc above): the task
    // may live chrooted. A shared fs context is entered once, by its
    // owner, when no sharer reads such paths any more.
    let reaped_standin = match dirs {
        Some(dirs) => {
            if set.fs_members(pid).next().is_some() {
                set.rendezvous.owner_wait_fs(pid, set.fs_members(pid))?;
            }
            dirs.apply()?
        }
        None => {
            set.rendezvous.member_fs(pid);
            false
        }
    };
    // The stand-in group leaders this task made are no children of the
    // dumped task: reap them before its own code runs.
    for &s in standins {
        nix::sys::wait::waitpid(s, None)
            .with_context(|| format!("reaping the stand-in leader of group {s}"))?;
    }
    // Its zombies died again just now: wait until they have (without
    // reaping them, that is the task's to do).
    let zombies: Vec<Pid> = set
        .children_of(img.core.pid)
        .filter(|c| c.zombie)
        .map(|c| Pid::from_raw(c.pid))
        .collect();
    for &z in &zombies {
        let flags = nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOWAIT;
        loop {
            match nix::sys::wait::waitid(nix::sys::wait::Id::Pid(z), flags) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => {
                    r.with_context(|| format!("waiting for zombie {z} to die again"))?;
                    break;
                }
            }
        }
    }
    if !standins.is_empty() || !zombies.is_empty() || reaped_standin {
        // Their SIGCHLD (blocked here) is not the task's: it had it when
        // they first died. A SIGCHLD the task had pending is queued again
        // from the images.
        let mut chld = nix::sys::signal::SigSet::empty();
        chld.add(nix::sys::signal::Signal::SIGCHLD);
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: sigtimedwait with a valid set and a zero timeout.
        unsafe { libc::sigtimedwait(chld.as_ref(), std::ptr::null_mut(), &zero) };
    }
    sys::unregister_own_rseq()?;
    // SAFETY: the restorer, its args and stack are loaded in the hole; it
    // never returns into crust's code.
    unsafe {
        sys::jump_to_restorer(
            plan.restorer_at + RESTORER_BLOB.entry,
            plan.stack_top,
            plan.args_at,
        );
    }
}

/// The restorer's view of one thread: what it restores of its own.
fn thread_args(
    t: &ThreadCore,
    args_at: u64,
    sigframe_uc: u64,
    stack_top: u64,
) -> Result<ThreadArgs> {
    let g = t.regs.as_ref().context("a thread without registers")?;
    let mut comm = [0u8; 16];
    let n = t.comm.len().min(15);
    comm[..n].copy_from_slice(&t.comm.as_bytes()[..n]);
    // SAFETY: ThreadArgs is plain data for which all-zero is valid.
    let mut a: ThreadArgs = unsafe { std::mem::zeroed() };
    a.args = args_at;
    a.tid = t.tid;
    if let Some(r) = &t.rseq {
        a.has_rseq = 1;
        a.rseq = RseqConf {
            addr: r.addr,
            len: r.len,
            sig: r.sig,
        };
    }
    a.fs_base = g.fs_base;
    a.gs_base = g.gs_base;
    a.robust_list = t.robust_list;
    a.robust_len = t.robust_len;
    a.creds = creds::restore_creds(t.creds.as_ref().context("a thread without creds")?)?;
    a.sigframe_uc = sigframe_uc;
    a.stack_top = stack_top;
    a.stack_size = THREAD_STACK;
    a.comm = comm;
    sched::restore_sched(t.sched.as_ref(), &mut a);
    prctl::restore_thread_prctl(t, &mut a);
    Ok(a)
}

fn reserve_hole(plan: &RestorePlan) -> Result<()> {
    let len = (plan.hole_end - plan.hole_start) as usize;
    // SAFETY: reserving address space the parent found free in this layout.
    let p = unsafe {
        libc::mmap(
            plan.hole_start as *mut _,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE
                | libc::MAP_ANONYMOUS
                | libc::MAP_NORESERVE
                | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED || p as u64 != plan.hole_start {
        bail!(
            "reserving the restore hole at {:#x}: {}",
            plan.hole_start,
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Maps the restorer blob, its args and its stack at their places in the hole.
fn load_restorer(
    img: &TaskImages,
    plan: &RestorePlan,
    moves: &[VmaMove],
    exe_fd: RawFd,
    status_fd: RawFd,
    log_fd: RawFd,
    uffd: i64,
) -> Result<()> {
    let len = (plan.hole_end - plan.restorer_at) as usize;
    // SAFETY: MAP_FIXED over the part of our reserved hole kept for the restorer.
    let p = unsafe {
        libc::mmap(
            plan.restorer_at as *mut _,
            len,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        bail!("mapping the restorer: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the region just mapped, `len` bytes, is ours alone.
    let region = unsafe { std::slice::from_raw_parts_mut(p as *mut u8, len) };
    RESTORER_BLOB.load_into(region, plan.restorer_at);

    let core = &img.core;
    let mm = &img.mm;
    if mm.auxv.len() > MAX_AUXV {
        bail!(
            "auxv of {} entries is longer than crust handles; the images are corrupt",
            mm.auxv.len()
        );
    }
    // SAFETY: RestorerArgs is plain data for which all-zero is valid.
    let mut args: RestorerArgs = unsafe { std::mem::zeroed() };
    args.hole_start = plan.hole_start;
    args.hole_end = plan.hole_end;
    args.vdso_addr = memory::vdso_target(mm)?;
    args.mm_map = PrctlMmMap {
        start_code: mm.start_code,
        end_code: mm.end_code,
        start_data: mm.start_data,
        end_data: mm.end_data,
        start_brk: mm.start_brk,
        brk: mm.brk,
        start_stack: mm.start_stack,
        arg_start: mm.arg_start,
        arg_end: mm.arg_end,
        env_start: mm.env_start,
        env_end: mm.env_end,
        auxv: 0,
        auxv_size: (mm.auxv.len() * 8) as u32,
        exe_fd: exe_fd as u32,
    };
    args.auxv[..mm.auxv.len()].copy_from_slice(&mm.auxv);
    args.status_fd = status_fd;
    args.log_fd = log_fd;
    args.uffd = uffd;
    signals::restore_signals(core, &mut args);
    timers::restore_itimers(core, &mut args);
    timers::restore_posix_timers(core, &mut args);
    memory::restore_mlockall(core, &mut args);
    prctl::restore_prctl(core, &mut args);

    let lay = plan.layout;
    let args_off = (plan.args_at - plan.restorer_at) as usize;
    let area = &mut region[args_off..args_off + plan.args_size as usize];
    args.vmas_off = lay.vmas_off as u64;
    args.nr_vmas = moves.len() as u64;
    args.threads_off = lay.threads_off as u64;
    args.nr_threads = core.threads.len().saturating_sub(1) as u64;
    let mut threads = Vec::new();
    for (i, t) in core.threads.iter().enumerate() {
        let g = t.regs.as_ref().context("a thread without registers")?;
        let fo = lay.frames_off + i * lay.frame_size;
        let f = regs::build_sigframe(
            &mut area[fo..fo + lay.frame_size],
            plan.args_at + fo as u64,
            g,
            &t.xsave,
            t.sigmask,
            t.sigaltstack.as_ref(),
        )?;
        // The leader runs on the restorer's stack; the others below it.
        let stack_top = match i {
            0 => plan.stack_top,
            _ => plan.stack_top - RESTORER_STACK - (i as u64 - 1) * THREAD_STACK,
        };
        threads.push(thread_args(
            t,
            plan.args_at,
            plan.args_at + (fo + f) as u64 + 8,
            stack_top,
        )?);
    }
    if threads.is_empty() {
        bail!("the core image has no threads; the images are corrupt");
    }
    // Pending signals: the process's, then each thread's, 128 bytes each.
    let mut at = lay.siginfo_off;
    let mut put = |infos: &[Vec<u8>], area: &mut [u8]| -> Result<(u64, u64)> {
        let start = at;
        for i in infos {
            if i.len() != 128 {
                bail!(
                    "a pending signal of {} bytes in the core image; the images are corrupt",
                    i.len()
                );
            }
            area[at..at + 128].copy_from_slice(i);
            at += 128;
        }
        Ok((start as u64, infos.len() as u64))
    };
    (args.shared_pending_off, args.nr_shared_pending) = put(&core.shared_pending, area)?;
    for (a, t) in threads.iter_mut().zip(&core.threads) {
        (a.pending_off, a.nr_pending) = put(&t.pending, area)?;
    }
    let mut at = lay.seccomp_off;
    for (a, t) in threads.iter_mut().zip(&core.threads) {
        at += seccomp::restore_thread_seccomp(t, a, area, at)?;
    }
    args.nr_seccomp_shared = seccomp::shared_prefix(core);
    args.leader = threads.remove(0);
    let guards: Vec<IoVec> = mm
        .guard_pages
        .iter()
        .map(|g| IoVec {
            base: g.vaddr,
            len: g.nr_pages * crate::abi::PAGE_SIZE,
        })
        .collect();
    args.guards_off = lay.guards_off as u64;
    args.nr_guards = guards.len() as u64;
    // SAFETY: plain repr(C) data copied into the args area, laid out by
    // ArgsLayout from the same counts.
    unsafe {
        std::ptr::write_unaligned(area.as_mut_ptr() as *mut RestorerArgs, args);
        std::ptr::copy_nonoverlapping(
            moves.as_ptr(),
            area.as_mut_ptr().add(lay.vmas_off) as *mut VmaMove,
            moves.len(),
        );
        std::ptr::copy_nonoverlapping(
            threads.as_ptr(),
            area.as_mut_ptr().add(lay.threads_off) as *mut ThreadArgs,
            threads.len(),
        );
        std::ptr::copy_nonoverlapping(
            guards.as_ptr(),
            area.as_mut_ptr().add(lay.guards_off) as *mut IoVec,
            guards.len(),
        );
    }
    Ok(())
}

//! Parasite control (crust's infection engine): remote system calls through
//! a seized task, loading the parasite blob into it, running its commands,
//! and curing it again. Every step that changes the task is undone by a
//! guard on every exit path; between two steps the task's own registers,
//! FPU state and code are in place, so a crust killed at any step boundary
//! leaves a task that runs on as it was; the dump's guardian
//! (`crate::guardian`), told of every parasite, then removes it
//! (`cure_orphaned`).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{Ordering, compiler_fence};

use anyhow::{Context, Result, bail};
use iced_x86::code_asm::CodeAssembler;
use nix::sys::ptrace;
use nix::sys::wait::WaitStatus;
use tracing::debug;

use crate::abi::{self, ParasiteCtl};
use crate::blobs::{PARASITE_BLOB, page_align};
use crate::guardian::Guardian;
use crate::resources::regs;
use crate::seize::{Regs, SeizedTask, wait_task};
use crate::sys;

/// The machine code of a remote system call: one `syscall` instruction.
fn syscall_code() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).expect("64-bit assembler");
    a.syscall().expect("encode syscall");
    a.assemble(0).expect("assemble syscall")
}

/// Bytes of the task's code overwritten for a remote syscall; put back on drop.
struct CodePatch<'a> {
    mem: &'a File,
    addr: u64,
    saved: Vec<u8>,
}

impl<'a> CodePatch<'a> {
    fn apply(mem: &'a File, addr: u64, code: &[u8]) -> Result<Self> {
        let mut saved = vec![0u8; code.len()];
        mem.read_exact_at(&mut saved, addr)
            .context("reading code at rip")?;
        mem.write_all_at(code, addr)
            .context("patching code at rip")?;
        Ok(Self { mem, addr, saved })
    }
}

impl Drop for CodePatch<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.mem.write_all_at(&self.saved, self.addr) {
            tracing::error!("restoring code at {:#x}: {e}", self.addr);
        }
    }
}

/// Runs the task from `regs`, with all signals blocked, through one system
/// call: stopped at its entry and at its exit (PTRACE_SYSCALL), where the
/// result is read. No trap instruction is involved: a forced SIGTRAP with
/// SIGTRAP blocked would reset the task's SIGTRAP handler to the default.
/// The task's own state is put back by the caller (`SeizedTask::restore_state`).
fn run_one_syscall(task: &SeizedTask, regs: Regs) -> Result<Regs> {
    let pid = task.pid;
    // Registers first, mask second: a crust killed in between must not
    // leave the task's own code running with every signal blocked.
    ptrace::setregs(pid, regs)?;
    sys::set_sigmask(pid, !0)?;
    let mut stops = 0;
    while stops < 2 {
        ptrace::syscall(pid, None)?;
        match wait_task(pid)? {
            WaitStatus::PtraceSyscall(_) => stops += 1,
            WaitStatus::Stopped(_, sig) => {
                let r = ptrace::getregs(pid)?;
                bail!(
                    "task {pid} got {sig:?} at {:#x} while running injected code",
                    r.rip
                )
            }
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                bail!("task {pid} died while running injected code")
            }
            WaitStatus::PtraceEvent(..) => {}
            other => bail!("task {pid}: unexpected {other:?} while running injected code"),
        }
    }
    Ok(ptrace::getregs(pid)?)
}

/// Executes one system call in the task, at its current rip, and puts the
/// code and the task's registers back before returning.
pub fn remote_syscall(task: &SeizedTask, nr: i64, args: [u64; 6]) -> Result<i64> {
    let code = syscall_code();
    let at = task.regs.rip;
    let result = {
        let _patch = CodePatch::apply(&task.mem, at, &code)?;
        let mut r = task.regs;
        r.rip = at;
        // orig_rax = -1: the kernel must not treat this as a syscall restart.
        r.orig_rax = u64::MAX;
        r.rax = nr as u64;
        (r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9) =
            (args[0], args[1], args[2], args[3], args[4], args[5]);
        run_one_syscall(task, r).map(|r| r.rax as i64)
    };
    task.restore_state()?;
    let ret = result?;
    debug!("task {}: remote syscall {nr} = {ret}", task.pid);
    Ok(ret)
}

const STACK_SIZE: u64 = 64 * 1024;

/// Bytes crust asks each page pipe to hold. Past pipe-max-size (1 MiB by
/// default) this takes CAP_SYS_RESOURCE, which crust may have and the task
/// may not: the parasite makes the pipes, crust sizes them.
const PAGE_PIPE_SIZE: usize = 4 << 20;

/// Grows a pipe to `PAGE_PIPE_SIZE`, or to pipe-max-size without
/// CAP_SYS_RESOURCE; returns the size it has.
fn grow_pipe(f: &File) -> usize {
    // Read once per crust: a dump grows a pipe for each process.
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let max = *MAX.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(1 << 20)
    });
    for want in [PAGE_PIPE_SIZE, max.min(PAGE_PIPE_SIZE)] {
        // SAFETY: fcntl on an fd we own.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETPIPE_SZ, want as libc::c_int) };
        if r > 0 {
            return r as usize;
        }
    }
    // SAFETY: as above.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETPIPE_SZ) };
    r.max(0) as usize
}

const NR_REGS: usize = std::mem::size_of::<Regs>() / 8;
pub const INFECTION_LEN: usize = 32 + NR_REGS * 8;

/// What a cure needs to know of a parasite: its region, where in the task
/// its control block lists the page pipes, and the thread it runs in now
/// with that thread's registers as the freeze found them. The dump's
/// guardian is told it at every change (size 0: no parasite), to cure the
/// task should crust die (`cure_orphaned`).
#[derive(Clone, Copy)]
pub struct Infection {
    base: u64,
    size: u64,
    /// Address of the control block in the task once crust marked every
    /// fd absent there (0 before): the parasite records each pipe and its
    /// link there as soon as it makes them, and marks them closed when it
    /// closes them, so what to close is read from the task, whenever crust
    /// died.
    ctl_at: u64,
    tid: i32,
    stop_regs: Regs,
}

impl Infection {
    pub fn new(base: u64, size: u64) -> Self {
        // SAFETY: user_regs_struct is plain data for which all-zero is valid.
        let stop_regs = unsafe { std::mem::zeroed() };
        Infection {
            base,
            size,
            ctl_at: 0,
            tid: 0,
            stop_regs,
        }
    }

    /// Whether a parasite is in the task.
    pub fn present(&self) -> bool {
        self.size != 0
    }

    pub fn to_bytes(self) -> [u8; INFECTION_LEN] {
        let mut b = [0u8; INFECTION_LEN];
        b[0..8].copy_from_slice(&self.base.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..24].copy_from_slice(&self.ctl_at.to_le_bytes());
        b[24..28].copy_from_slice(&self.tid.to_le_bytes());
        // SAFETY: user_regs_struct is NR_REGS plain u64s.
        let words: [u64; NR_REGS] = unsafe { std::mem::transmute(self.stop_regs) };
        for (i, w) in words.iter().enumerate() {
            b[32 + i * 8..40 + i * 8].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    pub fn from_bytes(b: &[u8; INFECTION_LEN]) -> Self {
        let mut words = [0u64; NR_REGS];
        for (i, w) in words.iter_mut().enumerate() {
            *w = u64::from_le_bytes(b[32 + i * 8..40 + i * 8].try_into().unwrap());
        }
        Infection {
            base: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            size: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            ctl_at: u64::from_le_bytes(b[16..24].try_into().unwrap()),
            tid: i32::from_le_bytes(b[24..28].try_into().unwrap()),
            // SAFETY: user_regs_struct is NR_REGS plain u64s.
            stop_regs: unsafe { std::mem::transmute::<[u64; NR_REGS], Regs>(words) },
        }
    }
}

/// Cures task `task` of the parasite `last` when crust died with it in
/// (run by the dump's guardian, `crate::guardian`, once crust is gone): the
/// kernel has detached the task, or is about to; seizes it again, unmaps
/// the parasite and closes its pipes and link. False when the task could
/// not be seized within 10 s.
pub fn cure_orphaned(task: nix::unistd::Pid, last: Infection) -> bool {
    // crust died. Its ptrace link goes away a moment after its files close,
    // and a thread may still be inside the parasite, finishing a command
    // (which never blocks and ends in rt_sigreturn): let it, and try again.
    let region = last.base..last.base + last.size;
    let t = std::time::Instant::now();
    let mut threads = loop {
        if t.elapsed() > std::time::Duration::from_secs(10) {
            return false;
        }
        match crate::seize::seize_threads(task.as_raw()) {
            Ok(ts) if ts.iter().all(|s| !region.contains(&s.regs.rip)) => break ts,
            Ok(ts) => drop(ts),
            Err(_) => {}
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    // The thread the parasite returned into may not have run since: then it
    // sits at its interrupted syscall set up for a restart. Give it back the
    // registers the freeze found, so that the kernel decides on restart or
    // EINTR when it runs, as it would have without crust.
    for th in threads.iter_mut().filter(|th| th.pid.as_raw() == last.tid) {
        let (resumed, restarted) = crate::resources::regs::resume_regs(
            last.tid,
            &last.stop_regs,
            crate::resources::regs::ResumeIn::Live,
        );
        if restarted && th.stop_regs.rip == resumed.rip && th.stop_regs.rax == resumed.rax {
            th.stop_regs = last.stop_regs;
        }
    }
    let leader = &threads[0];
    // The pipes and the link the parasite made and did not close, from
    // its control block, read before the region goes.
    let mut fds = Vec::new();
    if last.ctl_at != 0 {
        for (off, n) in [
            (
                std::mem::offset_of!(ParasiteCtl, pipes),
                2 * abi::MAX_PAGE_PIPES,
            ),
            (std::mem::offset_of!(ParasiteCtl, link), 2),
        ] {
            let mut b = vec![0u8; 4 * n];
            if leader
                .mem
                .read_exact_at(&mut b, last.ctl_at + off as u64)
                .is_ok()
            {
                fds.extend(
                    b.chunks_exact(4)
                        .map(|w| i32::from_le_bytes(w.try_into().unwrap())),
                );
            }
        }
    }
    // Armed before its mmap, the region may not be there: then nothing is
    // unmapped (the task may have mapped something of its own meanwhile).
    if parasite_region_mapped(task.as_raw(), last.base, last.size) {
        let _ = remote_syscall(leader, libc::SYS_munmap, [last.base, last.size, 0, 0, 0, 0]);
    }
    for &fd in fds.iter().filter(|&&fd| fd >= 0) {
        let _ = remote_syscall(leader, libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0]);
    }
    for th in threads.into_iter().rev() {
        let _ = th.release();
    }
    true
}

/// The lowest fd number task `pid` does not use.
fn lowest_free_fd(pid: i32) -> i32 {
    let mut used: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    used.sort_unstable();
    let mut n = 0;
    for u in used {
        if u == n {
            n += 1;
        } else if u > n {
            break;
        }
    }
    n
}

/// The lowest `size` bytes of address space free in task `pid` below all
/// its mappings (from mmap_min_addr on, with a page to spare), if any.
fn low_free_range(pid: i32, size: u64) -> Option<u64> {
    // Read once per crust: a dump infects each process.
    static MIN: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let min = *MIN.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/vm/mmap_min_addr")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(65536)
            .max(65536)
            .next_multiple_of(abi::PAGE_SIZE)
    });
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let first = u64::from_str_radix(maps.split('-').next()?, 16).ok()?;
    (min + size + abi::PAGE_SIZE <= first).then_some(min)
}

/// Whether task `pid` maps a parasite's region (shared, rwx, anonymous)
/// exactly at [base, base+size).
fn parasite_region_mapped(pid: i32, base: u64, size: u64) -> bool {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return false;
    };
    let want = format!("{:08x}-{:08x} rwxs ", base, base + size);
    maps.lines().any(|l| l.starts_with(&want))
}

/// The error for thread `t` leaving a parasite command with `status`
/// instead of finishing it: a signal (its state is put back first, so the
/// task is itself again), its death, or a stop crust does not expect.
fn parasite_stopped(t: &SeizedTask, status: WaitStatus) -> anyhow::Error {
    let pid = t.pid;
    match status {
        WaitStatus::Stopped(_, sig) => {
            let rip = ptrace::getregs(pid).map(|r| r.rip).unwrap_or(0);
            if let Err(e) = t.restore_state() {
                return e.context(format!("task {pid} got {sig:?} while running the parasite"));
            }
            anyhow::anyhow!("task {pid} got {sig:?} at {rip:#x} while running the parasite")
        }
        WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
            anyhow::anyhow!("task {pid} died running the parasite")
        }
        other => anyhow::anyhow!("task {pid}: unexpected {other:?} while running the parasite"),
    }
}

/// A parasite loaded into a seized task. `cure` (or drop) removes it.
pub struct Parasite<'a> {
    pub task: &'a SeizedTask,
    remote_base: u64,
    size: u64,
    local: *mut u8,
    ctl_off: u64,
    frame_off: u64,
    frame_size: u64,
    /// The thread whose state the return frame holds now.
    framed_tid: i32,
    /// What the dump's guardian was last told.
    inf: Infection,
    /// crust's ends of the page pipes (opened through /proc/PID/fd).
    pub pipes: Vec<File>,
    /// Bytes each page pipe holds.
    pub pipe_size: usize,
    /// crust's end of the link (see `ParasiteCtl::free_run`): once there,
    /// every command runs free.
    link: Option<File>,
    guardian: &'a Guardian,
    cured: bool,
    /// A stream ended with `Next::Finish` did FINI's work already.
    finished: bool,
}

impl<'a> Parasite<'a> {
    /// Maps a shared region into the task, loads the blob and creates the
    /// page pipe. The dump's guardian learns of the parasite as soon as its
    /// region exists, and of every change after, until it is cured.
    pub fn infect(task: &'a SeizedTask, guardian: &'a Guardian) -> Result<Self> {
        let blob_size = PARASITE_BLOB.mapped_size();
        let ctl_off = blob_size;
        let ctl_size = page_align(std::mem::size_of::<ParasiteCtl>() as u64);
        let frame_off = ctl_off + ctl_size;
        let frame_size = page_align(regs::sigframe_size(task.xstate.len()) as u64);
        let size = frame_off + frame_size + STACK_SIZE;
        let prot = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
        let flags = libc::MAP_SHARED | libc::MAP_ANONYMOUS;
        // Below every mapping of the task where there is room: its smaps
        // entry is then the first (`memory::dump_mlockall`), and with the
        // place known beforehand the guardian knows of the region before
        // the mmap, so a crust killed meanwhile leaves none behind.
        let low = low_free_range(task.pid.as_raw(), size);
        let mut inf = Infection {
            tid: task.pid.as_raw(),
            stop_regs: task.stop_regs,
            base: low.unwrap_or(0),
            size,
            ctl_at: 0,
        };
        let (hint, flags) = match low {
            Some(at) => {
                guardian.infected(task.pid.as_raw(), inf)?;
                (at, flags | libc::MAP_FIXED_NOREPLACE)
            }
            None => (0, flags),
        };
        let base = remote_syscall(
            task,
            libc::SYS_mmap,
            [hint, size, prot as u64, flags as u64, u64::MAX, 0],
        )?;
        if base < 0 {
            if low.is_some() {
                guardian.infected(task.pid.as_raw(), Infection::new(0, 0))?;
            }
            bail!(
                "mapping the parasite into task {}: errno {}",
                task.pid,
                -base
            );
        }
        let base = base as u64;
        inf.base = base;
        guardian.infected(task.pid.as_raw(), inf)?;
        let mut p = Parasite {
            task,
            remote_base: base,
            size,
            local: std::ptr::null_mut(),
            ctl_off,
            frame_off,
            frame_size,
            framed_tid: 0,
            inf,
            pipes: Vec::new(),
            pipe_size: 0,
            link: None,
            guardian,
            cured: false,
            finished: false,
        };
        // The shared anonymous region is a shmem file: map the same pages here.
        let path = format!("/proc/{}/map_files/{:x}-{:x}", task.pid, base, base + size);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| path.clone())?;
        // SAFETY: a fresh shared mapping of the parasite region, owned by `p`.
        let local = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if local == libc::MAP_FAILED {
            bail!(
                "mapping the parasite region locally: {}",
                std::io::Error::last_os_error()
            );
        }
        p.local = local.cast();
        // SAFETY: `local` spans `size` bytes, the blob fits in its first part.
        let dst = unsafe { std::slice::from_raw_parts_mut(p.local, blob_size as usize) };
        PARASITE_BLOB.load_into(dst, base);
        debug!(
            "task {}: {} blob loaded at {base:#x}",
            task.pid, PARASITE_BLOB.name
        );

        // From here on the guardian closes what the control block lists.
        p.ctl().pipes = [[-1, -1]; abi::MAX_PAGE_PIPES];
        p.ctl().link = [-1, -1];
        inf.ctl_at = base + ctl_off;
        p.inf = inf;
        guardian.infected(task.pid.as_raw(), inf)?;
        let r = p.run(abi::PARASITE_CMD_INIT)?;
        if r < 0 {
            bail!(
                "parasite in task {}: creating its link to crust failed: errno {}",
                task.pid,
                -r
            );
        }
        let pidfd = sys::pidfd_open(task.pid.as_raw())
            .with_context(|| format!("opening a pidfd of task {}", task.pid))?;
        let link = sys::pidfd_getfd(&pidfd, p.ctl().link[1])
            .with_context(|| format!("taking the parasite's link from task {}", task.pid))?;
        p.link = Some(File::from(link));
        Ok(p)
    }

    /// Gives the parasite `n` page pipes (at most `abi::MAX_PAGE_PIPES`),
    /// each as large as crust can make it.
    pub fn make_pipes(&mut self, n: usize) -> Result<()> {
        let n = n.clamp(1, abi::MAX_PAGE_PIPES);
        if self.pipes.len() >= n {
            return Ok(());
        }
        self.ctl().nr_pipes = n as u64;
        let r = self.run(abi::PARASITE_CMD_PIPES)?;
        // The pipes come in order; a task short of fds (RLIMIT_NOFILE)
        // makes do with those it got.
        let made = self.ctl().pipes.iter().take_while(|p| p[0] >= 0).count();
        if r < 0 && made == 0 {
            bail!(
                "parasite in task {}: creating page pipes failed: errno {}",
                self.task.pid,
                -r
            );
        }
        let mut size = if self.pipes.is_empty() {
            usize::MAX
        } else {
            self.pipe_size
        };
        for [rd, _] in self
            .ctl()
            .pipes
            .into_iter()
            .take(made)
            .skip(self.pipes.len())
        {
            let path = format!("/proc/{}/fd/{rd}", self.task.pid);
            let f = File::open(&path).with_context(|| format!("opening the page pipe {path}"))?;
            size = size.min(grow_pipe(&f));
            self.pipes.push(f);
        }
        if size < abi::PAGE_SIZE as usize {
            bail!(
                "parasite in task {}: its page pipes hold {size} bytes; check /proc/sys/fs/pipe-max-size",
                self.task.pid
            );
        }
        self.pipe_size = size;
        Ok(())
    }

    /// Has the task make a userfaultfd (`userfaultfd(flags)`: it belongs to
    /// the mm of its creator), takes it with pidfd_getfd and closes the
    /// task's copy: the task's fd table ends as it was. Until the close,
    /// the fd is listed in the control block as a pipe is (the last slot),
    /// so that the guardian of a crust killed meanwhile closes it.
    pub fn make_uffd(&mut self, flags: u64) -> Result<OwnedFd> {
        let pid = self.task.pid.as_raw();
        let slot = abi::MAX_PAGE_PIPES - 1;
        if self.ctl().pipes[slot][0] >= 0 {
            bail!("task {pid}: the parasite's last pipe slot is taken");
        }
        // The task is frozen: the kernel gives the userfaultfd the lowest
        // free fd, listed before it exists so that no instant leaves it
        // unlisted (closing a number that is no fd is harmless).
        self.ctl().pipes[slot] = [lowest_free_fd(pid), -1];
        let fd = remote_syscall(self.task, libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0]);
        let fd = match fd {
            Ok(fd) if fd >= 0 => fd as i32,
            Ok(e) => {
                self.ctl().pipes[slot] = [-1, -1];
                bail!(
                    "task {pid}: userfaultfd() for write tracking failed: errno {}; check vm.unprivileged_userfaultfd",
                    -e
                );
            }
            Err(e) => return Err(e),
        };
        self.ctl().pipes[slot] = [fd, -1];
        let pidfd =
            sys::pidfd_open(pid).with_context(|| format!("opening a pidfd of task {pid}"))?;
        let mine = sys::pidfd_getfd(&pidfd, fd)
            .with_context(|| format!("taking the userfaultfd of task {pid}"));
        crate::dump::fault_point("uffd-in-task");
        let r = remote_syscall(self.task, libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
        if r < 0 {
            bail!(
                "task {pid}: closing its copy of the userfaultfd: errno {}",
                -r
            );
        }
        self.ctl().pipes[slot] = [-1, -1];
        mine
    }

    /// The parasite's region in the task: [start, end).
    pub fn region(&self) -> (u64, u64) {
        (self.remote_base, self.remote_base + self.size)
    }

    /// Whether commands run free and talk on the link (see
    /// `ParasiteCtl::free_run`); without it, each runs traced.
    pub fn has_link(&self) -> bool {
        self.link.is_some()
    }

    pub fn ctl(&mut self) -> &mut ParasiteCtl {
        // SAFETY: the control block lies inside the local mapping, which lives
        // as long as `self`; the task only writes it while crust waits for it.
        unsafe { &mut *(self.local.add(self.ctl_off as usize) as *mut ParasiteCtl) }
    }

    /// Builds the frame a command returns through: the thread as it is now.
    fn frame_for(&mut self, t: &SeizedTask) -> Result<()> {
        if self.framed_tid == t.pid.as_raw() {
            return Ok(());
        }
        // The guardian learns which thread now returns through the frame.
        if self.inf.tid != t.pid.as_raw() {
            self.inf.tid = t.pid.as_raw();
            self.inf.stop_regs = t.stop_regs;
            self.guardian.infected(self.task.pid.as_raw(), self.inf)?;
        }
        // SAFETY: the frame area lies inside the local mapping.
        let frame = unsafe {
            std::slice::from_raw_parts_mut(
                self.local.add(self.frame_off as usize),
                self.frame_size as usize,
            )
        };
        let at = self.remote_base + self.frame_off;
        let uc =
            regs::build_sigframe(frame, at, &regs::to_pb(&t.regs), &t.xstate, t.sigmask, None)?;
        self.ctl().sigframe_uc = at + uc as u64 + 8;
        self.ctl().fresh_frame = 1;
        self.framed_tid = t.pid.as_raw();
        Ok(())
    }

    /// Runs one parasite command in the thread the parasite was loaded through.
    pub fn run(&mut self, cmd: u64) -> Result<i64> {
        let task = self.task;
        self.run_on(task, cmd)
    }

    /// Runs one parasite command in thread `t` of the task and returns its
    /// result. The command ends with rt_sigreturn into the thread's own
    /// state; crust stops the thread at that syscall's exit, so its state is
    /// back in place on return. The other threads stay stopped meanwhile.
    pub fn run_on(&mut self, t: &SeizedTask, cmd: u64) -> Result<i64> {
        self.run_talking(t, cmd, None)
    }

    /// Runs a streaming command in the task's leader (see
    /// `PARASITE_CMD_DUMP_PAGES_STREAM`): `talk` is called after each batch,
    /// with the batch's result in the control block, and says whether it
    /// put the next one in place (`Next`). An error of `talk` ends the
    /// stream and is returned once the command has ended and the task is
    /// itself again.
    pub fn run_stream(&mut self, cmd: u64, talk: Talk) -> Result<i64> {
        if self.link.is_none() {
            bail!(
                "the parasite in task {} has no link to stream on",
                self.task.pid
            );
        }
        let task = self.task;
        let r = self.run_talking(task, cmd, Some(talk))?;
        if r == abi::STREAM_FINISHED {
            // Its pipes and its end of the link are closed: only the
            // region is left for `cure`.
            self.finished = true;
            return Ok(0);
        }
        Ok(r)
    }

    fn run_talking(&mut self, t: &SeizedTask, cmd: u64, talk: Option<Talk>) -> Result<i64> {
        self.frame_for(t)?;
        self.ctl().cmd = cmd;
        self.ctl().ret = -1;
        self.ctl().free_run = self.link.is_some() as u64;
        compiler_fence(Ordering::SeqCst);
        let pid = t.pid;
        let mut r = t.regs;
        r.rip = self.remote_base + PARASITE_BLOB.entry;
        r.rsp = self.remote_base + self.size;
        r.rdi = self.remote_base + self.ctl_off;
        r.orig_rax = u64::MAX;
        // Registers first, mask second: a crust killed in between must not
        // leave the task's own code running with every signal blocked (the
        // parasite's rt_sigreturn puts the mask back).
        ptrace::setregs(pid, r)?;
        sys::set_sigmask(pid, !0)?;
        let mut talk_err = None;
        let ended = self.link.is_some() && self.run_free(t, cmd, talk, &mut talk_err)?;
        if !ended {
            self.trace_to_sigreturn(t)?;
        }
        compiler_fence(Ordering::SeqCst);
        match talk_err {
            Some(e) => Err(e),
            None => Ok(self.ctl().ret),
        }
    }

    /// Runs thread `t` stop by stop (PTRACE_SYSCALL) to the entry of the
    /// parasite's rt_sigreturn, and makes the thread itself again there
    /// (`SeizedTask::leave_parasite`: its registers have orig_rax -1, so the
    /// kernel skips the call): rt_sigreturn would also reset the thread's
    /// restart block, and a sleep the freeze interrupted
    /// (ERESTART_RESTARTBLOCK) would end with EINTR once the task runs on.
    /// Stops again at that skipped call's exit. A crust killed before the
    /// registers are set leaves the rt_sigreturn to run, which takes the
    /// thread home through its frame; after, the thread goes on as itself.
    fn trace_to_sigreturn(&self, t: &SeizedTask) -> Result<()> {
        let pid = t.pid;
        let region = self.remote_base..self.remote_base + self.size;
        let mut home = false;
        loop {
            ptrace::syscall(pid, None)?;
            match wait_task(pid)? {
                WaitStatus::PtraceSyscall(_) => {
                    if home {
                        return Ok(());
                    }
                    let now = ptrace::getregs(pid)?;
                    if now.orig_rax == libc::SYS_rt_sigreturn as u64 && region.contains(&now.rip) {
                        t.leave_parasite()?;
                        home = true;
                    }
                }
                WaitStatus::PtraceEvent(..) => {}
                other => return Err(parasite_stopped(t, other)),
            }
        }
    }

    /// The free part of a command (see `ParasiteCtl::free_run`): thread `t`
    /// runs the parasite without a stop per system call until the parasite
    /// says it is done; then crust stops it. Returns true when that ended
    /// the command: crust put the thread's own state back itself
    /// (`SeizedTask::leave_parasite`), which saves the traced way out.
    /// The parasite's last command (FINI, or a stream told to finish) still
    /// closes its link after the handshake: crust answers it, and leaves
    /// the rest (the handshake's end, the close and the rt_sigreturn) to
    /// `run_on`'s tracing. A signal stop meanwhile fails the command as in
    /// `run_on`.
    fn run_free(
        &mut self,
        t: &SeizedTask,
        cmd: u64,
        mut talk: Option<Talk>,
        talk_err: &mut Option<anyhow::Error>,
    ) -> Result<bool> {
        let mut last = cmd == abi::PARASITE_CMD_FINI;
        let pid = t.pid;
        // crust's own second descriptor of its end, so that `talk` may
        // have the control block meanwhile; closed on return.
        let link = self
            .link
            .as_ref()
            .expect("a free command has a link")
            .try_clone()
            .context("duplicating the parasite's link")?;
        let link = &link;
        // A "done" left over from a command crust gave up on is not this one's.
        let mut stale = [0u8; 16];
        // SAFETY: recv into our own buffer, never blocking.
        while unsafe {
            libc::recv(
                link.as_raw_fd(),
                stale.as_mut_ptr().cast(),
                stale.len(),
                libc::MSG_DONTWAIT,
            )
        } > 0
        {}
        // Gone here, crust leaves the task to run the command alone: it ends
        // it on a broken link and returns into its own code.
        crate::dump::fault_point("parasite-free");
        ptrace::cont(pid, None)?;
        let mut deadline = std::time::Instant::now() + crate::seize::STEP_TIMEOUT;
        loop {
            match nix::sys::wait::waitpid(
                pid,
                Some(nix::sys::wait::WaitPidFlag::__WALL | nix::sys::wait::WaitPidFlag::WNOHANG),
            )? {
                WaitStatus::StillAlive => {}
                // Another stop (a group-stop): on with the command.
                WaitStatus::PtraceEvent(..) => ptrace::cont(pid, None)?,
                other => return Err(parasite_stopped(t, other)),
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                // Stopped again before its state is put back.
                let _ = ptrace::interrupt(pid);
                let _ = wait_task(pid);
                t.restore_state()?;
                bail!(
                    "the parasite in task {pid} did not finish a command within {} s",
                    crate::seize::STEP_TIMEOUT.as_secs()
                );
            }
            if sys::poll_fd_or_sigchld(link.as_raw_fd(), left)? {
                let mut b = [0u8; 1];
                match (&*link).read(&mut b) {
                    Ok(1) if b[0] == abi::LINK_CMD_DONE => break,
                    Ok(1) if b[0] == abi::LINK_BATCH_DONE => {
                        let Some(talk) = talk.as_mut() else {
                            bail!("the parasite in task {pid} sent a batch's end outside a stream");
                        };
                        // After an error the stream only ends.
                        let next = match talk_err {
                            Some(_) => Next::Quit,
                            None => talk(self.ctl()).unwrap_or_else(|e| {
                                *talk_err = Some(e);
                                Next::Quit
                            }),
                        };
                        last |= matches!(next, Next::Finish);
                        let say = match next {
                            Next::Batch => abi::LINK_NEXT_BATCH,
                            Next::Quit => abi::LINK_QUIT,
                            Next::Finish => abi::LINK_FINISH,
                        };
                        (&*link)
                            .write_all(&[say])
                            .context("answering the parasite on its link")?;
                        deadline = std::time::Instant::now() + crate::seize::STEP_TIMEOUT;
                    }
                    Ok(1) => bail!("the parasite in task {pid} said {} on its link", b[0]),
                    Ok(_) => bail!("task {pid} closed the parasite's link: it died"),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("reading the parasite's link"),
                }
            }
        }
        // Stopped where it waits for the answer (or on its way there).
        ptrace::interrupt(pid)?;
        match wait_task(pid)? {
            WaitStatus::PtraceEvent(..) => {}
            WaitStatus::Stopped(_, sig) => {
                let rip = ptrace::getregs(pid).map(|r| r.rip).unwrap_or(0);
                t.restore_state()?;
                bail!("task {pid} got {sig:?} at {rip:#x} while running the parasite");
            }
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                bail!("task {pid} died running the parasite")
            }
            other => bail!("task {pid}: unexpected {other:?} while running the parasite"),
        }
        if !last {
            // The parasite waits for an answer it will not get: the
            // thread goes home from here. (A crust killed before this
            // breaks the link, and the parasite takes it home itself.)
            t.leave_parasite()?;
            return Ok(true);
        }
        (&*link)
            .write_all(b"g")
            .context("answering the parasite on its link")?;
        Ok(false)
    }

    /// Removes the parasite: closes its pipe, unmaps its region in the task.
    pub fn cure(mut self) -> Result<()> {
        self.cure_inner()
    }

    fn cure_inner(&mut self) -> Result<()> {
        if self.cured {
            return Ok(());
        }
        self.cured = true;
        self.pipes.clear();
        // FINI runs free: the link goes after it.
        let fini = if self.finished {
            Ok(0)
        } else {
            self.run(abi::PARASITE_CMD_FINI)
        };
        self.link = None;
        // SAFETY: unmapping crust's own view of the region; nothing refers to it now.
        unsafe { libc::munmap(self.local.cast(), self.size as usize) };
        let r = remote_syscall(
            self.task,
            libc::SYS_munmap,
            [self.remote_base, self.size, 0, 0, 0, 0],
        )?;
        if r < 0 {
            bail!(
                "unmapping the parasite from task {}: errno {}",
                self.task.pid,
                -r
            );
        }
        self.guardian
            .infected(self.task.pid.as_raw(), Infection::new(0, 0))?;
        fini?;
        Ok(())
    }
}

/// What crust answers a streaming command after each batch, given the
/// control block (the batch's result in `ret`).
pub type Talk<'t> = &'t mut dyn FnMut(&mut ParasiteCtl) -> Result<Next>;

/// crust's answer after a batch of a stream.
pub enum Next {
    /// The next batch is in place.
    Batch,
    /// The stream is over; the parasite stays for more commands.
    Quit,
    /// The stream is over, and was the parasite's last command: it closes
    /// its pipes and link as FINI does, and `cure` only unmaps it.
    Finish,
}

impl Drop for Parasite<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.cure_inner() {
            tracing::error!("curing task {}: {e:#}", self.task.pid);
        }
    }
}

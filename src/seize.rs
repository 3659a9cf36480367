//! Freezing: PTRACE_SEIZE + PTRACE_INTERRUPT, with a guard that puts the
//! task's registers, FPU state and signal mask back and detaches on every
//! exit path, so a failed dump leaves the task running as it was.

use std::fs::{File, OpenOptions};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{debug, warn};

use crate::proc;
use crate::resources::regs::{ResumeIn, resume_regs};
use crate::sys;

pub type Regs = libc::user_regs_struct;

/// A task stopped under crust's ptrace, with the state it was stopped in.
pub struct SeizedTask {
    pub pid: Pid,
    /// Registers as the task resumes (`regs::resume_regs` for the live
    /// task), put back after every piece of code crust runs in it.
    pub regs: Regs,
    /// Registers as the freeze found them (an interrupted syscall included).
    pub stop_regs: Regs,
    pub xstate: Vec<u8>,
    pub sigmask: u64,
    /// /proc/PID/mem, for reading and patching the task's memory.
    pub mem: File,
    /// The signal of the job-control stop the task was in (SIGSTOP,
    /// SIGTSTP...), None when it was running.
    pub job_stop: Option<Signal>,
    released: bool,
}

/// How long a traced task may take to reach its next stop: every step crust
/// drives (a remote syscall, a parasite command, a detach) takes far less.
pub const STEP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits for the next stop or exit of a traced task, for `STEP_TIMEOUT` at
/// most; past it, an error names the task (the caller's guards clean up as
/// on any failure).
pub fn wait_task(pid: Pid) -> Result<WaitStatus> {
    wait_task_for(pid, STEP_TIMEOUT)
}

/// `wait_task` with a deadline of the caller's.
pub fn wait_task_for(pid: Pid, timeout: std::time::Duration) -> Result<WaitStatus> {
    match sys::wait_child(Some(pid), WaitPidFlag::__WALL, timeout) {
        Ok(Some(st)) => Ok(st),
        Ok(None) => bail!(
            "task {pid} did not stop within {} s; its state: {}",
            timeout.as_secs(),
            proc::status(pid.as_raw())
                .map(|s| s.state.to_string())
                .unwrap_or_else(|_| "gone".into())
        ),
        Err(e) => Err(e).with_context(|| format!("waiting for task {pid}")),
    }
}

/// Why a task cannot be seized.
#[derive(Debug)]
pub enum SeizeError {
    NoProcess(i32),
    /// (pid, name, tracer)
    Traced(i32, String, i32),
    Zombie(i32, String),
    /// (pid, name, error): the task may not be traced.
    Denied(i32, String, String),
    /// (pid, name): under seccomp, without the right to suspend its filters.
    Seccomp(i32, String),
}

impl std::fmt::Display for SeizeError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Self::NoProcess(pid) => {
                write!(f, "no process with PID {pid}; check the PID (ps -p {pid})")
            }
            Self::Traced(pid, name, by) => write!(
                f,
                "PID {pid} ({name}) is already traced by PID {by}; detach that tracer (gdb, strace) and dump again"
            ),
            Self::Zombie(pid, name) => {
                write!(
                    f,
                    "PID {pid} ({name}) is a zombie; there is nothing to dump"
                )
            }
            Self::Denied(pid, name, e) if nix::unistd::geteuid().is_root() => write!(
                f,
                "cannot trace PID {pid} ({name}): {e}; crust runs as root, so something denies it (a Yama ptrace_scope, an LSM, or a user namespace without CAP_SYS_PTRACE)"
            ),
            Self::Denied(pid, name, e) => write!(
                f,
                "cannot trace PID {pid} ({name}): {e}; run crust as root or with CAP_CHECKPOINT_RESTORE and CAP_SYS_PTRACE"
            ),
            Self::Seccomp(pid, name) => write!(
                f,
                "PID {pid} ({name}) runs under seccomp; suspending its filters for the dump needs CAP_SYS_ADMIN: run crust as root"
            ),
        }
    }
}

impl std::error::Error for SeizeError {}

impl SeizeError {
    pub fn class(&self) -> crate::error::Class {
        crate::error::Class::Refused
    }
}

/// How long a seize waits for a killed dump's guardian to let a task go.
const GUARDIAN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether `pid` is a crust dump's guardian (`crate::guardian`).
fn is_guardian(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|c| c.trim_end().as_bytes() == crate::guardian::COMM.to_bytes())
}

/// Seizes and stops one task. The dump's tree walk calls this for each task.
pub fn seize_task(pid: i32) -> Result<SeizedTask> {
    let Ok(mut st) = proc::status(pid) else {
        return Err(SeizeError::NoProcess(pid).into());
    };
    // The guardian of a crust killed mid-dump traces the task for as long
    // as it takes to put it back (milliseconds): a dump started again at
    // once waits for it.
    let t0 = std::time::Instant::now();
    while st.tracer_pid != 0 && is_guardian(st.tracer_pid) && t0.elapsed() < GUARDIAN_WAIT {
        std::thread::sleep(std::time::Duration::from_millis(5));
        let Ok(now) = proc::status(pid) else {
            return Err(SeizeError::NoProcess(pid).into());
        };
        st = now;
    }
    if st.tracer_pid != 0 {
        return Err(SeizeError::Traced(pid, st.name, st.tracer_pid).into());
    }
    if st.state == 'Z' || st.state == 'X' {
        return Err(SeizeError::Zombie(pid, st.name).into());
    }
    let p = Pid::from_raw(pid);
    let mut opts = ptrace::Options::PTRACE_O_TRACESYSGOOD;
    // The parasite's and crust's own syscalls in the task must not meet
    // its seccomp filters.
    if st.seccomp != 0 {
        opts |= crate::resources::seccomp::SUSPEND_SECCOMP;
    }
    match ptrace::seize(p, opts) {
        Ok(()) => {}
        Err(Errno::ESRCH) => return Err(SeizeError::NoProcess(pid).into()),
        Err(Errno::EPERM) if st.seccomp != 0 => {
            return Err(SeizeError::Seccomp(pid, st.name).into());
        }
        Err(e) => return Err(SeizeError::Denied(pid, st.name, e.to_string()).into()),
    }
    // From here on, a failure must detach again.
    let detach_on_err = |e: anyhow::Error| {
        let _ = ptrace::detach(p, None);
        e
    };
    ptrace::interrupt(p)
        .map_err(|e| detach_on_err(anyhow::anyhow!("PTRACE_INTERRUPT of {pid}: {e}")))?;
    let job_stop = loop {
        match wait_task(p).map_err(detach_on_err)? {
            // The stop of PTRACE_INTERRUPT reports SIGTRAP; a task in a
            // job-control stop reports the signal that stopped it.
            WaitStatus::PtraceEvent(_, sig, libc::PTRACE_EVENT_STOP) => {
                break is_stop_signal(sig).then_some(sig);
            }
            // A signal arrived first: let it be delivered as it would have
            // been; the interrupt stays pending and stops the task next.
            WaitStatus::Stopped(_, sig) => {
                debug!("task {pid}: delivering {sig:?} before the freeze");
                ptrace::cont(p, Some(sig)).map_err(|e| detach_on_err(e.into()))?;
            }
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                bail!("PID {pid} exited while being seized")
            }
            other => debug!("task {pid}: ignoring {other:?} while seizing"),
        }
    };
    if job_stop.is_some() {
        drain_stop_signals(p).map_err(detach_on_err)?;
    }
    let stop_regs = ptrace::getregs(p).map_err(|e| detach_on_err(e.into()))?;
    // The registers to run the task's own code from after injected code;
    // not set yet: until crust runs code in the task, a crust that dies
    // leaves the task as the freeze found it, syscall restart included.
    let (regs, _) = resume_regs(pid, &stop_regs, ResumeIn::Live);
    let xstate = sys::get_xstate(p).map_err(|e| detach_on_err(e.into()))?;
    let sigmask = sys::get_sigmask(p).map_err(|e| detach_on_err(e.into()))?;
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(|e| detach_on_err(e.into()))?;
    Ok(SeizedTask {
        pid: p,
        regs,
        stop_regs,
        xstate,
        sigmask,
        mem,
        job_stop,
        released: false,
    })
}

impl SeizedTask {
    /// Takes hold of a task that crust already traces and that is stopped now
    /// (the restore path's final stop).
    pub fn from_stopped(pid: Pid) -> Result<Self> {
        let regs = ptrace::getregs(pid)?;
        Ok(SeizedTask {
            pid,
            regs,
            stop_regs: regs,
            xstate: sys::get_xstate(pid)?,
            sigmask: sys::get_sigmask(pid)?,
            mem: OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("/proc/{pid}/mem"))?,
            job_stop: None,
            released: false,
        })
    }

    /// Puts the task back in its own state from a stop inside the parasite,
    /// as the command's rt_sigreturn would (the registers for the live
    /// task, orig_rax -1, its FPU state and mask; the parasite changes
    /// neither its alternate stack nor anything else of the thread's). The
    /// registers come last: a crust killed before them leaves the thread
    /// in the parasite, whose broken link then takes it home through the
    /// frame, rather than in its own code with every signal blocked.
    pub fn leave_parasite(&self) -> Result<()> {
        sys::set_xstate(self.pid, &self.xstate)?;
        sys::set_sigmask(self.pid, self.sigmask)?;
        ptrace::setregs(self.pid, self.regs)?;
        Ok(())
    }

    /// Puts back registers, FPU state and signal mask as they were at the stop.
    pub fn restore_state(&self) -> Result<()> {
        ptrace::setregs(self.pid, self.regs)?;
        sys::set_xstate(self.pid, &self.xstate)?;
        sys::set_sigmask(self.pid, self.sigmask)?;
        Ok(())
    }

    /// Resumes the task where it was stopped.
    pub fn release(mut self) -> Result<()> {
        self.released = true;
        self.detach_as_stopped()
    }

    /// Detaches with the task exactly as the freeze found it, inside the
    /// kernel's signal code: the task is brought into an interrupt stop and
    /// given back its registers as they were at the seize (an interrupted
    /// syscall still marked -ERESTART*), so the kernel itself decides, when
    /// the task runs again, between restarting that syscall and returning
    /// EINTR into a signal handler, as it would have without crust.
    fn detach_as_stopped(&mut self) -> Result<()> {
        let pid = self.pid;
        ptrace::interrupt(pid)?;
        ptrace::cont(pid, None)?;
        let mut deliver = None;
        loop {
            match wait_task(pid)? {
                WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_STOP) => break,
                // A signal on its way in: it is delivered on detach, after
                // the registers are back, with the kernel's restart rules.
                WaitStatus::Stopped(_, sig) => {
                    deliver = Some(sig);
                    break;
                }
                WaitStatus::Exited(..) | WaitStatus::Signaled(..) => return Ok(()),
                _ => ptrace::cont(pid, None)?,
            }
        }
        ptrace::setregs(pid, self.stop_regs)?;
        sys::set_xstate(pid, &self.xstate)?;
        sys::set_sigmask(pid, self.sigmask)?;
        ptrace::detach(pid, deliver)?;
        Ok(())
    }

    /// Leaves the task as it is without touching it again (a thread of a
    /// process that was killed through its leader).
    pub fn forget(mut self) {
        self.released = true;
    }

    /// Ends the task (the default after a successful dump).
    pub fn kill(mut self) -> Result<()> {
        self.released = true;
        nix::sys::signal::kill(self.pid, Signal::SIGKILL)?;
        let _ = ptrace::detach(self.pid, None);
        Ok(())
    }
}

impl Drop for SeizedTask {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Err(e) = self.detach_as_stopped() {
            warn!(
                "task {}: putting its state back and detaching failed: {e}",
                self.pid
            );
            let _ = self.restore_state();
            let _ = ptrace::detach(self.pid, None);
        }
    }
}

fn is_stop_signal(sig: Signal) -> bool {
    matches!(
        sig,
        Signal::SIGSTOP | Signal::SIGTSTP | Signal::SIGTTIN | Signal::SIGTTOU
    )
}

/// Bit of `sig` in a /proc signal mask.
fn sig_bit(sig: Signal) -> u64 {
    1 << (sig as i32 - 1)
}

/// Takes the stop signals still queued to a task that is stopped already
/// (a second SIGSTOP, sent with kill or tkill): when not blocked,
/// the first injected code the task ran would be interrupted by one. They
/// change nothing: the task is stopped, stays stopped when crust lets it go
/// (the kernel puts a detached tracee back into its group stop), and is
/// stopped again after a restore; a SIGCONT would have discarded them.
/// Each is dequeued with PTRACE_CONT and suppressed at its signal-delivery
/// stop, with an interrupt queued so that the task goes straight back into
/// a ptrace stop without running a single instruction of its own.
fn drain_stop_signals(p: Pid) -> Result<()> {
    let stops = [
        Signal::SIGSTOP,
        Signal::SIGTSTP,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
    ]
    .into_iter()
    .map(sig_bit)
    .fold(0, |a, b| a | b);
    for _ in 0..8 {
        let st = proc::status(p.as_raw())?;
        // A blocked one stays queued: injected code runs with every signal
        // blocked, and the task gets it back as it was. SIGSTOP cannot be
        // blocked.
        let deliverable =
            (st.sig_pnd | st.shd_pnd) & stops & (!st.sig_blk | sig_bit(Signal::SIGSTOP));
        if deliverable == 0 {
            return Ok(());
        }
        ptrace::cont(p, None)?;
        loop {
            match wait_task(p)? {
                WaitStatus::Stopped(_, sig) => {
                    ptrace::interrupt(p)?;
                    // Another signal on its way in is delivered as it would
                    // have been (as during the seize itself).
                    let pass = (!is_stop_signal(sig)).then_some(sig);
                    ptrace::cont(p, pass)?;
                }
                WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_STOP) => break,
                WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                    bail!("PID {p} exited while being seized")
                }
                _ => ptrace::cont(p, None)?,
            }
        }
    }
    bail!("PID {p}: stop signals keep arriving; dump again")
}

/// Seizes every thread of process `pid`, the leader first, re-reading
/// /proc/PID/task until no thread appears that is not seized yet.
pub fn seize_threads(pid: i32) -> Result<Vec<SeizedTask>> {
    let mut seized = vec![seize_task(pid)?];
    loop {
        let tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("listing the threads of {pid}"))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        let new: Vec<i32> = tids
            .into_iter()
            .filter(|t| !seized.iter().any(|s| s.pid.as_raw() == *t))
            .collect();
        if new.is_empty() {
            return Ok(seized);
        }
        for tid in new {
            match seize_task(tid) {
                Ok(t) => seized.push(t),
                // A thread that exited in between is no part of the dump.
                Err(_) if !std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists() => {}
                Err(e) => return Err(e.context(format!("seizing thread {tid} of {pid}"))),
            }
        }
    }
}

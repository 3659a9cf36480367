//! The parasite: runs inside a seized task, one command per call. crust sets
//! rip to `parasite_entry`, rsp to the parasite's own stack and rdi to the
//! control block. Each command ends with rt_sigreturn through a frame crust
//! built from the task's own registers, FPU state and signal mask: crust
//! watches for that syscall's exit, and if crust is gone the task simply
//! goes on as it was.

#![no_std]
#![no_main]

#[path = "abi.rs"]
mod abi;
#[path = "rt.rs"]
mod rt;

use abi::*;
use rt::*;

core::arch::global_asm!(
    ".globl parasite_entry",
    "parasite_entry:",
    "call {main}",
    // main returns the frame's ucontext; rt_sigreturn reads it at rsp - 8.
    "mov rsp, rax",
    "mov eax, 15",
    "syscall",
    "2: jmp 2b",
    main = sym parasite_main,
);

const F_SETPIPE_SZ: u64 = 1031;
const O_CLOEXEC: u64 = 0o2000000;

extern "C" fn parasite_main(ctl: *mut ParasiteCtl) -> u64 {
    // SAFETY: crust points rdi at the control block it placed in our region.
    let ctl = unsafe { &mut *ctl };
    ctl.ret = match ctl.cmd {
        PARASITE_CMD_INIT => init(ctl),
        PARASITE_CMD_DUMP_PAGES => dump_pages(ctl),
        PARASITE_CMD_GET_MISC => get_misc(ctl),
        PARASITE_CMD_FINI => fini(ctl),
        PARASITE_CMD_GET_TIMERS => get_timers(ctl),
        _ => -22,
    };
    // rt_sigreturn also sets the alternate signal stack from the frame:
    // give it the task's current one.
    let uc = ctl.sigframe_uc as *mut UContext;
    // SAFETY: crust built the frame in our region; sigaltstack writes one stack_t.
    unsafe { syscall2(SYS_SIGALTSTACK, 0, core::ptr::addr_of_mut!((*uc).uc_stack) as u64) };
    ctl.sigframe_uc
}

fn init(ctl: &mut ParasiteCtl) -> i64 {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two ints into fds.
    let r = unsafe { syscall2(SYS_PIPE2, fds.as_mut_ptr() as u64, O_CLOEXEC) };
    if r < 0 {
        return r;
    }
    ctl.pipe_rd = fds[0];
    ctl.pipe_wr = fds[1];
    // SAFETY: fcntl on our own pipe.
    let r = unsafe { syscall4(SYS_FCNTL, fds[1] as u64, F_SETPIPE_SZ, ctl.pipe_size, 0) };
    if r < 0 {
        return r;
    }
    ctl.pipe_size = r as u64;
    0
}

fn dump_pages(ctl: &mut ParasiteCtl) -> i64 {
    let nr = ctl.nr_iovs as usize;
    if nr > MAX_IOVS {
        return -22;
    }
    let mut total = 0i64;
    let mut i = 0;
    // Never block: with crust gone nobody empties the pipe, and the task
    // must get out of the parasite. A full pipe ends the batch early.
    const SPLICE_F_NONBLOCK: u64 = 2;
    // vmsplice may take a batch in parts; go on from where it stopped.
    while i < nr {
        // SAFETY: the iovecs name readable ranges of this task, checked by crust.
        let r = unsafe {
            syscall4(
                SYS_VMSPLICE,
                ctl.pipe_wr as u64,
                ctl.iovs.as_ptr().add(i) as u64,
                (nr - i) as u64,
                SPLICE_F_NONBLOCK,
            )
        };
        if r == -11 && total > 0 {
            return total;
        }
        if r < 0 {
            return r;
        }
        total += r;
        let mut done = r as u64;
        while i < nr && done >= ctl.iovs[i].len {
            done -= ctl.iovs[i].len;
            i += 1;
        }
        if i < nr {
            ctl.iovs[i].base += done;
            ctl.iovs[i].len -= done;
        }
    }
    total
}

fn get_timers(ctl: &mut ParasiteCtl) -> i64 {
    let nr = ctl.nr_timers as usize;
    if nr > MAX_POSIX_TIMERS {
        return -22;
    }
    for t in ctl.timers[..nr].iter_mut() {
        // SAFETY: timer_gettime writes one itimerspec into the timer's slot.
        let r = unsafe { syscall2(SYS_TIMER_GETTIME, t.id as u64, &mut t.spec as *mut _ as u64) };
        if r < 0 {
            return r;
        }
        // SAFETY: timer_getoverrun only takes the id.
        let r = unsafe { syscall2(SYS_TIMER_GETOVERRUN, t.id as u64, 0) };
        if r < 0 {
            return r;
        }
        t.overrun = r as i32;
    }
    0
}

fn get_misc(ctl: &mut ParasiteCtl) -> i64 {
    let m = &mut ctl.misc;
    m.sigactions_ok = 0;
    for sig in 1..=NSIG {
        if sig == 9 || sig == 19 {
            continue;
        }
        // SAFETY: rt_sigaction writes one kernel sigaction into the slot.
        let r = unsafe {
            syscall4(SYS_RT_SIGACTION, sig as u64, 0, &mut m.sigactions[sig - 1] as *mut _ as u64, 8)
        };
        if r == 0 {
            m.sigactions_ok |= 1 << (sig - 1);
        }
    }
    for which in 0..3 {
        // SAFETY: getitimer writes one itimerval.
        let r = unsafe { syscall2(SYS_GETITIMER, which as u64, &mut m.itimers[which] as *mut _ as u64) };
        if r < 0 {
            return r;
        }
    }
    // SAFETY: sigaltstack writes one stack_t.
    let r = unsafe { syscall2(SYS_SIGALTSTACK, 0, &mut m.sigaltstack as *mut _ as u64) };
    if r < 0 {
        return r;
    }
    for res in 0..NR_RLIMITS {
        // SAFETY: prlimit64 on ourselves writes one rlimit.
        let r = unsafe { syscall4(SYS_PRLIMIT64, 0, res as u64, 0, &mut m.rlimits[res] as *mut _ as u64) };
        if r < 0 {
            return r;
        }
    }
    const PR_GET_TID_ADDRESS: u64 = 40;
    // SAFETY: PR_GET_TID_ADDRESS writes one pointer.
    let r = unsafe { syscall4(SYS_PRCTL, PR_GET_TID_ADDRESS, &mut m.tid_address as *mut _ as u64, 0, 0) };
    if r < 0 {
        m.tid_address = 0;
    }
    // SAFETY: brk(0) only reports the current break.
    m.brk = unsafe { syscall2(SYS_BRK, 0, 0) } as u64;
    const PR_GET_PDEATHSIG: u64 = 2;
    const PR_GET_DUMPABLE: u64 = 3;
    const PR_GET_SECUREBITS: u64 = 27;
    const PR_GET_TIMERSLACK: u64 = 30;
    const PR_MCE_KILL_GET: u64 = 34;
    const PR_GET_CHILD_SUBREAPER: u64 = 37;
    const PR_GET_NO_NEW_PRIVS: u64 = 39;
    const PR_GET_THP_DISABLE: u64 = 42;
    let mut v = 0i32;
    // SAFETY: these prctls return their value or write one int into v.
    unsafe {
        syscall4(SYS_PRCTL, PR_GET_PDEATHSIG, &mut v as *mut i32 as u64, 0, 0);
        m.pdeath_signal = v;
        v = 0;
        syscall4(SYS_PRCTL, PR_GET_CHILD_SUBREAPER, &mut v as *mut i32 as u64, 0, 0);
        m.child_subreaper = v;
        m.dumpable = syscall4(SYS_PRCTL, PR_GET_DUMPABLE, 0, 0, 0) as i32;
        m.securebits = syscall4(SYS_PRCTL, PR_GET_SECUREBITS, 0, 0, 0) as i32;
        m.timer_slack = syscall4(SYS_PRCTL, PR_GET_TIMERSLACK, 0, 0, 0) as u64;
        m.mce_kill = syscall6(SYS_PRCTL, PR_MCE_KILL_GET, 0, 0, 0, 0, 0) as i32;
        m.no_new_privs = syscall6(SYS_PRCTL, PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0, 0) as i32;
        m.thp_disable = syscall6(SYS_PRCTL, PR_GET_THP_DISABLE, 0, 0, 0, 0, 0) as i32;
        m.membarrier = syscall4(SYS_MEMBARRIER, MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0, 0) as i32;
    }
    0
}

fn fini(ctl: &mut ParasiteCtl) -> i64 {
    // SAFETY: closing the pipe this parasite made.
    unsafe {
        syscall2(SYS_CLOSE, ctl.pipe_rd as u64, 0);
        syscall2(SYS_CLOSE, ctl.pipe_wr as u64, 0);
    }
    // No pipe any more: a cure after a crust that died closes none (their
    // numbers may be the task's own files again by then).
    (ctl.pipe_rd, ctl.pipe_wr) = (-1, -1);
    0
}

//! The parasite: runs inside a seized task, one command per call. crust sets
//! rip to `parasite_entry`, rsp to the parasite's own stack and rdi to the
//! control block. Each command ends with rt_sigreturn through a frame crust
//! built from the task's own registers, FPU state and signal mask, unless
//! crust, alive, puts the thread's state back itself first (while the
//! parasite waits for its answer, or at that syscall's entry, which it
//! then skips): if crust is gone the task simply goes on as it was.

#![no_std]
#![no_main]

#[path = "abi.rs"]
mod abi;
#[path = "crc32.rs"]
mod crc32;
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

const O_CLOEXEC: u64 = 0o2000000;
const MSG_DONTWAIT: u64 = 0x40;

extern "C" fn parasite_main(ctl: *mut ParasiteCtl) -> u64 {
    // SAFETY: crust points rdi at the control block it placed in our region.
    let ctl = unsafe { &mut *ctl };
    let free = ctl.free_run != 0;
    if free {
        // An answer left over from a command crust gave up on must not
        // end this one's handshake before crust stops the thread.
        let mut b = [0u8; 16];
        // SAFETY: reads at most 16 bytes into b; never blocks.
        while unsafe { syscall6(SYS_RECVFROM, ctl.link[0] as u64, b.as_mut_ptr() as u64, 16, MSG_DONTWAIT, 0, 0) } > 0 {}
    }
    if free && ctl.link[1] >= 0 {
        // crust holds its own copy of this end now: with ours closed, the
        // link breaks when crust dies, and the handshake below cannot wait
        // for a dead crust.
        // SAFETY: closing the end of the link this parasite made.
        unsafe { syscall2(SYS_CLOSE, ctl.link[1] as u64, 0) };
        ctl.link[1] = -1;
    }
    // rt_sigreturn also sets the alternate signal stack from the frame:
    // give it the task's current one, once per frame (the frame stays as
    // it is between commands, and nothing here changes the stack).
    if ctl.fresh_frame != 0 {
        let uc = ctl.sigframe_uc as *mut UContext;
        // SAFETY: crust built the frame in our region; sigaltstack writes one stack_t.
        unsafe { syscall2(SYS_SIGALTSTACK, 0, core::ptr::addr_of_mut!((*uc).uc_stack) as u64) };
        ctl.fresh_frame = 0;
    }
    ctl.ret = match ctl.cmd {
        PARASITE_CMD_INIT => init(ctl),
        PARASITE_CMD_PIPES => make_pipes(ctl),
        PARASITE_CMD_DUMP_PAGES => dump_pages(ctl),
        PARASITE_CMD_DUMP_PAGES_STREAM => dump_pages_stream(ctl),
        PARASITE_CMD_GET_MISC => get_misc(ctl, true),
        PARASITE_CMD_GET_THREAD_MISC => get_misc(ctl, false),
        PARASITE_CMD_FINI => fini(ctl),
        PARASITE_CMD_GET_TIMERS => get_timers(ctl),
        _ => -22,
    };
    let last = ctl.cmd == PARASITE_CMD_FINI
        || (ctl.cmd == PARASITE_CMD_DUMP_PAGES_STREAM && ctl.ret == STREAM_FINISHED);
    if free {
        handshake(ctl);
        if last {
            // SAFETY: closing this parasite's end of the link, used no more.
            unsafe { syscall2(SYS_CLOSE, ctl.link[0] as u64, 0) };
            ctl.link[0] = -1;
        }
    }
    ctl.sigframe_uc
}

/// The end of a free command (see `ParasiteCtl::free_run`): "done" to
/// crust, then wait for its "go", or for the link to break.
fn handshake(ctl: &mut ParasiteCtl) {
    talk(ctl, LINK_CMD_DONE);
}

/// Sends `say` to crust on the link and reads its answer: None when the
/// link broke (crust is gone).
fn talk(ctl: &mut ParasiteCtl, say: u8) -> Option<u8> {
    const EINTR: i64 = -4;
    // With crust gone, a send raises no SIGPIPE: pending behind the
    // parasite's mask, it would kill the task once its own mask is back.
    const MSG_NOSIGNAL: u64 = 0x4000;
    let mut b = say;
    // SAFETY: sends one byte from b; never blocks.
    unsafe {
        syscall6(SYS_SENDTO, ctl.link[0] as u64, &b as *const u8 as u64, 1, MSG_DONTWAIT | MSG_NOSIGNAL, 0, 0)
    };
    loop {
        // SAFETY: reads at most one byte into b.
        let r = unsafe { syscall4(SYS_READ, ctl.link[0] as u64, &mut b as *mut u8 as u64, 1, 0) };
        if r != EINTR {
            return (r == 1).then_some(b);
        }
    }
}

/// Batches of `dump_pages` for as long as crust answers with the next one
/// (see `PARASITE_CMD_DUMP_PAGES_STREAM`). Waits only on crust: with crust
/// gone the read ends at once, and so does the stream.
fn dump_pages_stream(ctl: &mut ParasiteCtl) -> i64 {
    loop {
        ctl.ret = dump_pages(ctl);
        match talk(ctl, LINK_BATCH_DONE) {
            Some(LINK_NEXT_BATCH) => {}
            Some(LINK_FINISH) => {
                fini(ctl);
                return STREAM_FINISHED;
            }
            _ => return 0,
        }
    }
}

fn init(ctl: &mut ParasiteCtl) -> i64 {
    const AF_UNIX: u64 = 1;
    const SOCK_STREAM: u64 = 1;
    const SOCK_CLOEXEC: u64 = 0o2000000;
    for p in ctl.pipes.iter_mut() {
        *p = [-1, -1];
    }
    let mut sv = [-1i32; 2];
    // SAFETY: socketpair writes two ints into sv.
    let r = unsafe { syscall4(SYS_SOCKETPAIR, AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv.as_mut_ptr() as u64) };
    if r < 0 {
        return r;
    }
    ctl.link = sv;
    0
}

fn make_pipes(ctl: &mut ParasiteCtl) -> i64 {
    let nr = ctl.nr_pipes as usize;
    if nr > MAX_PAGE_PIPES {
        return -22;
    }
    for i in 0..nr {
        if ctl.pipes[i][0] >= 0 {
            continue;
        }
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two ints into fds.
        let r = unsafe { syscall2(SYS_PIPE2, fds.as_mut_ptr() as u64, O_CLOEXEC) };
        if r < 0 {
            return r;
        }
        // Recorded at once: crust (or the dump's guardian) closes what is listed.
        ctl.pipes[i] = fds;
    }
    0
}

fn dump_pages(ctl: &mut ParasiteCtl) -> i64 {
    let nr = ctl.nr_fills as usize;
    if nr > MAX_PAGE_PIPES {
        return -22;
    }
    let mut first = 0;
    let mut total = 0;
    for f in 0..nr {
        let fill = ctl.fills[f];
        let n = fill.nr_iovs as usize;
        let pipe = fill.pipe as usize;
        if first + n > MAX_IOVS || pipe >= MAX_PAGE_PIPES || ctl.pipes[pipe][1] < 0 {
            return -22;
        }
        let iovs = &mut ctl.iovs[first..first + n];
        // The checksum crust records for these bytes: computed here, where
        // the pages are, so that nobody reads them back from the image.
        let mut crc = crc32::Crc32::new();
        for v in iovs.iter() {
            // SAFETY: the iovecs name readable ranges of this task, checked by crust.
            crc.update(unsafe { core::slice::from_raw_parts(v.base as *const u8, v.len as usize) });
        }
        let r = splice_into(ctl.pipes[pipe][1], iovs);
        if r < 0 {
            return r;
        }
        ctl.fills[f].crc = crc.finish();
        ctl.fills[f].done = r as u64;
        total += r;
        if r as u64 != fill.len {
            // A pipe that could not take its batch: crust sees `done` short.
            return total;
        }
        first += n;
    }
    total
}

/// vmsplices `iovs` into the pipe whose write end is `fd`; returns the
/// bytes it took, or -errno.
fn splice_into(fd: i32, iovs: &mut [IoVec]) -> i64 {
    // Never block: with crust gone nobody empties the pipe, and the task
    // must get out of the parasite. crust hands over an empty pipe that
    // holds the whole batch; a full pipe ends the batch early.
    const SPLICE_F_NONBLOCK: u64 = 2;
    let nr = iovs.len();
    let mut total = 0i64;
    let mut i = 0;
    // vmsplice may take a batch in parts; go on from where it stopped.
    while i < nr {
        let n = (nr - i).min(VMSPLICE_MAX_IOVS);
        // SAFETY: the iovecs name readable ranges of this task, checked by crust.
        let r = unsafe {
            syscall4(SYS_VMSPLICE, fd as u64, iovs.as_ptr().add(i) as u64, n as u64, SPLICE_F_NONBLOCK)
        };
        if r == -11 && total > 0 {
            return total;
        }
        if r < 0 {
            return r;
        }
        total += r;
        let mut done = r as u64;
        while i < nr && done >= iovs[i].len {
            done -= iovs[i].len;
            i += 1;
        }
        if i < nr {
            iovs[i].base += done;
            iovs[i].len -= done;
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

/// Fills `ctl.misc`: the calling thread's own state, and with `whole` the
/// process-wide state too (`PARASITE_CMD_GET_MISC`; without it,
/// `PARASITE_CMD_GET_THREAD_MISC`).
fn get_misc(ctl: &mut ParasiteCtl, whole: bool) -> i64 {
    let m = &mut ctl.misc;
    // SAFETY: sigaltstack writes one stack_t.
    let r = unsafe { syscall2(SYS_SIGALTSTACK, 0, &mut m.sigaltstack as *mut _ as u64) };
    if r < 0 {
        return r;
    }
    const PR_GET_TID_ADDRESS: u64 = 40;
    // SAFETY: PR_GET_TID_ADDRESS writes one pointer.
    let r = unsafe { syscall4(SYS_PRCTL, PR_GET_TID_ADDRESS, &mut m.tid_address as *mut _ as u64, 0, 0) };
    if r < 0 {
        m.tid_address = 0;
    }
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
        m.securebits = syscall4(SYS_PRCTL, PR_GET_SECUREBITS, 0, 0, 0) as i32;
        m.timer_slack = syscall4(SYS_PRCTL, PR_GET_TIMERSLACK, 0, 0, 0) as u64;
        m.mce_kill = syscall6(SYS_PRCTL, PR_MCE_KILL_GET, 0, 0, 0, 0, 0) as i32;
        m.no_new_privs = syscall6(SYS_PRCTL, PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0, 0) as i32;
    }
    if !whole {
        return 0;
    }
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
    for res in 0..NR_RLIMITS {
        // SAFETY: prlimit64 on ourselves writes one rlimit.
        let r = unsafe { syscall4(SYS_PRLIMIT64, 0, res as u64, 0, &mut m.rlimits[res] as *mut _ as u64) };
        if r < 0 {
            return r;
        }
    }
    // SAFETY: brk(0) only reports the current break.
    m.brk = unsafe { syscall2(SYS_BRK, 0, 0) } as u64;
    // SAFETY: these prctls return their value or write one int into v.
    unsafe {
        v = 0;
        syscall4(SYS_PRCTL, PR_GET_CHILD_SUBREAPER, &mut v as *mut i32 as u64, 0, 0);
        m.child_subreaper = v;
        m.dumpable = syscall4(SYS_PRCTL, PR_GET_DUMPABLE, 0, 0, 0) as i32;
        m.thp_disable = syscall6(SYS_PRCTL, PR_GET_THP_DISABLE, 0, 0, 0, 0, 0) as i32;
        m.membarrier = syscall4(SYS_MEMBARRIER, MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0, 0) as i32;
    }
    0
}

fn fini(ctl: &mut ParasiteCtl) -> i64 {
    for p in ctl.pipes.iter_mut() {
        for fd in p.iter_mut().filter(|fd| **fd >= 0) {
            // SAFETY: closing a pipe this parasite made.
            unsafe { syscall2(SYS_CLOSE, *fd as u64, 0) };
            *fd = -1;
        }
    }
    if ctl.free_run == 0 {
        // Not freed by the handshake's end: the whole link goes here.
        for fd in ctl.link.iter_mut().filter(|fd| **fd >= 0) {
            // SAFETY: closing the link this parasite made.
            unsafe { syscall2(SYS_CLOSE, *fd as u64, 0) };
            *fd = -1;
        }
    }
    0
}

//! The restorer: the last code a restored task runs before its own. crust's
//! child jumps here with rsp on a stack inside the hole and rdi pointing at
//! `RestorerArgs`. From here on only the hole is ours: the blob, its args and
//! the premapped VMAs. The restorer drops crust's memory, moves the task's
//! memory into place, restores what only the task can set, traps once so
//! crust can watch the final step, and returns into the task with
//! rt_sigreturn.

#![no_std]
#![no_main]

#[path = "abi.rs"]
mod abi;
#[path = "rt.rs"]
mod rt;

use abi::*;
use rt::*;

// The end of every thread's restore: `rax` holds the address of its
// sigframe's ucontext (rt_sigreturn reads the frame at rsp - 8), `rdx` the
// task's own SIGTRAP action (0: none). The int3 lets crust watch the last
// step; being forced with every signal blocked, it resets the SIGTRAP
// action to the default, so the action is installed again after it.
core::arch::global_asm!(
    ".globl restorer_finish",
    "restorer_finish:",
    "mov rsp, rax",
    "mov rsi, rdx",
    "int3",
    "test rsi, rsi",
    "jz 1f",
    "mov eax, 13",
    "mov edi, 5",
    "xor edx, edx",
    "mov r10d, 8",
    "syscall",
    "1:",
    "mov eax, 15",
    "syscall",
    "2: jmp 2b",
);

core::arch::global_asm!(
    ".globl restorer_entry",
    "restorer_entry:",
    "and rsp, -16",
    "call {main}",
    "jmp restorer_finish",
    main = sym restorer_main,
);

// clone3 for a thread: the child starts on its own stack with r12 still
// holding its ThreadArgs, restores itself and ends like the main thread.
core::arch::global_asm!(
    ".globl restorer_clone_thread",
    "restorer_clone_thread:",
    "push r12",
    "mov r12, rdx",
    "mov eax, 435",
    "syscall",
    "test rax, rax",
    "jz 1f",
    "pop r12",
    "ret",
    "1:",
    "mov rdi, r12",
    "and rsp, -16",
    "call {thread_main}",
    "jmp restorer_finish",
    thread_main = sym thread_main,
);

/// What a thread's restore returns to `restorer_finish` (in rax and rdx).
#[repr(C)]
struct Finish {
    sigframe_uc: u64,
    sigtrap_action: u64,
}

fn finish(args: &RestorerArgs, sigframe_uc: u64) -> Finish {
    let trap = 5;
    let sigtrap_action = if args.sigactions_ok & (1 << (trap - 1)) != 0 {
        &args.sigactions[trap - 1] as *const KSigAction as u64
    } else {
        0
    };
    Finish { sigframe_uc, sigtrap_action }
}

unsafe extern "C" {
    fn restorer_clone_thread(args: *const CloneArgs, size: u64, thread: *const ThreadArgs) -> i64;
}

const CLONE_VM: u64 = 0x100;
const CLONE_FS: u64 = 0x200;
const CLONE_FILES: u64 = 0x400;
const CLONE_SIGHAND: u64 = 0x800;
const CLONE_THREAD: u64 = 0x10000;
const CLONE_SYSVSEM: u64 = 0x40000;
const FUTEX_WAIT: u64 = 0;
const FUTEX_WAKE: u64 = 1;

const PR_SET_PDEATHSIG: u64 = 1;
const PR_SET_DUMPABLE: u64 = 4;
const PR_SET_KEEPCAPS: u64 = 8;
const PR_SET_NAME: u64 = 15;
const PR_SET_SECUREBITS: u64 = 28;
const PR_SET_TIMERSLACK: u64 = 29;
const PR_MCE_KILL: u64 = 33;
const PR_SET_CHILD_SUBREAPER: u64 = 36;
const PR_SET_NO_NEW_PRIVS: u64 = 38;
const PR_SET_THP_DISABLE: u64 = 41;
const SECBIT_KEEP_CAPS: u64 = 1 << 4;
const SYS_SETPRIORITY: u64 = 141;
const SYS_SCHED_SETSCHEDULER: u64 = 144;
const SYS_SCHED_SETAFFINITY: u64 = 203;

/// Queues signals again, to this thread or (`shared`) to the whole process.
/// A task may queue any siginfo to itself; all signals are blocked here, so
/// they wait for the mask the sigframe brings back.
fn queue_signals(args: &RestorerArgs, off: u64, nr: u64, shared: bool) {
    let base = args as *const RestorerArgs as u64;
    // SAFETY: getpid/gettid take no arguments.
    let (pid, tid) = unsafe { (syscall2(SYS_GETPID, 0, 0) as u64, syscall2(SYS_GETTID, 0, 0) as u64) };
    for i in 0..nr {
        let info = base + off + i * 128;
        // SAFETY: a 128-byte siginfo record crust wrote in the args area.
        let sig = unsafe { *((info) as *const i32) } as u64;
        let r = unsafe {
            if shared {
                syscall4(SYS_RT_SIGQUEUEINFO, pid, sig, info, 0)
            } else {
                syscall4(SYS_RT_TGSIGQUEUEINFO, pid, tid, sig, info)
            }
        };
        check(args, RSTEP_SIGQUEUE, r);
    }
}

/// What every thread restores of its own, the leader included.
fn restore_own_state(args: &RestorerArgs, t: &ThreadArgs) {
    queue_signals(args, t.pending_off, t.nr_pending, false);
    // SAFETY: prctl with the thread's NUL-terminated 16-byte name.
    unsafe { syscall2(SYS_PRCTL, PR_SET_NAME, t.comm.as_ptr() as u64) };
    if t.has_rseq != 0 {
        let r = t.rseq;
        // SAFETY: the rseq area lies in the task's restored memory.
        let rr = unsafe { syscall4(SYS_RSEQ, r.addr, r.len as u64, 0, r.sig as u64) };
        check(args, RSTEP_RSEQ, rr);
    }
    // SAFETY: the clear-child-tid address and robust list head are the
    // thread's own, in the task's restored memory.
    unsafe {
        syscall2(SYS_SET_TID_ADDRESS, t.tid_address, 0);
        if t.robust_list != 0 {
            syscall2(SYS_SET_ROBUST_LIST, t.robust_list, t.robust_len);
        }
    }
    // SAFETY: the thread's own TLS bases.
    unsafe {
        check(args, RSTEP_FSBASE, syscall2(SYS_ARCH_PRCTL, ARCH_SET_FS, t.fs_base));
        check(args, RSTEP_FSBASE, syscall2(SYS_ARCH_PRCTL, ARCH_SET_GS, t.gs_base));
    }
    // Scheduling, while this thread may still raise priorities.
    // SAFETY: each call reads only the values passed.
    unsafe {
        if t.nr_affinity != 0 {
            syscall4(SYS_SCHED_SETAFFINITY, 0, t.nr_affinity as u64 * 8, t.affinity.as_ptr() as u64, 0);
        }
        let param = [t.sched_priority];
        check(args, RSTEP_SCHED, syscall4(SYS_SCHED_SETSCHEDULER, 0, t.sched_policy as u64, param.as_ptr() as u64, 0));
        check(args, RSTEP_SCHED, syscall4(SYS_SETPRIORITY, 0, 0, t.nice as u64, 0));
        syscall2(SYS_PRCTL, PR_SET_TIMERSLACK, t.timer_slack);
        // PR_MCE_KILL_GET answered 2 (default), or the policy set.
        if t.mce_kill == 2 {
            syscall4(SYS_PRCTL, PR_MCE_KILL, 0, 0, 0);
        } else {
            syscall4(SYS_PRCTL, PR_MCE_KILL, 1, t.mce_kill as u64, 0);
        }
        // Keep the permitted set across the change of uid; capset trims it.
        check(args, RSTEP_CREDS, syscall2(SYS_PRCTL, PR_SET_SECUREBITS, t.securebits as u64 | SECBIT_KEEP_CAPS));
    }
    restore_seccomp(args, t);
    restore_creds(args, &t.creds);
    // SAFETY: prctls with integer arguments. The uid change above cleared the
    // parent-death signal; keep-caps goes back to the thread's own setting.
    unsafe {
        syscall2(SYS_PRCTL, PR_SET_KEEPCAPS, (t.securebits as u64 & SECBIT_KEEP_CAPS) >> 4);
        syscall2(SYS_PRCTL, PR_SET_PDEATHSIG, t.pdeath_signal as u64);
        if t.no_new_privs != 0 {
            check(args, RSTEP_CREDS, syscall6(SYS_PRCTL, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, 0));
        }
    }
}

extern "C" fn thread_main(t: *const ThreadArgs) -> Finish {
    // SAFETY: the main thread passed a ThreadArgs in the hole.
    let t = unsafe { &*t };
    // SAFETY: t.args points at the process's RestorerArgs in the hole.
    let args = unsafe { &*(t.args as *const RestorerArgs) };
    restore_own_state(args, t);
    let done = &args.threads_done as *const u32 as *const core::sync::atomic::AtomicU32;
    // SAFETY: threads_done is a u32 only ever touched atomically.
    unsafe {
        (*done).fetch_add(1, core::sync::atomic::Ordering::SeqCst);
        syscall4(SYS_FUTEX, done as u64, FUTEX_WAKE, 1, 0);
    }
    finish(args, t.sigframe_uc)
}

/// Creates the other threads with their TIDs, once the address space and
/// the signal handlers (both shared) are in place.
fn create_threads(args: &RestorerArgs, base: u64) {
    let threads = (base + args.threads_off) as *const ThreadArgs;
    for i in 0..args.nr_threads as usize {
        // SAFETY: crust wrote nr_threads entries at threads_off.
        let t = unsafe { &*threads.add(i) };
        let ca = CloneArgs {
            flags: CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM,
            stack: t.stack_top - t.stack_size,
            stack_size: t.stack_size,
            set_tid: &t.tid as *const i32 as u64,
            set_tid_size: 1,
            ..Default::default()
        };
        // A TID can stay taken a moment after its old thread is gone (the
        // kernel frees it when the last reference drops): retry a while.
        let mut r = -17;
        for _ in 0..300 {
            // SAFETY: the new thread runs thread_main on its own stack in the hole.
            r = unsafe { restorer_clone_thread(&ca, core::mem::size_of::<CloneArgs>() as u64, t) };
            if r != -17 {
                break;
            }
            let pause = [0i64, 10_000_000];
            // SAFETY: nanosleep reads one timespec.
            unsafe { syscall2(SYS_NANOSLEEP, pause.as_ptr() as u64, 0) };
        }
        check(args, RSTEP_THREAD, r);
    }
}

/// Waits until every thread has restored itself.
fn wait_threads(args: &RestorerArgs) {
    let done = &args.threads_done as *const u32 as *const core::sync::atomic::AtomicU32;
    loop {
        // SAFETY: threads_done is a u32 only ever touched atomically.
        let n = unsafe { (*done).load(core::sync::atomic::Ordering::SeqCst) };
        if n as u64 >= args.nr_threads {
            return;
        }
        // SAFETY: futex wait on our own word, woken by each thread.
        unsafe { syscall4(SYS_FUTEX, done as u64, FUTEX_WAIT, n as u64, 0) };
    }
}

const MREMAP_MAYMOVE: u64 = 1;
const MREMAP_FIXED: u64 = 2;
const ARCH_SET_GS: u64 = 0x1001;
const ARCH_SET_FS: u64 = 0x1002;
const ARCH_MAP_VDSO_64: u64 = 0x2003;
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
const TASK_SIZE_MAX: u64 = 0x7fff_ffff_f000;

fn fail(args: &RestorerArgs, step: u32, err: i64) -> ! {
    // SAFETY: getpid takes no arguments.
    let pid = unsafe { syscall2(SYS_GETPID, 0, 0) } as i32;
    let rec = [step as i32, (-err) as i32, pid];
    // SAFETY: writes one record from the stack to crust's status pipe.
    unsafe { syscall4(SYS_WRITE, args.status_fd as u64, rec.as_ptr() as u64, RESTORER_FAILURE_LEN as u64, 0) };
    exit_group(70)
}

fn check(args: &RestorerArgs, step: u32, r: i64) {
    if r < 0 {
        fail(args, step, r)
    }
}

extern "C" fn restorer_main(args_ptr: *mut RestorerArgs) -> Finish {
    // SAFETY: crust's child placed the args in the hole and points rdi at them.
    let args = unsafe { &mut *args_ptr };
    let base = args_ptr as u64;

    // Drop every mapping of crust's: all below and all above the hole.
    // SAFETY: nothing outside the hole is used from here on.
    unsafe {
        check(args, RSTEP_UNMAP, syscall2(SYS_MUNMAP, 0, args.hole_start));
        check(args, RSTEP_UNMAP, syscall2(SYS_MUNMAP, args.hole_end, TASK_SIZE_MAX - args.hole_end));
    }

    let vmas = (base + args.vmas_off) as *const VmaMove;
    for i in 0..args.nr_vmas as usize {
        // SAFETY: crust wrote nr_vmas entries at vmas_off.
        let v = unsafe { *vmas.add(i) };
        if v.shmid >= 0 {
            attach_shm(args, &v);
            restore_vma_advice(args, &v);
            continue;
        }
        // SAFETY: src is a premapped VMA in the hole; dst lies outside it.
        let r = unsafe { syscall6(SYS_MREMAP, v.src, v.len, v.len, MREMAP_MAYMOVE | MREMAP_FIXED, v.dst, 0) };
        check(args, RSTEP_MREMAP, r);
        // SAFETY: the VMA now lives at dst.
        let r = unsafe { syscall4(SYS_MPROTECT, v.dst, v.len, v.prot, 0) };
        check(args, RSTEP_MPROTECT, r);
        install_guards(args, base, &v);
        if v.advice & VMA_ADV_LAZY != 0 {
            register_lazy(args, &v);
        }
        restore_vma_advice(args, &v);
    }

    if args.vdso_addr != 0 {
        // SAFETY: crust's vDSO went with the unmap above; map the kernel's anew.
        let r = unsafe { syscall2(SYS_ARCH_PRCTL, ARCH_MAP_VDSO_64, args.vdso_addr) };
        if r < 0 {
            fail(args, RSTEP_VDSO, r);
        }
    }

    args.mm_map.auxv = args.auxv.as_ptr() as u64;
    // SAFETY: mm_map is a valid prctl_mm_map, its auxv points into args.
    let r = unsafe {
        syscall6(SYS_PRCTL, PR_SET_MM, PR_SET_MM_MAP, &args.mm_map as *const _ as u64,
                 core::mem::size_of::<PrctlMmMap>() as u64, 0, 0)
    };
    check(args, RSTEP_MM_MAP, r);
    // SAFETY: closing the exe fd crust opened for PR_SET_MM_MAP.
    unsafe { syscall2(SYS_CLOSE, args.mm_map.exe_fd as u64, 0) };

    for sig in 1..=NSIG {
        if args.sigactions_ok & (1 << (sig - 1)) == 0 {
            continue;
        }
        // SAFETY: installs the dumped handler; signals stay blocked until sigreturn.
        let r = unsafe {
            syscall4(SYS_RT_SIGACTION, sig as u64, &args.sigactions[sig - 1] as *const _ as u64, 0, 8)
        };
        check(args, RSTEP_SIGACTION, r);
    }

    // The filters every thread's chain starts with, installed once and
    // inherited by the threads created below: they share them again (a
    // filter added later with SECCOMP_FILTER_FLAG_TSYNC needs that).
    install_filters(args, &args.leader, 0, args.nr_seccomp_shared);
    // Threads are created while this one still holds crust's privileges
    // (set_tid needs them); each then drops to its own credentials.
    create_threads(args, base);
    restore_own_state(args, &args.leader);
    queue_signals(args, args.shared_pending_off, args.nr_shared_pending, true);
    wait_threads(args);
    // Process-wide prctl state; dumpable last, the uid change reset it.
    // SAFETY: prctls with integer arguments.
    unsafe {
        syscall2(SYS_PRCTL, PR_SET_CHILD_SUBREAPER, args.child_subreaper as u64);
        syscall6(SYS_PRCTL, PR_SET_THP_DISABLE, args.thp_disable as u64, 0, 0, 0, 0);
        syscall2(SYS_PRCTL, PR_SET_DUMPABLE, args.dumpable as u64);
    }

    restore_posix_timers(args);
    if args.mlockall != 0 {
        // SAFETY: mlockall with flags only; it locks what is mapped later.
        let r = unsafe { syscall2(SYS_MLOCKALL, args.mlockall, 0) };
        check(args, RSTEP_MADVISE, r);
    }
    for which in 0..3 {
        // SAFETY: setitimer reads one itimerval.
        let r = unsafe { syscall4(SYS_SETITIMER, which as u64, &args.itimers[which] as *const _ as u64, 0, 0) };
        check(args, RSTEP_ITIMER, r);
    }

    // SAFETY: the status pipe is crust's, the task never had it; nor the
    // userfaultfd, which the lazy-pages daemon holds.
    unsafe {
        if args.uffd >= 0 {
            syscall2(SYS_CLOSE, args.uffd as u64, 0);
        }
        syscall2(SYS_CLOSE, args.status_fd as u64, 0);
        if args.log_fd >= 0 {
            syscall2(SYS_CLOSE, args.log_fd as u64, 0);
        }
    }
    finish(args, args.leader.sigframe_uc)
}

/// Installs the thread's own seccomp filters (those after the ones the
/// leader installed for all before creating the threads), oldest first,
/// while it still has crust's privileges (a filter without no_new_privs
/// needs CAP_SYS_ADMIN). crust traces the tree with
/// PTRACE_O_SUSPEND_SECCOMP (which threads created under PTRACE_O_TRACECLONE
/// inherit), so the rest of the restore is not filtered; the filters bite
/// once crust lets the task go.
fn restore_seccomp(args: &RestorerArgs, t: &ThreadArgs) {
    const SECCOMP_SET_MODE_STRICT: u64 = 0;
    if t.seccomp_mode == 2 {
        install_filters(args, t, args.nr_seccomp_shared, t.nr_seccomp_filters);
    }
    if t.seccomp_mode == 1 {
        // SAFETY: strict mode takes no arguments.
        let r = unsafe { syscall4(SYS_SECCOMP, SECCOMP_SET_MODE_STRICT, 0, 0, 0) };
        check(args, RSTEP_SECCOMP, r);
    }
}

/// Installs filters `from..to` of the thread's chain (records at
/// `seccomp_off`, oldest first).
fn install_filters(args: &RestorerArgs, t: &ThreadArgs, from: u32, to: u32) {
    const SECCOMP_SET_MODE_FILTER: u64 = 1;
    let base = args as *const RestorerArgs as u64;
    let mut at = base + t.seccomp_off;
    for i in 0..to.min(t.nr_seccomp_filters) {
        // SAFETY: crust wrote the filter records at seccomp_off.
        let hdr = unsafe { *(at as *const SeccompFilterHdr) };
        let insns = at + core::mem::size_of::<SeccompFilterHdr>() as u64;
        if i >= from {
            // struct sock_fprog: a u16 length, then the program's address.
            let prog: [u64; 2] = [hdr.len as u64, insns];
            // SAFETY: seccomp reads the sock_fprog and the program it points to.
            let r = unsafe {
                syscall4(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, hdr.flags as u64, prog.as_ptr() as u64, 0)
            };
            check(args, RSTEP_SECCOMP, r);
        }
        at = insns + hdr.len as u64 * 8;
    }
}

/// Attaches a SysV shm segment (crust made sure it exists) where it was.
fn attach_shm(args: &RestorerArgs, v: &VmaMove) {
    const SHM_RDONLY: u64 = 0o10000;
    const SHM_EXEC: u64 = 0o100000;
    let mut flags = 0;
    if v.prot & 2 == 0 {
        flags |= SHM_RDONLY;
    }
    if v.prot & 4 != 0 {
        flags |= SHM_EXEC;
    }
    // SAFETY: maps the segment at its dumped address, which lies outside
    // the hole and is free since everything outside the hole was unmapped.
    let r = unsafe { syscall4(SYS_SHMAT, v.shmid as u64, v.dst, flags, 0) };
    check(args, RSTEP_SHMAT, r);
    if r as u64 != v.dst {
        fail(args, RSTEP_SHMAT, -22);
    }
}

/// Installs the guard regions that lie in VMA `v` (before its mlock: a
/// locked VMA refuses them).
fn install_guards(args: &RestorerArgs, base: u64, v: &VmaMove) {
    const MADV_GUARD_INSTALL: u64 = 102;
    let guards = (base + args.guards_off) as *const IoVec;
    for i in 0..args.nr_guards as usize {
        // SAFETY: crust wrote nr_guards entries at guards_off.
        let g = unsafe { *guards.add(i) };
        if g.base >= v.dst && g.base < v.dst + v.len {
            // SAFETY: madvise on a range of the VMA just moved into place.
            let r = unsafe { syscall4(SYS_MADVISE, g.base, g.len, MADV_GUARD_INSTALL, 0) };
            check(args, RSTEP_GUARD, r);
        }
    }
}

/// Registers VMA `v`, just moved into place, with the lazy restore's
/// userfaultfd for missing pages: a fault in it waits for the lazy-pages
/// daemon, which copies the page in. Registered here and not where it was
/// premapped: the move would carry the registration only with remap events
/// for the daemon to follow.
fn register_lazy(args: &RestorerArgs, v: &VmaMove) {
    const UFFDIO_REGISTER: u64 = 0xc020_aa00;
    const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
    // struct uffdio_register: start, len, mode, ioctls (written back).
    let mut reg: [u64; 4] = [v.dst, v.len, UFFDIO_REGISTER_MODE_MISSING, 0];
    // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register on our stack.
    let r = unsafe { syscall4(SYS_IOCTL, args.uffd as u64, UFFDIO_REGISTER, reg.as_mut_ptr() as u64, 0) };
    check(args, RSTEP_UFFD, r);
}

/// Gives a VMA back its madvise() state and its mlock (crust's privileges
/// still hold here, so the lock is not limited by RLIMIT_MEMLOCK).
fn restore_vma_advice(args: &RestorerArgs, v: &VmaMove) {
    for (bit, _, advice) in VMA_ADVICE {
        if v.advice & bit != 0 && advice != 0 {
            // SAFETY: madvise on the VMA just moved into place.
            let r = unsafe { syscall4(SYS_MADVISE, v.dst, v.len, advice, 0) };
            check(args, RSTEP_MADVISE, r);
        }
    }
    if v.advice & (VMA_ADV_LOCKED | VMA_ADV_LOCKONFAULT) != 0 {
        const MLOCK_ONFAULT: u64 = 1;
        let flags = if v.advice & VMA_ADV_LOCKONFAULT != 0 { MLOCK_ONFAULT } else { 0 };
        // SAFETY: mlock2 of the VMA just moved into place.
        let r = unsafe { syscall4(SYS_MLOCK2, v.dst, v.len, flags, 0) };
        check(args, RSTEP_MADVISE, r);
    }
}

/// Recreates the POSIX timers with their ids (PR_TIMER_CREATE_RESTORE_IDS:
/// timer_create takes the id it is given). Every thread exists by now, so a
/// timer that signals one thread finds it.
fn restore_posix_timers(args: &RestorerArgs) {
    let nr = args.nr_posix_timers as usize;
    if nr == 0 {
        return;
    }
    // SAFETY: a prctl with integer arguments.
    let r = unsafe { syscall2(SYS_PRCTL, PR_TIMER_CREATE_RESTORE_IDS, 1) };
    check(args, RSTEP_POSIX_TIMER, r);
    for t in &args.posix_timers[..nr.min(MAX_POSIX_TIMERS)] {
        let sev = KSigEvent {
            value: t.sigev_value,
            signo: t.signo,
            notify: t.notify,
            tid: t.notify_tid,
            _pad: [0; 11],
        };
        let mut id = t.id;
        // SAFETY: timer_create reads one sigevent and reads/writes the id.
        let r = unsafe {
            syscall4(SYS_TIMER_CREATE, t.clock as u64, &sev as *const _ as u64, &mut id as *mut i32 as u64, 0)
        };
        check(args, RSTEP_POSIX_TIMER, r);
        if id != t.id {
            fail(args, RSTEP_POSIX_TIMER, -16);
        }
        // SAFETY: timer_settime reads one itimerspec (relative time).
        let r = unsafe { syscall4(SYS_TIMER_SETTIME, id as u64, 0, &t.spec as *const _ as u64, 0) };
        check(args, RSTEP_POSIX_TIMER, r);
    }
    // SAFETY: as above.
    let r = unsafe { syscall2(SYS_PRCTL, PR_TIMER_CREATE_RESTORE_IDS, 0) };
    check(args, RSTEP_POSIX_TIMER, r);
}

fn restore_creds(args: &RestorerArgs, c: &RestoreCreds) {
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const PR_CAPBSET_DROP: u64 = 24;
    const PR_CAP_AMBIENT: u64 = 47;
    const PR_CAP_AMBIENT_RAISE: u64 = 2;
    for cap in 0..64u64 {
        if c.cap_bnd & (1 << cap) == 0 {
            // SAFETY: prctl with integer arguments. Capabilities this kernel
            // does not know fail with EINVAL, which is fine.
            let r = unsafe { syscall2(SYS_PRCTL, PR_CAPBSET_DROP, cap) };
            if r < 0 && r != -22 {
                fail(args, RSTEP_CREDS, r);
            }
        }
    }
    // SAFETY: each call reads only the values passed.
    unsafe {
        check(args, RSTEP_CREDS, syscall2(SYS_SETGROUPS, c.ngroups as u64, c.groups.as_ptr() as u64));
        check(args, RSTEP_CREDS, syscall4(SYS_SETRESGID, c.gid[0] as u64, c.gid[1] as u64, c.gid[2] as u64, 0));
        syscall2(SYS_SETFSGID, c.fsgid as u64, 0);
        check(args, RSTEP_CREDS, syscall4(SYS_SETRESUID, c.uid[0] as u64, c.uid[1] as u64, c.uid[2] as u64, 0));
        syscall2(SYS_SETFSUID, c.fsuid as u64, 0);
    }
    let hdr = CapHeader { version: 0x2008_0522, pid: 0 };
    let data = [
        CapData { effective: c.cap_eff as u32, permitted: c.cap_prm as u32, inheritable: c.cap_inh as u32 },
        CapData {
            effective: (c.cap_eff >> 32) as u32,
            permitted: (c.cap_prm >> 32) as u32,
            inheritable: (c.cap_inh >> 32) as u32,
        },
    ];
    // SAFETY: capset reads the header and two data words.
    let r = unsafe { syscall2(SYS_CAPSET, &hdr as *const _ as u64, data.as_ptr() as u64) };
    check(args, RSTEP_CREDS, r);
    for cap in 0..64u64 {
        if c.cap_amb & (1 << cap) != 0 {
            // SAFETY: prctl with integer arguments.
            let r = unsafe { syscall6(SYS_PRCTL, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0, 0) };
            check(args, RSTEP_CREDS, r);
        }
    }
}

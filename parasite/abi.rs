//! The ABI shared by crust and its two blobs (parasite and restorer).
//!
//! This file is compiled three times: into crust (as `crate::abi`), into the
//! parasite blob and into the restorer blob. Everything here is `#[repr(C)]`
//! plain data with no pointers that outlive one address space: addresses are
//! plain `u64`s, valid in the task the blob runs in.

#![allow(dead_code)]

pub const PAGE_SIZE: u64 = 4096;

/// Number of signals the kernel knows (1..=64).
pub const NSIG: usize = 64;
/// RLIMIT_NLIMITS on x86-64.
pub const NR_RLIMITS: usize = 16;

/// Most iovecs one `PARASITE_CMD_DUMP_PAGES` takes, for all its pipes.
pub const MAX_IOVS: usize = 4096;
/// Most iovecs one vmsplice call takes (UIO_MAXIOV).
pub const VMSPLICE_MAX_IOVS: usize = 1024;
/// Most page pipes a parasite holds: crust drains some while the parasite
/// fills others.
pub const MAX_PAGE_PIPES: usize = 16;

// ---- parasite commands -------------------------------------------------

/// Create the link to crust (`ParasiteCtl::link`), a socketpair whose one
/// end crust takes (pidfd_getfd) and the parasite then closes: every later
/// command runs free and ends on that link (see `ParasiteCtl::free_run`).
pub const PARASITE_CMD_INIT: u64 = 1;
/// Fill page pipes: for each of `ParasiteCtl::fills[..nr_fills]`, checksum
/// its iovecs (the next `nr_iovs` of `ParasiteCtl::iovs`) and `vmsplice`
/// them into its pipe, which crust emptied. Returns the bytes spliced in all.
pub const PARASITE_CMD_DUMP_PAGES: u64 = 2;
/// Fill `ParasiteCtl::misc` with the state only the task can read about itself.
pub const PARASITE_CMD_GET_MISC: u64 = 3;
/// Close the page pipes and the link.
pub const PARASITE_CMD_FINI: u64 = 4;
/// Fill the settings and overrun of `ParasiteCtl::timers[..nr_timers]`
/// (whose ids crust filled in).
pub const PARASITE_CMD_GET_TIMERS: u64 = 5;
/// Create `ParasiteCtl::nr_pipes` page pipes (crust sizes them).
pub const PARASITE_CMD_PIPES: u64 = 6;
/// `PARASITE_CMD_DUMP_PAGES` over and over in one free command, talking
/// on the link: after each batch (its result in `ParasiteCtl::ret`) the
/// parasite sends `LINK_BATCH_DONE` and reads crust's answer,
/// `LINK_NEXT_BATCH` when crust has put the next batch in place, anything
/// else (`LINK_QUIT`, or the link broken) to end. A batch costs two bytes
/// on the link instead of a command's ptrace stops. Returns 0; or, ended
/// with `LINK_FINISH`, does `PARASITE_CMD_FINI`'s work as well (the
/// stream was the parasite's last command) and returns `STREAM_FINISHED`.
pub const PARASITE_CMD_DUMP_PAGES_STREAM: u64 = 7;
/// `PARASITE_CMD_GET_MISC`'s per-thread part only (`MiscState`'s
/// sigaltstack, tid_address and first five prctl values), for threads
/// other than the one that read the process-wide state.
pub const PARASITE_CMD_GET_THREAD_MISC: u64 = 8;

/// Bytes on the link. The parasite: a free command is done (then it waits
/// for crust's answer before its rt_sigreturn), a stream's batch is done.
pub const LINK_CMD_DONE: u8 = 1;
pub const LINK_BATCH_DONE: u8 = 2;
/// crust, in a stream: the next batch is in place; the stream is over.
pub const LINK_NEXT_BATCH: u8 = b'b';
pub const LINK_QUIT: u8 = b'q';
pub const LINK_FINISH: u8 = b'f';
/// What `PARASITE_CMD_DUMP_PAGES_STREAM` returns when `LINK_FINISH` ended it.
pub const STREAM_FINISHED: i64 = 1;

/// prctl that makes timer_create take the id it is given (Linux 6.15);
/// argument 0 off, 1 on, 2 query.
pub const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;

/// Most POSIX timers crust carries per process.
pub const MAX_POSIX_TIMERS: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IoVec {
    pub base: u64,
    pub len: u64,
}

/// One page pipe to fill in a `PARASITE_CMD_DUMP_PAGES`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct PipeFill {
    /// Index into `ParasiteCtl::pipes`.
    pub pipe: u32,
    /// Its iovecs: the next ones in `ParasiteCtl::iovs`.
    pub nr_iovs: u32,
    /// Bytes those iovecs name.
    pub len: u64,
    /// Back from the parasite: bytes spliced into the pipe, and their CRC-32.
    pub done: u64,
    pub crc: u32,
    pub _pad: u32,
}

/// The kernel's `struct sigaction` as rt_sigaction(2) takes it on x86-64.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct KSigAction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct ITimerVal {
    pub interval_sec: i64,
    pub interval_usec: i64,
    pub value_sec: i64,
    pub value_usec: i64,
}

/// The kernel's `struct itimerspec`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct ITimerSpec {
    pub interval_sec: i64,
    pub interval_nsec: i64,
    pub value_sec: i64,
    pub value_nsec: i64,
}

/// One POSIX timer. crust fills in how it notifies (from /proc/PID/timers),
/// the parasite its settings (timer_gettime) and overrun.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct PosixTimer {
    pub id: i32,
    pub clock: i32,
    /// sigev_notify: SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD, | SIGEV_THREAD_ID.
    pub notify: i32,
    pub signo: i32,
    /// The thread signalled, for SIGEV_THREAD_ID.
    pub notify_tid: i32,
    pub overrun: i32,
    pub sigev_value: u64,
    pub spec: ITimerSpec,
}

/// The kernel's `struct sigevent` (64 bytes on x86-64).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct KSigEvent {
    pub value: u64,
    pub signo: i32,
    pub notify: i32,
    pub tid: i32,
    pub _pad: [i32; 11],
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct SigAltStack {
    pub sp: u64,
    pub flags: i32,
    pub _pad: i32,
    pub size: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct RLimit {
    pub cur: u64,
    pub max: u64,
}

/// State the parasite reads from inside the task.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MiscState {
    /// Index i holds signal i+1.
    pub sigactions: [KSigAction; NSIG],
    pub itimers: [ITimerVal; 3],
    pub sigaltstack: SigAltStack,
    pub rlimits: [RLimit; NR_RLIMITS],
    pub tid_address: u64,
    /// The program break, brk(0); /proc shows only its page-aligned VMA end.
    pub brk: u64,
    // prctl state; the first five are per thread.
    pub timer_slack: u64,
    pub no_new_privs: i32,
    pub securebits: i32,
    pub pdeath_signal: i32,
    pub mce_kill: i32,
    pub dumpable: i32,
    pub child_subreaper: i32,
    pub thp_disable: i32,
    /// membarrier(MEMBARRIER_CMD_GET_REGISTRATIONS), or a negative errno.
    pub membarrier: i32,
    /// Bitmask of the sigactions that could be read.
    pub sigactions_ok: u64,
}

/// The control block at a fixed offset in the parasite region: crust writes
/// a command and its arguments, runs the parasite, and reads the reply here.
#[repr(C)]
pub struct ParasiteCtl {
    pub cmd: u64,
    /// Address of the ucontext of the rt_sigframe crust built with the
    /// task's own state: every command ends with rt_sigreturn through it,
    /// so the task is itself again even if crust died meanwhile.
    pub sigframe_uc: u64,
    /// Set by crust when it built a new frame: the parasite then fills in
    /// the frame's alternate signal stack (rt_sigreturn sets it again), once.
    pub fresh_frame: u64,
    /// The command runs free (PTRACE_CONT, no stop per system call) and
    /// ends with a handshake on the link: the parasite sends one byte when
    /// done and reads one back before its rt_sigreturn. crust, woken by the
    /// first, stops the thread (PTRACE_INTERRUPT) and puts its own state
    /// back itself, as the rt_sigreturn would; after the last command
    /// (which closes the link once answered) it sends the second and
    /// traces the rest to the rt_sigreturn's entry, where it does the same
    /// and the call is skipped. With crust gone the read ends at once (crust held
    /// the link's only other end), and the thread returns into its own
    /// code. Never waits on anything but crust.
    pub free_run: u64,
    /// The parasite's end of the link and crust's (-1 once the parasite
    /// closed its copy, which it does first thing in a free command).
    pub link: [i32; 2],
    /// Zero or positive on success, `-errno` on failure.
    pub ret: i64,
    pub nr_pipes: u64,
    /// Read and write ends of each page pipe; -1 for none.
    pub pipes: [[i32; 2]; MAX_PAGE_PIPES],
    /// DUMP_PAGES: the pipes to fill and, one after the other, their iovecs.
    pub nr_fills: u64,
    pub fills: [PipeFill; MAX_PAGE_PIPES],
    pub iovs: [IoVec; MAX_IOVS],
    pub misc: MiscState,
    pub nr_timers: u64,
    pub timers: [PosixTimer; MAX_POSIX_TIMERS],
}

/// membarrier(2) command that reports the process's registrations (6.3).
pub const MEMBARRIER_CMD_GET_REGISTRATIONS: u64 = 1 << 9;

// ---- restorer ----------------------------------------------------------

/// One premapped VMA the restorer moves into place.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct VmaMove {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
    pub prot: u64,
    /// `VMA_ADV_*` bits: the madvise/mlock state to give it back.
    pub advice: u64,
    /// A SysV shm segment to attach at `dst` instead of a premapped VMA
    /// to move there (`src` unused); -1 for none.
    pub shmid: i64,
}

/// madvise()/mlock() state of a VMA (smaps VmFlags), as `VmaMove::advice`
/// bits; the restorer applies `VMA_ADVICE` in order, then the locks.
pub const VMA_ADV_DONTFORK: u64 = 1 << 0;
pub const VMA_ADV_WIPEONFORK: u64 = 1 << 1;
pub const VMA_ADV_HUGEPAGE: u64 = 1 << 2;
pub const VMA_ADV_NOHUGEPAGE: u64 = 1 << 3;
pub const VMA_ADV_DONTDUMP: u64 = 1 << 4;
pub const VMA_ADV_MERGEABLE: u64 = 1 << 5;
pub const VMA_ADV_LOCKED: u64 = 1 << 6;
pub const VMA_ADV_LOCKONFAULT: u64 = 1 << 7;
pub const VMA_ADV_SEQUENTIAL: u64 = 1 << 8;
pub const VMA_ADV_RANDOM: u64 = 1 << 9;
/// Not an advice of the dumped VMA: the restorer registers the VMA, once
/// in place, with `RestorerArgs::uffd` for missing pages (lazy restore:
/// the lazy-pages daemon fills it).
pub const VMA_ADV_LAZY: u64 = 1 << 63;

/// (advice bit, smaps VmFlags mnemonic, madvise advice; 0 for the locks).
pub const VMA_ADVICE: [(u64, &str, u64); 10] = [
    (VMA_ADV_SEQUENTIAL, "sr", 2),
    (VMA_ADV_RANDOM, "rr", 1),
    (VMA_ADV_DONTFORK, "dc", 10),
    (VMA_ADV_WIPEONFORK, "wf", 18),
    (VMA_ADV_HUGEPAGE, "hg", 14),
    (VMA_ADV_NOHUGEPAGE, "nh", 15),
    (VMA_ADV_DONTDUMP, "dd", 16),
    (VMA_ADV_MERGEABLE, "mg", 12),
    (VMA_ADV_LOCKED, "lo", 0),
    (VMA_ADV_LOCKONFAULT, "lf", 0),
];

/// The kernel's `struct prctl_mm_map` (PR_SET_MM_MAP).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct PrctlMmMap {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: u64,
    pub auxv_size: u32,
    pub exe_fd: u32,
}

pub const MAX_AUXV: usize = 128;
pub const MAX_GROUPS: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RestoreCreds {
    pub uid: [u32; 3],
    pub gid: [u32; 3],
    pub fsuid: u32,
    pub fsgid: u32,
    pub ngroups: u32,
    pub groups: [u32; MAX_GROUPS],
    pub cap_eff: u64,
    pub cap_prm: u64,
    pub cap_inh: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct RseqConf {
    pub addr: u64,
    pub len: u32,
    pub sig: u32,
}

/// Bytes of the record the restorer writes to `status_fd` when a step
/// fails: the step, the errno and the PID, three little-endian i32s.
pub const RESTORER_FAILURE_LEN: usize = 12;

/// Restorer steps, reported with the errno through `status_fd` when one fails.
pub const RSTEP_UNMAP: u32 = 1;
pub const RSTEP_MREMAP: u32 = 2;
pub const RSTEP_MPROTECT: u32 = 3;
pub const RSTEP_VDSO: u32 = 4;
pub const RSTEP_MM_MAP: u32 = 5;
pub const RSTEP_SIGACTION: u32 = 6;
pub const RSTEP_RSEQ: u32 = 7;
pub const RSTEP_FSBASE: u32 = 8;
pub const RSTEP_CREDS: u32 = 9;
pub const RSTEP_ITIMER: u32 = 10;
pub const RSTEP_THREAD: u32 = 11;
pub const RSTEP_SCHED: u32 = 12;
pub const RSTEP_SIGQUEUE: u32 = 13;
pub const RSTEP_POSIX_TIMER: u32 = 14;
pub const RSTEP_MADVISE: u32 = 15;
pub const RSTEP_SECCOMP: u32 = 16;
pub const RSTEP_SHMAT: u32 = 17;
pub const RSTEP_GUARD: u32 = 18;
pub const RSTEP_UFFD: u32 = 19;

pub fn restorer_step_name(step: u32) -> &'static str {
    match step {
        RSTEP_UNMAP => "unmapping crust's memory",
        RSTEP_MREMAP => "moving a premapped VMA into place",
        RSTEP_MPROTECT => "setting a VMA's protection",
        RSTEP_VDSO => "mapping the vDSO",
        RSTEP_MM_MAP => "PR_SET_MM_MAP",
        RSTEP_SIGACTION => "restoring signal handlers",
        RSTEP_RSEQ => "registering rseq",
        RSTEP_FSBASE => "setting fs/gs base",
        RSTEP_CREDS => "restoring credentials",
        RSTEP_ITIMER => "restoring interval timers",
        RSTEP_THREAD => "creating a thread with its TID",
        RSTEP_SCHED => "restoring the scheduling policy",
        RSTEP_SIGQUEUE => "queueing pending signals",
        RSTEP_POSIX_TIMER => "recreating POSIX timers with their ids",
        RSTEP_MADVISE => "restoring a VMA's madvise/mlock state",
        RSTEP_SECCOMP => "installing seccomp filters",
        RSTEP_SHMAT => "attaching a SysV shared memory segment",
        RSTEP_GUARD => "installing a guard region",
        RSTEP_UFFD => "registering a lazy VMA with the userfaultfd",
        _ => "unknown step",
    }
}

/// Everything the restorer needs, placed in the hole by crust before the jump.
/// `vmas_off` and `sigframe_off` are offsets from the start of this struct.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RestorerArgs {
    pub hole_start: u64,
    pub hole_end: u64,
    pub vmas_off: u64,
    pub nr_vmas: u64,
    /// Address where the vDSO data pages start, 0 when the task had none.
    pub vdso_addr: u64,
    pub mm_map: PrctlMmMap,
    pub auxv: [u64; MAX_AUXV],
    pub status_fd: i32,
    /// crust's log, moved out of the task's way; closed with status_fd.
    pub log_fd: i32,
    pub dumpable: i32,
    pub child_subreaper: i32,
    pub thp_disable: i32,
    /// The first `nr_seccomp_shared` seccomp filters of every thread's
    /// chain are the same: the leader installs them (its own records)
    /// before it creates the other threads, which inherit them as one
    /// chain, as threads that shared it at the dump did; each thread then
    /// installs the rest of its own chain.
    pub nr_seccomp_shared: u32,
    pub sigactions: [KSigAction; NSIG],
    pub sigactions_ok: u64,
    pub itimers: [ITimerVal; 3],
    /// The thread running the restorer (the leader): what is its own.
    pub leader: ThreadArgs,
    /// Signals to queue to the whole process (siginfo records, as above).
    pub shared_pending_off: u64,
    pub nr_shared_pending: u64,
    /// The other threads: `nr_threads` `ThreadArgs` at `threads_off`.
    pub threads_off: u64,
    pub nr_threads: u64,
    /// Counts the threads that are done; the main thread waits for all
    /// before it closes the status pipe (a futex word).
    pub threads_done: u32,
    pub _pad: u32,
    /// mlockall() flags for future mappings (MCL_FUTURE | MCL_ONFAULT), 0 for none.
    pub mlockall: u64,
    /// Guard regions to install again (MADV_GUARD_INSTALL): `nr_guards`
    /// `IoVec`s at `guards_off` from the start of this struct, each inside
    /// one VMA's final place.
    pub guards_off: u64,
    pub nr_guards: u64,
    /// POSIX timers, created with their ids once every thread exists.
    pub nr_posix_timers: u64,
    pub posix_timers: [PosixTimer; MAX_POSIX_TIMERS],
    /// Lazy restore: the userfaultfd the VMAs with `VMA_ADV_LAZY` are
    /// registered with once in place (the lazy-pages daemon holds its
    /// copy); closed at the end. -1 without.
    pub uffd: i64,
}

/// What a thread other than the leader restores of its own. The restorer
/// creates it with clone3(set_tid) on the stack below `stack_top`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ThreadArgs {
    /// Address of the process's `RestorerArgs`.
    pub args: u64,
    pub tid: i32,
    pub has_rseq: u32,
    pub rseq: RseqConf,
    pub fs_base: u64,
    pub gs_base: u64,
    pub tid_address: u64,
    pub robust_list: u64,
    pub robust_len: u64,
    pub creds: RestoreCreds,
    /// Address of the thread's ucontext in its prebuilt rt_sigframe.
    pub sigframe_uc: u64,
    pub stack_top: u64,
    pub stack_size: u64,
    /// The thread's name, NUL-terminated.
    pub comm: [u8; 16],
    pub sched_policy: i32,
    pub sched_priority: i32,
    pub nice: i32,
    pub no_new_privs: i32,
    pub securebits: i32,
    pub pdeath_signal: i32,
    pub mce_kill: i32,
    pub nr_affinity: u32,
    pub affinity: [u64; MAX_CPU_WORDS],
    pub timer_slack: u64,
    /// Signals to queue to this thread: `nr_pending` 128-byte siginfo
    /// records at `pending_off` from the start of `RestorerArgs`.
    pub pending_off: u64,
    pub nr_pending: u64,
    /// Seccomp mode (0 none, 1 strict, 2 filters), and for filters
    /// `nr_seccomp_filters` records at `seccomp_off` from the start of
    /// `RestorerArgs`, oldest first: a `SeccompFilterHdr`, then `len`
    /// 8-byte instructions.
    pub seccomp_mode: u32,
    pub nr_seccomp_filters: u32,
    pub seccomp_off: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct SeccompFilterHdr {
    pub flags: u32,
    /// Instructions that follow.
    pub len: u32,
}

/// CPU affinity words carried per thread (64 CPUs each).
pub const MAX_CPU_WORDS: usize = 16;

/// The kernel's `struct clone_args` (clone3).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

// ---- the rt_sigframe the restorer returns through -----------------------

pub const UC_FP_XSTATE: u64 = 0x1;
pub const UC_SIGCONTEXT_SS: u64 = 0x2;
pub const UC_STRICT_RESTORE_SS: u64 = 0x4;
pub const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
pub const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
/// Offset of the software-reserved bytes inside the FXSAVE area.
pub const FXSAVE_SW_RESERVED_OFF: usize = 464;

/// `struct sigcontext` of x86-64.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct SigContext {
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub rdx: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rsp: u64,
    pub rip: u64,
    pub eflags: u64,
    pub cs: u16,
    pub gs: u16,
    pub fs: u16,
    pub ss: u16,
    pub err: u64,
    pub trapno: u64,
    pub oldmask: u64,
    pub cr2: u64,
    pub fpstate: u64,
    pub reserved1: [u64; 8],
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct StackT {
    pub ss_sp: u64,
    pub ss_flags: i32,
    pub _pad: i32,
    pub ss_size: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct UContext {
    pub uc_flags: u64,
    pub uc_link: u64,
    pub uc_stack: StackT,
    pub uc_mcontext: SigContext,
    pub uc_sigmask: u64,
}

/// `struct rt_sigframe` of x86-64 without the trailing FPU state; rt_sigreturn
/// reads it at `rsp - 8`, so the restorer jumps with rsp = &frame.uc.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct RtSigFrame {
    pub pretcode: u64,
    pub uc: UContext,
    pub info: [u64; 16],
}

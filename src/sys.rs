//! Thin, checked wrappers over the system calls crust makes that nix does not
//! cover. Every `unsafe` block of the dump/restore engine outside the remote
//! code paths lives here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Result, bail};
use nix::unistd::Pid;

pub const NT_X86_XSTATE: usize = 0x202;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The XSAVE area of a stopped tracee.
pub fn get_xstate(pid: Pid) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 16384];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: the kernel writes at most iov_len bytes into buf and updates iov_len.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            pid.as_raw(),
            NT_X86_XSTATE,
            &mut iov as *mut libc::iovec,
        )
    })?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

pub fn set_xstate(pid: Pid, xstate: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: xstate.as_ptr() as *mut _,
        iov_len: xstate.len(),
    };
    // SAFETY: the kernel only reads iov_len bytes from the buffer.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            pid.as_raw(),
            NT_X86_XSTATE,
            &mut iov as *mut libc::iovec,
        )
    })?;
    Ok(())
}

pub fn get_sigmask(pid: Pid) -> io::Result<u64> {
    let mut mask = 0u64;
    // SAFETY: PTRACE_GETSIGMASK writes 8 bytes into mask.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_GETSIGMASK,
            pid.as_raw(),
            8usize,
            &mut mask as *mut u64,
        )
    })?;
    Ok(mask)
}

pub fn set_sigmask(pid: Pid, mask: u64) -> io::Result<()> {
    // SAFETY: PTRACE_SETSIGMASK reads 8 bytes from mask.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_SETSIGMASK,
            pid.as_raw(),
            8usize,
            &mask as *const u64,
        )
    })?;
    Ok(())
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct RseqConfiguration {
    pub rseq_abi_pointer: u64,
    pub rseq_abi_size: u32,
    pub signature: u32,
    pub flags: u32,
    pub pad: u32,
}

pub fn get_rseq_conf(pid: Pid) -> io::Result<RseqConfiguration> {
    let mut conf = RseqConfiguration::default();
    // SAFETY: the kernel writes at most the given size into conf.
    check(unsafe {
        libc::ptrace(
            PTRACE_GET_RSEQ_CONFIGURATION,
            pid.as_raw(),
            std::mem::size_of::<RseqConfiguration>(),
            &mut conf as *mut RseqConfiguration,
        )
    })?;
    Ok(conf)
}

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// fork(2) with a chosen PID. Returns 0 in the child, the PID in the parent.
/// The caller must be single-threaded: the child is a copy of this thread only.
/// Uses clone3 with set_tid, and /proc/sys/kernel/ns_last_pid where the
/// kernel's clone3 lacks it (or `CRUST_NO_CLONE3` is set, which tests use to
/// cover that path).
pub fn fork_with_pid(pid: i32) -> io::Result<i32> {
    fork_with_pid_sharing(pid, 0)
}

/// `fork_with_pid`, the child sharing with this process what `share`
/// names: CLONE_FILES (the fd table), CLONE_FS (cwd, root, umask).
pub fn fork_with_pid_sharing(pid: i32, share: u64) -> io::Result<i32> {
    debug_assert_eq!(share & !((libc::CLONE_FILES | libc::CLONE_FS) as u64), 0);
    // A PID can stay taken for a moment after its process is gone: as the
    // group or session id of exiting processes that init has not reaped yet.
    let t = std::time::Instant::now();
    loop {
        match fork_with_pid_once(pid, share) {
            Err(e)
                if e.raw_os_error() == Some(libc::EEXIST)
                    && t.elapsed() < std::time::Duration::from_secs(5) =>
            {
                if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    return Err(e);
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

fn fork_with_pid_once(pid: i32, share: u64) -> io::Result<i32> {
    if std::env::var_os("CRUST_NO_CLONE3").is_none() {
        match clone3_with_pid(pid, share) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::E2BIG)) => {}
            r => return r,
        }
    }
    fork_via_ns_last_pid(pid, share)
}

/// The pre-clone3 way: write PID-1 to ns_last_pid and fork. Racy against
/// any other fork on the system, so it is serialized with other users of
/// the file by an flock and the result is checked.
fn fork_via_ns_last_pid(pid: i32, share: u64) -> io::Result<i32> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/sys/kernel/ns_last_pid")?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return Err(io::Error::from_raw_os_error(libc::EEXIST));
    }
    f.write_all(format!("{}", pid - 1).as_bytes())?;
    let got = if share == 0 {
        // SAFETY: fork of a single-threaded process.
        unsafe { libc::fork() }
    } else {
        // SAFETY: clone without CLONE_VM and without a new stack is a fork
        // (the child runs on its copy of this stack); crust is single-threaded.
        unsafe {
            libc::syscall(libc::SYS_clone, share | libc::SIGCHLD as u64, 0, 0, 0, 0) as libc::pid_t
        }
    };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    if got == 0 && share & libc::CLONE_FILES as u64 != 0 {
        // The parent's fd, in the table they share: the parent closes it.
        // Closed here too, its number could go to the child's next fd
        // before the parent's close.
        std::mem::forget(f);
        return Ok(0);
    }
    if got != 0 && got != pid {
        // Someone else forked in between and took the PID.
        // SAFETY: kill and reap the child we just made.
        unsafe {
            libc::kill(got, libc::SIGKILL);
            libc::waitpid(got, std::ptr::null_mut(), 0);
        }
        return Err(io::Error::from_raw_os_error(libc::EEXIST));
    }
    Ok(got)
}

fn clone3_with_pid(pid: i32, share: u64) -> io::Result<i32> {
    let tids = [pid];
    let args = CloneArgs {
        flags: share,
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tids.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    clone3(&args)
}

/// Like `fork_with_pid`, but the child is crust's sibling: a child of
/// crust's parent (CLONE_PARENT), for `restore --restore-sibling`.
pub fn fork_sibling_with_pid(pid: i32) -> io::Result<i32> {
    let tids = [pid];
    let args = CloneArgs {
        flags: libc::CLONE_PARENT as u64,
        // A CLONE_PARENT child's exit is signalled to its parent, crust's.
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tids.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    clone3(&args)
}

/// fork(2) through clone3 with `args` (no CLONE_VM). 0 in the child.
fn clone3(args: &CloneArgs) -> io::Result<i32> {
    debug_assert_eq!(args.flags & libc::CLONE_VM as u64, 0);
    // SAFETY: clone3 without CLONE_VM behaves like fork; crust is single-threaded.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    Ok(check(r)? as i32)
}

/// Sleeps while the shared word `word` holds `val`, at most `timeout`
/// (FUTEX_WAIT, not private: the word lies in memory processes share).
/// Returns on a wake, a change, a signal or the timeout alike.
pub fn futex_wait(word: &std::sync::atomic::AtomicU32, val: u32, timeout: std::time::Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: the kernel reads the word and the timespec, both live here.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            val,
            &ts as *const libc::timespec,
        )
    };
}

/// Wakes every process sleeping on the shared word `word`.
pub fn futex_wake_all(word: &std::sync::atomic::AtomicU32) {
    // SAFETY: FUTEX_WAKE only uses the word's address.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
}

/// A pidfd for process `pid`.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    pidfd_open_flags(pid, 0)
}

/// process_mrelease(2) (Linux 5.15): frees the memory of a process that is
/// being killed, from the caller, while the process exits.
pub fn process_mrelease(pidfd: &OwnedFd) -> io::Result<()> {
    // SAFETY: the syscall takes an fd and flags, no memory.
    let r = unsafe { libc::syscall(libc::SYS_process_mrelease, pidfd.as_raw_fd(), 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// pidfd_open with PIDFD_NONBLOCK / PIDFD_THREAD.
pub fn pidfd_open_flags(pid: i32, flags: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open returns a new fd or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, flags) };
    // SAFETY: r is a new fd owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(check(r)? as RawFd) })
}

/// Sends `sig` to the process a pidfd refers to.
pub fn pidfd_send_signal(pidfd: &OwnedFd, sig: i32) -> io::Result<()> {
    // SAFETY: no siginfo is passed; the kernel reads no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    check(r).map(drop)
}

/// The task's fd `fd`, duplicated into crust: the same open file
/// description, for fcntl and ioctl calls that only work on an fd.
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd returns a new fd or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    // SAFETY: r is a new fd owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(check(r)? as RawFd) })
}

/// Forks a child that is PID 1 of a new PID namespace.
pub fn fork_into_new_pid_ns() -> io::Result<i32> {
    let args = CloneArgs {
        flags: libc::CLONE_NEWPID as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    clone3(&args)
}

/// fallocate(2): `mode` over `[off, off+len)` of the file `fd`.
pub fn fallocate(fd: RawFd, mode: i32, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate(2) takes no pointers; a bad fd is an error.
    let rc = unsafe { libc::fallocate(fd, mode, off as i64, len as i64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// splice(2) from a pipe into a file at the file's current offset.
/// Reads exactly `buf.len()` bytes from `from` (a pipe) into `buf`.
pub fn read_all(from: RawFd, buf: &mut [u8]) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        // SAFETY: read into the rest of `buf`, which is ours meanwhile.
        let n = unsafe { libc::read(from, buf[at..].as_mut_ptr().cast(), buf.len() - at) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "page pipe closed",
            ));
        }
        at += n as usize;
    }
    Ok(())
}

pub fn splice_all(from: RawFd, to: RawFd, mut len: usize) -> io::Result<()> {
    while len > 0 {
        // SAFETY: plain fd-to-fd splice, no user memory involved.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "page pipe closed",
            ));
        }
        len -= n as usize;
    }
    Ok(())
}

/// Unregisters this thread's rseq area, which glibc registered; the kernel
/// would otherwise write into crust's TLS after it is unmapped.
pub fn unregister_own_rseq() -> Result<()> {
    let conf = get_own_rseq()?;
    if conf.rseq_abi_pointer == 0 {
        return Ok(());
    }
    const RSEQ_FLAG_UNREGISTER: u64 = 1;
    // glibc registered either 32 bytes or its feature size; the kernel wants
    // the same length back.
    for len in [32, conf.rseq_abi_size] {
        // SAFETY: unregisters the area glibc registered for this thread.
        let r = unsafe {
            libc::syscall(
                libc::SYS_rseq,
                conf.rseq_abi_pointer,
                len,
                RSEQ_FLAG_UNREGISTER,
                conf.signature,
            )
        };
        if r == 0 {
            return Ok(());
        }
    }
    bail!(
        "unregistering crust's own rseq area: {}",
        io::Error::last_os_error()
    )
}

unsafe extern "C" {
    static __rseq_offset: isize;
    static __rseq_size: u32;
}

fn get_own_rseq() -> Result<RseqConfiguration> {
    // SAFETY: glibc (2.35+) exports these read-only symbols.
    let (off, size) = unsafe { (__rseq_offset, __rseq_size) };
    if size == 0 {
        return Ok(RseqConfiguration::default());
    }
    let tp: u64;
    // SAFETY: %fs:0 holds the thread pointer on x86-64 glibc.
    unsafe { std::arch::asm!("mov {}, fs:0", out(reg) tp) };
    Ok(RseqConfiguration {
        rseq_abi_pointer: (tp as i64 + off as i64) as u64,
        rseq_abi_size: size.max(32),
        signature: 0x5305_3053,
        ..Default::default()
    })
}

/// Jumps to the restorer with a fresh stack. Never returns.
///
/// # Safety
/// `entry` must be the loaded restorer's entry, `stack_top` the top of a stack
/// and `args` its `RestorerArgs`, all inside the hole.
pub unsafe fn jump_to_restorer(entry: u64, stack_top: u64, args: u64) -> ! {
    // SAFETY: per the function contract.
    unsafe {
        std::arch::asm!("mov rsp, {st}", "jmp {e}", st = in(reg) stack_top, e = in(reg) entry,
                        in("rdi") args, options(noreturn));
    }
}

/// The robust futex list head of a thread (get_robust_list(2)).
pub fn get_robust_list(tid: Pid) -> io::Result<(u64, u64)> {
    let mut head = 0u64;
    let mut len = 0usize;
    // SAFETY: the kernel writes one pointer and one size.
    check(unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid.as_raw(),
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    })?;
    Ok((head, len as u64))
}

/// The signals queued for a thread (`shared`: for its whole process), as raw
/// 128-byte siginfo records, oldest first (PTRACE_PEEKSIGINFO).
pub fn peek_pending(tid: Pid, shared: bool) -> io::Result<Vec<Vec<u8>>> {
    #[repr(C)]
    struct PeekArgs {
        off: u64,
        flags: u32,
        nr: i32,
    }
    const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 128 * 32];
    loop {
        let args = PeekArgs {
            off: out.len() as u64,
            flags: shared as u32,
            nr: 32,
        };
        // SAFETY: the kernel writes at most nr 128-byte records into buf.
        let n = check(unsafe {
            libc::ptrace(
                PTRACE_PEEKSIGINFO,
                tid.as_raw(),
                &args as *const PeekArgs,
                buf.as_mut_ptr(),
            )
        })? as usize;
        out.extend(buf[..n * 128].chunks_exact(128).map(|c| c.to_vec()));
        if n < 32 {
            return Ok(out);
        }
    }
}

/// Blocks SIGCHLD for the whole of crust (call before any thread starts):
/// child and tracee events are taken through a signalfd (`wait_child`), so
/// that every wait can have a deadline.
pub fn block_sigchld() {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGCHLD);
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_BLOCK,
        Some(&set),
        None,
    );
}

/// A signalfd of SIGCHLD, made once; the process's (a forked copy of crust
/// reads its own children's through the inherited fd).
pub fn sigchld_fd() -> RawFd {
    static FD: std::sync::OnceLock<RawFd> = std::sync::OnceLock::new();
    *FD.get_or_init(|| {
        block_sigchld();
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(nix::sys::signal::Signal::SIGCHLD);
        // SAFETY: signalfd with a valid set; the fd lives as long as crust.
        unsafe { libc::signalfd(-1, set.as_ref(), libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) }
    })
}

/// Sleeps until `fd` is readable (true), or a SIGCHLD comes or `timeout`
/// passes (false: the caller looks at its children and its own deadline).
pub fn poll_fd_or_sigchld(fd: RawFd, timeout: std::time::Duration) -> io::Result<bool> {
    let sfd = sigchld_fd();
    let mut pfds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: sfd,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // Without a signalfd, look at the children every millisecond.
    let (n, ms) = if sfd < 0 { (1, ms.min(1)) } else { (2, ms) };
    // SAFETY: poll on our own pollfds.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), n, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    let mut buf = [0u8; 128 * 16];
    // SAFETY: draining the non-blocking signalfd into our buffer.
    while sfd >= 0 && unsafe { libc::read(sfd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    Ok(pfds[0].revents != 0)
}

/// waitpid(`pid`, `flags` | WNOHANG) until it reports something, sleeping
/// on SIGCHLD in between; None when `timeout` passes first.
pub fn wait_child(
    pid: Option<Pid>,
    flags: nix::sys::wait::WaitPidFlag,
    timeout: std::time::Duration,
) -> nix::Result<Option<nix::sys::wait::WaitStatus>> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let sfd = sigchld_fd();
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match waitpid(pid, Some(flags | WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            r => return r.map(Some),
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let mut pfd = libc::pollfd {
            fd: sfd,
            events: libc::POLLIN,
            revents: 0,
        };
        // Short polls: a SIGCHLD taken by another thread that does not
        // block it (crust blocks it before any thread starts; a test
        // harness does not) must not leave the wait asleep to its deadline.
        let ms = left.as_millis().clamp(1, 50) as i32;
        // SAFETY: poll on one pollfd of ours.
        unsafe { libc::poll(&mut pfd, 1, if sfd < 0 { 1 } else { ms }) };
        let mut buf = [0u8; 128 * 16];
        // SAFETY: draining the non-blocking signalfd into our buffer.
        while sfd >= 0 && unsafe { libc::read(sfd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}

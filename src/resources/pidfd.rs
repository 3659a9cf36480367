//! pidfds (PidFdKind): of a process of the tree, or of one that had died by
//! the dump.
//!
//! Dump: fdinfo's `Pid:` names the process (-1 once it is dead and reaped),
//! the flags carry PIDFD_NONBLOCK (O_NONBLOCK) and PIDFD_THREAD (O_EXCL),
//! and fstat gives the pidfs inode, which all pidfds of one process share.
//! Restore: a pidfd of a live process is opened again with pidfd_open by the
//! restored task, once its process exists. For a dead process crust, before
//! the tree forks, makes a stand-in per dumped inode that opens one pidfd
//! per dumped open file description of it, then lets it end the way the
//! dumped process did and reaps it; the tree dups those pidfds. So pidfds
//! of one dead process share an inode again, and those of two differ.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{SigSet, SigmaskHow};

use super::files::{FdProbe, FileKind, ObjKey, RestoreCtx, TreeImages, TreeObjects, dup_fd};
use crate::images::pb::PidFd;
use crate::images::pb::fd_entry::File as FdFile;
use crate::sys;

pub struct PidFdKind;

/// PIDFD_THREAD: the pidfd refers to one thread; its bit is O_EXCL's.
const PIDFD_THREAD: u32 = libc::O_EXCL as u32;
/// The pidfd_open flags fdinfo shows among the file's flags.
const PIDFD_FLAGS: u32 = libc::O_NONBLOCK as u32 | PIDFD_THREAD;

/// How long a restored task waits for the process a pidfd refers to: a
/// sibling or a descendant of another branch is forked by its own parent,
/// which may still be filling its memory.
const LIVE_WAIT: Duration = Duration::from_secs(10);

/// The tree object of a dead process's `nth` pidfd description.
fn dead_key(ino: u64, nth: u32) -> ObjKey {
    ("pidfd-dead", ino, nth.into())
}

impl FileKind for PidFdKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if p.link != "anon_inode:[pidfd]" {
            return Ok(None);
        }
        let target: i32 = super::files::info_get(p.info, "Pid")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| p.unreadable("Pid"))?;
        let ino = p.meta.ino();
        let flags = p.flags & PIDFD_FLAGS;
        if target == -1 {
            // Each description of the dead process gets a number of its own
            // (a description held by several processes is dumped once).
            let nth = (0..)
                .find(|&n| p.ctx.first_time(("pidfd-dead", ino, n)))
                .expect("a free number");
            return Ok(Some(FdFile::Pidfd(PidFd {
                pid: 0,
                flags,
                ino,
                nth: nth as u32,
                exit_status: exit_status(p)?,
            })));
        }
        if !p.ctx.tree.contains(&target) && !p.ctx.zombies.contains(&target) {
            let tgid = crate::proc::status(target).map_or(target, |s| s.tgid);
            if tgid != target && p.ctx.tree.contains(&tgid) {
                bail!(
                    "PID {} fd {} is a pidfd of thread {target} of PID {tgid}; crust cannot restore a pidfd of a thread yet: close it before the dump",
                    p.pid,
                    p.fd
                );
            }
            bail!(
                "PID {} fd {} is a pidfd of PID {target}, which is outside the dumped tree; close it, or dump a tree that holds {target}",
                p.pid,
                p.fd
            );
        }
        Ok(Some(FdFile::Pidfd(PidFd {
            pid: target,
            flags,
            ino,
            nth: 0,
            exit_status: None,
        })))
    }

    fn check_shared(&self, f: &FdFile, pid: i32, fd: RawFd) -> Result<()> {
        let FdFile::Pidfd(x) = f else { return Ok(()) };
        // Descriptions shared across processes are opened by crust before
        // the tree forks, when the process this one refers to is not there yet.
        if x.pid != 0 {
            bail!(
                "PID {pid} fd {fd} is a pidfd of PID {} whose open file description another process of the tree holds too (inherited or passed); crust cannot restore a pidfd of a live process shared by several processes yet: close it in all but one",
                x.pid
            );
        }
        Ok(())
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Pidfd(x) = f else { return None };
        Some(if x.pid != 0 {
            format!("pidfd of PID {} flags {:#o}", x.pid, x.flags)
        } else {
            format!(
                "pidfd of a dead process (pidfs inode {}, description {}) flags {:#o}, {}",
                x.ino,
                x.nth,
                x.flags,
                match x.exit_status {
                    Some(s) => format!("wait status {s:#x}"),
                    None => "wait status unknown".into(),
                }
            )
        })
    }

    fn prepare(&self, t: &TreeImages, objects: &mut TreeObjects) -> Result<()> {
        // Per dead process (pidfs inode): how it ended, and the flags of
        // each description of it.
        let mut dead: BTreeMap<u64, (Option<i32>, BTreeMap<u32, u32>)> = BTreeMap::new();
        for (_, _, f) in t.files() {
            if let FdFile::Pidfd(x) = f
                && x.pid == 0
            {
                let d = dead.entry(x.ino).or_default();
                d.0 = x.exit_status;
                d.1.insert(x.nth, x.flags);
            }
        }
        for (ino, (status, descriptions)) in dead {
            let flags: Vec<u32> = descriptions.values().copied().collect();
            let fds = dead_process(status, &flags).with_context(|| {
                format!("making the dead process the pidfds of pidfs inode {ino} refer to")
            })?;
            for (&nth, fd) in descriptions.keys().zip(fds) {
                objects.insert(dead_key(ino, nth), fd);
            }
        }
        Ok(())
    }

    fn restore(&self, f: &FdFile, ctx: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Pidfd(x) = f else { return Ok(None) };
        if x.pid == 0 {
            let fd = ctx.objects.need(
                dead_key(x.ino, x.nth),
                &format!("the pidfd of the dead process (pidfs inode {})", x.ino),
            )?;
            return Ok(Some(dup_fd(fd)?));
        }
        Ok(Some(open_live(x.pid, x.flags)?))
    }
}

/// A pidfd of `pid`, which a restored task may not see yet (forked by
/// another branch of the tree): waits for it up to `LIVE_WAIT`.
fn open_live(pid: i32, flags: u32) -> Result<OwnedFd> {
    let deadline = Instant::now() + LIVE_WAIT;
    loop {
        match sys::pidfd_open_flags(pid, flags) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => bail!(
                "opening a pidfd of PID {pid} again: PID {pid} of the tree did not appear within {} s",
                LIVE_WAIT.as_secs()
            ),
            Err(e) => bail!("opening a pidfd of PID {pid} again (flags {flags:#o}): {e}"),
        }
    }
}

/// struct pidfd_info up to exit_code (PIDFD_INFO_SIZE_VER0, Linux 6.13).
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    ids: [u32; 11],
    exit_code: i32,
}
const PIDFD_INFO_EXIT: u64 = 1 << 3;
/// _IOWR(PIDFS_IOCTL_MAGIC 0xFF, 11, struct pidfd_info of 64 bytes).
const PIDFD_GET_INFO: libc::c_ulong = 0xC040_FF0B;

/// How the dead process of PID's pidfd ended, as wait(2) would have
/// reported it; None when the kernel does not say (before Linux 6.15).
fn exit_status(p: &FdProbe) -> Result<Option<i32>> {
    let holder = sys::pidfd_open(p.pid).with_context(|| format!("pidfd of {}", p.pid))?;
    let copy = sys::pidfd_getfd(&holder, p.fd)
        .with_context(|| format!("taking a copy of PID {} fd {}", p.pid, p.fd))?;
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..Default::default()
    };
    // SAFETY: PIDFD_GET_INFO reads and writes one struct pidfd_info of the
    // size the request encodes, which is PidfdInfo's.
    let r = unsafe { libc::ioctl(copy.as_raw_fd(), PIDFD_GET_INFO, &mut info) };
    Ok((r == 0 && info.mask & PIDFD_INFO_EXIT != 0).then_some(info.exit_code))
}

/// How a stand-in ends: exit_group with a code, or killed by a signal.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ending {
    Exit(i32),
    Signal(i32),
}

impl Ending {
    /// The ending a wait status tells; None for one no process ends with.
    fn of(status: i32) -> Option<Ending> {
        let sig = status & 0x7f;
        if sig == 0 {
            return (status & !0xff00 == 0).then_some(Ending::Exit((status >> 8) & 0xff));
        }
        // Signals whose default action stops, or ignores, end no process.
        let no_end = [
            libc::SIGCHLD,
            libc::SIGCONT,
            libc::SIGURG,
            libc::SIGWINCH,
            libc::SIGSTOP,
            libc::SIGTSTP,
            libc::SIGTTIN,
            libc::SIGTTOU,
        ];
        (sig <= 64 && !no_end.contains(&sig) && status & !0xff == 0).then_some(Ending::Signal(sig))
    }

    /// The wait status this ending gives (a stand-in writes no core).
    fn status(self) -> i32 {
        match self {
            Ending::Exit(code) => code << 8,
            Ending::Signal(sig) => sig,
        }
    }
}

/// Makes a process that opens one pidfd per entry of `flags`, then ends as
/// `status` says (or by SIGKILL when the dump could not tell), and reaps it.
fn dead_process(status: Option<i32>, flags: &[u32]) -> Result<Vec<OwnedFd>> {
    let ending = match status {
        None => Ending::Signal(libc::SIGKILL),
        Some(s) => Ending::of(s).with_context(|| {
            format!("the images say it ended with wait status {s:#x}, which ends no process")
        })?,
    };
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let sig = match ending {
        Ending::Signal(s) => s,
        Ending::Exit(_) => 0,
    };
    // The stand-in starts with every signal blocked: the ending signal,
    // sent at any time, waits until its action is the default one, and
    // none of crust's handlers ever runs in it.
    let old = SigSet::all().thread_swap_mask(SigmaskHow::SIG_SETMASK)?;
    // SAFETY: fork; the child only makes system calls and exits, never
    // returning into crust's code (crust may have other threads).
    let child = unsafe { libc::fork() };
    if child == 0 {
        stand_in(rd.as_raw_fd(), sig);
    }
    let forked = std::io::Error::last_os_error();
    old.thread_set_mask()?;
    if child < 0 {
        bail!("forking a stand-in: {forked}");
    }
    drop(rd);
    let made = (|| -> Result<Vec<OwnedFd>> {
        let fds = flags
            .iter()
            .map(|&f| sys::pidfd_open_flags(child, f))
            .collect::<std::io::Result<Vec<_>>>()
            .context("opening pidfds of the stand-in")?;
        match ending {
            Ending::Signal(s) => sys::pidfd_send_signal(&fds[0], s)
                .with_context(|| format!("sending signal {s} to the stand-in"))?,
            Ending::Exit(code) => {
                nix::unistd::write(&wr, &code.to_ne_bytes())
                    .context("telling the stand-in to exit")?;
            }
        }
        Ok(fds)
    })();
    if made.is_err() {
        // SAFETY: kill(2) of crust's own child, not reaped yet.
        unsafe { libc::kill(child, libc::SIGKILL) };
    }
    drop(wr);
    let ended = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None)
        .context("reaping the stand-in")?;
    let fds = made?;
    let got = match ended {
        nix::sys::wait::WaitStatus::Exited(_, c) => Ending::Exit(c),
        nix::sys::wait::WaitStatus::Signaled(_, s, _) => Ending::Signal(s as i32),
        other => bail!("the stand-in ended as {other:?}"),
    };
    if got != ending {
        bail!(
            "the stand-in ended as {got:?} (wait status {:#x}), not as {ending:?}",
            got.status()
        );
    }
    Ok(fds)
}

/// The stand-in's side: no core file, the ending signal at its default
/// action, every signal unblocked, then wait for crust's word: a signal, or
/// an exit code on `rd` (anything else: crust is gone or failed, exit).
fn stand_in(rd: RawFd, sig: i32) -> ! {
    // SAFETY: plain system calls in a forked child; `act` and `mask` are
    // read by the kernel (struct sigaction of the kernel: handler SIG_DFL,
    // flags, restorer, mask), `code` written by read, errno read from this
    // thread's own errno.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0);
        if sig != 0 {
            let act = [0u64; 4];
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                act.as_ptr(),
                std::ptr::null::<u64>(),
                8,
            );
        }
        let mask = 0u64;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &mask,
            std::ptr::null::<u64>(),
            8,
        );
        let mut code = 0i32;
        loop {
            let n = libc::read(rd, (&raw mut code).cast(), 4);
            if n == 4 {
                libc::syscall(libc::SYS_exit_group, code);
            }
            if n >= 0 || *libc::__errno_location() != libc::EINTR {
                libc::syscall(libc::SYS_exit_group, 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endings_from_wait_status() {
        assert_eq!(Ending::of(7 << 8), Some(Ending::Exit(7)));
        assert_eq!(
            Ending::of(libc::SIGTERM),
            Some(Ending::Signal(libc::SIGTERM))
        );
        // Core dumped: still SIGSEGV.
        assert_eq!(
            Ending::of(libc::SIGSEGV | 0x80),
            Some(Ending::Signal(libc::SIGSEGV))
        );
        assert_eq!(Ending::of(libc::SIGCHLD), None);
        assert_eq!(Ending::of(0x137f), None);
        assert_eq!(Ending::Exit(7).status(), 0x700);
    }

    #[test]
    fn dead_process_ends_as_told_and_shares_an_inode() {
        let fds = dead_process(Some(3 << 8), &[0, libc::O_NONBLOCK as u32]).unwrap();
        let ino = |fd: &OwnedFd| nix::sys::stat::fstat(fd.as_raw_fd()).unwrap().st_ino;
        assert_eq!(ino(&fds[0]), ino(&fds[1]));
        let fl = nix::fcntl::fcntl(fds[1].as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        let e = sys::pidfd_send_signal(&fds[0], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH));
        let mut info = PidfdInfo {
            mask: PIDFD_INFO_EXIT,
            ..Default::default()
        };
        // SAFETY: one struct pidfd_info of the encoded size.
        if unsafe { libc::ioctl(fds[0].as_raw_fd(), PIDFD_GET_INFO, &mut info) } == 0 {
            assert_eq!(info.exit_code, 3 << 8);
        }
        let other = dead_process(None, &[0]).unwrap();
        assert_ne!(ino(&fds[0]), ino(&other[0]));
    }
}

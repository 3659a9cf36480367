//! The dump's guardian: a process crust forks at the start of a dump that
//! undoes what the dump did outside crust, should crust die (SIGKILL, a
//! crash) before the dump is finished.
//!
//! crust undoes its own steps with guards (RAII): seized tasks are
//! released (`SeizedTask`), parasites cured (`Parasite`), connections taken
//! out of repair mode (`DumpCtx::on_resume`), the network lock lifted
//! (`NetLock`), each on drop, so a dump that fails leaves the tree as it
//! was. A dead crust runs no drops. The kernel ends its ptrace stops (the
//! tree runs on at once); for the rest, crust tells the guardian before
//! each step, giving it its own reference to what the step changes:
//!
//! - a parasite in a task (`parasite_ctl::Infection`): the guardian seizes
//!   the task again and removes it (`parasite_ctl::cure_orphaned`);
//! - a connection about to go into TCP repair mode (a copy of the socket,
//!   sent with SCM_RIGHTS): taken out of it (`tcp::leave_repair`, as after
//!   a restore). crust holds a connection in repair mode only while it
//!   reads it, so this is the guardian's first act: the tree, running
//!   again, must not find it so;
//! - the network lock about to be taken (method, name, and its network
//!   namespace when it is not crust's): lifted.
//!
//! The dump ends with one last word. `done`: crust undid all of it itself
//! (a failed dump, or one that lets the tree run on). `keep`: the images
//! are complete and the tree ends. It comes with pidfds of the tree's
//! processes before crust kills them, so that a crust killed after the
//! word still ends the tree: the guardian kills what is left of it, then
//! puts the connections back into repair mode (its copies keep them open)
//! so that their last close sends nothing, and leaves the lock for the
//! restore. At the end of its channel without a last word, the guardian
//! undoes everything it was told of, and the tree runs on as if it had not
//! been dumped.
//!
//! It never hangs: the end of its channel comes when crust and every
//! command crust ran on the lock (`hold_off_in_child`) are gone, at most
//! 30 s after crust's death; a cure gives up after 10 s, a command on the
//! lock after 20 s; crust waits 10 s at most for it to end. It holds
//! nothing that changes the tree's behaviour or keeps anyone waiting: it
//! leaves crust's session and stdio (a `$(crust dump ...)` does not wait
//! for it) and crust's cwd, keeps only the log when it is a file, and holds
//! pidfds and copies of sockets the frozen tree holds anyway.
//!
//! One process per dump guards all of it: the cure watchdog the parasite
//! engine needs is this process, told of each infection as of each
//! connection, over one channel; what is undone, and how, stays with the
//! module that did it.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::unistd::Pid;
use tracing::{info, warn};

use crate::parasite_ctl::{self, INFECTION_LEN, Infection};
use crate::resources::inet::tcp;
use crate::resources::netlock::{Method, NetLock};
use crate::resources::sockets::{RIGHTS_MAX, recv_with_fds, send_with_fds};
use crate::sys;

// What crust tells the guardian: one message each, its first byte saying
// what it is.
/// A parasite in task PID: the PID (4 bytes) and its `Infection` (size 0:
/// cured).
const INFECTED: u8 = b'I';
/// A connection about to go into repair mode: its SO_REUSEADDR (1 byte);
/// the socket comes along.
const REPAIRING: u8 = b'R';
/// The network lock about to be taken: "METHOD NAME"; its network
/// namespace comes along when it is not crust's.
const LOCKING: u8 = b'L';
/// Processes of the tree: their pidfds come along.
const TREE: u8 = b'T';
/// Last word: the dump is complete and the tree ends.
const KEEP: u8 = b'K';
/// Last word: crust undid all it did itself.
const DONE: u8 = b'D';

/// How long the guardian waits, once crust is dead, for the commands crust
/// ran on the lock to end.
const COMMANDS_GRACE: Duration = Duration::from_secs(30);
/// How long crust waits for the guardian to end, and for room in its
/// channel.
const DEADLINE: Duration = Duration::from_secs(10);

/// crust's end of the channel while a guardian runs (-1 otherwise).
static CHANNEL: AtomicI32 = AtomicI32::new(-1);

/// crust's side of the dump's guardian. Dropped, it tells the guardian
/// that crust undid the dump itself (unless it was told `keep`), and waits
/// for it to end.
pub struct Guardian {
    pid: Pid,
    chan: Option<OwnedFd>,
    kept: std::cell::Cell<bool>,
}

/// In a child crust forks to run a command that changes what the guardian
/// undoes (nft or iptables on the lock), between fork and exec: the child
/// keeps crust's end of the channel open until it ends, so that a guardian
/// whose crust died meanwhile acts only once the command is done, and its
/// undo is not overtaken by it.
pub fn hold_off_in_child() {
    let fd = CHANNEL.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: fcntl(2) is async-signal-safe; it clears close-on-exec
        // on an fd the child inherited.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    }
}

impl Guardian {
    /// Forks the guardian.
    pub fn spawn() -> Result<Guardian> {
        let crust = sys::pidfd_open(std::process::id() as i32)
            .context("opening a pidfd of crust for the dump's guardian")?;
        let mut fds = [0; 2];
        // SAFETY: socketpair(2) fills the two fds.
        if unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        } < 0
        {
            anyhow::bail!(
                "making the channel to the dump's guardian: {}",
                std::io::Error::last_os_error()
            );
        }
        let mine = crate::resources::files::new_fd(fds[0] as i64, "the guardian's channel")?;
        let theirs = crate::resources::files::new_fd(fds[1] as i64, "the guardian's channel")?;
        let timeout = libc::timeval {
            tv_sec: DEADLINE.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: SO_SNDTIMEO reads one timeval: a full channel is an
        // error after the deadline, not a hang.
        if unsafe {
            libc::setsockopt(
                mine.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        } < 0
        {
            anyhow::bail!(
                "setting a deadline on the channel to the dump's guardian: {}",
                std::io::Error::last_os_error()
            );
        }
        // Made before the fork: a cure waits for the tasks through it.
        let sigchld = sys::sigchld_fd();
        // SAFETY: the child makes system calls, allocates and logs, and
        // leaves with _exit. The only other thread crust may have (the
        // progress line) holds no lock it takes: it writes to fd 2 directly.
        match unsafe { nix::unistd::fork() }.context("forking the dump's guardian")? {
            nix::unistd::ForkResult::Child => {
                drop(mine);
                let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    guard(theirs, crust, sigchld)
                }))
                .unwrap_or(1);
                // SAFETY: leave without running crust's exit handlers or
                // destructors: nothing of crust's is the guardian's.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(theirs);
                CHANNEL.store(mine.as_raw_fd(), Ordering::Relaxed);
                tracing::debug!("the dump's guardian is PID {child}");
                Ok(Guardian {
                    pid: child,
                    chan: Some(mine),
                    kept: std::cell::Cell::new(false),
                })
            }
        }
    }

    fn tell(&self, msg: &[u8], fds: &[RawFd]) -> Result<()> {
        let chan = self.chan.as_ref().expect("the channel is open");
        send_with_fds(chan.as_raw_fd(), None, msg, fds, libc::MSG_NOSIGNAL)
            .map(drop)
            .with_context(|| {
                format!(
                    "telling the dump's guardian (PID {}); it is gone or stuck, dump again",
                    self.pid
                )
            })
    }

    /// The parasite in task `pid` is now `inf` (`Infection::new(0, 0)`:
    /// cured).
    pub fn infected(&self, pid: i32, inf: Infection) -> Result<()> {
        let mut m = vec![INFECTED];
        m.extend(pid.to_le_bytes());
        m.extend(inf.to_bytes());
        self.tell(&m, &[])
    }

    /// The connection `sock` goes into repair mode next; `reuse` is its
    /// SO_REUSEADDR.
    pub fn repairing(&self, sock: BorrowedFd, reuse: bool) -> Result<()> {
        self.tell(&[REPAIRING, reuse as u8], &[sock.as_raw_fd()])
    }

    /// The network lock `name` is taken next, with `method`, in `netns`
    /// (None: crust's namespace).
    pub fn locking(&self, method: Method, name: &str, netns: Option<BorrowedFd>) -> Result<()> {
        if method == Method::Skip {
            return Ok(());
        }
        let mut m = vec![LOCKING];
        m.extend(format!("{} {name}", method.name()).bytes());
        let fds: Vec<RawFd> = netns.iter().map(|f| f.as_raw_fd()).collect();
        self.tell(&m, &fds)
    }

    /// The dump is complete and the tree of `pids` ends: from this word on,
    /// a crust that dies leaves the guardian to kill the tree, and the
    /// lock in place for the restore.
    pub fn keep(&self, pids: &[i32]) -> Result<()> {
        for chunk in pids.chunks(RIGHTS_MAX) {
            let pidfds = chunk
                .iter()
                .map(|&p| {
                    sys::pidfd_open(p).with_context(|| {
                        format!("opening a pidfd of PID {p} for the dump's guardian; dump again")
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let raw: Vec<RawFd> = pidfds.iter().map(|f| f.as_raw_fd()).collect();
            self.tell(&[TREE], &raw)?;
        }
        self.tell(&[KEEP], &[])?;
        self.kept.set(true);
        Ok(())
    }

    /// The dump is over: the guardian ends.
    pub fn finish(self) {}
}

impl Drop for Guardian {
    fn drop(&mut self) {
        if !self.kept.get()
            && let Err(e) = self.tell(&[DONE], &[])
        {
            warn!("{e:#}");
        }
        CHANNEL.store(-1, Ordering::Relaxed);
        drop(self.chan.take());
        use nix::sys::wait::{WaitPidFlag, WaitStatus};
        match sys::wait_child(Some(self.pid), WaitPidFlag::empty(), DEADLINE) {
            Ok(Some(WaitStatus::Exited(_, 0))) => {}
            Ok(None) => {
                warn!(
                    "the dump's guardian (PID {}) did not end within {} s; killing it",
                    self.pid,
                    DEADLINE.as_secs()
                );
                let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
                let _ = sys::wait_child(Some(self.pid), WaitPidFlag::empty(), DEADLINE);
            }
            other => warn!("the dump's guardian (PID {}) ended: {other:?}", self.pid),
        }
    }
}

/// What the guardian was told.
#[derive(Default)]
struct Held {
    infections: Vec<(i32, Infection)>,
    sockets: Vec<(OwnedFd, bool)>,
    lock: Option<(Method, String, Option<OwnedFd>)>,
    tree: Vec<OwnedFd>,
    last_word: Option<u8>,
}

/// The guardian's name (comm), by which a dump knows a task it finds
/// traced is still being put back by the guardian of a killed dump.
pub const COMM: &std::ffi::CStr = c"crust-guardian";

/// The guardian's life: read crust's words until the end of the channel,
/// then settle. Its exit status: 0, or 1 when something could not be
/// undone (logged).
fn guard(chan: OwnedFd, crust: OwnedFd, sigchld: RawFd) -> i32 {
    leave_crusts_things(&[chan.as_raw_fd(), crust.as_raw_fd(), sigchld], COMM);
    // The kernel lets the tree run the moment crust is gone (its ptrace
    // stops end as crust exits), while a connection may be in repair mode,
    // where the tree's reads and writes on it fail. Woken by the end of
    // the channel, a little before the tree is, the guardian runs ahead of
    // it as a real-time task, so the connections leave repair mode before
    // the tree's next system call on them. It sleeps in poll the rest of
    // its life; what it starts (nft, iptables) runs as any process does.
    let rt = libc::sched_param { sched_priority: 1 };
    let policy = libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK;
    // SAFETY: sets this process's own policy; the param is ours.
    if unsafe { libc::sched_setscheduler(0, policy, &rt) } != 0 {
        warn!(
            "guardian: no real-time priority ({}); a connection may stay in repair mode a moment after a crust that died",
            std::io::Error::last_os_error()
        );
    }
    let mut held = Held::default();
    let mut crust_gone: Option<Instant> = None;
    let mut buf = [0u8; 512];
    loop {
        let timeout = match crust_gone {
            None => -1,
            Some(t) => {
                let left = COMMANDS_GRACE.saturating_sub(t.elapsed());
                if left.is_zero() {
                    warn!(
                        "guardian: crust is gone, yet a process it started still holds the channel after {} s; acting now",
                        COMMANDS_GRACE.as_secs()
                    );
                    break;
                }
                left.as_millis() as i32
            }
        };
        let mut pfd = [
            libc::pollfd {
                fd: chan.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if crust_gone.is_none() {
                    crust.as_raw_fd()
                } else {
                    -1
                },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on two pollfds of ours.
        if unsafe { libc::poll(pfd.as_mut_ptr(), 2, timeout) } < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            warn!("guardian: poll: {}", std::io::Error::last_os_error());
            break;
        }
        if pfd[1].revents != 0 {
            crust_gone = Some(Instant::now());
        }
        if pfd[0].revents != 0 {
            match recv_with_fds(chan.as_raw_fd(), &mut buf, 0) {
                Ok((0, _, _)) => break,
                Ok((n, fds, lost)) => {
                    if lost {
                        warn!("guardian: files crust sent did not all arrive");
                    }
                    held.take(&buf[..n], fds);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("guardian: reading crust's words: {e}");
                    break;
                }
            }
        }
    }
    held.settle()
}

/// Leaves what the guardian inherited from crust and does not need
/// (every fd but `keep` and a log file, crust's session and terminal, its
/// cwd), so that it holds nothing anyone waits on; and names itself.
pub(crate) fn leave_crusts_things(keep: &[RawFd], name: &std::ffi::CStr) {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|&f| f >= 0).collect();
    keep.extend(crate::log::keep_only_a_file());
    keep.sort_unstable();
    keep.dedup();
    let mut from = 0u32;
    for &k in &keep {
        if k as u32 > from {
            // SAFETY: close_range(2) of fds no one in this process uses.
            unsafe { libc::syscall(libc::SYS_close_range, from, k as u32 - 1, 0u32) };
        }
        from = k as u32 + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32) };
    // SAFETY: open(2) of a constant path; dup2(2) onto the stdio fds the
    // guardian does not keep, which are closed.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        for fd in 0..3 {
            if null >= 0 && fd != null && !keep.contains(&fd) {
                libc::dup2(null, fd);
            }
        }
        if null > 2 {
            libc::close(null);
        }
        libc::setsid();
        libc::chdir(c"/".as_ptr());
        libc::prctl(libc::PR_SET_NAME, name.as_ptr());
    }
}

impl Held {
    fn take(&mut self, msg: &[u8], mut fds: Vec<OwnedFd>) {
        match msg.split_first() {
            Some((&INFECTED, rest)) if rest.len() == 4 + INFECTION_LEN => {
                let pid = i32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
                let inf = Infection::from_bytes(rest[4..].try_into().expect("an infection"));
                self.infections.retain(|(p, _)| *p != pid);
                if inf.present() {
                    self.infections.push((pid, inf));
                }
            }
            Some((&REPAIRING, &[reuse])) if fds.len() == 1 => {
                self.sockets.push((fds.remove(0), reuse != 0));
            }
            Some((&LOCKING, rest)) => {
                let text = String::from_utf8_lossy(rest);
                match text
                    .split_once(' ')
                    .and_then(|(m, n)| Some((Method::parse(m)?, n)))
                {
                    Some((method, name)) => self.lock = Some((method, name.into(), fds.pop())),
                    None => warn!("guardian: a lock it does not know: {text}"),
                }
            }
            Some((&TREE, [])) => self.tree.extend(fds),
            Some((&w, [])) if w == KEEP || w == DONE => self.last_word = Some(w),
            _ => warn!("guardian: a word from crust it does not know: {msg:?}"),
        }
    }

    fn settle(self) -> i32 {
        match self.last_word {
            Some(DONE) => 0,
            Some(_) => {
                // Dead already, unless crust died before it killed them all:
                // then they die before the connections go back into repair
                // mode (the guardian's copies keep them), so no task sees
                // them in it.
                for p in &self.tree {
                    let _ = sys::pidfd_send_signal(p, libc::SIGKILL);
                }
                for (sock, _) in &self.sockets {
                    let _ = tcp::enter_repair(sock.as_raw_fd());
                }
                0
            }
            None => self.undo(),
        }
    }

    /// crust died before the dump was finished: the tree runs on.
    fn undo(self) -> i32 {
        let mut failed = false;
        // The connections first: the tree may run already (the kernel
        // detaches it as crust dies), and must not find one in repair mode.
        for (sock, reuse) in &self.sockets {
            if let Err(e) = tcp::leave_repair(sock.as_raw_fd(), *reuse) {
                warn!("guardian: taking a connection out of repair mode: {e:#}");
                failed = true;
            }
        }
        warn!("guardian: crust died in the middle of the dump; undoing it, the tree runs on");
        if !self.sockets.is_empty() {
            info!(
                "guardian: {} connection(s) out of repair mode",
                self.sockets.len()
            );
        }
        if let Some((method, name, netns)) = self.lock {
            match NetLock::of(method, &name, netns).release() {
                Ok(()) => info!("guardian: network lock {name} lifted"),
                Err(e) => {
                    warn!("guardian: lifting the network lock {name}: {e:#}");
                    failed = true;
                }
            }
        }
        for (pid, inf) in self.infections {
            if parasite_ctl::cure_orphaned(Pid::from_raw(pid), inf) {
                info!("guardian: parasite removed from task {pid}");
            } else {
                warn!("guardian: task {pid} could not be seized again to remove the parasite");
                failed = true;
            }
        }
        failed as i32
    }
}

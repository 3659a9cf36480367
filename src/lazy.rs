//! Lazy restore (post-copy): the restored tree runs before its private
//! memory is in, and the `crust lazy-pages` daemon fills that memory
//! through userfaultfd, the pages a task touches first, then the rest in
//! the background. See docs/LAZY-PAGES.md.
//!
//! - `restore --lazy-pages`: each task makes a userfaultfd in its own mm
//!   (`make_uffd`, in `restore::task::build_task`) and sends it to the
//!   daemon over `lazy-pages.socket` in the work directory (one SEQPACKET
//!   connection crust opened before the tree forked); its lazy VMAs
//!   (`is_lazy`) are premapped empty and registered by the restorer once
//!   in place. Once the tree runs, crust tells the daemon, and leaves a
//!   watcher that holds a copy of every userfaultfd: if the daemon dies
//!   before every page is in, faults wait instead of reading zeros, and the
//!   watcher kills the tree.
//! - `lazy-pages -D DIR`: pages come from the pages images (checked whole
//!   first); with `--page-server --address A --port P`, from the dump
//!   (`dump --lazy-pages`, `serve_pages`), which keeps the tree frozen and
//!   answers requests (pid, address, length) until the daemon has all;
//!   with `--tls` on both sides, in mutually authenticated TLS
//!   (`crate::tls`, the push page server's implementation: the dump
//!   listens and is the TLS server).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr,
};

use crate::abi;
use crate::images::pb::{Inventory, MmEntry, PagemapEntry, VmaEntry, VmaKind};
use crate::images::{self, ImageDir, ImageKind};

const PAGE: u64 = abi::PAGE_SIZE;

/// The daemon's socket, in the work directory (as CRIU names it).
pub const SOCKET_NAME: &str = "lazy-pages.socket";

/// How long the daemon waits for a restore, and the dump for a daemon.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one side of the page stream waits for the other's next word
/// once they talk: the daemon asks for pages without pause until it has
/// all, so a longer silence is a broken peer.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes one request may ask for.
const MAX_REQUEST: u64 = 16 << 20;
/// Pages placed per fault: the aligned block around the faulting page.
const FAULT_BLOCK: u64 = 16 * PAGE;
/// Bytes placed per background step, between looks at the faults.
const STEP_LOCAL: u64 = 4 << 20;
const STEP_REMOTE: u64 = 4 << 20;
/// From a page server: runs of at most this many bytes, this many asked
/// for at once.
const REMOTE_RUN: u64 = 512 << 10;
const REMOTE_IN_FLIGHT: usize = 16;

/// Whether the pages of a VMA are left to the lazy-pages daemon: private
/// anonymous memory, the bulk of a task, but not what the kernel may
/// drop (MAP_DROPPABLE), a growsdown stack, locked memory (mlock would
/// fault it all in at once), PROT_NONE areas (guards hold no pages), nor
/// memory a fork does not copy as it is (MADV_DONTFORK, MADV_WIPEONFORK:
/// the daemon gives a fork's child what its parent still misses).
pub fn is_lazy(v: &VmaEntry) -> bool {
    v.kind() == VmaKind::VmaAnonPrivate
        && !v.droppable
        && !v.growsdown
        && v.prot != 0
        && v.advice
            & (abi::VMA_ADV_LOCKED
                | abi::VMA_ADV_LOCKONFAULT
                | abi::VMA_ADV_DONTFORK
                | abi::VMA_ADV_WIPEONFORK)
            == 0
}

fn in_lazy_vma(mm: &MmEntry, r: &PagemapEntry) -> bool {
    mm.vmas
        .iter()
        .any(|v| v.start <= r.vaddr && r.vaddr < v.end && is_lazy(v))
}

// ---------------------------------------------------------------- dump ---

/// `dump --lazy-pages`: moves the runs of lazy VMAs, the task's own and
/// those it shares with its parent, out of what the images hold into
/// `lazy_pages`: they are served from the frozen task (`serve_pages`).
pub fn split_lazy(mm: &mut MmEntry) {
    let (lazy_own, own): (Vec<_>, Vec<_>) = std::mem::take(&mut mm.pagemap)
        .into_iter()
        .partition(|r| in_lazy_vma(mm, r));
    let (lazy_parent, parent): (Vec<_>, Vec<_>) = std::mem::take(&mut mm.parent_pages)
        .into_iter()
        .partition(|r| in_lazy_vma(mm, r));
    mm.pagemap = own;
    mm.parent_pages = parent;
    let mut lazy: Vec<PagemapEntry> = lazy_own.into_iter().chain(lazy_parent).collect();
    lazy.sort_by_key(|r| r.vaddr);
    mm.lazy_pages = lazy;
}

/// Bytes of the page stream's request: pid (i32), address, length (u64s).
const REQ_LEN: usize = 20;
/// The dump's greeting, its first bytes on the page stream: magic and
/// version (u32s), and the lazy pages it serves (u64). With TLS it also
/// tells the daemon that the dump took its certificate before the
/// restore begins.
const GREETING_LEN: usize = 16;
const MAGIC: u32 = 0x4352_4c5a; // "CRLZ"
/// Bumped on every incompatible change of the page stream.
const VERSION: u32 = 1;

/// Where `dump --lazy-pages` serves the memory: `--address A --port P`,
/// with TLS when --tls.
pub struct ServeOpts {
    pub addr: SocketAddr,
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
}

/// `dump --lazy-pages`: serves the lazy pages of the frozen tree (`tasks`:
/// each live task's PID and `lazy_pages`) to one lazy-pages daemon on
/// `opts.addr`, until it says it has all. Fails, leaving the tree to the
/// caller (which lets it run on), when no daemon comes, its certificate
/// is refused (or it refuses ours), or it goes away before it has all.
pub fn serve_pages(opts: &ServeOpts, tasks: &[(i32, Vec<PagemapEntry>)]) -> Result<()> {
    let addr = opts.addr;
    let total: u64 = tasks.iter().flat_map(|(_, r)| r).map(|r| r.nr_pages).sum();
    let listener = TcpListener::bind(addr)
        .with_context(|| format!("listening for the lazy-pages daemon on {addr}"))?;
    listener.set_nonblocking(true)?;
    tracing::info!(
        "serving {} MiB of lazy pages on {addr}",
        (total * PAGE) >> 20
    );
    let t = Instant::now();
    let (sock, from) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if t.elapsed() > CONNECT_TIMEOUT {
                    bail!(
                        "no lazy-pages daemon connected to {addr} within {} s; the tree runs on here",
                        CONNECT_TIMEOUT.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context("accepting the lazy-pages daemon"),
        }
    };
    drop(listener);
    sock.set_nonblocking(false)?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(IO_TIMEOUT))?;
    sock.set_write_timeout(Some(IO_TIMEOUT))?;
    let peer = format!("the lazy-pages daemon at {from}");
    // One daemon per dump: one whose certificate is refused (or that
    // refuses ours) ends the dump, and the tree runs on.
    let mut conn = crate::tls::accept(sock, opts.tls.as_ref(), &peer)
        .map_err(|e| anyhow::anyhow!("{e:#}; the tree runs on here"))?;
    let mut greeting = [0u8; GREETING_LEN];
    greeting[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    greeting[4..8].copy_from_slice(&VERSION.to_le_bytes());
    greeting[8..16].copy_from_slice(&total.to_le_bytes());
    if let Err(e) = conn.write_all(&greeting).and_then(|_| conn.flush()) {
        bail!(
            "{}; the tree runs on here",
            crate::tls::conn_error(&peer, e)
        );
    }
    tracing::info!(
        "serving {peer}{}",
        if opts.tls.is_some() { " over TLS" } else { "" }
    );
    let mut mems: HashMap<i32, File> = HashMap::new();
    for (pid, _) in tasks {
        let f = File::open(format!("/proc/{pid}/mem"))
            .with_context(|| format!("opening the memory of frozen task {pid}"))?;
        mems.insert(*pid, f);
    }
    let mut sent: HashSet<(i32, u64)> = HashSet::new();
    // An answer: its length, then the bytes, sent in one write.
    let mut buf = Vec::new();
    let lost = |sent: &HashSet<(i32, u64)>, e: std::io::Error| {
        anyhow::anyhow!(
            "{} with {} of {total} pages not sent; the tree runs on here",
            crate::tls::conn_error(&peer, e),
            total - sent.len() as u64
        )
    };
    loop {
        let mut req = [0u8; REQ_LEN];
        if let Err(e) = conn.read_exact(&mut req) {
            return Err(lost(&sent, e));
        }
        let pid = i32::from_le_bytes(req[0..4].try_into().unwrap());
        let vaddr = u64::from_le_bytes(req[4..12].try_into().unwrap());
        let len = u64::from_le_bytes(req[12..20].try_into().unwrap());
        if pid == 0 && len == 0 {
            tracing::info!(
                "the lazy-pages daemon has every page it needs ({} of {total} sent) after {:?}",
                sent.len(),
                t.elapsed()
            );
            return Ok(());
        }
        let known = tasks
            .iter()
            .find(|(p, _)| *p == pid)
            .is_some_and(|(_, runs)| {
                vaddr % PAGE == 0
                    && len % PAGE == 0
                    && len > 0
                    && len <= MAX_REQUEST
                    && covered(runs, vaddr, len)
            });
        if !known {
            bail!(
                "the lazy-pages daemon asked for {len} bytes at {vaddr:#x} of PID {pid}, which are no lazy pages of this dump; the tree runs on here"
            );
        }
        buf.resize(8 + len as usize, 0);
        buf[..8].copy_from_slice(&len.to_le_bytes());
        mems[&pid]
            .read_exact_at(&mut buf[8..], vaddr)
            .with_context(|| format!("reading pages of frozen task {pid} at {vaddr:#x}"))?;
        if let Err(e) = conn.write_all(&buf).and_then(|_| conn.flush()) {
            return Err(lost(&sent, e));
        }
        for p in (vaddr..vaddr + len).step_by(PAGE as usize) {
            sent.insert((pid, p));
        }
        if sent.len() as u64 * 4 >= total {
            // A quarter sent: a test kills the dump here.
            crate::dump::fault_point("lazy-serving");
        }
    }
}

/// Whether the runs (sorted by address) cover `[addr, addr+len)`.
fn covered(runs: &[PagemapEntry], mut addr: u64, len: u64) -> bool {
    let end = addr + len;
    while addr < end {
        let i = runs.partition_point(|r| r.vaddr + r.nr_pages * PAGE <= addr);
        match runs.get(i) {
            Some(r) if r.vaddr <= addr => addr = r.vaddr + r.nr_pages * PAGE,
            _ => return false,
        }
    }
    true
}

// ----------------------------------------------------------- userfaultfd ---

use crate::uffd::{UFFDIO_COPY, UFFDIO_WAKE, UFFDIO_ZEROPAGE};

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_FORK: u8 = 0x13;
const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const UFFD_EVENT_UNMAP: u8 = 0x16;
/// sizeof(struct uffd_msg).
const UFFD_MSG_LEN: usize = 32;

/// A userfaultfd for the calling process's mm, with the events a daemon
/// needs to follow the tree's own forks, moves and unmaps of lazy memory.
/// Not limited to user-mode faults: the task's system calls (a read()
/// into a lazy buffer) fault on lazy pages too.
pub fn make_uffd() -> Result<OwnedFd> {
    use crate::uffd;
    let fd = uffd::create(libc::O_CLOEXEC as u64).map_err(|e| {
        anyhow::anyhow!(
            "userfaultfd: {e}; a lazy restore needs it (as root, or vm.unprivileged_userfaultfd=1)"
        )
    })?;
    let events = uffd::FEATURE_EVENT_FORK
        | uffd::FEATURE_EVENT_REMAP
        | uffd::FEATURE_EVENT_REMOVE
        | uffd::FEATURE_EVENT_UNMAP;
    if let Err(e) = uffd::api(std::os::fd::AsFd::as_fd(&fd), events) {
        bail!(
            "userfaultfd events for fork, mremap and unmap: {e}; this kernel cannot restore lazily"
        );
    }
    Ok(fd)
}

/// What one UFFDIO_COPY or UFFDIO_ZEROPAGE came to.
enum Placed {
    /// All of it.
    Done,
    /// `n` bytes, then a page already there.
    Exists(u64),
    /// `n` bytes, then memory no longer registered (unmapped or moved: an
    /// event tells which).
    Gone(u64),
    /// `n` bytes, then the mm is changing: try again once its event is read.
    Busy(u64),
    /// The task's memory is gone (it exited).
    Dead,
}

fn place(uffd: RawFd, dst: u64, src: Option<&[u8]>, len: u64) -> Result<Placed> {
    let mut done = 0;
    while done < len {
        // struct uffdio_copy {dst, src, len, mode, copy} or uffdio_zeropage
        // {start, len, mode, zeropage}; mode 0 wakes whoever waits.
        let (r, progress) = match src {
            Some(s) => {
                let mut c: [u64; 5] = [
                    dst + done,
                    s[done as usize..].as_ptr() as u64,
                    len - done,
                    0,
                    0,
                ];
                // SAFETY: UFFDIO_COPY reads `len - done` bytes of `s` and
                // writes one uffdio_copy on our stack.
                let r = unsafe { libc::ioctl(uffd, UFFDIO_COPY, c.as_mut_ptr()) };
                (r, c[4] as i64)
            }
            None => {
                let mut z: [u64; 4] = [dst + done, len - done, 0, 0];
                // SAFETY: UFFDIO_ZEROPAGE reads and writes one uffdio_zeropage.
                let r = unsafe { libc::ioctl(uffd, UFFDIO_ZEROPAGE, z.as_mut_ptr()) };
                (r, z[3] as i64)
            }
        };
        if r == 0 {
            return Ok(Placed::Done);
        }
        let err = std::io::Error::last_os_error();
        if progress > 0 {
            done += progress as u64;
        }
        match err.raw_os_error() {
            // Part done: on with the rest.
            Some(libc::EAGAIN) if progress > 0 => continue,
            // The mm is changing (a fork, mremap or unmap whose event waits
            // for us to read it): later.
            Some(libc::EAGAIN) => return Ok(Placed::Busy(done)),
            Some(libc::EEXIST) => return Ok(Placed::Exists(done)),
            Some(libc::ENOENT) | Some(libc::EINVAL) => return Ok(Placed::Gone(done)),
            Some(libc::ESRCH) => return Ok(Placed::Dead),
            _ => bail!("placing pages at {:#x}: {err}", dst + done),
        }
    }
    Ok(Placed::Done)
}

fn wake(uffd: RawFd, addr: u64, len: u64) {
    let r: [u64; 2] = [addr, len];
    // SAFETY: UFFDIO_WAKE reads one uffdio_range.
    unsafe { libc::ioctl(uffd, UFFDIO_WAKE, r.as_ptr()) };
}

// ------------------------------------------------------- restore's side ---

/// Message kinds on the daemon's socket.
const MSG_TASK: u8 = b'T';
const MSG_DONE: u8 = b'D';
const MSG_ALL_IN: u8 = b'A';
/// From the daemon to the watcher: the userfaultfd of a child the tree
/// forked, held by the watcher too.
const MSG_FORK: u8 = b'F';

fn send_with_fd(sock: RawFd, msg: &[u8], fds: &[RawFd]) -> Result<()> {
    let cmsg: Vec<ControlMessage> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    nix::sys::socket::sendmsg::<()>(
        sock,
        &[std::io::IoSlice::new(msg)],
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Receives one message and the fds it carries; None at EOF.
fn recv_with_fd(sock: RawFd, flags: MsgFlags) -> nix::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = [0u8; 64];
    let mut cbuf = nix::cmsg_space!([RawFd; 2]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let m = nix::sys::socket::recvmsg::<()>(
        sock,
        &mut iov,
        Some(&mut cbuf),
        flags | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in m.cmsgs()? {
        if let ControlMessageOwned::ScmRights(v) = c {
            // SAFETY: new fds the kernel just gave us.
            fds.extend(v.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
        }
    }
    let n = m.bytes;
    if n == 0 {
        return Ok(None);
    }
    Ok(Some((buf[..n].to_vec(), fds)))
}

/// A restore's link to the lazy-pages daemon: the connection (shared by
/// crust and every task of the tree, which sends its userfaultfd on it),
/// and a socket pair on which each task sends crust a copy of it too.
pub struct RestoreLink {
    daemon: OwnedFd,
    copies_rx: OwnedFd,
    copies_tx: Option<OwnedFd>,
    /// Watches the daemon until the tree runs (`forked`): the end of a pipe
    /// whose closing stops the watch, and the thread.
    guard: Option<(OwnedFd, std::thread::JoinHandle<()>)>,
    /// Whether the watch saw the daemon go.
    died: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl RestoreLink {
    /// Connects to the daemon listening on `socket` (a few seconds'
    /// grace for one started just before).
    pub fn connect(socket: &Path) -> Result<Self> {
        let addr = UnixAddr::new(socket)?;
        let t = Instant::now();
        let daemon = loop {
            let s = nix::sys::socket::socket(
                AddressFamily::Unix,
                SockType::SeqPacket,
                SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            match nix::sys::socket::connect(s.as_raw_fd(), &addr) {
                Ok(()) => break s,
                Err(e) if t.elapsed() > Duration::from_secs(5) => bail!(
                    "no lazy-pages daemon listens on {} ({e}); start `crust lazy-pages` with the same work directory first",
                    socket.display()
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let (copies_rx, copies_tx) = nix::sys::socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok(RestoreLink {
            daemon,
            copies_rx,
            copies_tx: Some(copies_tx),
            guard: None,
            died: Default::default(),
        })
    }

    /// In a restored task, before its fd table is rebuilt: hands its
    /// userfaultfd, and a pidfd of itself (valid in any PID namespace, to
    /// kill it by), to the daemon and copies to crust. `pid` is its PID in
    /// the images.
    pub fn send_uffd(&self, pid: i32, uffd: RawFd) -> Result<()> {
        let mut msg = vec![MSG_TASK];
        msg.extend(pid.to_le_bytes());
        let me = crate::sys::pidfd_open(std::process::id() as i32)
            .with_context(|| format!("task {pid}: pidfd_open"))?;
        let fds = [uffd, me.as_raw_fd()];
        send_with_fd(self.daemon.as_raw_fd(), &msg, &fds).with_context(|| {
            format!("task {pid}: handing its userfaultfd to the lazy-pages daemon")
        })?;
        let tx = self
            .copies_tx
            .as_ref()
            .context("the copies' socket is closed")?;
        send_with_fd(tx.as_raw_fd(), &msg, &fds)
            .with_context(|| format!("task {pid}: handing its userfaultfd to crust"))
    }

    /// In crust, once the root is forked: the tasks hold the sending end.
    /// Until the tree runs, a thread watches the daemon: should it go, a
    /// task waiting for a page would wait until the restore's deadline, so
    /// the root is killed at once, and the restore fails.
    pub fn forked(&mut self, root: i32) {
        use nix::poll::{PollFd, PollFlags, PollTimeout};
        self.copies_tx = None;
        let fds = self
            .daemon
            .try_clone()
            .and_then(|d| Ok((d, nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)));
        let (fd, (stop_rd, stop_wr)) = match fds {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("watching the lazy-pages daemon during the restore: {e}");
                return;
            }
        };
        let died = self.died.clone();
        let t = std::thread::spawn(move || {
            loop {
                let mut p = [
                    PollFd::new(fd.as_fd(), PollFlags::POLLIN),
                    PollFd::new(stop_rd.as_fd(), PollFlags::POLLIN),
                ];
                if nix::poll::poll(&mut p, PollTimeout::NONE).is_err() {
                    continue;
                }
                if p[1].revents().is_some_and(|r| !r.is_empty()) {
                    return;
                }
                // The daemon says nothing before the tree runs: anything
                // here is its end.
                if p[0].revents().is_some_and(|r| !r.is_empty()) {
                    died.store(true, std::sync::atomic::Ordering::Relaxed);
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(root),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    return;
                }
            }
        });
        self.guard = Some((stop_wr, t));
    }

    /// Whether the daemon went away while the tree was being restored.
    pub fn daemon_died(&self) -> bool {
        self.died.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn stop_guard(&mut self) {
        if let Some((stop, t)) = self.guard.take() {
            drop(stop);
            let _ = t.join();
        }
    }

    /// The tree runs: tells the daemon (which now copies the rest in the
    /// background) and leaves a watcher holding the userfaultfds and the
    /// connection. If the daemon goes away before it says every page is
    /// in, the watcher kills the tree, which cannot run without its
    /// memory (and whose faults, the userfaultfds held, wait instead of
    /// reading zeros meanwhile).
    pub fn tree_runs(mut self) -> Result<()> {
        self.stop_guard();
        if self.daemon_died() {
            bail!("the lazy-pages daemon went away as the tree started to run");
        }
        send_with_fd(self.daemon.as_raw_fd(), &[MSG_DONE], &[])
            .context("telling the lazy-pages daemon that the tree runs")?;
        let mut uffds = Vec::new();
        let mut pidfds = Vec::new();
        while let Ok(Some((m, fds))) =
            recv_with_fd(self.copies_rx.as_raw_fd(), MsgFlags::MSG_DONTWAIT)
        {
            let mut fds = fds.into_iter();
            if m.len() == 5
                && let (Some(u), Some(p)) = (fds.next(), fds.next())
            {
                uffds.push(u);
                pidfds.push((i32::from_le_bytes(m[1..5].try_into().unwrap()), p));
            }
        }
        // SAFETY: the child only runs `watch`, which exits.
        match unsafe { nix::unistd::fork() }? {
            nix::unistd::ForkResult::Child => {
                // SAFETY: as above: the grandchild is the watcher, the child
                // ends at once so crust reaps it and the watcher belongs to
                // no restored task.
                match unsafe { nix::unistd::fork() } {
                    Ok(nix::unistd::ForkResult::Child) => watch(self.daemon, uffds, pidfds),
                    // SAFETY: ends the intermediate child.
                    _ => unsafe { libc::_exit(0) },
                }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let _ = nix::sys::wait::waitpid(child, None);
            }
        }
        Ok(())
    }
}

/// The watcher of a lazy restore: waits for the daemon's word that every
/// page is in; kills the tree if the daemon goes away first, or the tree
/// when it is all gone, it has nothing left to watch.
fn watch(daemon: OwnedFd, mut uffds: Vec<OwnedFd>, pidfds: Vec<(i32, OwnedFd)>) -> ! {
    let _ = nix::unistd::setsid();
    crate::log::keep_only_a_file();
    // Nobody reads our stdio: whoever ran the restore may wait for it to
    // close.
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        for fd in 0..3 {
            let _ = nix::unistd::dup2(null.as_raw_fd(), fd);
        }
    }
    let code = loop {
        let mut fds = vec![nix::poll::PollFd::new(
            daemon.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        fds.extend(
            pidfds
                .iter()
                .map(|(_, p)| nix::poll::PollFd::new(p.as_fd(), nix::poll::PollFlags::POLLIN)),
        );
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE).is_err() {
            continue;
        }
        let tree_gone = fds[1..]
            .iter()
            .all(|f| f.revents().is_some_and(|r| !r.is_empty()));
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            match recv_with_fd(daemon.as_raw_fd(), MsgFlags::empty()) {
                Ok(Some((m, _))) if m.first() == Some(&MSG_ALL_IN) => break 0,
                Ok(Some((m, fds))) if m.first() == Some(&MSG_FORK) => uffds.extend(fds),
                Ok(Some(_)) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                _ => {
                    kill_tree(&pidfds);
                    let list: Vec<String> = pidfds.iter().map(|(p, _)| p.to_string()).collect();
                    tracing::error!(
                        "the lazy-pages daemon went away before every page was in; killed the restored tree (PIDs {}): it cannot run without its memory",
                        list.join(", ")
                    );
                    break 1;
                }
            }
        }
        if tree_gone && !pidfds.is_empty() {
            break 0;
        }
    };
    drop(uffds);
    // SAFETY: the watcher ends here without crust's exit handlers.
    unsafe { libc::_exit(code) }
}

/// Kills the restored tasks (`pidfds`: PID of the images, pidfd) and the
/// descendants they have now, the children they forked since the restore
/// among them (whose userfaultfds came with fork events that name no PID):
/// found through /proc of this PID namespace, the pidfds telling where the
/// tasks are in it. All are held by pidfds before the first is killed.
fn kill_tree(pidfds: &[(i32, OwnedFd)]) {
    fn pid_of(fd: &OwnedFd) -> Option<i32> {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
        let pid = info.lines().find_map(|l| l.strip_prefix("Pid:"))?;
        pid.trim().parse().ok().filter(|&p: &i32| p > 0)
    }
    fn descendants(pid: i32, out: &mut Vec<i32>) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return;
        };
        for t in tasks.flatten() {
            let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for k in kids.split_whitespace().filter_map(|k| k.parse().ok()) {
                if out.len() < 1 << 16 && !out.contains(&k) {
                    out.push(k);
                    descendants(k, out);
                }
            }
        }
    }
    let mut pids = Vec::new();
    for (_, fd) in pidfds {
        if let Some(p) = pid_of(fd) {
            descendants(p, &mut pids);
        }
    }
    let more: Vec<OwnedFd> = pids
        .iter()
        .filter_map(|&p| crate::sys::pidfd_open(p).ok())
        .collect();
    for fd in pidfds.iter().map(|(_, f)| f).chain(&more) {
        let _ = crate::sys::pidfd_send_signal(fd, libc::SIGKILL);
    }
}

// -------------------------------------------------------------- daemon ---

pub struct DaemonOpts {
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// `--page-server --address A --port P`: the dump that serves the pages.
    pub page_server: Option<PageSource>,
}

/// The dump (`dump --lazy-pages`) the daemon pulls pages from.
pub struct PageSource {
    /// --address as given: the name the dump's certificate must bear.
    pub address: String,
    pub addr: SocketAddr,
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// Where one page comes from: the pages image of `pid` (`remote` false)
/// or the dump serving the frozen task `pid`; at address `addr` there.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Src {
    pid: i32,
    remote: bool,
    addr: u64,
}

/// One pages image, mapped: its runs (address, bytes, offset of the
/// data), by address.
struct Image {
    map: images::Mapping,
    runs: Vec<(u64, u64, u64)>,
}

fn load_image(dir: &ImageDir, pid: i32, mm: &MmEntry) -> Result<Image> {
    let pages = images::PagesImage::open(dir, pid)?;
    let mut runs = Vec::new();
    let mut off = 0;
    for r in &mm.pagemap {
        runs.push((r.vaddr, r.nr_pages * PAGE, off));
        off += r.nr_pages * PAGE;
    }
    if off != pages.len() {
        bail!(
            "pages image of {pid} holds {} bytes, its pagemap names {off}; the images are corrupt",
            pages.len()
        );
    }
    runs.sort_by_key(|r| r.0);
    let map = pages.map(libc::MAP_PRIVATE | libc::MAP_POPULATE)?;
    if crc32fast::hash(map.bytes()) != pages.crc() {
        bail!("pages image of {pid}: checksum mismatch; the images are corrupt");
    }
    Ok(Image { map, runs })
}

/// Where the daemon gets pages.
struct Sources {
    images: HashMap<i32, Image>,
    remote: Option<Box<dyn crate::tls::Stream>>,
    /// Bytes fetched from each.
    from_images: u64,
    from_remote: u64,
}

impl Sources {
    /// Reads `len` bytes of pages from `src` into `buf`.
    fn fetch(&mut self, src: Src, len: u64, buf: &mut Vec<u8>) -> Result<()> {
        buf.resize(len as usize, 0);
        if src.remote {
            let conn = self
                .remote
                .as_mut()
                .context("pages of the dump, and no --page-server to ask")?;
            let mut req = [0u8; REQ_LEN];
            req[0..4].copy_from_slice(&src.pid.to_le_bytes());
            req[4..12].copy_from_slice(&src.addr.to_le_bytes());
            req[12..20].copy_from_slice(&len.to_le_bytes());
            conn.write_all(&req)
                .and_then(|_| conn.flush())
                .context("asking the dump's page server for pages")?;
            let mut n = [0u8; 8];
            conn.read_exact(&mut n)
                .context("reading pages from the dump's page server")?;
            if u64::from_le_bytes(n) != len {
                bail!(
                    "the dump's page server answered {} bytes for {len}",
                    u64::from_le_bytes(n)
                );
            }
            conn.read_exact(buf)
                .context("reading pages from the dump's page server")?;
            self.from_remote += len;
            return Ok(());
        }
        let img = self
            .images
            .get(&src.pid)
            .with_context(|| format!("no pages image of task {}", src.pid))?;
        let mut at = 0;
        while at < len {
            let addr = src.addr + at;
            let i = img.runs.partition_point(|r| r.0 + r.1 <= addr);
            let Some(&(start, rlen, off)) = img.runs.get(i).filter(|r| r.0 <= addr) else {
                bail!(
                    "the pages image of {} holds no page at {addr:#x}; the images are corrupt",
                    src.pid
                );
            };
            let n = (start + rlen - addr).min(len - at);
            // The run lies in the data: its length was checked at load.
            let from = (off + addr - start) as usize;
            buf[at as usize..(at + n) as usize]
                .copy_from_slice(&img.map.bytes()[from..from + n as usize]);
            at += n;
        }
        self.from_images += len;
        Ok(())
    }

    /// The bytes of `len` pages at `src` where they lie whole in one run
    /// of a mapped image: placed from there, without a copy through a
    /// buffer.
    fn mapped(&self, src: Src, len: u64) -> Option<&[u8]> {
        if src.remote {
            return None;
        }
        let img = self.images.get(&src.pid)?;
        let i = img.runs.partition_point(|r| r.0 + r.1 <= src.addr);
        let &(start, rlen, off) = img.runs.get(i).filter(|r| r.0 <= src.addr)?;
        if src.addr + len > start + rlen {
            return None;
        }
        let from = (off + src.addr - start) as usize;
        img.map.bytes().get(from..from + len as usize)
    }

    /// Asks the page server for every run of `asks` at once, then reads
    /// the answers into `bufs` (one per run, in order).
    fn fetch_many(&mut self, asks: &[(Src, u64)], bufs: &mut Vec<Vec<u8>>) -> Result<()> {
        let conn = self
            .remote
            .as_mut()
            .context("pages of the dump, and no --page-server to ask")?;
        let mut reqs = Vec::with_capacity(asks.len() * REQ_LEN);
        for &(src, len) in asks {
            reqs.extend(src.pid.to_le_bytes());
            reqs.extend(src.addr.to_le_bytes());
            reqs.extend(len.to_le_bytes());
        }
        conn.write_all(&reqs)
            .and_then(|_| conn.flush())
            .context("asking the dump's page server for pages")?;
        bufs.resize_with(asks.len(), Vec::new);
        for (&(_, len), buf) in asks.iter().zip(bufs.iter_mut()) {
            let mut n = [0u8; 8];
            conn.read_exact(&mut n)
                .context("reading pages from the dump's page server")?;
            if u64::from_le_bytes(n) != len {
                bail!(
                    "the dump's page server answered {} bytes for {len}",
                    u64::from_le_bytes(n)
                );
            }
            buf.resize(len as usize, 0);
            conn.read_exact(buf)
                .context("reading pages from the dump's page server")?;
            self.from_remote += len;
        }
        Ok(())
    }

    /// Tells the dump it may end the tree there.
    fn bye(&mut self) {
        if let Some(c) = self.remote.as_mut() {
            let _ = c.write_all(&[0u8; REQ_LEN]).and_then(|_| c.flush());
        }
    }
}

/// One userfaultfd the daemon serves: a restored task's, or one its
/// fork made; the pages still to place, by their address there.
struct Served {
    uffd: OwnedFd,
    /// The restored task it came from (for messages).
    pid: i32,
    pending: BTreeMap<u64, Src>,
    dead: bool,
}

/// The pages a restored task's lazy VMAs still need, by address.
fn pending_of(
    pid: i32,
    mms: &HashMap<i32, MmEntry>,
    inv: &Inventory,
) -> Result<BTreeMap<u64, Src>> {
    let mm = &mms[&pid];
    let mut out = BTreeMap::new();
    let mut add = |r: &PagemapEntry, src: &dyn Fn(u64) -> Result<Src>| -> Result<()> {
        if !in_lazy_vma(mm, r) {
            return Ok(());
        }
        for a in (r.vaddr..r.vaddr + r.nr_pages * PAGE).step_by(PAGE as usize) {
            out.insert(a, src(a)?);
        }
        Ok(())
    };
    for r in &mm.pagemap {
        add(r, &|a| {
            Ok(Src {
                pid,
                remote: false,
                addr: a,
            })
        })?;
    }
    for r in &mm.lazy_pages {
        add(r, &|a| {
            Ok(Src {
                pid,
                remote: true,
                addr: a,
            })
        })?;
    }
    // Pages the task shared with its parent: in the image of the nearest
    // ancestor that held them itself.
    let resolve = |a: u64| -> Result<Src> {
        let mut p = pid;
        loop {
            let ppid = inv.tasks.iter().find(|t| t.pid == p).map_or(0, |t| t.ppid);
            let Some(pm) = mms.get(&ppid) else {
                bail!(
                    "task {pid}: the page at {a:#x} is its parent's, and no ancestor's image holds it; the images are corrupt"
                );
            };
            let has = |runs: &[PagemapEntry]| {
                runs.iter()
                    .any(|r| r.vaddr <= a && a < r.vaddr + r.nr_pages * PAGE)
            };
            if has(&pm.pagemap) {
                return Ok(Src {
                    pid: ppid,
                    remote: false,
                    addr: a,
                });
            }
            if !has(&pm.parent_pages) {
                bail!(
                    "task {pid}: the page at {a:#x} is its parent's, and no ancestor's image holds it; the images are corrupt"
                );
            }
            p = ppid;
        }
    };
    for r in &mm.parent_pages {
        add(r, &resolve)?;
    }
    Ok(out)
}

/// Connects to the dump serving the pages (with TLS when asked) and
/// takes its greeting: it is a crust dump --lazy-pages that took this
/// side's certificate, serving the `pages` lazy pages the images name.
fn connect_dump(src: &PageSource, pages: u64, dir: &Path) -> Result<Box<dyn crate::tls::Stream>> {
    let addr = src.addr;
    // The dump listens once its images are written: some grace.
    let t = Instant::now();
    let c = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(c) => break c,
            Err(e) if t.elapsed() < Duration::from_secs(10) => {
                tracing::debug!("connecting to {addr}: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                bail!("connecting to the dump's page server at {addr} (dump --lazy-pages): {e}")
            }
        }
    };
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    let peer = format!("the dump at {addr}");
    let mut conn = crate::tls::connect(c, src.tls.as_ref(), &src.address, &peer)?;
    let mut g = [0u8; GREETING_LEN];
    conn.read_exact(&mut g)
        .map_err(|e| crate::tls::conn_error(&peer, e))?;
    let u32_at = |i: usize| u32::from_le_bytes(g[i..i + 4].try_into().unwrap());
    if u32_at(0) != MAGIC {
        bail!(
            "{peer} is no crust dump --lazy-pages (it greeted with {:#x})",
            u32_at(0)
        );
    }
    if u32_at(4) != VERSION {
        bail!(
            "{peer} speaks lazy page protocol {}, this crust {VERSION}; use the same crust on both sides",
            u32_at(4)
        );
    }
    let serves = u64::from_le_bytes(g[8..16].try_into().unwrap());
    if serves != pages {
        bail!(
            "{peer} serves {serves} lazy pages, the images in {} name {pages}; give lazy-pages the images of that dump",
            dir.display()
        );
    }
    tracing::info!("connected to {peer}");
    Ok(conn)
}

/// `crust lazy-pages`: serves the userfaultfds of one lazy restore until
/// every page is in. Returns when they are (or the tree is gone); fails,
/// killing the tree, when the page source fails.
pub fn daemon(opts: &DaemonOpts) -> Result<()> {
    let dir = ImageDir::open(&opts.dir)?;
    let inv: Inventory = dir.read_msg(ImageKind::Inventory, 0)?;
    let mut mms = HashMap::new();
    let mut images = HashMap::new();
    for t in inv.tasks.iter().filter(|t| !t.zombie) {
        let mm: MmEntry = dir.read_msg(ImageKind::Mm, t.pid)?;
        images.insert(t.pid, load_image(&dir, t.pid, &mm)?);
        mms.insert(t.pid, mm);
    }
    let remote_pages: u64 = mms
        .values()
        .flat_map(|m| &m.lazy_pages)
        .map(|r| r.nr_pages)
        .sum();
    let remote = match &opts.page_server {
        Some(src) => Some(connect_dump(src, remote_pages, &opts.dir)?),
        None if remote_pages > 0 => crate::refuse!(
            "the images in {} were dumped with --lazy-pages: their private memory is with the dump; run lazy-pages with --page-server --address A --port P",
            opts.dir.display()
        ),
        None => None,
    };
    let step = if remote.is_some() {
        STEP_REMOTE
    } else {
        STEP_LOCAL
    };
    let sources = Sources {
        images,
        remote,
        from_images: 0,
        from_remote: 0,
    };
    let _ = std::fs::remove_file(&opts.socket);
    let listener = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    nix::sys::socket::bind(listener.as_raw_fd(), &UnixAddr::new(&opts.socket)?)
        .with_context(|| format!("binding {}", opts.socket.display()))?;
    nix::sys::socket::listen(&listener, Backlog::new(1)?)?;
    tracing::info!(
        "lazy-pages: waiting for a restore on {}",
        opts.socket.display()
    );
    let t = Instant::now();
    let ctl = loop {
        match nix::sys::socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: a new fd accept just gave us.
            Ok(fd) => break unsafe { OwnedFd::from_raw_fd(fd) },
            Err(nix::errno::Errno::EAGAIN) if t.elapsed() < CONNECT_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(nix::errno::Errno::EAGAIN) => {
                let _ = std::fs::remove_file(&opts.socket);
                bail!(
                    "no restore --lazy-pages connected to {} within {} s",
                    opts.socket.display(),
                    CONNECT_TIMEOUT.as_secs()
                )
            }
            Err(e) => bail!("accepting a restore on {}: {e}", opts.socket.display()),
        }
    };
    drop(listener);
    let _ = std::fs::remove_file(&opts.socket);
    let mut d = Daemon {
        served: Vec::new(),
        sources,
        pidfds: Vec::new(),
        buf: Vec::new(),
        ctl: None,
        bufs: Vec::new(),
        faults: 0,
        busy: false,
    };
    let r = d.run(&ctl, &mms, &inv, step);
    match r {
        Ok(true) => {
            d.sources.bye();
            let _ = send_with_fd(ctl.as_raw_fd(), &[MSG_ALL_IN], &[]);
            tracing::info!(
                "lazy-pages: every page is in after {:?} ({} MiB from the images, {} MiB from the dump, {} faults served)",
                t.elapsed(),
                d.sources.from_images >> 20,
                d.sources.from_remote >> 20,
                d.faults
            );
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(e) => {
            // The tree cannot run without its memory: it ends here rather
            // than read zeros where its pages should be.
            kill_tree(&d.pidfds);
            let pids: Vec<String> = d.pidfds.iter().map(|(p, _)| p.to_string()).collect();
            if pids.is_empty() {
                return Err(e);
            }
            Err(e.context(format!(
                "killed the restored tree (PIDs {}): it cannot run without its memory",
                pids.join(", ")
            )))
        }
    }
}

struct Daemon {
    served: Vec<Served>,
    sources: Sources,
    pidfds: Vec<(i32, OwnedFd)>,
    buf: Vec<u8>,
    /// The restore's connection, while the watcher is at its other end.
    ctl: Option<RawFd>,
    /// The answers of one background step from a page server.
    bufs: Vec<Vec<u8>>,
    faults: u64,
    /// A copy met an mm that is changing: its event is next.
    busy: bool,
}

impl Daemon {
    /// The event loop: faults first, the rest in the background once the
    /// tree runs. Ok(true) when every page is in, Ok(false) when there is
    /// nothing to serve (the restore failed, or the tree is gone).
    fn run(
        &mut self,
        ctl: &OwnedFd,
        mms: &HashMap<i32, MmEntry>,
        inv: &Inventory,
        step: u64,
    ) -> Result<bool> {
        let mut running = false;
        let mut ctl_open = true;
        self.ctl = Some(ctl.as_raw_fd());
        let mut next = 0usize;
        // Rounds in a row whose background copy found its memory gone
        // (moved or unmapped, the event not read yet).
        let mut stalled = 0u32;
        loop {
            let busy = running && self.served.iter().any(|s| !s.dead && !s.pending.is_empty());
            if running && !busy {
                return Ok(true);
            }
            let mut fds: Vec<nix::poll::PollFd> = Vec::new();
            if ctl_open {
                fds.push(nix::poll::PollFd::new(
                    ctl.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                ));
            }
            for s in &self.served {
                fds.push(nix::poll::PollFd::new(
                    s.uffd.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                ));
            }
            let timeout = if busy && stalled < 100 {
                nix::poll::PollTimeout::ZERO
            } else {
                nix::poll::PollTimeout::from(100u16)
            };
            match nix::poll::poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => bail!("poll: {e}"),
            }
            let ready: Vec<bool> = fds
                .iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            drop(fds);
            // Served at the poll: new ones (a task's, a fork's) wait a round.
            let n = self.served.len();
            let mut events = false;
            let mut at = 0;
            if ctl_open {
                if ready[0] {
                    match recv_with_fd(ctl.as_raw_fd(), MsgFlags::MSG_DONTWAIT) {
                        Ok(Some((m, fds))) => self.control(&m, fds, mms, inv, &mut running)?,
                        Ok(None) | Err(_) if !running => {
                            tracing::info!("lazy-pages: the restore ended before the tree ran");
                            return Ok(false);
                        }
                        // The watcher is gone; the tree still needs its pages.
                        _ => {
                            ctl_open = false;
                            self.ctl = None;
                        }
                    }
                    events = true;
                }
                at = 1;
            }
            for i in 0..n {
                if ready[at + i] {
                    events = true;
                    self.events(i)?;
                }
            }
            self.served.retain(|s| !s.dead);
            if running && !events && !self.served.is_empty() {
                next = (next + 1) % self.served.len();
                self.busy = false;
                if self.background(next, step)? {
                    stalled = 0;
                } else if !self.busy {
                    stalled += 1;
                }
                // Memory that stays unregistered with no event to say why
                // (about ten seconds of looking): its pages are not placed.
                if stalled >= 200 {
                    let first = self.served[next].pending.keys().next().copied();
                    if let Some((addr, (_, len))) =
                        first.and_then(|a| Some((a, self.run_at(next, a, u64::MAX, u64::MAX)?)))
                    {
                        let s = &mut self.served[next];
                        for a in (addr..addr + len).step_by(PAGE as usize) {
                            s.pending.remove(&a);
                        }
                        tracing::warn!(
                            "task {}: the lazy pages at {addr:#x} ({len} bytes) are no longer registered; left out",
                            s.pid
                        );
                    }
                    stalled = 0;
                }
            }
        }
    }

    fn control(
        &mut self,
        m: &[u8],
        fds: Vec<OwnedFd>,
        mms: &HashMap<i32, MmEntry>,
        inv: &Inventory,
        running: &mut bool,
    ) -> Result<()> {
        let mut fds = fds.into_iter();
        match (m.first(), fds.next(), fds.next()) {
            (Some(&MSG_TASK), Some(uffd), Some(pidfd)) if m.len() == 5 => {
                let pid = i32::from_le_bytes(m[1..5].try_into().unwrap());
                if !mms.contains_key(&pid) {
                    bail!(
                        "a restore sent the userfaultfd of PID {pid}, which these images do not hold; give lazy-pages the restore's -D"
                    );
                }
                nix::fcntl::fcntl(
                    uffd.as_raw_fd(),
                    nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                )?;
                let pending = pending_of(pid, mms, inv)?;
                tracing::debug!("task {pid}: {} lazy pages", pending.len());
                self.pidfds.push((pid, pidfd));
                self.served.push(Served {
                    uffd,
                    pid,
                    pending,
                    dead: false,
                });
                // A task's memory registered, the tree not yet running: a
                // test kills the daemon here.
                crate::dump::fault_point("lazy-registered");
            }
            (Some(&MSG_DONE), _, _) => *running = true,
            _ => bail!("an unknown message on the lazy-pages socket"),
        }
        Ok(())
    }

    /// Reads and handles every event queued on served[i]'s userfaultfd.
    fn events(&mut self, i: usize) -> Result<()> {
        let mut msg = [0u8; UFFD_MSG_LEN];
        loop {
            let fd = self.served[i].uffd.as_raw_fd();
            // SAFETY: read(2) of one uffd_msg into our buffer.
            let n = unsafe { libc::read(fd, msg.as_mut_ptr().cast(), UFFD_MSG_LEN) };
            if n != UFFD_MSG_LEN as isize {
                return Ok(());
            }
            let word = |o: usize| u64::from_le_bytes(msg[o..o + 8].try_into().unwrap());
            match msg[0] {
                UFFD_EVENT_PAGEFAULT => {
                    self.faults += 1;
                    self.fault(i, word(16) & !(PAGE - 1))?;
                }
                UFFD_EVENT_FORK => {
                    let ufd = u32::from_le_bytes(msg[8..12].try_into().unwrap()) as RawFd;
                    // SAFETY: the kernel installed this fd in our table for
                    // the event.
                    let uffd = unsafe { OwnedFd::from_raw_fd(ufd) };
                    nix::fcntl::fcntl(
                        uffd.as_raw_fd(),
                        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                    )?;
                    // The watcher holds it too: should the daemon die, the
                    // child's faults wait for the watcher to kill the tree
                    // instead of reading zeros.
                    if let Some(ctl) = self.ctl {
                        let _ = send_with_fd(ctl, &[MSG_FORK], &[uffd.as_raw_fd()]);
                    }
                    // What the parent still missed, its child misses too.
                    let s = &self.served[i];
                    let child = Served {
                        uffd,
                        pid: s.pid,
                        pending: s.pending.clone(),
                        dead: false,
                    };
                    self.served.push(child);
                    // A fork of the tree handled: a test kills the daemon here.
                    crate::dump::fault_point("lazy-forked");
                }
                UFFD_EVENT_REMAP => {
                    let (from, to, len) = (word(8), word(16), word(24));
                    let p = &mut self.served[i].pending;
                    let moved: Vec<(u64, Src)> =
                        p.range(from..from + len).map(|(&a, &s)| (a, s)).collect();
                    for (a, s) in moved {
                        p.remove(&a);
                        p.insert(a - from + to, s);
                    }
                }
                UFFD_EVENT_REMOVE | UFFD_EVENT_UNMAP => {
                    // Those pages read as zeros now (or are no more).
                    let (start, end) = (word(8), word(16));
                    let p = &mut self.served[i].pending;
                    let gone: Vec<u64> = p.range(start..end).map(|(&a, _)| a).collect();
                    for a in gone {
                        p.remove(&a);
                    }
                }
                _ => {}
            }
        }
    }

    /// The run of pending pages from `addr` on (consecutive there and at
    /// their source), at most `max` bytes and not past `limit`.
    fn run_at(&self, i: usize, addr: u64, max: u64, limit: u64) -> Option<(Src, u64)> {
        let p = &self.served[i].pending;
        let first = *p.get(&addr)?;
        let mut len = PAGE;
        for (&a, s) in p.range(addr + PAGE..) {
            if a != addr + len
                || len >= max
                || a >= limit
                || s.pid != first.pid
                || s.remote != first.remote
                || s.addr != first.addr + len
            {
                break;
            }
            len += PAGE;
        }
        Some((first, len))
    }

    /// Places the run of `len` bytes at `addr` from `src`; true if any of
    /// it was placed (or found there already).
    fn copy_run(&mut self, i: usize, addr: u64, src: Src, len: u64) -> Result<bool> {
        if let Some((p, n)) = self.sources.mapped(src, len).map(|m| (m.as_ptr(), m.len())) {
            self.sources.from_images += len;
            // SAFETY: the image mapping lives as long as the daemon; the
            // slice is detached from the borrow of `self.sources` only so
            // that `self.served` can change while it is placed, which does
            // not touch the images.
            let from = unsafe { std::slice::from_raw_parts(p, n) };
            return self.place_run(i, addr, from);
        }
        let mut buf = std::mem::take(&mut self.buf);
        let fetched = self.sources.fetch(src, len, &mut buf);
        let placed = match fetched {
            Ok(()) => self.place_run(i, addr, &buf),
            Err(e) => Err(e.context(format!("fetching pages at {addr:#x} of task {}", src.pid))),
        };
        self.buf = buf;
        placed
    }

    /// Places the pages `from` at `addr` of served[i]; true if any of it
    /// was placed (or found there already).
    fn place_run(&mut self, i: usize, addr: u64, from: &[u8]) -> Result<bool> {
        let len = from.len() as u64;
        let fd = self.served[i].uffd.as_raw_fd();
        let mut done = 0;
        let mut progress = false;
        while done < len {
            let placed = place(fd, addr + done, Some(&from[done as usize..]), len - done)?;
            let (n, skip) = match placed {
                Placed::Done => (len - done, 0),
                // Faulted in meanwhile, or a zero page: it stays.
                Placed::Exists(n) => (n, PAGE),
                Placed::Gone(n) | Placed::Busy(n) => {
                    for a in (addr + done..addr + done + n).step_by(PAGE as usize) {
                        self.served[i].pending.remove(&a);
                    }
                    if matches!(placed, Placed::Busy(_)) {
                        self.busy = true;
                    }
                    return Ok(progress || n > 0);
                }
                Placed::Dead => {
                    self.served[i].dead = true;
                    return Ok(true);
                }
            };
            for a in (addr + done..addr + done + n + skip).step_by(PAGE as usize) {
                self.served[i].pending.remove(&a);
            }
            progress = true;
            done += n + skip;
        }
        Ok(progress)
    }

    /// A task waits for the page at `addr`: its aligned block's pending
    /// pages go in (the page first); a page with nothing to place reads
    /// as zeros.
    fn fault(&mut self, i: usize, addr: u64) -> Result<()> {
        let block = addr & !(FAULT_BLOCK - 1);
        if let Some((src, len)) = self.run_at(i, addr, FAULT_BLOCK, block + FAULT_BLOCK) {
            self.copy_run(i, addr, src, len)?;
        }
        let fd = self.served[i].uffd.as_raw_fd();
        if self.served[i].pending.contains_key(&addr) || self.served[i].dead {
            // Gone under us (an event follows), or the task died.
            wake(fd, addr, PAGE);
            return Ok(());
        }
        // Placed above, placed before, or never in the images: a zero page
        // where nothing is, and a wake-up either way.
        match place(fd, addr, None, PAGE)? {
            Placed::Dead => self.served[i].dead = true,
            _ => wake(fd, addr, PAGE),
        }
        // The rest of the block, behind the faulting page.
        let mut a = block;
        while a < block + FAULT_BLOCK {
            match self.run_at(i, a, FAULT_BLOCK, block + FAULT_BLOCK) {
                Some((src, len)) => {
                    self.copy_run(i, a, src, len)?;
                    a += len;
                }
                None => a += PAGE,
            }
        }
        Ok(())
    }

    /// One step of the background copy in served[i]; false when it made no
    /// progress (its memory moved, and the event is still to be read).
    fn background(&mut self, i: usize, step: u64) -> Result<bool> {
        if self.sources.remote.is_some() {
            return self.background_remote(i, step);
        }
        let mut budget = step;
        let mut progress = false;
        while budget > 0 {
            let Some((&addr, _)) = self.served[i].pending.iter().next() else {
                return Ok(true);
            };
            let Some((src, len)) = self.run_at(i, addr, budget, u64::MAX) else {
                return Ok(progress);
            };
            if !self.copy_run(i, addr, src, len)? {
                return Ok(progress);
            }
            progress = true;
            budget = budget.saturating_sub(len);
            if self.served[i].dead {
                return Ok(true);
            }
        }
        Ok(progress)
    }

    /// The background step from a page server: the next runs asked for
    /// all at once (the dump answers one while the next travels), then
    /// placed in turn.
    fn background_remote(&mut self, i: usize, step: u64) -> Result<bool> {
        let mut runs = Vec::new();
        let mut total = 0;
        let mut at = 0;
        while total < step && runs.len() < REMOTE_IN_FLIGHT {
            let Some((&addr, _)) = self.served[i].pending.range(at..).next() else {
                break;
            };
            let Some((src, len)) = self.run_at(i, addr, REMOTE_RUN, u64::MAX) else {
                break;
            };
            runs.push((addr, src, len));
            total += len;
            at = addr + len;
        }
        if runs.is_empty() {
            return Ok(true);
        }
        let asks: Vec<(Src, u64)> = runs.iter().map(|&(_, s, l)| (s, l)).collect();
        let mut bufs = std::mem::take(&mut self.bufs);
        if let Err(e) = self.sources.fetch_many(&asks, &mut bufs) {
            self.bufs = bufs;
            return Err(e.context(format!("fetching pages of task {}", runs[0].1.pid)));
        }
        let mut progress = false;
        let mut placed = Ok(());
        for (&(addr, _, _), data) in runs.iter().zip(&bufs) {
            match self.place_run(i, addr, data) {
                Ok(true) if !self.served[i].dead => progress = true,
                // Gone, busy or dead: the rest waits for the events.
                Ok(p) => {
                    progress |= p;
                    break;
                }
                Err(e) => {
                    placed = Err(e);
                    break;
                }
            }
        }
        self.bufs = bufs;
        placed.map(|_| progress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(vaddr: u64, nr_pages: u64) -> PagemapEntry {
        PagemapEntry { vaddr, nr_pages }
    }

    #[test]
    fn covered_needs_every_byte_in_some_run() {
        let runs = [run(0x1000, 2), run(0x3000, 1), run(0x10000, 4)];
        assert!(covered(&runs, 0x1000, 0x3000));
        assert!(covered(&runs, 0x11000, 0x2000));
        assert!(!covered(&runs, 0x1000, 0x4000));
        assert!(!covered(&runs, 0x13000, 0x2000));
        assert!(!covered(&runs, 0x0, 0x1000));
    }

    #[test]
    fn split_lazy_moves_private_anonymous_runs_only() {
        let anon = VmaEntry {
            start: 0x10000,
            end: 0x20000,
            prot: 3,
            kind: VmaKind::VmaAnonPrivate as i32,
            ..Default::default()
        };
        let shared = VmaEntry {
            start: 0x30000,
            end: 0x40000,
            prot: 3,
            kind: VmaKind::VmaAnonShared as i32,
            ..Default::default()
        };
        let stack = VmaEntry {
            start: 0x50000,
            end: 0x60000,
            prot: 3,
            growsdown: true,
            kind: VmaKind::VmaAnonPrivate as i32,
            ..Default::default()
        };
        let mut mm = MmEntry {
            vmas: vec![anon, shared, stack],
            pagemap: vec![run(0x10000, 2), run(0x30000, 1), run(0x50000, 1)],
            parent_pages: vec![run(0x14000, 1)],
            ..Default::default()
        };
        split_lazy(&mut mm);
        assert_eq!(mm.pagemap, vec![run(0x30000, 1), run(0x50000, 1)]);
        assert!(mm.parent_pages.is_empty());
        assert_eq!(mm.lazy_pages, vec![run(0x10000, 2), run(0x14000, 1)]);
    }
}

//! What every kind of socket shares: a copy of the task's socket to look at
//! (pidfd_getfd: the same socket, not a new one), its domain, type and
//! protocol, the socket options programs set (`SockOpts`, dumped and set
//! again for every family), and a client of the kernel's sock_diag netlink
//! interface, which describes sockets from outside (addresses, peers,
//! queues, pending connections).
//!
//! Each family is a module of its own implementing `files::FileKind`
//! (`unix_sk`, `inet_sk`, ...); it claims an fd with `socket_of` and asks
//! sock_diag about it with `SockDiag::query`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result, bail};

use super::files::FdProbe;
use crate::images::pb::SockOpts;

/// A socket of the task, as its kind sees it at dump.
pub struct SocketProbe {
    /// A copy of the task's fd: the same socket.
    pub fd: OwnedFd,
    /// AF_*, SOCK_* (without the flags), and the protocol.
    pub domain: i32,
    pub kind: i32,
    pub protocol: i32,
    /// Its inode (socket:[INO]), which sock_diag names it by.
    pub ino: u64,
}

/// The socket behind a probed fd, or None when the fd is no socket.
pub fn socket_of(p: &FdProbe) -> Result<Option<SocketProbe>> {
    let Some(ino) = p
        .link
        .strip_prefix("socket:[")
        .and_then(|s| s.strip_suffix(']'))
        .and_then(|s| s.parse().ok())
    else {
        return Ok(None);
    };
    let pidfd = crate::sys::pidfd_open(p.pid)?;
    let fd = crate::sys::pidfd_getfd(&pidfd, p.fd)
        .with_context(|| format!("taking a copy of PID {} fd {} ({})", p.pid, p.fd, p.link))?;
    let int = |opt| getsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, opt);
    Ok(Some(SocketProbe {
        domain: int(libc::SO_DOMAIN)?,
        kind: int(libc::SO_TYPE)?,
        protocol: int(libc::SO_PROTOCOL)?,
        ino,
        fd,
    }))
}

/// An int-valued socket option.
pub fn getsockopt_int(fd: RawFd, level: i32, opt: i32) -> Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into v.
    if unsafe {
        libc::getsockopt(
            fd,
            level,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    } < 0
    {
        bail!(
            "getsockopt({level}, {opt}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(v)
}

/// Sets an int-valued socket option.
pub fn setsockopt_int(fd: RawFd, level: i32, opt: i32, v: i32, what: &str) -> Result<()> {
    // SAFETY: setsockopt reads one int.
    if unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } < 0
    {
        bail!("setting {what} to {v}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reads a socket option into a buffer; its bytes.
pub fn getsockopt_bytes(fd: RawFd, level: i32, opt: i32, max: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; max];
    let mut len = max as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into buf.
    if unsafe { libc::getsockopt(fd, level, opt, buf.as_mut_ptr().cast(), &mut len) } < 0 {
        bail!(
            "getsockopt({level}, {opt}): {}",
            std::io::Error::last_os_error()
        );
    }
    buf.truncate(len as usize);
    Ok(buf)
}

/// Sets a socket option from bytes.
pub fn setsockopt_bytes(fd: RawFd, level: i32, opt: i32, v: &[u8], what: &str) -> Result<()> {
    // SAFETY: setsockopt reads `v.len()` bytes.
    if unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            v.as_ptr().cast(),
            v.len() as libc::socklen_t,
        )
    } < 0
    {
        bail!("setting {what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn timeval_us(b: &[u8]) -> i64 {
    if b.len() < 16 {
        return 0;
    }
    let sec = i64::from_ne_bytes(b[0..8].try_into().unwrap());
    let usec = i64::from_ne_bytes(b[8..16].try_into().unwrap());
    sec * 1_000_000 + usec
}

fn timeval_bytes(us: i64) -> Vec<u8> {
    let mut b = (us / 1_000_000).to_ne_bytes().to_vec();
    b.extend_from_slice(&(us % 1_000_000).to_ne_bytes());
    b
}

/// The options of the SOL_SOCKET level that programs set, for any family.
pub fn dump_sock_opts(fd: RawFd) -> Result<SockOpts> {
    let int = |opt| getsockopt_int(fd, libc::SOL_SOCKET, opt);
    let linger = getsockopt_bytes(fd, libc::SOL_SOCKET, libc::SO_LINGER, 8)?;
    let device = getsockopt_bytes(fd, libc::SOL_SOCKET, libc::SO_BINDTODEVICE, libc::IFNAMSIZ)
        .unwrap_or_default();
    // The kernel doubles what was asked for and reports the doubled value.
    Ok(SockOpts {
        sndbuf: int(libc::SO_SNDBUF)? as u32,
        rcvbuf: int(libc::SO_RCVBUF)? as u32,
        reuseaddr: int(libc::SO_REUSEADDR)? != 0,
        reuseport: int(libc::SO_REUSEPORT)? != 0,
        keepalive: int(libc::SO_KEEPALIVE)? != 0,
        broadcast: int(libc::SO_BROADCAST)? != 0,
        oobinline: int(libc::SO_OOBINLINE)? != 0,
        dontroute: int(libc::SO_DONTROUTE)? != 0,
        // Only unix and netlink sockets have it (others say EOPNOTSUPP).
        passcred: int(libc::SO_PASSCRED).is_ok_and(|v| v != 0),
        priority: int(libc::SO_PRIORITY)?,
        rcvlowat: int(libc::SO_RCVLOWAT)?,
        mark: int(libc::SO_MARK)? as u32,
        linger_on: i32::from_ne_bytes(linger[0..4].try_into().unwrap_or([0; 4])) != 0,
        linger_secs: i32::from_ne_bytes(linger[4..8].try_into().unwrap_or([0; 4])),
        rcvtimeo_us: timeval_us(&getsockopt_bytes(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            16,
        )?),
        sndtimeo_us: timeval_us(&getsockopt_bytes(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            16,
        )?),
        bind_device: String::from_utf8_lossy(&device)
            .trim_end_matches('\0')
            .to_string(),
        peek_off: int(libc::SO_PEEK_OFF).unwrap_or(-1),
        // Kernels before 5.14 lack it: then nothing was locked but by
        // setting a size, which SO_*BUFFORCE locks again.
        buf_lock: int(SO_BUF_LOCK).unwrap_or(-1) as u32,
        no_check: int(libc::SO_NO_CHECK)? != 0,
        passsec: int(libc::SO_PASSSEC).is_ok_and(|v| v != 0),
        filter: dump_filter(fd)?,
        lock_filter: int(libc::SO_LOCK_FILTER)? != 0,
        timestamp: int(libc::SO_TIMESTAMP)? != 0,
        timestampns: int(libc::SO_TIMESTAMPNS)? != 0,
        rxq_ovfl: int(libc::SO_RXQ_OVFL)? != 0,
    })
}

/// SO_BUF_LOCK (since 5.14), which the libc crate lacks.
const SO_BUF_LOCK: i32 = 72;

/// The classic BPF filter attached with SO_ATTACH_FILTER, as its
/// instructions (8 bytes each); empty when there is none.
fn dump_filter(fd: RawFd) -> Result<Vec<u8>> {
    let mut n: libc::socklen_t = 0;
    // SAFETY: with a zero length SO_GET_FILTER only reports the number of
    // instructions in `n`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_GET_FILTER,
            std::ptr::null_mut(),
            &mut n,
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EACCES) {
            bail!("it has an eBPF socket filter (SO_ATTACH_BPF), which cannot be read back");
        }
        bail!("reading its socket filter: {e}");
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; n as usize * 8];
    // SAFETY: the buffer holds `n` struct sock_filter; the kernel writes at
    // most that many and reports their number in `n`.
    if unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_GET_FILTER,
            buf.as_mut_ptr().cast(),
            &mut n,
        )
    } < 0
    {
        bail!(
            "reading its socket filter: {}",
            std::io::Error::last_os_error()
        );
    }
    buf.truncate(n as usize * 8);
    Ok(buf)
}

/// Attaches a classic BPF filter again (SO_ATTACH_FILTER).
fn restore_filter(fd: RawFd, filter: &[u8]) -> Result<()> {
    // struct sock_fprog: the number of instructions and a pointer to them.
    #[repr(C)]
    struct SockFprog {
        len: u16,
        filter: *const u8,
    }
    let prog = SockFprog {
        len: (filter.len() / 8) as u16,
        filter: filter.as_ptr(),
    };
    // SAFETY: the kernel reads `prog` and the `len` instructions it points
    // to, all alive for the call.
    if unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const SockFprog).cast(),
            std::mem::size_of::<SockFprog>() as libc::socklen_t,
        )
    } < 0
    {
        bail!(
            "attaching its socket filter: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Sets the buffer sizes (forced: crust is privileged, and they come back
/// exactly) and then which of them the program had fixed (SO_BUF_LOCK:
/// forcing a size fixes it).
pub fn restore_buffers(fd: RawFd, o: &SockOpts) -> Result<()> {
    let set = |opt, v: i32, what| setsockopt_int(fd, libc::SOL_SOCKET, opt, v, what);
    if o.sndbuf != 0 {
        set(libc::SO_SNDBUFFORCE, (o.sndbuf / 2) as i32, "SO_SNDBUF")?;
    }
    if o.rcvbuf != 0 {
        set(libc::SO_RCVBUFFORCE, (o.rcvbuf / 2) as i32, "SO_RCVBUF")?;
    }
    if o.buf_lock != u32::MAX {
        set(SO_BUF_LOCK, o.buf_lock as i32, "SO_BUF_LOCK")?;
    }
    Ok(())
}

/// Sets the SOL_SOCKET options again on a new socket. Buffer sizes are
/// forced (crust is privileged), so that they come back exactly.
pub fn restore_sock_opts(fd: RawFd, o: &SockOpts) -> Result<()> {
    let set = |opt, v: i32, what| setsockopt_int(fd, libc::SOL_SOCKET, opt, v, what);
    restore_buffers(fd, o)?;
    set(libc::SO_REUSEADDR, o.reuseaddr as i32, "SO_REUSEADDR")?;
    set(libc::SO_REUSEPORT, o.reuseport as i32, "SO_REUSEPORT")?;
    set(libc::SO_KEEPALIVE, o.keepalive as i32, "SO_KEEPALIVE")?;
    set(libc::SO_BROADCAST, o.broadcast as i32, "SO_BROADCAST")?;
    set(libc::SO_OOBINLINE, o.oobinline as i32, "SO_OOBINLINE")?;
    set(libc::SO_DONTROUTE, o.dontroute as i32, "SO_DONTROUTE")?;
    if o.passcred {
        set(libc::SO_PASSCRED, 1, "SO_PASSCRED")?;
    }
    set(libc::SO_PRIORITY, o.priority, "SO_PRIORITY")?;
    set(libc::SO_RCVLOWAT, o.rcvlowat.max(1), "SO_RCVLOWAT")?;
    if o.mark != 0 {
        set(libc::SO_MARK, o.mark as i32, "SO_MARK")?;
    }
    let mut linger = (o.linger_on as i32).to_ne_bytes().to_vec();
    linger.extend_from_slice(&o.linger_secs.to_ne_bytes());
    setsockopt_bytes(fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger, "SO_LINGER")?;
    for (opt, us, what) in [
        (libc::SO_RCVTIMEO, o.rcvtimeo_us, "SO_RCVTIMEO"),
        (libc::SO_SNDTIMEO, o.sndtimeo_us, "SO_SNDTIMEO"),
    ] {
        setsockopt_bytes(fd, libc::SOL_SOCKET, opt, &timeval_bytes(us), what)?;
    }
    if !o.bind_device.is_empty() {
        setsockopt_bytes(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            o.bind_device.as_bytes(),
            "SO_BINDTODEVICE",
        )
        .with_context(|| format!("the device {} is gone?", o.bind_device))?;
    }
    if o.no_check {
        set(libc::SO_NO_CHECK, 1, "SO_NO_CHECK")?;
    }
    if o.passsec {
        set(libc::SO_PASSSEC, 1, "SO_PASSSEC")?;
    }
    for (on, opt, what) in [
        (o.timestamp, libc::SO_TIMESTAMP, "SO_TIMESTAMP"),
        (o.timestampns, libc::SO_TIMESTAMPNS, "SO_TIMESTAMPNS"),
        (o.rxq_ovfl, libc::SO_RXQ_OVFL, "SO_RXQ_OVFL"),
    ] {
        if on {
            set(opt, 1, what)?;
        }
    }
    if !o.filter.is_empty() {
        restore_filter(fd, &o.filter)?;
    }
    if o.lock_filter {
        set(libc::SO_LOCK_FILTER, 1, "SO_LOCK_FILTER")?;
    }
    if o.peek_off >= 0 {
        // Only families with a peek offset take it; the others refuse it.
        let _ = set(libc::SO_PEEK_OFF, o.peek_off, "SO_PEEK_OFF");
    }
    Ok(())
}

/// Gives a socket crust made the owner the dumped one had: sockfs passes
/// the uid on to the socket (sock_diag reports it, the owner match of
/// netfilter reads it).
pub fn set_owner(fd: RawFd, uid: u32, gid: u32, what: &str) -> Result<()> {
    // SAFETY: plain data for which all-zero is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one struct stat.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        bail!("fstat of {what}: {}", std::io::Error::last_os_error());
    }
    if (st.st_uid, st.st_gid) == (uid, gid) {
        return Ok(());
    }
    // SAFETY: fchown(2) on a socket crust made.
    if unsafe { libc::fchown(fd, uid, gid) } < 0 {
        bail!(
            "giving {what} to uid {uid} gid {gid}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// SOCK_DIAG_BY_FAMILY.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_HDR: usize = 16;

/// A client of the kernel's sock_diag interface (NETLINK_SOCK_DIAG), in
/// crust's network namespace (the tree's: a tree in another one is refused
/// before this is asked).
pub struct SockDiag {
    fd: OwnedFd,
    seq: std::cell::Cell<u32>,
}

impl SockDiag {
    pub fn open() -> Result<Self> {
        // SAFETY: socket(2) returns a new fd or -1.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            bail!(
                "opening a sock_diag socket: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: fd was just created and is owned by no one else.
        Ok(SockDiag {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            seq: std::cell::Cell::new(1),
        })
    }

    /// A client in the network namespace of process `pid` (sock_diag
    /// answers about the namespace its socket was made in): made by a
    /// thread of crust's that enters that namespace first.
    pub fn open_for(pid: i32) -> Result<Self> {
        if same_netns(pid) {
            return Self::open();
        }
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
            .with_context(|| format!("opening the network namespace of PID {pid}"))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns(2) on an fd we hold; only this short-lived
                // thread changes its namespace.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                    bail!(
                        "entering the network namespace of PID {pid}: {}",
                        std::io::Error::last_os_error()
                    );
                }
                Self::open()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread opening a sock_diag socket panicked"))?
        })
    }

    /// Sends one SOCK_DIAG_BY_FAMILY request (`req`: the family's request
    /// struct) and returns the payload of every answer (the family's
    /// *_diag_msg followed by its attributes). `dump`: all sockets matching
    /// instead of one exact socket.
    pub fn query(&self, req: &[u8], dump: bool) -> Result<Vec<Vec<u8>>> {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        let len = NLMSG_HDR + req.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | if dump { libc::NLM_F_DUMP } else { 0 }) as u16;
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(req);
        // SAFETY: send(2) of our buffer; the kernel is the only peer.
        if unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            bail!("sock_diag request: {}", std::io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: recv(2) into our buffer.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                bail!("sock_diag answer: {}", std::io::Error::last_os_error());
            }
            let mut at = 0usize;
            let n = n as usize;
            while at + NLMSG_HDR <= n {
                let mlen = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                let mtype = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
                if mlen < NLMSG_HDR || at + mlen > n {
                    bail!("sock_diag: a malformed answer");
                }
                let payload = &buf[at + NLMSG_HDR..at + mlen];
                match mtype as i32 {
                    libc::NLMSG_DONE => return Ok(out),
                    libc::NLMSG_ERROR => {
                        let err = i32::from_ne_bytes(payload[0..4].try_into().unwrap());
                        if err == 0 {
                            return Ok(out);
                        }
                        // ENOENT: no such socket (an exact query).
                        if err == -libc::ENOENT {
                            return Ok(out);
                        }
                        bail!("sock_diag: {}", std::io::Error::from_raw_os_error(-err));
                    }
                    _ => out.push(payload.to_vec()),
                }
                at += (mlen + 3) & !3;
            }
            if !dump {
                return Ok(out);
            }
        }
    }
}

/// The netlink attributes after a fixed-size header of `skip` bytes:
/// (type, payload) each.
pub fn attrs(msg: &[u8], skip: usize) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = (skip + 3) & !3;
    while at + 4 <= msg.len() {
        let len = u16::from_ne_bytes(msg[at..at + 2].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(msg[at + 2..at + 4].try_into().unwrap()) & 0x3fff;
        if len < 4 || at + len > msg.len() {
            break;
        }
        out.push((kind, &msg[at + 4..at + len]));
        at += (len + 3) & !3;
    }
    out
}

/// Whether task `pid` is in crust's network namespace (sock_diag sees only
/// the namespace its socket was made in: `SockDiag::open_for`).
pub fn same_netns(pid: i32) -> bool {
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).ok();
    ns(&pid.to_string()) == ns("self")
}

/// Room for SCM_RIGHTS with the most fds one message carries (SCM_MAX_FD).
pub const RIGHTS_MAX: usize = 253;

/// sendmsg(2) of `data` with the files `fds` (SCM_RIGHTS, at most
/// `RIGHTS_MAX`) on the unix socket `fd`, to `to` when given; the bytes
/// sent.
pub fn send_with_fds(
    fd: RawFd,
    to: Option<(&libc::sockaddr_un, libc::socklen_t)>,
    data: &[u8],
    fds: &[RawFd],
    flags: i32,
) -> std::io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE is arithmetic.
    let space = unsafe { libc::CMSG_SPACE((fds.len() * 4) as u32) } as usize;
    let mut control = vec![0u8; if fds.is_empty() { 0 } else { space }];
    // SAFETY: plain data for which all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some((sa, len)) = to {
        msg.msg_name = (sa as *const libc::sockaddr_un as *mut libc::sockaddr_un).cast();
        msg.msg_namelen = len;
    }
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
        // SAFETY: one SCM_RIGHTS header and its fds, within the control
        // buffer sized by CMSG_SPACE for them.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as usize;
            let data = libc::CMSG_DATA(c) as *mut libc::c_int;
            for (i, &f) in fds.iter().enumerate() {
                data.add(i).write_unaligned(f);
            }
        }
    }
    // SAFETY: sendmsg reads the buffers msg points at, which live until it
    // returns.
    let n = unsafe { libc::sendmsg(fd, &msg, flags) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// recvmsg(2) of one message into `buf` on the unix socket `fd`, with the
/// files it brought (close-on-exec); the length read (0 at the end), the
/// files, and whether some files did not fit (MSG_CTRUNC: they are lost).
pub fn recv_with_fds(
    fd: RawFd,
    buf: &mut [u8],
    flags: i32,
) -> std::io::Result<(usize, Vec<OwnedFd>, bool)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: CMSG_SPACE is arithmetic.
    let mut control = vec![0u8; unsafe { libc::CMSG_SPACE((RIGHTS_MAX * 4) as u32) } as usize];
    // SAFETY: plain data for which all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    // SAFETY: recvmsg writes into the buffers msg points at, which live
    // until it returns.
    let n = unsafe { libc::recvmsg(fd, &mut msg, flags | libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((
        n as usize,
        cmsg_fds(&msg),
        msg.msg_flags & libc::MSG_CTRUNC != 0,
    ))
}

/// The files the SCM_RIGHTS control messages of a received `msg` brought,
/// now crust's.
pub fn cmsg_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote, within
    // msg_controllen; each SCM_RIGHTS payload is an array of new fds.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const libc::c_int;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    fds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_attributes() {
        // A 4-byte header, then a 6-byte attribute (padded to 8) and an
        // 8-byte one.
        let mut m = vec![9u8; 4];
        m.extend_from_slice(&6u16.to_ne_bytes());
        m.extend_from_slice(&3u16.to_ne_bytes());
        m.extend_from_slice(&[1, 2, 0, 0]);
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&(0x8000u16 | 4).to_ne_bytes());
        m.extend_from_slice(&[7, 7, 7, 7]);
        let a = attrs(&m, 4);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0], (3, &[1u8, 2][..]));
        // The nested flag is masked off.
        assert_eq!(a[1], (4, &[7u8, 7, 7, 7][..]));
        // A truncated attribute ends the list.
        assert_eq!(attrs(&m[..m.len() - 2], 4).len(), 1);
    }

    #[test]
    fn sock_diag_answers_for_our_own_socket() {
        use std::os::unix::fs::MetadataExt;
        let d = SockDiag::open().unwrap();
        let l = std::os::unix::net::UnixListener::bind(
            std::env::temp_dir().join(format!("crust-diag-{}", std::process::id())),
        )
        .unwrap();
        let ino = std::fs::metadata(format!("/proc/self/fd/{}", l.as_raw_fd()))
            .unwrap()
            .ino();
        // struct unix_diag_req: family, protocol, pad, states, ino, show, cookie.
        let mut req = vec![libc::AF_UNIX as u8, 0, 0, 0];
        req.extend_from_slice(&u32::MAX.to_ne_bytes());
        req.extend_from_slice(&(ino as u32).to_ne_bytes());
        req.extend_from_slice(&1u32.to_ne_bytes()); // UDIAG_SHOW_NAME
        req.extend_from_slice(&[0xff; 8]);
        let answers = d.query(&req, false).unwrap();
        assert_eq!(answers.len(), 1);
        let ans = &answers[0];
        assert_eq!(
            u32::from_ne_bytes(ans[4..8].try_into().unwrap()) as u64,
            ino
        );
        let name = attrs(ans, 16)
            .into_iter()
            .find(|(k, _)| *k == 0)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap();
        assert!(name.contains("crust-diag-"), "{name}");
        drop(l);
        let _ = std::fs::remove_file(
            std::env::temp_dir().join(format!("crust-diag-{}", std::process::id())),
        );
    }
}

//! TCP: listeners, and connections through TCP repair mode.
//!
//! A connection (`--tcp-established`) is read on the dump's copy of the
//! socket with TCP_REPAIR on: the sequence number at the end of each queue
//! (TCP_REPAIR_QUEUE + TCP_QUEUE_SEQ), both queues' bytes (recv with
//! MSG_PEEK, which in repair mode reads the send queue too, unacknowledged
//! data included), the window (TCP_REPAIR_WINDOW) and the options the two
//! ends negotiated (MSS, window scales, SACK, timestamps and the timestamp
//! clock). Repair mode is left again as soon as that is read, so that a
//! tree that runs on after a crust that died finds its connection usable
//! (the dump's guardian, `crate::guardian`, takes it out of repair mode
//! should crust die while it is in); the frozen tree and the network lock
//! keep the connection as it was read. Once the dump has killed the tree,
//! the connection goes back into repair mode before crust's copy, the
//! last, is closed: the close sends no FIN or reset, and the network lock
//! keeps the peer from meeting a port with no socket. A tree that runs on
//! gets its connection out of repair mode (`leave_repair`) once the lock
//! is lifted, whose window probe gets the peer to answer at once.
//!
//! The restore makes the socket in repair mode, binds it (repair mode
//! forces the reuse of the port), sets both sequence numbers, connects (no
//! packet is sent: the connection is simply established), sets the
//! options, fills the receive queue and the part of the send queue that
//! had been sent, sends the unsent rest out of repair mode, and sets the
//! window. The connection leaves repair mode in `resume`, when the whole
//! tree is rebuilt and the network lock lifted, just before the tree runs:
//! the window probe that sends reaches the peer, whose answer brings both
//! ends up to date at once.
//!
//! Half-closed connections are taken through the states the kernel
//! allows: a FIN of ours is put in the send queue with shutdown(SHUT_WR)
//! (in repair mode: as sent); a FIN of the peer's, and the peer's ACK of
//! ours, are packets crust sends to the socket itself from the peer's
//! address through a raw socket, marked so that the network lock lets them
//! through. A connection still being made (SYN-SENT) connects again with
//! its sequence number, out of repair mode.

use std::os::fd::{AsFd, AsRawFd, RawFd};

use anyhow::{Context, Result, bail};

use super::{InetSocket, Reuse, bind_back, connect_back, show_ends, to_std};
use crate::images::pb::TcpStream;
use crate::resources::files::FdProbe;
use crate::resources::netlock::{Conn, RESTORE_MARK};
use crate::resources::sockets::{
    SocketProbe, getsockopt_bytes, getsockopt_int, restore_buffers, setsockopt_bytes,
    setsockopt_int,
};

pub const TCP_ESTABLISHED: u32 = 1;
pub const TCP_SYN_SENT: u32 = 2;
pub const TCP_FIN_WAIT1: u32 = 4;
pub const TCP_FIN_WAIT2: u32 = 5;
pub const TCP_CLOSE: u32 = 7;
pub const TCP_CLOSE_WAIT: u32 = 8;
pub const TCP_LAST_ACK: u32 = 9;
pub const TCP_LISTEN: u32 = 10;
pub const TCP_CLOSING: u32 = 11;

pub fn state_name(s: u32) -> &'static str {
    match s {
        1 => "ESTABLISHED",
        2 => "SYN-SENT",
        3 => "SYN-RECV",
        4 => "FIN-WAIT-1",
        5 => "FIN-WAIT-2",
        6 => "TIME-WAIT",
        7 => "CLOSE",
        8 => "CLOSE-WAIT",
        9 => "LAST-ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "of no known state",
    }
}

const fn bit(s: u32) -> u32 {
    1 << s
}

/// States whose send queue ends with our FIN: sent first (before the
/// peer's), or second; and those where the peer acknowledged it.
const SNDQ_FIRST_FIN: u32 = bit(TCP_FIN_WAIT1) | bit(TCP_FIN_WAIT2) | bit(TCP_CLOSING);
const SNDQ_SECOND_FIN: u32 = bit(TCP_LAST_ACK) | bit(TCP_CLOSE);
const SNDQ_FIN_ACKED: u32 = bit(TCP_FIN_WAIT2) | bit(TCP_CLOSE);
/// States whose receive queue ends with the peer's FIN, likewise.
const RCVQ_FIRST_FIN: u32 = bit(TCP_CLOSE_WAIT) | bit(TCP_LAST_ACK) | bit(TCP_CLOSE);
const RCVQ_SECOND_FIN: u32 = bit(TCP_CLOSING);
const RCVQ_FIN_ACKED: u32 = bit(TCP_CLOSE);

/// The states of a connection, dumped through repair mode.
const CONNECTED: u32 = bit(TCP_ESTABLISHED)
    | bit(TCP_SYN_SENT)
    | bit(TCP_FIN_WAIT1)
    | bit(TCP_FIN_WAIT2)
    | bit(TCP_CLOSE_WAIT)
    | bit(TCP_LAST_ACK)
    | bit(TCP_CLOSING);

// TCP repair mode (linux/tcp.h).
const TCP_REPAIR_ON: i32 = 1;
const TCP_REPAIR_OFF: i32 = 0;
/// Off without the window probe TCP_REPAIR_OFF sends.
const TCP_REPAIR_OFF_NO_WP: i32 = -1;
const TCP_NO_QUEUE: i32 = 0;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
const TCPI_OPT_TIMESTAMPS: u32 = 1;
const TCPI_OPT_SACK: u32 = 2;
const TCPI_OPT_WSCALE: u32 = 4;
// Queue sizes (linux/sockios.h).
const SIOCINQ: libc::c_ulong = 0x541B;
const SIOCOUTQ: libc::c_ulong = 0x5411;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;

/// The fields of struct tcp_info crust reads.
struct TcpInfo {
    state: u32,
    options: u32,
    snd_wscale: u32,
    rcv_wscale: u32,
    /// For a listener: connections waiting to be accepted, and its backlog.
    unacked: u32,
    sacked: u32,
}

fn tcp_info(fd: RawFd) -> Result<TcpInfo> {
    let b = getsockopt_bytes(fd, libc::SOL_TCP, libc::TCP_INFO, 104)?;
    if b.len() < 32 {
        bail!("TCP_INFO: a short answer ({} bytes)", b.len());
    }
    let u32_at = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().unwrap());
    Ok(TcpInfo {
        state: b[0] as u32,
        options: b[5] as u32,
        snd_wscale: (b[6] & 0xf) as u32,
        rcv_wscale: (b[6] >> 4) as u32,
        unacked: u32_at(24),
        sacked: u32_at(28),
    })
}

fn ioctl_int(fd: RawFd, req: libc::c_ulong, what: &str) -> Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: these ioctls write one int.
    if unsafe { libc::ioctl(fd, req, &mut v) } < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(v as u32)
}

fn repair(fd: RawFd, v: i32) -> Result<()> {
    setsockopt_int(fd, libc::SOL_TCP, libc::TCP_REPAIR, v, "TCP_REPAIR").map_err(|e| {
        if e.to_string().contains("not permitted") {
            e.context("TCP repair mode needs CAP_NET_ADMIN")
        } else {
            e
        }
    })
}

fn repair_queue(fd: RawFd, q: i32) -> Result<()> {
    setsockopt_int(
        fd,
        libc::SOL_TCP,
        libc::TCP_REPAIR_QUEUE,
        q,
        "TCP_REPAIR_QUEUE",
    )
}

/// Whether a socket in `state` is a connection crust takes through repair
/// mode: one being made or established, half-closed, or closed by a reset
/// with bytes still to read.
fn is_connection(state: u32, has_peer: bool, inq: u32) -> bool {
    bit(state) & CONNECTED != 0 || (state == TCP_CLOSE && has_peer && inq > 0)
}

pub fn dump(p: &FdProbe, sk: &SocketProbe, e: &mut InetSocket) -> Result<()> {
    let fd = sk.fd.as_raw_fd();
    let info = tcp_info(fd)?;
    e.state = info.state;
    if let Ok(ulp) = getsockopt_bytes(fd, libc::SOL_TCP, libc::TCP_ULP, 16) {
        let ulp = String::from_utf8_lossy(&ulp)
            .trim_end_matches('\0')
            .to_string();
        if !ulp.is_empty() {
            bail!("it runs the {ulp} upper layer protocol (TCP_ULP), which crust cannot dump");
        }
    }
    let cc = getsockopt_bytes(fd, libc::SOL_TCP, libc::TCP_CONGESTION, 16)?;
    e.congestion = String::from_utf8_lossy(&cc)
        .trim_end_matches('\0')
        .to_string();
    if info.state == TCP_LISTEN {
        if info.unacked > 0 && !p.ctx.skip_in_flight {
            bail!(
                "{} connection(s) wait to be accepted; dump once they are, or with --skip-in-flight (their clients then see them reset)",
                info.unacked
            );
        }
        e.backlog = info.sacked;
        return Ok(());
    }
    let inq = if info.state == TCP_SYN_SENT {
        0
    } else {
        ioctl_int(fd, SIOCINQ, "SIOCINQ")?
    };
    if !is_connection(info.state, e.peer.is_some(), inq) {
        if bit(info.state) & (bit(TCP_CLOSE)) == 0 {
            bail!(
                "it is in TCP state {}, which crust cannot dump",
                state_name(info.state)
            );
        }
        // Closed: never connected, or closed with nothing left to read.
        e.peer = None;
        return Ok(());
    }
    if p.ctx.tcp_close {
        e.closed = true;
        return Ok(());
    }
    if !p.ctx.tcp_established {
        bail!(
            "it is {}; dump with --tcp-established to take it along (TCP repair), or with --tcp-close to restore it closed",
            state_name(info.state)
        );
    }
    // Should crust die from here on, the dump's guardian takes the
    // connection out of repair mode; should the dump fail, or leave the
    // tree running, crust does once the lock is lifted (the window probe
    // leaving repair mode sends then gets the peer to answer at once). It
    // does no harm to a connection out of repair mode.
    let reuse = e.opts.as_ref().is_some_and(|o| o.reuseaddr);
    let copy = std::rc::Rc::new(sk.fd.try_clone()?);
    p.ctx.guardian.repairing(sk.fd.as_fd(), reuse)?;
    let c = copy.clone();
    p.ctx
        .on_resume(Box::new(move || leave_repair(c.as_raw_fd(), reuse)));
    repair(fd, TCP_REPAIR_ON)?;
    crate::dump::fault_point("in-repair");
    let stream = dump_stream(fd, info.state);
    // Out of repair mode again at once, so that a crust dying later leaves
    // the tree a connection it can use the moment it runs. Nothing changes
    // meanwhile: the tree is frozen, and the lock drops every packet (the
    // window probe too, which is why none is sent).
    repair(fd, TCP_REPAIR_OFF_NO_WP)?;
    e.stream = Some(stream.context("reading it in TCP repair mode")?);
    // Back in repair mode once the dump killed the tree, before crust's
    // copy, the last, is closed: the close sends no FIN or reset, and
    // leaves no socket holding the connection's addresses.
    p.ctx
        .on_tree_end(Box::new(move || enter_repair(copy.as_raw_fd())));
    Ok(())
}

/// The connection's repair state, on a socket in repair mode.
fn dump_stream(fd: RawFd, state: u32) -> Result<TcpStream> {
    let info = tcp_info(fd)?;
    if info.state != state {
        bail!(
            "its state changed from {} to {} while it was being dumped",
            state_name(state),
            state_name(info.state)
        );
    }
    let (mut outq, mut unsent, inq) = if state == TCP_SYN_SENT {
        (0, 0, 0)
    } else {
        (
            ioctl_int(fd, SIOCOUTQ, "SIOCOUTQ")?,
            ioctl_int(fd, SIOCOUTQNSD, "SIOCOUTQNSD")?,
            ioctl_int(fd, SIOCINQ, "SIOCINQ")?,
        )
    };
    // A reset connection's send queue cannot be read by anyone any more.
    if state == TCP_CLOSE {
        outq = 0;
        unsent = 0;
    }
    // Our FIN takes a sequence number in the send queue, but no byte.
    if bit(state) & (SNDQ_FIRST_FIN | SNDQ_SECOND_FIN) != 0 {
        outq = outq.saturating_sub(1);
        unsent = unsent.saturating_sub(1);
    }
    let mut st = TcpStream {
        unsent,
        opt_mask: info.options,
        mss: getsockopt_int(fd, libc::SOL_TCP, libc::TCP_MAXSEG)? as u32,
        ..Default::default()
    };
    if info.options & TCPI_OPT_WSCALE != 0 {
        st.snd_wscale = info.snd_wscale;
        st.rcv_wscale = info.rcv_wscale;
    }
    if info.options & TCPI_OPT_TIMESTAMPS != 0 {
        st.timestamp = getsockopt_int(fd, libc::SOL_TCP, libc::TCP_TIMESTAMP)? as u32;
    }
    let w = getsockopt_bytes(fd, libc::SOL_TCP, libc::TCP_REPAIR_WINDOW, 20)?;
    if w.len() == 20 {
        let at = |i: usize| u32::from_ne_bytes(w[i * 4..i * 4 + 4].try_into().unwrap());
        (
            st.snd_wl1,
            st.snd_wnd,
            st.max_window,
            st.rcv_wnd,
            st.rcv_wup,
        ) = (at(0), at(1), at(2), at(3), at(4));
    }
    (st.inq_seq, st.inq) = read_queue(fd, TCP_RECV_QUEUE, inq).context("its receive queue")?;
    (st.outq_seq, st.outq) = read_queue(fd, TCP_SEND_QUEUE, outq).context("its send queue")?;
    Ok(st)
}

/// The sequence number at the end of a queue, and its `len` bytes.
fn read_queue(fd: RawFd, q: i32, len: u32) -> Result<(u32, Vec<u8>)> {
    repair_queue(fd, q)?;
    let seq = getsockopt_int(fd, libc::SOL_TCP, libc::TCP_QUEUE_SEQ)? as u32;
    if len == 0 {
        return Ok((seq, Vec::new()));
    }
    // One byte more than expected: a queue longer than the kernel said
    // shows.
    let mut buf = vec![0u8; len as usize + 1];
    // SAFETY: recv(2) into our buffer; MSG_PEEK leaves the queue as it is.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n != len as isize {
        bail!(
            "reading {len} queued bytes gave {n}: {}",
            std::io::Error::last_os_error()
        );
    }
    buf.truncate(len as usize);
    Ok((seq, buf))
}

/// The TCP connections the tree holds, for the network lock: taken before
/// any of them is put in repair mode.
pub fn tree_connections(pids: &[i32]) -> Result<Vec<Conn>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for &pid in pids {
        let pidfd = crate::sys::pidfd_open(pid).with_context(|| format!("pidfd of {pid}"))?;
        let dir = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("listing /proc/{pid}/fd"))?;
        for ent in dir.flatten() {
            let Ok(fd) = ent.file_name().to_string_lossy().parse::<RawFd>() else {
                continue;
            };
            let Ok(link) = std::fs::read_link(ent.path()) else {
                continue;
            };
            let link = link.to_string_lossy();
            let Some(ino) = link
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
            else {
                continue;
            };
            if !seen.insert(ino.to_string()) {
                continue;
            }
            let copy = crate::sys::pidfd_getfd(&pidfd, fd)
                .with_context(|| format!("taking a copy of PID {pid} fd {fd} ({link})"))?;
            let c = copy.as_raw_fd();
            let int = |level, opt| getsockopt_int(c, level, opt).unwrap_or(-1);
            let domain = int(libc::SOL_SOCKET, libc::SO_DOMAIN);
            if !matches!(domain, libc::AF_INET | libc::AF_INET6)
                || int(libc::SOL_SOCKET, libc::SO_TYPE) != libc::SOCK_STREAM
                || int(libc::SOL_SOCKET, libc::SO_PROTOCOL) != libc::IPPROTO_TCP
            {
                continue;
            }
            let info = tcp_info(c)?;
            let peer = super::peer_addr(c, domain)?;
            let inq = if bit(info.state) & (bit(TCP_LISTEN) | bit(TCP_SYN_SENT)) != 0 {
                0
            } else {
                ioctl_int(c, SIOCINQ, "SIOCINQ")?
            };
            if !is_connection(info.state, peer.is_some(), inq) {
                continue;
            }
            let (Some(local), Some(peer)) = (super::local_addr(c, false)?, peer) else {
                continue;
            };
            if let (Some(l), Some(p)) = (to_std(&local), to_std(&peer)) {
                out.push(Conn::new(l, p));
            }
        }
    }
    Ok(out)
}

/// The connections the images hold, made again in repair mode.
pub fn image_connections<'a>(
    files: impl Iterator<Item = &'a crate::images::pb::fd_entry::File>,
) -> Vec<Conn> {
    files
        .filter_map(|f| match f {
            crate::images::pb::fd_entry::File::Inet(e) if e.stream.is_some() && !e.closed => Some(
                Conn::new(to_std(e.local.as_ref()?)?, to_std(e.peer.as_ref()?)?),
            ),
            _ => None,
        })
        .collect()
}

/// `--tcp-close` at restore: the table's connections come back as closed
/// sockets.
pub fn close_connections(table: &mut crate::images::pb::FdTable) {
    for e in &mut table.fds {
        if let Some(crate::images::pb::fd_entry::File::Inet(s)) = &mut e.file
            && s.stream.is_some()
        {
            s.closed = true;
        }
    }
}

/// Makes a TCP socket of the images again (after its socket options and
/// before its final ones, `finish`).
pub fn restore(fd: RawFd, e: &InetSocket) -> Result<()> {
    if e.state == TCP_LISTEN {
        bind_back(fd, e, Reuse::AddrAndPort)?;
        // SAFETY: listen(2) on our socket.
        if unsafe { libc::listen(fd, e.backlog as i32) } < 0 {
            bail!("listen: {}", std::io::Error::last_os_error());
        }
        return Ok(());
    }
    match &e.stream {
        Some(st) if !e.closed => restore_connection(fd, e, st),
        // Closed, or a connection restored closed (--tcp-close): a socket
        // that was never connected.
        _ if e.closed || e.peer.is_some() => Ok(()),
        _ => bind_back(fd, e, Reuse::AddrAndPort),
    }
}

fn set_queue_seq(fd: RawFd, q: i32, seq: u32) -> Result<()> {
    repair_queue(fd, q)?;
    setsockopt_int(
        fd,
        libc::SOL_TCP,
        libc::TCP_QUEUE_SEQ,
        seq as i32,
        "TCP_QUEUE_SEQ",
    )
}

/// Writes `data` into the queue the socket's repair mode points at (or
/// sends it, out of repair mode). The kernel may take less than asked, or
/// refuse a big piece it cannot allocate in one go: smaller pieces then.
fn send_all(fd: RawFd, data: &[u8], what: &str) -> Result<()> {
    let mut off = 0;
    let mut chunk = data.len().max(1);
    while off < data.len() {
        let n = chunk.min(data.len() - off);
        // SAFETY: send(2) from our buffer.
        let r = unsafe {
            libc::send(
                fd,
                data[off..].as_ptr().cast(),
                n,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if r <= 0 {
            if chunk > 1024 {
                chunk /= 2;
                continue;
            }
            bail!(
                "putting {} bytes back in its {what}: {}",
                data.len() - off,
                std::io::Error::last_os_error()
            );
        }
        off += r as usize;
    }
    Ok(())
}

/// The TCP state the socket is in now.
fn state_now(fd: RawFd) -> Result<u32> {
    Ok(tcp_info(fd)?.state)
}

/// Waits (briefly) until a packet crust sent to the socket has moved it
/// to `want`: over loopback it is handled on its way, or just after.
fn wait_state(fd: RawFd, want: u32) -> Result<()> {
    let t = std::time::Instant::now();
    loop {
        let now = state_now(fd)?;
        if now == want {
            return Ok(());
        }
        if t.elapsed() > std::time::Duration::from_secs(2) {
            bail!(
                "the connection stayed in state {} instead of moving to {}",
                state_name(now),
                state_name(want)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn restore_connection(fd: RawFd, e: &InetSocket, st: &TcpStream) -> Result<()> {
    let (Some(_), Some(peer)) = (&e.local, &e.peer) else {
        bail!("a TCP connection without both its addresses in the images");
    };
    let m = bit(e.state);
    repair(fd, TCP_REPAIR_ON)?;
    bind_back(fd, e, Reuse::Repair)?;
    let (inq_len, outq_len) = (st.inq.len() as u32, st.outq.len() as u32);
    // The FINs are made again below: the sequence numbers before them.
    let mut inq_seq = st.inq_seq;
    let mut outq_seq = st.outq_seq;
    if m & (RCVQ_FIRST_FIN | RCVQ_SECOND_FIN) != 0 {
        inq_seq = inq_seq.wrapping_sub(1);
    }
    if m & (SNDQ_FIRST_FIN | SNDQ_SECOND_FIN) != 0 {
        outq_seq = outq_seq.wrapping_sub(1);
    }
    set_queue_seq(fd, TCP_RECV_QUEUE, inq_seq.wrapping_sub(inq_len))?;
    let mut snd_start = outq_seq.wrapping_sub(outq_len);
    if e.state == TCP_SYN_SENT {
        // The SYN itself takes one.
        snd_start = snd_start.wrapping_sub(1);
    }
    set_queue_seq(fd, TCP_SEND_QUEUE, snd_start)?;
    if e.state == TCP_SYN_SENT {
        // Still being made: the SYN goes out again, with its number.
        repair(fd, TCP_REPAIR_OFF_NO_WP)?;
        connect_back(fd, e, peer)?;
        return repair(fd, TCP_REPAIR_ON);
    }
    // The connect sizes segments by the MSS clamp it finds, and the repair
    // options set later do not size them again: the clamp goes in as the
    // program's own MSS for the connect (which takes at most 32767), and
    // out again after it.
    let user_mss = st.mss.clamp(88, 32767) as i32;
    setsockopt_int(fd, libc::SOL_TCP, libc::TCP_MAXSEG, user_mss, "TCP_MAXSEG")?;
    connect_back(fd, e, peer)?;
    setsockopt_int(fd, libc::SOL_TCP, libc::TCP_MAXSEG, 0, "TCP_MAXSEG")?;
    set_options(fd, st)?;
    // Room for both queues while they are filled (forced: crust is
    // privileged); the dumped sizes come back after.
    let room = (inq_len.max(outq_len) as i32)
        .saturating_mul(2)
        .saturating_add(1 << 20);
    setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        room,
        "SO_RCVBUFFORCE",
    )?;
    setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        room,
        "SO_SNDBUFFORCE",
    )?;
    if !st.inq.is_empty() {
        repair_queue(fd, TCP_RECV_QUEUE)?;
        send_all(fd, &st.inq, "receive queue")?;
    }
    let sent = outq_len.saturating_sub(st.unsent) as usize;
    if sent > 0 {
        repair_queue(fd, TCP_SEND_QUEUE)?;
        send_all(fd, &st.outq[..sent], "send queue")?;
    }
    if sent < st.outq.len() {
        // Never sent: written as any program writes.
        repair(fd, TCP_REPAIR_OFF_NO_WP)?;
        send_all(fd, &st.outq[sent..], "send queue")?;
        repair(fd, TCP_REPAIR_ON)?;
    }
    if let Some(o) = &e.opts {
        restore_buffers(fd, o)?;
    }
    if st.snd_wnd != 0 || st.rcv_wnd != 0 || st.max_window != 0 {
        let (mut rcv_wnd, mut rcv_wup) = (st.rcv_wnd, st.rcv_wup);
        if m & (RCVQ_FIRST_FIN | RCVQ_SECOND_FIN) != 0 {
            // The peer's FIN, still to come, takes a number of the window.
            rcv_wup = rcv_wup.wrapping_sub(1);
            rcv_wnd = rcv_wnd.wrapping_add(1);
        }
        let mut w = Vec::with_capacity(20);
        for v in [st.snd_wl1, st.snd_wnd, st.max_window, rcv_wnd, rcv_wup] {
            w.extend_from_slice(&v.to_ne_bytes());
        }
        setsockopt_bytes(
            fd,
            libc::SOL_TCP,
            libc::TCP_REPAIR_WINDOW,
            &w,
            "TCP_REPAIR_WINDOW",
        )?;
    }
    let snd_una = outq_seq.wrapping_sub(outq_len);
    if m & SNDQ_FIRST_FIN != 0 {
        fin_in_send_queue(fd)?;
    }
    if m & (RCVQ_FIRST_FIN | RCVQ_SECOND_FIN) != 0 {
        let expect = if m & RCVQ_SECOND_FIN != 0 {
            TCP_CLOSING
        } else {
            TCP_CLOSE_WAIT
        };
        send_to_socket(e, st, TH_FIN | TH_ACK, inq_seq, snd_una)?;
        wait_state(fd, expect).context("the peer's FIN")?;
    }
    if m & SNDQ_SECOND_FIN != 0 {
        fin_in_send_queue(fd)?;
    }
    if m & RCVQ_FIN_ACKED != 0 {
        inq_seq = inq_seq.wrapping_add(1);
    }
    if m & SNDQ_FIN_ACKED != 0 {
        // The peer's ACK of our FIN.
        send_to_socket(e, st, TH_ACK, inq_seq, snd_una.wrapping_add(1))?;
        wait_state(fd, e.state).context("the peer's acknowledgement of our FIN")?;
    }
    let now = state_now(fd)?;
    if now != e.state {
        bail!(
            "it came back in state {} instead of {}",
            state_name(now),
            state_name(e.state)
        );
    }
    Ok(())
}

/// The negotiated options, and the timestamp clock where timestamps are on.
fn set_options(fd: RawFd, st: &TcpStream) -> Result<()> {
    let mut opts: Vec<(u32, u32)> = Vec::new();
    if st.opt_mask & TCPI_OPT_SACK != 0 {
        opts.push((TCPOPT_SACK_PERM, 0));
    }
    if st.opt_mask & TCPI_OPT_WSCALE != 0 {
        opts.push((TCPOPT_WINDOW, st.snd_wscale | (st.rcv_wscale << 16)));
    }
    if st.opt_mask & TCPI_OPT_TIMESTAMPS != 0 {
        opts.push((TCPOPT_TIMESTAMP, 0));
    }
    opts.push((TCPOPT_MAXSEG, st.mss));
    let bytes: Vec<u8> = opts
        .iter()
        .flat_map(|(c, v)| c.to_ne_bytes().into_iter().chain(v.to_ne_bytes()))
        .collect();
    setsockopt_bytes(
        fd,
        libc::SOL_TCP,
        libc::TCP_REPAIR_OPTIONS,
        &bytes,
        "TCP_REPAIR_OPTIONS",
    )?;
    if st.opt_mask & TCPI_OPT_TIMESTAMPS != 0 {
        setsockopt_int(
            fd,
            libc::SOL_TCP,
            libc::TCP_TIMESTAMP,
            st.timestamp as i32,
            "TCP_TIMESTAMP",
        )?;
    }
    Ok(())
}

/// Our FIN, as sent (repair mode on the send queue: not transmitted; it
/// is retransmitted like any unacknowledged segment once the connection
/// runs).
fn fin_in_send_queue(fd: RawFd) -> Result<()> {
    repair_queue(fd, TCP_SEND_QUEUE)?;
    // SAFETY: shutdown(2) on our socket.
    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } < 0 {
        bail!("shutdown(SHUT_WR): {}", std::io::Error::last_os_error());
    }
    repair_queue(fd, TCP_NO_QUEUE)
}

const TH_FIN: u8 = 0x01;
const TH_ACK: u8 = 0x10;

/// The one's complement sum of 16-bit words, folded.
fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP segment from `from` to `to` with no data, and its IP header: the
/// bytes to send through a raw socket with the header included.
fn segment(
    from: std::net::SocketAddr,
    to: std::net::SocketAddr,
    flags: u8,
    seq: u32,
    ack: u32,
    window: u16,
) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&from.port().to_be_bytes());
    tcp.extend_from_slice(&to.port().to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.push(5 << 4); // data offset: 5 words, no options
    tcp.push(flags);
    tcp.extend_from_slice(&window.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    let (pseudo, mut ip): (Vec<u8>, Vec<u8>) = match (from.ip(), to.ip()) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
            let mut p = s.octets().to_vec();
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, libc::IPPROTO_TCP as u8, 0, 20]);
            let mut h = vec![
                0x45,
                0,
                0,
                40,
                0,
                0,
                0x40,
                0,
                64,
                libc::IPPROTO_TCP as u8,
                0,
                0,
            ];
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            let c = csum_fold(csum_add(0, &h));
            h[10..12].copy_from_slice(&c.to_be_bytes());
            (p, h)
        }
        (s, d) => {
            let v6 = |a: std::net::IpAddr| match a {
                std::net::IpAddr::V6(x) => x,
                std::net::IpAddr::V4(x) => x.to_ipv6_mapped(),
            };
            let (s, d) = (v6(s), v6(d));
            let mut p = s.octets().to_vec();
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, 0, 0, 20, 0, 0, 0, libc::IPPROTO_TCP as u8]);
            let mut h = vec![0x60, 0, 0, 0, 0, 20, libc::IPPROTO_TCP as u8, 64];
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            (p, h)
        }
    };
    let c = csum_fold(csum_add(csum_add(0, &pseudo), &tcp));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

/// Sends the restored socket a segment from its peer (a FIN, an ACK),
/// through a raw socket whose packets the network lock lets through.
fn send_to_socket(e: &InetSocket, st: &TcpStream, flags: u8, seq: u32, ack: u32) -> Result<()> {
    let (Some(local), Some(peer)) = (
        e.local.as_ref().and_then(to_std),
        e.peer.as_ref().and_then(to_std),
    ) else {
        bail!("a connection without its addresses");
    };
    // An IPv4 connection on an IPv6 socket travels as IPv4.
    let c = Conn::new(local, peer);
    // The window the peer last advertised, as it would put it in a header.
    let scale = if st.opt_mask & TCPI_OPT_WSCALE != 0 {
        st.snd_wscale
    } else {
        0
    };
    let window = (st.snd_wnd >> scale).min(0xffff) as u16;
    let pkt = segment(c.peer, c.local, flags, seq, ack, window);
    let family = if c.local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket(2) returns a new fd or -1.
    let raw = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    let raw = crate::resources::files::new_fd(raw as i64, "a raw socket")?;
    setsockopt_int(
        raw.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_MARK,
        RESTORE_MARK as i32,
        "SO_MARK",
    )?;
    let to = super::sockaddr_bytes(
        family,
        &crate::images::pb::InetAddr {
            addr: match c.local.ip() {
                std::net::IpAddr::V4(a) => a.octets().to_vec(),
                std::net::IpAddr::V6(a) => a.octets().to_vec(),
            },
            port: 0,
            ..Default::default()
        },
    );
    // SAFETY: sendto(2) from our buffers.
    let n = unsafe {
        libc::sendto(
            raw.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            to.as_ptr().cast(),
            to.len() as libc::socklen_t,
        )
    };
    if n < 0 {
        bail!(
            "sending the socket a packet from its peer {}: {}",
            show_ends(e),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Whether the entry is a connection restored in repair mode.
pub fn in_repair(e: &InetSocket) -> bool {
    e.stream.is_some() && !e.closed
}

/// The tree is rebuilt and about to run, and the network lock is lifted:
/// the connection leaves repair mode (which sends the peer a window probe,
/// whose answer brings both ends up to date at once) and gets back
/// SO_REUSEADDR, which leaving repair mode clears.
pub fn resume(fd: RawFd, e: &InetSocket) -> Result<()> {
    leave_repair(fd, e.opts.as_ref().is_some_and(|o| o.reuseaddr))
}

/// Puts a connection in repair mode: its close then sends nothing (after a
/// dump that killed the tree).
pub fn enter_repair(fd: RawFd) -> Result<()> {
    repair(fd, TCP_REPAIR_ON)
}

/// Takes a connection out of repair mode, which lets it run on from where
/// it is (the window probe this sends brings the peer up to date), and
/// gives it back its SO_REUSEADDR (`reuse`), which leaving repair mode
/// clears: after a restore, after a dump the tree survives, and from the
/// dump's guardian when crust died in the middle of one.
pub fn leave_repair(fd: RawFd, reuse: bool) -> Result<()> {
    repair(fd, TCP_REPAIR_OFF)?;
    setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        reuse as i32,
        "SO_REUSEADDR",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_checksums() {
        let from = "127.0.0.2:5000".parse().unwrap();
        let to = "127.0.0.1:80".parse().unwrap();
        let p = segment(from, to, TH_FIN | TH_ACK, 1000, 2000, 512);
        assert_eq!(p.len(), 40);
        // A correct header sums to 0xffff (its checksum folded in).
        assert_eq!(csum_fold(csum_add(0, &p[..20])), 0);
        let mut pseudo = vec![127, 0, 0, 2, 127, 0, 0, 1, 0, 6, 0, 20];
        pseudo.extend_from_slice(&p[20..]);
        assert_eq!(csum_fold(csum_add(0, &pseudo)), 0);
        assert_eq!(&p[20..22], &5000u16.to_be_bytes());
        assert_eq!(p[33], TH_FIN | TH_ACK);
        let p6 = segment(
            "[::1]:5000".parse().unwrap(),
            "[::1]:80".parse().unwrap(),
            TH_ACK,
            1,
            2,
            3,
        );
        assert_eq!(p6.len(), 60);
        assert_eq!(p6[0] >> 4, 6);
    }

    #[test]
    fn connection_states() {
        assert!(is_connection(TCP_ESTABLISHED, true, 0));
        assert!(is_connection(TCP_LAST_ACK, true, 0));
        assert!(is_connection(TCP_CLOSE, true, 3));
        assert!(!is_connection(TCP_CLOSE, true, 0));
        assert!(!is_connection(TCP_CLOSE, false, 0));
        assert!(!is_connection(TCP_LISTEN, false, 0));
    }
}

//! Datagram and raw inet sockets: UDP, UDP-Lite, ICMP ping sockets and raw
//! sockets of any protocol. They are bound and connected again, shut down
//! again as they were (a UDP socket's shutdown only sock_diag tells), and
//! keep their options and a raw ICMP socket's type filter.
//!
//! Datagrams waiting to be read are not carried: they are dropped as a
//! network may drop any datagram (the log says so). A corked UDP socket
//! holding a datagram not sent yet is refused: that one was accepted from
//! the program already.

use std::os::fd::{AsRawFd, RawFd};

use anyhow::{Result, bail};

use super::{InetSocket, Reuse, bind_back, connect_back, show_ends};
use crate::resources::files::FdProbe;
use crate::resources::sockets::{SocketProbe, getsockopt_bytes, getsockopt_int, setsockopt_bytes};

const UDP_ENCAP: i32 = 100;
const ICMP_FILTER: i32 = 1;
const ICMPV6_FILTER: i32 = 1;
const SIOCINQ: libc::c_ulong = 0x541B;
const SIOCOUTQ: libc::c_ulong = 0x5411;

/// Where a raw ICMP socket keeps its filter of ICMP types, and its size.
fn icmp_filter_opt(e: &InetSocket) -> Option<(i32, i32, usize)> {
    if e.r#type != libc::SOCK_RAW {
        return None;
    }
    match (e.family, e.protocol) {
        (libc::AF_INET, libc::IPPROTO_ICMP) => Some((libc::SOL_RAW, ICMP_FILTER, 4)),
        (libc::AF_INET6, libc::IPPROTO_ICMPV6) => Some((libc::SOL_ICMPV6, ICMPV6_FILTER, 32)),
        _ => None,
    }
}

fn queued(fd: RawFd, req: libc::c_ulong) -> i32 {
    let mut v: libc::c_int = 0;
    // SAFETY: SIOCINQ/SIOCOUTQ write one int.
    if unsafe { libc::ioctl(fd, req, &mut v) } < 0 {
        return 0;
    }
    v
}

pub fn dump(p: &FdProbe, sk: &SocketProbe, e: &mut InetSocket) -> Result<()> {
    let fd = sk.fd.as_raw_fd();
    e.state = if e.peer.is_some() {
        super::tcp::TCP_ESTABLISHED
    } else {
        super::tcp::TCP_CLOSE
    };
    let udp = matches!(e.protocol, libc::IPPROTO_UDP | libc::IPPROTO_UDPLITE)
        && e.r#type == libc::SOCK_DGRAM;
    if udp {
        let encap = getsockopt_int(fd, libc::SOL_UDP, UDP_ENCAP).unwrap_or(0);
        if encap != 0 {
            bail!("it is a UDP encapsulation socket (UDP_ENCAP {encap}), which crust cannot dump");
        }
        let corked = getsockopt_int(fd, libc::SOL_UDP, libc::UDP_CORK).unwrap_or(0) != 0;
        if corked && queued(fd, SIOCOUTQ) > 0 {
            bail!("it holds a corked datagram not sent yet (UDP_CORK); dump once it is sent");
        }
        e.shutdown = p
            .ctx
            .inet
            .shutdown(p.ctx.tree[0], e.family, e.protocol, e.ino)? as u32;
    }
    if queued(fd, SIOCINQ) > 0 {
        tracing::warn!(
            "PID {} fd {} ({} {}): the datagrams waiting to be read are not carried, as a network may drop them",
            p.pid,
            p.fd,
            super::kind_name(e),
            show_ends(e)
        );
    }
    if let Some((level, opt, len)) = icmp_filter_opt(e) {
        e.icmp_filter = getsockopt_bytes(fd, level, opt, len)?;
    }
    Ok(())
}

pub fn restore(fd: RawFd, e: &InetSocket) -> Result<()> {
    if let Some((level, opt, _)) = icmp_filter_opt(e)
        && !e.icmp_filter.is_empty()
    {
        setsockopt_bytes(fd, level, opt, &e.icmp_filter, "ICMP_FILTER")?;
    }
    bind_back(fd, e, Reuse::Addr)?;
    if let Some(peer) = &e.peer {
        connect_back(fd, e, peer)?;
    }
    let how = match e.shutdown & 3 {
        0 => return Ok(()),
        1 => libc::SHUT_RD,
        2 => libc::SHUT_WR,
        _ => libc::SHUT_RDWR,
    };
    // SAFETY: shutdown(2) on our socket. An unconnected one says ENOTCONN
    // but is shut down all the same.
    if unsafe { libc::shutdown(fd, how) } < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ENOTCONN) {
            bail!("shutdown: {err}");
        }
    }
    Ok(())
}

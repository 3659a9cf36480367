//! AF_INET and AF_INET6 sockets (InetKind): TCP (`tcp`), and UDP,
//! UDP-Lite, ICMP ping and raw sockets (`dgram`). What they share is here:
//! addresses, the IP-level options, and the order a socket is made again in.
//!
//! Everything is read on a copy of the task's socket (`sockets::socket_of`,
//! the same socket): addresses with getsockname and SO_PEERNAME, options
//! with getsockopt; sock_diag only where nothing else tells (a UDP
//! socket's shutdown).
//!
//! A socket is made again in two steps. `restore` (once per open file
//! description, in fd order) makes it, sets its options, binds it, and
//! listens or connects; for the bind it allows what the tree had allowed
//! when its sockets were bound one after the other: address and port reuse
//! (and TCP repair's forced reuse for connections), IP_FREEBIND for an
//! address that is not local any more. `finish` (once every fd of the task
//! is in place) leaves TCP repair and gives every option its dumped value,
//! reuse included: two listeners sharing a port with SO_REUSEPORT are both
//! listening before either loses it.

pub mod dgram;
pub mod tcp;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result, bail};

use super::files::{FdProbe, FileKind, RestoreCtx, new_fd, set_status_flags};
use super::sockets::{
    SockDiag, dump_sock_opts, getsockopt_bytes, getsockopt_int, restore_sock_opts,
    setsockopt_bytes, setsockopt_int, socket_of,
};
use crate::images::pb::fd_entry::File as FdFile;
use crate::images::pb::{InetAddr, InetSocket, IntOpt};

pub struct InetKind;

/// What the dump of the tree's inet sockets shares: a sock_diag client in
/// the tree's network namespace and what it answered, by socket inode.
#[derive(Default)]
pub struct InetDumpState {
    diag: RefCell<Option<SockDiag>>,
    /// (family, protocol) asked about -> shutdown bits by inode.
    shutdowns: RefCell<HashMap<(i32, i32), HashMap<u64, u8>>>,
}

impl InetDumpState {
    /// The shutdown bits sock_diag reports for socket `ino` of `family` and
    /// `protocol` (every socket of the kind is asked about once).
    fn shutdown(&self, tree_root: i32, family: i32, protocol: i32, ino: u64) -> Result<u8> {
        if let Some(m) = self.shutdowns.borrow().get(&(family, protocol)) {
            return Ok(m.get(&ino).copied().unwrap_or(0));
        }
        if self.diag.borrow().is_none() {
            *self.diag.borrow_mut() = Some(SockDiag::open_for(tree_root)?);
        }
        let diag = self.diag.borrow();
        let diag = diag.as_ref().expect("opened above");
        // struct inet_diag_req_v2: family, protocol, ext, pad, states, and
        // an empty inet_diag_sockid (48 bytes): every socket.
        let mut req = vec![family as u8, protocol as u8, 0, 0];
        req.extend_from_slice(&u32::MAX.to_ne_bytes());
        req.extend_from_slice(&[0u8; 48]);
        let mut m = HashMap::new();
        for ans in diag.query(&req, true)? {
            // struct inet_diag_msg: inode at 68, attributes after its 72 bytes.
            if ans.len() < 72 {
                continue;
            }
            let ino = u32::from_ne_bytes(ans[68..72].try_into().unwrap()) as u64;
            const INET_DIAG_SHUTDOWN: u16 = 8;
            let bits = super::sockets::attrs(&ans, 72)
                .into_iter()
                .find(|(k, _)| *k == INET_DIAG_SHUTDOWN)
                .and_then(|(_, v)| v.first().copied())
                .unwrap_or(0);
            m.insert(ino, bits);
        }
        let bits = m.get(&ino).copied().unwrap_or(0);
        self.shutdowns.borrow_mut().insert((family, protocol), m);
        Ok(bits)
    }
}

/// SO_PEERNAME, which unlike getpeername also answers for a connection
/// that was reset or is still being made.
const SO_PEERNAME: i32 = 28;

/// The kind of socket, for messages.
pub fn kind_name(e: &InetSocket) -> &'static str {
    match (e.r#type, e.protocol) {
        (libc::SOCK_STREAM, libc::IPPROTO_TCP) if e.state == tcp::TCP_LISTEN => "TCP listener",
        (libc::SOCK_STREAM, libc::IPPROTO_TCP) if e.peer.is_some() => "TCP connection",
        (libc::SOCK_STREAM, libc::IPPROTO_TCP) => "TCP socket",
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => "UDP socket",
        (libc::SOCK_DGRAM, libc::IPPROTO_UDPLITE) => "UDP-Lite socket",
        (libc::SOCK_DGRAM, libc::IPPROTO_ICMP | libc::IPPROTO_ICMPV6) => "ICMP ping socket",
        (libc::SOCK_RAW, _) => "raw socket",
        _ => "inet socket",
    }
}

/// "127.0.0.1:80", "[::1]:80".
pub fn show_addr(a: &InetAddr) -> String {
    to_std(a).map_or_else(|| "?".into(), |s| s.to_string())
}

/// The socket's two ends for messages: "127.0.0.1:80 -> 10.0.0.2:5000".
pub fn show_ends(e: &InetSocket) -> String {
    let local = e.local.as_ref().map_or("unbound".into(), show_addr);
    match &e.peer {
        Some(p) => format!("{local} -> {}", show_addr(p)),
        None => local,
    }
}

pub fn to_std(a: &InetAddr) -> Option<SocketAddr> {
    let port = a.port as u16;
    match a.addr.len() {
        4 => {
            let b: [u8; 4] = a.addr[..].try_into().ok()?;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(b)), port))
        }
        16 => {
            let b: [u8; 16] = a.addr[..].try_into().ok()?;
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), port))
        }
        _ => None,
    }
}

/// A sockaddr_in or sockaddr_in6 as bytes: an inet address, `None` for
/// another family.
fn parse_sockaddr(b: &[u8]) -> Option<InetAddr> {
    let family = u16::from_ne_bytes(b.get(0..2)?.try_into().ok()?) as i32;
    let port = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as u32;
    match family {
        libc::AF_INET => Some(InetAddr {
            addr: b.get(4..8)?.to_vec(),
            port,
            ..Default::default()
        }),
        libc::AF_INET6 => Some(InetAddr {
            addr: b.get(8..24)?.to_vec(),
            port,
            flowinfo: u32::from_be_bytes(b.get(4..8)?.try_into().ok()?),
            scope_id: u32::from_ne_bytes(b.get(24..28)?.try_into().ok()?),
        }),
        _ => None,
    }
}

/// The sockaddr of `a` for a socket of `family`, and its length.
pub fn sockaddr_bytes(family: i32, a: &InetAddr) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&(family as u16).to_ne_bytes());
    b.extend_from_slice(&(a.port as u16).to_be_bytes());
    if family == libc::AF_INET {
        b.extend_from_slice(&a.addr);
        b.extend_from_slice(&[0u8; 8]);
    } else {
        b.extend_from_slice(&a.flowinfo.to_be_bytes());
        b.extend_from_slice(&a.addr);
        b.extend_from_slice(&a.scope_id.to_ne_bytes());
    }
    b
}

fn is_unspecified(a: &InetAddr) -> bool {
    a.addr.iter().all(|&b| b == 0)
}

/// Where the socket is bound, None when it is not: no port and no address
/// (a raw socket's "port" is its protocol; only its address counts).
fn local_addr(fd: RawFd, raw: bool) -> Result<Option<InetAddr>> {
    let mut buf = [0u8; 128];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into buf.
    if unsafe { libc::getsockname(fd, buf.as_mut_ptr().cast(), &mut len) } < 0 {
        bail!("getsockname: {}", std::io::Error::last_os_error());
    }
    let a = parse_sockaddr(&buf[..len as usize]).context("getsockname: not an inet address")?;
    let bound = !is_unspecified(&a) || (!raw && a.port != 0);
    Ok(bound.then_some(a))
}

/// Whom the socket of `family` is connected to (SO_PEERNAME), None when
/// nobody.
fn peer_addr(fd: RawFd, family: i32) -> Result<Option<InetAddr>> {
    let mut buf = [0u8; 28];
    // The kernel wants no more room than the address takes.
    let mut len: libc::socklen_t = if family == libc::AF_INET { 16 } else { 28 };
    // SAFETY: getsockopt writes at most `len` bytes into buf.
    if unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_PEERNAME,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    } < 0
    {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOTCONN) {
            return Ok(None);
        }
        bail!("SO_PEERNAME: {err}");
    }
    Ok(parse_sockaddr(&buf[..len as usize]))
}

/// An int option of some level that programs set on inet sockets.
struct OptDef {
    level: i32,
    name: i32,
    label: &'static str,
    applies: fn(&InetSocket) -> bool,
}

fn v4(e: &InetSocket) -> bool {
    e.family == libc::AF_INET
}
fn v6(e: &InetSocket) -> bool {
    e.family == libc::AF_INET6
}
fn ip_level(e: &InetSocket) -> bool {
    // An IPv6 raw socket has no IP level; other IPv6 sockets share it
    // (their IPv4-mapped traffic).
    v4(e) || e.r#type != libc::SOCK_RAW
}
/// Multicast options: not for TCP (a connection made by accept() reports
/// the TTL of its SYN there, and the kernel takes no value for it).
fn mcast4(e: &InetSocket) -> bool {
    ip_level(e) && e.r#type != libc::SOCK_STREAM
}
fn mcast6(e: &InetSocket) -> bool {
    v6(e) && e.r#type != libc::SOCK_STREAM
}
fn raw4(e: &InetSocket) -> bool {
    v4(e) && e.r#type == libc::SOCK_RAW
}
fn raw6(e: &InetSocket) -> bool {
    v6(e) && e.r#type == libc::SOCK_RAW
}
fn tcp(e: &InetSocket) -> bool {
    e.r#type == libc::SOCK_STREAM && e.protocol == libc::IPPROTO_TCP
}
fn udp(e: &InetSocket) -> bool {
    e.r#type == libc::SOCK_DGRAM && matches!(e.protocol, libc::IPPROTO_UDP | libc::IPPROTO_UDPLITE)
}
fn udp6(e: &InetSocket) -> bool {
    udp(e) && v6(e)
}
fn udplite(e: &InetSocket) -> bool {
    udp(e) && e.protocol == libc::IPPROTO_UDPLITE
}

const SOL_UDPLITE: i32 = 136;

macro_rules! opt {
    ($level:expr, $name:expr, $label:literal, $applies:expr) => {
        OptDef {
            level: $level,
            name: $name,
            label: $label,
            applies: $applies,
        }
    };
}

/// The int options read back and set again. IP_FREEBIND and
/// IP_TRANSPARENT are one flag with their IPv6 names, read under the name
/// of the socket's family.
static INT_OPTS: &[OptDef] = &[
    opt!(libc::SOL_IP, libc::IP_TOS, "IP_TOS", ip_level),
    opt!(libc::SOL_IP, libc::IP_TTL, "IP_TTL", ip_level),
    opt!(libc::SOL_IP, libc::IP_HDRINCL, "IP_HDRINCL", raw4),
    opt!(libc::SOL_IP, libc::IP_RECVERR, "IP_RECVERR", ip_level),
    opt!(libc::SOL_IP, libc::IP_PKTINFO, "IP_PKTINFO", ip_level),
    opt!(libc::SOL_IP, libc::IP_RECVTTL, "IP_RECVTTL", ip_level),
    opt!(libc::SOL_IP, libc::IP_RECVTOS, "IP_RECVTOS", ip_level),
    opt!(
        libc::SOL_IP,
        libc::IP_MTU_DISCOVER,
        "IP_MTU_DISCOVER",
        ip_level
    ),
    opt!(libc::SOL_IP, libc::IP_FREEBIND, "IP_FREEBIND", v4),
    opt!(libc::SOL_IP, libc::IP_TRANSPARENT, "IP_TRANSPARENT", v4),
    opt!(
        libc::SOL_IP,
        libc::IP_MULTICAST_TTL,
        "IP_MULTICAST_TTL",
        mcast4
    ),
    opt!(
        libc::SOL_IP,
        libc::IP_MULTICAST_LOOP,
        "IP_MULTICAST_LOOP",
        mcast4
    ),
    opt!(
        libc::SOL_IP,
        libc::IP_MULTICAST_ALL,
        "IP_MULTICAST_ALL",
        mcast4
    ),
    opt!(libc::SOL_IP, libc::IP_NODEFRAG, "IP_NODEFRAG", raw4),
    opt!(libc::SOL_IP, 24, "IP_BIND_ADDRESS_NO_PORT", ip_level),
    opt!(
        libc::SOL_IP,
        libc::IP_RECVORIGDSTADDR,
        "IP_RECVORIGDSTADDR",
        ip_level
    ),
    opt!(libc::SOL_IP, 51, "IP_LOCAL_PORT_RANGE", ip_level),
    opt!(libc::SOL_IPV6, libc::IPV6_V6ONLY, "IPV6_V6ONLY", v6),
    opt!(
        libc::SOL_IPV6,
        libc::IPV6_UNICAST_HOPS,
        "IPV6_UNICAST_HOPS",
        v6
    ),
    opt!(
        libc::SOL_IPV6,
        libc::IPV6_MULTICAST_HOPS,
        "IPV6_MULTICAST_HOPS",
        mcast6
    ),
    opt!(
        libc::SOL_IPV6,
        libc::IPV6_MULTICAST_LOOP,
        "IPV6_MULTICAST_LOOP",
        mcast6
    ),
    opt!(
        libc::SOL_IPV6,
        libc::IPV6_MULTICAST_ALL,
        "IPV6_MULTICAST_ALL",
        mcast6
    ),
    opt!(
        libc::SOL_IPV6,
        libc::IPV6_RECVPKTINFO,
        "IPV6_RECVPKTINFO",
        v6
    ),
    opt!(
        libc::SOL_IPV6,
        libc::IPV6_RECVHOPLIMIT,
        "IPV6_RECVHOPLIMIT",
        v6
    ),
    opt!(libc::SOL_IPV6, libc::IPV6_RECVTCLASS, "IPV6_RECVTCLASS", v6),
    opt!(libc::SOL_IPV6, libc::IPV6_TCLASS, "IPV6_TCLASS", v6),
    opt!(libc::SOL_IPV6, libc::IPV6_RECVERR, "IPV6_RECVERR", v6),
    opt!(
        libc::SOL_IPV6,
        libc::IPV6_MTU_DISCOVER,
        "IPV6_MTU_DISCOVER",
        v6
    ),
    opt!(libc::SOL_IPV6, libc::IPV6_FREEBIND, "IPV6_FREEBIND", v6),
    opt!(
        libc::SOL_IPV6,
        libc::IPV6_TRANSPARENT,
        "IPV6_TRANSPARENT",
        v6
    ),
    opt!(libc::SOL_IPV6, libc::IPV6_HDRINCL, "IPV6_HDRINCL", raw6),
    opt!(libc::SOL_IPV6, libc::IPV6_CHECKSUM, "IPV6_CHECKSUM", raw6),
    opt!(
        libc::SOL_IPV6,
        libc::IPV6_RECVORIGDSTADDR,
        "IPV6_RECVORIGDSTADDR",
        v6
    ),
    opt!(
        libc::SOL_IPV6,
        libc::IPV6_AUTOFLOWLABEL,
        "IPV6_AUTOFLOWLABEL",
        v6
    ),
    opt!(libc::SOL_IPV6, libc::IPV6_DONTFRAG, "IPV6_DONTFRAG", v6),
    opt!(
        libc::SOL_IPV6,
        libc::IPV6_RECVPATHMTU,
        "IPV6_RECVPATHMTU",
        v6
    ),
    opt!(libc::SOL_TCP, libc::TCP_NODELAY, "TCP_NODELAY", tcp),
    opt!(libc::SOL_TCP, libc::TCP_CORK, "TCP_CORK", tcp),
    opt!(libc::SOL_TCP, libc::TCP_KEEPIDLE, "TCP_KEEPIDLE", tcp),
    opt!(libc::SOL_TCP, libc::TCP_KEEPINTVL, "TCP_KEEPINTVL", tcp),
    opt!(libc::SOL_TCP, libc::TCP_KEEPCNT, "TCP_KEEPCNT", tcp),
    opt!(libc::SOL_TCP, libc::TCP_SYNCNT, "TCP_SYNCNT", tcp),
    opt!(libc::SOL_TCP, libc::TCP_LINGER2, "TCP_LINGER2", tcp),
    opt!(
        libc::SOL_TCP,
        libc::TCP_DEFER_ACCEPT,
        "TCP_DEFER_ACCEPT",
        tcp
    ),
    opt!(
        libc::SOL_TCP,
        libc::TCP_THIN_LINEAR_TIMEOUTS,
        "TCP_THIN_LINEAR_TIMEOUTS",
        tcp
    ),
    opt!(
        libc::SOL_TCP,
        libc::TCP_USER_TIMEOUT,
        "TCP_USER_TIMEOUT",
        tcp
    ),
    opt!(libc::SOL_TCP, libc::TCP_FASTOPEN, "TCP_FASTOPEN", tcp),
    opt!(
        libc::SOL_TCP,
        libc::TCP_NOTSENT_LOWAT,
        "TCP_NOTSENT_LOWAT",
        tcp
    ),
    opt!(
        libc::SOL_TCP,
        libc::TCP_FASTOPEN_CONNECT,
        "TCP_FASTOPEN_CONNECT",
        tcp
    ),
    opt!(libc::SOL_TCP, 34, "TCP_FASTOPEN_NO_COOKIE", tcp),
    opt!(libc::SOL_TCP, 37, "TCP_TX_DELAY", tcp),
    opt!(libc::SOL_UDP, libc::UDP_CORK, "UDP_CORK", udp),
    opt!(libc::SOL_UDP, libc::UDP_SEGMENT, "UDP_SEGMENT", udp),
    opt!(libc::SOL_UDP, libc::UDP_GRO, "UDP_GRO", udp),
    opt!(
        libc::SOL_UDP,
        libc::UDP_NO_CHECK6_TX,
        "UDP_NO_CHECK6_TX",
        udp6
    ),
    opt!(
        libc::SOL_UDP,
        libc::UDP_NO_CHECK6_RX,
        "UDP_NO_CHECK6_RX",
        udp6
    ),
    opt!(SOL_UDPLITE, 10, "UDPLITE_SEND_CSCOV", udplite),
    opt!(SOL_UDPLITE, 11, "UDPLITE_RECV_CSCOV", udplite),
];

fn opt_label(level: i32, name: i32) -> String {
    INT_OPTS
        .iter()
        .find(|d| d.level == level && d.name == name)
        .map_or_else(|| format!("option {level}/{name}"), |d| d.label.into())
}

/// Reads every int option that applies to the socket; one the kernel does
/// not know is left out.
fn dump_int_opts(fd: RawFd, e: &InetSocket) -> Vec<IntOpt> {
    INT_OPTS
        .iter()
        .filter(|d| (d.applies)(e))
        .filter_map(|d| {
            getsockopt_int(fd, d.level, d.name)
                .ok()
                .map(|value| IntOpt {
                    level: d.level,
                    name: d.name,
                    value,
                })
        })
        .collect()
}

/// Gives each dumped int option its value where the socket's differs
/// (setting one to the value it has would pin a default that follows a
/// sysctl). `skip` says which to leave for later.
fn restore_int_opts(fd: RawFd, e: &InetSocket, skip: impl Fn(&IntOpt) -> bool) -> Result<()> {
    for o in e.int_opts.iter().filter(|o| !skip(o)) {
        if getsockopt_int(fd, o.level, o.name).ok() == Some(o.value) {
            continue;
        }
        setsockopt_int(fd, o.level, o.name, o.value, &opt_label(o.level, o.name))?;
    }
    Ok(())
}

fn is_freebind(o: &IntOpt) -> bool {
    (o.level == libc::SOL_IP && o.name == libc::IP_FREEBIND)
        || (o.level == libc::SOL_IPV6 && o.name == libc::IPV6_FREEBIND)
}

/// The option that lets a socket bind to an address that is not (or no
/// longer) local, for its family.
fn freebind_opt(family: i32) -> (i32, i32) {
    if family == libc::AF_INET {
        (libc::SOL_IP, libc::IP_FREEBIND)
    } else {
        (libc::SOL_IPV6, libc::IPV6_FREEBIND)
    }
}

/// How a socket shares its port while it is bound again.
#[derive(Clone, Copy, PartialEq)]
enum Reuse {
    /// SO_REUSEADDR and SO_REUSEPORT (the dumped values are set in
    /// `finish`): TCP sockets bound or listening.
    AddrAndPort,
    /// SO_REUSEADDR: datagram sockets.
    Addr,
    /// What TCP repair mode forces: a connection (setting SO_REUSEADDR would
    /// undo it).
    Repair,
}

/// Binds the new socket where the dumped one was.
fn bind_back(fd: RawFd, e: &InetSocket, reuse: Reuse) -> Result<()> {
    let Some(local) = &e.local else {
        return Ok(());
    };
    let set = |level, opt, v, what| setsockopt_int(fd, level, opt, v, what);
    if reuse != Reuse::Repair {
        set(libc::SOL_SOCKET, libc::SO_REUSEADDR, 1, "SO_REUSEADDR")?;
    }
    if reuse == Reuse::AddrAndPort {
        set(libc::SOL_SOCKET, libc::SO_REUSEPORT, 1, "SO_REUSEPORT")?;
    }
    let (level, opt) = freebind_opt(e.family);
    set(level, opt, 1, "IP_FREEBIND")?;
    let sa = sockaddr_bytes(e.family, local);
    // SAFETY: bind(2) reads `sa.len()` bytes of a sockaddr we built.
    if unsafe { libc::bind(fd, sa.as_ptr().cast(), sa.len() as libc::socklen_t) } < 0 {
        let err = std::io::Error::last_os_error();
        let hint = if err.raw_os_error() == Some(libc::EADDRINUSE) {
            "; another socket holds it (is the dumped program still running?)"
        } else {
            ""
        };
        bail!("binding to {} again: {err}{hint}", show_addr(local));
    }
    Ok(())
}

/// Connects the new socket to its dumped peer (datagram sockets, and TCP
/// connections in repair mode, where no packet is sent).
fn connect_back(fd: RawFd, e: &InetSocket, peer: &InetAddr) -> Result<()> {
    let sa = sockaddr_bytes(e.family, peer);
    // SAFETY: connect(2) reads `sa.len()` bytes of a sockaddr we built.
    if unsafe { libc::connect(fd, sa.as_ptr().cast(), sa.len() as libc::socklen_t) } < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINPROGRESS) {
            bail!("connecting to {} again: {err}", show_addr(peer));
        }
    }
    Ok(())
}

/// The options every socket gets back last, in `finish`: reuse, and those
/// `restore` set otherwise for the bind.
fn final_opts(fd: RawFd, e: &InetSocket) -> Result<()> {
    if let Some(o) = &e.opts {
        let set = |opt, v: bool, what| setsockopt_int(fd, libc::SOL_SOCKET, opt, v as i32, what);
        set(libc::SO_REUSEADDR, o.reuseaddr, "SO_REUSEADDR")?;
        set(libc::SO_REUSEPORT, o.reuseport, "SO_REUSEPORT")?;
    }
    // IPV6_V6ONLY counts at the bind only, and a bind to one IPv6 address
    // sets it (a connection accepted by a listener on [::] did not bind).
    restore_int_opts(fd, e, |o| {
        o.level == libc::SOL_IPV6 && o.name == libc::IPV6_V6ONLY
    })
}

impl FileKind for InetKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        let Some(sk) = socket_of(p)? else {
            return Ok(None);
        };
        if sk.domain != libc::AF_INET && sk.domain != libc::AF_INET6 {
            return Ok(None);
        }
        let fd = sk.fd.as_raw_fd();
        let mut e = InetSocket {
            family: sk.domain,
            r#type: sk.kind,
            protocol: sk.protocol,
            flags: p.open_flags(),
            ino: sk.ino,
            ..Default::default()
        };
        let what = |e: &InetSocket| {
            format!(
                "PID {} fd {} ({}, a {} {})",
                p.pid,
                p.fd,
                p.link,
                kind_name(e),
                show_ends(e)
            )
        };
        let supported = match sk.kind {
            libc::SOCK_STREAM => sk.protocol == libc::IPPROTO_TCP,
            libc::SOCK_DGRAM => matches!(
                sk.protocol,
                libc::IPPROTO_UDP
                    | libc::IPPROTO_UDPLITE
                    | libc::IPPROTO_ICMP
                    | libc::IPPROTO_ICMPV6
            ),
            libc::SOCK_RAW => true,
            _ => false,
        };
        if !supported {
            bail!(
                "PID {} fd {} ({}) is an inet socket of type {} and protocol {} (MPTCP, SCTP, DCCP...) that crust cannot dump yet; close it or leave the process out",
                p.pid,
                p.fd,
                p.link,
                sk.kind,
                sk.protocol
            );
        }
        let raw = sk.kind == libc::SOCK_RAW;
        e.local = local_addr(fd, raw).with_context(|| what(&e))?;
        e.peer = peer_addr(fd, sk.domain).with_context(|| what(&e))?;
        e.opts = Some(dump_sock_opts(fd).with_context(|| what(&e))?);
        e.int_opts = dump_int_opts(fd, &e);
        if sk.kind == libc::SOCK_STREAM {
            tcp::dump(p, &sk, &mut e).with_context(|| what(&e))?;
        } else {
            dgram::dump(p, &sk, &mut e).with_context(|| what(&e))?;
        }
        Ok(Some(FdFile::Inet(e)))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Inet(e) = f else { return None };
        let fam = if v4(e) { "IPv4" } else { "IPv6" };
        let mut s = format!("{fam} {} {}", kind_name(e), show_ends(e));
        if tcp(e) {
            s.push_str(&format!(" {}", tcp::state_name(e.state)));
        }
        if e.state == tcp::TCP_LISTEN {
            s.push_str(&format!(" backlog {}", e.backlog));
        }
        if let Some(st) = &e.stream {
            s.push_str(&format!(
                ", {} B to read, {} B unacknowledged ({} unsent)",
                st.inq.len(),
                st.outq.len(),
                st.unsent
            ));
        }
        if e.closed {
            s.push_str(", restored closed (--tcp-close)");
        }
        if e.shutdown != 0 {
            s.push_str(&format!(" shutdown {}", e.shutdown));
        }
        s.push_str(&format!(" flags {:#o}", e.flags));
        Some(s)
    }

    fn restore(&self, f: &FdFile, _ctx: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Inet(e) = f else {
            return Ok(None);
        };
        let ends = show_ends(e);
        // Non-blocking while it is made (a connection being made again
        // must not wait in connect()); its own flags at the end.
        // SAFETY: socket(2) returns a new fd or -1.
        let raw = unsafe {
            libc::socket(
                e.family,
                e.r#type | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                e.protocol,
            )
        };
        let sock = new_fd(raw as i64, &format!("a {} ({ends})", kind_name(e)))?;
        let fd = sock.as_raw_fd();
        let made = || -> Result<()> {
            if let Some(o) = &e.opts {
                restore_sock_opts(fd, o)?;
            }
            // Before the bind: IPV6_V6ONLY and IP_BIND_ADDRESS_NO_PORT only
            // count there. Free binding is allowed for the bind itself.
            restore_int_opts(fd, e, is_freebind)?;
            if !e.congestion.is_empty() {
                let now = getsockopt_bytes(fd, libc::SOL_TCP, libc::TCP_CONGESTION, 16)?;
                if String::from_utf8_lossy(&now).trim_end_matches('\0') != e.congestion {
                    setsockopt_bytes(
                        fd,
                        libc::SOL_TCP,
                        libc::TCP_CONGESTION,
                        e.congestion.as_bytes(),
                        "TCP_CONGESTION",
                    )?;
                }
            }
            if e.r#type == libc::SOCK_STREAM {
                tcp::restore(fd, e)
            } else {
                dgram::restore(fd, e)
            }
        };
        made().with_context(|| format!("restoring the {} {ends}", kind_name(e)))?;
        set_status_flags(fd, e.flags, &format!("the {} {ends}", kind_name(e)))?;
        Ok(Some(sock))
    }

    fn finish(&self, f: &FdFile, fd: RawFd) -> Result<()> {
        let FdFile::Inet(e) = f else {
            return Ok(());
        };
        final_opts(fd, e).with_context(|| format!("the {} {}", kind_name(e), show_ends(e)))
    }

    fn resume(&self, f: &FdFile, copy: &mut dyn FnMut() -> Result<OwnedFd>) -> Result<()> {
        let FdFile::Inet(e) = f else {
            return Ok(());
        };
        if !tcp::in_repair(e) {
            return Ok(());
        }
        let sock = copy()?;
        tcp::resume(sock.as_raw_fd(), e)
            .with_context(|| format!("the {} {}", kind_name(e), show_ends(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddrs_round_trip() {
        let a = InetAddr {
            addr: vec![127, 0, 0, 1],
            port: 8080,
            ..Default::default()
        };
        let b = sockaddr_bytes(libc::AF_INET, &a);
        assert_eq!(b.len(), 16);
        assert_eq!(parse_sockaddr(&b), Some(a.clone()));
        assert_eq!(show_addr(&a), "127.0.0.1:8080");
        let mut six = InetAddr {
            addr: vec![0; 16],
            port: 443,
            flowinfo: 7,
            scope_id: 2,
        };
        six.addr[15] = 1;
        let b = sockaddr_bytes(libc::AF_INET6, &six);
        assert_eq!(b.len(), 28);
        assert_eq!(parse_sockaddr(&b), Some(six.clone()));
        assert_eq!(show_addr(&six), "[::1]:443");
    }

    #[test]
    fn our_own_udp_socket() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.connect(peer.local_addr().unwrap()).unwrap();
        let fd = s.as_raw_fd();
        let local = local_addr(fd, false).unwrap().unwrap();
        assert_eq!(to_std(&local), Some(s.local_addr().unwrap()));
        let p = peer_addr(fd, libc::AF_INET).unwrap().unwrap();
        assert_eq!(to_std(&p), Some(peer.local_addr().unwrap()));
        assert_eq!(peer_addr(peer.as_raw_fd(), libc::AF_INET).unwrap(), None);
        let e = InetSocket {
            family: libc::AF_INET,
            r#type: libc::SOCK_DGRAM,
            protocol: libc::IPPROTO_UDP,
            ..Default::default()
        };
        let opts = dump_int_opts(fd, &e);
        assert!(opts.iter().any(|o| o.name == libc::IP_TTL && o.value > 0));
        assert!(!opts.iter().any(|o| o.level == libc::SOL_TCP));
    }
}

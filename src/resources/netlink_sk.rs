//! Netlink sockets (AF_NETLINK): protocol, port id (bound or given at the
//! first send), multicast groups (above 32 too), the destination of a
//! connected one, SOL_NETLINK options and SOL_SOCKET ones.
//!
//! Dump: sock_diag (NETLINK_DIAG_GROUPS, _MEMINFO, _FLAGS) describes the
//! socket from outside; NETLINK_EXT_ACK and NETLINK_GET_STRICT_CHK, which
//! it does not report, are read with getsockopt on a pidfd_getfd copy. A
//! socket that never bound nor joined a group is in no table sock_diag
//! walks: getsockname says so, and getsockopt gives its options
//! (NETLINK_LISTEN_ALL_NSID excepted, which nothing reports for it).
//! Restore: crust makes every netlink socket before the tree forks, bound
//! to its port id (an explicit bind, whoever makes it: the id is the
//! dumped one, not the maker's PID), in its groups and connected; one that
//! had no port id gets one at its first send in the restored task, as it
//! would have.
//!
//! Messages queued in a netlink socket cannot be queued again as they
//! were: those from the kernel (nearly all) carry port id 0 as their
//! sender, which no socket crust makes can send from. A socket with
//! messages not read yet is refused at dump (CRIU drops them instead);
//! a message arriving after the dump is lost, as a packet would be. Also
//! refused: a socket in the middle of a multi-part dump answer.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use anyhow::{Context, Result, bail};

use super::files::{self, FdProbe, FileKind, ObjKey, RestoreCtx, TreeImages, TreeObjects};
use super::sockets::{
    SockDiag, attrs, dump_sock_opts, getsockopt_int, restore_sock_opts, same_netns, set_owner,
    setsockopt_int, socket_of,
};
use crate::images::pb::NetlinkSocket;
use crate::images::pb::fd_entry::File as FdFile;

pub struct NetlinkSkKind;

fn key(ino: u64) -> ObjKey {
    ("netlink", ino, 0)
}

// ---------------------------------------------------------------- sock_diag

const NDIAG_SHOW_MEMINFO: u32 = 0x01;
const NDIAG_SHOW_GROUPS: u32 = 0x02;
const NDIAG_SHOW_FLAGS: u32 = 0x08;
const NETLINK_DIAG_MEMINFO: u16 = 0;
const NETLINK_DIAG_GROUPS: u16 = 1;
const NETLINK_DIAG_FLAGS: u16 = 4;
const NDIAG_FLAG_CB_RUNNING: u32 = 0x01;
const NDIAG_FLAG_PKTINFO: u32 = 0x02;
const NDIAG_FLAG_BROADCAST_ERROR: u32 = 0x04;
const NDIAG_FLAG_NO_ENOBUFS: u32 = 0x08;
const NDIAG_FLAG_LISTEN_ALL_NSID: u32 = 0x10;
const NDIAG_FLAG_CAP_ACK: u32 = 0x20;
/// sk_state of a connect()ed netlink socket.
const NETLINK_CONNECTED: u8 = 1;
/// struct netlink_diag_msg: family, type, protocol, state, portid,
/// dst_portid, dst_group, ino, cookie[2].
const NETLINK_DIAG_MSG_LEN: usize = 28;

/// What sock_diag says about one netlink socket.
#[derive(Debug, Default)]
struct Diag {
    ino: u64,
    state: u8,
    portid: u32,
    dst_portid: u32,
    dst_group: u32,
    groups: Vec<u32>,
    /// Bytes held by its receive queue (SK_MEMINFO_RMEM_ALLOC).
    rmem: u32,
    flags: u32,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |x| u32::from_ne_bytes(x.try_into().unwrap()))
}

/// The group numbers (from 1) set in a groups bitmap (unsigned longs, as
/// the kernel keeps it: little-endian here, so bit N of the bytes).
fn groups_of(bitmap: &[u8]) -> Vec<u32> {
    let mut out = Vec::new();
    for (i, b) in bitmap.iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                out.push((i * 8 + bit) as u32 + 1);
            }
        }
    }
    out
}

fn parse_diag(msg: &[u8]) -> Option<Diag> {
    if msg.len() < NETLINK_DIAG_MSG_LEN || msg[0] != libc::AF_NETLINK as u8 {
        return None;
    }
    let mut d = Diag {
        state: msg[3],
        portid: u32_at(msg, 4),
        dst_portid: u32_at(msg, 8),
        dst_group: u32_at(msg, 12),
        ino: u32_at(msg, 16) as u64,
        ..Default::default()
    };
    for (k, v) in attrs(msg, NETLINK_DIAG_MSG_LEN) {
        match k {
            NETLINK_DIAG_MEMINFO => d.rmem = u32_at(v, 0),
            NETLINK_DIAG_GROUPS => d.groups = groups_of(v),
            NETLINK_DIAG_FLAGS => d.flags = u32_at(v, 0),
            _ => {}
        }
    }
    Some(d)
}

/// sock_diag's description of netlink socket `ino` of `protocol`, or None
/// when the kernel lists it nowhere (it never bound nor joined a group).
fn diag_of(d: &SockDiag, protocol: i32, ino: u64) -> Result<Option<Diag>> {
    let mut req = vec![libc::AF_NETLINK as u8, protocol as u8, 0, 0];
    req.extend_from_slice(&(ino as u32).to_ne_bytes());
    let show = NDIAG_SHOW_MEMINFO | NDIAG_SHOW_GROUPS | NDIAG_SHOW_FLAGS;
    req.extend_from_slice(&show.to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]);
    Ok(d.query(&req, true)?
        .iter()
        .filter_map(|m| parse_diag(m))
        .find(|x| x.ino == ino))
}

/// getsockname(2) of a netlink socket: (port id, groups 1-32 bitmask).
fn sockname(fd: RawFd) -> Result<(u32, u32)> {
    // SAFETY: plain data for which all-zero is valid.
    let mut a: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into a.
    if unsafe { libc::getsockname(fd, (&mut a as *mut libc::sockaddr_nl).cast(), &mut len) } < 0 {
        bail!("getsockname: {}", std::io::Error::last_os_error());
    }
    Ok((a.nl_pid, a.nl_groups))
}

fn protocol_name(p: i32) -> String {
    match p {
        libc::NETLINK_ROUTE => "route".into(),
        libc::NETLINK_USERSOCK => "usersock".into(),
        libc::NETLINK_SOCK_DIAG => "sock_diag".into(),
        libc::NETLINK_NETFILTER => "netfilter".into(),
        libc::NETLINK_AUDIT => "audit".into(),
        libc::NETLINK_KOBJECT_UEVENT => "kobject_uevent".into(),
        libc::NETLINK_GENERIC => "generic".into(),
        p => format!("protocol {p}"),
    }
}

// ---------------------------------------------------------------- dump

impl FileKind for NetlinkSkKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if !p.link.starts_with("socket:[") {
            return Ok(None);
        }
        let Some(s) = socket_of(p)? else {
            return Ok(None);
        };
        if s.domain != libc::AF_NETLINK {
            return Ok(None);
        }
        let whose = format!(
            "PID {} fd {} (netlink {} socket:[{}])",
            p.pid,
            p.fd,
            protocol_name(s.protocol),
            s.ino
        );
        if !same_netns(p.pid) {
            bail!(
                "{whose}: the process is in another network namespace, which crust cannot dump yet"
            );
        }
        let fd = s.fd.as_raw_fd();
        let opt = |o| -> Result<bool> {
            Ok(getsockopt_int(fd, libc::SOL_NETLINK, o).with_context(|| whose.clone())? != 0)
        };
        let mut n = NetlinkSocket {
            ino: s.ino,
            flags: p.open_flags(),
            r#type: s.kind,
            protocol: s.protocol,
            ext_ack: opt(libc::NETLINK_EXT_ACK)?,
            get_strict_chk: opt(libc::NETLINK_GET_STRICT_CHK)?,
            opts: Some(dump_sock_opts(fd).with_context(|| whose.clone())?),
            uid: p.meta.uid(),
            gid: p.meta.gid(),
            ..Default::default()
        };
        match diag_of(&SockDiag::open()?, s.protocol, s.ino)? {
            Some(d) => {
                if d.flags & NDIAG_FLAG_CB_RUNNING != 0 {
                    bail!(
                        "{whose} is in the middle of a multi-part answer from the kernel, which crust cannot carry; dump once the process has read it"
                    );
                }
                if d.rmem != 0 {
                    bail!(
                        "{whose} holds messages not read yet ({} bytes queued), which crust cannot queue again as they were (the kernel's come from port id 0); dump once the process has read them",
                        d.rmem
                    );
                }
                n.portid = d.portid;
                n.groups = d.groups;
                n.connected = d.state == NETLINK_CONNECTED;
                n.dst_portid = d.dst_portid;
                n.dst_group = d.dst_group;
                let flag = |bit| d.flags & bit != 0;
                n.pktinfo = flag(NDIAG_FLAG_PKTINFO);
                n.broadcast_error = flag(NDIAG_FLAG_BROADCAST_ERROR);
                n.no_enobufs = flag(NDIAG_FLAG_NO_ENOBUFS);
                n.listen_all_nsid = flag(NDIAG_FLAG_LISTEN_ALL_NSID);
                n.cap_ack = flag(NDIAG_FLAG_CAP_ACK);
            }
            None => {
                // Never bound and in no group: nothing can have reached it.
                let (portid, groups) = sockname(fd).with_context(|| whose.clone())?;
                if portid != 0 || groups != 0 {
                    bail!(
                        "{whose}: sock_diag does not list the socket, though it has port id {portid}"
                    );
                }
                n.pktinfo = opt(libc::NETLINK_PKTINFO)?;
                n.broadcast_error = opt(libc::NETLINK_BROADCAST_ERROR)?;
                n.no_enobufs = opt(libc::NETLINK_NO_ENOBUFS)?;
                n.cap_ack = opt(libc::NETLINK_CAP_ACK)?;
            }
        }
        Ok(Some(FdFile::Netlink(n)))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Netlink(n) = f else { return None };
        let mut out = format!("netlink {} socket:[{}]", protocol_name(n.protocol), n.ino);
        match n.portid {
            0 => out += " (no port id yet)",
            p => out += &format!(" port id {p}"),
        }
        if !n.groups.is_empty() {
            out += &format!(", groups {:?}", n.groups);
        }
        if n.connected {
            out += &format!(
                ", connected to port id {} group {}",
                n.dst_portid, n.dst_group
            );
        }
        Some(out)
    }

    // ------------------------------------------------------------ restore

    fn prepare(&self, t: &TreeImages, objects: &mut TreeObjects) -> Result<()> {
        for (pid, e, f) in t.files() {
            let FdFile::Netlink(n) = f else { continue };
            objects.make_once(key(n.ino), || {
                make(n).with_context(|| format!("PID {pid} fd {}", e.fd))
            })?;
        }
        Ok(())
    }

    fn restore(&self, f: &FdFile, ctx: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Netlink(n) = f else {
            return Ok(None);
        };
        let what = format!("netlink socket:[{}]", n.ino);
        Ok(Some(ctx.objects.dup_of(key(n.ino), &what)?))
    }
}

/// A sockaddr_nl call (bind or connect) on a netlink socket.
fn nl_addr_call(
    fd: RawFd,
    portid: u32,
    groups: u32,
    call: unsafe extern "C" fn(i32, *const libc::sockaddr, libc::socklen_t) -> i32,
) -> std::io::Result<()> {
    // SAFETY: plain data for which all-zero is valid.
    let mut a: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    a.nl_family = libc::AF_NETLINK as u16;
    a.nl_pid = portid;
    a.nl_groups = groups;
    // SAFETY: bind(2) or connect(2), reading the sockaddr_nl we pass.
    let r = unsafe {
        call(
            fd,
            (&a as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes a netlink socket as it was dumped, in crust.
fn make(n: &NetlinkSocket) -> Result<OwnedFd> {
    let what = format!("netlink {} socket:[{}]", protocol_name(n.protocol), n.ino);
    // SAFETY: socket(2) returns a new fd or -1.
    let r = unsafe { libc::socket(libc::AF_NETLINK, n.r#type | libc::SOCK_CLOEXEC, n.protocol) };
    let fd = files::new_fd(r as i64, &what)?;
    let raw = fd.as_raw_fd();
    if let Some(o) = &n.opts {
        restore_sock_opts(raw, o).with_context(|| what.clone())?;
    }
    for (on, opt, name) in [
        (n.pktinfo, libc::NETLINK_PKTINFO, "NETLINK_PKTINFO"),
        (
            n.broadcast_error,
            libc::NETLINK_BROADCAST_ERROR,
            "NETLINK_BROADCAST_ERROR",
        ),
        (n.no_enobufs, libc::NETLINK_NO_ENOBUFS, "NETLINK_NO_ENOBUFS"),
        (
            n.listen_all_nsid,
            libc::NETLINK_LISTEN_ALL_NSID,
            "NETLINK_LISTEN_ALL_NSID",
        ),
        (n.cap_ack, libc::NETLINK_CAP_ACK, "NETLINK_CAP_ACK"),
        (n.ext_ack, libc::NETLINK_EXT_ACK, "NETLINK_EXT_ACK"),
        (
            n.get_strict_chk,
            libc::NETLINK_GET_STRICT_CHK,
            "NETLINK_GET_STRICT_CHK",
        ),
    ] {
        if on {
            setsockopt_int(raw, libc::SOL_NETLINK, opt, 1, &format!("{name} of {what}"))?;
        }
    }
    if n.portid != 0 {
        nl_addr_call(raw, n.portid, 0, libc::bind).map_err(|e| {
            anyhow::anyhow!(
                "binding {what} to port id {}: {e}{}",
                n.portid,
                if e.raw_os_error() == Some(libc::EADDRINUSE) {
                    "; another socket holds that port id now"
                } else {
                    ""
                }
            )
        })?;
    }
    for &g in &n.groups {
        setsockopt_int(
            raw,
            libc::SOL_NETLINK,
            libc::NETLINK_ADD_MEMBERSHIP,
            g as i32,
            &format!("group {g} of {what}"),
        )?;
    }
    if n.connected {
        let group = match n.dst_group {
            0 => 0,
            g => 1u32.checked_shl(g - 1).unwrap_or(0),
        };
        nl_addr_call(raw, n.dst_portid, group, libc::connect).with_context(|| {
            format!(
                "connecting {what} to port id {} group {}",
                n.dst_portid, n.dst_group
            )
        })?;
    }
    files::set_status_flags(raw, n.flags, &what)?;
    set_owner(raw, n.uid, n.gid, &what)?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_bitmaps() {
        assert_eq!(groups_of(&[0b101, 0, 0, 0x80]), vec![1, 3, 32]);
        let mut b = vec![0u8; 8];
        b[4] = 0b100;
        assert_eq!(groups_of(&b), vec![35]);
        assert!(groups_of(&[]).is_empty());
    }

    #[test]
    fn diag_of_our_own_sockets() {
        // A usersock socket bound with a group, and one never bound: the
        // first is listed with its port id, group and queue; the second
        // is listed nowhere.
        let sock = || {
            // SAFETY: socket(2).
            let r = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::NETLINK_USERSOCK,
                )
            };
            files::new_fd(r as i64, "a test socket").unwrap()
        };
        let ino = |f: &OwnedFd| {
            std::fs::metadata(format!("/proc/self/fd/{}", f.as_raw_fd()))
                .unwrap()
                .ino()
        };
        let (a, b) = (sock(), sock());
        nl_addr_call(a.as_raw_fd(), 0, 1 << 4, libc::bind).unwrap();
        let d = SockDiag::open().unwrap();
        let got = diag_of(&d, libc::NETLINK_USERSOCK, ino(&a))
            .unwrap()
            .unwrap();
        assert_eq!(got.portid, sockname(a.as_raw_fd()).unwrap().0);
        assert_ne!(got.portid, 0);
        assert_eq!(got.groups, vec![5]);
        assert_eq!(got.rmem, 0);
        assert!(
            diag_of(&d, libc::NETLINK_USERSOCK, ino(&b))
                .unwrap()
                .is_none()
        );
        // A message sent to a's port id is queued.
        nl_addr_call(b.as_raw_fd(), got.portid, 0, libc::connect).unwrap();
        let msg = [16u8, 0, 0, 0, 0x34, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        // SAFETY: send(2) of our buffer.
        assert_eq!(
            unsafe { libc::send(b.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) },
            16
        );
        let got = diag_of(&d, libc::NETLINK_USERSOCK, ino(&a))
            .unwrap()
            .unwrap();
        assert!(got.rmem > 0);
    }
}

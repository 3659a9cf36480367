//! Packet sockets (AF_PACKET): SOCK_RAW, SOCK_DGRAM and the obsolete
//! SOCK_PACKET; their protocol and bound interface, the memberships added
//! with PACKET_ADD_MEMBERSHIP (each as many times as it was), the SOL_PACKET
//! options, the fanout group, and the RX/TX rings, mapped again where the
//! task had mapped them.
//!
//! Dump: sock_diag (PACKET_DIAG_INFO, _MCLIST, _RX_RING, _TX_RING, _UID,
//! _FILTER) describes the socket from outside; what it does not tell (the
//! fanout flags, the vnet header size, PACKET_TX_HAS_OFF,
//! PACKET_QDISC_BYPASS, PACKET_IGNORE_OUTGOING) is read with getsockopt on a
//! pidfd_getfd copy. A mapping of the socket's rings is a VMA of its own
//! (`VMA_PACKET_RING`); `tree_read` checks that every socket the tree maps
//! is a packet socket of the tree, mapped whole.
//!
//! Restore: crust makes every packet socket before the tree forks (the
//! options the kernel takes only before a ring exists first, then the
//! rings, the bind, the memberships and the fanout group), so that each
//! task's premap maps the new socket's rings at the dumped address
//! (`memory::premap_vmas`); the tasks dup the socket they held.
//!
//! Not carried: packets queued in the socket and frames in its rings (the
//! network delivers new ones), a pending socket error, a fanout group's
//! member limit (the default comes back) and PACKET_FANOUT_FLAG_UNIQUEID
//! (the group comes back with the id the kernel chose then). Refused: a
//! socket filter, a fanout group steered by a BPF program, a socket bound
//! to an interface that was gone at the dump or is missing at the restore.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use anyhow::{Context, Result, bail};

use super::files::{self, DumpCtx, FdProbe, FileKind, ObjKey, RestoreCtx, TreeImages, TreeObjects};
use super::sockets::{
    SockDiag, attrs, dump_sock_opts, getsockopt_int, restore_sock_opts, same_netns, set_owner,
    setsockopt_bytes, setsockopt_int, socket_of,
};
use crate::images::pb::fd_entry::File as FdFile;
use crate::images::pb::{FdTable, PacketMembership, PacketRing, PacketSocket};

pub struct PacketSkKind;

/// The tree object of a packet socket crust made, by its dumped inode
/// (also what a `VMA_PACKET_RING` mapping maps).
pub fn key(ino: u64) -> ObjKey {
    ("packet", ino, 0)
}

// ---------------------------------------------------------------- sock_diag

const PACKET_SHOW_INFO: u32 = 0x01;
const PACKET_SHOW_MCLIST: u32 = 0x02;
const PACKET_SHOW_RING_CFG: u32 = 0x04;
const PACKET_SHOW_FILTER: u32 = 0x20;
const PACKET_DIAG_INFO: u16 = 0;
const PACKET_DIAG_MCLIST: u16 = 1;
const PACKET_DIAG_RX_RING: u16 = 2;
const PACKET_DIAG_TX_RING: u16 = 3;
const PACKET_DIAG_UID: u16 = 5;
const PACKET_DIAG_FILTER: u16 = 7;
/// pdi_flags of struct packet_diag_info.
const PDI_AUXDATA: u32 = 0x2;
const PDI_ORIGDEV: u32 = 0x4;
const PDI_VNETHDR: u32 = 0x8;
const PDI_LOSS: u32 = 0x10;
/// struct packet_diag_msg: family, type, num (host order), ino, cookie[2].
const PACKET_DIAG_MSG_LEN: usize = 16;
/// struct packet_diag_mclist: index, count, type (u16), alen (u16), addr[32].
const MCLIST_LEN: usize = 44;
/// The obsolete SOCK_PACKET type (libc marks it deprecated: it is what
/// this kind carries).
const SOCK_PACKET: i32 = 10;
/// MAX_ADDR_LEN: the address room of a membership.
const MAX_ADDR_LEN: usize = 32;
/// The virtio-net header PACKET_VNET_HDR turns on.
const VNET_HDR_LEN: u32 = 10;
/// PACKET_FANOUT_FLAG_UNIQUEID as getsockopt(PACKET_FANOUT) places it.
const FANOUT_UNIQUEID_BIT: u32 = (libc::PACKET_FANOUT_FLAG_UNIQUEID >> 8) << 24;

/// What sock_diag says about one packet socket.
#[derive(Debug, Default)]
struct Diag {
    ino: u64,
    kind: i32,
    /// The protocol, host byte order.
    num: u16,
    /// struct packet_diag_info: index, version, reserve, copy_thresh,
    /// tstamp, flags.
    info: Option<[u32; 6]>,
    mclist: Vec<PacketMembership>,
    rx: Option<PacketRing>,
    tx: Option<PacketRing>,
    uid: Option<u32>,
    filter: bool,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |x| u32::from_ne_bytes(x.try_into().unwrap()))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |x| u16::from_ne_bytes(x.try_into().unwrap()))
}

/// struct packet_diag_ring, as the ring it describes.
fn parse_ring(v: &[u8]) -> PacketRing {
    PacketRing {
        block_size: u32_at(v, 0),
        block_nr: u32_at(v, 4),
        frame_size: u32_at(v, 8),
        frame_nr: u32_at(v, 12),
        retire_tmo: u32_at(v, 16),
        sizeof_priv: u32_at(v, 20),
        features: u32_at(v, 24),
    }
}

fn parse_diag(msg: &[u8]) -> Option<Diag> {
    if msg.len() < PACKET_DIAG_MSG_LEN || msg[0] != libc::AF_PACKET as u8 {
        return None;
    }
    let mut d = Diag {
        kind: msg[1] as i32,
        num: u16_at(msg, 2),
        ino: u32_at(msg, 4) as u64,
        ..Default::default()
    };
    for (k, v) in attrs(msg, PACKET_DIAG_MSG_LEN) {
        match k {
            PACKET_DIAG_INFO if v.len() >= 24 => {
                let mut i = [0u32; 6];
                for (n, x) in i.iter_mut().enumerate() {
                    *x = u32_at(v, n * 4);
                }
                d.info = Some(i);
            }
            PACKET_DIAG_MCLIST => {
                d.mclist = v
                    .chunks_exact(MCLIST_LEN)
                    .map(|m| {
                        let alen = (u16_at(m, 10) as usize).min(MAX_ADDR_LEN);
                        PacketMembership {
                            ifindex: u32_at(m, 0) as i32,
                            count: u32_at(m, 4),
                            r#type: u16_at(m, 8) as u32,
                            addr: m[12..12 + alen].to_vec(),
                        }
                    })
                    .collect();
                // The kernel keeps the newest first; added in that order
                // again, they would come back reversed.
                d.mclist.reverse();
            }
            PACKET_DIAG_RX_RING => d.rx = Some(parse_ring(v)),
            PACKET_DIAG_TX_RING => d.tx = Some(parse_ring(v)),
            PACKET_DIAG_UID => d.uid = Some(u32_at(v, 0)),
            PACKET_DIAG_FILTER => d.filter = true,
            _ => {}
        }
    }
    Some(d)
}

/// sock_diag's description of packet socket `ino` (the kernel lists them
/// all; it takes no inode to look up).
fn diag_of(d: &SockDiag, ino: u64) -> Result<Option<Diag>> {
    let mut req = vec![libc::AF_PACKET as u8, 0, 0, 0];
    req.extend_from_slice(&0u32.to_ne_bytes());
    let show = PACKET_SHOW_INFO | PACKET_SHOW_MCLIST | PACKET_SHOW_RING_CFG | PACKET_SHOW_FILTER;
    req.extend_from_slice(&show.to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]);
    Ok(d.query(&req, true)?
        .iter()
        .filter_map(|m| parse_diag(m))
        .find(|x| x.ino == ino))
}

/// The name of interface `ifindex` in crust's network namespace.
fn if_name(ifindex: i32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes into buf.
    let p = unsafe { libc::if_indextoname(ifindex as u32, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Bytes of memory a socket's rings take, which a mapping of them spans.
fn rings_len(s: &PacketSocket) -> u64 {
    [&s.rx_ring, &s.tx_ring]
        .into_iter()
        .flatten()
        .map(|r| r.block_size as u64 * r.block_nr as u64)
        .sum()
}

fn type_name(t: i32) -> &'static str {
    match t {
        libc::SOCK_RAW => "raw",
        libc::SOCK_DGRAM => "dgram",
        SOCK_PACKET => "SOCK_PACKET",
        _ => "?",
    }
}

// ---------------------------------------------------------------- dump

impl FileKind for PacketSkKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if !p.link.starts_with("socket:[") {
            return Ok(None);
        }
        let Some(s) = socket_of(p)? else {
            return Ok(None);
        };
        if s.domain != libc::AF_PACKET {
            return Ok(None);
        }
        let whose = format!("PID {} fd {} (packet socket:[{}])", p.pid, p.fd, s.ino);
        if !same_netns(p.pid) {
            bail!(
                "{whose}: the process is in another network namespace, which crust cannot dump yet"
            );
        }
        let d = diag_of(&SockDiag::open()?, s.ino)?
            .with_context(|| format!("{whose}: sock_diag does not list the socket"))?;
        if d.filter {
            bail!(
                "{whose} has a socket filter attached, which crust cannot carry yet; detach it (SO_DETACH_FILTER) or leave the process out"
            );
        }
        let info = d
            .info
            .with_context(|| format!("{whose}: sock_diag gave no PACKET_DIAG_INFO"))?;
        let ifindex = info[0] as i32;
        if ifindex < 0 {
            bail!(
                "{whose} is bound to an interface that was removed since; crust cannot bind it to that interface again"
            );
        }
        let ifname = match ifindex {
            0 => String::new(),
            i => if_name(i)
                .with_context(|| format!("{whose}: its interface (index {i}) has no name"))?,
        };
        let fd = s.fd.as_raw_fd();
        let spkt = d.kind == SOCK_PACKET;
        // SOCK_PACKET sockets have no SOL_PACKET options.
        let opt = |o| -> Result<i32> {
            match spkt {
                true => Ok(0),
                false => getsockopt_int(fd, libc::SOL_PACKET, o).with_context(|| whose.clone()),
            }
        };
        let fanout = opt(libc::PACKET_FANOUT)? as u32;
        let mode = (fanout >> 16) & 0xff;
        if fanout != 0 && [libc::PACKET_FANOUT_CBPF, libc::PACKET_FANOUT_EBPF].contains(&mode) {
            bail!(
                "{whose} is in fanout group {} steered by a BPF program, which crust cannot read back; leave the process out",
                fanout & 0xffff
            );
        }
        // PACKET_VNET_HDR_SZ (Linux 6.7) tells the size; older kernels only
        // have the on/off flag, and its 10-byte header.
        let vnet_hdr_sz = match spkt {
            true => 0,
            false => getsockopt_int(fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR_SZ)
                .map(|v| v as u32)
                .unwrap_or(if info[5] & PDI_VNETHDR != 0 {
                    VNET_HDR_LEN
                } else {
                    0
                }),
        };
        let flag = |bit| info[5] & bit != 0;
        Ok(Some(FdFile::Packet(PacketSocket {
            ino: s.ino,
            flags: p.open_flags(),
            r#type: d.kind,
            protocol: d.num as u32,
            ifindex,
            ifname,
            version: info[1],
            reserve: info[2],
            copy_thresh: info[3],
            timestamp: info[4],
            auxdata: flag(PDI_AUXDATA),
            origdev: flag(PDI_ORIGDEV),
            vnet_hdr_sz,
            loss: flag(PDI_LOSS),
            tx_has_off: opt(libc::PACKET_TX_HAS_OFF)? != 0,
            qdisc_bypass: opt(libc::PACKET_QDISC_BYPASS)? != 0,
            ignore_outgoing: opt(libc::PACKET_IGNORE_OUTGOING)? != 0,
            mclist: d.mclist,
            rx_ring: d.rx,
            tx_ring: d.tx,
            fanout,
            opts: Some(dump_sock_opts(fd).with_context(|| whose.clone())?),
            uid: d.uid.unwrap_or(p.meta.uid()),
            gid: p.meta.gid(),
        })))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Packet(s) = f else { return None };
        let mut out = format!(
            "packet {} socket:[{}] protocol {:#06x}",
            type_name(s.r#type),
            s.ino,
            s.protocol
        );
        match s.ifindex {
            0 => out += " on every interface",
            i => out += &format!(" on {} (index {i})", s.ifname),
        }
        if s.version != 0 {
            out += &format!(", TPACKET_V{}", s.version + 1);
        }
        for (name, r) in [("rx", &s.rx_ring), ("tx", &s.tx_ring)] {
            if let Some(r) = r {
                out += &format!(
                    ", {name} ring {}x{} bytes ({} frames)",
                    r.block_nr, r.block_size, r.frame_nr
                );
            }
        }
        if s.fanout != 0 {
            out += &format!(
                ", fanout group {} mode {}",
                s.fanout & 0xffff,
                (s.fanout >> 16) & 0xff
            );
        }
        if !s.mclist.is_empty() {
            out += &format!(", {} memberships", s.mclist.len());
        }
        Some(out)
    }

    /// Every mapping of a socket in the tree must be the rings of one of
    /// the tree's packet sockets, whole: the restore maps them from the new
    /// socket, which maps only all its rings at once.
    fn tree_read(&self, tables: &mut [FdTable], ctx: &DumpCtx) -> Result<()> {
        let mut rings: HashMap<u64, u64> = HashMap::new();
        for t in tables.iter() {
            for e in &t.fds {
                files::with_carried(e, &mut |_, f| {
                    if let FdFile::Packet(s) = f {
                        rings.insert(s.ino, rings_len(s));
                    }
                });
            }
        }
        for &pid in ctx.tree {
            let maps = crate::proc::parse_smaps(&crate::proc::read(pid, "maps")?)
                .with_context(|| format!("/proc/{pid}/maps"))?;
            for m in maps.iter().filter(|m| m.path.starts_with("socket:[")) {
                let what = format!("PID {pid} mapping {:#x}-{:#x}", m.start, m.end);
                match rings.get(&m.inode) {
                    None => bail!(
                        "{what} maps {}, which is no packet socket held by the tree (closed after mmap, or of another kind); crust cannot map it again",
                        m.path
                    ),
                    Some(&len) if len != m.end - m.start || m.offset != 0 => bail!(
                        "{what} maps part of the rings of {} ({len} bytes in all); crust maps a socket's rings only whole",
                        m.path
                    ),
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ restore

    fn check(&self, f: &FdFile) -> Result<()> {
        let FdFile::Packet(s) = f else { return Ok(()) };
        if s.ifindex > 0 && s.r#type == SOCK_PACKET {
            // SOCK_PACKET binds by name.
            if std::fs::metadata(format!("/sys/class/net/{}", s.ifname)).is_err() {
                bail!(
                    "packet socket:[{}] was bound to interface {}, which is missing here; create it, or restore where it exists",
                    s.ino,
                    s.ifname
                );
            }
        } else if s.ifindex > 0 && if_name(s.ifindex).is_none() {
            bail!(
                "packet socket:[{}] was bound to interface {} (index {}), which is missing here; create it with that index, or restore where it exists",
                s.ino,
                s.ifname,
                s.ifindex
            );
        }
        for m in &s.mclist {
            if if_name(m.ifindex).is_none() {
                bail!(
                    "packet socket:[{}] had a membership on interface index {}, which is missing here; create it with that index, or restore where it exists",
                    s.ino,
                    m.ifindex
                );
            }
        }
        Ok(())
    }

    fn prepare(&self, t: &TreeImages, objects: &mut TreeObjects) -> Result<()> {
        for (pid, e, f) in t.files() {
            let FdFile::Packet(s) = f else { continue };
            objects.make_once(key(s.ino), || {
                make(s).with_context(|| format!("PID {pid} fd {}", e.fd))
            })?;
        }
        Ok(())
    }

    fn restore(&self, f: &FdFile, ctx: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Packet(s) = f else {
            return Ok(None);
        };
        let what = format!("packet socket:[{}]", s.ino);
        Ok(Some(ctx.objects.dup_of(key(s.ino), &what)?))
    }
}

/// struct tpacket_req3 of a ring (TPACKET_V1/V2 read the first four fields).
fn ring_bytes(r: &PacketRing) -> Vec<u8> {
    [
        r.block_size,
        r.block_nr,
        r.frame_size,
        r.frame_nr,
        r.retire_tmo,
        r.sizeof_priv,
        r.features,
    ]
    .iter()
    .flat_map(|v| v.to_ne_bytes())
    .collect()
}

/// struct packet_mreq_max of a membership.
fn mreq_bytes(m: &PacketMembership) -> Vec<u8> {
    let mut b = m.ifindex.to_ne_bytes().to_vec();
    b.extend_from_slice(&(m.r#type as u16).to_ne_bytes());
    b.extend_from_slice(&(m.addr.len() as u16).to_ne_bytes());
    let mut addr = [0u8; MAX_ADDR_LEN];
    let n = m.addr.len().min(MAX_ADDR_LEN);
    addr[..n].copy_from_slice(&m.addr[..n]);
    b.extend_from_slice(&addr);
    b
}

fn os_err(r: i32, what: &str) -> Result<()> {
    if r < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Binds a socket to an interface and protocol (struct sockaddr_ll).
fn bind_ll(fd: RawFd, ifindex: i32, proto_be: u16, what: &str) -> Result<()> {
    // SAFETY: plain data for which all-zero is valid.
    let mut a: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    a.sll_family = libc::AF_PACKET as u16;
    a.sll_protocol = proto_be;
    a.sll_ifindex = ifindex;
    // SAFETY: bind(2) reads the sockaddr_ll we pass with its size.
    let r = unsafe {
        libc::bind(
            fd,
            (&a as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    os_err(r, &format!("binding {what} to interface index {ifindex}"))
}

/// Binds a SOCK_PACKET socket to an interface, by name (struct sockaddr).
fn bind_spkt(fd: RawFd, ifname: &str, what: &str) -> Result<()> {
    // SAFETY: plain data for which all-zero is valid.
    let mut a: libc::sockaddr = unsafe { std::mem::zeroed() };
    a.sa_family = libc::AF_PACKET as u16;
    for (d, s) in a.sa_data.iter_mut().zip(ifname.bytes().take(13)) {
        *d = s as libc::c_char;
    }
    // SAFETY: bind(2) reads the sockaddr we pass with its size.
    let r = unsafe {
        libc::bind(
            fd,
            &a,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    os_err(r, &format!("binding {what} to interface {ifname}"))
}

/// Makes a packet socket as it was dumped, in crust.
fn make(s: &PacketSocket) -> Result<OwnedFd> {
    let what = format!("packet socket:[{}]", s.ino);
    let spkt = s.r#type == SOCK_PACKET;
    let proto_be = (s.protocol as u16).to_be();
    // Made with no protocol, so that it receives nothing before it is
    // bound with its options set (SOCK_PACKET takes it here only: its bind
    // keeps the protocol it has).
    let create_proto = if spkt { proto_be as i32 } else { 0 };
    // SAFETY: socket(2) returns a new fd or -1.
    let r = unsafe { libc::socket(libc::AF_PACKET, s.r#type | libc::SOCK_CLOEXEC, create_proto) };
    let fd = files::new_fd(r as i64, &what)?;
    let raw = fd.as_raw_fd();
    if let Some(o) = &s.opts {
        restore_sock_opts(raw, o).with_context(|| what.clone())?;
    }
    if spkt {
        if s.ifindex > 0 {
            bind_spkt(raw, &s.ifname, &what)?;
        }
    } else {
        let set = |opt, v: i32, name: &str| {
            setsockopt_int(raw, libc::SOL_PACKET, opt, v, &format!("{name} of {what}"))
        };
        // The kernel takes these only while the socket has no ring.
        if s.version != 0 {
            set(libc::PACKET_VERSION, s.version as i32, "PACKET_VERSION")?;
        }
        if s.reserve != 0 {
            set(libc::PACKET_RESERVE, s.reserve as i32, "PACKET_RESERVE")?;
        }
        if s.loss {
            set(libc::PACKET_LOSS, 1, "PACKET_LOSS")?;
        }
        if s.vnet_hdr_sz != 0 {
            let sz = set(
                libc::PACKET_VNET_HDR_SZ,
                s.vnet_hdr_sz as i32,
                "PACKET_VNET_HDR_SZ",
            );
            if sz.is_err() && s.vnet_hdr_sz == VNET_HDR_LEN {
                set(libc::PACKET_VNET_HDR, 1, "PACKET_VNET_HDR")?;
            } else {
                sz?;
            }
        }
        if s.tx_has_off {
            set(libc::PACKET_TX_HAS_OFF, 1, "PACKET_TX_HAS_OFF")?;
        }
        for (opt, ring, name) in [
            (libc::PACKET_RX_RING, &s.rx_ring, "PACKET_RX_RING"),
            (libc::PACKET_TX_RING, &s.tx_ring, "PACKET_TX_RING"),
        ] {
            if let Some(r) = ring {
                setsockopt_bytes(
                    raw,
                    libc::SOL_PACKET,
                    opt,
                    &ring_bytes(r),
                    &format!("{name} of {what}"),
                )?;
            }
        }
        if s.ifindex != 0 || s.protocol != 0 {
            bind_ll(raw, s.ifindex, proto_be, &what)?;
        }
        for m in &s.mclist {
            for _ in 0..m.count.max(1) {
                setsockopt_bytes(
                    raw,
                    libc::SOL_PACKET,
                    libc::PACKET_ADD_MEMBERSHIP,
                    &mreq_bytes(m),
                    &format!(
                        "membership type {} on interface index {} of {what}",
                        m.r#type, m.ifindex
                    ),
                )?;
            }
        }
        // A group is joined by a bound socket; its id is given as the
        // kernel chose it, not asked for anew.
        if s.fanout != 0 {
            set(
                libc::PACKET_FANOUT,
                (s.fanout & !FANOUT_UNIQUEID_BIT) as i32,
                &format!("fanout group {}", s.fanout & 0xffff),
            )?;
        }
        if s.auxdata {
            set(libc::PACKET_AUXDATA, 1, "PACKET_AUXDATA")?;
        }
        if s.origdev {
            set(libc::PACKET_ORIGDEV, 1, "PACKET_ORIGDEV")?;
        }
        if s.timestamp != 0 {
            set(
                libc::PACKET_TIMESTAMP,
                s.timestamp as i32,
                "PACKET_TIMESTAMP",
            )?;
        }
        if s.copy_thresh != 0 {
            set(
                libc::PACKET_COPY_THRESH,
                s.copy_thresh as i32,
                "PACKET_COPY_THRESH",
            )?;
        }
        if s.qdisc_bypass {
            set(libc::PACKET_QDISC_BYPASS, 1, "PACKET_QDISC_BYPASS")?;
        }
        if s.ignore_outgoing {
            set(libc::PACKET_IGNORE_OUTGOING, 1, "PACKET_IGNORE_OUTGOING")?;
        }
    }
    files::set_status_flags(raw, s.flags, &what)?;
    set_owner(raw, s.uid, s.gid, &what)?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diag_messages() {
        // A raw socket, ETH_P_ALL, inode 77: an info attribute, a
        // membership list of two (newest first), an RX ring.
        let mut m = vec![libc::AF_PACKET as u8, libc::SOCK_RAW as u8];
        m.extend_from_slice(&3u16.to_ne_bytes());
        m.extend_from_slice(&77u32.to_ne_bytes());
        m.extend_from_slice(&[0; 8]);
        let attr = |m: &mut Vec<u8>, kind: u16, v: &[u8]| {
            m.extend_from_slice(&((v.len() + 4) as u16).to_ne_bytes());
            m.extend_from_slice(&kind.to_ne_bytes());
            m.extend_from_slice(v);
            while !m.len().is_multiple_of(4) {
                m.push(0);
            }
        };
        let info: Vec<u8> = [1u32, 1, 8, 0, 0, PDI_AUXDATA | PDI_LOSS]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        attr(&mut m, PACKET_DIAG_INFO, &info);
        let mut ml = Vec::new();
        for (ty, count) in [(1u16, 2u32), (3, 1)] {
            ml.extend_from_slice(&1u32.to_ne_bytes());
            ml.extend_from_slice(&count.to_ne_bytes());
            ml.extend_from_slice(&ty.to_ne_bytes());
            ml.extend_from_slice(&6u16.to_ne_bytes());
            let mut a = [0u8; 32];
            a[..6].copy_from_slice(&[1, 2, 3, 4, 5, 6]);
            ml.extend_from_slice(&a);
        }
        attr(&mut m, PACKET_DIAG_MCLIST | 0x8000, &ml);
        let ring: Vec<u8> = [4096u32, 1, 1024, 4, 0, 0, 0]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        attr(&mut m, PACKET_DIAG_RX_RING, &ring);
        let d = parse_diag(&m).unwrap();
        assert_eq!((d.ino, d.kind, d.num), (77, libc::SOCK_RAW, 3));
        let i = d.info.unwrap();
        assert_eq!((i[0], i[1], i[2]), (1, 1, 8));
        // Oldest first: the order they are added again in.
        assert_eq!(d.mclist.len(), 2);
        assert_eq!((d.mclist[0].r#type, d.mclist[0].count), (3, 1));
        assert_eq!((d.mclist[1].r#type, d.mclist[1].count), (1, 2));
        assert_eq!(d.mclist[1].addr, vec![1, 2, 3, 4, 5, 6]);
        let r = d.rx.unwrap();
        assert_eq!(
            (r.block_size, r.block_nr, r.frame_size, r.frame_nr),
            (4096, 1, 1024, 4)
        );
        assert!(d.tx.is_none() && !d.filter);
        let s = PacketSocket {
            rx_ring: d.rx,
            tx_ring: Some(parse_ring(&ring)),
            ..Default::default()
        };
        assert_eq!(rings_len(&s), 8192);
        assert_eq!(ring_bytes(&r), ring);
        let mr = mreq_bytes(&d.mclist[1]);
        assert_eq!(mr.len(), 40);
        assert_eq!(&mr[8..14], &[1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn fanout_uniqueid_bit() {
        // getsockopt(PACKET_FANOUT) = id | type << 16 | (type_flags >> 8) << 24.
        assert_eq!(FANOUT_UNIQUEID_BIT, 0x2000_0000);
    }
}

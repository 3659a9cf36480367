//! Unix domain sockets (AF_UNIX): stream, datagram and seqpacket; pairs,
//! sockets bound to paths (also removed since) and abstract names,
//! listeners with their backlog of connections not accepted yet, connected
//! sockets and those whose peer has closed, the bytes and messages queued
//! in every receive queue with the files in flight in them (SCM_RIGHTS),
//! shutdown state, SOL_SOCKET options and SO_PEERCRED.
//!
//! Dump: sock_diag describes a socket from outside (name, the inode its
//! path had, peer, the connections in a listener's backlog, shutdown); a
//! copy of the task's socket (pidfd_getfd) is peeked with SO_PEEK_OFF and
//! MSG_PEEK, which reads the queue without taking from it and hands crust
//! copies of the files in flight: each is dumped through the kinds like any
//! fd of the tree and carried in the socket's entry. A socket's state goes
//! with its first entry in the dump; its peer must be dumped too (checked
//! once every table is read, `tree_read`), or be outside with
//! `--ext-unix-sk`.
//! Restore: crust makes every socket of the tree before it forks, as the
//! kernel would have: pairs with socketpair(), names bound again (a removed
//! path bound again, renamed out of the way for crust to connect through,
//! and removed at the end), listeners listening, accepted connections made
//! by connecting to their listener (or a stand-in with the same name) and
//! accepting, the backlog connected in order, each queue refilled by the
//! socket its data came from (or a stand-in that then closes, for data from
//! a closed peer), shutdown and options last. Connections are made by a
//! helper process with the dumped PID and credentials of whoever made
//! them, so SO_PEERCRED reads the same. Tasks dup the sockets they held.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tracing::{info, warn};

use super::files::{
    self, DumpCtx, FdProbe, FileKind, ObjKey, RestoreCtx, TreeImages, TreeObjects, dup_fd,
};
use super::sockets::{
    SockDiag, attrs, cmsg_fds, dump_sock_opts, getsockopt_bytes, getsockopt_int, recv_with_fds,
    restore_sock_opts, same_netns, send_with_fds, setsockopt_int, socket_of,
};
use crate::images::pb::fd_entry::File as FdFile;
use crate::images::pb::{
    FdEntry, FdTable, UnixMessage, UnixSocket, UnixSocketFile, UnixSocketState,
};

pub struct UnixSkKind;

/// sk_state values sock_diag reports for unix sockets.
const TCP_ESTABLISHED: u32 = 1;
const TCP_CLOSE: u32 = 7;
const TCP_LISTEN: u32 = 10;
/// sk_shutdown bits.
const RCV_SHUTDOWN: u32 = 1;
const SEND_SHUTDOWN: u32 = 2;

/// The tree object of a socket crust made.
fn key(ino: u64) -> ObjKey {
    ("unix", ino, 0)
}

fn type_name(t: i32) -> &'static str {
    match t {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "dgram",
        libc::SOCK_SEQPACKET => "seqpacket",
        _ => "?",
    }
}

/// A name for people: a path, or @name for an abstract one.
fn show_name(n: &[u8]) -> String {
    match n.split_first() {
        None => "(unbound)".into(),
        Some((0, rest)) => format!("@{}", String::from_utf8_lossy(rest).replace('\0', "@")),
        Some(_) => String::from_utf8_lossy(path_bytes(n)).into_owned(),
    }
}

/// A path name without the NUL the kernel keeps after it.
fn path_bytes(n: &[u8]) -> &[u8] {
    let end = n.iter().position(|&b| b == 0).unwrap_or(n.len());
    &n[..end]
}

fn is_abstract(n: &[u8]) -> bool {
    n.first() == Some(&0)
}

/// The shutdown bits the other end of a connection gets from these: what
/// one end stops receiving, the other stops sending.
fn mirror(bits: u32) -> u32 {
    ((bits & RCV_SHUTDOWN) << 1) | ((bits & SEND_SHUTDOWN) >> 1)
}

// ---------------------------------------------------------------- sock_diag

const UDIAG_SHOW_NAME: u32 = 0x01;
const UDIAG_SHOW_VFS: u32 = 0x02;
const UDIAG_SHOW_PEER: u32 = 0x04;
const UDIAG_SHOW_ICONS: u32 = 0x08;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UDIAG_SHOW_UID: u32 = 0x40;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_VFS: u16 = 1;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_ICONS: u16 = 3;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_SHUTDOWN: u16 = 6;
const UNIX_DIAG_UID: u16 = 7;
/// struct unix_diag_msg: family, type, state, pad, ino, cookie[2].
const UNIX_DIAG_MSG_LEN: usize = 16;

/// What sock_diag says about one unix socket.
#[derive(Debug, Default)]
struct Diag {
    ino: u64,
    kind: i32,
    state: u32,
    name: Vec<u8>,
    /// (inode, device as the kernel encodes it) of the file a path name
    /// created.
    vfs: Option<(u64, u64)>,
    peer: u64,
    /// A listener's backlog: the connecting sockets, oldest first.
    icons: Vec<u64>,
    /// Bytes queued to receive and not received by the peer yet (for a
    /// listener: connections waiting, and the backlog limit).
    rqlen: (u32, u32),
    shutdown: u32,
    uid: u32,
}

/// struct unix_diag_req.
fn diag_req(ino: u64, states: u32, show: u32) -> Vec<u8> {
    let mut r = vec![libc::AF_UNIX as u8, 0, 0, 0];
    r.extend_from_slice(&states.to_ne_bytes());
    r.extend_from_slice(&(ino as u32).to_ne_bytes());
    r.extend_from_slice(&show.to_ne_bytes());
    // No cookie: the socket is looked up by its inode alone.
    r.extend_from_slice(&[0xff; 8]);
    r
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |x| u32::from_ne_bytes(x.try_into().unwrap()))
}

fn parse_diag(msg: &[u8]) -> Option<Diag> {
    if msg.len() < UNIX_DIAG_MSG_LEN || msg[0] != libc::AF_UNIX as u8 {
        return None;
    }
    let mut d = Diag {
        kind: msg[1] as i32,
        state: msg[2] as u32,
        ino: u32_at(msg, 4) as u64,
        ..Default::default()
    };
    for (k, v) in attrs(msg, UNIX_DIAG_MSG_LEN) {
        match k {
            UNIX_DIAG_NAME => d.name = v.to_vec(),
            UNIX_DIAG_VFS => d.vfs = Some((u32_at(v, 0) as u64, u32_at(v, 4) as u64)),
            UNIX_DIAG_PEER => d.peer = u32_at(v, 0) as u64,
            UNIX_DIAG_ICONS => d.icons = v.chunks_exact(4).map(|c| u32_at(c, 0) as u64).collect(),
            UNIX_DIAG_RQLEN => d.rqlen = (u32_at(v, 0), u32_at(v, 4)),
            UNIX_DIAG_SHUTDOWN => d.shutdown = v.first().copied().unwrap_or(0) as u32,
            UNIX_DIAG_UID => d.uid = u32_at(v, 0),
            _ => {}
        }
    }
    Some(d)
}

/// sock_diag's description of the unix socket with inode `ino`, or None
/// when there is none (it was closed).
fn diag_of(d: &SockDiag, ino: u64) -> Result<Option<Diag>> {
    let show = UDIAG_SHOW_NAME
        | UDIAG_SHOW_VFS
        | UDIAG_SHOW_PEER
        | UDIAG_SHOW_ICONS
        | UDIAG_SHOW_RQLEN
        | UDIAG_SHOW_UID;
    Ok(d.query(&diag_req(ino, u32::MAX, show), false)?
        .iter()
        .filter_map(|m| parse_diag(m))
        .find(|x| x.ino == ino))
}

/// Every listening unix socket of crust's network namespace, with its name,
/// file and backlog.
fn listeners(d: &SockDiag) -> Result<Vec<Diag>> {
    Ok(d.query(
        &diag_req(
            0,
            1 << TCP_LISTEN,
            UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_ICONS,
        ),
        true,
    )?
    .iter()
    .filter_map(|m| parse_diag(m))
    .collect())
}

/// A process holding socket `ino` open, and its name, for messages.
fn holder_of(ino: u64) -> Option<(i32, String)> {
    let link = format!("socket:[{ino}]");
    for pid in std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
    {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        if fds
            .filter_map(|e| e.ok())
            .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == link.as_str()))
        {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            return Some((pid, comm.trim().to_string()));
        }
    }
    None
}

// ---------------------------------------------------------------- dump

thread_local! {
    /// While files in flight in a socket are dumped: the process of the
    /// tree holding that socket (its cwd resolves relative names), and how
    /// errors name where the file was found.
    static CARRIER: RefCell<Option<(i32, String)>> = const { RefCell::new(None) };
}

/// The process whose view (cwd, root, network namespace) a probed socket
/// is seen in, and how errors name it.
fn holder(p: &FdProbe, ino: u64) -> (i32, String) {
    match CARRIER.with(|c| c.borrow().clone()) {
        Some((pid, whose)) if p.pid == std::process::id() as i32 => {
            (pid, format!("socket:[{ino}] in flight in {whose}"))
        }
        _ => (p.pid, format!("PID {} fd {} (socket:[{ino}])", p.pid, p.fd)),
    }
}

impl FileKind for UnixSkKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if !p.link.starts_with("socket:[") {
            return Ok(None);
        }
        let Some(s) = socket_of(p)? else {
            return Ok(None);
        };
        if s.domain != libc::AF_UNIX {
            return Ok(None);
        }
        let (pid, whose) = holder(p, s.ino);
        if ![libc::SOCK_STREAM, libc::SOCK_DGRAM, libc::SOCK_SEQPACKET].contains(&s.kind)
            || s.protocol != 0
        {
            bail!(
                "{whose} is a unix socket of type {} protocol {}, which crust cannot dump",
                s.kind,
                s.protocol
            );
        }
        if !same_netns(pid) {
            bail!(
                "{whose}: the process is in another network namespace, which crust cannot dump yet"
            );
        }
        let mut file = UnixSocketFile {
            socket: Some(UnixSocket {
                ino: s.ino,
                flags: p.open_flags(),
                state: None,
            }),
            in_flight: Vec::new(),
        };
        if p.ctx.first_time(key(s.ino)) {
            let (state, in_flight) = dump_state(s.fd.as_raw_fd(), s.ino, pid, &whose, p.ctx)?;
            file.socket.as_mut().unwrap().state = Some(state);
            file.in_flight = in_flight;
        }
        Ok(Some(FdFile::Unix(file)))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Unix(u) = f else { return None };
        let s = u.socket.as_ref()?;
        let Some(st) = &s.state else {
            return Some(format!(
                "unix socket:[{}] (described with its first fd)",
                s.ino
            ));
        };
        let mut out = format!(
            "unix {} socket:[{}] {}{}",
            type_name(st.r#type),
            s.ino,
            show_name(&st.name),
            if st.ghost { " (removed)" } else { "" }
        );
        match st.state {
            TCP_LISTEN => out += &format!(" listening, {} not accepted", st.pending.len()),
            _ if st.peer != 0 => out += &format!(" peer socket:[{}]", st.peer),
            _ if st.pending_on != 0 => out += &format!(" waiting on socket:[{}]", st.pending_on),
            _ if st.peer_gone => out += " peer closed",
            _ if !st.external_peer_name.is_empty() => {
                out += &format!(" peer {} outside", show_name(&st.external_peer_name))
            }
            _ if st.external => out += " peer outside",
            _ => {}
        }
        if st.shutdown != 0 {
            out += &format!(" shutdown {}", st.shutdown);
        }
        if !st.queue.is_empty() {
            let bytes: usize = st.queue.iter().map(|m| m.data.len()).sum();
            out += &format!(", {} queued ({bytes} bytes)", st.queue.len());
        }
        for e in &u.in_flight {
            if let Some(f) = &e.file {
                out += &format!(", in flight: [{}]", files::describe_file(f));
            }
        }
        Some(out)
    }

    fn carried<'a>(&self, f: &'a FdFile) -> Vec<&'a FdEntry> {
        match f {
            FdFile::Unix(u) => u.in_flight.iter().collect(),
            _ => Vec::new(),
        }
    }

    fn tree_read(&self, tables: &mut [FdTable], ctx: &DumpCtx) -> Result<()> {
        let mut dumped = HashSet::new();
        for t in tables.iter() {
            for e in &t.fds {
                each_socket(e, &mut |u| {
                    dumped.insert(u.socket.as_ref().map_or(0, |s| s.ino));
                });
            }
        }
        if dumped.is_empty() {
            return Ok(());
        }
        let diag = SockDiag::open()?;
        let mut checked: HashMap<u64, UnixSocketState> = HashMap::new();
        // The tables are in the order of the tree's live processes.
        for (t, &pid) in tables.iter_mut().zip(ctx.tree) {
            for e in t.fds.iter_mut() {
                let fd = e.fd;
                let top = match &e.file {
                    Some(FdFile::Unix(u)) => u.socket.as_ref().map_or(0, |s| s.ino),
                    _ => 0,
                };
                each_socket_mut(e, &mut |u: &mut UnixSocketFile| -> Result<()> {
                    let Some(s) = u.socket.as_mut() else {
                        return Ok(());
                    };
                    let Some(st) = s.state.as_mut() else {
                        return Ok(());
                    };
                    if let Some(done) = checked.get(&s.ino) {
                        *st = done.clone();
                        return Ok(());
                    }
                    let me = match st.name.is_empty() {
                        true => format!("socket:[{}]", s.ino),
                        false => format!("socket:[{}] {}", s.ino, show_name(&st.name)),
                    };
                    let whose = if s.ino == top {
                        format!("PID {pid} fd {fd} ({me})")
                    } else {
                        format!("{me}, in flight in PID {pid} fd {fd},")
                    };
                    check_peers(st, s.ino, &whose, &dumped, &diag, ctx)?;
                    checked.insert(s.ino, st.clone());
                    Ok(())
                })?;
            }
        }
        Ok(())
    }

    fn prepare(&self, t: &TreeImages, objects: &mut TreeObjects) -> Result<()> {
        let mut want: BTreeMap<u64, Want> = BTreeMap::new();
        let mut named = HashSet::new();
        for (pid, e, f) in t.files() {
            let FdFile::Unix(u) = f else { continue };
            let Some(s) = &u.socket else { continue };
            named.insert((s.ino, pid, e.fd));
            if let Some(st) = &s.state {
                want.entry(s.ino).or_insert(Want {
                    flags: s.flags,
                    st,
                    in_flight: &u.in_flight,
                });
            }
        }
        for (ino, pid, fd) in &named {
            if !want.contains_key(ino) {
                bail!(
                    "PID {pid} fd {fd}: the images do not describe socket:[{ino}] (a damaged dump?)"
                );
            }
        }
        if want.is_empty() {
            return Ok(());
        }
        let made = Builder::new(want).build(t, objects)?;
        for (ino, fd) in made {
            objects.insert(key(ino), fd);
        }
        Ok(())
    }

    fn restore(&self, f: &FdFile, ctx: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Unix(u) = f else { return Ok(None) };
        let ino = u.socket.as_ref().map_or(0, |s| s.ino);
        Ok(Some(
            ctx.objects.dup_of(key(ino), &format!("socket:[{ino}]"))?,
        ))
    }
}

/// Calls `f` on every unix socket entry of `e`, itself and those in flight.
fn each_socket(e: &FdEntry, f: &mut dyn FnMut(&UnixSocketFile)) {
    if let Some(FdFile::Unix(u)) = &e.file {
        f(u);
        for c in &u.in_flight {
            each_socket(c, f);
        }
    }
}

fn each_socket_mut(
    e: &mut FdEntry,
    f: &mut dyn FnMut(&mut UnixSocketFile) -> Result<()>,
) -> Result<()> {
    if let Some(FdFile::Unix(u)) = &mut e.file {
        f(u)?;
        for c in &mut u.in_flight {
            each_socket_mut(c, f)?;
        }
    }
    Ok(())
}

/// Refuses a socket connected to one outside the dumped tree, unless
/// `--ext-unix-sk` lets it through (then marked to be connected again by
/// name, or to be stood in for).
fn check_peers(
    st: &mut UnixSocketState,
    ino: u64,
    whose: &str,
    dumped: &HashSet<u64>,
    diag: &SockDiag,
    ctx: &DumpCtx,
) -> Result<()> {
    let ext = ctx.ext_unix_sk.as_deref();
    // --ext-unix-sk=INO: this socket may have any peer outside; the user
    // gives a stand-in for it on restore.
    let listed = ext.is_some_and(|l| l.contains(&ino));
    let outside = |peer: u64| -> String {
        match holder_of(peer) {
            Some((pid, comm)) => format!("held by PID {pid} ({comm}) outside the dumped tree"),
            None => "held outside the dumped tree (by no process: in flight elsewhere?)".into(),
        }
    };
    if st.peer != 0 && !dumped.contains(&st.peer) {
        let Some(peer) = diag_of(diag, st.peer)? else {
            // Closed while the dump ran.
            st.peer = 0;
            st.peer_gone = true;
            return Ok(());
        };
        if listed {
            info!("{whose}: connected outside the tree; a stand-in is given on restore");
            st.external = true;
            st.peer = 0;
            return Ok(());
        }
        if ext.is_some() && st.r#type == libc::SOCK_DGRAM && !peer.name.is_empty() {
            if st.name.is_empty() && !st.queue.is_empty() {
                bail!(
                    "{whose}: an unbound datagram socket connected outside the tree to {}, with messages queued, which crust cannot queue again",
                    show_name(&peer.name)
                );
            }
            info!(
                "{whose}: connected to {} outside the tree; connected to that name again on restore",
                show_name(&peer.name)
            );
            st.external_peer_name = peer.name;
            st.peer = 0;
            return Ok(());
        }
        bail!(
            "{whose} is connected to socket:[{}] {} {}; dump that process too{}",
            peer.ino,
            show_name(&peer.name),
            outside(peer.ino),
            if st.r#type == libc::SOCK_DGRAM && !peer.name.is_empty() {
                ", or give --ext-unix-sk to connect it to that name again on restore".to_string()
            } else {
                format!(
                    ", or let it be stood in for: --ext-unix-sk={ino} and, on restore, --inherit-fd fd[N]:socket:[{ino}]"
                )
            }
        );
    }
    if st.pending_on != 0 && !dumped.contains(&st.pending_on) {
        if listed {
            st.external = true;
            st.pending_on = 0;
            return Ok(());
        }
        let name = diag_of(diag, st.pending_on)?
            .map(|d| show_name(&d.name))
            .unwrap_or_default();
        bail!(
            "{whose} is a connection to the listening socket:[{}] {name} {}, not accepted yet; dump that process too",
            st.pending_on,
            outside(st.pending_on)
        );
    }
    if st.state == TCP_LISTEN {
        let mut keep = Vec::new();
        for &c in &st.pending {
            if c == 0 || dumped.contains(&c) {
                keep.push(c);
            } else if ext.is_some() {
                warn!(
                    "{whose}: the connection from socket:[{c}] ({}) not accepted yet is dropped (--ext-unix-sk)",
                    outside(c)
                );
            } else {
                bail!(
                    "{whose} has a connection from socket:[{c}] {} not accepted yet; accept or close it, or give --ext-unix-sk to drop it",
                    outside(c)
                );
            }
        }
        st.pending = keep;
    }
    Ok(())
}

/// Reads one socket's state: sock_diag's description, options, and its
/// receive queue with the files in flight in it.
fn dump_state(
    fd: RawFd,
    ino: u64,
    pid: i32,
    whose: &str,
    ctx: &DumpCtx,
) -> Result<(UnixSocketState, Vec<FdEntry>)> {
    let sd = SockDiag::open()?;
    let d = diag_of(&sd, ino)?
        .with_context(|| format!("{whose}: sock_diag does not know the socket"))?;
    let mut st = UnixSocketState {
        r#type: d.kind,
        state: d.state,
        name: d.name.clone(),
        shutdown: d.shutdown,
        owner_uid: d.uid,
        opts: Some(dump_sock_opts(fd).with_context(|| format!("{whose}: its options"))?),
        ..Default::default()
    };
    if ![TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN].contains(&d.state) {
        bail!(
            "{whose} is a unix socket in state {}, which crust cannot dump",
            d.state
        );
    }
    // A classic BPF filter (SO_ATTACH_FILTER): its length reads as 0 when
    // none is attached.
    let mut len: libc::socklen_t = 0;
    // SAFETY: with a zero length SO_GET_FILTER only reports the filter's
    // length in instructions.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            std::ptr::null_mut(),
            &mut len,
        )
    };
    if r == 0 && len > 0 {
        bail!(
            "{whose} has a socket filter attached (SO_ATTACH_FILTER), which crust cannot carry yet"
        );
    }
    let connected_kind = d.kind != libc::SOCK_DGRAM;
    match d.state {
        TCP_LISTEN => {
            st.pending = d.icons.clone();
            st.backlog = d.rqlen.1;
        }
        TCP_ESTABLISHED if d.peer != 0 => st.peer = d.peer,
        TCP_ESTABLISHED if connected_kind => {
            // Its peer has no inode: the connection waits in a listener's
            // backlog (the peer is the listener's embryo), or the peer was
            // closed.
            let all = listeners(&sd)?;
            match all.iter().find(|l| l.icons.contains(&ino)) {
                Some(l) => {
                    if d.rqlen.1 > 0 {
                        bail!(
                            "{whose} has sent data on a connection that socket:[{}] {} has not accepted yet; crust cannot read it without accepting the connection",
                            l.ino,
                            show_name(&l.name)
                        );
                    }
                    st.pending_on = l.ino;
                }
                None => st.peer_gone = true,
            }
        }
        TCP_ESTABLISHED if connected(fd) => st.peer_gone = true,
        // A datagram socket others connected to reads as established too.
        _ => {}
    }
    if connected_kind && d.state == TCP_ESTABLISHED && !d.name.is_empty() {
        // An accepted socket carries its listener's name (and file): a
        // listener has them still, or the peer has no name (a listener has
        // one, a connecting socket need not).
        st.accepted = listeners(&sd)?
            .iter()
            .any(|l| l.name == d.name && l.kind == d.kind && l.vfs == d.vfs)
            || d.peer != 0 && diag_of(&sd, d.peer)?.is_some_and(|p| p.name.is_empty());
    }
    if !d.name.is_empty() && !is_abstract(&d.name) && !st.accepted {
        dump_path_name(&mut st, &d, pid, whose)?;
    }
    if connected_kind && d.state == TCP_ESTABLISHED || d.kind == libc::SOCK_DGRAM {
        let mut cred = [0u8; 12];
        if let Ok(b) = getsockopt_bytes(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, 12) {
            cred[..b.len().min(12)].copy_from_slice(&b[..b.len().min(12)]);
        }
        st.peer_pid = u32_at(&cred, 0) as i32;
        st.peer_uid = u32_at(&cred, 4);
        st.peer_gid = u32_at(&cred, 8);
    } else if d.state == TCP_LISTEN {
        // A listener's own credentials (set by listen()) are what its
        // clients read as their peer's.
        let b = getsockopt_bytes(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, 12)?;
        st.peer_pid = u32_at(&b, 0) as i32;
        st.peer_uid = u32_at(&b, 4);
        st.peer_gid = u32_at(&b, 8);
    }
    let mut in_flight = Vec::new();
    // A stream or seqpacket socket not connected has no queue to read.
    if d.state == TCP_ESTABLISHED || d.kind == libc::SOCK_DGRAM {
        let carrier = CARRIER.with(|c| c.borrow().clone());
        let outer = carrier.clone().unwrap_or((pid, whose.to_string()));
        CARRIER.with(|c| *c.borrow_mut() = Some(outer));
        let r = peek_queue(fd, &st, ctx, whose);
        CARRIER.with(|c| *c.borrow_mut() = carrier);
        let (queue, files) = r?;
        st.queue = queue;
        in_flight = files;
    }
    if d.kind == libc::SOCK_DGRAM
        && st.name.is_empty()
        && st.peer == 0
        && !st.peer_gone
        && !st.queue.is_empty()
    {
        bail!(
            "{whose}: an unbound, unconnected datagram socket with messages queued, which crust cannot queue again"
        );
    }
    Ok((st, in_flight))
}

/// Whether a socket has a peer, alive or not: getpeername() tells, even
/// when sock_diag cannot name a closed one.
fn connected(fd: RawFd) -> bool {
    // SAFETY: plain data for which all-zero is valid.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getpeername writes at most `len` bytes into sa.
    unsafe { libc::getpeername(fd, (&mut sa as *mut libc::sockaddr_un).cast(), &mut len) == 0 }
}

/// Where a path name resolves (relative names against the holder's cwd),
/// and whether its socket file is still there, with its mode and owner.
fn dump_path_name(st: &mut UnixSocketState, d: &Diag, pid: i32, whose: &str) -> Result<()> {
    let root = std::fs::read_link(format!("/proc/{pid}/root"))
        .with_context(|| format!("{whose}: reading the root of PID {pid}"))?;
    if root != Path::new("/") {
        bail!(
            "{whose} is bound to {} by a process chrooted to {}; crust cannot bind it there again",
            show_name(&d.name),
            root.display()
        );
    }
    let path = Path::new(OsStr::from_bytes(path_bytes(&d.name)));
    let full = if path.is_relative() {
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
            .with_context(|| format!("{whose}: reading the cwd of PID {pid}"))?;
        st.bind_dir = cwd.to_string_lossy().into_owned();
        cwd.join(path)
    } else {
        path.to_path_buf()
    };
    let live = match (std::fs::symlink_metadata(&full), d.vfs) {
        (Ok(m), Some((ino, kdev))) => {
            let dev = libc::makedev((kdev >> 20) as u32, (kdev & 0xfffff) as u32);
            m.file_type().is_socket() && m.ino() == ino && m.dev() == dev
        }
        _ => false,
    }
    .then(|| std::fs::symlink_metadata(&full).ok())
    .flatten();
    match live {
        Some(m) => {
            st.file_mode = m.mode() & 0o7777;
            st.file_uid = m.uid();
            st.file_gid = m.gid();
        }
        None => st.ghost = true,
    }
    Ok(())
}

/// One peek at the receive queue from `off`.
struct Peeked {
    /// Bytes copied; for a datagram peeked with MSG_TRUNC, its whole length.
    n: usize,
    fds: Vec<OwnedFd>,
    sender: Vec<u8>,
}

/// Room for SCM_RIGHTS with the most fds one message carries (SCM_MAX_FD)
/// and SCM_CREDENTIALS.
const CONTROL_LEN: usize = 2048;

fn peek_at(fd: RawFd, off: i32, buf: &mut [u8], trunc: bool) -> std::io::Result<Peeked> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, off, "SO_PEEK_OFF")
        .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = vec![0u8; CONTROL_LEN];
    // SAFETY: plain data for which all-zero is valid.
    let mut from: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // SAFETY: plain data for which all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_un).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_un>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    let flags = libc::MSG_PEEK
        | libc::MSG_DONTWAIT
        | libc::MSG_CMSG_CLOEXEC
        | if trunc { libc::MSG_TRUNC } else { 0 };
    // SAFETY: recvmsg writes into the buffers msg points at, all of which
    // live until it returns.
    let n = unsafe { libc::recvmsg(fd, &mut msg, flags) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fds = cmsg_fds(&msg);
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::other(
            "the files in flight did not fit the control buffer",
        ));
    }
    let namelen = (msg.msg_namelen as usize).saturating_sub(2);
    let sender = from.sun_path[..namelen.min(from.sun_path.len())]
        .iter()
        .map(|&c| c as u8)
        .collect();
    Ok(Peeked {
        n: n as usize,
        fds,
        sender,
    })
}

/// Puts a socket's peek offset back as the task had it, however the
/// peeking ends.
struct PeekOffGuard {
    fd: RawFd,
    orig: i32,
}

impl Drop for PeekOffGuard {
    fn drop(&mut self) {
        let _ = setsockopt_int(
            self.fd,
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            self.orig,
            "SO_PEEK_OFF",
        );
    }
}

/// Reads the receive queue without taking from it: messages (or runs of
/// stream bytes) oldest first, and the files in flight in them, each
/// dumped like an fd of the tree. A stream peek stops after the bytes that
/// came with files, but runs on over the writes before them: files sent
/// after other bytes come back with those bytes (as with CRIU).
fn peek_queue(
    fd: RawFd,
    st: &UnixSocketState,
    ctx: &DumpCtx,
    whose: &str,
) -> Result<(Vec<UnixMessage>, Vec<FdEntry>)> {
    let orig = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF).unwrap_or(-1);
    let _guard = PeekOffGuard { fd, orig };
    let stream = st.r#type == libc::SOCK_STREAM;
    let mut queue: Vec<UnixMessage> = Vec::new();
    let mut carried = Carried::default();
    let mut buf = vec![0u8; 1 << 16];
    let mut off: i32 = 0;
    let mut zeros = 0usize;
    let mut short_run = false;
    let passcred = st.opts.as_ref().is_some_and(|o| o.passcred);
    loop {
        let p = match peek_at(fd, off, &mut buf, !stream) {
            Ok(p) => p,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => break,
            Err(e) => bail!("{whose}: peeking at its receive queue: {e}"),
        };
        if !stream && p.n > buf.len() {
            // A datagram bigger than the buffer: again, whole.
            buf.resize(p.n, 0);
            continue;
        }
        if p.n == 0 && p.fds.is_empty() {
            // The end of a stream, or of a seqpacket socket shut down for
            // reading (which reads the same as a record of no bytes: such
            // records are lost then); a datagram or record of no bytes
            // otherwise, which the kernel returns once, at the head of the
            // queue.
            let seq_eof = st.r#type == libc::SOCK_SEQPACKET && st.shutdown & RCV_SHUTDOWN != 0;
            zeros += 1;
            if stream || seq_eof || zeros > 1 << 16 {
                break;
            }
        }
        // A stream peek runs on to the buffer's end unless files came, the
        // writer changed (seen with SO_PASSCRED only) or an out-of-band
        // byte (MSG_OOB) is next.
        if stream && short_run && !passcred {
            bail!("{whose} has an out-of-band byte (MSG_OOB) queued, which crust cannot carry yet");
        }
        short_run = p.n < buf.len() && p.fds.is_empty();
        let ids = carried.add(p.fds, ctx, whose)?;
        let data = buf[..p.n.min(buf.len())].to_vec();
        if stream {
            push_stream(&mut queue, &data, ids);
        } else {
            queue.push(UnixMessage {
                data,
                fds: ids,
                sender: p.sender,
            });
        }
        off += p.n as i32;
    }
    Ok((queue, carried.entries))
}

/// Appends stream bytes to the queue: runs without files merge.
fn push_stream(queue: &mut Vec<UnixMessage>, data: &[u8], fds: Vec<i32>) {
    if data.is_empty() && fds.is_empty() {
        return;
    }
    match queue.last_mut() {
        Some(last) if fds.is_empty() && last.fds.is_empty() => last.data.extend_from_slice(data),
        _ => queue.push(UnixMessage {
            data: data.to_vec(),
            fds,
            sender: Vec::new(),
        }),
    }
}

/// The files in flight in one socket, each open file description once.
#[derive(Default)]
struct Carried {
    held: Vec<OwnedFd>,
    entries: Vec<FdEntry>,
}

impl Carried {
    /// Dumps the files a peek handed over (those not seen already); their
    /// ids.
    fn add(&mut self, fds: Vec<OwnedFd>, ctx: &DumpCtx, whose: &str) -> Result<Vec<i32>> {
        let me = std::process::id() as i32;
        let mut ids = Vec::new();
        for fd in fds {
            if let Some(i) = self
                .held
                .iter()
                .position(|h| files::same_file(me, h.as_raw_fd(), me, fd.as_raw_fd()))
            {
                ids.push(i as i32);
                continue;
            }
            let id = self.held.len() as i32;
            let file =
                files::dump_carried(fd.as_raw_fd(), ctx, &format!("a file in flight in {whose}"))?;
            if let FdFile::Epoll(ep) = &file {
                check_epoll_in_flight(ep, whose)?;
            }
            self.entries.push(FdEntry {
                fd: id,
                file: Some(file),
                ..Default::default()
            });
            self.held.push(fd);
            ids.push(id);
        }
        Ok(ids)
    }
}

/// An epoll set in flight has no fd table its targets' numbers belong to:
/// crust finds them by inode among the unix sockets it makes.
fn check_epoll_in_flight(ep: &crate::images::pb::Epoll, whose: &str) -> Result<()> {
    let d = SockDiag::open()?;
    for t in &ep.targets {
        if diag_of(&d, t.ino)?.is_none() {
            bail!(
                "an epoll set in flight in {whose} watches fd {} (inode {}), which is no unix socket; crust cannot restore that yet",
                t.fd,
                t.ino
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- restore

/// A socket the restore makes.
struct Want<'a> {
    flags: u32,
    st: &'a UnixSocketState,
    in_flight: &'a [FdEntry],
}

/// How crust reaches a bound socket by name: `name` resolved in `dir`
/// (None: crust's cwd, for absolute and abstract names).
#[derive(Clone, Debug)]
struct Addr {
    dir: Option<PathBuf>,
    name: Vec<u8>,
}

impl Addr {
    fn of(name: &[u8], dir: &str) -> Addr {
        let relative = !is_abstract(name) && name.first() != Some(&b'/');
        Addr {
            dir: (relative && !dir.is_empty()).then(|| PathBuf::from(dir)),
            name: name.to_vec(),
        }
    }

    /// Where the name's file is, for crust.
    fn path(&self) -> PathBuf {
        let p = Path::new(OsStr::from_bytes(path_bytes(&self.name)));
        match &self.dir {
            Some(d) => d.join(p),
            None => p.to_path_buf(),
        }
    }

    fn show(&self) -> String {
        if is_abstract(&self.name) {
            show_name(&self.name)
        } else {
            self.path().display().to_string()
        }
    }

    /// Runs `f` on the sockaddr of the name, in its directory.
    fn run<R>(&self, f: impl FnOnce(&libc::sockaddr_un, libc::socklen_t) -> R) -> Result<R> {
        let (sa, len) = sockaddr(&self.name)?;
        match &self.dir {
            None => Ok(f(&sa, len)),
            Some(d) => in_dir(d, || f(&sa, len)),
        }
    }
}

fn sockaddr(name: &[u8]) -> Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: plain data for which all-zero is valid.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if name.len() > sa.sun_path.len() {
        bail!("the socket name {} is too long", show_name(name));
    }
    for (d, &s) in sa.sun_path.iter_mut().zip(name) {
        *d = s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + name.len();
    Ok((sa, len as libc::socklen_t))
}

/// Runs `f` with `dir` as crust's cwd (a relative name is bound or reached
/// there; a long path too), and goes back.
fn in_dir<R>(dir: &Path, f: impl FnOnce() -> R) -> Result<R> {
    let back = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(".")
        .context("opening crust's cwd")?;
    std::env::set_current_dir(dir).with_context(|| format!("entering {}", dir.display()))?;
    let r = f();
    // SAFETY: fchdir to a directory fd we hold.
    if unsafe { libc::fchdir(back.as_raw_fd()) } < 0 {
        bail!(
            "going back to crust's cwd: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(r)
}

fn os_err(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn new_socket(kind: i32) -> Result<OwnedFd> {
    // SAFETY: socket(2) returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC, 0) };
    files::new_fd(fd as i64, "a unix socket")
}

fn new_pair(kind: i32) -> Result<(OwnedFd, OwnedFd)> {
    let mut sv = [0; 2];
    // SAFETY: socketpair(2) writes two fds into sv.
    if unsafe { libc::socketpair(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC, 0, sv.as_mut_ptr()) } < 0
    {
        bail!(
            "creating a unix socket pair: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: both fds were just created and are owned by no one else.
    Ok(unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) })
}

fn bind_to(fd: RawFd, a: &Addr) -> std::io::Result<()> {
    // SAFETY: bind(2) reads the sockaddr `run` passes.
    let r = a
        .run(|sa, len| unsafe { libc::bind(fd, (sa as *const libc::sockaddr_un).cast(), len) })
        .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    os_err(r)
}

fn connect_to(fd: RawFd, a: &Addr) -> std::io::Result<()> {
    // SAFETY: connect(2) reads the sockaddr `run` passes.
    let r = a
        .run(|sa, len| unsafe { libc::connect(fd, (sa as *const libc::sockaddr_un).cast(), len) })
        .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    os_err(r)
}

/// Binds to a fresh abstract name the kernel picks (autobind); that name.
fn autobind(fd: RawFd) -> Result<Addr> {
    let (sa, _) = sockaddr(&[])?;
    // SAFETY: bind(2) with only the family: autobind.
    os_err(unsafe {
        libc::bind(
            fd,
            (&sa as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sa_family_t>() as libc::socklen_t,
        )
    })
    .context("binding a stand-in socket")?;
    // SAFETY: plain data for which all-zero is valid.
    let mut got: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into got.
    os_err(unsafe { libc::getsockname(fd, (&mut got as *mut libc::sockaddr_un).cast(), &mut len) })
        .context("reading a stand-in socket's name")?;
    let n = (len as usize).saturating_sub(2);
    Ok(Addr {
        dir: None,
        name: got.sun_path[..n].iter().map(|&c| c as u8).collect(),
    })
}

fn shutdown(fd: RawFd, bits: u32) -> Result<()> {
    let how = match bits & (RCV_SHUTDOWN | SEND_SHUTDOWN) {
        0 => return Ok(()),
        RCV_SHUTDOWN => libc::SHUT_RD,
        SEND_SHUTDOWN => libc::SHUT_WR,
        _ => libc::SHUT_RDWR,
    };
    // SAFETY: shutdown(2) on a socket of ours.
    os_err(unsafe { libc::shutdown(fd, how) }).context("shutdown")
}

fn accept(fd: RawFd) -> Result<OwnedFd> {
    // SAFETY: accept4 with no address wanted.
    let n = unsafe {
        libc::accept4(
            fd,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    files::new_fd(n as i64, "an accepted connection")
}

/// Sends one message (or run of stream bytes) with the files `fds` to the
/// socket's peer, or to `to`; the bytes sent.
/// Never blocks unless `block`: a full queue is an error, not a hang.
fn send_msg(
    fd: RawFd,
    to: Option<&Addr>,
    data: &[u8],
    fds: &[RawFd],
    block: bool,
) -> Result<usize> {
    let flags = if block { 0 } else { libc::MSG_DONTWAIT } | libc::MSG_NOSIGNAL;
    let n = match to {
        None => send_with_fds(fd, None, data, fds, flags),
        Some(a) => a.run(|sa, len| send_with_fds(fd, Some((sa, len)), data, fds, flags))?,
    };
    Ok(n?)
}

/// Lets a socket hold `bytes` more in flight than its send buffer allows
/// (queues are refilled from one socket, or a stand-in; the dumped size is
/// set again at the end).
fn grow_sndbuf(fd: RawFd, bytes: usize) {
    let want = (bytes.saturating_mul(2) + (1 << 20)).min(i32::MAX as usize / 2) as i32;
    let _ = setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        want,
        "SO_SNDBUFFORCE",
    );
}

/// What the restore made on the filesystem to reach sockets by name (a
/// removed path bound again and renamed out of the way, the directories
/// it needed), removed once the sockets are made, or if the restore fails.
#[derive(Default)]
struct Scratch {
    files: Vec<PathBuf>,
    /// Directories made, in the order made.
    dirs: Vec<PathBuf>,
    tmp: Option<PathBuf>,
}

impl Scratch {
    /// A private directory for names bound where nothing reaches them.
    fn tmp(&mut self) -> Result<PathBuf> {
        if let Some(t) = &self.tmp {
            return Ok(t.clone());
        }
        let mut tmpl = *b"/tmp/.crust-unix-XXXXXX\0";
        // SAFETY: mkdtemp rewrites the template in place.
        if unsafe { libc::mkdtemp(tmpl.as_mut_ptr().cast()) }.is_null() {
            bail!(
                "making a directory in /tmp: {}",
                std::io::Error::last_os_error()
            );
        }
        let t = PathBuf::from(OsStr::from_bytes(&tmpl[..tmpl.len() - 1]));
        self.tmp = Some(t.clone());
        Ok(t)
    }

    /// Makes the missing directories down to `dir`, to be removed again.
    fn make_dirs(&mut self, dir: &Path) -> Result<()> {
        let mut missing = Vec::new();
        let mut d = dir;
        while !d.as_os_str().is_empty() && std::fs::symlink_metadata(d).is_err() {
            missing.push(d.to_path_buf());
            match d.parent() {
                Some(p) => d = p,
                None => break,
            }
        }
        for m in missing.into_iter().rev() {
            std::fs::create_dir(&m).with_context(|| format!("making {}", m.display()))?;
            self.dirs.push(m);
        }
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
        if let Some(t) = &self.tmp {
            let _ = std::fs::remove_dir_all(t);
        }
    }
}

/// Makes the tree's unix sockets, in crust, before the tree forks.
struct Builder<'a> {
    want: BTreeMap<u64, Want<'a>>,
    socks: HashMap<u64, OwnedFd>,
    /// How crust reaches the sockets it bound.
    addr: HashMap<u64, Addr>,
    /// Stand-ins for peers that were closed: each sends its socket's queue,
    /// then closes.
    standin: HashMap<u64, OwnedFd>,
    /// Sockets whose queue is refilled already.
    filled: HashSet<u64>,
    /// Shutdown bits set before connecting.
    pre_shut: HashMap<u64, u32>,
    /// Sockets the user gave with --inherit-fd: taken as they are.
    given: HashSet<u64>,
    creds: Creds,
    scratch: Scratch,
}

impl<'a> Builder<'a> {
    fn new(want: BTreeMap<u64, Want<'a>>) -> Self {
        Builder {
            want,
            socks: HashMap::new(),
            addr: HashMap::new(),
            standin: HashMap::new(),
            filled: HashSet::new(),
            pre_shut: HashMap::new(),
            given: HashSet::new(),
            creds: Creds::new(),
            scratch: Scratch::default(),
        }
    }

    fn st(&self, ino: u64) -> &'a UnixSocketState {
        self.want[&ino].st
    }

    fn fd(&self, ino: u64) -> Result<RawFd> {
        self.socks
            .get(&ino)
            .map(|f| f.as_raw_fd())
            .with_context(|| format!("socket:[{ino}] was not made"))
    }

    fn build(mut self, t: &TreeImages, objects: &TreeObjects) -> Result<HashMap<u64, OwnedFd>> {
        self.take_given(t)?;
        self.create()?;
        self.bind_all()?;
        self.listen_all()?;
        self.accept_all()?;
        self.pending_all()?;
        let flying = self.open_in_flight(t, objects)?;
        self.fill_by_name(&flying)?;
        self.connect_dgram()?;
        self.fill_from_peer(&flying)?;
        drop(flying);
        // A closed peer's stand-in closes now: its socket sees the peer
        // gone, as at the dump.
        self.standin.clear();
        for (&ino, w) in &self.want {
            if self.given.contains(&ino) {
                continue;
            }
            let fd = self.fd(ino)?;
            let what = format!("socket:[{ino}] {}", show_name(&w.st.name));
            let pre = self.pre_shut.get(&ino).copied().unwrap_or(0);
            shutdown(fd, w.st.shutdown & !pre).with_context(|| what.clone())?;
            if let Some(o) = &w.st.opts {
                restore_sock_opts(fd, o).with_context(|| format!("the options of {what}"))?;
            }
            files::set_status_flags(fd, w.flags, &what)?;
            if w.st.owner_uid != 0 {
                // SAFETY: fchown on a socket sets its inode's owner (sockfs).
                os_err(unsafe { libc::fchown(fd, w.st.owner_uid, u32::MAX) })
                    .with_context(|| format!("giving {what} its owner"))?;
            }
        }
        Ok(self.socks)
    }

    /// Sockets connected outside the tree: the user's stand-in
    /// (--inherit-fd fd[N]:socket:[INO]), or refused.
    fn take_given(&mut self, t: &TreeImages) -> Result<()> {
        for (&ino, w) in &self.want {
            let k = format!("socket:[{ino}]");
            if let Some(&(fd, _)) = t.inherit_fds.iter().find(|(_, key)| *key == k) {
                if !w.st.external {
                    bail!(
                        "--inherit-fd fd[{fd}]:{k}: {k} is connected inside the tree, not outside; only a socket dumped with --ext-unix-sk={ino} takes a stand-in"
                    );
                }
                self.socks.insert(ino, dup_fd(fd)?);
                self.given.insert(ino);
            } else if w.st.external {
                bail!(
                    "{k} {} was connected outside the dumped tree; give a stand-in with --inherit-fd fd[N]:{k}",
                    show_name(&w.st.name)
                );
            } else if !w.st.external_peer_name.is_empty() && !t.ext_unix_sk {
                bail!(
                    "{k} was connected to {} outside the dumped tree; restore with --ext-unix-sk to connect it to that name again",
                    show_name(&w.st.external_peer_name)
                );
            }
        }
        Ok(())
    }

    fn peer_of(&self, ino: u64) -> Option<u64> {
        let p = self.st(ino).peer;
        (p != 0 && self.want.contains_key(&p) && !self.given.contains(&p)).then_some(p)
    }

    /// The socket that connected (the other end is the accepted one) of a
    /// stream pair, if the pair came from a listener.
    fn accepted_pair(&self, ino: u64) -> bool {
        self.st(ino).accepted
            && self
                .peer_of(ino)
                .is_none_or(|p| !self.st(p).accepted || p > ino)
    }

    /// Makes every socket but those a listener gives (accepted ones).
    fn create(&mut self) -> Result<()> {
        // Pairs are made in batches, by helpers with their makers' PIDs
        // and ids: (kind, maker, one end, the other; a stand-in's when
        // None).
        let mut pairs: Vec<(i32, Option<Cred>, u64, Option<u64>)> = Vec::new();
        let mut paired = HashSet::new();
        let inos: Vec<u64> = self.want.keys().copied().collect();
        for ino in inos {
            if self.socks.contains_key(&ino) || paired.contains(&ino) {
                continue;
            }
            let st = self.st(ino);
            let kind = st.r#type;
            let peer = self.peer_of(ino);
            let mutual = peer.filter(|&p| p != ino && self.st(p).peer == ino);
            let established = st.state == TCP_ESTABLISHED && st.pending_on == 0;
            if kind == libc::SOCK_DGRAM {
                if let Some(p) = mutual {
                    pairs.push((kind, cred_of(st), ino, Some(p)));
                    paired.insert(p);
                } else if st.peer_gone && st.name.is_empty() {
                    pairs.push((kind, cred_of(st), ino, None));
                } else {
                    self.socks.insert(ino, new_socket(kind)?);
                }
            } else if !established {
                self.socks.insert(ino, new_socket(kind)?);
            } else if self.accepted_pair(ino) {
                // Made by accepting, once its listener listens.
            } else if let Some(p) = mutual {
                if self.accepted_pair(p) {
                    self.socks.insert(ino, new_socket(kind)?);
                } else {
                    pairs.push((kind, cred_of(st), ino, Some(p)));
                    paired.insert(p);
                }
            } else if st.peer_gone {
                pairs.push((kind, cred_of(st), ino, None));
            } else {
                bail!(
                    "socket:[{ino}] {} is connected to socket:[{}], which the images do not have",
                    show_name(&st.name),
                    st.peer
                );
            }
        }
        let made = self
            .creds
            .pairs(&pairs.iter().map(|&(k, c, _, _)| (k, c)).collect::<Vec<_>>())?;
        for ((_, _, a, b), (fa, fb)) in pairs.into_iter().zip(made) {
            self.socks.insert(a, fa);
            match b {
                Some(b) => self.socks.insert(b, fb),
                None => self.standin.insert(a, fb),
            };
        }
        Ok(())
    }

    /// Binds every named socket (accepted ones carry their listener's
    /// name): names whose file is there first, then the removed ones.
    fn bind_all(&mut self) -> Result<()> {
        for ghosts in [false, true] {
            let inos: Vec<u64> = self
                .want
                .iter()
                .filter(|(i, w)| {
                    !w.st.name.is_empty()
                        && !w.st.accepted
                        && w.st.ghost == ghosts
                        && !self.given.contains(i)
                })
                .map(|(i, _)| *i)
                .collect();
            for ino in inos {
                let st = self.st(ino);
                let fd = self.fd(ino)?;
                let addr = if ghosts {
                    self.bind_removed(fd, ino, &st.name)?
                } else {
                    self.bind_live(fd, ino, st)?
                };
                self.addr.insert(ino, addr);
            }
        }
        Ok(())
    }

    fn bind_live(&mut self, fd: RawFd, ino: u64, st: &UnixSocketState) -> Result<Addr> {
        let a = Addr::of(&st.name, &st.bind_dir);
        let what = format!("socket:[{ino}] to {}", a.show());
        if !is_abstract(&st.name) {
            let path = a.path();
            // The file the dumped socket left behind.
            if let Ok(m) = std::fs::symlink_metadata(&path) {
                if !m.file_type().is_socket() {
                    bail!(
                        "binding {what}: a file that is no socket is there now; move it away and restore again"
                    );
                }
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing the old socket file {}", path.display()))?;
            }
        }
        bind_to(fd, &a).with_context(|| format!("binding {what}"))?;
        if !is_abstract(&st.name) {
            let path = a.path();
            let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
            // SAFETY: chmod/lchown of a NUL-terminated path.
            unsafe {
                os_err(libc::chmod(c.as_ptr(), st.file_mode))
                    .with_context(|| format!("setting the mode of {}", path.display()))?;
                os_err(libc::lchown(c.as_ptr(), st.file_uid, st.file_gid))
                    .with_context(|| format!("setting the owner of {}", path.display()))?;
            }
        }
        Ok(a)
    }

    /// Binds a socket to a path name whose file was removed: at that path
    /// (moving what is there now aside, making missing directories), then
    /// renamed out of the way, where crust connects to it until the end.
    /// A relative name is bound in a private directory: nothing resolves
    /// it any more.
    fn bind_removed(&mut self, fd: RawFd, ino: u64, name: &[u8]) -> Result<Addr> {
        let what = format!("socket:[{ino}] to {} (removed since)", show_name(name));
        if is_abstract(name) {
            let a = Addr::of(name, "");
            bind_to(fd, &a).with_context(|| format!("binding {what}"))?;
            return Ok(a);
        }
        let path = PathBuf::from(OsStr::from_bytes(path_bytes(name)));
        if path.is_relative() {
            let tmp = self.scratch.tmp()?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(tmp.join(parent))?;
            }
            let a = Addr {
                dir: Some(tmp),
                name: name.to_vec(),
            };
            bind_to(fd, &a).with_context(|| format!("binding {what}"))?;
            return Ok(a);
        }
        let parent = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        self.scratch.make_dirs(&parent)?;
        let aside = parent.join(format!(".crust-aside-{ino}"));
        let hidden = format!(".crust-unix-{ino}");
        let occupied = std::fs::symlink_metadata(&path).is_ok();
        if occupied {
            std::fs::rename(&path, &aside)
                .with_context(|| format!("moving {} aside", path.display()))?;
        }
        let bound = bind_to(fd, &Addr::of(name, "")).with_context(|| format!("binding {what}"));
        let moved = bound.as_ref().ok().map(|_| {
            std::fs::rename(&path, parent.join(&hidden))
                .with_context(|| format!("moving {} out of the way", path.display()))
        });
        if occupied {
            std::fs::rename(&aside, &path)
                .with_context(|| format!("moving {} back", path.display()))?;
        }
        bound?;
        moved.transpose()?;
        self.scratch.files.push(parent.join(&hidden));
        Ok(Addr {
            dir: Some(parent),
            name: hidden.into_bytes(),
        })
    }

    fn listen_all(&mut self) -> Result<()> {
        let inos: Vec<u64> = self
            .want
            .iter()
            .filter(|(i, w)| w.st.state == TCP_LISTEN && !self.given.contains(i))
            .map(|(i, _)| *i)
            .collect();
        for ino in inos {
            let st = self.st(ino);
            let fd = self.fd(ino)?;
            self.creds
                .listen(fd, st)
                .with_context(|| format!("listening on socket:[{ino}] {}", show_name(&st.name)))?;
        }
        Ok(())
    }

    /// A listener of the tree for an accepted socket's name, if it listens.
    fn listener_for(&self, st: &UnixSocketState) -> Option<u64> {
        self.want
            .iter()
            .find(|(i, w)| {
                w.st.state == TCP_LISTEN
                    && w.st.r#type == st.r#type
                    && w.st.name == st.name
                    && self.addr.contains_key(i)
                    && !self.given.contains(i)
            })
            .map(|(i, _)| *i)
    }

    /// Makes each accepted socket by connecting its peer (or a stand-in for
    /// a closed one) to its listener, or to a stand-in listener with the
    /// same name, and accepting.
    fn accept_all(&mut self) -> Result<()> {
        let inos: Vec<u64> = self
            .want
            .keys()
            .copied()
            .filter(|&i| {
                let st = self.st(i);
                st.r#type != libc::SOCK_DGRAM
                    && st.state == TCP_ESTABLISHED
                    && st.pending_on == 0
                    && !self.given.contains(&i)
                    && !self.socks.contains_key(&i)
            })
            .collect();
        for ino in inos {
            let st = self.st(ino);
            let what = format!("socket:[{ino}] {}", show_name(&st.name));
            let client_cred = self
                .peer_of(ino)
                .and_then(|p| cred_of(self.st(p)))
                .unwrap_or((0, 0, 0));
            let client = match self.peer_of(ino) {
                Some(p) => {
                    let c = self.st(p);
                    let pre = c.shutdown & !mirror(st.shutdown);
                    shutdown(self.fd(p)?, pre)
                        .with_context(|| format!("socket:[{p}] before connecting"))?;
                    self.pre_shut.insert(p, pre);
                    self.fd(p)?
                }
                None => {
                    let t = new_socket(st.r#type)?;
                    let raw = t.as_raw_fd();
                    self.standin.insert(ino, t);
                    raw
                }
            };
            let accepted = match self.listener_for(st) {
                Some(l) => {
                    let a = self.addr[&l].clone();
                    self.creds
                        .connect(client, &a, st)
                        .with_context(|| format!("connecting to {} for {what}", a.show()))?;
                    accept(self.fd(l)?)?
                }
                None => {
                    let l = new_socket(st.r#type)?;
                    let a = match self.bind_removed(l.as_raw_fd(), ino, &st.name) {
                        Ok(a) => a,
                        Err(e) => {
                            warn!(
                                "{what}: no listener can take its name again ({e:#}); it comes back under another name"
                            );
                            autobind(l.as_raw_fd())?
                        }
                    };
                    // As the listener that is gone did: its client reads
                    // that as its peer's credentials.
                    let gone = UnixSocketState {
                        peer_pid: client_cred.0,
                        peer_uid: client_cred.1,
                        peer_gid: client_cred.2,
                        backlog: 1,
                        ..Default::default()
                    };
                    self.creds.listen(l.as_raw_fd(), &gone)?;
                    self.creds
                        .connect(client, &a, st)
                        .with_context(|| format!("connecting to {} for {what}", a.show()))?;
                    accept(l.as_raw_fd())?
                }
            };
            self.socks.insert(ino, accepted);
        }
        Ok(())
    }

    /// Connects the connections waiting in each listener's backlog, in
    /// order (a client closed since: a stand-in that closes).
    fn pending_all(&mut self) -> Result<()> {
        let listeners: Vec<u64> = self
            .want
            .iter()
            .filter(|(i, w)| w.st.state == TCP_LISTEN && !self.given.contains(i))
            .map(|(i, _)| *i)
            .collect();
        for l in listeners {
            let lst = self.st(l);
            let Some(a) = self.addr.get(&l).cloned() else {
                bail!("socket:[{l}] listens without a name");
            };
            for &c in &lst.pending {
                let what = format!(
                    "a connection to socket:[{l}] {} not accepted yet",
                    show_name(&lst.name)
                );
                if c == 0 || !self.want.contains_key(&c) {
                    let t = new_socket(lst.r#type)?;
                    self.creds
                        .connect(t.as_raw_fd(), &a, &UnixSocketState::default())
                        .with_context(|| what.clone())?;
                    continue;
                }
                let cst = self.st(c);
                if cst.pending_on != l {
                    continue;
                }
                let fd = self.fd(c)?;
                shutdown(fd, cst.shutdown).with_context(|| what.clone())?;
                self.pre_shut.insert(c, cst.shutdown);
                // SAFETY: fcntl on a socket of ours: a full backlog fails
                // rather than blocks.
                unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
                // Who connected is the embryo's to know, which no one reads
                // before accepting: crust connects.
                self.creds
                    .connect(fd, &a, &UnixSocketState::default())
                    .with_context(|| format!("{what} (socket:[{c}])"))?;
            }
        }
        Ok(())
    }

    /// Opens the files in flight in the tree's sockets (in crust, like the
    /// shared ones): by (socket, id).
    fn open_in_flight(
        &self,
        t: &TreeImages,
        objects: &TreeObjects,
    ) -> Result<HashMap<(u64, i32), OwnedFd>> {
        let mut out = HashMap::new();
        let shared = HashMap::new();
        let ctx = RestoreCtx {
            tty: t.tty,
            shared: &shared,
            objects,
        };
        for (&ino, w) in &self.want {
            for e in w.in_flight {
                let Some(f) = &e.file else { continue };
                let what = format!("a file in flight in socket:[{ino}]");
                let fd = match f {
                    FdFile::Unix(u) => {
                        let i = u.socket.as_ref().map_or(0, |s| s.ino);
                        dup_fd(self.fd(i)?)?
                    }
                    _ => files::open_entry(f, &ctx).with_context(|| what.clone())?,
                };
                if let FdFile::Epoll(ep) = f {
                    super::epoll::fill(fd.as_raw_fd(), ep, |tg| {
                        self.socks.get(&tg.ino).map(|s| s.as_raw_fd())
                    })
                    .with_context(|| what.clone())?;
                }
                out.insert((ino, e.fd), fd);
            }
        }
        Ok(out)
    }

    /// The files in flight with one message.
    fn fds_of(
        flying: &HashMap<(u64, i32), OwnedFd>,
        ino: u64,
        m: &UnixMessage,
    ) -> Result<Vec<RawFd>> {
        m.fds
            .iter()
            .map(|id| {
                flying
                    .get(&(ino, *id))
                    .map(|f| f.as_raw_fd())
                    .with_context(|| format!("socket:[{ino}]: no file in flight with id {id}"))
            })
            .collect()
    }

    /// Refills the queues of bound datagram sockets, before they connect:
    /// each message sent to the name by a socket with its sender's name
    /// (the tree's, or a stand-in bound to it), so recvfrom reads the same.
    fn fill_by_name(&mut self, flying: &HashMap<(u64, i32), OwnedFd>) -> Result<()> {
        let inos: Vec<u64> = self
            .want
            .iter()
            .filter(|(i, w)| {
                w.st.r#type == libc::SOCK_DGRAM
                    && !w.st.queue.is_empty()
                    && self.addr.contains_key(i)
                    && !self.given.contains(i)
                    && !self.standin.contains_key(i)
                    && !self
                        .peer_of(**i)
                        .is_some_and(|p| p != **i && self.st(p).peer == **i)
            })
            .map(|(i, _)| *i)
            .collect();
        let mut anon: Option<OwnedFd> = None;
        for ino in inos {
            let st = self.st(ino);
            let to = self.addr[&ino].clone();
            for m in &st.queue {
                let fds = Self::fds_of(flying, ino, m)?;
                let mut temp = None;
                let sender = match self.sender_named(&m.sender) {
                    Some(fd) => fd,
                    None => match named_sender(&m.sender)? {
                        Some(t) => temp.insert(t).as_raw_fd(),
                        None => match &anon {
                            Some(a) => a.as_raw_fd(),
                            None => anon.insert(new_socket(libc::SOCK_DGRAM)?).as_raw_fd(),
                        },
                    },
                };
                grow_sndbuf(sender, m.data.len());
                send_msg(sender, Some(&to), &m.data, &fds, false).with_context(|| {
                    format!(
                        "queueing a message of {} bytes in socket:[{ino}] {} again",
                        m.data.len(),
                        to.show()
                    )
                })?;
            }
            self.filled.insert(ino);
        }
        Ok(())
    }

    /// A datagram socket of the tree bound to `name`.
    fn sender_named(&self, name: &[u8]) -> Option<RawFd> {
        if name.is_empty() {
            return None;
        }
        self.want
            .iter()
            .find(|(i, w)| {
                w.st.r#type == libc::SOCK_DGRAM
                    && w.st.name == name
                    && self.addr.contains_key(i)
                    && !self.given.contains(i)
            })
            .and_then(|(i, _)| self.socks.get(i))
            .map(|f| f.as_raw_fd())
    }

    /// Connects the datagram sockets that connect()ed (pairs were made
    /// connected): to a socket of the tree by its name, to a stand-in that
    /// closes for a closed peer, or to a name outside (--ext-unix-sk).
    fn connect_dgram(&mut self) -> Result<()> {
        let inos: Vec<u64> = self
            .want
            .iter()
            .filter(|(i, w)| {
                w.st.r#type == libc::SOCK_DGRAM
                    && !self.given.contains(i)
                    && !self.standin.contains_key(i)
            })
            .map(|(i, _)| *i)
            .collect();
        for ino in inos {
            let st = self.st(ino);
            let fd = self.fd(ino)?;
            let what = format!("socket:[{ino}] {}", show_name(&st.name));
            if let Some(p) = self.peer_of(ino) {
                if p != ino && self.st(p).peer == ino {
                    continue;
                }
                let Some(a) = self.addr.get(&p).cloned() else {
                    bail!("{what} was connected to socket:[{p}], which has no name to connect to");
                };
                connect_to(fd, &a).with_context(|| format!("connecting {what} to {}", a.show()))?;
            } else if st.peer_gone {
                let t = new_socket(libc::SOCK_DGRAM)?;
                let a = autobind(t.as_raw_fd())?;
                connect_to(fd, &a).with_context(|| format!("connecting {what}"))?;
                self.standin.insert(ino, t);
            } else if !st.external_peer_name.is_empty() {
                let a = Addr::of(&st.external_peer_name, &st.bind_dir);
                connect_to(fd, &a).with_context(|| {
                    format!("connecting {what} to {} outside the tree", a.show())
                })?;
            }
        }
        Ok(())
    }

    /// Refills the other queues from the socket at the other end: the peer
    /// (a pair, a connection) or the stand-in of a closed one.
    fn fill_from_peer(&mut self, flying: &HashMap<(u64, i32), OwnedFd>) -> Result<()> {
        let inos: Vec<u64> = self
            .want
            .iter()
            .filter(|(i, w)| {
                !w.st.queue.is_empty() && !self.filled.contains(i) && !self.given.contains(i)
            })
            .map(|(i, _)| *i)
            .collect();
        for ino in inos {
            let st = self.st(ino);
            let what = format!("socket:[{ino}] {}", show_name(&st.name));
            let from = match self.standin.get(&ino) {
                Some(t) => t.as_raw_fd(),
                None => match self.peer_of(ino) {
                    Some(p) if st.r#type != libc::SOCK_DGRAM || self.st(p).peer == ino => {
                        self.fd(p)?
                    }
                    _ => bail!("{what}: nothing can queue its messages again"),
                },
            };
            let total: usize = st.queue.iter().map(|m| m.data.len()).sum();
            grow_sndbuf(from, total);
            for m in &st.queue {
                let fds = Self::fds_of(flying, ino, m)?;
                let mut sent = 0;
                loop {
                    let fds_now: &[RawFd] = if sent == 0 { &fds } else { &[] };
                    sent += send_msg(from, None, &m.data[sent..], fds_now, false).with_context(
                        || format!("queueing {} bytes in {what} again", m.data.len()),
                    )?;
                    if sent >= m.data.len() || st.r#type != libc::SOCK_STREAM {
                        break;
                    }
                }
            }
            self.filled.insert(ino);
        }
        Ok(())
    }
}

/// A stand-in sender bound to a dumped datagram's sender name, when that
/// name is free (abstract, or a path with nothing there: bound and removed
/// at once, the name stays the socket's).
fn named_sender(name: &[u8]) -> Result<Option<OwnedFd>> {
    if name.is_empty() {
        return Ok(None);
    }
    let s = new_socket(libc::SOCK_DGRAM)?;
    if is_abstract(name) {
        return Ok(bind_to(s.as_raw_fd(), &Addr::of(name, "")).ok().map(|_| s));
    }
    let path = Path::new(OsStr::from_bytes(path_bytes(name)));
    if path.is_relative() || std::fs::symlink_metadata(path).is_ok() {
        return Ok(None);
    }
    if bind_to(s.as_raw_fd(), &Addr::of(name, "")).is_err() {
        return Ok(None);
    }
    let _ = std::fs::remove_file(path);
    Ok(Some(s))
}

/// Who made a pair, listened or connected, as SO_PEERCRED reads it: PID,
/// effective uid and gid.
type Cred = (i32, u32, u32);

/// The credentials the socket's peer (a listener: itself) was made with.
fn cred_of(st: &UnixSocketState) -> Option<Cred> {
    (st.peer_pid > 0).then_some((st.peer_pid, st.peer_uid, st.peer_gid))
}

/// Makes pairs, listens and connects as the process that did at the dump:
/// the kernel records its PID and ids for SO_PEERCRED. A helper forked with
/// that PID (free until the tree forks; another when it is taken) and
/// those ids does it, keeping crust's capabilities, so every path crust
/// reaches it reaches too.
struct Creds {
    own: Cred,
}

impl Creds {
    fn new() -> Self {
        // SAFETY: getters without arguments.
        let own = unsafe {
            (
                libc::getpid(),
                libc::geteuid() as u32,
                libc::getegid() as u32,
            )
        };
        Creds { own }
    }

    /// Runs `op` as `cred` (in crust when that is crust's own), and sends
    /// crust what it makes over `chan` (a seqpacket pair: the helper's end,
    /// crust's end), which crust reads until the helper is done.
    fn run_as(
        &self,
        cred: Option<Cred>,
        op: &mut dyn FnMut(Option<RawFd>) -> Result<()>,
        mut recv: impl FnMut(Vec<OwnedFd>),
    ) -> Result<()> {
        let Some(c) = cred.filter(|&c| c != self.own) else {
            return op(None);
        };
        let (mine, theirs) = new_pair(libc::SOCK_SEQPACKET)?;
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let child = match crate::sys::fork_with_pid(c.0) {
            Ok(p) => p,
            // SAFETY: fork of single-threaded crust (the restore forks the
            // tree the same way); the PID is taken, the ids still matter.
            Err(_) => match unsafe { libc::fork() } {
                -1 => bail!("forking a helper: {}", std::io::Error::last_os_error()),
                p => p,
            },
        };
        if child == 0 {
            drop(mine);
            drop(err_r);
            // A panic must not unwind into crust's frames: their
            // destructors (the restore's scratch files) are crust's own.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                become_cred(c).and_then(|_| op(Some(theirs.as_raw_fd())))
            }))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the helper panicked")));
            if let Err(e) = r {
                let _ = nix::unistd::write(&err_w, format!("{e:#}").as_bytes());
            }
            // SAFETY: the helper ends here, without running crust's
            // destructors (crust's objects are not its own).
            unsafe { libc::_exit(0) };
        }
        drop(theirs);
        drop(err_w);
        // Until the helper is gone (its end closes): what it sends.
        loop {
            let mut byte = [0u8; 1];
            match peek_or_take(mine.as_raw_fd(), &mut byte) {
                Ok(Some(fds)) => recv(fds),
                Ok(None) => break,
                Err(e) => bail!("reading from a helper: {e}"),
            }
        }
        let status = crate::sys::wait_child(
            Some(nix::unistd::Pid::from_raw(child)),
            nix::sys::wait::WaitPidFlag::empty(),
            std::time::Duration::from_secs(10),
        );
        let mut msg = String::new();
        use std::io::Read;
        let _ = std::fs::File::from(err_r).read_to_string(&mut msg);
        let as_whom = format!("as PID {} uid {} gid {}", c.0, c.1, c.2);
        if !msg.is_empty() {
            bail!("{msg} ({as_whom})");
        }
        match status {
            Ok(Some(nix::sys::wait::WaitStatus::Exited(_, 0))) => Ok(()),
            s => bail!("the helper working {as_whom} ended with {s:?}"),
        }
    }

    /// Socket pairs of each (kind, maker), in order.
    fn pairs(&self, want: &[(i32, Option<Cred>)]) -> Result<Vec<(OwnedFd, OwnedFd)>> {
        let mut out: Vec<Option<(OwnedFd, OwnedFd)>> = want.iter().map(|_| None).collect();
        let mut groups: BTreeMap<Option<Cred>, Vec<usize>> = BTreeMap::new();
        for (i, (_, c)) in want.iter().enumerate() {
            groups.entry(*c).or_default().push(i);
        }
        for (cred, idx) in groups {
            let got = RefCell::new(Vec::new());
            self.run_as(
                cred,
                &mut |chan| {
                    for &i in &idx {
                        let (a, b) = new_pair(want[i].0)?;
                        match chan {
                            Some(ch) => {
                                send_msg(ch, None, &[0], &[a.as_raw_fd(), b.as_raw_fd()], true)?;
                            }
                            None => got.borrow_mut().push(vec![a, b]),
                        }
                    }
                    Ok(())
                },
                |fds| got.borrow_mut().push(fds),
            )?;
            let got = got.into_inner();
            if got.len() != idx.len() || got.iter().any(|g| g.len() != 2) {
                bail!("a helper made {} socket pairs of {}", got.len(), idx.len());
            }
            for (&i, mut g) in idx.iter().zip(got) {
                let b = g.pop().unwrap();
                let a = g.pop().unwrap();
                out[i] = Some((a, b));
            }
        }
        Ok(out.into_iter().map(|p| p.unwrap()).collect())
    }

    /// listen(2), as the listener's maker: its clients read that as their
    /// peer's credentials.
    fn listen(&self, fd: RawFd, st: &UnixSocketState) -> Result<()> {
        let backlog = st.backlog as i32;
        self.run_as(
            cred_of(st),
            &mut |_| {
                // SAFETY: listen(2) on a socket crust made.
                os_err(unsafe { libc::listen(fd, backlog) }).context("listen")
            },
            drop,
        )
    }

    /// connect(2) of a stream or seqpacket socket, as whoever connected:
    /// the accepted end's SO_PEERCRED (`accepted`, its state).
    fn connect(&self, fd: RawFd, a: &Addr, accepted: &UnixSocketState) -> Result<()> {
        self.run_as(
            cred_of(accepted),
            &mut |_| connect_to(fd, a).map_err(Into::into),
            drop,
        )
    }
}

/// Receives one message's files from a helper; None at its end.
fn peek_or_take(fd: RawFd, buf: &mut [u8]) -> std::io::Result<Option<Vec<OwnedFd>>> {
    let (n, fds, _) = recv_with_fds(fd, buf, 0)?;
    Ok((n > 0).then_some(fds))
}

/// Takes the ids of `c` in a helper, keeping crust's capabilities in
/// effect (a non-root uid would otherwise drop them).
fn become_cred(c: Cred) -> Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const CAP_V3: u32 = 0x2008_0522;
    let mut hdr = Header {
        version: CAP_V3,
        pid: 0,
    };
    let mut caps = [Data::default(); 2];
    // SAFETY: prctl, setgroups with no groups, setres[ug]id: plain calls;
    // capget/capset read and write the two v3 data words of this process.
    unsafe {
        os_err(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0)).context("PR_SET_KEEPCAPS")?;
        os_err(libc::setgroups(0, std::ptr::null())).context("setgroups")?;
        os_err(libc::setresgid(c.2, c.2, c.2)).context("setresgid")?;
        os_err(libc::setresuid(c.1, c.1, c.1)).context("setresuid")?;
        os_err(libc::syscall(libc::SYS_capget, &mut hdr, caps.as_mut_ptr()) as i32)
            .context("capget")?;
        for d in &mut caps {
            d.effective = d.permitted;
        }
        os_err(libc::syscall(libc::SYS_capset, &hdr, caps.as_ptr()) as i32).context("capset")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_bits_mirror() {
        assert_eq!(mirror(RCV_SHUTDOWN), SEND_SHUTDOWN);
        assert_eq!(mirror(SEND_SHUTDOWN), RCV_SHUTDOWN);
        assert_eq!(mirror(3), 3);
        assert_eq!(mirror(0), 0);
    }

    #[test]
    fn names() {
        assert_eq!(show_name(b"/tmp/x.sock\0"), "/tmp/x.sock");
        assert_eq!(show_name(b"\0abc"), "@abc");
        assert_eq!(show_name(b""), "(unbound)");
        let a = Addr::of(b"rel/s\0", "/work");
        assert_eq!(a.path(), PathBuf::from("/work/rel/s"));
        assert!(Addr::of(b"/abs\0", "/work").dir.is_none());
        assert!(Addr::of(b"\0abs", "/work").dir.is_none());
        let (_, len) = sockaddr(b"\0ab").unwrap();
        assert_eq!(len, 5);
        assert!(sockaddr(&[b'x'; 200]).is_err());
    }

    #[test]
    fn diag_of_a_pair_and_a_listener() {
        use std::os::unix::net::{UnixListener, UnixStream};
        let d = SockDiag::open().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let ino = |f: RawFd| {
            std::fs::metadata(format!("/proc/self/fd/{f}"))
                .unwrap()
                .ino()
        };
        let (ia, ib) = (ino(a.as_raw_fd()), ino(b.as_raw_fd()));
        let da = diag_of(&d, ia).unwrap().unwrap();
        assert_eq!(da.peer, ib);
        assert_eq!(da.state, TCP_ESTABLISHED);
        assert_eq!(da.kind, libc::SOCK_STREAM);
        let name = format!("\0crust-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(&name.as_bytes()[1..]).unwrap();
        let l = UnixListener::bind_addr(&addr).unwrap();
        let c = UnixStream::connect_addr(&l.local_addr().unwrap()).unwrap();
        let dl = diag_of(&d, ino(l.as_raw_fd())).unwrap().unwrap();
        assert_eq!(dl.state, TCP_LISTEN);
        assert_eq!(dl.name, name.as_bytes());
        assert_eq!(dl.icons, vec![ino(c.as_raw_fd())]);
        assert!(
            listeners(&d)
                .unwrap()
                .iter()
                .any(|x| x.ino == ino(l.as_raw_fd()))
        );
    }
}

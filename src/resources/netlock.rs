//! The network lock, and the network namespace the tree's connections live
//! in.
//!
//! From the moment the tree is frozen until its restore is done, the
//! packets of its TCP connections are dropped: the peers see a slow
//! network and retransmit, instead of getting a reset from a kernel that
//! has no socket for them any more (the dumped sockets are gone, and the
//! restored ones are not there yet). The lock is a table of nftables (an
//! `inet` table with the connections in two sets, hooked on input and
//! output), or where nftables is missing a chain of iptables and ip6tables
//! jumped to from INPUT and OUTPUT; `--network-lock` chooses. Packets
//! carrying `RESTORE_MARK` pass: those crust makes itself to put a
//! half-closed connection back in its state (`inet::tcp`).
//!
//! The dump takes it once the tree is frozen and before any socket is put
//! in repair mode. A dump that kills the tree leaves it in place (its name
//! goes into the inventory): the restore lifts it once the tree runs
//! again. A dump that fails, or leaves the tree running, lifts it as soon
//! as the tree resumes; so does the dump's guardian (`crate::guardian`)
//! when crust dies in the middle of a dump. A restore takes the lock again
//! (or takes over the dump's, on the same machine) before any socket is
//! made, and lifts it when the tree runs, or when the restore fails.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::images::pb;

/// The SO_MARK of the packets crust sends itself while the lock holds
/// (a FIN or an ACK that rebuilds a half-closed connection): they pass.
pub const RESTORE_MARK: u32 = 0x6372_7374;

/// The longest an nft or iptables command may take.
const RUN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

/// How the lock drops packets (`--network-lock`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    Nftables,
    Iptables,
    /// No lock: the user locks the network some other way.
    Skip,
}

impl Method {
    /// nftables where `nft` is installed, else iptables.
    pub fn auto() -> Method {
        if in_path("nft") || !in_path("iptables-restore") {
            Method::Nftables
        } else {
            Method::Iptables
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Nftables => "nftables",
            Method::Iptables => "iptables",
            Method::Skip => "skip",
        }
    }

    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "nftables" => Some(Method::Nftables),
            "iptables" => Some(Method::Iptables),
            _ => None,
        }
    }
}

/// Where `prog` is: in PATH, or in the sbin directories a user's PATH may
/// lack.
fn which(prog: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(std::path::PathBuf::from))
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

fn in_path(prog: &str) -> bool {
    which(prog).is_some()
}

/// One TCP connection, by its two ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conn {
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

impl Conn {
    /// An IPv4 connection on an IPv6 socket (::ffff:a.b.c.d) travels as
    /// IPv4, and is matched so.
    pub fn new(local: SocketAddr, peer: SocketAddr) -> Conn {
        let plain = |a: SocketAddr| match a.ip() {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
                None => a,
            },
            IpAddr::V4(_) => a,
        };
        Conn {
            local: plain(local),
            peer: plain(peer),
        }
    }

    fn v4(&self) -> bool {
        self.local.is_ipv4()
    }
}

/// A network lock in place. Dropped, it is lifted.
pub struct NetLock {
    method: Method,
    name: String,
    /// The namespace its rules are in, when not crust's own.
    netns: Option<OwnedFd>,
    held: bool,
}

/// The name of the lock of the tree whose root is `root`: one per tree, so
/// that dumps of different trees do not meet.
pub fn lock_name(root: i32) -> String {
    format!("crust-{root}")
}

impl NetLock {
    /// Drops every packet of `conns` (both directions) from now on.
    pub fn take(
        method: Method,
        name: &str,
        conns: &[Conn],
        netns: Option<OwnedFd>,
    ) -> Result<NetLock> {
        let lock = NetLock::of(method, name, netns);
        // Both ends of a connection inside the tree are one connection.
        let mut conns: Vec<Conn> = conns
            .iter()
            .map(|c| {
                if (c.local.ip(), c.local.port()) <= (c.peer.ip(), c.peer.port()) {
                    *c
                } else {
                    Conn {
                        local: c.peer,
                        peer: c.local,
                    }
                }
            })
            .collect();
        conns.sort_by_key(|c| (c.local, c.peer));
        conns.dedup();
        let conns = &conns[..];
        match method {
            Method::Skip => {}
            Method::Nftables => {
                let script = nft_lock_script(name, conns);
                lock.run("nft", &["-f", "-"], &script)?;
            }
            Method::Iptables => {
                for (prog, v4) in [("iptables-restore", true), ("ip6tables-restore", false)] {
                    let script = ipt_lock_script(name, conns, v4);
                    lock.run(prog, &["-w", "--noflush"], &script)?;
                }
            }
        }
        tracing::info!(
            "network lock {name} ({}) holds {} connection(s)",
            method.name(),
            conns.len()
        );
        Ok(lock)
    }

    /// The lock `name` taken with `method` in `netns` (None: crust's), as
    /// if taken here: dropped, it is lifted. The dump's guardian holds the
    /// dump's lock so.
    pub fn of(method: Method, name: &str, netns: Option<OwnedFd>) -> NetLock {
        NetLock {
            method,
            name: name.to_string(),
            netns,
            held: method != Method::Skip,
        }
    }

    /// The lock the dump left, when it is still there (a restore on the
    /// machine and in the namespace of the dump): the restore takes it over.
    pub fn adopt(recorded: &pb::NetLock) -> Option<NetLock> {
        let method = Method::parse(&recorded.method)?;
        let lock = NetLock {
            method,
            name: recorded.name.clone(),
            netns: None,
            held: true,
        };
        let there = match method {
            Method::Nftables => lock
                .run("nft", &["list", "table", "inet", &lock.name], "")
                .is_ok(),
            Method::Iptables => lock
                .run("iptables", &["-w", "-n", "-L", &lock.name], "")
                .is_ok(),
            Method::Skip => false,
        };
        if !there {
            lock.keep();
            return None;
        }
        Some(lock)
    }

    /// What the inventory records of the lock, for the restore to lift it.
    pub fn record(&self) -> Option<pb::NetLock> {
        self.held.then(|| pb::NetLock {
            method: self.method.name().into(),
            name: self.name.clone(),
        })
    }

    /// Leaves the lock in place for the restore to lift.
    pub fn keep(mut self) {
        self.held = false;
    }

    /// Lifts the lock.
    pub fn release(mut self) -> Result<()> {
        self.lift()
    }

    fn lift(&mut self) -> Result<()> {
        if !std::mem::replace(&mut self.held, false) {
            return Ok(());
        }
        match self.method {
            Method::Skip => {}
            Method::Nftables => {
                self.run("nft", &["delete", "table", "inet", &self.name], "")?;
            }
            Method::Iptables => {
                let mut first_err = None;
                for prog in ["iptables-restore", "ip6tables-restore"] {
                    let script = ipt_unlock_script(&self.name);
                    if let Err(e) = self.run(prog, &["-w", "--noflush"], &script) {
                        first_err.get_or_insert(e);
                    }
                }
                if let Some(e) = first_err {
                    return Err(e);
                }
            }
        }
        tracing::info!("network lock {} lifted", self.name);
        Ok(())
    }

    /// Runs `prog args` with `input` on its stdin, in the lock's namespace;
    /// a command that has not finished in `RUN_DEADLINE` is killed.
    fn run(&self, prog: &str, args: &[&str], input: &str) -> Result<()> {
        let mut cmd = Command::new(which(prog).unwrap_or_else(|| prog.into()));
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let netns = self.netns.as_ref().map(|ns| ns.as_raw_fd());
        // SAFETY: setns(2) and fcntl(2) are async-signal-safe; they run in
        // the child between fork and exec, on fds the child inherited.
        unsafe {
            cmd.pre_exec(move || {
                // A command changing a dump's lock holds the dump's guardian
                // off until it is done, should crust die meanwhile.
                crate::guardian::hold_off_in_child();
                if let Some(fd) = netns
                    && libc::setns(fd, libc::CLONE_NEWNET) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "running {prog} for the network lock; install {} or choose another --network-lock",
                if prog == "nft" {
                    "nftables"
                } else {
                    "iptables"
                }
            )
        })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes())?;
        }
        let t = std::time::Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if t.elapsed() > RUN_DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{prog} {} did not finish within {} s (another program holding the xtables lock?); the network lock {} may be left: see `nft list ruleset` or `iptables-save`",
                    args.join(" "),
                    RUN_DEADLINE.as_secs(),
                    self.name
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        if !status.success() {
            bail!("{prog} {}: {}", args.join(" "), err.trim());
        }
        Ok(())
    }
}

impl Drop for NetLock {
    fn drop(&mut self) {
        if let Err(e) = self.lift() {
            tracing::warn!("lifting network lock {}: {e:#}", self.name);
        }
    }
}

/// An nftables table that drops the connections' packets both ways, on
/// input and on output (loopback traffic crosses both), except crust's own.
fn nft_lock_script(name: &str, conns: &[Conn]) -> String {
    let mut s = format!("table inet {name} {{\n");
    let elems = |v4: bool| {
        let mut out = Vec::new();
        for c in conns.iter().filter(|c| c.v4() == v4) {
            for (a, b) in [(c.local, c.peer), (c.peer, c.local)] {
                out.push(format!(
                    "{} . {} . {} . {}",
                    a.ip(),
                    a.port(),
                    b.ip(),
                    b.port()
                ));
            }
        }
        out.join(", ")
    };
    for (set, ty, v4) in [("conn4", "ipv4_addr", true), ("conn6", "ipv6_addr", false)] {
        let e = elems(v4);
        let _ = writeln!(
            s,
            "  set {set} {{ type {ty} . inet_service . {ty} . inet_service;{} }}",
            if e.is_empty() {
                String::new()
            } else {
                format!(" elements = {{ {e} }};")
            }
        );
    }
    for (chain, hook) in [("input", "input"), ("output", "output")] {
        let _ = write!(
            s,
            "  chain {chain} {{ type filter hook {hook} priority -150; policy accept;\n    meta mark {RESTORE_MARK:#x} accept\n    ip saddr . tcp sport . ip daddr . tcp dport @conn4 drop\n    ip6 saddr . tcp sport . ip6 daddr . tcp dport @conn6 drop\n  }}\n"
        );
    }
    s.push_str("}\n");
    s
}

/// An iptables-restore script (IPv4 or IPv6) with a chain of the
/// connections' DROP rules, jumped to first from INPUT and OUTPUT.
fn ipt_lock_script(name: &str, conns: &[Conn], v4: bool) -> String {
    let mut s = format!("*filter\n:{name} - [0:0]\n-I INPUT -j {name}\n-I OUTPUT -j {name}\n");
    let _ = writeln!(s, "-A {name} -m mark --mark {RESTORE_MARK:#x} -j RETURN");
    for c in conns.iter().filter(|c| c.v4() == v4) {
        for (a, b) in [(c.local, c.peer), (c.peer, c.local)] {
            let _ = writeln!(
                s,
                "-A {name} -p tcp -s {} --sport {} -d {} --dport {} -j DROP",
                a.ip(),
                a.port(),
                b.ip(),
                b.port()
            );
        }
    }
    s.push_str("COMMIT\n");
    s
}

fn ipt_unlock_script(name: &str) -> String {
    format!("*filter\n-D INPUT -j {name}\n-D OUTPUT -j {name}\n-F {name}\n-X {name}\nCOMMIT\n")
}

/// The nsfs inode of the network namespace of process `pid` ("self" for
/// crust).
pub fn netns_ino(pid: &str) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// The network namespace of `pid`, when it is not crust's: where its
/// sockets are asked about and its lock is taken.
pub fn foreign_netns(pid: i32) -> Result<Option<OwnedFd>> {
    if netns_ino(&pid.to_string()) == netns_ino("self") {
        return Ok(None);
    }
    let f = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .with_context(|| format!("opening the network namespace of PID {pid}"))?;
    Ok(Some(f.into()))
}

/// Whether the network namespace of `pid` has no interface but loopback
/// (/proc/PID/net/dev shows the interfaces of the process's namespace).
pub fn loopback_only(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/net/dev")).is_ok_and(|s| {
        s.lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .all(|name| name.trim() == "lo")
    })
}

/// Before a restore builds anything: a tree that lived in a network
/// namespace of its own goes back into it when crust restores from the
/// namespace it dumped from (the tree's namespace is found through a
/// process still in it); when it is gone and had no interface but
/// loopback, a new one with loopback up stands in for it. crust restoring
/// from another namespace (`ip netns exec NS crust restore`) restores the
/// tree into that one: a migration.
pub fn enter_tree_netns(inv: &pb::Inventory) -> Result<()> {
    if inv.net_ns == 0 || inv.net_ns == inv.crust_net_ns {
        return Ok(());
    }
    let me = netns_ino("self");
    if me == Some(inv.net_ns) || me != Some(inv.crust_net_ns) {
        return Ok(());
    }
    let holder = std::fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        .find(|p| netns_ino(p) == Some(inv.net_ns));
    let Some(holder) = holder else {
        if !inv.net_ns_loopback_only {
            bail!(
                "the tree lived in network namespace net:[{}], which is gone; restore it into another with `ip netns exec NAME crust restore ...`",
                inv.net_ns
            );
        }
        // SAFETY: unshare(2); crust has no other thread yet, and the tree
        // it forks inherits the namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
            bail!(
                "making a network namespace for the tree: {}",
                std::io::Error::last_os_error()
            );
        }
        loopback_up()?;
        tracing::info!(
            "the tree's network namespace net:[{}] is gone: restoring into a new one with loopback up",
            inv.net_ns
        );
        return Ok(());
    };
    let ns = std::fs::File::open(format!("/proc/{holder}/ns/net"))
        .with_context(|| format!("opening the network namespace of PID {holder}"))?;
    // SAFETY: setns(2) on an fd we hold; crust has no other thread yet, and
    // the tree it forks inherits the namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        bail!(
            "entering the tree's network namespace net:[{}]: {}",
            inv.net_ns,
            std::io::Error::last_os_error()
        );
    }
    tracing::info!(
        "restoring into the tree's network namespace net:[{}] (held by PID {holder})",
        inv.net_ns
    );
    Ok(())
}

/// Brings the loopback interface of crust's network namespace up.
fn loopback_up() -> Result<()> {
    // SAFETY: socket(2) returns a new fd or -1.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    let s = crate::resources::files::new_fd(s as i64, "a socket to set up loopback")?;
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, c) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *c as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one ifreq.
    unsafe {
        if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            bail!(
                "reading the flags of lo: {}",
                std::io::Error::last_os_error()
            );
        }
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) < 0 {
            bail!("bringing lo up: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(a: &str, b: &str) -> Conn {
        Conn::new(a.parse().unwrap(), b.parse().unwrap())
    }

    #[test]
    fn mapped_addresses_are_ipv4() {
        let c = conn("[::ffff:127.0.0.1]:80", "[::ffff:127.0.0.2]:4000");
        assert_eq!(c.local, "127.0.0.1:80".parse().unwrap());
        assert!(c.v4());
        assert!(!conn("[::1]:80", "[::1]:81").v4());
    }

    #[test]
    fn nft_script_has_both_directions() {
        let s = nft_lock_script(
            "crust-7",
            &[
                conn("127.0.0.1:80", "127.0.0.1:4000"),
                conn("[::1]:1", "[::2]:2"),
            ],
        );
        assert!(s.contains("127.0.0.1 . 80 . 127.0.0.1 . 4000"), "{s}");
        assert!(s.contains("127.0.0.1 . 4000 . 127.0.0.1 . 80"), "{s}");
        assert!(s.contains("::2 . 2 . ::1 . 1"), "{s}");
        assert!(s.contains("table inet crust-7"));
        // No connection of a family: an empty set, no empty element list.
        let s = nft_lock_script("crust-7", &[conn("[::1]:1", "[::2]:2")]);
        assert!(!s.contains("elements = {  }"), "{s}");
    }

    #[test]
    fn iptables_scripts() {
        let s = ipt_lock_script("crust-7", &[conn("10.0.0.1:80", "10.0.0.2:5000")], true);
        assert!(
            s.contains("-A crust-7 -p tcp -s 10.0.0.2 --sport 5000 -d 10.0.0.1 --dport 80 -j DROP")
        );
        assert!(s.ends_with("COMMIT\n"));
        let s6 = ipt_lock_script("crust-7", &[conn("10.0.0.1:80", "10.0.0.2:5000")], false);
        assert!(!s6.contains("DROP"), "{s6}");
        assert!(ipt_unlock_script("crust-7").contains("-X crust-7"));
    }
}

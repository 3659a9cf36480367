//! What the socket tests share: the sysctl that lets root open ping
//! sockets, free ports, network namespaces joined by veth pairs, and a
//! tiny Redis client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;

/// Opens ICMP ping sockets to every group (net.ipv4.ping_group_range)
/// while held; the old range comes back on drop.
pub struct PingGroups(String);

const PING_GROUPS: &str = "/proc/sys/net/ipv4/ping_group_range";

impl PingGroups {
    pub fn allow_all() -> Self {
        let old = std::fs::read_to_string(PING_GROUPS).unwrap();
        std::fs::write(PING_GROUPS, "0 2147483647").unwrap();
        PingGroups(old)
    }
}

impl Drop for PingGroups {
    fn drop(&mut self) {
        let _ = std::fs::write(PING_GROUPS, self.0.trim());
    }
}

/// One end of a `tcp_stream` connection: its task and its progress file.
pub struct StreamEnd {
    pub task: super::Task,
    pub progress: std::path::PathBuf,
}

/// Bytes this end has received so far, as it last reported.
pub fn progress(end: &StreamEnd) -> u64 {
    std::fs::read_to_string(&end.progress)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until each end has received `more` bytes beyond `from` (its own
/// starting point): the stream flows both ways.
pub fn wait_flowing(ends: [(&StreamEnd, u64); 2], more: u64) {
    let t = std::time::Instant::now();
    for (end, from) in ends {
        while progress(end) < from + more {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(60),
                "the stream stopped: {} received {} bytes, {} after the restore",
                end.progress.display(),
                progress(end),
                progress(end).saturating_sub(from)
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Starts a client and a server of `tcp_stream` on `addr`, each under
/// `prefix` (a command that runs it elsewhere, nsenter into a namespace),
/// and returns once the stream flows: (server, client).
pub fn stream_pair(
    files: &super::WorkDir,
    server_addr: &str,
    client_addr: &str,
    server_prefix: &[&str],
    client_prefix: &[&str],
    server_extra: &[&str],
) -> (StreamEnd, StreamEnd) {
    let portfile = files.0.join("port");
    let bin = super::build("tcp_stream");
    let spawn = |prefix: &[&str], role: &str, addr: &str, extra: &[&str]| {
        let progress = files.0.join(format!("progress-{role}"));
        let mut args: Vec<String> = prefix.iter().skip(1).map(|s| s.to_string()).collect();
        if !prefix.is_empty() {
            args.push(bin.to_string_lossy().into_owned());
        }
        for a in [
            role,
            addr,
            portfile.to_str().unwrap(),
            progress.to_str().unwrap(),
        ]
        .iter()
        .chain(extra)
        {
            args.push(a.to_string());
        }
        let mut s = super::Spawn::new("tcp_stream");
        if let Some(p) = prefix.first() {
            s.program = Some(p.into());
        }
        s.args = args;
        StreamEnd {
            task: s.start(),
            progress,
        }
    };
    let client = spawn(client_prefix, "client", client_addr, &[]);
    let server = spawn(server_prefix, "server", server_addr, server_extra);
    (server, client)
}

/// "sent=N received=M" of an end's log.
pub fn totals(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .find(|l| l.starts_with("sent="))
        .unwrap_or_else(|| panic!("no totals in the log: {log}"));
    let num = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line}"))
    };
    (num("sent="), num("received="))
}

/// Ends a stream: SIGTERM to `first`, whose end of stream ends the other;
/// both must have checked every byte, and each received all the other sent.
pub fn end_stream(first: StreamEnd, second: StreamEnd) {
    let (st1, log1) = first.task.finish();
    let mut second = second;
    let (st2, log2) = second.task.wait_exit();
    assert!(st1.success(), "the first end failed: {log1}");
    assert!(st2.success(), "the second end failed: {log2}");
    let (s1, r1) = totals(&log1);
    let (s2, r2) = totals(&log2);
    assert_eq!(s1, r2, "bytes sent one way and received differ");
    assert_eq!(s2, r1, "bytes sent the other way and received differ");
}

/// Whether a network lock of the tree rooted at `root` is in place (either
/// method).
pub fn lock_in_place(root: i32) -> bool {
    let name = format!("crust-{root}");
    let nft = Command::new("nft")
        .args(["list", "table", "inet", &name])
        .output()
        .is_ok_and(|o| o.status.success());
    let ipt = Command::new("iptables")
        .args(["-w", "-n", "-L", &name])
        .output()
        .is_ok_and(|o| o.status.success());
    nft || ipt
}

/// A port on 127.0.0.1 free right now (for a server the test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Connects to 127.0.0.1:`port`, waiting for a server that is starting.
pub fn connect_when_up(port: u16) -> TcpStream {
    let t = std::time::Instant::now();
    loop {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            return s;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "nothing listens on port {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A Redis client on one connection (RESP, just what the tests need).
pub struct Redis(BufReader<TcpStream>);

impl Redis {
    pub fn connect(port: u16) -> Self {
        Redis(BufReader::new(connect_when_up(port)))
    }

    /// Sends a command; its reply: a status, an error, an integer, or a
    /// bulk string's text.
    pub fn cmd(&mut self, args: &[&str]) -> String {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.0.get_mut().write_all(req.as_bytes()).unwrap();
        let mut line = String::new();
        self.0.read_line(&mut line).expect("redis answers");
        let line = line.trim_end().to_string();
        match line.strip_prefix('$') {
            Some(n) if n != "-1" => {
                let mut data = vec![0u8; n.parse::<usize>().unwrap() + 2];
                self.0.read_exact(&mut data).unwrap();
                String::from_utf8_lossy(&data[..data.len() - 2]).into_owned()
            }
            _ => line,
        }
    }
}

/// GET `path` over an HTTP/1.1 connection that stays open; the body.
pub fn http_get(s: &mut BufReader<TcpStream>, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n");
    s.get_mut().write_all(req.as_bytes()).unwrap();
    let mut len = 0;
    let mut status = String::new();
    s.read_line(&mut status).expect("an HTTP answer");
    assert!(status.contains(" 200 "), "HTTP answer: {status}");
    loop {
        let mut h = String::new();
        s.read_line(&mut h).unwrap();
        if h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    String::from_utf8_lossy(&body).into_owned()
}

/// GET `path` on a connection of its own, HTTP/1.0; the body.
pub fn http_get_once(port: u16, path: &str) -> String {
    let mut s = connect_when_up(port);
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    assert!(all.starts_with("HTTP/1.") && all.contains(" 200 "), "{all}");
    all.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// A server program run by sh, ready as soon as it is started (the test
/// then waits for its port).
pub fn server(name: &str, cmd: String) -> super::Spawn<'_> {
    let mut s = super::Spawn::new(name);
    s.program = Some("sh".into());
    s.args = vec![
        "-c".into(),
        format!("touch \"$ZDTM_READY\"; cd \"$ZDTM_DIR\" && exec {cmd}"),
    ];
    s
}

/// Three network namespaces standing in for hosts: a client's, and two a
/// server moves between (its address goes with the veth end that joins it
/// to the client). Removed, with their links, on drop.
pub struct Hosts {
    pub client: String,
    pub first: String,
    pub second: String,
    link: String,
    /// One set of hosts at a time: their names and addresses are fixed
    /// per test process.
    _one: std::sync::MutexGuard<'static, ()>,
}

static HOSTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub const SERVER_ADDR: &str = "10.199.0.2";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Hosts {
    pub fn new() -> Self {
        let id = std::process::id();
        let one = HOSTS.lock().unwrap_or_else(|e| e.into_inner());
        let h = Hosts {
            _one: one,
            client: format!("crust-cl-{id}"),
            first: format!("crust-a-{id}"),
            second: format!("crust-b-{id}"),
            link: format!("vs{id}"),
        };
        for ns in [&h.client, &h.first, &h.second] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let peer = format!("vc{id}");
        ip(&[
            "link", "add", &peer, "type", "veth", "peer", "name", &h.link,
        ]);
        ip(&["link", "set", &peer, "netns", &h.client]);
        ip(&[
            "-n",
            &h.client,
            "addr",
            "add",
            "10.199.0.1/24",
            "dev",
            &peer,
        ]);
        ip(&["-n", &h.client, "link", "set", &peer, "up"]);
        ip(&["link", "set", &h.link, "netns", &h.first]);
        h.server_link_up(&h.first);
        h
    }

    fn server_link_up(&self, ns: &str) {
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{SERVER_ADDR}/24"),
            "dev",
            &self.link,
        ]);
        ip(&["-n", ns, "link", "set", &self.link, "up"]);
    }

    /// A shell script that moves the server's address to the second
    /// namespace at the restore's pre-restore stage: the restore's lock
    /// already holds the connection there, so the client's packets reach
    /// no namespace that would answer them with a reset before the
    /// restored socket exists (an address up before the lock would).
    pub fn move_server_script(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("move-server.sh");
        let (first, second, link) = (&self.first, &self.second, &self.link);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\n[ \"$CRTOOLS_SCRIPT_ACTION\" = pre-restore ] || exit 0\n\
                 set -e\n\
                 ip -n {first} link set {link} netns {second}\n\
                 ip -n {second} addr add {SERVER_ADDR}/24 dev {link}\n\
                 ip -n {second} link set {link} up\n"
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// A command prefix that runs a program in namespace `ns`.
    pub fn enter(ns: &str) -> Vec<String> {
        vec!["nsenter".into(), format!("--net=/run/netns/{ns}")]
    }

    /// The nsfs inode of namespace `ns`.
    pub fn ino(ns: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{ns}")).unwrap().ino()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in [&self.client, &self.first, &self.second] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

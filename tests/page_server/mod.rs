//! The page server: dumps whose pages travel over TCP (plain or TLS) to
//! `crust page-server`, restored from its directory plus the rest of the
//! images; a migration between two network namespaces; and what must hold
//! when the connection breaks or a certificate is wrong. The program is
//! zdtm/bigmem.c, which verifies every word of its memory on SIGTERM.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// A running `crust page-server`, killed and reaped on drop.
struct PageServer {
    child: Option<Child>,
    port: u16,
}

impl PageServer {
    /// Starts it (behind `prefix`, e.g. nsenter) and waits until it listens.
    fn start(prefix: &[String], dir: &Path, address: &str, extra: &[String]) -> PageServer {
        let port = net::free_port();
        let mut cmd = match prefix.split_first() {
            Some((p, rest)) => {
                let mut c = Command::new(p);
                c.args(rest).arg(CRUST);
                c
            }
            None => Command::new(CRUST),
        };
        cmd.arg("page-server")
            .arg("-D")
            .arg(dir)
            .args(["--address", address, "--port", &port.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("starting crust page-server");
        let mut s = PageServer {
            child: Some(child),
            port,
        };
        s.wait_listening();
        s
    }

    /// Polls the server's own view of TCP (its namespace's) for its
    /// listening socket: a probe connection would be the one dump it takes.
    fn wait_listening(&mut self) {
        let pid = self.child.as_ref().unwrap().id();
        let want = format!(":{:04X} ", self.port);
        let t = Instant::now();
        loop {
            let tcp = fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
            if tcp
                .lines()
                .any(|l| l.contains(&want) && l.split_whitespace().nth(3) == Some("0A"))
            {
                return;
            }
            if let Ok(Some(st)) = self.child.as_mut().unwrap().try_wait() {
                panic!("page server exited with {st}: {}", self.stderr());
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "page server does not listen"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(e) = self.child.as_mut().and_then(|c| c.stderr.as_mut()) {
            use std::io::Read;
            let _ = e.read_to_string(&mut s);
        }
        s.trim().to_string()
    }

    /// Waits for it to exit by itself: (success, stderr).
    fn exit(&mut self) -> (bool, String) {
        let st = wait_with_deadline(self.child.as_mut().unwrap(), 30);
        let err = self.stderr();
        self.child = None;
        (st.success(), err)
    }

    fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
        }
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts zdtm program `name` with `arg` behind `prefix` (nsenter into
/// the dump's "host").
fn start_in(prefix: &[String], name: &str, arg: &str) -> Task {
    let mut s = Spawn::new(name);
    s.program = Some(prefix[0].clone().into());
    s.args = prefix[1..].to_vec();
    s.args.push(build(name).to_string_lossy().into_owned());
    s.args.push(arg.into());
    s.start()
}

fn send_args(address: &str, port: u16) -> Vec<String> {
    vec![
        "--page-server".into(),
        "--address".into(),
        address.into(),
        "--port".into(),
        port.to_string(),
    ]
}

fn pages_images(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let n = e.ok()?.file_name().to_string_lossy().into_owned();
            (n.starts_with("pages-") && n.ends_with(".img")).then_some(n)
        })
        .collect();
    v.sort();
    v
}

/// Copies every image of `from` into `to`: the page server's images and
/// the dump's make one restorable set.
fn copy_images(from: &Path, to: &Path) {
    for e in fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "img") {
            fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// A CA and, signed by it, a certificate for each side (naming the
/// loopback and the migration test's address), and one signed by another
/// CA; made with openssl in `dir`. Shared with the lazy migration tests.
pub(crate) struct Pki(PathBuf);

impl Pki {
    pub(crate) fn new(dir: &Path) -> Pki {
        fs::create_dir_all(dir).unwrap();
        let sh = |script: &str| {
            let out = Command::new("sh")
                .arg("-ec")
                .arg(script)
                .current_dir(dir)
                .output()
                .expect("running openssl (install it: apt-get install openssl)");
            assert!(
                out.status.success(),
                "openssl: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
        for ca in ["ca", "other-ca"] {
            sh(&format!(
                "openssl req -x509 {key} -keyout {ca}.key -out {ca}.pem -days 2 -subj /CN={ca}"
            ));
        }
        fs::write(
            dir.join("ext"),
            format!(
                "subjectAltName=IP:127.0.0.1,IP:{}\nbasicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n",
                net::SERVER_ADDR
            ),
        )
        .unwrap();
        for (name, ca) in [("server", "ca"), ("client", "ca"), ("stranger", "other-ca")] {
            sh(&format!(
                "openssl req {key} -keyout {name}.key -out {name}.csr -subj /CN={name}\n\
                 openssl x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial \
                 -out {name}.pem -days 2 -extfile ext"
            ));
        }
        Pki(dir.to_owned())
    }

    /// --tls with `name`'s certificate and key, trusting the CA.
    pub(crate) fn args(&self, name: &str) -> Vec<String> {
        let f = |n: String| self.0.join(n).to_string_lossy().into_owned();
        vec![
            "--tls".into(),
            "--tls-cacert".into(),
            f("ca.pem".into()),
            "--tls-cert".into(),
            f(format!("{name}.pem")),
            "--tls-key".into(),
            f(format!("{name}.key")),
        ]
    }
}

/// Dumps bigmem through a page server on the loopback (with `server_tls`
/// and `dump_tls` options), restores from the two directories put
/// together, and lets the program check its memory.
fn through_page_server(
    name: &str,
    program: (&str, &str),
    server_tls: &[String],
    dump_tls: &[String],
) {
    let mut t = Spawn::new(program.0).args(&[program.1]).start();
    let srv_dir = t.work.0.join("received");
    let mut srv = PageServer::start(&[], &srv_dir, "127.0.0.1", server_tls);
    // One pages image per process of the tree, all on the server.
    let mut want: Vec<String> = tree_of(t.pid)
        .iter()
        .map(|p| format!("pages-{p}.img"))
        .collect();
    want.sort();
    let mut args = send_args("127.0.0.1", srv.port);
    args.extend_from_slice(dump_tls);
    t.dump(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (ok, err) = srv.exit();
    assert!(ok, "{name}: page server failed: {err}");
    let pages = pages_images(&srv_dir);
    assert_eq!(pages, want, "{name}");
    assert!(
        pages_images(&t.work.images()).is_empty(),
        "{name}: the dump wrote pages images locally"
    );
    copy_images(&srv_dir, &t.work.images());
    t.restore(&[]);
    t.pass();
}

#[test]
fn page_server_dump_restores() {
    through_page_server("plain", ("bigmem", "64"), &[], &[]);
}

/// A parent and 4 children sharing memory copy-on-write: one pages image
/// per process, each task its own OPEN/CLOSE on one connection; after the
/// restore each process checks every page of its view.
#[test]
fn page_server_dumps_a_tree() {
    through_page_server("tree", ("cow", "32"), &[], &[]);
}

#[test]
fn page_server_tls_dump_restores() {
    let w = WorkDir::new("pki");
    let pki = Pki::new(&w.0);
    through_page_server(
        "tls",
        ("bigmem", "64"),
        &pki.args("server"),
        &pki.args("client"),
    );
}

/// The task's mappings and open files (fd and target).
pub(crate) fn state_of(pid: i32) -> String {
    let mut fds: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            Some(format!(
                "{} {}",
                e.file_name().to_string_lossy(),
                fs::read_link(e.path()).ok()?.display()
            ))
        })
        .collect();
    fds.sort();
    fs::read_to_string(format!("/proc/{pid}/maps")).unwrap() + &fds.join("\n")
}

/// The task runs on after a failed dump: not traced, not stopped, its
/// mappings and fds as before (no parasite left); `pass` then has it
/// verify its memory.
pub(crate) fn assert_runs_on(t: Task, before: &str) {
    let t0 = Instant::now();
    while state_of(t.pid) != before {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the task's mappings or fds still differ after the failed dump:\n{}\nbefore:\n{before}",
            state_of(t.pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status_field(t.pid, "TracerPid"), "0", "task still traced");
    let state = status_field(t.pid, "State");
    assert!(!state.starts_with(['t', 'T']), "task is stopped: {state}");
    t.pass();
}

pub(crate) fn one_line_error(who: &str, err: &str, has: &str) {
    assert_eq!(
        err.lines().count(),
        1,
        "{who}: error is not one line: {err}"
    );
    assert!(
        err.starts_with("Error: ") && err.contains(has),
        "{who}: {err}"
    );
}

/// A certificate not signed by the CA the other side trusts: each side
/// refuses in one line, before the tree is touched, and it runs on.
#[test]
fn page_server_refuses_wrong_certificate() {
    let w = WorkDir::new("pki-wrong");
    let pki = Pki::new(&w.0);
    let mut t = Spawn::new("bigmem").args(&["16"]).start();
    let maps = state_of(t.pid);
    // The dump presents a stranger's certificate; then the server does.
    for (server, client) in [("server", "stranger"), ("stranger", "client")] {
        let srv_dir = t.work.0.join("received");
        let mut srv = PageServer::start(&[], &srv_dir, "127.0.0.1", &pki.args(server));
        let mut args = send_args("127.0.0.1", srv.port);
        args.extend(pki.args(client));
        let out = t.dump_with(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert!(
            !out.status.success(),
            "the dump took a {client} certificate"
        );
        one_line_error("dump", &err, "TLS");
        let (ok, serr) = srv.exit();
        assert!(!ok, "the page server took a {client} certificate");
        one_line_error("page server", &serr, "TLS");
        assert!(pages_images(&srv_dir).is_empty());
    }
    assert_runs_on(t, &maps);
}

/// The page server killed mid-transfer: the dump fails in one line and the
/// tree runs on, its memory intact.
#[test]
fn page_server_killed_mid_transfer() {
    let t = Spawn::new("bigmem").args(&["512"]).start();
    let maps = state_of(t.pid);
    let srv_dir = t.work.0.join("received");
    let mut srv = PageServer::start(&[], &srv_dir, "127.0.0.1", &[]);
    let mut dump = Command::new(CRUST)
        .args(["dump", "-t", &t.pid.to_string(), "-D"])
        .arg(t.work.images())
        .args(send_args("127.0.0.1", srv.port))
        .args(["-o", "dump.log", "-v4"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Stopped once pages arrive (the dump then waits on a full socket),
    // then killed: the break comes mid-transfer, however fast the link.
    let pages = srv_dir.join(format!("pages-{}.img", t.pid));
    let t0 = Instant::now();
    while fs::metadata(&pages).map_or(0, |m| m.len()) < 8 << 20 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no pages reached the server"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let spid = nix::unistd::Pid::from_raw(srv.child.as_ref().unwrap().id() as i32);
    nix::sys::signal::kill(spid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    srv.kill();
    let st = wait_with_deadline(&mut dump, 90);
    let mut err = String::new();
    use std::io::Read;
    dump.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let err = err.trim();
    assert!(!st.success(), "the dump succeeded without its page server");
    one_line_error("dump", err, "page server");
    assert!(
        !t.work.images().join("inventory.img").exists(),
        "a dump without its pages looks whole"
    );
    assert_runs_on(t, &maps);
}

/// A migration: bigmem runs on one "host" (a network namespace), a page
/// server on another (joined by a veth pair); the dump runs on the first
/// and sends its pages over, the rest of the images are copied after them,
/// and the restore runs on the second host, where the program verifies
/// every word of its memory.
#[test]
fn page_server_migrates_memory_to_another_namespace() {
    const MIB: &str = "1024";
    let hosts = net::Hosts::new();
    // The dump's host is the client namespace (10.199.0.1), the target the
    // first server namespace (SERVER_ADDR).
    let here = net::Hosts::enter(&hosts.client);
    let there = net::Hosts::enter(&hosts.first);
    let mut t = start_in(&here, "bigmem", MIB);
    let target = t.work.0.join("target-host");
    let mut srv = PageServer::start(&there, &target, net::SERVER_ADDR, &[]);
    let out = Command::new(&here[0])
        .args(&here[1..])
        .arg(CRUST)
        .args(["dump", "-t", &t.pid.to_string(), "-D"])
        .arg(t.work.images())
        .args(send_args(net::SERVER_ADDR, srv.port))
        .args(["-o", "dump.log", "-v4"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dump through the page server failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = t.take_original().map(|mut c| c.wait());
    wait_gone(t.pid);
    let (ok, err) = srv.exit();
    assert!(ok, "page server failed: {err}");
    // The other images follow the pages to the target host.
    copy_images(&t.work.images(), &target);
    let mut cmd = Command::new(&there[0]);
    cmd.args(&there[1..])
        .arg(CRUST)
        .arg("restore")
        .arg("-D")
        .arg(&target)
        .args(["-o", "restore.log", "-v4", "--pidfile"])
        .arg(t.work.0.join("restored.pid"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    t.restore_with(cmd);
    use std::os::unix::fs::MetadataExt;
    let ns = fs::metadata(format!("/proc/{}/ns/net", t.pid))
        .unwrap()
        .ino();
    assert_eq!(
        ns,
        net::Hosts::ino(&hosts.first),
        "restored on the target host"
    );
    t.pass();
}

/// A frame of the page protocol (docs/PAGE-SERVER.md), made by hand.
fn frame(op: u32, id: i32, crc: u32, len: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"XPRC"); // magic 0x43525058, little-endian
    b.extend_from_slice(&op.to_le_bytes());
    b.extend_from_slice(&id.to_le_bytes());
    b.extend_from_slice(&crc.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    let h = crc32fast::hash(&b);
    b.extend_from_slice(&h.to_le_bytes());
    b
}

/// A stream that is no page stream, and pages whose checksum fails: the
/// server exits non-zero with one line and leaves no pages image behind.
#[test]
fn page_server_refuses_corrupt_stream() {
    use std::io::{Read, Write};
    let w = WorkDir::new("corrupt-stream");
    let dir = w.0.join("received");
    let mut srv = PageServer::start(&[], &dir, "127.0.0.1", &[]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n0123456789abcdef")
        .unwrap();
    let (ok, err) = srv.exit();
    assert!(!ok, "the page server took an HTTP request");
    one_line_error("page server", &err, "no crust page stream");

    let mut srv = PageServer::start(&[], &dir, "127.0.0.1", &[]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    s.write_all(&frame(1, 0, 0, 1)).unwrap(); // HELLO, version 1
    let mut answer = [0u8; 32];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(answer[..8], frame(1, 0, 0, 1)[..8], "no HELLO back");
    let page = vec![0x5au8; 4096];
    s.write_all(&frame(2, 77, 0, 0)).unwrap(); // OPEN task 77
    // PAGES with the checksum of other bytes.
    s.write_all(&frame(3, 77, crc32fast::hash(b"other"), 4096))
        .unwrap();
    s.write_all(&page).unwrap();
    let (ok, err) = srv.exit();
    assert!(!ok, "the page server took pages failing their checksum");
    one_line_error("page server", &err, "fail their checksum");
    assert!(
        pages_images(&dir).is_empty(),
        "the server left a pages image of a failed dump"
    );
}

/// Iterative migration, as with criu: a process with 1 GiB that keeps
/// writing runs on one host; two pre-dumps and then the final dump (only
/// the pages written since, `--prev-images-dir --track-mem`) each send
/// their pages to a page server on the other host, into a directory per
/// dump laid out as on the dump's host; the rest of the images (and the
/// `parent` links) follow, and the restore there reads through the chain.
/// The program verifies every page it wrote.
#[test]
fn page_server_migrates_after_pre_dumps() {
    const MIB: &str = "1024";
    let hosts = net::Hosts::new();
    let here = net::Hosts::enter(&hosts.client);
    let there = net::Hosts::enter(&hosts.first);
    let mut t = start_in(&here, "predump", MIB);
    let target = t.work.0.join("target-host");
    let dumps = [
        ("pre1", "pre-dump", vec![]),
        ("pre2", "pre-dump", vec!["--prev-images-dir", "../pre1"]),
        (
            "images",
            "dump",
            vec!["--prev-images-dir", "../pre2", "--track-mem"],
        ),
    ];
    let mut sent = Vec::new();
    for (round, (name, cmd, extra)) in dumps.iter().enumerate() {
        if round > 0 {
            crate::scatter_writes(&t, round as u32);
        }
        let mut srv = PageServer::start(&there, &target.join(name), net::SERVER_ADDR, &[]);
        let out = Command::new(&here[0])
            .args(&here[1..])
            .arg(CRUST)
            .args([*cmd, "-t", &t.pid.to_string(), "-D"])
            .arg(t.work.0.join(name))
            .args(send_args(net::SERVER_ADDR, srv.port))
            .args(extra)
            .args(["-o", "dump.log", "-v4"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd} {name} through the page server failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (ok, err) = srv.exit();
        assert!(ok, "page server of {name} failed: {err}");
        assert!(
            pages_images(&t.work.0.join(name)).is_empty(),
            "{name}: pages images were written on the dump's host"
        );
        sent.push(
            pages_images(&target.join(name))
                .iter()
                .map(|p| fs::metadata(target.join(name).join(p)).unwrap().len())
                .sum::<u64>(),
        );
    }
    eprintln!("pages sent by the two pre-dumps and the dump: {sent:?} bytes");
    // The final dump sent only what was written since the second pre-dump.
    assert!(sent[2] < sent[0] / 4, "pages sent per dump: {sent:?} bytes");
    let _ = t.take_original().map(|mut c| c.wait());
    wait_gone(t.pid);
    for (name, _, _) in &dumps {
        copy_images(&t.work.0.join(name), &target.join(name));
        let link = t.work.0.join(name).join("parent");
        if let Ok(to) = fs::read_link(&link) {
            std::os::unix::fs::symlink(to, target.join(name).join("parent")).unwrap();
        }
    }
    let mut cmd = Command::new(&there[0]);
    cmd.args(&there[1..])
        .arg(CRUST)
        .arg("restore")
        .arg("-D")
        .arg(target.join("images"))
        .args(["-o", "restore.log", "-v4", "--pidfile"])
        .arg(t.work.0.join("restored.pid"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    t.restore_with(cmd);
    t.pass();
}

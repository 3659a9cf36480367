//! The zdtm runner: builds the test programs in zdtm/, starts them, drives
//! them through `crust dump` and `crust restore`, and collects their verdict.
//! Every process a test starts is killed and reaped by PID when its guard
//! drops, whatever the outcome.

#![allow(dead_code)]

pub mod net;

use std::fs;
use std::os::fd::FromRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

pub const CRUST: &str = env!("CARGO_BIN_EXE_crust");

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bin_dir() -> PathBuf {
    root().join("target/zdtm-bin")
}

/// Held by every test that makes pseudo-terminals: a restored pty pair
/// needs its dumped /dev/pts index free, and another test's new pty could
/// take it in between.
pub fn pty_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Held by the tests of zdtm/netlink_sockets.c: its usersock sockets join
/// fixed multicast groups of the one network namespace, so one test's
/// messages would land, unread, in another's sockets.
pub fn netlink_groups_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Compiles zdtm/NAME.c once per test binary run.
pub fn build(name: &str) -> PathBuf {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        fs::create_dir_all(bin_dir()).unwrap();
        for e in fs::read_dir(root().join("zdtm")).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "c") {
                let out = bin_dir().join(p.file_stem().unwrap());
                let st = Command::new("cc")
                    // No -m flag: the programs run on any x86-64 CPU (a
                    // test of one CPU feature's state checks `cpu_has`).
                    .args(["-O1", "-Wall", "-pthread", "-o"])
                    .arg(&out)
                    .arg(&p)
                    .status()
                    .expect("running cc");
                assert!(st.success(), "compiling {}", p.display());
            }
        }
    });
    bin_dir().join(name)
}

/// Whether a test of `flag`'s state must skip: the CPU lacks it (said on
/// stderr).
pub fn lacks_cpu(flag: &str) -> bool {
    let lacks = !cpu_has(flag);
    if lacks {
        eprintln!("skipped: this CPU has no {flag} (not in /proc/cpuinfo's flags)");
    }
    lacks
}

/// Whether /proc/cpuinfo lists the CPU feature flag `flag` (e.g. "avx512f").
pub fn cpu_has(flag: &str) -> bool {
    fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|w| w == flag))
}

/// Keeps fds the test harness inherited (from whatever started cargo) out of
/// the test programs: a stray pipe would make every dump refuse.
pub fn close_inherited_fds(cmd: &mut Command) {
    // SAFETY: close_range is async-signal-safe; it runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
}

/// A scratch directory for one test, removed on drop.
pub struct WorkDir(pub PathBuf);

impl WorkDir {
    pub fn new(name: &str) -> Self {
        // Unique per call: tests of one binary run in parallel, and two of
        // them may run the same program.
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("crust-zdtm-{}-{seq}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        // Tests that drop to another user still create their ready file here.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o1777)).unwrap();
        WorkDir(p)
    }
    pub fn images(&self) -> PathBuf {
        self.0.join("images")
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether a test program (zdtm/*.c, built into target/zdtm-bin) runs at
/// `pid`: what a failed or refused restore must not leave behind. Only
/// the PID would not do: PIDs wrap at 32768 here, and another test's
/// process may have taken it since.
pub fn test_program_at(pid: i32) -> bool {
    fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe.starts_with(bin_dir()))
}

pub fn wait_gone(pid: i32) {
    let t = Instant::now();
    while pid_alive(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "PID {pid} did not go away"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_file(p: &Path, what: &str) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn status_field(pid: i32, key: &str) -> String {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .and_then(|r| r.strip_prefix(':'))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// A running test task: the original (our child) or a restored one (the
/// child of a `crust restore` that is our child).
pub struct Task {
    pub pid: i32,
    pub work: WorkDir,
    pub log: PathBuf,
    original: Option<Child>,
    restorer: Option<Child>,
}

pub type BeforeStart = Box<dyn FnOnce(&Path)>;

pub struct Spawn<'a> {
    pub name: &'a str,
    pub args: Vec<String>,
    /// Where stdout and stderr go: the log file (default) or /dev/null.
    pub quiet: bool,
    pub stdout_pipe: bool,
    /// An fd of the test's to give the program as stdin (default /dev/null).
    pub stdin_fd: Option<std::os::fd::RawFd>,
    pub program: Option<PathBuf>,
    /// Prepares the work directory before the program starts.
    pub before_start: Option<BeforeStart>,
}

impl<'a> Spawn<'a> {
    pub fn new(name: &'a str) -> Self {
        Spawn {
            name,
            args: Vec::new(),
            quiet: false,
            stdout_pipe: false,
            stdin_fd: None,
            program: None,
            before_start: None,
        }
    }
    pub fn args(mut self, a: &[&str]) -> Self {
        self.args = a.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn quiet(mut self) -> Self {
        self.quiet = true;
        self
    }

    pub fn start(self) -> Task {
        let work = WorkDir::new(self.name);
        let log = work.0.join("test.log");
        let ready = work.0.join("ready");
        let prog = self.program.clone().unwrap_or_else(|| build(self.name));
        if let Some(f) = self.before_start {
            f(&work.0);
        }
        let mut cmd = Command::new(prog);
        cmd.args(&self.args)
            .env("ZDTM_READY", &ready)
            .env("ZDTM_DIR", &work.0)
            .stdin(match self.stdin_fd {
                // SAFETY: a dup of the caller's fd, owned by the Stdio.
                Some(fd) => Stdio::from(unsafe {
                    std::os::fd::OwnedFd::from_raw_fd(libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0))
                }),
                None => Stdio::null(),
            })
            .process_group(0);
        close_inherited_fds(&mut cmd);
        if self.stdout_pipe {
            cmd.stdout(Stdio::piped()).stderr(Stdio::null());
        } else if self.quiet {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        } else {
            let f = fs::File::create(&log).unwrap();
            cmd.stdout(f.try_clone().unwrap()).stderr(f);
        }
        let child = cmd.spawn().expect("starting a zdtm test");
        let pid = child.id() as i32;
        let mut task = Task {
            pid,
            work,
            log,
            original: Some(child),
            restorer: None,
        };
        task.wait_file(&ready);
        task
    }
}

/// `crust pre-dump` of `pid` into `dir` (its log `pre-dump.log` there, at
/// -v4), with `extra`.
pub fn pre_dump_cmd(pid: i32, dir: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(CRUST);
    c.args(["pre-dump", "-t", &pid.to_string(), "-D"])
        .arg(dir)
        .args(["-o", "pre-dump.log", "-v4"])
        .args(extra);
    c
}

/// Runs `c` and asserts it succeeded; else shows its stderr and `log`.
pub fn run_ok(c: &mut Command, log: Option<&Path>) {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        log.and_then(|l| fs::read_to_string(l).ok())
            .unwrap_or_default()
    );
}

impl Task {
    /// `crust pre-dump` of the task into `work/NAME`, with `extra`; it must
    /// succeed.
    pub fn pre_dump_ok(&self, name: &str, extra: &[&str]) {
        let dir = self.work.0.join(name);
        run_ok(
            &mut pre_dump_cmd(self.pid, &dir, extra),
            Some(&dir.join("pre-dump.log")),
        );
    }

    /// Waits for a file, failing early if the test died.
    fn wait_file(&mut self, p: &Path) {
        let t = Instant::now();
        while !p.exists() {
            if let Some(c) = self.original.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!(
                    "test exited with {st} before it was ready: {}",
                    self.log_text()
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "timed out waiting for {}",
                p.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `crust dump` with `extra`, which must be refused: the task runs on,
    /// untraced. Returns crust's stderr, for the caller to check the reason.
    pub fn dump_refused(&mut self, extra: &[&str]) -> String {
        let out = self.dump_with(extra, &[]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "the dump went through: {err}");
        assert!(
            pid_alive(self.pid),
            "the refused dump killed the task: {err}"
        );
        assert_eq!(
            status_field(self.pid, "TracerPid"),
            "0",
            "the refused dump left the task traced"
        );
        err
    }

    /// `crust dump` with extra arguments; returns its output.
    pub fn dump_with(&mut self, extra: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(CRUST);
        cmd.arg("dump")
            .arg("-t")
            .arg(self.pid.to_string())
            .arg("-D")
            .arg(self.work.images());
        cmd.args(["-o", "dump.log", "-v4"]).args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("running crust dump")
    }

    /// Dumps (killing the task) and asserts success.
    pub fn dump(&mut self, extra: &[&str]) {
        let out = self.dump_with(extra, &[]);
        assert!(
            out.status.success(),
            "crust dump failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(self.work.images().join("dump.log")).unwrap_or_default()
        );
        if !extra.contains(&"--leave-running") {
            self.reap_parent();
            wait_gone(self.pid);
        }
    }

    /// Reaps whichever of our children was the task's parent, after the task
    /// was killed by a dump.
    fn reap_parent(&mut self) {
        if let Some(mut c) = self.original.take() {
            let _ = c.wait();
        }
        if let Some(mut r) = self.restorer.take() {
            let _ = r.wait();
        }
    }

    pub fn restore_cmd(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(CRUST);
        cmd.arg("restore").arg("-D").arg(self.work.images());
        cmd.args(["-o", "restore.log", "-v4", "--pidfile"])
            .arg(self.work.0.join("restored.pid"));
        cmd.args(extra);
        cmd
    }

    /// Starts `crust restore` (crust stays the task's parent) and waits until
    /// the task runs.
    pub fn restore(&mut self, extra: &[&str]) {
        let _ = fs::remove_file(self.work.0.join("restored.pid"));
        let mut cmd = self.restore_cmd(extra);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        self.restore_with(cmd);
    }

    pub fn restore_with(&mut self, mut cmd: Command) {
        // Held by self at once, so a panic below still kills and reaps it.
        self.restorer = Some(cmd.spawn().expect("running crust restore"));
        let child = self.restorer.as_mut().unwrap();
        let pidfile = self.work.0.join("restored.pid");
        let t = Instant::now();
        while !pidfile.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                panic!(
                    "crust restore exited with {st}: {err}\n{}",
                    fs::read_to_string(self.work.images().join("restore.log")).unwrap_or_default()
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "restore did not finish"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let pid: i32 = fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(pid, self.pid, "restored with another PID");
        let tracer = status_field(pid, "TracerPid");
        assert!(
            tracer == "0",
            "restored task is {}\ntask log:\n{}\nrestore log:\n{}",
            if tracer.is_empty() {
                "gone".to_string()
            } else {
                format!("still traced by {tracer}")
            },
            self.log_text(),
            fs::read_to_string(self.work.images().join("restore.log")).unwrap_or_default()
        );
    }

    /// Sends SIGTERM and returns the task's exit status.
    pub fn finish(mut self) -> (ExitStatus, String) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        let st = self.wait_child();
        (st, self.log_text())
    }

    /// Waits for whichever of our children ends with the task: the task
    /// itself or the `crust restore` that is its parent. A task that hangs
    /// is killed after a minute and the test fails, instead of hanging CI.
    fn wait_child(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        let pid = self.pid;
        let c = self
            .original
            .as_mut()
            .or(self.restorer.as_mut())
            .expect("no child to wait for");
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                self.original = None;
                self.restorer = None;
                // Children a failing test left behind (reparented to init)
                // are still in its process group.
                end_tree(pid);
                return st;
            }
            if Instant::now() > deadline {
                let state = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let wchan = fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
                let stack = fs::read_to_string(format!("/proc/{pid}/stack")).unwrap_or_default();
                eprintln!("task {pid} hangs: wchan {wchan}\n{state}\n{stack}");
                end_tree(pid);
                panic!(
                    "task {pid} did not finish within a minute: {}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Finishes the test and asserts it passed.
    pub fn pass(self) {
        let (st, log) = self.finish();
        assert!(st.success(), "test failed with {st}: {log}");
        if !log.is_empty() {
            assert!(
                log.trim_end().ends_with("PASS") || log.contains("PASS"),
                "no PASS in log: {log}"
            );
        }
    }

    /// Waits for the task to exit by itself; returns its exit status.
    pub fn wait_exit(&mut self) -> (ExitStatus, String) {
        let st = self.wait_child();
        (st, self.log_text())
    }

    /// Whether the original task (our child) exits within `d`; reaped
    /// when it does.
    pub fn exits_within(&mut self, d: Duration) -> bool {
        let t = Instant::now();
        loop {
            match self.original.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(_))) => {
                    self.original = None;
                    return true;
                }
                Some(Ok(None)) if t.elapsed() < d => std::thread::sleep(Duration::from_millis(10)),
                _ => return false,
            }
        }
    }

    pub fn take_original(&mut self) -> Option<Child> {
        self.original.take()
    }

    /// The `crust restore` the task was restored under, for a test that
    /// waits for it itself.
    pub fn take_restorer(&mut self) -> Option<Child> {
        self.restorer.take()
    }
}

/// Waits for a child of the test, killing it and failing after `secs`.
pub fn wait_with_deadline(c: &mut Child, secs: u64) -> ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return st;
        }
        if t.elapsed() > Duration::from_secs(secs) {
            let _ = c.kill();
            let _ = c.wait();
            panic!("PID {} did not end within {secs} s", c.id());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ends the tree under a PID when dropped: for processes a test started
/// without being their parent.
pub struct EndTree(pub i32);

impl Drop for EndTree {
    fn drop(&mut self) {
        if pid_alive(self.0) {
            end_tree(self.0);
        }
    }
}

/// `pid` and all its descendants, parents first.
pub fn tree_of(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        for t in fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let kids = fs::read_to_string(t.path().join("children")).unwrap_or_default();
            out.extend(
                kids.split_whitespace()
                    .filter_map(|k| k.parse::<i32>().ok()),
            );
        }
        i += 1;
    }
    out
}

/// Kills the tree a test started from `root`: every descendant still under
/// it, and whatever is left in its process group (the runner starts each
/// test as a group leader; orphans stay in the group).
pub fn end_tree(root: i32) {
    for p in tree_of(root) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(-root),
        nix::sys::signal::Signal::SIGKILL,
    );
}

impl Drop for Task {
    /// A test that fails half-way ends the whole tree it started, not only
    /// its root: children would otherwise outlive it, reparented to init.
    fn drop(&mut self) {
        if self.original.is_some() || self.restorer.is_some() {
            end_tree(self.pid);
            self.reap_parent();
        }
    }
}

/// One full cycle for a test: start, dump, restore, check.
pub fn cycle(name: &str, args: &[&str]) {
    let mut t = Spawn::new(name).args(args).start();
    t.dump(&[]);
    t.restore(&[]);
    t.pass();
}

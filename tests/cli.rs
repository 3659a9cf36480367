//! The user-facing commands around dump and restore: check and show, and the
//! errors a user meets first.

mod common;
use common::*;

use std::process::Command;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(CRUST).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check() {
    let (code, out, _) = run(&["check"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.trim_end().ends_with("Looks good."), "{out}");
    let (code, out, _) = run(&["check", "--all"]);
    assert_eq!(code, 0);
    for probe in [
        "ptrace_seize",
        "clone3_set_tid",
        "map_files",
        "kcmp",
        "userfaultfd",
        "pagemap_scan",
        "soft_dirty",
    ] {
        assert!(out.contains(probe), "--all does not list {probe}: {out}");
    }
    // soft-dirty is optional: whatever its state, it never fails the plain check.
    assert!(
        out.lines()
            .any(|l| l.starts_with("soft_dirty") && l.contains("optional")),
        "{out}"
    );
    let (code, out, _) = run(&["check", "--feature", "ptrace_seize"]);
    assert_eq!(code, 0, "{out}");
    let (code, _, err) = run(&["check", "--feature", "no_such_thing"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("unknown feature") && err.contains("ptrace_seize"),
        "{err}"
    );
}

#[test]
fn show_text_and_json() {
    let mut t = Spawn::new("counter").quiet().start();
    let pid = t.pid;
    t.dump(&[]);
    let dir = t.work.images();
    let (code, out, err) = run(&["show", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    for want in [
        format!("process {pid} (counter)"),
        "[vdso]".into(),
        "fd   0 device /dev/null".into(),
        "verified".into(),
    ] {
        assert!(out.contains(&want), "show lacks {want:?}:\n{out}");
    }
    let core = dir.join(format!("core-{pid}.img"));
    let (code, out, _) = run(&["show", "--json", core.to_str().unwrap()]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["image"]["pid"], pid);
    assert_eq!(v["image"]["comm"], "counter");
    let (code, out, _) = run(&["show", "--json", dir.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 5, "one JSON line per image: {out}");
    for l in out.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["file"].as_str().unwrap().ends_with(".img"));
    }
    t.restore(&[]);
    t.pass();
}

#[test]
fn dump_refuses_a_traced_task() {
    let t = Spawn::new("sleeping").start();
    let p = nix::unistd::Pid::from_raw(t.pid);
    nix::sys::ptrace::seize(p, nix::sys::ptrace::Options::empty()).unwrap();
    let (code, _, err) = run(&[
        "dump",
        "-t",
        &t.pid.to_string(),
        "-D",
        t.work.images().to_str().unwrap(),
    ]);
    // PTRACE_DETACH wants a stopped tracee.
    nix::sys::ptrace::interrupt(p).unwrap();
    nix::sys::wait::waitpid(p, Some(nix::sys::wait::WaitPidFlag::__WALL)).unwrap();
    nix::sys::ptrace::detach(p, None).unwrap();
    assert_ne!(code, 0);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("already traced by PID") && err.contains(&nix::unistd::gettid().to_string()),
        "{err}"
    );
    t.pass();
}

/// A pipe from outside the tree on stdin with bytes in it: a restore
/// without --inherit-fd gives the task a fresh pipe holding those bytes
/// (as criu does), and the task reads them, then end of file.
#[test]
fn stray_pipe_comes_back_fresh_with_its_bytes() {
    use std::io::Write;
    let (rd, wr) = nix::unistd::pipe().unwrap();
    let mut s = Spawn::new("stdin_reader");
    let rd_fd = std::os::fd::AsRawFd::as_raw_fd(&rd);
    s.stdin_fd = Some(rd_fd);
    let mut t = s.start();
    drop(rd);
    std::fs::File::from(wr.try_clone().unwrap())
        .write_all(b"buffered bytes")
        .unwrap();
    t.dump(&[]);
    drop(wr);
    t.restore(&[]);
    let (st, log) = t.finish();
    assert!(st.success(), "{log}");
    assert!(log.contains("stdin held: buffered bytes"), "{log}");
}

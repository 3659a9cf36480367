//! Nothing lost: failed dumps leave the task running and unharmed, failed
//! restores leave the images untouched, bad input gets a one-line error.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::fs;
use std::process::Command;

fn crust(args: &[&str]) -> (bool, String) {
    let out = Command::new(CRUST).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    (out.status.success(), err)
}

fn one_line_error(err: &str) {
    assert_eq!(err.lines().count(), 1, "error is not one line: {err}");
    assert!(err.starts_with("Error: "), "{err}");
}

/// The task runs, is not traced or stopped, has its mappings and fds as
/// before, and still passes its own check.
/// The guardian of a crust that died cures the task on its own: it
/// unmaps the parasite and closes its fds, then lets the task go; the
/// task must be whole again within moments.
fn assert_unharmed(t: Task, maps_before: &str, fds_before: &[String]) {
    let t0 = std::time::Instant::now();
    loop {
        let maps = fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
        let fds = fd_list(t.pid);
        let tracer = status_field(t.pid, "TracerPid");
        let state = status_field(t.pid, "State");
        let stopped = state.starts_with('t') || state.starts_with('T');
        if maps == maps_before && fds == fds_before && tracer == "0" && !stopped {
            break;
        }
        assert!(
            t0.elapsed().as_secs() < 10,
            "the task still differs after a failed dump (tracer {tracer}, state {state}):\nmaps now:\n{maps}\nbefore:\n{maps_before}\nfds now {fds:?} before {fds_before:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    t.pass();
}

fn fd_list(pid: i32) -> Vec<String> {
    // An fd closed while the list is read (the guardian curing a task) is
    // left out; the caller looks again.
    let mut v: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let target = fs::read_link(e.path()).ok()?;
            Some(format!(
                "{} {}",
                e.file_name().to_string_lossy(),
                target.display()
            ))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn dump_missing_pid() {
    let dir = std::env::temp_dir().join(format!("crust-nonexistent-images-{}", std::process::id()));
    let (ok, err) = crust(&["dump", "-t", "2147483", "-D", dir.to_str().unwrap()]);
    assert!(!ok);
    one_line_error(&err);
    assert!(err.contains("2147483"), "{err}");
    assert!(!dir.exists(), "a refused dump created its images directory");
}

/// A pipe whose other end is outside the tree (here the test reads the
/// task's stdout): the dump takes it; a restore without a stand-in gives
/// the task a fresh pipe and warns in one line naming the pipe and
/// `--inherit-fd`; with `--inherit-fd fd[N]:pipe:[INO]` the task writes
/// into the pipe it was given.
#[test]
fn pipe_to_outside_with_and_without_inherit_fd() {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let mut s = Spawn::new("sleeping");
    s.stdout_pipe = true;
    let mut t = s.start();
    let pid = t.pid;
    t.dump(&[]);
    let dir = t.work.images();
    let before = snapshot(&dir);
    let out = Command::new(CRUST)
        .args(["restore", "-d", "-D", dir.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "a restore without --inherit-fd failed: {err}"
    );
    assert!(
        err.contains("--inherit-fd") && err.contains("fresh pipe"),
        "{err}"
    );
    let key = err
        .split_whitespace()
        .find(|w| w.starts_with("pipe:["))
        .map(|w| w.trim_end_matches([',', ';']).to_string())
        .unwrap_or_else(|| panic!("the warning names no pipe: {err}"));
    assert!(pid_alive(pid), "the restored task is not running");
    // It runs on a pipe no one reads; this copy goes away again.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_gone(pid);
    assert_eq!(snapshot(&dir), before, "a restore changed the images");

    let (rd, wr) = nix::unistd::pipe().unwrap();
    let wr_fd = std::os::fd::AsRawFd::as_raw_fd(&wr);
    let mut cmd = Command::new(CRUST);
    cmd.args(["restore", "-D", dir.to_str().unwrap(), "--inherit-fd"])
        .arg(format!("fd[3]:{key}"))
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; it runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::dup2(wr_fd, 3);
            Ok(())
        });
    }
    let mut restore = cmd.spawn().unwrap();
    drop(wr);
    let t0 = std::time::Instant::now();
    while !pid_alive(pid) || status_field(pid, "TracerPid") != "0" {
        if let Ok(Some(st)) = restore.try_wait() {
            let mut e = String::new();
            restore
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut e)
                .unwrap();
            panic!("restore with --inherit-fd exited with {st}: {e}");
        }
        assert!(t0.elapsed().as_secs() < 30, "restore did not finish");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = restore.wait().unwrap();
    let mut out = String::new();
    std::fs::File::from(rd).read_to_string(&mut out).unwrap();
    assert!(st.success(), "the restored task failed: {st}: {out}");
    assert_eq!(
        out.trim(),
        "PASS",
        "the task did not write into the pipe it was given"
    );
}

#[test]
fn crust_killed_mid_dump_leaves_task_unharmed() {
    for stage in [
        "seized",
        "infected",
        "parasite-free",
        "pages-in-pipes",
        "pages-drained",
        "before-inventory",
    ] {
        let mut t = Spawn::new("maps").start();
        eprintln!("stage {stage}: task {}", t.pid);
        let maps = fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
        let fds = fd_list(t.pid);
        let out = t.dump_with(&[], &[("CRUST_FAULT", stage)]);
        assert!(!out.status.success(), "stage {stage}: crust was not killed");
        assert!(
            !t.work.images().join("inventory.img").exists(),
            "stage {stage}: a killed dump left an inventory"
        );
        let (ok, err) = crust(&["restore", "-D", t.work.images().to_str().unwrap()]);
        assert!(
            !ok && err.contains("inventory"),
            "stage {stage}: restore of a half dump: {err}"
        );
        // A second try into the same directory takes over what the killed
        // dump left there.
        let out = t.dump_with(&["--leave-running"], &[]);
        assert!(
            out.status.success(),
            "stage {stage}: dump again into the directory: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_unharmed(t, &maps, &fds);
    }
}

/// A crust killed mid-dump leaves every thread its vector registers: the
/// parasite's commands use xmm registers, and crust ends most of them by
/// putting the thread's state back itself, not by the parasite's
/// rt_sigreturn; a second thread holds values of its own. The task checks
/// its registers itself once crust is gone.
#[test]
fn crust_killed_mid_dump_leaves_registers_unharmed() {
    if lacks_cpu("avx") {
        return;
    }
    killed_at_stages(
        "fpu",
        &["avx", "threads"],
        &["infected", "parasite-free", "pages-drained"],
    );
}

/// For each of `stages`: starts `program` with `args`, kills crust at
/// that stage of its dump, and asserts the task unharmed (it checks
/// itself last).
fn killed_at_stages(program: &str, args: &[&str], stages: &[&str]) {
    for stage in stages {
        let mut t = Spawn::new(program).args(args).start();
        eprintln!("stage {stage}: task {}", t.pid);
        let maps = fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
        let fds = fd_list(t.pid);
        let out = t.dump_with(&[], &[("CRUST_FAULT", stage)]);
        assert!(!out.status.success(), "stage {stage}: crust was not killed");
        assert_unharmed(t, &maps, &fds);
    }
}

/// A crust killed mid-dump leaves a task asleep in nanosleep asleep: the
/// sleep lasts its whole time and returns 0 (the task checks).
#[test]
fn crust_killed_mid_dump_lets_a_sleep_go_on() {
    killed_at_stages(
        "sleeping",
        &["whole"],
        &["infected", "pages-drained", "before-inventory"],
    );
}

#[test]
fn restore_bad_directories() {
    let w = WorkDir::new("baddirs");
    let missing = w.0.join("missing");
    let (ok, err) = crust(&["restore", "-D", missing.to_str().unwrap()]);
    assert!(!ok);
    one_line_error(&err);
    assert!(err.contains("does not exist"), "{err}");
    let empty = w.0.join("empty");
    fs::create_dir(&empty).unwrap();
    let (ok, err) = crust(&["restore", "-D", empty.to_str().unwrap()]);
    assert!(!ok);
    one_line_error(&err);
    assert!(err.contains("inventory"), "{err}");
}

fn snapshot(dir: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .filter(|(n, _)| n.ends_with(".img"))
        .collect()
}

/// Dumps a task, then damages one image in several ways; every restore must
/// fail naming the file and leave the directory as it was.
#[test]
fn restore_corrupt_images() {
    let mut t = Spawn::new("counter").quiet().start();
    let pid = t.pid;
    t.dump(&[]);
    let dir = t.work.images();
    let pristine = snapshot(&dir);
    let perms = fs::metadata(&dir).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&perms.permissions()) & 0o777,
        0o700
    );
    for name in pristine.keys() {
        let m = fs::metadata(dir.join(name)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777,
            0o600,
            "{name}"
        );
    }
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let damage: Vec<(String, Damage)> = vec![
        (
            format!("core-{pid}.img"),
            Box::new(|b: &mut Vec<u8>| b.truncate(b.len() / 2)),
        ),
        (
            format!("mm-{pid}.img"),
            Box::new(|b: &mut Vec<u8>| {
                let i = b.len() - 3;
                b[i] ^= 0x55;
            }),
        ),
        (
            format!("files-{pid}.img"),
            Box::new(|b: &mut Vec<u8>| b[4] = 99),
        ),
        (
            format!("pages-{pid}.img"),
            Box::new(|b: &mut Vec<u8>| {
                let i = b.len() - 100;
                b[i] ^= 1;
            }),
        ),
        (
            "inventory.img".into(),
            Box::new(|b: &mut Vec<u8>| b.truncate(10)),
        ),
    ];
    for (name, f) in &damage {
        let mut bytes = pristine[name].clone();
        f(&mut bytes);
        fs::write(dir.join(name), &bytes).unwrap();
        let before = snapshot(&dir);
        let (ok, err) = crust(&["restore", "-D", dir.to_str().unwrap()]);
        assert!(!ok, "restore with a damaged {name} succeeded");
        one_line_error(&err);
        if !name.starts_with("pages") {
            assert!(
                err.contains(name.as_str()),
                "error does not name {name}: {err}"
            );
        } else {
            assert!(err.contains("pages") && err.contains("corrupt"), "{err}");
        }
        assert_eq!(
            snapshot(&dir),
            before,
            "a failed restore changed the images"
        );
        assert!(
            !test_program_at(pid),
            "a failed restore left PID {pid} behind"
        );
        fs::write(dir.join(name), &pristine[name]).unwrap();
    }
    // The undamaged images still restore.
    t.restore(&[]);
    t.pass();
}

/// A file the task had open that was replaced (same path, same size, new
/// inode) is refused by name; once the original is back, the restore works.
#[test]
fn restore_refuses_replaced_file() {
    let mut t = Spawn::new("files").quiet().start();
    t.dump(&[]);
    let dir = t.work.images();
    let path = t.work.0.join("files.b");
    let original = t.work.0.join("files.b.orig");
    fs::rename(&path, &original).unwrap();
    fs::copy(&original, &path).unwrap();
    let before = snapshot(&dir);
    let (ok, err) = crust(&["restore", "-D", dir.to_str().unwrap()]);
    assert!(!ok, "a restore onto a replaced file succeeded");
    one_line_error(&err);
    assert!(err.contains("files.b") && err.contains("replaced"), "{err}");
    assert_eq!(
        snapshot(&dir),
        before,
        "a failed restore changed the images"
    );
    assert!(
        !test_program_at(t.pid),
        "a failed restore left PID {} behind",
        t.pid
    );
    fs::rename(&original, &path).unwrap();
    t.restore(&[]);
    t.pass();
}

#[test]
fn restore_pid_taken() {
    let mut t = Spawn::new("signals").quiet().start();
    t.dump(&["--leave-running"]);
    let dir = t.work.images();
    let before = snapshot(&dir);
    let (ok, err) = crust(&["restore", "-D", dir.to_str().unwrap()]);
    assert!(!ok);
    one_line_error(&err);
    assert!(
        err.contains(&t.pid.to_string()) && err.contains("taken") && err.contains("signals"),
        "{err}"
    );
    assert_eq!(snapshot(&dir), before);
    t.pass();
}

/// SIGKILL of crust at arbitrary moments of a long page drain: the parasite
/// returns the task to itself, the guardian removes it, and the task's
/// memory is intact.
#[test]
fn crust_killed_at_random_moments() {
    for delay_ms in [5u64, 30, 60, 120, 200] {
        let mut t = Spawn::new("bigmem").args(&["256"]).start();
        let maps = fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
        let fds = fd_list(t.pid);
        let mut dump = Command::new(CRUST)
            .args(["dump", "-t", &t.pid.to_string(), "-D"])
            .arg(t.work.images())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = dump.kill();
        let st = dump.wait().unwrap();
        eprintln!("crust killed after {delay_ms} ms: {st}");
        if st.success() || t.work.images().join("inventory.img").exists() {
            // The dump finished before the kill: the task is gone by design.
            let _ = t.take_original().map(|mut c| c.wait());
            continue;
        }
        assert_unharmed(t, &maps, &fds);
    }
}

/// A big task's page stream is written in two part files side by side
/// (one file takes a stream at the speed of one core). Both are needed and
/// checked: a damaged byte in the second, or the second missing, is
/// refused in one line and leaves the images as they were; whole again,
/// they restore a program that finds every word of its memory.
#[test]
fn big_memory_in_two_part_files() {
    let mut t = Spawn::new("bigmem").args(&["160"]).start();
    let pid = t.pid;
    t.dump(&[]);
    let dir = t.work.images();
    let first = dir.join(format!("pages-{pid}.img"));
    let second = dir.join(format!("pages-{pid}.part2.img"));
    let (a, b) = (
        fs::metadata(&first).unwrap().len(),
        fs::metadata(&second).unwrap().len(),
    );
    eprintln!("pages-{pid}.img {} MiB, part 2 {} MiB", a >> 20, b >> 20);
    assert!(
        a > 60 << 20 && b > 60 << 20,
        "the stream was not cut in two halves: {a} and {b} bytes"
    );
    let pristine = fs::read(&second).unwrap();
    let mut bad = pristine.clone();
    let i = bad.len() - 4096 * 3 + 17;
    bad[i] ^= 0x40;
    fs::write(&second, &bad).unwrap();
    let (ok, err) = crust(&["restore", "-D", dir.to_str().unwrap()]);
    assert!(!ok, "a damaged second part restored");
    one_line_error(&err);
    assert!(err.contains("pages") && err.contains("corrupt"), "{err}");
    assert!(!test_program_at(pid), "a failed restore left PID {pid}");
    assert_eq!(
        fs::read(&second).unwrap(),
        bad,
        "the restore changed the images"
    );
    fs::remove_file(&second).unwrap();
    let (ok, err) = crust(&["restore", "-D", dir.to_str().unwrap()]);
    assert!(!ok, "a restore without the second part succeeded");
    one_line_error(&err);
    assert!(err.contains("part2.img"), "{err}");
    fs::write(&second, &pristine).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&second, fs::Permissions::from_mode(0o600)).unwrap();
    t.restore(&[]);
    t.pass();
}

/// A dump returns once the images are durable and the tree is killed, not
/// once a big address space is torn down (as after criu's dump). A restore
/// started at once, as a script does, while the killed task still exits
/// and its parent reaps it, waits for the PID and restores a program that
/// finds every word of its memory.
#[test]
fn restore_at_once_after_dump_waits_for_the_dying_task() {
    let mut t = Spawn::new("bigmem").args(&["1024"]).start();
    let out = t.dump_with(&[], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The parent (this test) reaps the killed task when it is dead.
    let original = t.take_original().expect("the task is our child");
    let reaper = std::thread::spawn(move || {
        let mut c = original;
        c.wait().unwrap()
    });
    let exiting = fs::read_to_string(format!("/proc/{}/stat", t.pid)).ok();
    t.restore(&[]);
    reaper.join().unwrap();
    let log = fs::read_to_string(t.work.images().join("restore.log")).unwrap();
    eprintln!(
        "at the restore's start the killed task was {}; {}",
        if exiting.is_some() { "there" } else { "gone" },
        log.lines()
            .find(|l| l.contains("waited"))
            .unwrap_or("the restore did not wait")
    );
    t.pass();
}

/// A file the task had open changed size after the dump: the restore names
/// it and refuses; put back, the same images restore.
#[test]
fn restore_refuses_changed_file() {
    let mut t = Spawn::new("files").quiet().start();
    let pid = t.pid;
    t.dump(&[]);
    let f = t.work.0.join("files.a");
    let orig = fs::read(&f).unwrap();
    fs::write(&f, b"longer than it was at the dump").unwrap();
    let (ok, err) = crust(&["restore", "-D", t.work.images().to_str().unwrap()]);
    assert!(!ok);
    one_line_error(&err);
    assert!(
        err.contains("files.a") && err.contains("changed size"),
        "{err}"
    );
    // Back to its size, the same file (a new one would be a replaced file).
    fs::write(&f, orig).unwrap();
    let away = t.work.0.join("files.a.away");
    fs::rename(&f, &away).unwrap();
    let (ok, err) = crust(&["restore", "-D", t.work.images().to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("files.a") && err.contains("gone"), "{err}");
    assert!(!test_program_at(pid));
    fs::rename(&away, &f).unwrap();
    t.restore(&[]);
    t.pass();
}

/// `restore -d`: crust returns once the task runs; the task is no child of
/// crust and finishes on its own.
#[test]
fn restore_detached() {
    let mut t = Spawn::new("counter").start();
    let pid = t.pid;
    t.dump(&[]);
    let out = t.restore_cmd(&["-d"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(pid_alive(pid));
    let ppid = status_field(pid, "PPid");
    assert_ne!(ppid, std::process::id().to_string());
    assert_eq!(status_field(pid, "TracerPid"), "0");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_gone(pid);
    assert!(
        t.log_text().trim_end().ends_with("PASS"),
        "{}",
        t.log_text()
    );
}

/// A task in another mount namespace: the dump refuses, naming the task and
/// the reason, and the tree runs on.
#[test]
fn dump_refuses_other_namespace() {
    let mut t = Spawn::new("mntns").start();
    let out = t.dump_with(&[], &[]);
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success());
    one_line_error(&err);
    assert!(
        err.contains("mount namespace") && err.contains("mntns"),
        "{err}"
    );
    assert!(!t.work.images().join("inventory.img").exists());
    assert_eq!(status_field(t.pid, "TracerPid"), "0");
    t.pass();
}

/// A vfork() still in progress after the 2 s a dump waits for it: refused
/// with the reason, and the task goes on.
#[test]
fn dump_refuses_vfork_in_progress() {
    let mut t = Spawn::new("vfork").args(&["3000"]).start();
    let out = t.dump_with(&[], &[]);
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success());
    one_line_error(&err);
    assert!(err.contains("vfork"), "{err}");
    // Past the vfork, the task still works.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    t.pass();
}

/// Children sharing an fd table their parent no longer has (it unshared
/// after cloning them): refused, naming both, and the tree runs on.
#[test]
fn dump_refuses_fd_table_shared_by_siblings() {
    let mut t = Spawn::new("fdt_shared").args(&["siblings"]).start();
    let out = t.dump_with(&[], &[]);
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success());
    one_line_error(&err);
    assert!(
        err.contains("fd table") && err.contains("neither is the other's parent"),
        "{err}"
    );
    assert!(!t.work.images().join("inventory.img").exists());
    assert_eq!(status_field(t.pid, "TracerPid"), "0");
    t.pass();
}

/// A restore that fails after it made SysV objects again (a damaged pages
/// image, found in the forked task) removes them; the images are untouched
/// and restore once repaired.
#[test]
fn failed_restore_removes_the_sysv_objects_it_made() {
    let mut t = Spawn::new("sysv_ipc").quiet().start();
    let pid = t.pid;
    let (skey, qkey) = (0x5e50000 | (pid & 0xffff), 0x5e40000 | (pid & 0xffff));
    let gone = || {
        // SAFETY: semget/msgget lookups by key.
        unsafe { libc::semget(skey, 0, 0) < 0 && libc::msgget(qkey, 0) < 0 }
    };
    let remove = || {
        // SAFETY: lookups and IPC_RMID by key, of the test's own objects.
        unsafe {
            let s = libc::semget(skey, 0, 0);
            if s >= 0 {
                libc::semctl(s, 0, libc::IPC_RMID);
            }
            let q = libc::msgget(qkey, 0);
            if q >= 0 {
                libc::msgctl(q, libc::IPC_RMID, std::ptr::null_mut());
            }
        }
    };
    t.dump(&[]);
    remove();
    let dir = t.work.images();
    let pages = dir.join(format!("pages-{pid}.img"));
    let pristine = fs::read(&pages).unwrap();
    let mut bad = pristine.clone();
    let i = bad.len() - 100;
    bad[i] ^= 1;
    fs::write(&pages, &bad).unwrap();
    let before = snapshot(&dir);
    let (ok, err) = crust(&["restore", "-D", dir.to_str().unwrap()]);
    let left = !gone();
    remove();
    assert!(!ok, "a restore from a damaged pages image succeeded");
    one_line_error(&err);
    assert!(!left, "a failed restore left the SysV objects it made");
    assert_eq!(
        snapshot(&dir),
        before,
        "a failed restore changed the images"
    );
    assert!(
        !test_program_at(pid),
        "a failed restore left PID {pid} behind"
    );
    fs::write(&pages, &pristine).unwrap();
    t.restore(&[]);
    t.pass();
}

/// The processes crust left behind: any process whose environment holds
/// `CRUST_TEST_TAG=tag` (crust, and whatever it forked: its guardian).
fn tagged_processes(tag: &str) -> Vec<String> {
    let want = format!("CRUST_TEST_TAG={tag}");
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == want.as_bytes()))
        })
        .map(|pid| format!("{pid} ({})", status_field(pid, "Name")))
        .collect()
}

/// Waits until nothing of crust's tagged `tag` runs any more.
fn wait_nothing_of_crust_left(tag: &str) {
    let t = std::time::Instant::now();
    loop {
        let left = tagged_processes(tag);
        if left.is_empty() {
            return;
        }
        assert!(
            t.elapsed().as_secs() < 30,
            "processes of a killed crust still run: {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The lines of the firewall rules (nftables, iptables, ip6tables) that
/// name the network lock of the tree rooted at `root`.
fn lock_rules(root: i32) -> Vec<String> {
    let name = format!("crust-{root}");
    let mut out = Vec::new();
    for cmd in [
        &["nft", "list", "ruleset"][..],
        &["iptables-save"],
        &["ip6tables-save"],
    ] {
        let o = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains(&name))
                .map(|l| format!("{}: {l}", cmd[0])),
        );
    }
    out
}

/// Removes the network lock of the tree rooted at its PID when dropped, if
/// a failing test left it: only the test's own connections are in it.
struct LockCleanup(i32);

impl Drop for LockCleanup {
    fn drop(&mut self) {
        if lock_rules(self.0).is_empty() {
            return;
        }
        let name = format!("crust-{}", self.0);
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &name])
            .output();
        for prog in ["iptables", "ip6tables"] {
            for args in [
                &["-w", "-D", "INPUT", "-j", &name][..],
                &["-w", "-D", "OUTPUT", "-j", &name],
                &["-w", "-F", &name],
                &["-w", "-X", &name],
            ] {
                let _ = Command::new(prog).args(args).output();
            }
        }
    }
}

/// What a dump of the server of a `tcp_stream` pair, with crust killed
/// somewhere in it, must leave: once nothing of crust's runs, either the
/// tree runs on, untraced, its connection out of repair mode and
/// unlocked, or (crust was killed after the dump was complete and the tree
/// was to end) the tree is gone and its connection locked, and a restore
/// brings it back. Either way the stream then flows both ways, every byte
/// checked by both ends, and no rule of the lock is left.
fn after_killed_dump(
    mut server: net::StreamEnd,
    client: net::StreamEnd,
    tag: &str,
    what: &str,
    tree_ends: Option<bool>,
) {
    wait_nothing_of_crust_left(tag);
    let pid = server.task.pid;
    let complete = server.task.work.images().join("inventory.img").exists();
    // A tree that is to end was sent SIGKILL: give it time to die.
    let gone = complete && server.task.exits_within(std::time::Duration::from_secs(5));
    if let Some(want) = tree_ends {
        assert_eq!(gone, want, "{what}: the tree ended (or did not)");
    }
    if gone {
        assert!(
            net::lock_in_place(pid),
            "{what}: the tree is gone and its connection unlocked before the restore"
        );
        server.task.restore(&["--tcp-established"]);
    } else {
        let state = status_field(pid, "State");
        assert!(
            !state.is_empty() && !state.starts_with('Z'),
            "{what}: the task died: {}",
            server.task.log_text()
        );
        assert_eq!(
            status_field(pid, "TracerPid"),
            "0",
            "{what}: the task is still traced"
        );
        assert!(
            !state.starts_with('t') && !state.starts_with('T'),
            "{what}: the task is stopped: {state}"
        );
        let rules = lock_rules(pid);
        assert!(rules.is_empty(), "{what}: the lock is left: {rules:?}");
    }
    let (s0, c0) = (net::progress(&server), net::progress(&client));
    net::wait_flowing([(&server, s0), (&client, c0)], 8 << 20);
    let rules = lock_rules(pid);
    assert!(rules.is_empty(), "{what}: the lock is left: {rules:?}");
    net::end_stream(server, client);
}

/// crust SIGKILLed in a dump of a process holding an established TCP
/// connection (`--tcp-established`), at each stage after the network lock
/// is taken: while the connection is in repair mode, after it was read, with
/// the parasite in, with the images written, and once the dump is complete
/// (the tree then ends, and a restore brings it back), with either lock:
/// nothing is lost (see `after_killed_dump`), and nothing of crust's is
/// left running.
#[test]
fn crust_killed_mid_dump_of_a_connection() {
    for (stage, lock) in [
        ("locked", "nftables"),
        ("in-repair", "nftables"),
        ("in-repair", "iptables"),
        ("repaired", "nftables"),
        ("repaired", "iptables"),
        ("infected", "nftables"),
        ("pages-drained", "iptables"),
        ("before-inventory", "nftables"),
        ("kept", "nftables"),
        ("kept", "iptables"),
    ] {
        let what = format!("killed at {stage} ({lock})");
        eprintln!("{what}");
        let files = WorkDir::new("tcp-killed");
        let (mut server, client) =
            net::stream_pair(&files, "127.0.0.1", "127.0.0.1", &[], &[], &[]);
        let _cleanup = LockCleanup(server.task.pid);
        let tag = format!("{}-{stage}-{lock}", std::process::id());
        let out = server.task.dump_with(
            &["--tcp-established", "--network-lock", lock],
            &[("CRUST_FAULT", stage), ("CRUST_TEST_TAG", &tag)],
        );
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&out.status),
            Some(9),
            "{what}: crust was not killed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        after_killed_dump(server, client, &tag, &what, Some(stage == "kept"));
    }
}

/// A dump refused at its last step, by a post-dump action script, after the
/// lock was taken, the connection read in repair mode and the images
/// written: the lock is lifted, and the connection works on.
#[test]
fn dump_refused_by_post_dump_leaves_connection_working() {
    let files = WorkDir::new("tcp-post-dump");
    let (mut server, client) = net::stream_pair(&files, "127.0.0.1", "127.0.0.1", &[], &[], &[]);
    let _cleanup = LockCleanup(server.task.pid);
    let hook = files.0.join("hook.sh");
    fs::write(
        &hook,
        "#!/bin/sh\n[ \"$CRTOOLS_SCRIPT_ACTION\" != post-dump ]\n",
    )
    .unwrap();
    fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = server.task.dump_with(
        &[
            "--tcp-established",
            "--action-script",
            hook.to_str().unwrap(),
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the dump went through: {err}");
    assert!(err.contains("post-dump"), "{err}");
    let pid = server.task.pid;
    assert_eq!(
        status_field(pid, "TracerPid"),
        "0",
        "the task is still traced"
    );
    let rules = lock_rules(pid);
    assert!(
        rules.is_empty(),
        "the lock outlived the refused dump: {rules:?}"
    );
    let (s0, c0) = (net::progress(&server), net::progress(&client));
    net::wait_flowing([(&server, s0), (&client, c0)], 8 << 20);
    net::end_stream(server, client);
}

/// Whether any mapping of `pid` is registered with a userfaultfd for
/// write-protection (smaps VmFlags "uw"): write tracking left behind.
fn tracked_by_userfaultfd(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("VmFlags:"))
        .any(|l| l.split_whitespace().any(|f| f == "uw"))
}

/// What the fds of process `pid` (a number, as text) point at; empty if it
/// is gone.
fn fd_targets(pid: &str) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| fs::read_link(e.path()).ok())
                .map(|l| l.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn wait_untracked(pid: i32, what: &str) {
    let t0 = std::time::Instant::now();
    while tracked_by_userfaultfd(pid) {
        if t0.elapsed().as_secs() >= 10 {
            // What still holds it: the task's own fds, and the holders.
            let fds = fd_targets(&pid.to_string());
            let holders = Command::new("pgrep").args(["crust-tracker"]).output();
            let holders: Vec<String> = holders
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
                .split_whitespace()
                .map(|h| {
                    format!(
                        "{h}: fds {:?} wchan {} stack {}",
                        fd_targets(h),
                        fs::read_to_string(format!("/proc/{h}/wchan")).unwrap_or_default(),
                        fs::read_to_string(format!("/proc/{h}/stack"))
                            .unwrap_or_default()
                            .replace('\n', " | ")
                    )
                })
                .collect();
            panic!("{what}: write tracking left in the task; its fds {fds:?}; holders {holders:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!("{what}: untracked after {:?}", t0.elapsed());
}

/// A pre-dump killed at each of its stages leaves the task running,
/// unharmed, with its fds and mappings as before and no write tracking
/// (the userfaultfd the task made for it is closed by the guardian when
/// crust dies before closing it; crust's own copy dies with crust).
#[test]
fn crust_killed_mid_pre_dump_leaves_task_untracked() {
    for stage in [
        "seized",
        "infected",
        "uffd-in-task",
        "parasite-free",
        "armed",
        "pages-copied",
        "before-inventory",
    ] {
        let t = Spawn::new("predump").args(&["16"]).start();
        eprintln!("stage {stage}: task {}", t.pid);
        let maps = fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
        let fds = fd_list(t.pid);
        let out = pre_dump_cmd(t.pid, &t.work.0.join("pre1"), &[])
            .env("CRUST_FAULT", stage)
            .output()
            .unwrap();
        assert!(!out.status.success(), "stage {stage}: crust was not killed");
        assert!(
            !t.work.0.join("pre1/inventory.img").exists(),
            "stage {stage}: a killed pre-dump left an inventory"
        );
        wait_untracked(t.pid, stage);
        assert_unharmed(t, &maps, &fds);
    }
}

/// A final dump after a tracked pre-dump streams a big process's pages
/// while its smaps is read, the parasite in before its memory is read
/// (`collect::PagesAhead`): crust killed at each stage of it leaves the
/// process running and unharmed.
#[test]
fn crust_killed_mid_final_dump_streaming_ahead_leaves_task_unharmed() {
    for stage in [
        "infected",
        "pages-in-pipes",
        "pages-drained",
        "before-inventory",
    ] {
        let mut t = Spawn::new("predump").args(&["96"]).start();
        eprintln!("stage {stage}: task {}", t.pid);
        t.pre_dump_ok("pre1", &[]);
        let maps = fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
        let fds = fd_list(t.pid);
        let out = t.dump_with(
            &["--prev-images-dir", "../pre1", "--track-mem"],
            &[("CRUST_FAULT", stage)],
        );
        assert!(!out.status.success(), "stage {stage}: crust was not killed");
        if stage == "pages-drained" {
            let log = fs::read_to_string(t.work.images().join("dump.log")).unwrap();
            assert!(log.contains("while its VMAs were read"), "{log}");
        }
        assert_unharmed(t, &maps, &fds);
    }
}

/// A later pre-dump killed after it took over the tracking from the
/// first one's holder: the tracking is gone with it, and a final dump on
/// the first pre-dump stores every page again (said in its log), and
/// restores a process that verifies all its memory.
#[test]
fn tracking_lost_with_a_killed_pre_dump_falls_back_to_full_pages() {
    let mut t = Spawn::new("predump").args(&["16"]).start();
    let pid = t.pid;
    t.pre_dump_ok("pre1", &[]);
    assert!(
        tracked_by_userfaultfd(pid),
        "the pre-dump armed no tracking"
    );
    let out = pre_dump_cmd(
        pid,
        &t.work.0.join("pre2"),
        &["--prev-images-dir", "../pre1"],
    )
    .env("CRUST_FAULT", "armed")
    .output()
    .unwrap();
    assert!(!out.status.success(), "crust was not killed");
    wait_untracked(pid, "a killed second pre-dump");
    t.dump(&["--prev-images-dir", "../pre1", "--track-mem"]);
    let log = fs::read_to_string(t.work.images().join("dump.log")).unwrap();
    assert!(log.contains("no write tracking"), "{log}");
    let pages = fs::metadata(t.work.images().join(format!("pages-{pid}.img")))
        .unwrap()
        .len();
    assert!(
        pages >= 16 << 20,
        "only {pages} bytes stored without tracking"
    );
    t.restore(&[]);
    t.pass();
}

/// `--prev-images-dir` of another tree, a chain with a missing or corrupt
/// parent: refused in one line, the task untouched and still running; a
/// chain whose parent pages image is corrupt fails the restore.
#[test]
fn bad_chains_are_refused() {
    let mut a = Spawn::new("predump").args(&["8"]).start();
    let b = Spawn::new("predump").args(&["8"]).start();
    let w = &a.work.0.clone();
    a.pre_dump_ok("pre1", &[]);
    a.pre_dump_ok("pre2", &["--prev-images-dir", "../pre1"]);
    // Another tree's pre-dump.
    let other = w.join("other");
    let (done, err) = crust(&[
        "pre-dump",
        "-t",
        &b.pid.to_string(),
        "-D",
        other.to_str().unwrap(),
        "--prev-images-dir",
        "../pre2",
    ]);
    assert!(!done, "a pre-dump of another tree took its chain");
    one_line_error(&err);
    assert!(err.contains("another tree"), "{err}");
    assert!(pid_alive(b.pid) && pid_alive(a.pid));
    // A corrupt parent of the parent.
    let inv = w.join("pre1/inventory.img");
    let good = fs::read(&inv).unwrap();
    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 0xff;
    fs::write(&inv, &bad).unwrap();
    let (done, err) = crust(&[
        "pre-dump",
        "-t",
        &a.pid.to_string(),
        "-D",
        w.join("pre3").to_str().unwrap(),
        "--prev-images-dir",
        "../pre2",
    ]);
    assert!(!done, "a corrupt chain was taken");
    one_line_error(&err);
    assert!(err.contains("chain"), "{err}");
    // A missing one.
    fs::remove_file(&inv).unwrap();
    fs::rename(w.join("pre1"), w.join("gone")).unwrap();
    let (done, err) = crust(&[
        "dump",
        "-t",
        &a.pid.to_string(),
        "-D",
        w.join("final").to_str().unwrap(),
        "--prev-images-dir",
        "../pre2",
        "--track-mem",
    ]);
    assert!(!done, "a broken chain was taken");
    one_line_error(&err);
    assert!(err.contains("missing") && err.contains("chain"), "{err}");
    assert!(pid_alive(a.pid), "a refused dump killed the task");
    // Put back, the chain dumps; a corrupt page in it fails the restore.
    fs::rename(w.join("gone"), w.join("pre1")).unwrap();
    fs::write(&inv, &good).unwrap();
    a.dump(&["--prev-images-dir", "../pre2", "--track-mem"]);
    let pages = w.join(format!("pre1/pages-{}.img", a.pid));
    let f = fs::OpenOptions::new().write(true).open(&pages).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 8], 4096 * 300).unwrap();
    let (done, err) = crust(&["restore", "-D", a.work.images().to_str().unwrap()]);
    assert!(!done, "a corrupt parent image was restored");
    assert!(err.contains("checksum"), "{err}");
    drop(b);
}

/// The write tracking a pre-dump leaves ends with its images: once its
/// directory is removed, the holder drops it (within a second or two), and
/// a new pre-dump arms its own.
#[test]
fn tracking_ends_when_its_pre_dump_is_removed() {
    let t = Spawn::new("predump").args(&["8"]).start();
    let dir = t.work.0.join("pre1");
    let out = pre_dump_cmd(t.pid, &dir, &[]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        tracked_by_userfaultfd(t.pid),
        "the pre-dump armed no tracking"
    );
    fs::remove_dir_all(&dir).unwrap();
    wait_untracked(t.pid, "a removed pre-dump");
    let out = pre_dump_cmd(t.pid, &dir, &[]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = fs::read_to_string(dir.join("pre-dump.log")).unwrap();
    assert!(!log.contains("another userfaultfd"), "{log}");
    assert!(
        tracked_by_userfaultfd(t.pid),
        "the new pre-dump armed no tracking"
    );
    t.pass();
}

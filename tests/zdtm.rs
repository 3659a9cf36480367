//! zdtm: each test program checkpoints, restores and verifies itself.

mod common;
use common::*;
/// Dumps through `crust page-server`, TLS, migration between namespaces.
mod page_server;

#[test]
fn counter() {
    cycle("counter", &[]);
}

#[test]
fn env_argv() {
    cycle("env_argv", &["first arg", "second"]);
}

#[test]
fn maps() {
    cycle("maps", &[]);
}

/// AVX-512 state (zmm0-31, opmask k3, x87): only where the CPU has it.
#[test]
fn fpu_avx512() {
    if lacks_cpu("avx512f") {
        return;
    }
    cycle("fpu", &["avx512"]);
}

/// AVX state (the upper halves of ymm0-15, x87) on every CPU with AVX.
#[test]
fn fpu_avx() {
    if lacks_cpu("avx") {
        return;
    }
    cycle("fpu", &["avx"]);
}

/// A dump that lets the tree run on gives each thread back the vector
/// registers it held (the parasite's commands use xmm registers), twice,
/// to see a second dump find them whole too; the task checks them itself.
/// (`crust_killed_mid_dump_leaves_registers_unharmed` checks the same
/// without crust's detach to put them back.)
#[test]
fn leave_running_keeps_vector_registers() {
    if lacks_cpu("avx") {
        return;
    }
    let mut t = Spawn::new("fpu").args(&["avx", "threads"]).quiet().start();
    t.dump(&["--leave-running"]);
    t.dump(&["--leave-running"]);
    original_checks_itself(&mut t, "its registers changed under --leave-running");
}

/// Has the original task (left running by a dump) check itself, and
/// asserts that it passed; `what` says what a failure means.
fn original_checks_itself(t: &mut Task, what: &str) {
    let mut orig = t.take_original().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(t.pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = orig.wait().unwrap();
    assert!(st.success(), "the original failed its check: {what}: {st}");
}

/// A task asleep in nanosleep when a dump lets it run on sleeps its whole
/// time, and the call returns 0: the parasite's commands leave the
/// thread's restart block alone (an rt_sigreturn would reset it, and the
/// sleep would end with EINTR).
#[test]
fn leave_running_lets_a_sleep_go_on() {
    let mut t = Spawn::new("sleeping").args(&["whole"]).start();
    t.dump(&["--leave-running"]);
    original_checks_itself(&mut t, "its sleep was cut short by --leave-running");
}

/// The same in two threads, each with values of its own.
#[test]
fn fpu_avx_threads() {
    if lacks_cpu("avx") {
        return;
    }
    cycle("fpu", &["avx", "threads"]);
}

#[test]
fn signals() {
    cycle("signals", &[]);
}

#[test]
fn itimers() {
    cycle("itimers", &[]);
}

#[test]
fn itimer_fired_while_frozen() {
    cycle("itimer_fired", &[]);
}

#[test]
fn deleted_dirs_and_chroot() {
    cycle("ghost_dirs", &[]);
}

#[test]
fn zombies_killed_and_in_groups() {
    cycle("zombie_kinds", &[]);
}

#[test]
fn job_control_stop_signals() {
    cycle("stop_signals", &[]);
}

#[test]
fn sigtrap_action_kept() {
    cycle("sigtrap", &[]);
}

#[test]
fn guard_regions_and_droppable_memory() {
    cycle("guards", &[]);
}

/// Size of everything in `dir`, in bytes actually allocated.
fn disk_usage(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}

#[test]
fn files_without_a_name() {
    let mut t = Spawn::new("ghost_files").start();
    t.dump(&[]);
    let used = disk_usage(&t.work.images());
    assert!(
        used < 16 << 20,
        "the images take {used} bytes: the holes of the sparse file were stored"
    );
    t.restore(&[]);
    t.pass();
}

#[test]
fn deleted_file_linked_elsewhere_needs_link_remap() {
    let mut t = Spawn::new("ghost_files").args(&["linked"]).start();
    let err = t.dump_refused(&[]);
    assert!(err.contains("--link-remap"), "{err}");
    t.dump(&["--link-remap"]);
    let remapped = std::fs::read_dir(&t.work.0)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("link-remap")
        })
        .count();
    assert_eq!(remapped, 1, "the dump did not link the file back");
    t.restore(&["--link-remap"]);
    t.pass();
}

#[test]
fn shared_memory_seen_through_fd_and_private_map() {
    cycle("shmem_views", &[]);
}

#[test]
fn madvise_and_mlock() {
    cycle("madvise", &[]);
}

#[test]
fn seccomp_filters_and_strict_mode() {
    cycle("seccomp", &[]);
}

/// Filters threads share stay shared: a TSYNC filter added after restore
/// reaches every thread.
#[test]
fn seccomp_tsync() {
    cycle("seccomp_tsync", &[]);
}

#[test]
fn mappings_of_memfds_and_deleted_files() {
    cycle("ghost_maps", &[]);
}

#[test]
fn deleted_executable() {
    // A copy of its own, which it deletes: an upgraded binary under a
    // running program.
    let exe = std::env::temp_dir().join(format!("crust-deleted-exe-{}", std::process::id()));
    std::fs::copy(build("ghost_maps"), &exe).unwrap();
    let mut s = Spawn::new("ghost_maps").args(&["self-delete"]);
    s.program = Some(exe.clone());
    let mut t = s.start();
    assert!(!exe.exists(), "the test did not delete its binary");
    t.dump(&[]);
    t.restore(&[]);
    t.pass();
}

#[test]
fn fanotify_marks() {
    cycle("fanotify", &[]);
}

/// epoll targets added as fd numbers since closed or reused (by another
/// file, a locked one, or the set itself), a set shared with a child.
#[test]
fn epoll_targets_moved() {
    let mut t = Spawn::new("epoll_moved").start();
    t.dump(&["--file-locks"]);
    t.restore(&["--file-locks"]);
    t.pass();
}

/// A target held by no fd of the process that dumps the set: refused in
/// one line, the task left running.
#[test]
fn epoll_target_held_nowhere_is_refused() {
    let mut t = Spawn::new("epoll_moved").args(&["lost"]).start();
    let err = t.dump_refused(&[]);
    assert!(
        err.contains(&format!("PID {} epoll fd", t.pid)) && err.contains("held by no fd"),
        "{err}"
    );
}

/// /proc files of the tree's own tasks (stat, maps, an fdinfo, a thread's
/// comm, the net namespace) and a cwd in /proc of a task that died.
#[test]
fn proc_files_of_the_tree() {
    cycle("proc_files", &[]);
}

/// /proc files crust cannot reopen are refused at the dump in one line,
/// the task left running: one shared by two processes, one of the
/// holder's own thread.
#[test]
fn proc_files_refused() {
    for (mode, says) in [
        ("shared", "cannot share it between processes"),
        ("thread", "a file of its own thread"),
    ] {
        let mut t = Spawn::new("proc_files").args(&[mode]).start();
        let err = t.dump_refused(&[]);
        assert!(
            err.contains(says) && err.contains("/proc/"),
            "{mode}: {err}"
        );
    }
}

#[test]
fn inotify_watches() {
    cycle("inotify", &[]);
}

#[test]
fn pty_pair_in_tree() {
    let _ptys = pty_lock();
    cycle("pty", &[]);
}

#[test]
fn pty_queued_bytes_owner_dev_tty_and_hangup() {
    let _ptys = pty_lock();
    cycle("pty_queued", &[]);
}

#[test]
fn file_owners_and_sigio() {
    cycle("fown", &[]);
}

#[test]
fn pidfds_live_and_dead() {
    cycle("pidfds", &[]);
}

#[test]
fn zombie_without_second_sigchld() {
    cycle("zombie", &[]);
}

#[test]
fn group_with_dead_leader() {
    cycle("deadpgrp", &[]);
}

#[test]
fn sysv_shared_memory() {
    let t = Spawn::new("sysv_shm").start();
    // The keyed segment outlives a failed test: removed here whatever happens.
    struct RemoveSegment(libc::key_t);
    impl Drop for RemoveSegment {
        fn drop(&mut self) {
            // SAFETY: shmget/shmctl with plain arguments.
            unsafe {
                let id = libc::shmget(self.0, 0, 0);
                if id >= 0 {
                    libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
                }
            }
        }
    }
    let _segment = RemoveSegment(0x5ee0000 | (t.pid & 0xffff));
    let mut t = t;
    t.dump(&[]);
    t.restore(&[]);
    t.pass();
}

/// Removes the SysV semaphore set and message queue of these keys on drop.
struct RemoveSemMsg(libc::key_t, libc::key_t);
impl Drop for RemoveSemMsg {
    fn drop(&mut self) {
        // SAFETY: semget/msgget/..ctl with plain arguments.
        unsafe {
            let s = libc::semget(self.0, 0, 0);
            if s >= 0 {
                libc::semctl(s, 0, libc::IPC_RMID);
            }
            let q = libc::msgget(self.1, 0);
            if q >= 0 {
                libc::msgctl(q, libc::IPC_RMID, std::ptr::null_mut());
            }
        }
    }
}

#[test]
fn sysv_semaphores_and_queues() {
    let mut t = Spawn::new("sysv_ipc").start();
    let keys = RemoveSemMsg(0x5e50000 | (t.pid & 0xffff), 0x5e40000 | (t.pid & 0xffff));
    t.dump(&[]);
    // Gone, as after a reboot: the restore makes them again.
    drop(keys);
    let _keys = RemoveSemMsg(0x5e50000 | (t.pid & 0xffff), 0x5e40000 | (t.pid & 0xffff));
    t.restore(&[]);
    t.pass();
}

#[test]
fn fifos() {
    cycle("fifo", &[]);
}

#[test]
fn posix_timers() {
    cycle("posix_timers", &[]);
}

#[test]
fn files() {
    cycle("files", &[]);
}

#[test]
fn mid_sleep() {
    cycle("sleeping", &[]);
}

#[test]
fn twenty_cycles() {
    let mut t = Spawn::new("counter").start();
    for _ in 0..20 {
        t.dump(&[]);
        t.restore(&[]);
    }
    t.pass();
}

#[test]
fn python_mid_computation() {
    let n: u128 = 12_000_000;
    let mut s = Spawn::new("pyloop").args(&[
        root().join("zdtm/pyloop.py").to_str().unwrap(),
        &n.to_string(),
    ]);
    s.program = Some("python3".into());
    let mut t = s.start();
    std::thread::sleep(std::time::Duration::from_millis(400));
    t.dump(&[]);
    t.restore(&[]);
    // No SIGTERM: the program finishes its loop and exits by itself.
    let (st, log) = t.wait_exit();
    assert!(st.success(), "python exited with {st}: {log}");
    let want = (n - 1) * n * (2 * n - 1) / 6;
    assert_eq!(log.trim(), want.to_string(), "wrong result after restore");
}

#[test]
fn python_periodic_itimer() {
    let mut s = Spawn::new("pyitimer").args(&[root().join("zdtm/pyitimer.py").to_str().unwrap()]);
    s.program = Some("python3".into());
    let mut t = s.start();
    std::thread::sleep(std::time::Duration::from_millis(1000));
    t.dump(&[]);
    t.restore(&[]);
    t.pass();
}

/// sqlite3 in WAL mode, dumped while it builds an index (its sort runs
/// through deleted temporary files opened with O_NOFOLLOW) and restored:
/// the integrity check passes and the result is the uninterrupted run's.
#[test]
fn sqlite_wal_index_across_dump() {
    let script = root().join("zdtm/sqlite_index.sql");
    let run = |dir: &std::path::Path| {
        format!(
            "cd {} && SQLITE_TMPDIR={} exec sqlite3 test.db < {}",
            dir.display(),
            dir.display(),
            script.display()
        )
    };
    // The uninterrupted run, for the expected result.
    let reference = WorkDir::new("sqlite-reference");
    let out = std::process::Command::new("sh")
        .args(["-c", &run(&reference.0)])
        .env("ZDTM_READY", reference.0.join("ready"))
        .output()
        .expect("running sqlite3 (the README's setup installs it)");
    let want = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(want.contains("ok\n"), "sqlite3 itself failed: {want}");
    let mut s = Spawn::new("sqlite");
    s.program = Some("sh".into());
    let work_dir = std::env::temp_dir().join(format!("crust-sqlite-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir).unwrap();
    s.args = vec!["-c".into(), run(&work_dir)];
    let mut t = s.start();
    let t0 = std::time::Instant::now();
    while !t.log_text().contains("indexing") {
        assert!(
            t0.elapsed().as_secs() < 60,
            "sqlite3 never started its index"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(150));
    // sqlite holds POSIX locks on its database and WAL.
    t.dump(&["--file-locks"]);
    assert!(
        !t.log_text().contains("indexed"),
        "the dump came after the index was built; the test proves nothing"
    );
    assert!(
        t.work.images().join("ghosts.img").exists(),
        "sqlite3 held no deleted temporary file at the dump; the test proves nothing"
    );
    t.restore(&["--file-locks"]);
    let (st, log) = t.wait_exit();
    let _ = std::fs::remove_dir_all(&work_dir);
    assert!(st.success(), "sqlite3 exited with {st}: {log}");
    assert_eq!(
        log, want,
        "the restored run's output differs from an uninterrupted run"
    );
}

#[test]
fn leave_running() {
    // Quiet: the log file must keep the size it had at the dump, so the
    // restore after the original is gone can reopen it unchanged.
    let mut t = Spawn::new("maps").quiet().start();
    t.dump(&["--leave-running"]);
    assert!(pid_alive(t.pid));
    assert_eq!(
        status_field(t.pid, "TracerPid"),
        "0",
        "the original is still traced"
    );
    assert!(
        !status_field(t.pid, "State").starts_with('t'),
        "the original is stopped"
    );
    original_checks_itself(&mut t, "after --leave-running");
    wait_gone(t.pid);
    t.restore(&[]);
    t.pass();
}

#[test]
fn shell_job_mid_read() {
    let _ptys = pty_lock();
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave_path = nix::unistd::ttyname(&pty.slave).unwrap();
    let on_tty = |cmd: &mut std::process::Command| {
        let tty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&slave_path)
            .unwrap();
        cmd.stdin(tty.try_clone().unwrap())
            .stdout(tty.try_clone().unwrap())
            .stderr(tty);
        close_inherited_fds(cmd);
        // SAFETY: setsid and TIOCSCTTY are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                libc::ioctl(0, libc::TIOCSCTTY, 0);
                Ok(())
            });
        }
    };
    let work = WorkDir::new("ttyread");
    let ready = work.0.join("ready");
    let mut cmd = std::process::Command::new(build("ttyread"));
    cmd.env("ZDTM_READY", &ready).env("ZDTM_DIR", &work.0);
    on_tty(&mut cmd);
    let mut orig = cmd.spawn().unwrap();
    let pid = orig.id() as i32;
    let mut master = std::fs::File::from(pty.master);
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let out = out.clone();
        let mut m = master.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = m.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&out.lock().unwrap()).contains("PASS") {
                    break;
                }
            }
        })
    };
    let t0 = std::time::Instant::now();
    while !ready.exists() {
        assert!(t0.elapsed().as_secs() < 20);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Let it block in read(2).
    std::thread::sleep(std::time::Duration::from_millis(100));
    let images = work.images();
    let dump = std::process::Command::new(CRUST)
        .args([
            "dump",
            "-t",
            &pid.to_string(),
            "-D",
            images.to_str().unwrap(),
            "--shell-job",
        ])
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "dump: {}",
        String::from_utf8_lossy(&dump.stderr)
    );
    orig.wait().unwrap();
    wait_gone(pid);
    // Without --shell-job the restore refuses, naming the option.
    let refused = std::process::Command::new(CRUST)
        .args(["restore", "-D", images.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--shell-job"));
    let pidfile = work.0.join("restored.pid");
    let mut rcmd = std::process::Command::new(CRUST);
    rcmd.args([
        "restore",
        "-D",
        images.to_str().unwrap(),
        "--shell-job",
        "--pidfile",
        pidfile.to_str().unwrap(),
    ]);
    on_tty(&mut rcmd);
    let mut restorer = rcmd.spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !pidfile.exists() {
        if let Ok(Some(st)) = restorer.try_wait() {
            panic!("restore exited with {st}");
        }
        assert!(t0.elapsed().as_secs() < 20);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    master.write_all(b"hello after restore\n").unwrap();
    let st = restorer.wait().unwrap();
    reader.join().unwrap();
    let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    assert!(st.success(), "restored task failed: {st}: {text}");
    assert!(
        text.contains("got it") && text.contains("PASS"),
        "terminal output: {text}"
    );
    let _ = master.as_raw_fd();
}

#[test]
fn task_state() {
    cycle("task_state", &[]);
}

#[test]
fn ns_last_pid_fallback() {
    let mut t = Spawn::new("counter").start();
    t.dump(&[]);
    let mut cmd = t.restore_cmd(&[]);
    cmd.env("CRUST_NO_CLONE3", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    t.restore_with(cmd);
    t.pass();
}

#[test]
fn nonroot_creds() {
    cycle("nonroot", &[]);
}

#[test]
fn zero_pages_not_stored() {
    let mut t = Spawn::new("zeropages").start();
    let pid = t.pid;
    t.dump(&[]);
    let pages = std::fs::metadata(t.work.images().join(format!("pages-{pid}.img")))
        .unwrap()
        .len();
    assert!(
        pages < 4 << 20,
        "64 MiB of zero pages took {pages} bytes of image"
    );
    t.restore(&[]);
    t.pass();
}

/// A region backed by transparent huge pages is backed by huge pages again
/// right after the restore: premapped at the same offset within a huge
/// page, given its MADV_HUGEPAGE before the fill, and moved whole.
#[test]
fn huge_pages_come_back_as_huge_pages() {
    cycle("thp", &[]);
}

#[test]
fn threads() {
    cycle("threads", &[]);
}

#[test]
fn python_threads() {
    let per: u128 = 4_000_000;
    let mut s = Spawn::new("pythreads").args(&[
        root().join("zdtm/pythreads.py").to_str().unwrap(),
        &per.to_string(),
    ]);
    s.program = Some("python3".into());
    let mut t = s.start();
    std::thread::sleep(std::time::Duration::from_millis(300));
    t.dump(&[]);
    t.restore(&[]);
    let (st, log) = t.wait_exit();
    assert!(st.success(), "python exited with {st}: {log}");
    let n = 8 * per;
    let want = (n - 1) * n * (2 * n - 1) / 6;
    assert_eq!(log.trim(), want.to_string(), "wrong result after restore");
}

#[test]
fn process_tree() {
    cycle("tree", &[]);
}

#[test]
fn sched_and_prctl() {
    cycle("sched_prctl", &[]);
}

#[test]
fn pending_signals() {
    cycle("pending", &[]);
}

#[test]
fn stopped_task() {
    cycle("stopped", &[]);
}

#[test]
fn pipes() {
    cycle("pipes", &[]);
}

/// A real pipeline, `gen | gzip | gzip -d | sha256sum`, under sh,
/// checkpointed mid-stream: the digest after restore matches the digest of
/// the same stream run straight.
#[test]
fn shell_pipeline() {
    let producer = build("gen");
    let straight = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{} 24 | sha256sum", producer.display()))
        .env_remove("ZDTM_READY")
        .output()
        .unwrap();
    let want = String::from_utf8_lossy(&straight.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let mut s = Spawn::new("pipeline");
    s.program = Some("sh".into());
    s.args = vec![
        "-c".into(),
        format!(
            "{} 24 | gzip -1 | gzip -dc | sha256sum > \"$ZDTM_DIR/digest\"",
            producer.display()
        ),
    ];
    let mut t = s.start();
    std::thread::sleep(std::time::Duration::from_millis(200));
    t.dump(&[]);
    t.restore(&[]);
    let (st, log) = t.wait_exit();
    assert!(
        st.success(),
        "the pipeline failed after restore: {st}: {log}"
    );
    let got = std::fs::read_to_string(t.work.0.join("digest")).unwrap();
    assert_eq!(
        got.split_whitespace().next().unwrap(),
        want,
        "the stream changed across the checkpoint"
    );
}

/// Writes a small C project whose build takes a few seconds at -j2.
fn write_make_project(dir: &std::path::Path) {
    for i in 1..=6 {
        let mut src = format!("int f{i}(int x) {{ int r = x;\n");
        for k in 0..1500 {
            src += &format!("  r = r * {} + {k} ^ (r >> {});\n", k % 7 + 3, k % 5 + 1);
        }
        src += "  return r; }\n";
        std::fs::write(dir.join(format!("f{i}.c")), src).unwrap();
    }
    std::fs::write(
        dir.join("main.c"),
        "#include <stdio.h>\nint f1(int),f2(int),f3(int),f4(int),f5(int),f6(int);\n\
         int main(void){ printf(\"%d\\n\", f1(1)+f2(2)+f3(3)+f4(4)+f5(5)+f6(6)); return 0; }\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("Makefile"),
        "prog: main.o f1.o f2.o f3.o f4.o f5.o f6.o\n\tcc -o $@ $^\n\
         main.o: main.c\n\ttouch \"$$ZDTM_READY\"\n\tcc -O2 -c -o $@ $<\n\
         %.o: %.c\n\tcc -O2 -c -o $@ $<\n",
    )
    .unwrap();
}

/// `make -j2` of a small C project, checkpointed mid-build (make, its
/// jobserver pipe, the shells and compilers under it): the build finishes
/// after restore and the program it made gives the right answer.
#[test]
fn make_j2() {
    let reference = WorkDir::new("make-ref");
    write_make_project(&reference.0);
    let st = std::process::Command::new("make")
        .args(["-s", "-j2", "-C"])
        .arg(&reference.0)
        .env("ZDTM_READY", reference.0.join("ready"))
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "reference build: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let want = std::process::Command::new(reference.0.join("prog"))
        .output()
        .unwrap()
        .stdout;

    let mut s = Spawn::new("make");
    s.program = Some("sh".into());
    s.args = vec!["-c".into(), "cd \"$ZDTM_DIR\" && exec make -s -j2".into()];
    // The project must exist before make starts: write it into the work dir
    // the runner will use, through a pre-start hook.
    s.before_start = Some(Box::new(write_make_project));
    let mut t = s.start();
    std::thread::sleep(std::time::Duration::from_millis(500));
    t.dump(&[]);
    t.restore(&[]);
    let (st, log) = t.wait_exit();
    assert!(st.success(), "make failed after restore: {st}: {log}");
    let got = std::process::Command::new(t.work.0.join("prog"))
        .output()
        .unwrap()
        .stdout;
    assert_eq!(got, want, "the program built across the checkpoint differs");
}

/// A vfork() in progress when the dump starts (a shell or make starting a
/// command): the dump waits for it to end, and the parent, restored, runs
/// on.
#[test]
fn dump_waits_for_a_vfork() {
    let mut t = Spawn::new("vfork").args(&["300"]).start();
    t.dump(&[]);
    t.restore(&[]);
    t.pass();
}

#[test]
fn event_fds() {
    cycle("eventfds", &[]);
}

/// AIO contexts: the ring at its address with its head, tail and unreaped
/// events; new requests complete after them.
#[test]
fn aio_rings() {
    cycle("aio_ring", &[]);
}

#[test]
fn file_shared_by_processes() {
    cycle("shared_file", &[]);
}

#[test]
fn ghost_memfd_opath() {
    cycle("ghost", &[]);
}

/// File locks: refused without --file-locks (the task keeps running), taken
/// along and held again with it.
#[test]
fn file_locks() {
    let mut t = Spawn::new("locks").start();
    let err = t.dump_refused(&[]);
    assert!(
        err.contains("--file-locks") && err.contains("lock"),
        "{err}"
    );
    t.dump(&["--file-locks"]);
    // The restore takes locks only when told to, as criu does.
    let out = t.restore_cmd(&[]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a restore without -l was not refused"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--file-locks"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.restore(&["--file-locks"]);
    t.pass();
}

/// Leases, held and being broken by openers of the tree: refused without
/// --file-locks (the task keeps running), held again with it, the broken
/// ones still breaking, with no second break signal.
#[test]
fn file_leases() {
    let mut t = Spawn::new("leases").start();
    let err = t.dump_refused(&[]);
    assert!(
        err.contains("--file-locks") && err.contains("lease"),
        "{err}"
    );
    t.dump(&["--file-locks"]);
    t.restore(&["--file-locks"]);
    t.pass();
}

/// A copy restored with `--pid-ns`: its crust, and its PID outside the
/// namespace. Dropping it kills the namespace's init (and with it the copy).
struct NsCopy {
    crust: Option<std::process::Child>,
    outer: i32,
}

impl NsCopy {
    fn start(t: &Task, name: &str, extra: &[&str]) -> NsCopy {
        use std::process::{Command, Stdio};
        let pidfile = t.work.0.join(format!("{name}.pid"));
        let mut crust = Command::new(CRUST)
            .arg("restore")
            .arg("-n")
            .arg("-D")
            .arg(t.work.images())
            .args(["-o", &format!("{name}.log"), "-v4", "--pidfile"])
            .arg(&pidfile)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        while !pidfile.exists() {
            if let Ok(Some(st)) = crust.try_wait()
                && !st.success()
            {
                panic!(
                    "crust restore -n exited with {st}: {}",
                    std::fs::read_to_string(t.work.images().join(format!("{name}.log")))
                        .unwrap_or_default()
                );
            }
            assert!(t0.elapsed().as_secs() < 30, "restore -n did not finish");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let outer: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let copy = NsCopy {
            crust: Some(crust),
            outer,
        };
        assert_ne!(outer, t.pid, "the copy took the original's PID outside");
        let nspid = status_field(outer, "NSpid");
        assert_eq!(
            nspid.split_whitespace().collect::<Vec<_>>(),
            [outer.to_string(), t.pid.to_string()],
            "the copy does not have its original PID inside its namespace"
        );
        assert_eq!(status_field(outer, "TracerPid"), "0");
        copy
    }

    fn init(&self) -> i32 {
        status_field(self.outer, "PPid").parse().unwrap_or(0)
    }

    fn terminate(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.outer),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }
}

impl Drop for NsCopy {
    fn drop(&mut self) {
        let init = self.init();
        if init > 1 && pid_alive(self.outer) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(init),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(mut c) = self.crust.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn pid_ns_restores_twice_beside_the_original() {
    let mut t = Spawn::new("pidns").start();
    t.dump(&["--leave-running"]);
    // Both copies run at once, while the original still holds the PIDs.
    let mut waited = NsCopy::start(&t, "waited", &[]);
    let detached = NsCopy::start(&t, "detached", &["-d"]);
    assert_ne!(waited.outer, detached.outer);
    assert_eq!(
        status_field(detached.init(), "Name"),
        "crust-init",
        "the namespace's init is not crust's"
    );
    // Each copy checks itself and writes its verdict at the start of the
    // shared log (it printed nothing before): one at a time.
    detached.terminate();
    wait_gone(detached.outer);
    assert_eq!(t.log_text(), "PASS\n", "the detached copy failed its check");
    std::fs::write(&t.log, "").unwrap();
    waited.terminate();
    let st = waited.crust.take().unwrap().wait().unwrap();
    assert!(
        st.success(),
        "the copy failed its own check: {st}: {}",
        t.log_text()
    );
    // crust exits with the root's status: only after the root is gone.
    assert!(!test_program_at(waited.outer));
    t.pass();
}

/// RSS and PSS (KiB) summed over a process and its children.
fn tree_rss_pss(root: i32) -> (u64, u64) {
    let children =
        std::fs::read_to_string(format!("/proc/{root}/task/{root}/children")).unwrap_or_default();
    let pids =
        std::iter::once(root).chain(children.split_whitespace().filter_map(|p| p.parse().ok()));
    let (mut rss, mut pss) = (0, 0);
    for pid in pids {
        let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        let field = |k: &str| -> u64 {
            s.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        rss += field("Rss:");
        pss += field("Pss:");
    }
    (rss, pss)
}

/// A private file mapping whose copied-on-write pages a parent and child
/// share: still one frame for both after restore (the child starts from
/// the parent's copy), each with its own changes and dropped pages.
#[test]
fn cow_file_mapping_stays_shared() {
    cycle("cow_file", &[]);
}

#[test]
fn cow_memory_stays_shared_with_children() {
    const MIB: u64 = 128;
    let mut t = Spawn::new("cow").args(&[&MIB.to_string()]).start();
    let (rss0, pss0) = tree_rss_pss(t.pid);
    t.dump(&[]);
    // Pages the children share with the parent are stored once.
    let stored: u64 = std::fs::read_dir(t.work.images())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    eprintln!("pages images of the tree: {} MiB", stored >> 20);
    assert!(
        stored < (MIB << 20) * 3 / 2,
        "the children's shared pages were stored again: {} MiB of pages images",
        stored >> 20
    );
    t.restore(&[]);
    let (rss1, pss1) = tree_rss_pss(t.pid);
    eprintln!(
        "parent with {MIB} MiB and 4 children: RSS {} MiB, PSS {} MiB before the dump; RSS {} MiB, PSS {} MiB after the restore",
        rss0 >> 10,
        pss0 >> 10,
        rss1 >> 10,
        pss1 >> 10
    );
    // Copies instead of sharing would make the PSS about 5 x MIB.
    assert!(
        pss1 <= pss0 + (MIB << 10) / 2,
        "the tree's memory is no longer shared: PSS {} MiB before, {} MiB after",
        pss0 >> 10,
        pss1 >> 10
    );
    t.pass();
}

/// A tmux server of the test's own (`tmux -L NAME`), killed on drop with
/// every pane in it; `pid` is a process the test also ends if still there.
struct Tmux {
    socket: String,
    pid: Option<i32>,
}

impl Tmux {
    fn new() -> Self {
        // One server per test: tests of this binary run in parallel.
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Tmux {
            socket: format!("crust-test-{}-{seq}", std::process::id()),
            pid: None,
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("running tmux (the README's setup installs it)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `cmd` in a new 100x30 session; returns the pane's process.
    fn new_session(&self, session: &str, cmd: &str) -> i32 {
        self.run(&[
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "100",
            "-y",
            "30",
            cmd,
        ]);
        self.run(&["list-panes", "-t", session, "-F", "#{pane_pid}"])
            .trim()
            .parse()
            .unwrap()
    }

    /// Types `line` and Enter into the pane of `session`.
    fn type_line(&self, session: &str, line: &str) {
        self.run(&["send-keys", "-t", session, line, "Enter"]);
    }

    /// Waits until the pane of `session` shows a line for which `want` holds.
    fn wait_for(&self, session: &str, what: &str, want: impl Fn(&str) -> bool) -> String {
        let t0 = std::time::Instant::now();
        loop {
            let screen = self.run(&["capture-pane", "-p", "-t", session]);
            if screen.lines().any(&want) {
                return screen;
            }
            assert!(
                t0.elapsed().as_secs() < 30,
                "no {what} in tmux session {session}:\n{screen}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .stderr(std::process::Stdio::null())
            .status();
        if let Some(pid) = self.pid.filter(|&p| pid_alive(p)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// `crust dump --shell-job` of `pid` into `work`'s images; waits until the
/// dumped task is gone.
fn dump_shell_job(pid: i32, work: &WorkDir) {
    // Let the terminal settle after the last keys typed.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let out = std::process::Command::new(CRUST)
        .args(["dump", "-t", &pid.to_string(), "--shell-job", "-D"])
        .arg(work.images())
        .args(["-o", "dump.log", "-v4"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "crust dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_gone(pid);
}

/// Waits until `pid` runs again, restored and let go by crust.
fn wait_restored(pid: i32) {
    let t0 = std::time::Instant::now();
    while !pid_alive(pid) || status_field(pid, "TracerPid") != "0" {
        assert!(t0.elapsed().as_secs() < 30, "{pid} was not restored");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
}

#[test]
fn interactive_python_in_tmux_shell_job() {
    let _ptys = pty_lock();
    let mut tmux = Tmux::new();
    let work = WorkDir::new("tmux");
    let pid = tmux.new_session("orig", "python3 -q");
    tmux.pid = Some(pid);
    tmux.wait_for("orig", "python prompt", |l| l.starts_with(">>>"));
    tmux.type_line("orig", "x = 6");
    tmux.wait_for("orig", "second prompt", |l| l.starts_with(">>> x = 6"));
    dump_shell_job(pid, &work);
    // Restored into another terminal, which answers the next line typed.
    let restore = format!(
        "{CRUST} restore --shell-job -D {} -o restore.log -v4; echo restore-exit=$?; sleep 60",
        work.images().display()
    );
    tmux.new_session("back", &restore);
    wait_restored(pid);
    tmux.type_line("back", "x * 7");
    tmux.wait_for("back", "answer 42", |l| l.trim() == "42");
    tmux.type_line("back", "exit()");
    let screen = tmux.wait_for("back", "exit status 0", |l| l.starts_with("restore-exit="));
    assert!(
        screen.lines().any(|l| l == "restore-exit=0"),
        "crust restore did not exit with python's status 0:\n{screen}"
    );
}

/// A program that put its terminal in raw mode, dumped with --shell-job and
/// restored into another pane: the new terminal gets the raw mode, so a
/// single key typed without Enter reaches the program at once, unechoed.
#[test]
fn raw_mode_terminal_program_shell_job() {
    let _ptys = pty_lock();
    let mut tmux = Tmux::new();
    let work = WorkDir::new("tmux-raw");
    let script = root().join("zdtm/rawkey.py");
    let pid = tmux.new_session("orig", &format!("python3 {}", script.display()));
    tmux.pid = Some(pid);
    tmux.wait_for("orig", "raw mode", |l| l.starts_with("raw and ready"));
    tmux.run(&["send-keys", "-t", "orig", "a"]);
    tmux.wait_for("orig", "the first key", |l| l == "key a");
    dump_shell_job(pid, &work);
    let restore = format!(
        "{CRUST} restore --shell-job -D {} -o restore.log -v4; echo restore-exit=$?; sleep 60",
        work.images().display()
    );
    tmux.new_session("back", &restore);
    wait_restored(pid);
    // No Enter: a terminal in cooked mode would hold the key back.
    tmux.run(&["send-keys", "-t", "back", "b"]);
    let screen = tmux.wait_for("back", "the key typed after restore", |l| l == "key b");
    assert!(
        !screen.lines().any(|l| l.starts_with('b')),
        "the terminal echoed the key:\n{screen}"
    );
    tmux.run(&["send-keys", "-t", "back", "q"]);
    let screen = tmux.wait_for("back", "exit status 0", |l| l.starts_with("restore-exit="));
    assert!(
        screen.lines().any(|l| l == "restore-exit=0"),
        "the program did not end well:\n{screen}"
    );
}

/// A whole job (sh and the python it runs) started from an interactive
/// shell, dumped with --shell-job and restored from another interactive
/// shell: it gets that terminal's foreground, answers, and ends through
/// crust, after which the shell has its prompt back.
#[test]
fn shell_job_of_two_processes_in_interactive_bash() {
    let _ptys = pty_lock();
    let mut tmux = Tmux::new();
    let work = WorkDir::new("tmuxjob");
    let bash = tmux.new_session("orig", "bash --norc -i");
    tmux.wait_for("orig", "bash prompt", |l| {
        l.contains('#') || l.contains('$')
    });
    tmux.run(&[
        "send-keys",
        "-t",
        "orig",
        "sh -c 'python3 -q; echo job-done'",
        "Enter",
    ]);
    tmux.wait_for("orig", "python prompt", |l| l.starts_with(">>>"));
    let job: i32 = std::fs::read_to_string(format!("/proc/{bash}/task/{bash}/children"))
        .unwrap()
        .split_whitespace()
        .next()
        .expect("bash runs the job")
        .parse()
        .unwrap();
    tmux.pid = Some(job);
    tmux.type_line("orig", "x = 6");
    tmux.wait_for("orig", "second prompt", |l| l.starts_with(">>> x = 6"));
    dump_shell_job(job, &work);
    tmux.new_session("back", "bash --norc -i");
    tmux.wait_for("back", "bash prompt", |l| {
        l.contains('#') || l.contains('$')
    });
    let restore = format!(
        "{CRUST} restore --shell-job -D {} -o restore.log -v4; echo restore-exit=$?",
        work.images().display()
    );
    tmux.type_line("back", &restore);
    wait_restored(job);
    tmux.type_line("back", "x * 7");
    tmux.wait_for("back", "answer 42", |l| l.trim() == "42");
    tmux.type_line("back", "exit()");
    let screen = tmux.wait_for("back", "crust's exit status", |l| {
        l.starts_with("restore-exit=")
    });
    assert!(
        screen.lines().any(|l| l == "job-done") && screen.lines().any(|l| l == "restore-exit=0"),
        "the job did not finish through crust:\n{screen}"
    );
}

/// fd tables and fs contexts shared by parent and child (CLONE_FILES,
/// CLONE_FS), two levels deep, beside a forked copy of a shared table.
#[test]
fn fdt_shared() {
    cycle("fdt_shared", &[]);
}

/// Unix sockets: a stream pair with bytes queued both ways and one end
/// shut down, made by a child with other ids (SO_PEERCRED); seqpacket
/// records; a listener on a path with a connection accepted and one not;
/// abstract datagrams queued from two senders, one closed since (each read
/// with its sender's name); a socket bound to a path that was unlinked.
#[test]
fn unix_sockets() {
    cycle("unix_sockets", &[]);
}

/// Files in flight in unix sockets (SCM_RIGHTS, not received yet): a pipe,
/// a regular file with its offset, a socket with its own queue and a memfd.
#[test]
fn unix_files_in_flight() {
    cycle("unix_scm", &[]);
}

/// python3 with a socketserver.UnixStreamServer, a connection whose answer
/// waits unread across the dump, and a multiprocessing worker on a Pipe:
/// all answer after restore.
#[test]
fn python_unix_server() {
    let mut s = Spawn::new("pyunix").args(&[root().join("zdtm/pyunix.py").to_str().unwrap()]);
    s.program = Some("python3".into());
    let mut t = s.start();
    t.dump(&[]);
    t.restore(&[]);
    t.pass();
}

/// A unix socket connected outside the tree (to a socket this test holds)
/// makes the dump refuse in one line that names the peer's holder, and the
/// tree runs on as it was; once only a datagram socket connected to a
/// named socket outside is left, `--ext-unix-sk` dumps it and the restore
/// (only with `--ext-unix-sk`) connects it to that name again.
#[test]
fn unix_peer_outside_the_tree() {
    use std::os::unix::net::{UnixDatagram, UnixListener};
    let dir = WorkDir::new("unix_ext_peers");
    let (dpath, spath) = (dir.0.join("outside.sock"), dir.0.join("outside-l.sock"));
    let outside = UnixDatagram::bind(&dpath).unwrap();
    let listener = UnixListener::bind(&spath).unwrap();
    let mut t = Spawn::new("unix_ext")
        .args(&[dpath.to_str().unwrap(), spath.to_str().unwrap()])
        .start();
    let (conn, _) = listener.accept().unwrap();
    let me = std::process::id();
    for extra in [&[][..], &["--ext-unix-sk"][..]] {
        let err = t.dump_refused(extra);
        assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
        assert!(
            err.contains(&format!("held by PID {me}")) && err.contains("outside the dumped tree"),
            "the refusal does not name the peer's holder (PID {me}): {err}"
        );
    }
    // The stream's peer goes: the task's end reads the end of it later.
    drop(conn);
    t.dump(&["--ext-unix-sk"]);
    let out = t.restore_cmd(&[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--ext-unix-sk"),
        "a restore without --ext-unix-sk: {err}"
    );
    t.restore(&["--ext-unix-sk"]);
    t.pass();
    let mut buf = [0u8; 16];
    outside
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let n = outside.recv(&mut buf).unwrap();
    assert_eq!(
        &buf[..n],
        b"after",
        "the restored socket did not send outside"
    );
}

/// Packet sockets: a raw socket with TPACKET_V2 rings mapped shared (a
/// frame sent on lo after the restore lands in the mapping), a datagram
/// socket with its options, a membership added twice, a promiscuous one
/// and a fanout group of two, an unbound raw socket with vnet headers and
/// SOCK_PACKET sockets, bound and not.
#[test]
fn packet_sockets() {
    cycle("packet_sockets", &[]);
}

/// A packet socket bound to an interface that is gone by the restore: the
/// restore refuses in one line that names the interface.
#[test]
fn packet_socket_on_a_missing_interface() {
    struct Veth(String);
    impl Drop for Veth {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.0])
                .status();
        }
    }
    let name = format!("crpk{}", std::process::id() % 100_000);
    let made = std::process::Command::new("ip")
        .args(["link", "add", &name, "type", "veth", "peer", "name"])
        .arg(format!("{name}p"))
        .status()
        .unwrap();
    if !made.success() {
        eprintln!("skipped: no veth pair could be made");
        return;
    }
    let veth = Veth(name.clone());
    let mut t = Spawn::new("packet_sockets").args(&["bind", &name]).start();
    t.dump(&[]);
    drop(veth);
    let out = t.restore_cmd(&[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "restored without {name}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(
        err.contains(&name) && err.contains("missing"),
        "the refusal does not name {name}: {err}"
    );
    assert!(!test_program_at(t.pid), "a refused restore left the task");
}

/// Netlink sockets: usersock sockets bound to a chosen port id and to
/// groups, bound by the kernel and connected, never bound, never bound but
/// in a group; a route socket in groups above 32 with its options, which
/// gets an address event after the restore.
#[test]
fn netlink_sockets() {
    let _groups = netlink_groups_lock();
    cycle("netlink_sockets", &[]);
}

/// A netlink socket holding a message not read yet makes the dump refuse
/// in one line, and leaves the message for the task to read.
#[test]
fn netlink_socket_with_a_message_queued() {
    let _groups = netlink_groups_lock();
    let mut t = Spawn::new("netlink_sockets").args(&["queued"]).start();
    let err = t.dump_refused(&[]);
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(
        err.contains("netlink") && err.contains("not read yet"),
        "the refusal does not say why: {err}"
    );
    t.pass();
}

/// Inet sockets without connections: listeners with their options, UDP
/// bound and connected, ICMP ping and raw sockets, each used after the
/// restore.
#[test]
fn inet_sockets_and_options() {
    let _ping = net::PingGroups::allow_all();
    cycle("inet_sockets", &[]);
}

/// A connection streaming both ways across a dump of one end, the other
/// end outside the tree: not a byte lost, repeated or changed, and the
/// stream flows on after the restore.
fn stream_across_dump(dump_server: bool) {
    let files = WorkDir::new("tcp-stream");
    let (server, client) = net::stream_pair(&files, "127.0.0.1", "127.0.0.1", &[], &[], &[]);
    let (mut dumped, peer) = if dump_server {
        (server, client)
    } else {
        (client, server)
    };
    dumped.task.dump(&["--tcp-established"]);
    let (d0, p0) = (net::progress(&dumped), net::progress(&peer));
    dumped.task.restore(&["--tcp-established"]);
    net::wait_flowing([(&dumped, d0), (&peer, p0)], 8 << 20);
    net::end_stream(dumped, peer);
}

#[test]
fn tcp_stream_across_dump_of_server() {
    stream_across_dump(true);
}

#[test]
fn tcp_stream_across_dump_of_client() {
    stream_across_dump(false);
}

/// A dump refused after the connection was put in repair mode (an MPTCP
/// socket comes after it): the tree runs on, its connection out of repair
/// mode and unlocked, and the stream goes on unharmed.
#[test]
fn refused_dump_leaves_connection_working() {
    let files = WorkDir::new("tcp-stream-refused");
    let (mut server, client) =
        net::stream_pair(&files, "127.0.0.1", "127.0.0.1", &[], &[], &["mptcp"]);
    let out = server.task.dump_with(&["--tcp-established"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an MPTCP socket was dumped");
    assert!(
        err.contains(&format!("PID {} fd 100", server.task.pid)) && err.contains("MPTCP"),
        "{err}"
    );
    assert!(
        !net::lock_in_place(server.task.pid),
        "the network lock outlived the refused dump"
    );
    let (s0, c0) = (net::progress(&server), net::progress(&client));
    net::wait_flowing([(&server, s0), (&client, c0)], 8 << 20);
    net::end_stream(server, client);
}

/// Without --tcp-established a connection is refused in one line naming
/// its two ends, and the tree runs on.
#[test]
fn connection_refused_without_tcp_established() {
    let files = WorkDir::new("tcp-stream-plain");
    let (mut server, client) = net::stream_pair(&files, "127.0.0.1", "127.0.0.1", &[], &[], &[]);
    let out = server.task.dump_with(&[], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let port = std::fs::read_to_string(files.0.join("port")).unwrap();
    assert!(
        err.lines().count() == 1
            && err.contains("--tcp-established")
            && err.contains(&format!("127.0.0.1:{} -> 127.0.0.1:", port.trim())),
        "{err}"
    );
    let (s0, c0) = (net::progress(&server), net::progress(&client));
    net::wait_flowing([(&server, s0), (&client, c0)], 4 << 20);
    net::end_stream(server, client);
}

/// redis-server with keys written before the dump, and a client whose
/// connection crosses the dump and gets its answers after the restore.
#[test]
fn redis_client_connection_across_dump() {
    let port = net::free_port();
    let mut t = net::server(
        "redis",
        format!("redis-server --port {port} --bind 127.0.0.1 --save '' --appendonly no"),
    )
    .start();
    let mut client = net::Redis::connect(port);
    for i in 0..200 {
        assert_eq!(
            client.cmd(&["SET", &format!("key{i}"), &format!("value{i}")]),
            "+OK"
        );
    }
    t.dump(&["--tcp-established"]);
    t.restore(&["--tcp-established"]);
    for i in 0..200 {
        assert_eq!(
            client.cmd(&["GET", &format!("key{i}")]),
            format!("value{i}")
        );
    }
    assert_eq!(client.cmd(&["INCR", "counter"]), ":1");
    assert_eq!(net::Redis::connect(port).cmd(&["GET", "key7"]), "value7");
    let _ = client.cmd(&["SHUTDOWN", "NOSAVE"]);
    let (st, log) = t.wait_exit();
    assert!(st.success(), "redis-server exited with {st}: {log}");
}

/// nginx.conf for a server on `port` serving `dir`; `workers`: a master
/// and that many workers, 0: one process.
fn nginx_conf(dir: &std::path::Path, port: u16, workers: u32) -> String {
    let d = dir.display();
    let procs = if workers == 0 {
        "master_process off;".to_string()
    } else {
        format!("worker_processes {workers};")
    };
    format!(
        "{procs}\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 64; }}\n\
         http {{ access_log off; client_body_temp_path {d}/t1; proxy_temp_path {d}/t2; fastcgi_temp_path {d}/t3; \
         uwsgi_temp_path {d}/t4; scgi_temp_path {d}/t5;\n  server {{ listen 127.0.0.1:{port}; root {d}/www; }} }}\n"
    )
}

fn nginx_serves_across_dump(workers: u32) {
    let port = net::free_port();
    let mut s = net::server(
        "nginx",
        "nginx -c \"$ZDTM_DIR/nginx.conf\" -p \"$ZDTM_DIR\"".into(),
    );
    s.before_start = Some(Box::new(move |dir: &std::path::Path| {
        std::fs::create_dir_all(dir.join("www")).unwrap();
        std::fs::write(dir.join("www/page.html"), "served across a dump\n").unwrap();
        std::fs::write(dir.join("nginx.conf"), nginx_conf(dir, port, workers)).unwrap();
    }));
    let mut t = s.start();
    let mut keep = std::io::BufReader::new(net::connect_when_up(port));
    assert_eq!(
        net::http_get(&mut keep, "/page.html"),
        "served across a dump\n"
    );
    t.dump(&["--tcp-established"]);
    t.restore(&["--tcp-established"]);
    // On the connection that was open across the dump, and on a new one.
    assert_eq!(
        net::http_get(&mut keep, "/page.html"),
        "served across a dump\n"
    );
    assert_eq!(
        net::http_get_once(port, "/page.html"),
        "served across a dump\n"
    );
    let (st, log) = t.finish();
    assert!(st.success(), "nginx exited with {st}: {log}");
}

/// nginx in one process, with a keep-alive connection across the dump.
#[test]
fn nginx_single_process_serves_across_dump() {
    nginx_serves_across_dump(0);
}

/// nginx's master and workers (they talk over unix socketpairs).
#[test]
fn nginx_master_and_workers_serve_across_dump() {
    nginx_serves_across_dump(2);
}

/// python's http.server serves a file after the restore.
#[test]
fn python_http_server_serves_after_restore() {
    let port = net::free_port();
    let mut s = net::server(
        "pyhttp",
        format!("python3 -m http.server {port} --bind 127.0.0.1 --directory \"$ZDTM_DIR\""),
    );
    s.before_start = Some(Box::new(|dir: &std::path::Path| {
        std::fs::write(dir.join("hello.txt"), "hello from python\n").unwrap();
    }));
    let mut t = s.start();
    assert_eq!(
        net::http_get_once(port, "/hello.txt"),
        "hello from python\n"
    );
    t.dump(&["--tcp-established"]);
    t.restore(&["--tcp-established"]);
    assert_eq!(
        net::http_get_once(port, "/hello.txt"),
        "hello from python\n"
    );
    // http.server ends on SIGINT (KeyboardInterrupt) with status 0.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(t.pid),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let (st, log) = t.wait_exit();
    assert!(st.success(), "http.server exited with {st}: {log}");
}

/// A migration: a server streaming with a client on another "host" is
/// dumped (crust outside the server's namespace: the lock goes into it),
/// and crust restores it in a third namespace (run inside it, as on
/// another host), which takes over the server's address at pre-restore,
/// once the restore's lock holds the connection there. The client keeps its connection,
/// and not a byte is lost or repeated either way.
#[test]
fn tcp_server_migrates_to_another_namespace() {
    let hosts = net::Hosts::new();
    let files = WorkDir::new("tcp-migrate");
    let first = net::Hosts::enter(&hosts.first);
    let client_ns = net::Hosts::enter(&hosts.client);
    let (mut server, client) = net::stream_pair(
        &files,
        net::SERVER_ADDR,
        net::SERVER_ADDR,
        &first.iter().map(String::as_str).collect::<Vec<_>>(),
        &client_ns.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
    );
    server.task.dump(&["--tcp-established"]);
    let (s0, c0) = (net::progress(&server), net::progress(&client));
    let second = net::Hosts::enter(&hosts.second);
    let script = hosts.move_server_script(&files.0);
    let mut cmd = std::process::Command::new(&second[0]);
    cmd.args(&second[1..])
        .arg(CRUST)
        .arg("restore")
        .arg("-D")
        .arg(server.task.work.images())
        .args(["-o", "restore.log", "-v4", "--tcp-established", "--pidfile"])
        .arg(server.task.work.0.join("restored.pid"))
        .arg("--action-script")
        .arg(&script)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    server.task.restore_with(cmd);
    use std::os::unix::fs::MetadataExt;
    let ns = std::fs::metadata(format!("/proc/{}/ns/net", server.task.pid))
        .unwrap()
        .ino();
    assert_eq!(
        ns,
        net::Hosts::ino(&hosts.second),
        "restored in another namespace"
    );
    net::wait_flowing([(&server, s0), (&client, c0)], 8 << 20);
    net::end_stream(server, client);
}

/// --leave-running with --tcp-established: the tree runs on with its
/// connection out of repair mode and unlocked, and the stream goes on; the
/// images hold the connection.
#[test]
fn leave_running_keeps_connection() {
    let files = WorkDir::new("tcp-stream-leave");
    let (mut server, client) = net::stream_pair(&files, "127.0.0.1", "127.0.0.1", &[], &[], &[]);
    server.task.dump(&["--tcp-established", "--leave-running"]);
    assert!(
        !net::lock_in_place(server.task.pid),
        "the lock outlived the dump"
    );
    let (s0, c0) = (net::progress(&server), net::progress(&client));
    net::wait_flowing([(&server, s0), (&client, c0)], 8 << 20);
    let show = std::process::Command::new(CRUST)
        .arg("show")
        .arg(server.task.work.images())
        .output()
        .unwrap();
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.contains("TCP connection 127.0.0.1:") && show.contains("ESTABLISHED"),
        "{show}"
    );
    net::end_stream(server, client);
}

/// Two pre-dumps of the predump program, the second tracked, a round of
/// writes before each of the second and the final dump (`--track-mem`,
/// left in the work directory's images); the final dump's log.
fn dump_after_tracked_pre_dumps(t: &mut Task) -> String {
    t.pre_dump_ok("pre1", &[]);
    scatter_writes(t, 1);
    t.pre_dump_ok("pre2", &["--prev-images-dir", "../pre1", "--track-mem"]);
    scatter_writes(t, 2);
    t.dump(&["--prev-images-dir", "../pre2", "--track-mem"]);
    std::fs::read_to_string(t.work.images().join("dump.log")).unwrap()
}

/// Asks the predump test program for a round of writes all over its memory
/// and waits until it is done.
fn scatter_writes(t: &Task, round: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(t.pid),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    let f = t.work.0.join(format!("usr1-{round}"));
    let t0 = std::time::Instant::now();
    while !f.exists() {
        assert!(
            t0.elapsed().as_secs() < 20,
            "round {round} of writes not done"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn pages_len(dir: &std::path::Path, pid: i32) -> u64 {
    std::fs::metadata(dir.join(format!("pages-{pid}.img")))
        .unwrap()
        .len()
}

fn pages_blocks(dir: &std::path::Path, pid: i32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir.join(format!("pages-{pid}.img")))
        .unwrap()
        .blocks()
        * 512
}

/// A process that keeps writing through two pre-dumps and a final dump:
/// each later image holds only what was written since (a hot sixteenth,
/// and every 64th page the test asks for between dumps, some written by
/// the kernel through read()), and the restored process finds every page
/// of its memory as it last wrote it. The final dump takes the space of
/// its pages before it freezes the tree (about 12 MiB here), and keeps
/// none of it past the pages it wrote.
#[test]
fn pre_dumps_then_a_final_dump_store_only_what_was_written() {
    let mut t = Spawn::new("predump").args(&["160"]).start();
    let pid = t.pid;
    t.pre_dump_ok("pre1", &[]);
    let full = pages_len(&t.work.0.join("pre1"), pid);
    assert!(full >= 64 << 20, "the first pre-dump saved {full} bytes");
    scatter_writes(&t, 1);
    t.pre_dump_ok("pre2", &["--prev-images-dir", "../pre1", "--track-mem"]);
    let second = pages_len(&t.work.0.join("pre2"), pid);
    assert!(
        second < full / 4,
        "the second pre-dump saved {second} bytes of {full}"
    );
    assert!(t.work.0.join("pre2/parent").is_symlink());
    scatter_writes(&t, 2);
    t.dump(&["--prev-images-dir", "../pre2", "--track-mem"]);
    let last = pages_len(&t.work.images(), pid);
    assert!(
        last < full / 4,
        "the final dump saved {last} bytes of {full}"
    );
    let log = std::fs::read_to_string(t.work.images().join("dump.log")).unwrap();
    assert!(log.contains("reserved for pages images"), "{log}");
    let kept = pages_blocks(&t.work.images(), pid);
    assert!(kept <= last, "{kept} bytes kept for {last} of pages image");
    // Each image is of its own dump only: a pre-dump is not restored.
    let out = std::process::Command::new(CRUST)
        .args(["restore", "-D"])
        .arg(t.work.0.join("pre2"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("pre-dump"), "{err}");
    t.restore(&[]);
    t.pass();
}

/// Pages dropped (MADV_DONTNEED) between a pre-dump and the final dump
/// keep their write-protection: tracking shows them unwritten, while they
/// read as zeros, or (a private file page copied before) as the file
/// again. The final dump leaves to the chain only the pages tracking shows
/// unchanged and still present as they were, without reading their
/// pagemap (said in its log), and the restored process finds zeros and
/// the file's pages where it dropped them, and every other page as it
/// last wrote it.
#[test]
fn final_dump_after_pre_dumps_keeps_dropped_pages_dropped() {
    let mut t = Spawn::new("predump").args(&["64", "drops"]).start();
    let log = dump_after_tracked_pre_dumps(&mut t);
    assert!(
        log.contains("left to the chain as tracking shows them"),
        "{log}"
    );
    t.restore(&[]);
    t.pass();
}

/// A final dump of a big process (over 64 MiB resident) whose pre-dumps
/// tracked its writes finds its pages before its VMAs, and streams them
/// while smaps is read (`collect::PagesAhead`); the chain restores it whole.
#[test]
fn final_dump_streams_pages_while_its_vmas_are_read() {
    let mut t = Spawn::new("predump").args(&["96"]).start();
    let log = dump_after_tracked_pre_dumps(&mut t);
    assert!(log.contains("while its VMAs were read"), "{log}");
    assert!(!log.contains("streaming them again"), "{log}");
    t.restore(&[]);
    t.pass();
}

/// A MAP_DROPPABLE mapping looks like anonymous memory in /proc/PID/maps:
/// the pages streamed ahead of the VMAs hold it, smaps leaves it out, and
/// the dump streams its pages again, without it.
#[test]
fn final_dump_streams_again_when_its_vmas_choose_other_pages() {
    let mut t = Spawn::new("predump").args(&["96", "droppable"]).start();
    let log = dump_after_tracked_pre_dumps(&mut t);
    assert!(log.contains("streaming them again"), "{log}");
    t.restore(&[]);
    t.pass();
}

/// After dedup the older images of the chain take less disk (st_blocks),
/// and the chain still restores a process that verifies all its memory.
#[test]
fn dedup_shrinks_the_parents_and_the_chain_still_restores() {
    let mut t = Spawn::new("predump").args(&["64"]).start();
    let pid = t.pid;
    t.pre_dump_ok("pre1", &[]);
    scatter_writes(&t, 1);
    t.pre_dump_ok("pre2", &["--prev-images-dir", "../pre1", "--auto-dedup"]);
    let pre1 = t.work.0.join("pre1");
    let after_auto = pages_blocks(&pre1, pid);
    assert!(
        after_auto < (64 << 20) - (2 << 20),
        "--auto-dedup left {after_auto} bytes in pre1"
    );
    scatter_writes(&t, 2);
    t.dump(&["--prev-images-dir", "../pre2", "--track-mem"]);
    let before = pages_blocks(&pre1, pid) + pages_blocks(&t.work.0.join("pre2"), pid);
    let out = std::process::Command::new(CRUST)
        .args(["dedup", "-D"])
        .arg(t.work.images())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = pages_blocks(&pre1, pid) + pages_blocks(&t.work.0.join("pre2"), pid);
    assert!(
        after + (2 << 20) < before,
        "dedup left {after} of {before} bytes"
    );
    // A deduplicated parent is not restored alone (it has holes now).
    let out = std::process::Command::new(CRUST)
        .args(["dump", "-t", &pid.to_string(), "-D"])
        .arg(t.work.0.join("other"))
        .args(["--prev-images-dir", "../pre1", "--leave-running"])
        .output();
    assert!(out.is_ok_and(|o| !o.status.success()));
    t.restore(&[]);
    t.pass();
}

// ------------------------------------------------------------ lazy restore ---

/// A child of the test (crust dump, lazy-pages, restore) killed and reaped
/// if the test fails before it ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `crust lazy-pages` with `extra`, run through `prefix` (nsenter into a
/// namespace, or nothing), logging into `dir`.
fn lazy_daemon(prefix: &[String], dir: &std::path::Path, extra: &[&str]) -> std::process::Child {
    lazy_daemon_cmd(prefix, dir, extra)
        .spawn()
        .expect("running crust lazy-pages")
}

/// The `crust lazy-pages -D dir` command of `lazy_daemon`, not started.
fn lazy_daemon_cmd(
    prefix: &[String],
    dir: &std::path::Path,
    extra: &[&str],
) -> std::process::Command {
    let mut cmd = std::process::Command::new(prefix.first().map_or(CRUST, |p| p.as_str()));
    if !prefix.is_empty() {
        cmd.args(&prefix[1..]).arg(CRUST);
    }
    cmd.arg("lazy-pages")
        .arg("-D")
        .arg(dir)
        .args(["-o", "lazy.log", "-v4"])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    close_inherited_fds(&mut cmd);
    cmd
}

fn stderr_of(c: &mut std::process::Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = c.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// Every image file's name and contents, to show a failed restore left
/// them as they were.
fn images_digest(dir: &std::path::Path) -> Vec<(String, u64, u32)> {
    let mut out: Vec<(String, u64, u32)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".img"))
        .map(|e| {
            let data = std::fs::read(e.path()).unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                data.len() as u64,
                crc32fast::hash(&data),
            )
        })
        .collect();
    out.sort();
    out
}

/// Lazy restore from local images: the tree runs before its private memory
/// is in; the daemon places what it touches (its fork's and a moved
/// region's too) and the rest in the background, and the program finds
/// every byte as it was (and zeros where it had none).
#[test]
fn lazy_local() {
    let mut t = Spawn::new("lazy").args(&["256"]).start();
    let log = lazy_cycle(&mut t);
    assert!(log.contains("every page is in"), "{log}");
}

/// A tree whose children share memory copy-on-write with their parent at
/// the dump (their images leave those pages to the parent's): restored
/// lazily, each process gets its own and its parent's pages right.
#[test]
fn lazy_cow_tree() {
    let mut t = Spawn::new("cow").args(&["64"]).start();
    lazy_cycle(&mut t);
}

/// Dumps `t`, restores it lazily from its images with a `crust lazy-pages`
/// beside it, and has it check its memory at once, while pages still
/// arrive; the daemon must end well, and the program pass. The daemon's log.
fn lazy_cycle(t: &mut Task) -> String {
    t.dump(&[]);
    let mut daemon = Reaped(lazy_daemon(&[], &t.work.images(), &[]));
    t.restore(&["--lazy-pages"]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(t.pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = wait_with_deadline(&mut daemon.0, 60);
    let log = std::fs::read_to_string(t.work.images().join("lazy.log")).unwrap_or_default();
    assert!(
        st.success(),
        "lazy-pages failed: {}\n{log}",
        stderr_of(&mut daemon.0)
    );
    let (st, out) = t.wait_exit();
    assert!(st.success() && out.contains("PASS"), "{st}: {out}");
    log
}

/// The daemon dies with the tree running on pages half in, just after the
/// program forked (its child's memory comes through a userfaultfd of the
/// fork): the watcher the restore left kills the tree, the child too,
/// before any reads zeros for its memory, and says so; the images are as
/// they were.
#[test]
fn lazy_daemon_dies() {
    use std::os::unix::process::ExitStatusExt;
    let mut t = Spawn::new("lazy").args(&["256"]).start();
    t.dump(&[]);
    let before = images_digest(&t.work.images());
    let mut daemon = Reaped(
        lazy_daemon_cmd(&[], &t.work.images(), &[])
            .env("CRUST_FAULT", "lazy-forked")
            .spawn()
            .unwrap(),
    );
    t.restore(&["--lazy-pages"]);
    // The program forks its checker and both touch memory still to come.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(t.pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = wait_with_deadline(&mut daemon.0, 60);
    assert_eq!(st.signal(), Some(libc::SIGKILL), "the daemon was to die");
    let mut restore = t.take_restorer().unwrap();
    let st = wait_with_deadline(&mut restore, 60);
    let log = std::fs::read_to_string(t.work.images().join("restore.log")).unwrap_or_default();
    assert_eq!(
        st.code(),
        Some(128 + libc::SIGKILL),
        "the restored tree was to be killed: {}\n{log}",
        t.log_text()
    );
    assert!(
        log.contains(
            "the lazy-pages daemon went away before every page was in; killed the restored tree"
        ),
        "{log}"
    );
    // Nobody read zeros for its memory, the child the program forked
    // after the restore included: it was killed too.
    let out = t.log_text();
    assert!(!out.contains("FAIL") && !out.contains(", not "), "{out}");
    let t0 = std::time::Instant::now();
    while nix::sys::signal::killpg(nix::unistd::Pid::from_raw(t.pid), None).is_ok() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "a process of the restored tree is left: {}",
            t.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(images_digest(&t.work.images()), before);
}

/// The daemon dies while the tree is being restored: the restore fails at
/// once (not at its deadline), says why, and leaves nothing running and
/// the images as they were.
#[test]
fn lazy_daemon_dies_during_restore() {
    let mut t = Spawn::new("lazy").args(&["64"]).start();
    t.dump(&[]);
    let before = images_digest(&t.work.images());
    let mut daemon = Reaped(
        lazy_daemon_cmd(&[], &t.work.images(), &[])
            .env("CRUST_FAULT", "lazy-registered")
            .spawn()
            .unwrap(),
    );
    let t0 = std::time::Instant::now();
    let out = t
        .restore_cmd(&["--lazy-pages"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    wait_with_deadline(&mut daemon.0, 20);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the restore went on without the daemon"
    );
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(30),
        "the restore waited {:?}",
        t0.elapsed()
    );
    assert!(err.contains("lazy-pages daemon went away"), "{err}");
    assert!(!test_program_at(t.pid), "a restored task was left behind");
    assert_eq!(images_digest(&t.work.images()), before);
}

/// The dump side of a lazy migration: `dump --lazy-pages` in namespace
/// `ns` serving on SERVER_ADDR:`port`, with `extra` (--tls ...).
fn lazy_dump(
    t: &Task,
    ns: &str,
    port: u16,
    env: &[(&str, &str)],
    extra: &[String],
) -> std::process::Child {
    let enter = net::Hosts::enter(ns);
    let mut cmd = std::process::Command::new(&enter[0]);
    cmd.args(&enter[1..])
        .arg(CRUST)
        .arg("dump")
        .arg("-t")
        .arg(t.pid.to_string())
        .arg("-D")
        .arg(t.work.images())
        .args(["-o", "dump.log", "-v4", "--lazy-pages", "--address"])
        .arg(net::SERVER_ADDR)
        .arg("--port")
        .arg(port.to_string())
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    close_inherited_fds(&mut cmd);
    let c = cmd.spawn().expect("running crust dump --lazy-pages");
    let inv = t.work.images().join("inventory.img");
    let t0 = std::time::Instant::now();
    while !inv.exists() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "no images"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    c
}

/// The program, started in namespace `ns` (a "host").
fn lazy_program_in(ns: &str) -> Task {
    let bin = build("lazy");
    let mut s = Spawn::new("lazy");
    s.program = Some("nsenter".into());
    s.args = vec![
        format!("--net=/run/netns/{ns}"),
        bin.to_string_lossy().into_owned(),
        "256".into(),
    ];
    s.start()
}

/// The daemon of a lazy migration, in namespace `ns`, fetching the pages
/// of the images in `dst` from the dump at SERVER_ADDR:`port`, with
/// `extra` (--tls ...).
fn lazy_daemon_in(
    ns: &str,
    dst: &std::path::Path,
    port: u16,
    extra: &[String],
) -> std::process::Child {
    let port = port.to_string();
    let mut args = vec![
        "--page-server",
        "--address",
        net::SERVER_ADDR,
        "--port",
        &port,
    ];
    args.extend(extra.iter().map(String::as_str));
    lazy_daemon(&net::Hosts::enter(ns), dst, &args)
}

/// The restore side of a lazy migration, in namespace `ns`: the images
/// copied from the source (all but the private memory), the daemon
/// fetching pages from the dump (with `daemon_extra`), and the restore (in
/// a PID namespace of its own: the frozen original still holds its PIDs
/// on this one machine).
fn lazy_restore_in(
    ns: &str,
    dst: &std::path::Path,
    port: u16,
    daemon_extra: &[String],
) -> (std::process::Child, std::process::Child) {
    let enter = net::Hosts::enter(ns);
    let daemon = lazy_daemon_in(ns, dst, port, daemon_extra);
    let mut cmd = std::process::Command::new(&enter[0]);
    cmd.args(&enter[1..])
        .arg(CRUST)
        .arg("restore")
        .arg("-D")
        .arg(dst)
        .args(["-o", "restore.log", "-v4", "--lazy-pages", "--pid-ns"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    close_inherited_fds(&mut cmd);
    let restore = cmd.spawn().expect("running crust restore --lazy-pages");
    (daemon, restore)
}

fn copy_images(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.file_name().to_string_lossy().ends_with(".img") {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The program's outer PID under the `crust restore --pid-ns` child
/// `restore` once it runs: the init's child.
fn restored_under(restore: &std::process::Child) -> i32 {
    let t0 = std::time::Instant::now();
    loop {
        let tree = tree_of(restore.id() as i32);
        if let Some(&p) = tree
            .iter()
            .skip(2)
            .find(|&&p| status_field(p, "Name") == "lazy")
            && status_field(p, "TracerPid") == "0"
        {
            return p;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "the restore did not bring the program back: {tree:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Lazy migration from one network namespace to another (two "hosts"
/// joined by a veth pair): the source dumps all but the private memory and
/// serves it from the frozen tree; the destination restores at once and
/// its daemon pulls the pages, faults first. The program verifies its
/// memory there; the source's tree ends once every page went over.
#[test]
fn lazy_migration_between_namespaces() {
    lazy_migrate(27000, &[], &[]);
}

/// The same migration with the page stream in TLS, each side presenting a
/// certificate of the CA the other trusts (the dump's naming the address
/// the daemon connects to).
#[test]
fn lazy_migration_tls() {
    let w = WorkDir::new("lazy-pki");
    let pki = page_server::Pki::new(&w.0);
    let t = lazy_migrate(26000, &pki.args("server"), &pki.args("client"));
    let log = std::fs::read_to_string(t.work.images().join("dump.log")).unwrap_or_default();
    assert!(log.contains("over TLS"), "{log}");
}

/// Migrates the lazy program between two namespaces, the dump given
/// `dump_extra` and the daemon `daemon_extra`; the program passes its
/// check there.
fn lazy_migrate(base_port: u16, dump_extra: &[String], daemon_extra: &[String]) -> Task {
    let hosts = net::Hosts::new();
    let mut t = lazy_program_in(&hosts.first);
    let port = base_port + (std::process::id() % 1000) as u16;
    let mut dump = Reaped(lazy_dump(&t, &hosts.first, port, &[], dump_extra));
    let dst = t.work.0.join("dst");
    copy_images(&t.work.images(), &dst);
    // Without --lazy-pages these images cannot come back: refused.
    let out = std::process::Command::new(CRUST)
        .args(["restore", "-D"])
        .arg(&dst)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("dumped with --lazy-pages"), "{err}");
    let (daemon, restore) = lazy_restore_in(&hosts.client, &dst, port, daemon_extra);
    let (mut daemon, mut restore) = (Reaped(daemon), Reaped(restore));
    let _end = EndTree(restore.0.id() as i32);
    let pid = restored_under(&restore.0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = wait_with_deadline(&mut restore.0, 60);
    assert!(
        st.success(),
        "the migrated program failed ({st}): {}",
        t.log_text()
    );
    assert!(t.log_text().contains("PASS"), "{}", t.log_text());
    let st = wait_with_deadline(&mut daemon.0, 60);
    assert!(
        st.success(),
        "lazy-pages failed: {}",
        stderr_of(&mut daemon.0)
    );
    let st = wait_with_deadline(&mut dump.0, 60);
    assert!(
        st.success(),
        "dump --lazy-pages failed: {}",
        stderr_of(&mut dump.0)
    );
    // The source's tree ended with the dump.
    let mut orig = t.take_original().unwrap();
    wait_with_deadline(&mut orig, 20);
    t
}

/// A certificate not signed by the CA the other side trusts (the
/// daemon's, then the dump's): each side refuses in one line, before the
/// restore begins, and the source's tree runs on, unharmed.
#[test]
fn lazy_migration_refuses_wrong_certificate() {
    let hosts = net::Hosts::new();
    let t = lazy_program_in(&hosts.first);
    let before = page_server::state_of(t.pid);
    let w = WorkDir::new("lazy-pki-wrong");
    let pki = page_server::Pki::new(&w.0);
    let port = 25000 + (std::process::id() % 1000) as u16;
    for (round, (dumps, fetches)) in [("server", "stranger"), ("stranger", "client")]
        .into_iter()
        .enumerate()
    {
        let _ = std::fs::remove_file(t.work.images().join("inventory.img"));
        let port = port + round as u16;
        let mut dump = Reaped(lazy_dump(&t, &hosts.first, port, &[], &pki.args(dumps)));
        let dst = t.work.0.join(format!("dst-{round}"));
        copy_images(&t.work.images(), &dst);
        let mut daemon = Reaped(lazy_daemon_in(
            &hosts.client,
            &dst,
            port,
            &pki.args(fetches),
        ));
        let st = wait_with_deadline(&mut daemon.0, 60);
        let err = stderr_of(&mut daemon.0);
        assert!(!st.success(), "lazy-pages took a {dumps} certificate");
        page_server::one_line_error("lazy-pages", err.trim(), "TLS with the dump");
        let st = wait_with_deadline(&mut dump.0, 60);
        let err = stderr_of(&mut dump.0);
        assert!(
            !st.success(),
            "dump --lazy-pages took a {fetches} certificate"
        );
        page_server::one_line_error("dump", err.trim(), "TLS with the lazy-pages daemon");
        assert!(err.contains("the tree runs on here"), "{err}");
    }
    page_server::assert_runs_on(t, &before);
}

/// The source dies mid-migration (its connection breaks with pages still
/// to come): the daemon kills the restored tree and says so in one line;
/// the source's tree, resumed by the dump's guardian, runs on whole.
#[test]
fn lazy_migration_source_dies() {
    use std::os::unix::process::ExitStatusExt;
    let hosts = net::Hosts::new();
    let t = lazy_program_in(&hosts.first);
    let port = 28000 + (std::process::id() % 1000) as u16;
    let mut dump = Reaped(lazy_dump(
        &t,
        &hosts.first,
        port,
        &[("CRUST_FAULT", "lazy-serving")],
        &[],
    ));
    let dst = t.work.0.join("dst");
    copy_images(&t.work.images(), &dst);
    let (daemon, restore) = lazy_restore_in(&hosts.client, &dst, port, &[]);
    let (mut daemon, mut restore) = (Reaped(daemon), Reaped(restore));
    let _end = EndTree(restore.0.id() as i32);
    let st = wait_with_deadline(&mut dump.0, 60);
    assert_eq!(st.signal(), Some(libc::SIGKILL), "the dump was to die");
    let st = wait_with_deadline(&mut daemon.0, 60);
    let err = stderr_of(&mut daemon.0);
    assert!(!st.success(), "lazy-pages went on without its source");
    assert!(
        err.contains("killed the restored tree") && err.trim().lines().count() == 1,
        "{err}"
    );
    let st = wait_with_deadline(&mut restore.0, 60);
    assert_eq!(
        st.code(),
        Some(128 + libc::SIGKILL),
        "the restored tree was to be killed"
    );
    // The original runs on and finds its memory whole.
    let t0 = std::time::Instant::now();
    while status_field(t.pid, "TracerPid") != "0" {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "the source stays frozen"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    t.pass();
}

/// Incremental dumps as with criu: dumps with --leave-running --track-mem,
/// each on the one before (--prev-images-dir), store only what was written
/// since; the last one, which ends the process, restores it with all its
/// memory.
#[test]
fn incremental_dumps_leave_running_with_track_mem() {
    let mut t = Spawn::new("predump").args(&["32"]).start();
    let pid = t.pid;
    let dump_to = |t: &mut Task, name: &str, extra: &[&str]| {
        let out = std::process::Command::new(CRUST)
            .args(["dump", "-t", &pid.to_string(), "-D"])
            .arg(t.work.0.join(name))
            .args(["-o", "dump.log", "-v4", "--leave-running", "--track-mem"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dump {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    dump_to(&mut t, "d1", &[]);
    let full = pages_len(&t.work.0.join("d1"), pid);
    assert!(full >= 32 << 20, "the first dump stored {full} bytes");
    scatter_writes(&t, 1);
    dump_to(&mut t, "d2", &["--prev-images-dir", "../d1"]);
    let second = pages_len(&t.work.0.join("d2"), pid);
    assert!(
        second < full / 4,
        "the second dump stored {second} of {full} bytes"
    );
    scatter_writes(&t, 2);
    t.dump(&["--prev-images-dir", "../d2", "--track-mem", "--auto-dedup"]);
    let last = pages_len(&t.work.images(), pid);
    assert!(
        last < full / 4,
        "the last dump stored {last} of {full} bytes"
    );
    t.restore(&[]);
    t.pass();
}

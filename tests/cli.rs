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
    // Which write tracking pre-dump gets here, and no probe says pre-dump
    // is missing.
    let tracking = out
        .lines()
        .find(|l| l.starts_with("write_tracking"))
        .unwrap_or_else(|| panic!("--all names no write tracking: {out}"));
    assert!(
        tracking.contains("soft-dirty") || tracking.contains("userfaultfd"),
        "{tracking}"
    );
    assert!(!out.contains("not in crust yet: pre-dump"), "{out}");
    assert!(!out.contains("pre-dump is not in crust"), "{out}");
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

/// The rough edges a user meets first: each is one line naming the thing
/// and what to do, with the exit status of its class (2 refused or bad
/// input, 3 images), and nothing is created on the way.
#[test]
fn bad_input_gets_one_line_and_its_exit_class() {
    let missing = std::env::temp_dir().join(format!("crust-missing-{}", std::process::id()));
    let (code, _, err) = run(&["restore", "-D", missing.to_str().unwrap(), "-o", "r.log"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    assert!(
        !missing.exists(),
        "the restore created {}",
        missing.display()
    );

    // The test runs crust: it is an ancestor of crust.
    let me = std::process::id().to_string();
    let (code, _, err) = run(&["dump", "-t", &me, "-D", missing.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("crust runs under") && !err.contains("root"),
        "{err}"
    );
    assert!(!missing.exists());

    let text = std::env::temp_dir().join(format!("crust-text-{}.txt", std::process::id()));
    std::fs::write(&text, "hello\n").unwrap();
    let (code, _, err) = run(&["show", text.to_str().unwrap()]);
    std::fs::remove_file(&text).unwrap();
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("not a crust image"), "{err}");

    let (code, _, err) = run(&["restore", "-D", "/tmp", "--root", "/"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--root") && err.contains("mount namespace"),
        "{err}"
    );

    let (code, _, err) = run(&["dump", "-t", "1", "--no-such-option"]);
    assert_eq!(code, 2, "{err}");
}

/// A dump into a directory holding an older dump replaces it whole: no
/// image of the old tree is left. A directory holding anything else is
/// refused, its files untouched, and the task runs on.
#[test]
fn dump_replaces_an_older_dump_and_refuses_foreign_files() {
    let mut first = Spawn::new("counter").quiet().start();
    let mut t = Spawn::new("counter").quiet().start();
    let images = t.work.images();
    // The first counter's dump goes into the second's images directory.
    let out = Command::new(CRUST)
        .args(["dump", "-R", "-t", &first.pid.to_string(), "-D"])
        .arg(&images)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let old_core = images.join(format!("core-{}.img", first.pid));
    assert!(old_core.exists());
    t.dump(&[]);
    assert!(
        !old_core.exists(),
        "the older dump's image was left beside the new one"
    );
    t.restore(&[]);
    t.pass();

    let foreign = first.work.images();
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let out = first.dump_with(&[], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("notes.txt"), "{err}");
    assert_eq!(
        std::fs::read_to_string(foreign.join("notes.txt")).unwrap(),
        "mine"
    );
    assert!(pid_alive(first.pid));
    assert_eq!(status_field(first.pid, "TracerPid"), "0");
    first.pass();
}

/// Action scripts run at each stage with criu's variables; one failing at
/// post-dump fails the dump and the tree runs on unharmed.
#[test]
fn action_scripts_run_at_each_stage() {
    let mut t = Spawn::new("counter").quiet().start();
    // Outside the task's work directory, which goes with the task.
    let hooks = WorkDir::new("hooks");
    let seen = hooks.0.join("seen");
    let script = hooks.0.join("hook.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$CRTOOLS_SCRIPT_ACTION $CRTOOLS_IMAGE_DIR $CRTOOLS_INIT_PID\" >> {}\n[ ! -e {}.fail-$CRTOOLS_SCRIPT_ACTION ]\n",
            seen.display(),
            script.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let hook = script.to_str().unwrap();

    std::fs::write(format!("{hook}.fail-post-dump"), "").unwrap();
    let out = t.dump_with(&["--action-script", hook], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("post-dump action script"), "{err}");
    assert!(pid_alive(t.pid), "a failed post-dump killed the task");
    assert_eq!(status_field(t.pid, "TracerPid"), "0");
    std::fs::remove_file(format!("{hook}.fail-post-dump")).unwrap();
    std::fs::remove_file(&seen).unwrap();

    let pid = t.pid;
    let images = std::path::absolute(t.work.images()).unwrap();
    t.dump(&["--action-script", hook]);
    t.restore(&["--action-script", hook]);
    t.pass();
    let want: Vec<String> = [
        "pre-dump",
        "post-dump",
        "pre-restore",
        "post-restore",
        "pre-resume",
        "post-resume",
    ]
    .iter()
    .map(|a| format!("{a} {} {pid}", images.display()))
    .collect();
    let got: Vec<String> = std::fs::read_to_string(&seen)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(got, want);
}

/// `--display-stats` prints the stages and the counts; `-W` puts the log
/// and pidfile there; options come from a `--config` file, one a line, as
/// criu reads them.
#[test]
fn display_stats_work_dir_and_config_file() {
    let mut t = Spawn::new("counter").quiet().start();
    let work = t.work.0.join("w");
    std::fs::create_dir_all(&work).unwrap();
    let conf = t.work.0.join("crust.conf");
    std::fs::write(
        &conf,
        "# as criu reads it\nleave-running\nlog-file conf.log\n\nverbosity 4\n",
    )
    .unwrap();
    let out = Command::new(CRUST)
        .args(["dump", "--config"])
        .arg(&conf)
        .args(["--display-stats", "-W"])
        .arg(&work)
        .args(["-t", &t.pid.to_string(), "-D"])
        .arg(t.work.images())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "Dump statistics",
        "freezing",
        "total",
        "tasks",
        "pages written",
    ] {
        assert!(stdout.contains(want), "no {want:?} in:\n{stdout}");
    }
    assert!(
        pid_alive(t.pid),
        "leave-running from the config file was not applied"
    );
    let log = std::fs::read_to_string(work.join("conf.log")).expect("the log went to -W");
    assert!(
        log.contains("DEBUG") || log.contains("TRACE"),
        "verbosity 4 not applied"
    );
    t.dump(&[]);
    let mut cmd = t.restore_cmd(&["-W", work.to_str().unwrap(), "--display-stats"]);
    cmd.stdout(std::process::Stdio::piped());
    t.restore_with(cmd);
    t.pass();
}

/// Ctrl-C on a restore waiting in the foreground reaches the program: it
/// ends of SIGINT, crust exits as a shell reports that (130), and nothing is
/// left orphaned.
#[test]
fn ctrl_c_on_a_foreground_restore_reaches_the_program() {
    let mut t = Spawn::new("counter").quiet().start();
    let pid = t.pid;
    t.dump(&[]);
    t.restore(&[]);
    let mut crust = t.take_restorer().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(crust.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let st = wait_with_deadline(&mut crust, 30);
    assert_eq!(st.code(), Some(130), "{st}");
    wait_gone(pid);
}

/// The progress line: on a terminal (crust under `script`), and never when
/// stderr is no terminal or in the log.
#[test]
fn progress_line_only_on_a_terminal() {
    let mut t = Spawn::new("bigmem").args(&["64"]).quiet().start();
    let dump = format!(
        "{CRUST} dump -R -t {} -D {} -o dump.log -v4",
        t.pid,
        t.work.images().display()
    );
    let out = Command::new("script")
        .args(["-qec", &dump, "/dev/null"])
        .env("CRUST_PROGRESS_AFTER_MS", "0")
        .output()
        .expect("running script(1)");
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{seen}");
    assert!(
        seen.contains("crust: dumping:") && seen.contains("MiB"),
        "no progress line: {seen:?}"
    );
    let log = std::fs::read_to_string(t.work.images().join("dump.log")).unwrap();
    assert!(
        !log.contains("crust: dumping:"),
        "the progress line went into the log"
    );
    let out = t.dump_with(&["-R"], &[("CRUST_PROGRESS_AFTER_MS", "0")]);
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("crust: dumping:"),
        "a progress line on a pipe"
    );
    t.pass();
}

/// docs/examples/longjob.service, run as systemd would: ExecStart starts
/// the job fresh, ExecStop (at shutdown) dumps it, ExecStart (at boot)
/// restores it, and the job goes on counting from where it was.
#[test]
fn systemd_unit_dumps_at_stop_and_restores_at_start() {
    let work = WorkDir::new("systemd_unit");
    let unit = std::fs::read_to_string(root().join("docs/examples/longjob.service")).unwrap();
    let value = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
            .collect()
    };
    let mut env: Vec<(String, String)> = value("Environment=")
        .iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect();
    // This machine's paths for the unit's settings.
    let log = work.0.join("longjob.log");
    let pidfile = work.0.join("longjob.pid");
    for (k, v) in env.iter_mut() {
        *v = match k.as_str() {
            "CRUST" => CRUST.to_string(),
            "IMAGES" => work.0.join("images").display().to_string(),
            "PIDFILE" => pidfile.display().to_string(),
            "PROGRAM" => build("counter").display().to_string(),
            "LOGFILE" => log.display().to_string(),
            other => panic!("the unit sets {other}, which this test does not know"),
        };
    }
    assert_eq!(value("PIDFile="), vec!["/run/longjob.pid".to_string()]);
    let service = root().join("docs/examples/crust-service");
    let exec = |key: &str, mainpid: i32| {
        let line = value(key).pop().unwrap();
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some("/usr/local/lib/crust/crust-service"));
        let args: Vec<String> = words
            .map(|w| w.replace("$MAINPID", &mainpid.to_string()))
            .collect();
        let out = Command::new(&service)
            .args(&args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("ZDTM_READY", work.0.join("ready"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{key} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let main_pid = || -> i32 {
        std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let counted = || -> i64 {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .rev()
            .find_map(|l| l.parse().ok())
            .unwrap_or(-1)
    };
    exec("ExecStart=", 0);
    let pid = main_pid();
    let _guard = EndTree(pid);
    let t0 = std::time::Instant::now();
    while counted() < 5 {
        assert!(t0.elapsed().as_secs() < 30, "the job does not count");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    exec("ExecStop=", pid);
    wait_gone(pid);
    let at_stop = counted();
    exec("ExecStart=", 0);
    assert_eq!(main_pid(), pid, "the job came back with another PID");
    let t0 = std::time::Instant::now();
    while counted() <= at_stop {
        assert!(
            t0.elapsed().as_secs() < 30,
            "the restored job does not count"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        !work.0.join("images").exists() && work.0.join("images.restored").exists(),
        "the used checkpoint was not set aside"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_gone(pid);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.trim_end().ends_with("PASS"), "{text}");
}

/// A tree with a network namespace of its own: the network-lock scripts
/// run at the dump and network-unlock ones before the restored tree runs,
/// as criu runs them.
#[test]
fn network_lock_scripts_for_a_tree_with_its_own_netns() {
    let mut s = Spawn::new("counter").quiet();
    s.program = Some("unshare".into());
    let counter = build("counter");
    let args = ["--net", counter.to_str().unwrap()];
    let mut t = s.args(&args).start();
    let hooks = WorkDir::new("netns_hooks");
    let seen = hooks.0.join("seen");
    let script = hooks.0.join("hook.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$CRTOOLS_SCRIPT_ACTION\" >> {}\n",
            seen.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let hook = script.to_str().unwrap();
    t.dump(&["--action-script", hook]);
    t.restore(&["--action-script", hook]);
    t.pass();
    let got = std::fs::read_to_string(&seen).unwrap();
    let got: Vec<&str> = got.lines().collect();
    assert_eq!(
        got,
        [
            "pre-dump",
            "network-lock",
            "post-dump",
            "pre-restore",
            "post-restore",
            "pre-resume",
            "network-unlock",
            "post-resume"
        ]
    );
}

/// The TLS options of lazy migration's page stream: each is refused in
/// one line where it would mean nothing, before anything is read or
/// touched (the tree PID 1 is refused only later, as crust's ancestor).
#[test]
fn lazy_tls_options_are_checked() {
    let dir = std::env::temp_dir().join(format!("crust-lazy-tls-{}", std::process::id()));
    let d = dir.to_str().unwrap();
    let files = [
        "--tls-cacert",
        "/nonexistent/ca.pem",
        "--tls-cert",
        "/nonexistent/c.pem",
        "--tls-key",
        "/nonexistent/c.key",
    ];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        // The daemon's --tls is for the pages pulled from the dump.
        (vec!["lazy-pages", "-D", d, "--tls"], "add --page-server"),
        (
            [&["lazy-pages", "-D", d, "--tls-no-cn-verify"][..]].concat(),
            "are for --tls",
        ),
        (
            [
                &[
                    "lazy-pages",
                    "-D",
                    d,
                    "--page-server",
                    "--address",
                    "127.0.0.1",
                    "--port",
                    "1",
                    "--tls",
                ][..],
                &files[..2],
            ]
            .concat(),
            "--tls needs",
        ),
        // The dump listens: it checks no name in the daemon's certificate.
        (
            [
                &["dump", "-t", "1", "-D", d, "--lazy-pages", "--port", "1"][..],
                &["--tls", "--tls-no-cn-verify"],
                &files[..],
            ]
            .concat(),
            "--tls-no-cn-verify is the lazy-pages daemon's option",
        ),
        (
            [
                &["dump", "-t", "1", "-D", d, "--lazy-pages", "--port", "1"][..],
                &files[..2],
            ]
            .concat(),
            "are for --tls",
        ),
        (
            [
                &["dump", "-t", "1", "-D", d, "--lazy-pages", "--port", "1"][..],
                &["--tls"],
                &files[..],
            ]
            .concat(),
            // An unreadable file is an error, not a refusal (as for the
            // page server).
            "reading certificates from /nonexistent/ca.pem",
        ),
    ];
    for (args, has) in cases {
        let (code, _, err) = run(&args);
        assert!(code > 0 && code != 101, "{args:?}: {err}");
        if !has.starts_with("reading") {
            assert_eq!(code, 2, "{args:?}: {err}");
        }
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(has), "{args:?}: {err}");
    }
    assert!(!dir.exists(), "{} was created", dir.display());
}

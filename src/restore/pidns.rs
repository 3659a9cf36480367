//! `restore --pid-ns`: the tree comes back inside a new PID namespace, where
//! its PIDs are free whatever runs on the host, so one snapshot can be
//! restored while the original still runs, or several times at once.
//!
//! crust forks an init, PID 1 of the new namespace. The init takes a mount
//! namespace of its own with a /proc of the new PID namespace (the restore
//! checks /proc/PID and may write ns_last_pid for the PIDs it creates), runs
//! the ordinary restore (the tree's root becomes its child, with the root's
//! original PID inside the namespace), reports to crust over a pipe, and
//! stays as the namespace's reaper: it exits with the root's exit status
//! once nothing is left in the namespace. Without `-d` crust waits for the
//! init and exits with that status, as it would for the root itself.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::mount::{MsFlags, mount};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use tracing::info;

use super::{RestoreOpts, restore_tree, wait_exit_code, write_pidfile};
use crate::actions::Actions;
use crate::sys;

/// What the init reports: `R<root's PID inside>` or `E<error>`, in one write.
const REPORT_MAX: usize = 4096;

pub fn restore_in_new_pid_ns(opts: &RestoreOpts) -> Result<i32> {
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let init = match sys::fork_into_new_pid_ns() {
        Ok(0) => {
            drop(rd);
            let code = run_init(opts, wr);
            // SAFETY: leave the forked init without running crust's exit
            // handlers a second time.
            unsafe { libc::_exit(code) }
        }
        Ok(pid) => Pid::from_raw(pid),
        Err(e) => bail!("creating a PID namespace for --pid-ns: {e}; it needs CAP_SYS_ADMIN"),
    };
    drop(wr);
    let mut buf = vec![0u8; REPORT_MAX];
    let n = loop {
        match File::from(rd.try_clone()?).read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => break r.context("reading the report of the PID namespace's init")?,
        }
    };
    let report = String::from_utf8_lossy(&buf[..n]).into_owned();
    let inner_root: i32 = match report.strip_prefix('R') {
        Some(pid) => pid.parse().context("the init's report is garbled")?,
        None => {
            let code = wait_exit_code(init).unwrap_or(-1);
            match report.strip_prefix('E') {
                Some(msg) => bail!("{msg}"),
                None => bail!(
                    "the init of the new PID namespace died before the tree was restored (exit {code})"
                ),
            }
        }
    };
    let outer_root = outer_pid_of(init, inner_root)?;
    info!("root PID {inner_root} in the new PID namespace is {outer_root} outside it");
    if let Some(p) = &opts.pidfile {
        write_pidfile(p, outer_root)?;
    }
    if opts.detach {
        return Ok(0);
    }
    wait_exit_code(init)
}

/// The init's side: namespaces, restore, report, then reap until empty.
fn run_init(opts: &RestoreOpts, report: OwnedFd) -> i32 {
    let mut report = File::from(report);
    let root = match setup_mounts().and_then(|_| {
        restore_tree(
            &RestoreOpts {
                dir: opts.dir.clone(),
                detach: true,
                sibling: false,
                shell_job: opts.shell_job,
                leave_stopped: opts.leave_stopped,
                pidfile: None,
                pid_ns: false,
                inherit_fds: opts.inherit_fds.clone(),
                link_remap: opts.link_remap,
                file_locks: opts.file_locks,
                ext_unix_sk: opts.ext_unix_sk,
                tcp_established: opts.tcp_established,
                tcp_close: opts.tcp_close,
                lazy_pages: opts.lazy_pages.clone(),
                network_lock: opts.network_lock,
                actions: Actions::none(),
            },
            None,
        )
    }) {
        Ok(root) => root,
        Err(e) => {
            let msg = format!("E{e:#}").replace('\n', " ");
            let _ = report.write_all(&msg.as_bytes()[..msg.len().min(REPORT_MAX)]);
            return 1;
        }
    };
    // Named before the report: the restore that waits for it returns on it,
    // and whoever looks at the namespace's init then sees its name.
    let _ = nix::sys::prctl::set_name(c"crust-init");
    if report.write_all(format!("R{root}").as_bytes()).is_err() {
        return 1;
    }
    drop(report);
    detach_stdio();
    reap_until_empty(root)
}

/// A mount namespace of the init's own, whose /proc shows the new PID
/// namespace; `/` made private first so the new /proc stays in it.
fn setup_mounts() -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .context("creating a mount namespace for --pid-ns")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making / private in the new mount namespace")?;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .context("mounting /proc for the new PID namespace")?;
    Ok(())
}

/// The init outlives a detached crust: it must not hold crust's stdout or
/// stderr open (a `$(crust restore -n -d ...)` would wait for it).
fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            // SAFETY: replacing the init's own stdio with /dev/null.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// Reaps every process the namespace hands to its init; the root's exit
/// status is the init's.
fn reap_until_empty(root: Pid) -> i32 {
    let mut code = 0;
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(p, c)) if p == root => code = c,
            Ok(WaitStatus::Signaled(p, sig, _)) if p == root => code = 128 + sig as i32,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return code,
        }
    }
}

/// The PID, in crust's namespace, of the init's child whose PID inside the
/// namespace is `inner`.
fn outer_pid_of(init: Pid, inner: i32) -> Result<i32> {
    let children = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
        .context("listing the children of the PID namespace's init")?;
    for child in children
        .split_whitespace()
        .filter_map(|c| c.parse::<i32>().ok())
    {
        let st = std::fs::read_to_string(format!("/proc/{child}/status")).unwrap_or_default();
        let nspid = st.lines().find_map(|l| l.strip_prefix("NSpid:"));
        if nspid.and_then(|l| l.split_whitespace().last()) == Some(&inner.to_string()) {
            return Ok(child);
        }
    }
    bail!("the restored root (PID {inner} in its namespace) is not running")
}

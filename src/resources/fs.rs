//! A task's filesystem context: working directory, root and umask. A
//! deleted working directory or root is made again (`ghost::GhostDir`); a
//! working directory in /proc/N of a task that has died since is entered
//! through a short-lived stand-in with PID N (`DeadProcDir`).

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::files::{TreeObjects, new_fd, open_fd, reopen};
use crate::images::pb::{DeadProcDir, FdTable, GhostDir};
use crate::proc;

/// The /proc directory of a dead task behind a link that reads
/// "/proc/N[/REST] (deleted)".
fn dead_proc_dir(proc_path: &str, shown: &str) -> Option<DeadProcDir> {
    let (pid, rest) = proc::split_pid_path(shown.strip_suffix(" (deleted)")?)?;
    proc::on_fs(proc_path, nix::sys::statfs::PROC_SUPER_MAGIC).then(|| DeadProcDir {
        pid,
        rest: rest.to_string(),
    })
}

/// The fd table of `pid` with its cwd, root and umask filled in.
pub fn dump_fs(pid: i32) -> Result<FdTable> {
    let fs_link = |name: &str| -> Result<(String, Option<GhostDir>, Option<DeadProcDir>)> {
        let proc_path = format!("/proc/{pid}/{name}");
        let link = fs::read_link(&proc_path)
            .with_context(|| format!("reading {proc_path}"))?
            .to_string_lossy()
            .into_owned();
        if let Some(d) = dead_proc_dir(&proc_path, &link) {
            return Ok((link, None, Some(d)));
        }
        let ghost = super::ghost::is_ghost_dir(&proc_path, &link)
            .then(|| super::ghost::dump_ghost_dir(&proc_path, &link))
            .transpose()?;
        Ok((link, ghost, None))
    };
    let (cwd, cwd_ghost, cwd_dead_proc) = fs_link("cwd")?;
    let (root, root_ghost, root_dead_proc) = fs_link("root")?;
    if root_dead_proc.is_some() {
        bail!(
            "PID {pid}: its root directory is {root}, the /proc directory of a task that has died; crust cannot restore that root"
        );
    }
    Ok(FdTable {
        cwd,
        root,
        umask: proc::status(pid)?.umask,
        cwd_ghost,
        root_ghost,
        cwd_dead_proc,
        ..Default::default()
    })
}

/// A stand-in task with PID `pid`, for its /proc directory to exist: it
/// waits to be killed (and dies with its parent).
fn proc_standin(pid: i32) -> Result<Pid> {
    let parent = std::process::id() as i32;
    match crate::sys::fork_with_pid(pid) {
        Ok(0) => {
            // SAFETY: prctl and getppid in the new single-threaded child,
            // which only waits for SIGKILL and never returns into crust.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    libc::_exit(0);
                }
                loop {
                    libc::pause();
                }
            }
        }
        Ok(c) => Ok(Pid::from_raw(c)),
        Err(e) => bail!(
            "making a stand-in task with PID {pid} for the working directory /proc/{pid} (its task had died): {e}; PID {pid} must be free"
        ),
    }
}

/// A task's root and working directory, opened (O_PATH) before its fd
/// table is rebuilt: both paths are crust's view, and the cwd may lie
/// outside the root. `apply` moves the task into them.
pub struct FsDirs {
    root: Option<OwnedFd>,
    cwd: OwnedFd,
    umask: u32,
    /// The task whose /proc directory the cwd is in, until the task has
    /// entered it (a dead task's directory cannot be entered).
    standin: Option<Pid>,
}

impl FsDirs {
    /// Opens the dumped root and cwd (a deleted one: the directory crust
    /// made again, `ghost::GhostDirKind`), above fd `min`.
    pub fn open(table: &FdTable, objects: &TreeObjects, min: RawFd) -> Result<Self> {
        let open = |path: &str, ghost: Option<&GhostDir>, what: &str| {
            let fd = match ghost {
                Some(g) => {
                    let made = objects.need(
                        super::ghost::dir_key(g),
                        &format!("the deleted {what} {}", g.path),
                    )?;
                    reopen(made, libc::O_PATH | libc::O_DIRECTORY, &g.path)?
                }
                None => open_fd(path, (libc::O_PATH | libc::O_DIRECTORY) as u32).map_err(|e| {
                    anyhow::anyhow!("{what} {path} is gone ({e:#}); create it to restore")
                })?,
            };
            // SAFETY: duplicating an fd we own above the task's fds.
            let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
            new_fd(high as i64, what)
        };
        let root = (table.root != "/" || table.root_ghost.is_some())
            .then(|| open(&table.root, table.root_ghost.as_ref(), "root directory"))
            .transpose()?;
        let (cwd, standin) = match &table.cwd_dead_proc {
            Some(d) => {
                let s = proc_standin(d.pid)?;
                let path = format!("/proc/{}/{}", d.pid, d.rest);
                match open(&path, None, "working directory") {
                    Ok(fd) => (fd, Some(s)),
                    Err(e) => {
                        let _ = kill(s, Signal::SIGKILL);
                        let _ = nix::sys::wait::waitpid(s, None);
                        return Err(e);
                    }
                }
            }
            None => (
                open(&table.cwd, table.cwd_ghost.as_ref(), "working directory")?,
                None,
            ),
        };
        Ok(FsDirs {
            root,
            cwd,
            umask: table.umask,
            standin,
        })
    }

    /// The fds to keep while the fd table is rebuilt.
    pub fn fds(&self) -> Vec<RawFd> {
        self.root
            .iter()
            .chain([&self.cwd])
            .map(|f| f.as_raw_fd())
            .collect()
    }

    /// chroot into the root, chdir into the cwd, set the umask. Returns
    /// whether a stand-in task was reaped (its SIGCHLD is not the task's).
    pub fn apply(self) -> Result<bool> {
        if let Some(root) = &self.root {
            nix::unistd::fchdir(root.as_raw_fd()).context("entering the root directory")?;
            nix::unistd::chroot(".").context("chroot to the dumped root")?;
        }
        let entered =
            nix::unistd::fchdir(self.cwd.as_raw_fd()).context("entering the working directory");
        if let Some(s) = self.standin {
            // Its death leaves the cwd unhashed, as the dumped task had it.
            let _ = kill(s, Signal::SIGKILL);
            nix::sys::wait::waitpid(s, None)
                .with_context(|| format!("reaping stand-in task {s} of the working directory"))?;
        }
        entered?;
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(self.umask));
        Ok(self.standin.is_some())
    }
}

//! A task's filesystem context: working directory, root and umask. A
//! deleted working directory or root is made again (`ghost::GhostDir`).

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result};

use super::files::{TreeObjects, new_fd, open_fd, reopen};
use crate::images::pb::{FdTable, GhostDir};
use crate::proc;

/// The fd table of `pid` with its cwd, root and umask filled in.
pub fn dump_fs(pid: i32) -> Result<FdTable> {
    let fs_link = |name: &str| -> Result<(String, Option<GhostDir>)> {
        let proc_path = format!("/proc/{pid}/{name}");
        let link = fs::read_link(&proc_path)
            .with_context(|| format!("reading {proc_path}"))?
            .to_string_lossy()
            .into_owned();
        let ghost = super::ghost::is_ghost_dir(&proc_path, &link)
            .then(|| super::ghost::dump_ghost_dir(&proc_path, &link))
            .transpose()?;
        Ok((link, ghost))
    };
    let (cwd, cwd_ghost) = fs_link("cwd")?;
    let (root, root_ghost) = fs_link("root")?;
    Ok(FdTable {
        cwd,
        root,
        umask: proc::status(pid)?.umask,
        cwd_ghost,
        root_ghost,
        ..Default::default()
    })
}

/// A task's root and working directory, opened (O_PATH) before its fd
/// table is rebuilt: both paths are crust's view, and the cwd may lie
/// outside the root. `apply` moves the task into them.
pub struct FsDirs {
    root: Option<OwnedFd>,
    cwd: OwnedFd,
    umask: u32,
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
        let cwd = open(&table.cwd, table.cwd_ghost.as_ref(), "working directory")?;
        Ok(FsDirs {
            root,
            cwd,
            umask: table.umask,
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

    /// chroot into the root, chdir into the cwd, set the umask.
    pub fn apply(self) -> Result<()> {
        if let Some(root) = &self.root {
            nix::unistd::fchdir(root.as_raw_fd()).context("entering the root directory")?;
            nix::unistd::chroot(".").context("chroot to the dumped root")?;
        }
        nix::unistd::fchdir(self.cwd.as_raw_fd()).context("entering the working directory")?;
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(self.umask));
        Ok(())
    }
}

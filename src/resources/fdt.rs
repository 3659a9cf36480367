//! fd tables and fs contexts (cwd, root, umask) that processes share:
//! children cloned with CLONE_FILES or CLONE_FS.
//!
//! Dump: kcmp (KCMP_FILES, KCMP_FS) tells which processes share with their
//! parent; each such process is recorded with the topmost process of its
//! chain of sharers, the owner (`TaskRef.files_of`, `fs_of`). The owner's
//! files image holds the fd table; a member's holds its fs state only.
//! Sharing between processes that are not parent and child (a parent that
//! unshared after cloning two children) cannot be made again by forking,
//! and is refused.
//!
//! Restore: a member is forked with CLONE_FILES / CLONE_FS, so it shares
//! its parent's table (or fs context) from birth, as the owner's own
//! children are forked before the owner rebuilds itself. Only the owner
//! rebuilds the table, and only when no member touches it: every member
//! first moves what it keeps until its restorer runs (its status pipe, the
//! exe fd, the log) above every fd of the table, publishes those fds in a
//! shared page crust maps before the tree forks (`Rendezvous`), and waits;
//! the owner waits for every member, keeps their fds through its "close
//! everything crust left" pass, rebuilds the table and lets them go on. The
//! same for fs: the owner moves into the root and cwd only once every
//! member has read the last path it reads in crust's view.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::images::pb::{Inventory, TaskRef};

const KCMP_FILES: i32 = 2;
const KCMP_FS: i32 = 3;

/// What processes can share with their parent.
#[derive(Clone, Copy)]
enum Shared {
    Files,
    Fs,
}

impl Shared {
    fn kcmp(self) -> i32 {
        match self {
            Shared::Files => KCMP_FILES,
            Shared::Fs => KCMP_FS,
        }
    }
    fn what(self) -> &'static str {
        match self {
            Shared::Files => "fd table (CLONE_FILES)",
            Shared::Fs => "working directory, root and umask (CLONE_FS)",
        }
    }
}

/// kcmp(2) of one kind of object of two processes: their order by the
/// kernel's (obfuscated) object addresses, Equal when it is one object.
fn kcmp(a: i32, b: i32, kind: Shared) -> Result<std::cmp::Ordering> {
    // SAFETY: kcmp compares two kernel objects; it reads no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, a, b, kind.kcmp(), 0, 0) };
    match r {
        0 => Ok(std::cmp::Ordering::Equal),
        1 => Ok(std::cmp::Ordering::Less),
        2 => Ok(std::cmp::Ordering::Greater),
        _ => bail!(
            "comparing the {} of PIDs {a} and {b} (kcmp): {}; crust needs CAP_SYS_PTRACE over both",
            kind.what(),
            std::io::Error::last_os_error()
        ),
    }
}

/// Who holds what a live process shares: (files_of, fs_of) per PID, 0 when
/// its own.
pub type Owners = HashMap<i32, (i32, i32)>;

/// Finds, for the live processes of the tree (`(pid, ppid)`, parents
/// first), which share their fd table or fs context with their parent, and
/// the owner of each shared one. Refuses sharing between processes that are
/// not parent and child.
pub fn dump_sharing(live: &[(i32, i32)]) -> Result<Owners> {
    let files = owners(live, Shared::Files)?;
    let fs = owners(live, Shared::Fs)?;
    Ok(live
        .iter()
        .map(|&(p, _)| (p, (files[&p], fs[&p])))
        .collect())
}

/// The owner of what each live process shares of `kind` (0: its own).
fn owners(live: &[(i32, i32)], kind: Shared) -> Result<HashMap<i32, i32>> {
    let mut of: HashMap<i32, i32> = HashMap::new();
    for &(pid, ppid) in live {
        let owner = match of.get(&ppid) {
            Some(&o) if kcmp(ppid, pid, kind)? == std::cmp::Ordering::Equal => {
                if o != 0 {
                    o
                } else {
                    ppid
                }
            }
            _ => 0,
        };
        of.insert(pid, owner);
    }
    // Owners are pairwise distinct: each is placed by binary search among
    // those before it, in kcmp's order (a total order of the objects), and
    // one equal to an owner placed already is found on the way.
    let mut sorted: Vec<i32> = Vec::new();
    for &(p, _) in live.iter().filter(|(p, _)| of[p] == 0) {
        let (mut lo, mut hi) = (0, sorted.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            match kcmp(sorted[mid], p, kind)? {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => bail!(
                    "PIDs {} and {p} share their {} though neither is the other's parent (a parent unshared it after cloning them); crust cannot rebuild that, dump again once it is undone",
                    sorted[mid],
                    kind.what()
                ),
            }
        }
        sorted.insert(lo, p);
    }
    Ok(of)
}

/// Checks the sharing the inventory records: a member shares with its
/// parent, which is the owner or a member of the same owner.
pub fn check_sharing(inv: &Inventory) -> Result<()> {
    let find = |pid: i32| inv.tasks.iter().find(|t| t.pid == pid);
    for t in &inv.tasks {
        for (of, what, of_parent) in [
            (t.files_of, "fd table", find(t.ppid).map(|p| p.files_of)),
            (t.fs_of, "fs context", find(t.ppid).map(|p| p.fs_of)),
        ] {
            if of == 0 {
                continue;
            }
            let parent_ok = find(t.ppid).is_some_and(|p| !p.zombie);
            let chain_ok = of_parent == Some(of) || (t.ppid == of && of_parent == Some(0));
            if t.zombie || t.pid == inv.root_pid || !parent_ok || !chain_ok {
                bail!(
                    "inventory.img: task {} shares the {what} of {of}, which is not its parent's; the images are corrupt",
                    t.pid
                );
            }
        }
    }
    Ok(())
}

/// The clone flags a task of the tree is forked with: what it shares with
/// its parent.
pub fn clone_flags(t: &TaskRef) -> u64 {
    let mut f = 0;
    if t.files_of != 0 {
        f |= libc::CLONE_FILES as u64;
    }
    if t.fs_of != 0 {
        f |= libc::CLONE_FS as u64;
    }
    f
}

/// Most fds a member keeps while the owner rebuilds the table (status
/// pipe, exe, log, and room to spare).
const MAX_KEPT: usize = 12;

/// One process's place in the rendezvous page.
#[repr(C)]
struct Slot {
    /// A member: its fds are published and it touches the table no more
    /// until `files_done` of its owner.
    files_ready: AtomicU32,
    /// An owner: its table is rebuilt.
    files_done: AtomicU32,
    /// A member: it reads no more paths in crust's view.
    fs_ready: AtomicU32,
    nr_fds: AtomicU32,
    fds: [AtomicI32; MAX_KEPT],
}

/// A page shared by the whole restored tree (mapped by crust before it
/// forks, dropped by each restorer with the rest of crust's memory) where
/// owners and members of shared fd tables and fs contexts meet.
pub struct Rendezvous {
    addr: u64,
    len: usize,
    index: HashMap<i32, usize>,
    /// How long a wait lasts before it is given up.
    timeout: Duration,
}

impl Rendezvous {
    /// Maps the page when any process of the tree shares with its parent.
    pub fn new(inv: &Inventory, timeout: Duration) -> Result<Self> {
        let index: HashMap<i32, usize> = inv
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.pid, i))
            .collect();
        let mut r = Rendezvous {
            addr: 0,
            len: 0,
            index,
            timeout,
        };
        if inv.tasks.iter().all(|t| clone_flags(t) == 0) {
            return Ok(r);
        }
        let len = (inv.tasks.len() * std::mem::size_of::<Slot>()).next_multiple_of(4096);
        // SAFETY: a new shared anonymous mapping of crust's, zero-filled
        // (every flag clear); the forked tree inherits it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!(
                "mapping the page where processes sharing fd tables meet: {}",
                std::io::Error::last_os_error()
            );
        }
        (r.addr, r.len) = (p as u64, len);
        Ok(r)
    }

    fn slot(&self, pid: i32) -> &Slot {
        assert!(self.addr != 0, "no process of the tree shares anything");
        let i = self.index[&pid];
        // SAFETY: the page holds one zero-initialised Slot per task of the
        // inventory, and lives as long as self; Slot is only atomics.
        unsafe { &*((self.addr as *const Slot).add(i)) }
    }

    /// Waits until `flag` is set (by another process of the tree); `what`
    /// says who waits for what, should it not come.
    fn wait(&self, flag: &AtomicU32, what: impl Fn() -> String) -> Result<()> {
        let t0 = Instant::now();
        while flag.load(Ordering::Acquire) == 0 {
            if t0.elapsed() > self.timeout {
                bail!(
                    "{} for {} s; a task is stuck rebuilding itself",
                    what(),
                    self.timeout.as_secs()
                );
            }
            crate::sys::futex_wait(flag, 0, Duration::from_millis(100));
        }
        Ok(())
    }

    fn set(flag: &AtomicU32) {
        flag.store(1, Ordering::Release);
        crate::sys::futex_wake_all(flag);
    }

    /// A member of `owner`'s fd table: publishes the fds it keeps (all above
    /// the table's own), then waits until the owner has rebuilt the table.
    pub fn member_files(&self, pid: i32, owner: i32, keep: &[RawFd]) -> Result<()> {
        let me = self.slot(pid);
        if keep.len() > MAX_KEPT {
            bail!(
                "task {pid} keeps {} fds of crust's, more than {MAX_KEPT}",
                keep.len()
            );
        }
        for (s, &fd) in me.fds.iter().zip(keep) {
            s.store(fd, Ordering::Relaxed);
        }
        me.nr_fds.store(keep.len() as u32, Ordering::Relaxed);
        Self::set(&me.files_ready);
        self.wait(&self.slot(owner).files_done, || {
            format!("task {pid} waited for task {owner} to rebuild the fd table they share")
        })
    }

    /// The owner of an fd table: waits until every member has published
    /// the fds it keeps, and returns them.
    pub fn owner_wait_files<'a>(
        &self,
        pid: i32,
        members: impl Iterator<Item = &'a TaskRef>,
    ) -> Result<Vec<RawFd>> {
        let mut out = Vec::new();
        for m in members {
            let s = self.slot(m.pid);
            self.wait(&s.files_ready, || {
                format!(
                    "task {pid} waited for task {}, which shares its fd table, to get ready",
                    m.pid
                )
            })?;
            let n = (s.nr_fds.load(Ordering::Relaxed) as usize).min(MAX_KEPT);
            out.extend(s.fds[..n].iter().map(|f| f.load(Ordering::Relaxed)));
        }
        Ok(out)
    }

    /// The owner's fd table is rebuilt: its members go on.
    pub fn owner_files_done(&self, pid: i32) {
        Self::set(&self.slot(pid).files_done);
    }

    /// A member of an fs context: it reads no more paths in crust's view.
    pub fn member_fs(&self, pid: i32) {
        Self::set(&self.slot(pid).fs_ready);
    }

    /// The owner of an fs context: waits until no member reads paths in
    /// crust's view any more, before it moves them all into the task's root.
    pub fn owner_wait_fs<'a>(
        &self,
        pid: i32,
        members: impl Iterator<Item = &'a TaskRef>,
    ) -> Result<()> {
        for m in members {
            self.wait(&self.slot(m.pid).fs_ready, || {
                format!("task {pid} waited for task {}, which shares its working directory and root, to get ready", m.pid)
            })?;
        }
        Ok(())
    }
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        if self.addr != 0 {
            // SAFETY: the page this value mapped; nothing of crust's uses it
            // after the restore.
            unsafe { libc::munmap(self.addr as *mut _, self.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(pid: i32, ppid: i32, files_of: i32, fs_of: i32) -> TaskRef {
        TaskRef {
            pid,
            ppid,
            files_of,
            fs_of,
            ..Default::default()
        }
    }

    #[test]
    fn sharing_goes_down_from_parent_to_child() {
        let inv = |tasks| Inventory {
            root_pid: 10,
            tasks,
            ..Default::default()
        };
        // 11 and its child 12 share 10's table; 12 shares 11's fs context.
        let good = inv(vec![
            task(10, 1, 0, 0),
            task(11, 10, 10, 0),
            task(12, 11, 10, 11),
        ]);
        check_sharing(&good).unwrap();
        assert_eq!(
            clone_flags(&good.tasks[2]),
            (libc::CLONE_FILES | libc::CLONE_FS) as u64
        );
        assert_eq!(clone_flags(&good.tasks[0]), 0);
        // A table shared with a process that is not the parent's.
        let bad = inv(vec![
            task(10, 1, 0, 0),
            task(11, 10, 0, 0),
            task(12, 11, 10, 0),
        ]);
        let e = check_sharing(&bad).unwrap_err().to_string();
        assert!(e.contains("task 12 shares the fd table of 10"), "{e}");
        // The root shares nothing of the tree's.
        let bad = inv(vec![task(10, 1, 0, 1)]);
        assert!(check_sharing(&bad).is_err());
    }
}

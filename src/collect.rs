//! What crust reads of a frozen process from /proc alone, without tracing
//! it: its address space and the pages present in it, and what /proc shows
//! of its threads. A dump (and a pre-dump) reads each process one ahead,
//! in a thread of its own, while crust's main thread works in the process
//! before it through ptrace (`read_ahead`). The kernel takes ptrace
//! requests for a task only from the thread that seized it, so that side
//! stays on one thread; on a tree of small processes these reads are a
//! quarter of the work, and the second core does them meanwhile.
//!
//! Nothing here changes a process, and no process of a dumped tree shares
//! its memory with another (`dump::check_tree`): reading one while the
//! parasite works in the one before reads what the freeze left.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use crate::abi;
use crate::images::pb::{MmEntry, Sched, VmaEntry};
use crate::proc;
use crate::resources::memtrack::Ranges;
use crate::resources::{creds, memory, sched, timers};
use crate::sys;

/// A process's memory as /proc shows it.
pub struct Memory {
    pub mm: MmEntry,
    /// Deleted files it maps: the dump keeps them (`memory::add_ghosts`).
    pub ghosts: Vec<memory::MappedGhost>,
    /// When its VMAs (smaps) were read, and its pages (pagemap) found,
    /// from the start of the read.
    pub vmas_read: Duration,
    pub pages_found: Duration,
    /// Whether the pages the chain keeps are chosen already
    /// (`mm.prev_pages`, from `held`): the chain's `select` is not to
    /// choose again.
    pub chained: bool,
}

impl Memory {
    /// Reads the mappings and pages of `pid`; `parent`: its parent's PID
    /// and VMAs when the parent is in the dump (`memory::scan_pages`).
    /// `held`: the pages of `pid` a chain's parent holds, when tracking
    /// may say which of them stay as they are (`Chain::held_for_reading`).
    pub fn read(
        pid: i32,
        parent: Option<(i32, &[VmaEntry])>,
        held: Option<&Ranges>,
    ) -> Result<Memory> {
        let t = Instant::now();
        let ahead = memory::prefetch_pagemap(pid, held.cloned());
        let (mut mm, ghosts) =
            memory::read_mm(pid).with_context(|| format!("PID {pid}: memory"))?;
        let vmas_read = t.elapsed();
        let pre = memory::prefetched(ahead);
        let chained = memory::scan_pages(pid, &mut mm, parent, pre)?;
        Ok(Memory {
            mm,
            ghosts,
            vmas_read,
            pages_found: t.elapsed(),
            chained,
        })
    }
}

/// What /proc shows of one thread.
pub struct Thread {
    pub status: proc::Status,
    pub comm: String,
    pub sched: Sched,
    /// The robust futex list's head and length (0, 0 when unreadable).
    pub robust_list: (u64, u64),
}

impl Thread {
    fn read(pid: i32, tid: i32) -> Result<Thread> {
        Ok(Thread {
            status: proc::status(tid)?,
            comm: std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .unwrap_or_default()
                .trim_end()
                .to_string(),
            sched: sched::dump_sched(tid),
            robust_list: sys::get_robust_list(nix::unistd::Pid::from_raw(tid)).unwrap_or((0, 0)),
        })
    }
}

/// What /proc shows of a process, its threads in the order given.
pub struct Process {
    pub status: proc::Status,
    pub memory: Memory,
    pub threads: Vec<Thread>,
    pub personality: u32,
    pub oom_score_adj: i32,
    pub loginuid: u32,
    pub posix_timers: Vec<abi::PosixTimer>,
}

impl Process {
    pub fn read(
        pid: i32,
        tids: &[i32],
        parent: Option<(i32, &[VmaEntry])>,
        held: Option<&Ranges>,
    ) -> Result<Process> {
        Ok(Process {
            status: proc::status(pid)?,
            memory: Memory::read(pid, parent, held)?,
            threads: tids
                .iter()
                .map(|&tid| Thread::read(pid, tid))
                .collect::<Result<_>>()?,
            personality: std::fs::read_to_string(format!("/proc/{pid}/personality"))
                .ok()
                .and_then(|s| u32::from_str_radix(s.trim(), 16).ok())
                .unwrap_or(0),
            oom_score_adj: std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0),
            loginuid: creds::dump_loginuid(pid)?,
            posix_timers: timers::list_posix_timers(pid)?,
        })
    }
}

/// What `read_ahead` keeps of each process it read: the VMAs its children
/// compare theirs with.
pub trait HasMemory {
    fn memory(&self) -> &Memory;
}

impl HasMemory for Memory {
    fn memory(&self) -> &Memory {
        self
    }
}

impl HasMemory for Process {
    fn memory(&self) -> &Memory {
        &self.memory
    }
}

/// Reads each of `tasks` (PID and parent's PID, parents first) with
/// `read(index, parent)` in a thread of its own, one process ahead of
/// `body(index, what was read)`, which gets them in order on the calling
/// thread. The first error of either ends both, and is returned.
pub fn read_ahead<T, R, B>(tasks: &[(i32, i32)], read: R, mut body: B) -> Result<()>
where
    T: HasMemory + Send,
    R: Fn(usize, Option<(i32, &[VmaEntry])>) -> Result<T> + Sync,
    B: FnMut(usize, T) -> Result<()>,
{
    std::thread::scope(|s| {
        // One read waiting, one under way: a big process's pagemap runs
        // are not held for long.
        let (tx, rx) = mpsc::sync_channel::<Result<T>>(1);
        let read = &read;
        std::thread::Builder::new()
            .name("read-ahead".into())
            .spawn_scoped(s, move || {
                let mut vmas_of: HashMap<i32, Vec<VmaEntry>> = HashMap::new();
                for (i, &(pid, ppid)) in tasks.iter().enumerate() {
                    let parent = vmas_of.get(&ppid).map(|v| (ppid, v.as_slice()));
                    let r = read(i, parent);
                    // Kept only for a parent of processes still to come.
                    let has_children = tasks[i + 1..].iter().any(|&(_, pp)| pp == pid);
                    if let (Ok(t), true) = (&r, has_children) {
                        vmas_of.insert(pid, t.memory().mm.vmas.clone());
                    }
                    let failed = r.is_err();
                    // A closed channel: the body failed and is gone.
                    if tx.send(r).is_err() || failed {
                        return;
                    }
                }
            })
            .context("starting the thread that reads processes ahead")?;
        for i in 0..tasks.len() {
            let t = rx
                .recv()
                .map_err(|_| anyhow!("the thread reading processes ahead ended early"))??;
            body(i, t)?;
        }
        Ok(())
    })
}

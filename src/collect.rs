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
use crate::images::pb::{MmEntry, PagemapEntry, Sched, VmaEntry};
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
    /// `parasite`: the region of a parasite in it already, not one of its
    /// mappings.
    pub fn read(
        pid: i32,
        parent: Option<(i32, &[VmaEntry])>,
        held: Option<&Ranges>,
        parasite: Option<(u64, u64)>,
    ) -> Result<Memory> {
        let t = Instant::now();
        let ahead = memory::prefetch_pagemap(pid, held.cloned());
        Self::from_smaps(pid, parent, parasite, t, || Ok(memory::prefetched(ahead)))
    }

    /// Reads smaps, then picks the pages with the pagemap `pre` gives
    /// (read meanwhile); `t`: when the read began.
    fn from_smaps(
        pid: i32,
        parent: Option<(i32, &[VmaEntry])>,
        parasite: Option<(u64, u64)>,
        t: Instant,
        pre: impl FnOnce() -> Result<memory::Prefetched>,
    ) -> Result<Memory> {
        let (mut mm, ghosts) =
            memory::read_mm(pid).with_context(|| format!("PID {pid}: memory"))?;
        without_parasite(&mut mm.vmas, parasite);
        let vmas_read = t.elapsed();
        let chained = memory::scan_pages(pid, &mut mm, parent, &pre()?)?;
        Ok(Memory {
            mm,
            ghosts,
            vmas_read,
            pages_found: t.elapsed(),
            chained,
        })
    }
}

/// Leaves a parasite's mapping out of a process's: shared anonymous
/// memory, it never merges with another.
fn without_parasite<T>(maps: &mut Vec<T>, parasite: Option<(u64, u64)>)
where
    T: Bounds,
{
    if let Some(region) = parasite {
        maps.retain(|m| m.bounds() != region);
    }
}

/// A mapping's [start, end).
trait Bounds {
    fn bounds(&self) -> (u64, u64);
}

impl Bounds for VmaEntry {
    fn bounds(&self) -> (u64, u64) {
        (self.start, self.end)
    }
}

impl Bounds for proc::MapsEntry {
    fn bounds(&self) -> (u64, u64) {
        (self.start, self.end)
    }
}

/// A big process's pages found before its VMAs are read: the dump
/// streams them while smaps is read beside it (both cores busy, where the
/// stream otherwise waits for smaps, the longest walk of a final dump).
/// Only where tracking tells which pages a chain keeps (`held`): that walk
/// is shorter than smaps', and the stream is all that is left to wait for.
/// The parasite is in already: smaps' walk holds the address space's lock
/// for reading, VMA after VMA, and the parasite's mmap would wait for it.
///
/// The pages are found as `memory::scan_pages` finds them, with the
/// mappings /proc/PID/maps shows for VMAs (`memory::maps_vmas`: what smaps
/// adds, a mapping's flags, may leave a page out, as MAP_DROPPABLE does).
/// `finish` gives the process's memory read with its VMAs; the stream is
/// right when its `mm.pagemap` is `runs`, and is made again otherwise.
pub struct PagesAhead {
    /// The pages to store, in address order.
    pub runs: Vec<PagemapEntry>,
    /// The mappings they were found in.
    pub vmas: Vec<VmaEntry>,
    smaps: std::thread::JoinHandle<Result<Memory>>,
}

impl PagesAhead {
    /// Finds the pages of `pid` to store, with `held` the pages of it a
    /// chain's parent holds, while a thread of its own reads smaps (and
    /// goes on after); `parasite`: the parasite's region. None for a small
    /// process, one with a mapping only smaps tells the kind of, or when
    /// tracking cannot tell which pages stay (every page is then read and
    /// the chain chooses: `Chain::select`, after the pages are found).
    fn start(pid: i32, held: &Ranges, parasite: (u64, u64)) -> Result<Option<PagesAhead>> {
        let t = Instant::now();
        if !memory::is_big(pid) {
            return Ok(None);
        }
        let mut maps = proc::maps(pid)?;
        without_parasite(&mut maps, Some(parasite));
        let Some(vmas) = memory::maps_vmas(&maps) else {
            return Ok(None);
        };
        let (pre_tx, pre_rx) = mpsc::channel::<memory::Prefetched>();
        let smaps = std::thread::Builder::new()
            .name("smaps".into())
            .spawn(move || -> Result<Memory> {
                Memory::from_smaps(pid, None, Some(parasite), t, || {
                    pre_rx
                        .recv()
                        .map_err(|_| anyhow!("PID {pid}: its pagemap was not read"))
                })
            })
            .context("starting the thread that reads smaps")?;
        let pre = memory::read_pagemap(pid, &maps, Some(held.clone()));
        if pre.left_to_chain.is_none() {
            // (The smaps thread ends without the pagemap, unwaited for.)
            return Ok(None);
        }
        let found = memory::find_pages(pid, &vmas, None, &pre);
        let _ = pre_tx.send(pre);
        match found {
            Ok(f) => Ok(Some(PagesAhead {
                runs: f.runs,
                vmas,
                smaps,
            })),
            Err(e) => {
                let _ = smaps.join();
                Err(e)
            }
        }
    }

    /// The process's memory, its VMAs read.
    pub fn finish(self) -> Result<Memory> {
        self.smaps
            .join()
            .map_err(|_| anyhow!("the thread reading smaps panicked"))?
    }
}

/// A process's memory as read: whole, or its pages found ahead of its
/// VMAs (`PagesAhead`).
pub enum MemoryRead {
    Whole(Box<Memory>),
    Ahead(PagesAhead),
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

/// How a process's memory is to be read.
#[derive(Clone, Copy, Default)]
pub struct MemoryPlan<'a> {
    /// The pages of it a chain's parent holds, when tracking may say
    /// which of them stay as they are (`Chain::held_for_reading`).
    pub held: Option<&'a Ranges>,
    /// Whether its pages may be found before its VMAs are read
    /// (`PagesAhead`, with `held` and `parasite`): they go into a pages
    /// image of this dump as they come, and no process read later is its
    /// child.
    pub ahead: bool,
    /// The region of a parasite in it already: not one of its mappings.
    pub parasite: Option<(u64, u64)>,
}

/// What /proc shows of a process, its threads in the order given.
pub struct Process {
    pub status: proc::Status,
    pub memory: MemoryRead,
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
        plan: MemoryPlan,
    ) -> Result<Process> {
        let status = proc::status(pid)?;
        let early = match (plan.held, plan.parasite) {
            (Some(h), Some(region)) if plan.ahead && parent.is_none() => {
                PagesAhead::start(pid, h, region)?
            }
            _ => None,
        };
        let memory = match early {
            Some(a) => MemoryRead::Ahead(a),
            None => MemoryRead::Whole(Box::new(Memory::read(
                pid,
                parent,
                plan.held,
                plan.parasite,
            )?)),
        };
        Ok(Process {
            status,
            memory,
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
/// compare theirs with (None while they are read: a process with
/// children is read whole).
pub trait HasMemory {
    fn vmas(&self) -> Option<&[VmaEntry]>;
}

impl HasMemory for Memory {
    fn vmas(&self) -> Option<&[VmaEntry]> {
        Some(&self.mm.vmas)
    }
}

impl HasMemory for Process {
    fn vmas(&self) -> Option<&[VmaEntry]> {
        match &self.memory {
            MemoryRead::Whole(m) => m.vmas(),
            MemoryRead::Ahead(_) => None,
        }
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
                    if let (Ok(t), true) = (&r, has_children)
                        && let Some(v) = t.vmas()
                    {
                        vmas_of.insert(pid, v.to_vec());
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

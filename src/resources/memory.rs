//! Memory: the VMAs of a task and the pages it wrote.
//!
//! Dump: VMAs come from /proc/PID/smaps, the pages to keep from
//! /proc/PID/pagemap (present or swapped pages of anonymous memory, and the
//! private copies a task made of file pages); the parasite checksums and
//! vmsplices them into its page pipes, and a second thread of crust splices
//! the full pipes into `pages-PID.img` while the parasite fills the next.
//!
//! Restore: each VMA is premapped in a hole of the address space that
//! neither crust nor the task uses, filled from the pages image, and moved
//! into place by the restorer with mremap.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::files::TreeObjects;
use super::memtrack::Ranges;
use crate::abi::{self, IoVec, VmaMove};
use crate::images::pb::{MmEntry, PagemapEntry, VmaEntry, VmaKind};
use crate::images::{PageSink, PagesImage};
use crate::parasite_ctl::{Next, Parasite};
use crate::proc::{self, MapsEntry};

const PAGE: u64 = abi::PAGE_SIZE;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;
/// The page is a guard region (MADV_GUARD_INSTALL; Linux 6.15 reports it).
const PM_GUARD: u64 = 1 << 58;
/// mmap(2) type of memory the kernel may drop under pressure (Linux 6.11).
const MAP_DROPPABLE: i32 = 0x08;

// ---------------------------------------------------------------- dump ---

fn classify(e: &MapsEntry) -> Result<Option<VmaKind>> {
    Ok(Some(match e.path.as_str() {
        "[vsyscall]" => return Ok(None),
        "[vdso]" => VmaKind::VmaVdso,
        "[vvar]" => VmaKind::VmaVvar,
        "[vvar_vclock]" => VmaKind::VmaVvarVclock,
        "/dev/zero (deleted)" | "/dev/zero" if e.shared => VmaKind::VmaAnonShared,
        p if e.inode == 0 && (p.is_empty() || p.starts_with('[')) => {
            if p.starts_with('[') && !matches!(p, "[heap]" | "[stack]") && !p.starts_with("[anon:")
            {
                bail!(
                    "mapping {:#x}-{:#x} is {p}, which crust cannot restore yet",
                    e.start,
                    e.end
                );
            }
            if e.shared {
                VmaKind::VmaAnonShared
            } else {
                VmaKind::VmaAnonPrivate
            }
        }
        // An AIO context's ring (shown as a deleted file).
        p if super::aio::is_ring(p) => VmaKind::VmaAioRing,
        // A deleted file or a memfd: its contents go into the image
        // (`ghost`); SysV shared memory shows as a deleted /SYSV file.
        p if super::ghost::is_ghost_path(p) && !p.starts_with("/SYSV") => {
            if e.shared {
                VmaKind::VmaFileShared
            } else {
                VmaKind::VmaFilePrivate
            }
        }
        p if p.starts_with("/SYSV") && e.shared => VmaKind::VmaSysvShm,
        p if p.starts_with("/SYSV") => {
            bail!(
                "mapping {:#x}-{:#x} is {p}, which crust cannot restore yet",
                e.start,
                e.end
            )
        }
        p if p.starts_with('/') => {
            if e.shared {
                VmaKind::VmaFileShared
            } else {
                VmaKind::VmaFilePrivate
            }
        }
        // A socket's mapping: the rings of a packet socket of the tree
        // (`packet_sk::tree_read` refused any other before this is read).
        p if p.starts_with("socket:[") => VmaKind::VmaPacketRing,
        p => bail!(
            "mapping {:#x}-{:#x} is {p:?}, which crust cannot restore yet",
            e.start,
            e.end
        ),
    }))
}

/// A mapping of a deleted file, whose contents the dump keeps as a ghost
/// file (`GhostStore::add`, in the dump's order: `add_ghosts`).
pub struct MappedGhost {
    /// The mapping's /proc/PID/map_files entry.
    proc_path: String,
    /// The path /proc shows ("... (deleted)").
    shown: String,
    whose: String,
}

/// Hands the ghost store the deleted files `read_mm` found mapped.
pub fn add_ghosts(ghosts: &super::ghost::GhostStore, mapped: &[MappedGhost]) -> Result<()> {
    for g in mapped {
        ghosts.add(&g.proc_path, &g.shown, &g.whose, None)?;
    }
    Ok(())
}

/// The PROT_* bits of a mapping.
fn prot_of(e: &MapsEntry) -> u32 {
    (e.read as u32 * libc::PROT_READ as u32)
        | (e.write as u32 * libc::PROT_WRITE as u32)
        | (e.exec as u32 * libc::PROT_EXEC as u32)
}

/// Collects the address space of a task, without its pages, and the
/// deleted files it maps. Reads /proc only (any thread of crust's may).
pub fn read_mm(pid: i32) -> Result<(MmEntry, Vec<MappedGhost>)> {
    let mut mapped_ghosts = Vec::new();
    let stat = proc::stat_fields(pid)?;
    let f = |n| proc::stat_field(&stat, n);
    let mut mm = MmEntry {
        start_code: f(26),
        end_code: f(27),
        start_stack: f(28),
        start_data: f(45),
        end_data: f(46),
        start_brk: f(47),
        arg_start: f(48),
        arg_end: f(49),
        env_start: f(50),
        env_end: f(51),
        auxv: proc::auxv(pid)?,
        exe_path: std::fs::read_link(format!("/proc/{pid}/exe"))?
            .to_string_lossy()
            .into_owned(),
        ..Default::default()
    };
    for e in proc::smaps(pid)? {
        let Some(kind) = classify(&e)? else { continue };
        let mut v = VmaEntry {
            start: e.start,
            end: e.end,
            prot: prot_of(&e),
            kind: kind as i32,
            growsdown: e.has_flag("gd"),
            noreserve: e.has_flag("nr"),
            droppable: e.has_flag("dp"),
            advice: abi::VMA_ADVICE
                .iter()
                .filter(|(_, flag, _)| e.has_flag(flag))
                .fold(0, |bits, (bit, _, _)| bits | bit),
            name: if e.path.starts_with('[') {
                e.path.clone()
            } else {
                String::new()
            },
            ..Default::default()
        };
        if kind == VmaKind::VmaPacketRing {
            // The socket is made again before the tree forks; its rings
            // are mapped from it (`premap_vma`).
            v.ino = e.inode;
            v.map_shared = e.shared;
            v.name = e.path.clone();
        }
        if kind == VmaKind::VmaAioRing {
            v.aio = Some(super::aio::dump_ring(pid, e.start, e.end)?);
        }
        if e.path == "[heap]" {
            mm.brk = e.end;
        }
        if kind == VmaKind::VmaAnonShared {
            // Its shmem inode tells which processes share it.
            let mf = format!("/proc/{pid}/map_files/{:x}-{:x}", e.start, e.end);
            let md = std::fs::metadata(&mf).with_context(|| format!("stat {mf}"))?;
            v.dev = md.dev();
            v.ino = md.ino();
            v.pgoff = e.offset;
        }
        if kind == VmaKind::VmaSysvShm {
            // The shm file's inode number is the segment id.
            let mf = format!("/proc/{pid}/map_files/{:x}-{:x}", e.start, e.end);
            let md = std::fs::metadata(&mf).with_context(|| format!("stat {mf}"))?;
            v.shmid = md.ino() as i32;
            if !mm.sysv_shms.iter().any(|s| s.id == v.shmid) {
                mm.sysv_shms.push(super::sysv::read_shm(pid, &v, e.offset)?);
            }
        }
        if matches!(kind, VmaKind::VmaFilePrivate | VmaKind::VmaFileShared) {
            let mf = format!("/proc/{pid}/map_files/{:x}-{:x}", e.start, e.end);
            let md = std::fs::metadata(&mf).with_context(|| format!("stat {mf}"))?;
            v.path = e.path.clone();
            if super::ghost::is_ghost_path(&e.path) {
                v.ghost = true;
                v.path = e.path.trim_end_matches(" (deleted)").to_string();
                mapped_ghosts.push(MappedGhost {
                    proc_path: mf.clone(),
                    shown: e.path.clone(),
                    whose: format!("PID {pid} mapping {:#x}-{:#x}", e.start, e.end),
                });
            }
            v.pgoff = e.offset;
            v.file_size = md.size();
            v.dev = md.dev();
            v.ino = md.ino();
            v.open_flags = if e.shared && e.has_flag("mw") {
                libc::O_RDWR as u32
            } else {
                libc::O_RDONLY as u32
            };
        }
        mm.vmas.push(v);
    }
    // brk can sit below the end of [heap] only when the heap was never grown;
    // the kernel's own value is authoritative where stat gives it.
    if mm.brk == 0 {
        mm.brk = mm.start_brk;
    }
    Ok((mm, mapped_ghosts))
}

/// Whether a page of this VMA holds data only the images can bring back.
fn page_needed(kind: VmaKind, pm: u64) -> bool {
    match kind {
        VmaKind::VmaAnonPrivate | VmaKind::VmaAnonShared => pm & (PM_PRESENT | PM_SWAPPED) != 0,
        // A private file page that is no longer the file's page is the task's copy.
        VmaKind::VmaFilePrivate => {
            pm & PM_SWAPPED != 0 || (pm & PM_PRESENT != 0 && pm & PM_FILE == 0)
        }
        _ => false,
    }
}

const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// The frame number of the kernel's shared zero page, which an anonymous
/// page maps after a read and before any write; such pages hold nothing to
/// store. None when pagemap hides frame numbers (no CAP_SYS_ADMIN).
fn zero_page_pfn() -> Option<u64> {
    // SAFETY: a fresh private anonymous page of our own, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE as usize,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: reading the page maps the zero page; then it is unmapped.
    let pfn = unsafe {
        std::ptr::read_volatile(p as *const u8);
        let pm = File::open("/proc/self/pagemap").ok();
        let mut e = [0u8; 8];
        let ok = pm.is_some_and(|f| f.read_exact_at(&mut e, p as u64 / PAGE * 8).is_ok());
        libc::munmap(p, PAGE as usize);
        if ok {
            u64::from_le_bytes(e) & PM_PFN_MASK
        } else {
            0
        }
    };
    (pfn != 0).then_some(pfn)
}

/// Whether `a` and `b` are the same private VMA (anonymous, or of the same
/// file at the same offset) at the same place: a child's then starts from
/// its parent's copy at restore, sharing what they shared copy-on-write.
fn same_private(a: &VmaEntry, b: &VmaEntry) -> bool {
    a.start == b.start
        && a.end == b.end
        && a.kind() == b.kind()
        && match a.kind() {
            VmaKind::VmaAnonPrivate => true,
            VmaKind::VmaFilePrivate => {
                (a.dev, a.ino, a.pgoff, a.ghost) == (b.dev, b.ino, b.pgoff, b.ghost)
            }
            _ => false,
        }
}

/// Appends page `addr` of the VMA starting at `vma_start` to the runs,
/// extending the last run when adjacent within the same VMA (a run never
/// spans two VMAs: each is filled through its own premapped copy).
fn push_page(runs: &mut Vec<PagemapEntry>, vma_start: u64, addr: u64) {
    match runs.last_mut() {
        Some(r) if r.vaddr >= vma_start && r.vaddr + r.nr_pages * PAGE == addr => r.nr_pages += 1,
        _ => runs.push(PagemapEntry {
            vaddr: addr,
            nr_pages: 1,
        }),
    }
}

/// What `prefetch_pagemap` read.
#[derive(Default)]
pub struct Prefetched {
    /// Pagemap entries per mapping (start, end); zeros where
    /// `left_to_chain` is.
    pub entries: std::collections::HashMap<(u64, u64), Vec<u8>>,
    /// With the pages a chain's parent holds (`held`): those of them
    /// tracking shows unchanged and still present
    /// (`memtrack::unchanged_present`), which the dump leaves to the chain
    /// without reading their pagemap. None without `held`, or when
    /// tracking could not tell (the dump then reads every page's entry).
    pub left_to_chain: Option<Ranges>,
}

/// Resident memory past which a task's pagemap is read by a second thread
/// while crust reads its smaps (both walk every page table entry, each
/// costs about 25 ms per GiB here; the task is frozen meanwhile).
const PREFETCH_MIN: u64 = 64 << 20;

/// The pages of `held` that the task need not store: unchanged since
/// tracking was armed, and present as they were (None: tracking could not
/// tell; logged). `maps`: the task's /proc/PID/maps.
fn left_to_chain(pid: i32, maps: &[MapsEntry], held: &[(u64, u64)]) -> Option<Ranges> {
    match super::memtrack::unchanged_present(pid, maps) {
        Ok(u) => Some(super::memtrack::intersect(&u, held)),
        Err(e) => {
            tracing::debug!("PID {pid}: reading every page's entry: {e:#}");
            None
        }
    }
}

/// The pagemap reading `prefetch_pagemap` started: in a thread of its
/// own, or left to `prefetched`.
pub struct Ahead {
    pid: i32,
    /// The pages a chain's parent holds, when `prefetched` is to find
    /// those left to the chain itself (no thread took them).
    held: Option<Ranges>,
    thread: Option<std::thread::JoinHandle<Prefetched>>,
}

/// The task's resident memory, in bytes (0 when unreadable).
pub fn resident(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * PAGE
}

/// Whether a task is big enough for its pagemap to be read by a thread of
/// its own (`prefetch_pagemap`, `collect::PagesAhead`).
pub fn is_big(pid: i32) -> bool {
    resident(pid) >= PREFETCH_MIN
}

/// Reads the task's pagemap per mapping of `maps` (its /proc/PID/maps);
/// with `held`, finds the pages left to the chain first, and reads no
/// entry of theirs.
pub fn read_pagemap(pid: i32, maps: &[MapsEntry], held: Option<Ranges>) -> Prefetched {
    let mut out = Prefetched::default();
    let Ok(pm) = File::open(format!("/proc/{pid}/pagemap")) else {
        return out;
    };
    out.left_to_chain = held.and_then(|h| left_to_chain(pid, maps, &h));
    let skip = out.left_to_chain.clone().unwrap_or_default();
    for e in maps.iter().filter(|e| !e.path.starts_with("[v")) {
        let mut b = vec![0u8; ((e.end - e.start) / PAGE * 8) as usize];
        let read = super::memtrack::subtract(&[(e.start, e.end)], &skip);
        let whole = read.iter().all(|&(s, t)| {
            let at = ((s - e.start) / PAGE * 8) as usize;
            let len = ((t - s) / PAGE * 8) as usize;
            pm.read_exact_at(&mut b[at..at + len], s / PAGE * 8).is_ok()
        });
        if whole {
            out.entries.insert((e.start, e.end), b);
        }
    }
    out
}

/// Starts reading the task's pagemap, per mapping of /proc/PID/maps, in a
/// thread of its own when the task is big; `prefetched` gives what it
/// read. With `held` (the pages of the task a chain's parent holds, when
/// tracking can say which it may keep), the pages left to the chain are
/// found first, and no entry of theirs is read.
pub fn prefetch_pagemap(pid: i32, held: Option<Ranges>) -> Ahead {
    if !is_big(pid) {
        return Ahead {
            pid,
            held,
            thread: None,
        };
    }
    let read = move || match proc::maps(pid) {
        Ok(maps) => read_pagemap(pid, &maps, held),
        Err(_) => Prefetched::default(),
    };
    Ahead {
        pid,
        held: None,
        thread: std::thread::Builder::new()
            .name("pagemap".into())
            .spawn(read)
            .ok(),
    }
}

/// What `prefetch_pagemap` read; without its thread (a small task), the
/// pages left to the chain are found here.
pub fn prefetched(a: Ahead) -> Prefetched {
    match a.thread {
        Some(h) => h.join().unwrap_or_default(),
        None => Prefetched {
            left_to_chain: a.held.and_then(|h| {
                let maps = proc::maps(a.pid).ok()?;
                left_to_chain(a.pid, &maps, &h)
            }),
            ..Default::default()
        },
    }
}

/// The pages of a task to store, as `find_pages` finds them.
#[derive(Default)]
pub struct Found {
    /// Runs to store, in address order.
    pub runs: Vec<PagemapEntry>,
    /// Runs shared copy-on-write with the parent, whose image holds them.
    pub shared_runs: Vec<PagemapEntry>,
    pub guards: Vec<PagemapEntry>,
    /// Pages that hold zeros (not stored).
    pub zeros: u64,
    /// The VMAs looked at, (start, end).
    visited: Vec<(u64, u64)>,
}

/// Finds the pages of `vmas` to store, from /proc/PID/pagemap (or what
/// `pre` read of it); see `scan_pages`. Changes nothing.
pub fn find_pages(
    pid: i32,
    vmas: &[VmaEntry],
    parent: Option<(i32, &[VmaEntry])>,
    pre: &Prefetched,
) -> Result<Found> {
    let skip = pre.left_to_chain.as_deref().unwrap_or_default();
    // The next range of `skip` at or past the page looked at (pages are
    // looked at in address order).
    let mut next_skip = 0;
    let pm = File::open(format!("/proc/{pid}/pagemap")).context("opening pagemap")?;
    let parent_pm = match parent {
        Some((ppid, _)) => File::open(format!("/proc/{ppid}/pagemap")).ok(),
        None => None,
    };
    let zero_pfn = zero_page_pfn();
    let mut own = Vec::new();
    let mut pbuf = Vec::new();
    let mut f = Found::default();
    for v in vmas {
        // The kernel may drop the pages of a MAP_DROPPABLE mapping at any
        // time: they are not stored, and read as zeros after the restore.
        if v.droppable {
            continue;
        }
        let kind = v.kind();
        // Shared file mappings store no pages, but may hold guard regions.
        if matches!(
            kind,
            VmaKind::VmaVdso | VmaKind::VmaVvar | VmaKind::VmaVvarVclock
        ) {
            continue;
        }
        f.visited.push((v.start, v.end));
        let n = ((v.end - v.start) / PAGE) as usize;
        let buf = match pre.entries.get(&(v.start, v.end)) {
            Some(b) => b,
            None => {
                own.resize(n * 8, 0);
                pm.read_exact_at(&mut own, v.start / PAGE * 8)
                    .with_context(|| format!("reading pagemap of {pid}"))?;
                &own
            }
        };
        // The parent's entries for the same VMA, when it has one: the
        // restored task then starts from the parent's copy of it.
        let in_parent = parent.is_some_and(|(_, vmas)| vmas.iter().any(|p| same_private(p, v)));
        let compare = match &parent_pm {
            Some(ppm) if in_parent => {
                pbuf.resize(n * 8, 0);
                ppm.read_exact_at(&mut pbuf, v.start / PAGE * 8).is_ok()
            }
            _ => false,
        };
        for (i, c) in buf.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(c.try_into().unwrap());
            let addr = v.start + i as u64 * PAGE;
            while next_skip < skip.len() && skip[next_skip].1 <= addr {
                next_skip += 1;
            }
            if next_skip < skip.len() && skip[next_skip].0 <= addr {
                continue;
            }
            let pfn = e & PM_PFN_MASK;
            if e & PM_GUARD != 0 {
                push_page(&mut f.guards, v.start, addr);
                continue;
            }
            // A page never populated (or dropped) under write tracking
            // shows as swapped; it holds zeros.
            let zero =
                (kind == VmaKind::VmaAnonPrivate && e & PM_PRESENT != 0 && Some(pfn) == zero_pfn)
                    || super::memtrack::is_unpopulated_marker(e);
            if zero {
                f.zeros += 1;
            }
            if !page_needed(kind, e) || zero {
                continue;
            }
            let shared = compare && e & PM_PRESENT != 0 && pfn != 0 && {
                let pe = u64::from_le_bytes(pbuf[i * 8..i * 8 + 8].try_into().unwrap());
                pe & PM_PRESENT != 0 && pe & PM_PFN_MASK == pfn
            };
            push_page(
                if shared {
                    &mut f.shared_runs
                } else {
                    &mut f.runs
                },
                v.start,
                addr,
            );
        }
    }
    Ok(f)
}

/// Builds `mm.pagemap` from /proc/PID/pagemap. With the parent's VMAs
/// (`parent`: its PID and VMAs, dumped already), a private page (anonymous, or a file's copied on write)
/// the task still shares copy-on-write with its parent (the same frame in
/// both) goes into `mm.parent_pages` instead: the parent's image holds it.
///
/// `pre`: pagemap entries `prefetch_pagemap` read meanwhile, per mapping;
/// a mapping it did not read (or read with other bounds) is read here.
/// Its `left_to_chain` pages go into `mm.prev_pages`, whatever their
/// entries say: the chain's parent holds them as they are. Returns
/// whether it had them (the chain's own choice is then made).
pub fn scan_pages(
    pid: i32,
    mm: &mut MmEntry,
    parent: Option<(i32, &[VmaEntry])>,
    pre: &Prefetched,
) -> Result<bool> {
    let f = find_pages(pid, &mm.vmas, parent, pre)?;
    let pages = |r: &[PagemapEntry]| r.iter().map(|r| r.nr_pages).sum::<u64>();
    crate::stats::count(&crate::stats::PAGES_ZERO, f.zeros);
    crate::stats::count(&crate::stats::PAGES_PARENT, pages(&f.shared_runs));
    crate::stats::count(
        &crate::stats::PAGES_SCANNED,
        f.zeros + pages(&f.shared_runs) + pages(&f.runs),
    );
    crate::stats::count(&crate::stats::PAGES_WRITTEN, pages(&f.runs));
    crate::progress::add_bytes(pages(&f.runs) * PAGE);
    mm.pagemap = f.runs;
    mm.parent_pages = f.shared_runs;
    mm.guard_pages = f.guards;
    let Some(skip) = &pre.left_to_chain else {
        return Ok(false);
    };
    // Only what lies in the VMAs looked at (the chain's pages of a
    // mapping not stored at all, a droppable one, stay out).
    let prev = super::memtrack::intersect(skip, &super::memtrack::normalize(f.visited));
    let n = super::memtrack::pages_in(&prev);
    crate::stats::count(&crate::stats::PAGES_SCANNED, n);
    crate::stats::count(&crate::stats::PAGES_IN_PREV, n);
    mm.prev_pages = crate::images::chain::ranges_to_runs(&prev);
    Ok(true)
}

/// The VMAs /proc/PID/maps shows, as far as `find_pages` looks at them
/// (bounds, protection, kind): what a dump streams pages by before smaps
/// is read (`collect::PagesAhead`). None when a mapping is of a kind only
/// smaps tells apart.
pub fn maps_vmas(maps: &[MapsEntry]) -> Option<Vec<VmaEntry>> {
    let mut out = Vec::new();
    for e in maps {
        let Some(kind) = classify(e).ok()? else {
            continue;
        };
        out.push(VmaEntry {
            start: e.start,
            end: e.end,
            prot: prot_of(e),
            kind: kind as i32,
            ..Default::default()
        });
    }
    Some(out)
}

/// Leaves out of the pages to store those `unchanged` (not written since
/// the previous dump, and held by its chain): they go into
/// `mm.prev_pages`, read from the chain on restore.
pub fn leave_to_chain(mm: &mut MmEntry, unchanged: &[(u64, u64)]) {
    use super::memtrack::{intersect, pages_in, subtract};
    use crate::images::chain::{ranges_to_runs, runs_to_ranges};
    let runs = runs_to_ranges(&mm.pagemap);
    let prev = intersect(&runs, unchanged);
    let kept = subtract(&runs, unchanged);
    let n = pages_in(&prev);
    crate::stats::uncount(&crate::stats::PAGES_WRITTEN, n);
    crate::stats::count(&crate::stats::PAGES_IN_PREV, n);
    crate::progress::remove_bytes(n * PAGE);
    mm.pagemap = ranges_to_runs(&kept);
    mm.prev_pages = ranges_to_runs(&prev);
}

/// Copies the pages of `runs` from the task's memory (`mem`, its
/// /proc/PID/mem) into `sink`, with the task running: a pre-dump, whose
/// write tracking was armed while the task was frozen. A page the task
/// writes meanwhile may land torn; tracking counts it written, and the
/// next dump stores it again. A page it unmapped meanwhile reads as zeros
/// here (no later dump refers to it).
pub fn copy_pages_running(
    mem: &File,
    runs: &[PagemapEntry],
    sink: &mut dyn PageSink,
) -> Result<()> {
    const STEP: u64 = 4 << 20;
    let mut buf = vec![0u8; STEP as usize];
    for r in runs {
        let (mut at, end) = (r.vaddr, r.vaddr + r.nr_pages * PAGE);
        while at < end {
            let n = (end - at).min(STEP) as usize;
            let b = &mut buf[..n];
            if mem.read_exact_at(b, at).is_err() {
                for (i, pg) in b.chunks_mut(PAGE as usize).enumerate() {
                    if mem.read_exact_at(pg, at + i as u64 * PAGE).is_err() {
                        pg.fill(0);
                    }
                }
            }
            sink.take_bytes(b)?;
            crate::progress::bytes_done(n as u64);
            at += n as u64;
        }
    }
    Ok(())
}

/// One part of the page stream, in stream order: a filled page pipe, or
/// pages crust read itself.
enum Part {
    Pipe { pipe: usize, len: u64, crc: u32 },
    Bytes(Vec<u8>),
}

/// Streams of at least this many bytes are written in parts side by side
/// (`PageSink::split`): below it, a second part file and writer thread
/// cost more than they save.
const SPLIT_MIN: u64 = 64 << 20;

/// How many parts a stream of `bytes` is written in, side by side.
pub fn stream_parts(bytes: u64) -> usize {
    // (available_parallelism reads the cgroup's files: only for a big one.)
    if bytes >= SPLIT_MIN && std::thread::available_parallelism().is_ok_and(|n| n.get() > 1) {
        crate::images::MAX_PARTS
    } else {
        1
    }
}

/// Streams the pages of `runs` (page runs of the task's `vmas`, in the
/// order the image lists them: `mm.pagemap`, or any selection of it) into
/// `sink`. The parasite checksums and vmsplices a batch into empty page
/// pipes per trip; writer threads splice the full pipes into the sink
/// meanwhile and hand them back empty, so the next batch is taken while
/// the last is written. A big stream is cut in two halves, each spliced
/// by its own writer into its own part of the sink (one file is written
/// at the speed of one core: see `images/pages.rs`); each trip fills pipes
/// of both. Every pipe the parasite gets holds its whole batch: its
/// non-blocking vmsplice never has to wait for crust.
///
/// `last`: nothing else runs in the parasite after the stream but its
/// cure, so the stream's end does FINI's work too (one command fewer per
/// process).
pub fn dump_pages(
    parasite: &mut Parasite,
    vmas: &[VmaEntry],
    runs: &[PagemapEntry],
    sink: &mut dyn PageSink,
    last: bool,
) -> Result<()> {
    if runs.is_empty() {
        return Ok(());
    }
    // A pipe per MiB, up to the most a parasite holds: a small task gets
    // one, and the first trip's worth of pipes is all a big one needs to
    // keep the writers busy.
    let bytes: u64 = runs.iter().map(|r| r.nr_pages * PAGE).sum();
    parasite.make_pipes(bytes.div_ceil(1 << 20) as usize)?;
    let pipes: Vec<RawFd> = parasite.pipes.iter().map(|f| f.as_raw_fd()).collect();
    let parts = if pipes.len() > 1 {
        stream_parts(bytes)
    } else {
        1
    };
    let sinks = sink.split(parts)?;
    let lanes = cut_stream(
        stream_pieces(parasite.task.pid, vmas, runs),
        bytes,
        sinks.len(),
    );
    std::thread::scope(|s| {
        let (free_tx, free_rx) = mpsc::channel::<usize>();
        for i in 0..pipes.len() {
            free_tx.send(i).expect("the receiver is here");
        }
        let pipes = &pipes;
        let mut part_txs = Vec::new();
        let mut writers = Vec::new();
        for sink in sinks {
            let (part_tx, part_rx) = mpsc::channel::<Part>();
            let free_tx = free_tx.clone();
            part_txs.push(part_tx);
            writers.push(s.spawn(move || -> Result<Duration> {
                // How long the writer waited for the filler: the pipeline's stall.
                let mut idle = Duration::ZERO;
                let mut t = Instant::now();
                while let Ok(part) = part_rx.recv() {
                    idle += t.elapsed();
                    match part {
                        Part::Pipe { pipe, len, crc } => {
                            sink.take_pipe(pipes[pipe], len, crc)?;
                            crate::progress::bytes_done(len);
                            // The filler may be done already; then nobody waits for it.
                            let _ = free_tx.send(pipe);
                        }
                        Part::Bytes(data) => {
                            sink.take_bytes(&data)?;
                            crate::progress::bytes_done(data.len() as u64);
                        }
                    }
                    t = Instant::now();
                }
                Ok(idle)
            }));
        }
        // With every writer gone, the filler's wait for a pipe ends.
        drop(free_tx);
        let t = Instant::now();
        let filled = fill_pipes(parasite, lanes, &part_txs, &free_rx, last);
        drop(part_txs);
        let mut idle = Vec::new();
        let mut failed = None;
        for w in writers {
            match w.join() {
                Ok(Ok(d)) => idle.push(d),
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(_) => {
                    failed = failed.or(Some(anyhow::anyhow!("a page writer thread panicked")))
                }
            }
        }
        // A failed writer stops the filler: its error is the one to report.
        if let Some(e) = failed {
            return Err(e);
        }
        let waits = filled?;
        tracing::debug!(
            "task {}: pages streamed in {:?} by {} writers, {} trips into the parasite; the writers waited {idle:?}, the parasite {:?}",
            parasite.task.pid,
            t.elapsed(),
            idle.len(),
            waits.1,
            waits.0
        );
        Ok(())
    })
}

/// A piece of the page stream: `[start, end)` inside one run, and whether
/// crust copies it itself instead of the parasite.
type Piece = (u64, u64, bool);

/// The runs cut where the pages crust copies itself begin and end, in
/// stream order. Crust copies, rather than have the parasite vmsplice and
/// checksum them: pages vmsplice cannot read (PROT_NONE; /proc/PID/mem
/// can), and the page of the rseq area of the thread the parasite runs in.
/// The kernel writes that area each time the thread returns to user space
/// (cpu and node ids), also while earlier pages of it wait in a pipe;
/// copied by crust, the bytes written are the bytes checksummed.
fn stream_pieces(pid: nix::unistd::Pid, vmas: &[VmaEntry], runs: &[PagemapEntry]) -> Vec<Piece> {
    let rseq = crate::sys::get_rseq_conf(pid)
        .ok()
        .filter(|c| c.rseq_abi_pointer != 0)
        .map(|c| {
            let start = c.rseq_abi_pointer & !(PAGE - 1);
            let end = (c.rseq_abi_pointer + c.rseq_abi_size.max(32) as u64).next_multiple_of(PAGE);
            (start, end)
        });
    let readable = |addr: u64| {
        vmas.iter()
            .find(|v| v.start <= addr && addr < v.end)
            .is_some_and(|v| v.prot & libc::PROT_READ as u32 != 0)
    };
    runs.iter()
        .flat_map(|run| {
            let (start, end) = (run.vaddr, run.vaddr + run.nr_pages * PAGE);
            let (rs, re) = rseq.unwrap_or((end, end));
            let cuts = if readable(start) {
                [
                    (start, end.min(rs), false),
                    (start.max(rs), end.min(re), true),
                    (start.max(re), end, false),
                ]
            } else {
                [(start, end, true), (end, end, true), (end, end, true)]
            };
            cuts.into_iter().filter(|&(s, e, _)| s < e)
        })
        .collect()
}

/// Cuts the stream's pieces (`bytes` in all) into `n` consecutive lanes
/// of about equal bytes, page-aligned.
fn cut_stream(pieces: Vec<Piece>, bytes: u64, n: usize) -> Vec<VecDeque<Piece>> {
    let per = (bytes / n as u64).next_multiple_of(PAGE).max(PAGE);
    let mut lanes = vec![VecDeque::new(); n];
    let (mut lane, mut room) = (0, per);
    for (mut s, e, copy) in pieces {
        while s < e {
            let take = if lane + 1 == n {
                e - s
            } else {
                (e - s).min(room)
            };
            lanes[lane].push_back((s, s + take, copy));
            s += take;
            room -= take.min(room);
            if room == 0 && lane + 1 < n {
                lane += 1;
                room = per;
            }
        }
    }
    lanes
}

/// The batches of one trip into the parasite: per pipe to fill, its lane,
/// its number of iovecs (in `iovs`, one pipe's after the other) and its
/// bytes.
#[derive(Default)]
struct Trip {
    fills: Vec<(usize, u32, u64)>,
    iovs: Vec<IoVec>,
}

/// The filling half of `dump_pages`, in the thread that traces the task:
/// plans each trip into the parasite (a pipe of each lane in turn, a
/// quarter of the pipes per trip), loads it into the control block once
/// its pipes are free, and hands the filled pipes to the lanes' writers.
struct PipeFiller<'a> {
    lanes: Vec<VecDeque<Piece>>,
    parts: &'a [mpsc::Sender<Part>],
    free: &'a mpsc::Receiver<usize>,
    /// The task's memory, for the pieces crust copies itself.
    mem: &'a File,
    pid: i32,
    pipe_size: u64,
    per_trip: usize,
    /// The trip planned, then loaded and run: its lanes and bytes.
    trip: Trip,
    /// How long it waited for empty pipes, and its trips.
    waited: Duration,
    trips: usize,
}

impl PipeFiller<'_> {
    fn stopped(&self) -> anyhow::Error {
        anyhow::anyhow!("the page writer of task {} stopped", self.pid)
    }

    /// Plans the next trip; false when the stream is done. Pieces crust
    /// copies itself are copied on the way, in their lane's order: a piece
    /// met behind fills of the trip being planned ends the trip, and is
    /// copied once they are written.
    fn plan(&mut self) -> Result<bool> {
        self.trip = Trip::default();
        let pipe_size = self.pipe_size;
        while self.lanes.iter().any(|l| !l.is_empty()) {
            for (lane, pieces) in self.lanes.iter_mut().enumerate() {
                let Some(&(mut addr, end, copy)) = pieces.front() else {
                    continue;
                };
                if copy {
                    if !self.trip.fills.is_empty() {
                        return Ok(true);
                    }
                    while addr < end {
                        let mut data = vec![0u8; (end - addr).min(pipe_size) as usize];
                        self.mem.read_exact_at(&mut data, addr).with_context(|| {
                            format!("reading pages of task {} at {addr:#x}", self.pid)
                        })?;
                        addr += data.len() as u64;
                        let stopped =
                            || anyhow::anyhow!("the page writer of task {} stopped", self.pid);
                        self.parts[lane]
                            .send(Part::Bytes(data))
                            .map_err(|_| stopped())?;
                    }
                    pieces.pop_front();
                    continue;
                }
                // One pipe's worth of this lane, up to its next copied piece.
                let (mut nr_iovs, mut len) = (0u32, 0u64);
                while let Some(&mut (ref mut s, e, false)) = pieces.front_mut() {
                    let take = (e - *s).min(pipe_size - len);
                    self.trip.iovs.push(IoVec {
                        base: *s,
                        len: take,
                    });
                    nr_iovs += 1;
                    len += take;
                    *s += take;
                    if *s == e {
                        pieces.pop_front();
                    }
                    if len == pipe_size || self.trip.iovs.len() == abi::MAX_IOVS {
                        break;
                    }
                }
                self.trip.fills.push((lane, nr_iovs, len));
                if self.trip.fills.len() >= self.per_trip || self.trip.iovs.len() == abi::MAX_IOVS {
                    return Ok(true);
                }
            }
        }
        Ok(!self.trip.fills.is_empty())
    }

    /// Takes empty pipes for the planned trip and puts it in place.
    fn load(&mut self, ctl: &mut abi::ParasiteCtl) -> Result<()> {
        let t = Instant::now();
        let pipes = self
            .trip
            .fills
            .iter()
            .map(|_| self.free.recv().map_err(|_| self.stopped()))
            .collect::<Result<Vec<usize>>>()?;
        self.waited += t.elapsed();
        self.trips += 1;
        ctl.nr_fills = self.trip.fills.len() as u64;
        for (f, (&(_, nr_iovs, len), &pipe)) in
            ctl.fills.iter_mut().zip(self.trip.fills.iter().zip(&pipes))
        {
            *f = abi::PipeFill {
                pipe: pipe as u32,
                nr_iovs,
                len,
                ..Default::default()
            };
        }
        ctl.iovs[..self.trip.iovs.len()].copy_from_slice(&self.trip.iovs);
        Ok(())
    }

    /// The trip ran (`r`, the bytes the parasite spliced): its pipes go to
    /// their lanes' writers.
    fn landed(&mut self, ctl: &abi::ParasiteCtl) -> Result<()> {
        let want: u64 = self.trip.fills.iter().map(|f| f.2).sum();
        if ctl.ret < 0 || ctl.ret as u64 != want {
            bail!(
                "vmsplice of {want} bytes in task {} returned {}",
                self.pid,
                ctl.ret
            );
        }
        // Pages in the pipes, not yet written: the guardian closes them.
        crate::dump::fault_point("pages-in-pipes");
        for (f, &(lane, ..)) in ctl.fills.iter().zip(&self.trip.fills) {
            self.parts[lane]
                .send(Part::Pipe {
                    pipe: f.pipe as usize,
                    len: f.len,
                    crc: f.crc,
                })
                .map_err(|_| self.stopped())?;
        }
        Ok(())
    }
}

/// The filling half of `dump_pages`. With the parasite's link, one
/// streaming command takes every trip (two bytes on the link each);
/// without it, a command per trip. Returns how long it waited for empty
/// pipes, and its trips.
fn fill_pipes(
    parasite: &mut Parasite,
    lanes: Vec<VecDeque<Piece>>,
    parts: &[mpsc::Sender<Part>],
    free: &mpsc::Receiver<usize>,
    last: bool,
) -> Result<(Duration, usize)> {
    let task = parasite.task;
    // A quarter of the pipes per trip: three quarters stay queued for the
    // writers while the parasite fills the next ones, so a trip held up by
    // the scheduler does not leave a writer without pages.
    let per_trip = (parasite.pipes.len() / 4).max(lanes.len());
    let mut f = PipeFiller {
        lanes,
        parts,
        free,
        mem: &task.mem,
        pid: task.pid.as_raw(),
        pipe_size: parasite.pipe_size as u64,
        per_trip,
        trip: Trip::default(),
        waited: Duration::ZERO,
        trips: 0,
    };
    if !f.plan()? {
        return Ok((f.waited, f.trips));
    }
    f.load(parasite.ctl())?;
    if parasite.has_link() {
        let r = parasite.run_stream(abi::PARASITE_CMD_DUMP_PAGES_STREAM, &mut |ctl| {
            f.landed(ctl)?;
            if !f.plan()? {
                return Ok(if last { Next::Finish } else { Next::Quit });
            }
            f.load(ctl)?;
            Ok(Next::Batch)
        })?;
        if r != 0 {
            bail!("the page stream of task {} ended with {r}", f.pid);
        }
    } else {
        loop {
            parasite.run(abi::PARASITE_CMD_DUMP_PAGES)?;
            f.landed(parasite.ctl())?;
            if !f.plan()? {
                break;
            }
            f.load(parasite.ctl())?;
        }
    }
    Ok((f.waited, f.trips))
}

// ------------------------------------------------------------- restore ---

/// Checks that the files behind file mappings are still the ones dumped.
pub fn check_mapped_files(mm: &MmEntry) -> Result<()> {
    for v in &mm.vmas {
        if v.path.is_empty() || v.ghost {
            continue;
        }
        let md = std::fs::metadata(&v.path).map_err(|e| {
            anyhow::anyhow!(
                "mapped file {} is gone ({e}); put it back to restore",
                v.path
            )
        })?;
        if super::regular::replaced(&md, v.dev, v.ino) {
            bail!(
                "mapped file {} was replaced by another file since the dump; restore the original file",
                v.path
            );
        }
        if md.size() != v.file_size {
            bail!(
                "mapped file {} changed size since the dump ({} bytes, now {}); restore the original file",
                v.path,
                v.file_size,
                md.size()
            );
        }
    }
    Ok(())
}

/// Bytes of hole the premapped VMAs need, gaps and alignment included.
pub fn premap_size(mm: &MmEntry) -> u64 {
    mm.vmas
        .iter()
        .filter(|v| premapped(v))
        .map(|v| v.end - v.start + GAP + HUGE)
        .sum()
}

/// A transparent huge page (PMD) of x86-64.
const HUGE: u64 = 2 << 20;

/// Where in the hole, from `at` on, VMA `v` is premapped: the first
/// address at the same offset within a huge page as its final place (less
/// than `HUGE` on), so that the restorer's mremap moves whole huge pages
/// instead of splitting them.
fn premap_slot(v: &VmaEntry, at: u64) -> u64 {
    at + (v.start.wrapping_sub(at) & (HUGE - 1))
}

/// Space kept between premapped VMAs, so that none merge and a growsdown
/// stack keeps its guard gap.
const GAP: u64 = 2 << 20;

/// Whether the VMA is premapped in the hole and moved into place (SysV
/// segments are attached in place by the restorer instead).
fn premapped(v: &VmaEntry) -> bool {
    !matches!(
        v.kind(),
        VmaKind::VmaVdso | VmaKind::VmaVvar | VmaKind::VmaVvarVclock | VmaKind::VmaSysvShm
    )
}

/// Opens the file a VMA maps: by its path, or the nameless file crust
/// made again for it (`ghost`).
fn open_mapped(v: &VmaEntry, access: i32, objects: &TreeObjects) -> Result<File> {
    if v.ghost {
        let made = objects.need(
            super::ghost::ghost_key(v.dev, v.ino),
            &format!("the nameless file of mapping {}", v.path),
        )?;
        return Ok(File::from(super::files::reopen(made, access, &v.path)?));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(access == libc::O_RDWR)
        .open(&v.path)
        .with_context(|| format!("opening mapped file {}", v.path))
}

/// Opens the task's executable for PR_SET_MM_MAP: by its path, or, when it
/// was deleted (a binary upgraded under a running program), the file crust
/// made again for its mappings.
pub fn open_exe(mm: &MmEntry, objects: &TreeObjects) -> Result<File> {
    if let Some(path) = mm.exe_path.strip_suffix(" (deleted)")
        && let Some(v) = mm.vmas.iter().find(|v| v.ghost && v.path == path)
    {
        return open_mapped(v, libc::O_RDONLY, objects);
    }
    File::open(&mm.exe_path)
        .with_context(|| format!("executable {} is gone; put it back to restore", mm.exe_path))
}

/// A restored process's premapped memory, as its children inherit it at
/// fork. A child's private anonymous VMA that its parent has too (same
/// range) starts from the parent's copy, shared copy-on-write, and only the
/// pages that differ are written: memory a parent and its children shared
/// after fork stays shared after restore.
pub struct Premapped<'a> {
    pub mm: &'a MmEntry,
    pub moves: Vec<VmaMove>,
    /// Per move: whether it came from the parent (see `fill_pages`).
    pub inherited: Vec<bool>,
    /// Per move: whether its pages are left to the lazy-pages daemon
    /// (`restore --lazy-pages`): not filled here, registered with the
    /// task's userfaultfd by the restorer (`crate::lazy`).
    pub lazy: Vec<bool>,
}

impl Premapped<'_> {
    /// Where this process premapped its private VMA like `v` (`same_private`).
    /// Not when this one was premapped with huge page advice and `v` has
    /// none: the copy carries the advice, and no madvise takes it away
    /// (the restorer gives `v` its own advice, if any, over the copy's).
    fn copy_of(&self, v: &VmaEntry) -> Option<u64> {
        self.mm.vmas.iter().find(|p| {
            same_private(p, v) && (p.advice & THP_ADVICE == 0 || v.advice & THP_ADVICE != 0)
        })?;
        self.moves
            .iter()
            .find(|m| m.dst == v.start && m.len == v.end - v.start)
            .map(|m| m.src)
    }
}

/// The restorer's move for VMA `v`, premapped at `src` (SysV segments are
/// attached in place and have none).
fn move_of(v: &VmaEntry, src: u64) -> VmaMove {
    VmaMove {
        src,
        dst: v.start,
        len: v.end - v.start,
        prot: v.prot as u64,
        advice: v.advice,
        shmid: if v.kind() == VmaKind::VmaSysvShm {
            v.shmid as i64
        } else {
            -1
        },
    }
}

/// Maps every VMA of `mm` into the hole `[at, end)`, taking over what the
/// parent premapped where it can; returns the moves the restorer must make.
/// Runs in the restored task before the restorer.
pub fn premap_vmas<'a>(
    mm: &'a MmEntry,
    (mut at, end): (u64, u64),
    shared: &std::collections::HashMap<(u64, u64), (u64, u64)>,
    objects: &TreeObjects,
    parent: Option<&Premapped>,
    lazy_restore: bool,
) -> Result<Premapped<'a>> {
    let mut moves = Vec::new();
    let mut inherited = Vec::new();
    let mut lazy = Vec::new();
    for v in mm.vmas.iter().filter(|v| v.kind() == VmaKind::VmaSysvShm) {
        moves.push(move_of(v, 0));
        inherited.push(false);
        lazy.push(false);
    }
    for v in mm.vmas.iter().filter(|v| premapped(v)) {
        at = premap_slot(v, at);
        // MAP_FIXED past the hole would land on crust's own memory.
        if at + (v.end - v.start) > end {
            bail!(
                "VMA {:#x}-{:#x} does not fit in the hole planned for it; this is a bug in crust",
                v.start,
                v.end
            );
        }
        // A lazy VMA starts empty: the daemon fills it from the task's
        // own pages, and the parent's copy would be no less empty.
        let is_lazy = lazy_restore && crate::lazy::is_lazy(v);
        let copy = if is_lazy {
            None
        } else {
            parent.and_then(|p| p.copy_of(v))
        };
        match copy {
            Some(src) => take_parents_copy(v, src, at)?,
            None => premap_vma(v, at, shared, objects)?,
        }
        let mut mv = move_of(v, at);
        if is_lazy {
            mv.advice |= abi::VMA_ADV_LAZY;
        }
        moves.push(mv);
        inherited.push(copy.is_some());
        lazy.push(is_lazy);
        at += v.end - v.start + GAP;
    }
    Ok(Premapped {
        mm,
        moves,
        inherited,
        lazy,
    })
}

/// Moves the parent's premapped copy of `v` (at `src`, inherited at fork)
/// to `at` in this process's hole.
fn take_parents_copy(v: &VmaEntry, src: u64, at: u64) -> Result<()> {
    move_into_hole(src, v.end - v.start, at).with_context(|| {
        format!(
            "taking over the parent's copy of VMA {:#x}-{:#x}",
            v.start, v.end
        )
    })
}

/// Moves the whole mapping `[src, src+len)` of this process onto `at` in
/// its premap hole (mremap, MREMAP_FIXED).
pub(super) fn move_into_hole(src: u64, len: u64, at: u64) -> std::io::Result<()> {
    // SAFETY: moves a mapping this process made or inherited for the
    // restore, used by nothing else here, onto its own reserved hole.
    let p = unsafe {
        libc::mremap(
            src as *mut _,
            len as usize,
            len as usize,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            at as *mut libc::c_void,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Maps VMA `v` anew at `at` in the hole: anonymous, the tree's shared
/// object, or its file.
fn premap_vma(
    v: &VmaEntry,
    at: u64,
    shared: &std::collections::HashMap<(u64, u64), (u64, u64)>,
    objects: &TreeObjects,
) -> Result<()> {
    if v.kind() == VmaKind::VmaAioRing {
        return super::aio::premap_ring(v, at);
    }
    let len = v.end - v.start;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let fixed = libc::MAP_FIXED;
    let (prot, flags, file) = match v.kind() {
        VmaKind::VmaAnonPrivate => {
            let gd = if v.growsdown { libc::MAP_GROWSDOWN } else { 0 };
            let nr = if v.noreserve { libc::MAP_NORESERVE } else { 0 };
            // MAP_DROPPABLE is a mapping type of its own, in place of MAP_PRIVATE.
            let kind = if v.droppable {
                MAP_DROPPABLE
            } else {
                libc::MAP_PRIVATE
            };
            (rw, kind | libc::MAP_ANONYMOUS | gd | nr, None)
        }
        VmaKind::VmaAnonShared => match shared.get(&(v.dev, v.ino)) {
            // The object crust made for this shmem inode, shared by
            // every task of the tree that maps it.
            Some(&(addr, size)) => {
                let path = format!("/proc/self/map_files/{addr:x}-{:x}", addr + size);
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .with_context(|| format!("opening shared memory {path}"))?;
                (rw, libc::MAP_SHARED, Some(f))
            }
            None => (rw, libc::MAP_SHARED | libc::MAP_ANONYMOUS, None),
        },
        VmaKind::VmaFilePrivate => {
            let f = open_mapped(v, libc::O_RDONLY, objects)?;
            (rw, libc::MAP_PRIVATE, Some(f))
        }
        VmaKind::VmaFileShared => {
            let f = open_mapped(v, v.open_flags as i32 & libc::O_ACCMODE, objects)?;
            let prot = if v.open_flags as i32 & libc::O_ACCMODE == libc::O_RDWR {
                rw
            } else {
                libc::PROT_READ
            };
            (prot, libc::MAP_SHARED, Some(f))
        }
        VmaKind::VmaPacketRing => {
            let sk = objects.need(
                super::packet_sk::key(v.ino),
                &format!("the packet socket mapped at {:#x}", v.start),
            )?;
            let f = File::from(super::files::dup_fd(sk)?);
            let share = if v.map_shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            };
            (rw, share, Some(f))
        }
        _ => unreachable!(),
    };
    let fd = file.as_ref().map_or(-1, |f| f.as_raw_fd());
    // SAFETY: MAP_FIXED over the hole this process reserved for the premap.
    let p = unsafe {
        libc::mmap(
            at as *mut _,
            len as usize,
            prot,
            flags | fixed,
            fd,
            v.pgoff as i64,
        )
    };
    if p == libc::MAP_FAILED || p as u64 != at {
        bail!(
            "premapping VMA {:#x}-{:#x}: {}",
            v.start,
            v.end,
            std::io::Error::last_os_error()
        );
    }
    // The fill faults in huge pages where the task had asked for them
    // (and none where it had refused them); the restorer sets the same
    // advice again in the VMA's final place.
    if v.kind() == VmaKind::VmaAnonPrivate && v.advice & THP_ADVICE != 0 {
        let advice = if v.advice & abi::VMA_ADV_HUGEPAGE != 0 {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: advice on the VMA just premapped.
        if unsafe { libc::madvise(at as *mut _, len as usize, advice) } != 0 {
            bail!(
                "huge page advice on premapped VMA {:#x}-{:#x}: {}",
                v.start,
                v.end,
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// The huge page advice a VMA carries (smaps `hg`, `nh`).
const THP_ADVICE: u64 = abi::VMA_ADV_HUGEPAGE | abi::VMA_ADV_NOHUGEPAGE;

/// Bytes one step of the fill faults in and reads: many pages per system
/// call, few enough that the checksum finds them still in the cache.
const FILL_STEP: u64 = 4 << 20;
/// Runs shorter than this are faulted in by the read itself: a madvise
/// call per small run would cost about as much as the faults it saves.
const POPULATE_MIN: u64 = 16 * PAGE;
/// Most ranges one preadv takes (UIO_MAXIOV).
const FILL_IOVS: usize = 1024;

/// Puts the page stream of an image in place, two ways:
///
/// - Private anonymous memory without huge pages: UFFDIO_COPY from the
///   image mapped read-only allocates each page and copies into it, with
///   no fault per page and no zeroing of a page about to be overwritten.
/// - The rest (huge pages, shared and file memory, or where userfaultfd is
///   refused), in steps: each step faults its destination in with one
///   MADV_POPULATE_WRITE per run (whole huge pages where the VMA has them),
///   and reads its runs with one preadv straight into place.
///
/// Either way the bytes are checksummed while they are hot.
struct Filler<'a> {
    pages: &'a PagesImage,
    /// Offset in the stream of its next byte, and its end.
    off: u64,
    end: u64,
    crc: crc32fast::Hasher,
    /// The step being gathered: destination ranges, consecutive in the image.
    step: Vec<(u64, u64)>,
    step_len: u64,
    /// MADV_POPULATE_WRITE is there (Linux 5.14); the read faults otherwise.
    populate: bool,
    /// The userfaultfd once made (None: not yet; Some(None): refused here),
    /// the premapped VMAs registered with it, and the image's data mapped.
    uffd: Option<Option<crate::uffd::Uffd>>,
    registered: Vec<(u64, u64)>,
    src: Option<crate::images::Mapping>,
    /// Bytes placed with UFFDIO_COPY.
    copied: u64,
}

impl<'a> Filler<'a> {
    fn new(pages: &'a PagesImage) -> Self {
        Filler {
            pages,
            off: 0,
            end: pages.len(),
            crc: crc32fast::Hasher::new(),
            step: Vec::new(),
            step_len: 0,
            populate: true,
            uffd: None,
            registered: Vec::new(),
            src: None,
            copied: 0,
        }
    }

    /// Copies the next `len` bytes of the stream into `[dst, dst+len)`,
    /// missing pages of the premapped private anonymous VMA `vma`, with
    /// UFFDIO_COPY; false (nothing done) where userfaultfd is refused.
    fn copy(&mut self, vma: (u64, u64), dst: u64, len: u64) -> Result<bool> {
        if self.uffd.is_none() {
            self.uffd = Some(crate::uffd::Uffd::new().ok());
        }
        if self.uffd.as_ref().is_some_and(|u| u.is_none()) {
            return Ok(false);
        }
        // In stream order: what is queued goes first.
        self.flush()?;
        if self.off + len > self.end {
            bail!("pages image is truncated");
        }
        if self.src.is_none() {
            self.src = Some(self.pages.map(libc::MAP_SHARED)?);
        }
        let src = self.src.as_ref().expect("mapped above").addr;
        let uffd = self
            .uffd
            .as_ref()
            .and_then(|u| u.as_ref())
            .expect("made above");
        if !self.registered.contains(&vma) {
            uffd.register_missing(vma.0, vma.1 - vma.0)
                .with_context(|| format!("registering premapped memory at {:#x}", vma.0))?;
            self.registered.push(vma);
        }
        let from = src + self.off;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(FILL_STEP);
            uffd.copy(dst + done, from + done, n)
                .with_context(|| format!("placing pages at {:#x}", dst + done))?;
            // SAFETY: inside the image's data mapped above (bounds checked).
            self.crc.update(unsafe {
                std::slice::from_raw_parts((from + done) as *const u8, n as usize)
            });
            done += n;
        }
        self.off += len;
        self.copied += len;
        crate::progress::bytes_done(len);
        Ok(true)
    }

    /// Undoes what `copy` set up: the premapped VMAs must reach the
    /// restorer unregistered.
    fn finish(&mut self) -> Result<()> {
        if let Some(Some(uffd)) = &self.uffd {
            for &(s, e) in &self.registered {
                uffd.unregister(s, e - s)
                    .with_context(|| format!("unregistering premapped memory at {s:#x}"))?;
            }
        }
        self.registered.clear();
        self.uffd = None;
        self.src = None;
        Ok(())
    }

    /// Queues the next `len` bytes of the stream for `[dst, dst+len)`, a
    /// premapped, writable range of this process.
    fn queue(&mut self, mut dst: u64, len: u64) -> Result<()> {
        let end = dst + len;
        while dst < end {
            let take = (end - dst).min(FILL_STEP - self.step_len);
            match self.step.last_mut() {
                Some((a, l)) if *a + *l == dst => *l += take,
                _ => self.step.push((dst, take)),
            }
            self.step_len += take;
            dst += take;
            if self.step_len == FILL_STEP || self.step.len() == FILL_IOVS {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.step.is_empty() {
            return Ok(());
        }
        if self.populate {
            for &(a, l) in self.step.iter().filter(|(_, l)| *l >= POPULATE_MIN) {
                // SAFETY: [a, a+l) lies in a premapped, writable VMA of this process.
                let r =
                    unsafe { libc::madvise(a as *mut _, l as usize, libc::MADV_POPULATE_WRITE) };
                if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                    self.populate = false;
                    break;
                }
                // Out of memory here is out of memory in the read below,
                // which says so.
            }
        }
        let mut bufs: Vec<std::io::IoSliceMut> = self
            .step
            .iter()
            // SAFETY: each range lies in a premapped, writable VMA of this
            // process, and the ranges do not overlap.
            .map(|&(a, l)| {
                std::io::IoSliceMut::new(unsafe {
                    std::slice::from_raw_parts_mut(a as *mut u8, l as usize)
                })
            })
            .collect();
        let mut bufs = &mut bufs[..];
        let mut off = self.off;
        while !bufs.is_empty() {
            let n = self.pages.preadv(bufs, off)?;
            if n == 0 {
                bail!("pages image is truncated");
            }
            off += n as u64;
            std::io::IoSliceMut::advance_slices(&mut bufs, n);
        }
        for &(a, l) in &self.step {
            // SAFETY: the range was just filled, as above.
            self.crc
                .update(unsafe { std::slice::from_raw_parts(a as *const u8, l as usize) });
        }
        crate::progress::bytes_done(off - self.off);
        self.off = off;
        self.step.clear();
        self.step_len = 0;
        Ok(())
    }

    /// Passes over the next `len` bytes of the stream (pages the lazy-pages
    /// daemon places), after what is queued.
    fn skip(&mut self, len: u64) -> Result<()> {
        self.flush()?;
        if self.off + len > self.end {
            bail!("pages image is truncated");
        }
        self.off += len;
        crate::progress::bytes_done(len);
        Ok(())
    }

    /// Reads the next `buf.len()` bytes of the stream into `buf` (after
    /// what is queued).
    fn read(&mut self, buf: &mut [u8]) -> Result<()> {
        self.flush()?;
        self.pages.read_exact_at(buf, self.off)?;
        self.crc.update(buf);
        self.off += buf.len() as u64;
        crate::progress::bytes_done(buf.len() as u64);
        Ok(())
    }
}

/// Reads the pages image into the premapped VMAs, checking its CRC. In a
/// VMA inherited from the parent only the pages that differ are written,
/// and the pages the image does not hold are dropped (they read as zeros,
/// as they did in the dumped task), so the rest stays shared.
pub fn fill_pages(pre: &Premapped, pages: &PagesImage) -> Result<()> {
    let (expect_len, expect_crc) = (pages.len(), pages.crc());
    let mut fill = Filler::new(pages);
    let filled = fill_runs(pre, &mut fill);
    let finished = fill.finish();
    let (shared, written) = filled?;
    finished?;
    if shared + written > 0 {
        tracing::debug!("{shared} pages left shared with the parent, {written} written");
    }
    tracing::debug!(
        "{} of {expect_len} bytes of pages placed with UFFDIO_COPY, from {} part files",
        fill.copied,
        pages.nr_parts()
    );
    if fill.off != expect_len {
        bail!(
            "pages image holds {} bytes, the pagemap names {}; the images are corrupt",
            expect_len,
            fill.off
        );
    }
    // Lazy runs were skipped, unread: the lazy-pages daemon checked the
    // whole image before it took the restore's userfaultfds.
    if !pre.lazy.iter().any(|&l| l) && fill.crc.finalize() != expect_crc {
        bail!("pages image checksum mismatch; the images are corrupt");
    }
    Ok(())
}

/// The fill of `fill_pages`: the image's runs into place, in order.
/// Returns the pages of inherited VMAs left shared with the parent, and
/// those written there.
fn fill_runs(pre: &Premapped, fill: &mut Filler) -> Result<(u64, u64)> {
    let mm = pre.mm;
    let mut scratch = Vec::new();
    // Where UFFDIO_COPY places pages as a fault would: private anonymous
    // memory of this process's own (not taken from the parent), which
    // gets no huge pages (those come from faults).
    let thp_always = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| s.contains("[always]"));
    let by_copy: Vec<bool> = pre
        .moves
        .iter()
        .enumerate()
        .map(|(i, m)| {
            !pre.inherited[i]
                && mm.vmas.iter().any(|v| {
                    v.start == m.dst
                        && v.kind() == VmaKind::VmaAnonPrivate
                        && !v.droppable
                        && v.advice & abi::VMA_ADV_HUGEPAGE == 0
                        && (!thp_always || v.advice & abi::VMA_ADV_NOHUGEPAGE != 0)
                })
        })
        .collect();
    let (mut shared, mut written) = (0u64, 0u64);
    for run in &mm.pagemap {
        let len = run.nr_pages * PAGE;
        let i = pre
            .moves
            .iter()
            .position(|m| m.dst <= run.vaddr && run.vaddr + len <= m.dst + m.len)
            .with_context(|| {
                format!(
                    "pages at {:#x} lie outside every VMA; the mm image is corrupt",
                    run.vaddr
                )
            })?;
        let m = &pre.moves[i];
        if pre.lazy[i] {
            // The daemon's to place, from the image at this offset.
            fill.skip(len)?;
            continue;
        }
        let dst = m.src + (run.vaddr - m.dst);
        if by_copy[i] && fill.copy((m.src, m.src + m.len), dst, len)? {
            continue;
        }
        if !pre.inherited[i] {
            fill.queue(dst, len)?;
            continue;
        }
        // SAFETY: [dst, dst+len) lies in a premapped, writable VMA of this process.
        let buf = unsafe { std::slice::from_raw_parts_mut(dst as *mut u8, len as usize) };
        for chunk in buf.chunks_mut(256 * PAGE as usize) {
            scratch.resize(chunk.len(), 0);
            fill.read(&mut scratch)?;
            for (have, want) in chunk
                .chunks_mut(PAGE as usize)
                .zip(scratch.chunks(PAGE as usize))
            {
                if have == want {
                    shared += 1;
                } else {
                    have.copy_from_slice(want);
                    written += 1;
                }
            }
        }
    }
    fill.flush()?;
    // In an inherited VMA, what neither the image nor the parent's copy
    // (`parent_pages`) holds reads as zeros again.
    for (_, m) in pre
        .moves
        .iter()
        .enumerate()
        .filter(|&(i, _)| pre.inherited[i])
    {
        let mut keep: Vec<(u64, u64)> = mm
            .pagemap
            .iter()
            .chain(&mm.parent_pages)
            .chain(&mm.prev_pages)
            .map(|r| (r.vaddr, r.vaddr + r.nr_pages * PAGE))
            .filter(|&(s, e)| s < m.dst + m.len && e > m.dst)
            .collect();
        keep.sort_unstable();
        let mut at = m.dst;
        for (s, e) in keep.into_iter().chain([(m.dst + m.len, m.dst + m.len)]) {
            if s > at {
                drop_pages(m.src + (at - m.dst), s - at)?;
            }
            at = at.max(e);
        }
    }
    for r in &mm.parent_pages {
        let inherited = pre.moves.iter().enumerate().any(|(i, m)| {
            (pre.inherited[i] || pre.lazy[i])
                && m.dst <= r.vaddr
                && r.vaddr + r.nr_pages * PAGE <= m.dst + m.len
        });
        if !inherited {
            bail!(
                "pages at {:#x} are the parent's, but the parent has no such VMA; the images are corrupt",
                r.vaddr
            );
        }
    }
    Ok((shared, written))
}

/// Reads the pages the task left to older dumps of the chain (`links`,
/// newest first, from `images::chain::load`) into the premapped VMAs.
/// Each older image is streamed whole, its CRC checked, and the pages it is
/// to give copied out (holes a dedup punched read fast, as zeros, and are
/// never among them).
pub fn fill_from_chain(pre: &Premapped, links: &[crate::images::chain::Link]) -> Result<()> {
    use super::memtrack::intersect;
    const STEP: u64 = 4 << 20;
    let mut buf = vec![0u8; STEP as usize];
    for l in links {
        let mut crc = crc32fast::Hasher::new();
        let mut off = 0u64;
        for r in &l.runs {
            let (s, e) = (r.vaddr, r.vaddr + r.nr_pages * PAGE);
            let mut at = s;
            while at < e {
                let n = (e - at).min(STEP);
                let b = &mut buf[..n as usize];
                l.pages.read_exact_at(b, off)?;
                crc.update(b);
                for (ps, pe) in intersect(&[(at, at + n)], &l.take) {
                    let m = pre
                        .moves
                        .iter()
                        .find(|m| m.dst <= ps && pe <= m.dst + m.len)
                        .with_context(|| {
                            format!(
                                "pages at {ps:#x} lie outside every VMA; the mm image is corrupt"
                            )
                        })?;
                    let from = &b[(ps - at) as usize..(pe - at) as usize];
                    // SAFETY: [dst, dst+len) lies in a premapped, writable
                    // VMA of this process.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            (m.src + (ps - m.dst)) as *mut u8,
                            from.len(),
                        )
                    };
                    dst.copy_from_slice(from);
                }
                at += n;
                off += n;
            }
        }
        if off != l.pages.len() || crc.finalize() != l.pages.crc() {
            return Err(crate::images::ImageError::Checksum(l.pages.path().to_owned()).into());
        }
    }
    Ok(())
}

/// mlockall(MCL_FUTURE) leaves no trace in /proc but in the VMAs mapped
/// after it: the parasite's own region, just mapped, shows whether new
/// mappings are locked (`lo`) and only on fault (`lf`). smaps counts the
/// pages of every VMA it shows, which for a big task takes long: the
/// parasite's region is put below every other mapping where there is room
/// (`Parasite::infect`), and then only its own entry is read.
pub fn dump_mlockall(
    pid: i32,
    parasite: (u64, u64),
    core: &mut crate::images::pb::TaskCore,
) -> Result<()> {
    let first = proc::first_smaps_entry(pid)?;
    let e = if (first.start, first.end) == parasite {
        first
    } else {
        proc::smaps(pid)?
            .into_iter()
            .find(|e| e.start == parasite.0 && e.end == parasite.1)
            .context("the parasite's region is missing from smaps")?
    };
    if e.has_flag("lo") {
        core.mlockall = libc::MCL_FUTURE as u32;
        if e.has_flag("lf") {
            core.mlockall |= libc::MCL_ONFAULT as u32;
        }
    }
    Ok(())
}

pub fn restore_mlockall(core: &crate::images::pb::TaskCore, args: &mut abi::RestorerArgs) {
    let known = (libc::MCL_FUTURE | libc::MCL_ONFAULT) as u32;
    args.mlockall = (core.mlockall & known) as u64;
}

/// Drops private pages: they read as zeros again.
fn drop_pages(at: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: [at, at+len) is part of a private VMA we premapped; what it
    // held is dropped (a private file page reads the file's again).
    if unsafe { libc::madvise(at as *mut _, len as usize, libc::MADV_DONTNEED) } != 0 {
        bail!(
            "dropping pages at {at:#x}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Where ARCH_MAP_VDSO_64 must put the vDSO (the start of its data pages),
/// after checking that this kernel's vDSO has the dumped layout.
pub fn vdso_target(mm: &MmEntry) -> Result<u64> {
    let special: Vec<&VmaEntry> = mm
        .vmas
        .iter()
        .filter(|v| {
            matches!(
                v.kind(),
                VmaKind::VmaVdso | VmaKind::VmaVvar | VmaKind::VmaVvarVclock
            )
        })
        .collect();
    if special.is_empty() {
        return Ok(0);
    }
    let base = special.iter().map(|v| v.start).min().unwrap();
    // maps, not smaps: this runs in a restored task whose memory is in
    // place, and smaps would count all of its pages.
    let own = proc::maps(std::process::id() as i32)?;
    let own: Vec<&MapsEntry> = own
        .iter()
        .filter(|e| matches!(e.path.as_str(), "[vdso]" | "[vvar]" | "[vvar_vclock]"))
        .collect();
    let own_base = own.iter().map(|e| e.start).min().unwrap_or(0);
    let layout_of = |v: Vec<(String, u64, u64)>| {
        let mut v = v;
        v.sort();
        v
    };
    let dumped = layout_of(
        special
            .iter()
            .map(|v| (v.name.clone(), v.start - base, v.end - v.start))
            .collect(),
    );
    let here = layout_of(
        own.iter()
            .map(|e| (e.path.clone(), e.start - own_base, e.end - e.start))
            .collect(),
    );
    if dumped != here {
        bail!(
            "the vDSO of this kernel differs from the dumped one ({dumped:?} vs {here:?}); restore on the kernel that dumped"
        );
    }
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn premap_slots_keep_the_huge_page_offset_within_the_planned_slack() {
        for start in [
            0x7f00_0000_0000u64,
            0x7f00_0000_1000,
            0x7f00_001f_f000,
            0x5555_5555_4000,
        ] {
            let v = VmaEntry {
                start,
                end: start + 0x40_0000,
                ..Default::default()
            };
            for at in [
                0x1_0000_0000u64,
                0x1_0000_1000,
                0x1_001f_f000,
                0x1_0020_0000,
            ] {
                let slot = premap_slot(&v, at);
                assert_eq!(slot % HUGE, start % HUGE, "start {start:#x} at {at:#x}");
                // premap_size plans HUGE of slack per VMA.
                assert!(
                    slot >= at && slot < at + HUGE,
                    "start {start:#x} at {at:#x}"
                );
            }
        }
    }
}

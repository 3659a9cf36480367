//! The restore plan: where in the address space the premapped VMAs and the
//! restorer go. The hole must be free both in crust (whose memory is still
//! there while the task is being built) and in the task's dumped layout.

use anyhow::{Result, bail};

use super::TaskImages;
use crate::abi::{IoVec, RestorerArgs, ThreadArgs, VmaMove};
use crate::blobs::{RESTORER_BLOB, page_align};
use crate::images::pb::MmEntry;
use crate::proc;
use crate::resources::{memory, regs, seccomp};

const SEARCH_FROM: u64 = 0x1_0000_0000;
const SEARCH_TO: u64 = 0x7f00_0000_0000;
const ALIGN: u64 = 2 << 20;

/// Finds `size` bytes of address space free in this process, in `mm`, and
/// outside the `taken` ranges.
pub fn find_hole(mm: &MmEntry, size: u64, taken: &[(u64, u64)]) -> Result<u64> {
    let mut used: Vec<(u64, u64)> = proc::self_maps()?;
    used.extend(mm.vmas.iter().map(|v| (v.start, v.end)));
    used.extend_from_slice(taken);
    first_fit(used, size)
}

/// The lowest 2 MiB-aligned address from `SEARCH_FROM` where `size` bytes
/// fit with a 2 MiB margin to every range in `used`.
fn first_fit(mut used: Vec<(u64, u64)>, size: u64) -> Result<u64> {
    used.sort_unstable();
    let mut at = SEARCH_FROM;
    for (s, e) in used {
        // Keep a margin around every mapping so nothing merges with the hole.
        let (s, e) = (s.saturating_sub(ALIGN), e + ALIGN);
        if e <= at {
            continue;
        }
        if s >= at + size {
            break;
        }
        at = (e + ALIGN - 1) & !(ALIGN - 1);
    }
    if at + size > SEARCH_TO {
        bail!("no free {size}-byte hole in the address space for the restore");
    }
    Ok(at)
}

pub const RESTORER_STACK: u64 = 64 * 1024;

/// The layout of the hole: premapped VMAs first, then the restorer blob, its
/// args (with the VMA moves and the sigframe), and its stack.
#[derive(Debug, Clone, Copy)]
pub struct RestorePlan {
    pub hole_start: u64,
    pub hole_end: u64,
    pub premap_at: u64,
    pub restorer_at: u64,
    pub args_at: u64,
    pub args_size: u64,
    pub layout: ArgsLayout,
    /// Top of the main thread's stack; the threads' stacks lie below it.
    pub stack_top: u64,
}

/// The stack each restored thread other than the leader runs the restorer on.
pub const THREAD_STACK: u64 = 32 * 1024;

/// Offsets inside the restorer's args area: RestorerArgs, the VMA moves,
/// the ThreadArgs, then one rt_sigframe per thread (the leader's first).
#[derive(Debug, Clone, Copy)]
pub struct ArgsLayout {
    pub vmas_off: usize,
    pub threads_off: usize,
    pub frames_off: usize,
    pub frame_size: usize,
    /// The pending signals to queue again, 128 bytes each: the process's
    /// shared ones, then each thread's.
    pub siginfo_off: usize,
    /// Each thread's seccomp filter records (`resources::seccomp`).
    pub seccomp_off: usize,
    /// The guard regions, one `IoVec` each.
    pub guards_off: usize,
    pub size: usize,
}

impl ArgsLayout {
    pub fn new(img: &TaskImages) -> Self {
        let align = |x: usize| (x + 63) & !63;
        let vmas_off = align(std::mem::size_of::<RestorerArgs>());
        let threads_off = align(vmas_off + img.mm.vmas.len() * std::mem::size_of::<VmaMove>());
        // The leader's ThreadArgs live inside RestorerArgs; the others here.
        let others = img.core.threads.len().saturating_sub(1);
        let frames_off = align(threads_off + others * std::mem::size_of::<ThreadArgs>());
        let xsave = img
            .core
            .threads
            .iter()
            .map(|t| t.xsave.len())
            .max()
            .unwrap_or(0);
        let frame_size = align(regs::sigframe_size(xsave));
        let siginfo_off = frames_off + frame_size * img.core.threads.len().max(1);
        let nr_siginfo = img.core.shared_pending.len()
            + img
                .core
                .threads
                .iter()
                .map(|t| t.pending.len())
                .sum::<usize>();
        let seccomp_off = siginfo_off + 128 * nr_siginfo;
        let guards_off = align(
            seccomp_off
                + img
                    .core
                    .threads
                    .iter()
                    .map(seccomp::records_len)
                    .sum::<usize>(),
        );
        let size = guards_off + img.mm.guard_pages.len() * std::mem::size_of::<IoVec>();
        ArgsLayout {
            vmas_off,
            threads_off,
            frames_off,
            frame_size,
            siginfo_off,
            seccomp_off,
            guards_off,
            size,
        }
    }
}

/// Plans one process's hole, outside the holes `taken` by the other
/// processes of the tree: a child inherits its parent's premapped memory at
/// fork and must build its own beside it (`memory::Premapped`).
pub fn make_plan(img: &TaskImages, taken: &[(u64, u64)]) -> Result<RestorePlan> {
    let premap = memory::premap_size(&img.mm);
    let layout = ArgsLayout::new(img);
    let args_size = page_align(layout.size as u64);
    let blob = RESTORER_BLOB.mapped_size();
    let others = img.core.threads.len().saturating_sub(1) as u64;
    let stacks = THREAD_STACK * others + RESTORER_STACK;
    let size = premap + blob + args_size + stacks;
    let start = find_hole(&img.mm, size, taken)?;
    Ok(RestorePlan {
        hole_start: start,
        hole_end: start + size,
        premap_at: start,
        restorer_at: start + premap,
        args_at: start + premap + blob,
        args_size,
        layout,
        stack_top: start + size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn overlaps_margin(at: u64, size: u64, used: &[(u64, u64)]) -> bool {
        used.iter()
            .any(|&(s, e)| at < e + ALIGN && s.saturating_sub(ALIGN) < at + size)
    }

    #[test]
    fn empty_space_starts_at_the_bottom() {
        assert_eq!(first_fit(vec![], 10 * MIB).unwrap(), SEARCH_FROM);
    }

    #[test]
    fn hole_keeps_its_margin_and_alignment() {
        let used = vec![
            (SEARCH_FROM, SEARCH_FROM + 3 * MIB),
            // A gap too small for 8 MiB plus margins.
            (SEARCH_FROM + 9 * MIB, SEARCH_FROM + 10 * MIB),
            (0x7f00_0000_0000 - 4 * MIB, 0x7f00_0000_0000),
        ];
        let size = 8 * MIB;
        let at = first_fit(used.clone(), size).unwrap();
        assert_eq!(at % ALIGN, 0);
        assert!(!overlaps_margin(at, size, &used), "{at:#x}");
        assert!(at >= SEARCH_FROM + 10 * MIB);
    }

    #[test]
    fn a_gap_that_fits_is_taken() {
        let used = vec![
            (SEARCH_FROM, SEARCH_FROM + MIB),
            (SEARCH_FROM + 64 * MIB, SEARCH_FROM + 65 * MIB),
        ];
        let at = first_fit(used.clone(), 4 * MIB).unwrap();
        assert!(at < SEARCH_FROM + 64 * MIB);
        assert!(!overlaps_margin(at, 4 * MIB, &used));
    }

    #[test]
    fn no_room_is_an_error() {
        let used = vec![(SEARCH_FROM, SEARCH_TO)];
        assert!(first_fit(used, MIB).is_err());
    }
}

//! Chains of dumps: a dump taken with `--prev-images-dir` links its
//! directory to the previous one (`parent`, a relative symlink, as CRIU
//! does) and stores only the pages written since (`MmEntry.prev_pages`
//! names the others). Restore reads each page from the newest image of the
//! chain that stores it; dedup punches out of the older images the pages a
//! newer one replaced.
//!
//! Checksums: each pages image keeps its own CRC-32 over all its data.
//! Restore streams a parent image whole (holes read fast), checking its
//! CRC, and copies out the pages it needs; dedup, having punched holes,
//! seals the image again with the CRC of what it holds now (zeros in the
//! holes), and marks that dump `deduplicated`: restoring it alone would
//! give zeros where the holes are, so that is refused.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::pb::{Inventory, MmEntry, PagemapEntry};
use super::{ImageDir, ImageKind, PagesImage};
use crate::resources::memtrack::{Ranges, intersect, normalize, subtract};

pub const PARENT_LINK: &str = "parent";
const PAGE: u64 = crate::abi::PAGE_SIZE;

/// Start time of a process (clock ticks after boot, field 22 of stat).
pub fn start_time(pid: i32) -> u64 {
    crate::proc::stat_fields(pid)
        .map(|f| crate::proc::stat_field(&f, 22))
        .unwrap_or(0)
}

pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn runs_to_ranges(runs: &[PagemapEntry]) -> Ranges {
    runs.iter()
        .map(|r| (r.vaddr, r.vaddr + r.nr_pages * PAGE))
        .collect()
}

pub fn ranges_to_runs(r: &[(u64, u64)]) -> Vec<PagemapEntry> {
    r.iter()
        .map(|&(s, e)| PagemapEntry {
            vaddr: s,
            nr_pages: (e - s) / PAGE,
        })
        .collect()
}

/// The previous dump of a chain, as a new dump sees it.
pub struct Parent {
    pub dir: PathBuf,
    pub inv: Inventory,
}

fn read_inventory(dir: &Path, what: &str) -> Result<Inventory> {
    let d = ImageDir::open(dir).map_err(|e| {
        crate::error::refused(format!(
            "{what} {}: {e:#}; the chain of dumps is broken, pre-dump again",
            dir.display()
        ))
    })?;
    d.read_msg(ImageKind::Inventory, 0).map_err(|e| {
        crate::error::refused(format!(
            "{what} {}: {e:#}; the chain of dumps is broken, pre-dump again",
            dir.display()
        ))
    })
}

/// Whether `inv` is a dump of the tree rooted at `root` (started at
/// `start`) on this boot.
fn same_tree(inv: &Inventory, root: i32, start: u64, boot: &str) -> bool {
    inv.root_pid == root && inv.root_start_time == start && inv.boot_id == boot
}

/// Checks `prev` (relative to the new dump's directory, as with CRIU) and
/// every dump before it, and links the new directory to it. Refused in
/// one line: a directory that is no finished dump, a dump of another tree
/// (or an earlier boot), one a dedup emptied, a chain with a missing or
/// corrupt link.
pub fn link_parent(dir: &ImageDir, prev: &Path, root_pid: i32) -> Result<Parent> {
    let target = dir.path.join(prev);
    let inv = read_inventory(&target, "--prev-images-dir")?;
    let (start, boot) = (start_time(root_pid), boot_id());
    if !same_tree(&inv, root_pid, start, &boot) {
        crate::refuse!(
            "--prev-images-dir {}: it holds a dump of another tree (PID {} then, not this PID {root_pid} started at tick {start}, or an earlier boot); pre-dump this tree first",
            target.display(),
            inv.root_pid
        );
    }
    if inv.deduplicated {
        crate::refuse!(
            "--prev-images-dir {}: a dedup removed pages from it for a later dump; continue that later dump's chain",
            target.display()
        );
    }
    let mut cur = target.clone();
    loop {
        let link = cur.join(PARENT_LINK);
        if link.symlink_metadata().is_err() {
            break;
        }
        let next = link.canonicalize().map_err(|_| {
            crate::error::refused(format!(
                "{}: the parent dump it links to is missing; the chain of dumps is broken, pre-dump again",
                link.display()
            ))
        })?;
        let pinv = read_inventory(&next, "parent dump")?;
        if !same_tree(&pinv, root_pid, start, &boot) {
            crate::refuse!(
                "{}: the parent dump holds another tree; the chain of dumps is broken, pre-dump again",
                link.display()
            );
        }
        cur = next;
    }
    let link = dir.path.join(PARENT_LINK);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(prev, &link)
        .with_context(|| format!("linking {} to {}", link.display(), prev.display()))?;
    Ok(Parent {
        dir: target.canonicalize().unwrap_or(target),
        inv,
    })
}

impl Parent {
    /// The pages the chain holds for process `pid` (started at `start`):
    /// those the parent stores and those it left to its own parent. None
    /// when the parent has no such process (a new one, or a PID reused).
    pub fn pages_of(&self, pid: i32, start: u64) -> Result<Option<Ranges>> {
        if !self
            .inv
            .tasks
            .iter()
            .any(|t| t.pid == pid && t.start_time == start && !t.zombie)
        {
            return Ok(None);
        }
        let d = ImageDir {
            path: self.dir.clone(),
        };
        let mm: MmEntry = d.read_msg(ImageKind::Mm, pid).map_err(|e| {
            crate::error::refused(format!(
                "--prev-images-dir: {e:#}; the chain of dumps is broken, pre-dump again"
            ))
        })?;
        let mut r = runs_to_ranges(&mm.pagemap);
        r.extend(runs_to_ranges(&mm.prev_pages));
        Ok(Some(normalize(r)))
    }
}

/// One older image a restore reads pages from: its runs in file order,
/// and the pages to take from it.
pub struct Link {
    pub runs: Vec<PagemapEntry>,
    pub pages: PagesImage,
    pub take: Ranges,
}

/// The older images process `pid` of the dump in `dir` reads `prev` (its
/// `prev_pages`) from, newest first.
pub fn load(dir: &ImageDir, pid: i32, prev: &[PagemapEntry]) -> Result<Vec<Link>> {
    let mut need = normalize(runs_to_ranges(prev));
    let mut cur = dir.path.clone();
    let mut out = Vec::new();
    while let Some(&(addr, _)) = need.first() {
        let link = cur.join(PARENT_LINK);
        let next = link.canonicalize().map_err(|_| {
            super::ImageError::Truncated(
                link.clone(),
                format!(
                    "PID {pid}'s pages at {addr:#x} are in a parent dump, and this link to it is missing"
                ),
            )
        })?;
        let pd = ImageDir::open(&next)?;
        let mm: MmEntry = pd.read_msg(ImageKind::Mm, pid)?;
        let pages = PagesImage::open(&pd, pid)?;
        let stored = normalize(runs_to_ranges(&mm.pagemap));
        let take = intersect(&need, &stored);
        need = subtract(&need, &stored);
        let left = normalize(runs_to_ranges(&mm.prev_pages));
        if let Some(&(a, _)) = subtract(&need, &left).first() {
            return Err(super::ImageError::Truncated(
                next,
                format!("PID {pid}'s page at {a:#x} is in no image of the chain"),
            )
            .into());
        }
        if !take.is_empty() {
            out.push(Link {
                runs: mm.pagemap,
                pages,
                take,
            });
        }
        cur = next;
    }
    Ok(out)
}

/// What a dedup did.
#[derive(Default, Debug)]
pub struct Dedup {
    pub images: u64,
    pub bytes: u64,
}

/// Punches out of the older images of `top`'s chain the pages no image
/// from `top` on reads from them any more, and seals each with its new
/// checksum.
pub fn dedup(top: &Path) -> Result<Dedup> {
    let inv = read_inventory(top, "images directory")?;
    let mut done = Dedup::default();
    let top_dir = ImageDir {
        path: top.to_owned(),
    };
    for t in inv.tasks.iter().filter(|t| !t.zombie) {
        let mm: MmEntry = top_dir.read_msg(ImageKind::Mm, t.pid)?;
        let mut need = normalize(runs_to_ranges(&mm.prev_pages));
        let mut cur = top.to_owned();
        while let Ok(next) = cur.join(PARENT_LINK).canonicalize() {
            let pd = ImageDir::open(&next)?;
            let mut pinv: Inventory = pd.read_msg(ImageKind::Inventory, 0)?;
            if !pinv
                .tasks
                .iter()
                .any(|p| p.pid == t.pid && p.start_time == t.start_time && !p.zombie)
            {
                break;
            }
            let pmm: MmEntry = pd.read_msg(ImageKind::Mm, t.pid)?;
            let punched = punch(&pd, t.pid, &pmm.pagemap, &need)?;
            if punched > 0 {
                done.images += 1;
                done.bytes += punched;
                if !pinv.deduplicated {
                    pinv.deduplicated = true;
                    pd.write_msg(ImageKind::Inventory, 0, &pinv)?;
                }
            }
            need = subtract(&need, &normalize(runs_to_ranges(&pmm.pagemap)));
            cur = next;
        }
    }
    Ok(done)
}

/// Punches the pages of `runs` (the image's, in file order) outside
/// `keep` out of pages image `pid` of `dir`; reseals its checksum. Returns
/// the bytes punched (already punched ones count again: punching is
/// idempotent).
fn punch(dir: &ImageDir, pid: i32, runs: &[PagemapEntry], keep: &[(u64, u64)]) -> Result<u64> {
    let img = PagesImage::open_writable(dir, pid)?;
    let mut off = 0;
    let mut total = 0;
    for r in runs {
        let (s, e) = (r.vaddr, r.vaddr + r.nr_pages * PAGE);
        for (ps, pe) in subtract(&[(s, e)], keep) {
            img.punch(off + (ps - s), pe - ps)?;
            total += pe - ps;
        }
        off += e - s;
    }
    if total > 0 {
        img.reseal()?;
    }
    Ok(total)
}

//! `crust pre-dump`, and what a dump shares with it: the chain of dumps
//! (`--prev-images-dir`) and write tracking (`--track-mem`).
//!
//! A pre-dump saves memory only (mm and pages images, and an inventory
//! that says so). The tree is frozen while crust reads which pages to save
//! and arms write tracking; it runs again before a single page is copied:
//! crust then reads the pages through /proc/PID/mem. A page the tree
//! writes meanwhile may be saved torn, but tracking was armed before the
//! tree ran: the next dump counts it written and stores it again. The next
//! (pre-)dump stores only what was written since, and lists the rest in
//! `MmEntry.prev_pages`, read from the chain on restore.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use tracing::info;

use crate::actions::{Action, Actions};
use crate::dump;
use crate::guardian::Guardian;
use crate::images::chain::{self, Parent};
use crate::images::pb::{Inventory, MmEntry, TaskRef, VmaEntry};
use crate::images::{FORMAT_VERSION, ImageDir, ImageKind};
use crate::parasite_ctl::Parasite;
use crate::resources::ghost::GhostStore;
use crate::resources::memory;
use crate::resources::memtrack::{self, Backend, Ranges, intersect};
use crate::stats::Stats;

pub struct PreDumpOpts {
    pub pid: i32,
    pub dir: PathBuf,
    pub prev_images_dir: Option<PathBuf>,
    pub auto_dedup: bool,
    pub freeze_timeout: std::time::Duration,
    /// `--page-server`: where the pages go, if not into -D.
    pub pages: crate::page_xfer::SendArgs,
    pub actions: Actions,
}

/// `--auto-dedup` punches holes in the pages images of -D's chain: with
/// `--page-server` they are on the server's host, out of reach.
pub fn refuse_remote_dedup(dest: &crate::page_xfer::PageDest, auto_dedup: bool) -> Result<()> {
    if auto_dedup && matches!(dest, crate::page_xfer::PageDest::Remote(_)) {
        crate::refuse!(
            "--auto-dedup punches pages out of the chain's images, which --page-server sends to another host; run `crust dedup -D DIR` there once the images are together"
        );
    }
    Ok(())
}

/// A dump's place in a chain, and its write tracking.
pub struct Chain {
    parent: Option<Parent>,
    /// Tracking the parent's holder handed over, per PID.
    from_holder: HashMap<i32, OwnedFd>,
    /// Leave to the chain what tracking says was not written (`--track-mem`
    /// of a dump; always for a pre-dump).
    use_tracking: bool,
    /// Arm tracking for the next dump (a pre-dump, or a dump with
    /// --track-mem that lets the tree run on).
    arm: bool,
    backend: Backend,
    armed: Vec<(i32, OwnedFd)>,
    /// Per PID, the ranges the handed-over tracking still covers.
    still_tracked: HashMap<i32, memtrack::Ranges>,
    pub token: u64,
}

impl Chain {
    /// Checks and links the parent (before the tree is frozen).
    pub fn open(
        dir: &ImageDir,
        prev: Option<&Path>,
        root: i32,
        use_tracking: bool,
        arm: bool,
    ) -> Result<Chain> {
        let parent = prev.map(|p| chain::link_parent(dir, p, root)).transpose()?;
        let backend = if use_tracking || arm {
            memtrack::backend()
        } else {
            Backend::None
        };
        if arm && backend == Backend::None {
            crate::refuse!(
                "this kernel tracks no writes (no soft-dirty bits, no userfaultfd async write-protection; see crust check --all): nothing for a later dump to build on"
            );
        }
        let token = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ ((std::process::id() as u64) << 40);
        Ok(Chain {
            parent,
            from_holder: HashMap::new(),
            use_tracking,
            arm,
            backend,
            armed: Vec::new(),
            still_tracked: HashMap::new(),
            token,
        })
    }

    /// Takes the tracking the parent's holder kept (the tree is frozen).
    pub fn take_tracking(&mut self) {
        let Some(p) = &self.parent else { return };
        if !self.use_tracking {
            return;
        }
        if Backend::from_u32(p.inv.tracking) == Backend::None {
            tracing::warn!(
                "the previous dump in {} left no write tracking: all pages are stored",
                p.dir.display()
            );
            return;
        }
        if Backend::from_u32(p.inv.tracking) != Backend::UffdWp || self.backend != Backend::UffdWp {
            return;
        }
        if let Some(t) = memtrack::take_from_holder(&p.dir, p.inv.tracking_token) {
            self.from_holder = t.into_iter().collect();
        }
    }

    /// About how many bytes of pages task `pid` will store, asked before
    /// the tree is frozen (`dump::reserve_pages`): what userfaultfd
    /// tracking has seen written so far, and an eighth more for what is
    /// written until the freeze. 0 (no estimate) without that tracking:
    /// then the dump may store every page, or only those soft-dirty bits
    /// name, and which is not known before the freeze.
    pub fn estimate(&self, pid: i32) -> u64 {
        let tracked = self.use_tracking
            && self.backend == Backend::UffdWp
            && self
                .parent
                .as_ref()
                .is_some_and(|p| Backend::from_u32(p.inv.tracking) == Backend::UffdWp);
        if !tracked {
            return 0;
        }
        match memtrack::written_bytes(pid) {
            Ok(b) => b + b / 8,
            Err(e) => {
                tracing::debug!("PID {pid}: no estimate from tracking: {e:#}");
                0
            }
        }
    }

    /// The pages of process `pid` the chain's parent holds, when tracking
    /// can tell, before its pagemap is read, which of them stay as they
    /// are (`collect::Memory::read`, `memtrack::unchanged_present`): a
    /// final dump (tracking not armed again) from a tracked parent, of a
    /// process whose parent is not dumped with it (a child's pages shared
    /// with its parent are found by comparing their pagemaps).
    pub fn held_for_reading(&self, pid: i32, parent_dumped: bool) -> Result<Option<Ranges>> {
        let Some(parent) = &self.parent else {
            return Ok(None);
        };
        if !self.use_tracking
            || self.arm
            || parent_dumped
            || Backend::from_u32(parent.inv.tracking) != Backend::UffdWp
            || !self.from_holder.contains_key(&pid)
        {
            return Ok(None);
        }
        parent.pages_of(pid, chain::start_time(pid))
    }

    /// Leaves to the chain the pages of `mm.pagemap` tracking says were
    /// not written since the parent (the task is frozen).
    pub fn select(&mut self, pid: i32, mm: &mut MmEntry) -> Result<()> {
        let Some(parent) = &self.parent else {
            return Ok(());
        };
        if !self.use_tracking {
            return Ok(());
        }
        let unchanged = match Backend::from_u32(parent.inv.tracking) {
            Backend::UffdWp if self.from_holder.contains_key(&pid) => {
                let (unchanged, tracked) = memtrack::unchanged_uffd(pid, &mm.vmas, self.arm)?;
                self.still_tracked.insert(pid, tracked);
                unchanged
            }
            Backend::SoftDirty if self.backend == Backend::SoftDirty => {
                memtrack::unchanged_soft_dirty(pid, &mm.vmas)?
            }
            _ => return Ok(()),
        };
        let Some(held) = parent.pages_of(pid, chain::start_time(pid))? else {
            return Ok(());
        };
        memory::leave_to_chain(mm, &intersect(&unchanged, &held));
        Ok(())
    }

    /// Whether arming task `pid` needs a parasite (a new userfaultfd).
    pub fn needs_parasite(&self, pid: i32) -> bool {
        self.arm && self.backend == Backend::UffdWp && !self.from_holder.contains_key(&pid)
    }

    /// Arms tracking in task `pid` for the next dump (the task is frozen).
    pub fn arm_task(
        &mut self,
        pid: i32,
        vmas: &[VmaEntry],
        parasite: Option<&mut Parasite>,
    ) -> Result<()> {
        if !self.arm {
            return Ok(());
        }
        match self.backend {
            Backend::UffdWp => {
                let uffd = match (self.from_holder.remove(&pid), parasite) {
                    (Some(fd), _) => {
                        let armed = self.still_tracked.remove(&pid).unwrap_or_default();
                        memtrack::register_protect(fd, pid, vmas, &armed)?
                    }
                    (None, Some(p)) => memtrack::arm_uffd(p, vmas)?,
                    (None, None) => None,
                };
                self.armed.extend(uffd.map(|u| (pid, u)));
            }
            Backend::SoftDirty => memtrack::arm_soft_dirty(pid)?,
            Backend::None => {}
        }
        Ok(())
    }

    /// What the inventory records of tracking.
    pub fn tracking(&self) -> u32 {
        match self.backend {
            _ if !self.arm => 0,
            Backend::UffdWp if self.armed.is_empty() => 0,
            b => b as u32,
        }
    }

    /// The images are complete: leaves the tracking with a holder.
    pub fn finish(self, dir: &Path) -> Result<()> {
        memtrack::spawn_holder(dir, self.token, self.armed)
    }
}

/// The inventory fields that name the tree, for a chain.
pub fn identify(inv: &mut Inventory) {
    inv.root_start_time = chain::start_time(inv.root_pid);
    inv.boot_id = chain::boot_id();
    for t in &mut inv.tasks {
        t.start_time = chain::start_time(t.pid);
    }
}

/// `--auto-dedup`: the older images of the chain lose what this one replaced.
pub fn auto_dedup(dir: &Path) -> Result<()> {
    let d = chain::dedup(dir).context("--auto-dedup")?;
    info!(
        "dedup: {} MiB punched out of {} older image(s)",
        d.bytes >> 20,
        d.images
    );
    Ok(())
}

pub fn pre_dump(opts: &PreDumpOpts, mut stats: Option<&mut Stats>) -> Result<()> {
    let t0 = Instant::now();
    dump::check_not_ancestor(opts.pid)?;
    let tree = dump::collect_settled_tree(opts.pid)?;
    dump::check_tree(&tree)?;
    opts.actions.set_init_pid(opts.pid);
    opts.actions.run(Action::PreDump)?;
    // Connected before the tree is frozen, as a dump's.
    let mut dest = crate::page_xfer::PageDest::new(&opts.pages)?;
    refuse_remote_dedup(&dest, opts.auto_dedup)?;
    let dir = ImageDir::create(&opts.dir)?;
    let mut chain = Chain::open(&dir, opts.prev_images_dir.as_deref(), opts.pid, true, true)?;
    // A crust killed from here on: the guardian cures the parasites (and a
    // userfaultfd still in a task); crust's copies of the userfaultfds die
    // with it, and with them the tracking.
    let guardian = Guardian::spawn()?;
    let t_freeze = Instant::now();
    let (tree, seized) = dump::freeze_tree(opts.pid, tree, t0, opts.freeze_timeout)?;
    dump::fault_point("seized");
    chain.take_tracking();
    // Pages crust only reads: the memory of ghost files is not saved here.
    let ghosts = GhostStore::new(&dir, u64::MAX, false);
    let mut jobs = Vec::new();
    // Parents first; each process's memory read one ahead (`collect`).
    let pids: Vec<i32> = seized.iter().map(|t| t[0].pid.as_raw()).collect();
    let order = dump::with_parents(&pids, &tree);
    crate::collect::read_ahead(
        &order,
        |i, parent| crate::collect::Memory::read(order[i].0, parent, None, None),
        |i, read| {
            let task = &seized[i][0];
            let pid = task.pid.as_raw();
            let t = Instant::now();
            let mut mm = read.mm;
            memory::add_ghosts(&ghosts, &read.ghosts)?;
            let (t_mm, t_scan) = (read.vmas_read, read.pages_found);
            chain.select(pid, &mut mm)?;
            let t_select = t.elapsed();
            if chain.needs_parasite(pid) {
                let mut p = Parasite::infect(task, &guardian)?;
                dump::fault_point("infected");
                chain.arm_task(pid, &mm.vmas, Some(&mut p))?;
                p.cure()?;
            } else {
                chain.arm_task(pid, &mm.vmas, None)?;
            }
            tracing::debug!(
                "PID {pid}: smaps read at {t_mm:?}, pagemap at {t_scan:?} (ahead); tracking read in {t_select:?}, armed in {:?}",
                t.elapsed()
            );
            // Opened while the task is crust's: read once it runs again.
            let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
                .with_context(|| format!("opening /proc/{pid}/mem"))?;
            jobs.push((pid, mm, mem));
            Ok(())
        },
    )?;
    dump::fault_point("armed");
    for threads in seized {
        let mut threads = threads.into_iter();
        let leader = threads.next().expect("a process has a leader");
        for t in threads {
            t.release()?;
        }
        leader.release()?;
    }
    let frozen = t_freeze.elapsed();
    info!("tree of {} frozen for {frozen:?}", opts.pid);
    if let Some(s) = stats.as_mut() {
        s.stage("frozen: scan and tracking");
    }
    // The tree runs again and no parasite is left: the guardian has
    // nothing more to undo.
    drop(guardian);
    for (pid, mm, mem) in &jobs {
        let mut pages = dest.task(&dir, *pid)?;
        memory::copy_pages_running(mem, &mm.pagemap, &mut pages)?;
        dump::fault_point("pages-copied");
        pages.finish()?;
        dir.write_msg(ImageKind::Mm, *pid, mm)?;
    }
    // Every page durable where it went before the inventory.
    dest.finish()?;
    let mut inv = Inventory {
        format_version: FORMAT_VERSION,
        root_pid: opts.pid,
        tasks: tree
            .iter()
            .map(|n| TaskRef {
                pid: n.pid,
                ppid: n.ppid,
                pgid: n.pgid,
                sid: n.sid,
                zombie: n.zombie,
                ..Default::default()
            })
            .collect(),
        crust_version: env!("CARGO_PKG_VERSION").into(),
        dump_time_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
        kernel_release: nix::sys::utsname::uname()?
            .release()
            .to_string_lossy()
            .into_owned(),
        pre_dump: true,
        tracking: chain.tracking(),
        tracking_token: chain.token,
        ..Default::default()
    };
    identify(&mut inv);
    dump::fault_point("before-inventory");
    dir.write_msg(ImageKind::Inventory, 0, &inv)?;
    dir.sync()?;
    if let Some(s) = stats.as_mut() {
        s.stage("writing pages");
        for (name, c) in [
            ("pages scanned", &crate::stats::PAGES_SCANNED),
            ("pages written", &crate::stats::PAGES_WRITTEN),
            (
                "pages left to the parent dump",
                &crate::stats::PAGES_IN_PREV,
            ),
        ] {
            s.count(name, c.load(std::sync::atomic::Ordering::Relaxed));
        }
    }
    chain.finish(&dir.path)?;
    if opts.auto_dedup {
        auto_dedup(&dir.path)?;
    }
    info!("pre-dump of {} done in {:?}", opts.pid, t0.elapsed());
    Ok(())
}

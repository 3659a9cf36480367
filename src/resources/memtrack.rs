//! Write tracking between dumps: which pages a task wrote since the last
//! (pre-)dump, so that the next stores only those and leaves the rest to
//! the parent images (`images::chain`).
//!
//! Two backends. Userfaultfd write-protection in async mode
//! (UFFD_FEATURE_WP_ASYNC): the kernel resolves a write to a protected page
//! itself, with no handler, and only clears the page's protection;
//! PAGEMAP_SCAN on /proc/PID/pagemap reports the pages written since
//! (PAGE_IS_WRITTEN) and protects them again in the same walk
//! (PM_SCAN_WP_MATCHING). The userfaultfd must be made by the task
//! itself (it belongs to the mm of its creator): a remote syscall through
//! the parasite makes it, crust takes it with pidfd_getfd and closes the
//! task's copy, so the task's fd table ends as it was. Tracking lasts as
//! long as someone holds that fd: between dumps a small holder process
//! keeps it (`spawn_holder`) and hands it to the next dump on a unix socket
//! beside the images (`tracker.sock`). Soft-dirty bits (clear_refs 4,
//! pagemap bit 55) where the kernel has them: nothing to hold.
//!
//! A page is taken from the parent only when tracking says so for sure: in
//! a VMA still registered with this tracker (PAGE_IS_WPALLOWED) and not
//! written. New mappings, moved ones (mremap drops the registration), a
//! holder that died: all their pages are stored again.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tracing::{info, warn};

use crate::abi;
use crate::images::pb::{VmaEntry, VmaKind};
use crate::parasite_ctl::Parasite;

const PAGE: u64 = abi::PAGE_SIZE;

/// How writes are tracked (`Inventory.tracking`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    None = 0,
    UffdWp = 1,
    SoftDirty = 2,
}

impl Backend {
    pub fn from_u32(v: u32) -> Backend {
        match v {
            1 => Backend::UffdWp,
            2 => Backend::SoftDirty,
            _ => Backend::None,
        }
    }
}

// ------------------------------------------------------------ ranges ---

/// Sorted, disjoint [start, end) address ranges.
pub type Ranges = Vec<(u64, u64)>;

/// Sorts and merges ranges.
pub fn normalize(mut r: Ranges) -> Ranges {
    r.retain(|&(s, e)| s < e);
    r.sort_unstable();
    let mut out: Ranges = Vec::with_capacity(r.len());
    for (s, e) in r {
        match out.last_mut() {
            Some(l) if l.1 >= s => l.1 = l.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The parts of each range of `a` (sorted, disjoint) inside `b` (sorted,
/// disjoint), each part cut from one range of `a`, in order.
pub fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Ranges {
    let mut out = Vec::new();
    let mut j = 0;
    for &(s, e) in a {
        while j < b.len() && b[j].1 <= s {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].0 < e {
            let (is, ie) = (s.max(b[k].0), e.min(b[k].1));
            if is < ie {
                out.push((is, ie));
            }
            k += 1;
        }
    }
    out
}

/// The parts of each range of `a` outside `b`, each cut from one range of
/// `a`, in order.
pub fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Ranges {
    let mut out = Vec::new();
    let mut j = 0;
    for &(s, e) in a {
        while j < b.len() && b[j].1 <= s {
            j += 1;
        }
        let mut at = s;
        let mut k = j;
        while k < b.len() && b[k].0 < e {
            if b[k].0 > at {
                out.push((at, b[k].0));
            }
            at = at.max(b[k].1);
            k += 1;
        }
        if at < e {
            out.push((at, e));
        }
    }
    out
}

pub fn pages_in(r: &[(u64, u64)]) -> u64 {
    r.iter().map(|(s, e)| (e - s) / PAGE).sum()
}

// -------------------------------------------------------- userfaultfd ---

use crate::uffd::{
    self, FEATURE_WP_ASYNC, FEATURE_WP_UNPOPULATED, PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT,
    PAGE_IS_WPALLOWED, PAGE_IS_WRITTEN, PAGEMAP_SCAN, PM_SCAN_WP_MATCHING, PageRegion, PmScanArg,
    USER_MODE_ONLY,
};

/// The pages of `[start, end)` in one category, asked of the pagemap
/// `pm`, with PM_SCAN_WP_MATCHING when `protect` (the matching pages are
/// write-protected again in the same walk).
fn pagemap_scan(pm: &File, start: u64, end: u64, category: u64, protect: bool) -> Result<Ranges> {
    pagemap_scan_matching(pm, start, end, category, 0, protect)
}

/// The pages of `[start, end)` with every category of `mask`, those of
/// `inverted` counted as their opposite (PAGEMAP_SCAN's
/// category_inverted): `mask` WRITTEN with `inverted` WRITTEN asks for
/// the pages not written.
fn pagemap_scan_matching(
    pm: &File,
    start: u64,
    end: u64,
    mask: u64,
    inverted: u64,
    protect: bool,
) -> Result<Ranges> {
    let mut out = Vec::new();
    let mut vec = vec![PageRegion::default(); 4096];
    let mut at = start;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: if protect { PM_SCAN_WP_MATCHING } else { 0 },
            start: at,
            end,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            category_inverted: inverted,
            category_mask: mask,
            return_mask: mask,
            ..Default::default()
        };
        // SAFETY: PAGEMAP_SCAN reads and updates one pm_scan_arg and writes
        // at most vec_len page_regions into `vec`, which lives meanwhile.
        let n = unsafe { libc::ioctl(pm.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("PAGEMAP_SCAN");
        }
        out.extend(vec[..n as usize].iter().map(|r| (r.start, r.end)));
        if arg.walk_end <= at {
            break;
        }
        at = arg.walk_end;
    }
    Ok(normalize(out))
}

/// Bytes of the task's private memory present and written since tracking
/// was armed (all of a private mapping's present pages where none is
/// armed), the task running: an estimate of what the next dump stores,
/// made before it freezes the task. Shared mappings store no pages here.
pub fn written_bytes(pid: i32) -> Result<u64> {
    let pm = File::open(format!("/proc/{pid}/pagemap")).context("opening pagemap")?;
    let mut bytes = 0;
    for e in crate::proc::maps(pid)?
        .iter()
        .filter(|e| !e.shared && !e.path.starts_with("[v"))
    {
        bytes += pages_in(&pagemap_scan(&pm, e.start, e.end, PAGE_IS_WRITTEN, false)?) * PAGE;
    }
    Ok(bytes)
}

/// Whether a VMA's pages are tracked: private memory of this process
/// only. Shared memory is written through other mappings too, which this
/// process's page tables do not see: it is always stored whole.
fn tracked(v: &VmaEntry) -> bool {
    matches!(v.kind(), VmaKind::VmaAnonPrivate | VmaKind::VmaFilePrivate) && !v.droppable
}

/// Starts write tracking in the task the parasite is in: a userfaultfd
/// made by the task (`register_protect` does the rest). Returns crust's
/// copy of it; None when the task uses userfaultfd itself (its pages are
/// then stored whole, said in the log).
pub fn arm_uffd(parasite: &mut Parasite, vmas: &[VmaEntry]) -> Result<Option<OwnedFd>> {
    let pid = parasite.task.pid.as_raw();
    if uses_userfaultfd(pid) {
        warn!(
            "PID {pid} holds a userfaultfd of its own: its writes are not tracked, every dump stores all its pages"
        );
        return Ok(None);
    }
    let uffd = parasite.make_uffd((libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | USER_MODE_ONLY)?;
    if let Err(e) = uffd::api(uffd.as_fd(), FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED) {
        bail!(
            "PID {pid}: this kernel's userfaultfd has no asynchronous write-protection ({e}); see crust check --all"
        );
    }
    register_protect(uffd, pid, vmas, &[])
}

/// Registers every tracked VMA of task `pid` with its userfaultfd `uffd`
/// for write-protection (again, for those already registered) and
/// protects all their pages: the task is frozen, and every write from now
/// on counts towards the next dump. None when a VMA is registered with a
/// userfaultfd of the task's own (said in the log).
/// VMAs wholly inside `armed` (still tracked, protected again by
/// `unchanged_uffd`) are left as they are.
pub fn register_protect(
    uffd: OwnedFd,
    pid: i32,
    vmas: &[VmaEntry],
    armed: &[(u64, u64)],
) -> Result<Option<OwnedFd>> {
    for v in vmas.iter().filter(|v| tracked(v)) {
        if subtract(&[(v.start, v.end)], armed).is_empty() {
            continue;
        }
        let len = v.end - v.start;
        if let Err(e) = uffd::register(uffd.as_fd(), v.start, len, uffd::REGISTER_MODE_WP) {
            if e.raw_os_error() == Some(libc::EBUSY) {
                warn!(
                    "PID {pid}: mapping {:#x}-{:#x} is registered with another userfaultfd (the task's own, or the tracking of an earlier pre-dump whose holder still runs: pass that one as --prev-images-dir): its writes are not tracked, this dump's successor stores all its pages",
                    v.start, v.end
                );
                return Ok(None);
            }
            // A mapping userfaultfd cannot take: not tracked, its pages
            // are stored in every dump.
            tracing::debug!(
                "PID {pid}: mapping {:#x}-{:#x} not tracked: {e}",
                v.start,
                v.end
            );
            continue;
        }
        if let Err(e) = uffd::writeprotect(uffd.as_fd(), v.start, len) {
            bail!(
                "PID {pid}: write-protecting {:#x}-{:#x}: {e}",
                v.start,
                v.end
            );
        }
    }
    Ok(Some(uffd))
}

/// Whether the task holds a userfaultfd.
fn uses_userfaultfd(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .any(|l| l.to_string_lossy() == "anon_inode:[userfaultfd]")
        })
        .unwrap_or(false)
}

/// The pages of the task's tracked VMAs not written since tracking was
/// last armed; with `rearm`, the written ones are protected again (the task
/// is frozen): from here on, its writes count towards the next dump. Also returns the
/// ranges still tracked (PAGE_IS_WPALLOWED), which need no arming again.
pub fn unchanged_uffd(pid: i32, vmas: &[VmaEntry], rearm: bool) -> Result<(Ranges, Ranges)> {
    let pm = File::open(format!("/proc/{pid}/pagemap")).context("opening pagemap")?;
    let mut allowed = Vec::new();
    let mut written = Vec::new();
    for v in vmas.iter().filter(|v| tracked(v)) {
        // Written first, protecting them again when tracking goes on
        // (`rearm`); then what is tracked at all (a VMA that is not, the
        // walk with WP_MATCHING skips silently). Without `rearm` the walk
        // changes nothing, and costs less.
        written.extend(pagemap_scan(&pm, v.start, v.end, PAGE_IS_WRITTEN, rearm)?);
        allowed.extend(pagemap_scan(&pm, v.start, v.end, PAGE_IS_WPALLOWED, false)?);
    }
    let allowed = normalize(allowed);
    Ok((subtract(&allowed, &normalize(written)), allowed))
}

/// The pages of the task's private mappings that tracking armed and that
/// are still as they were when it was: present, not written since
/// (PAGE_IS_WRITTEN clear), and neither a file's page nor the zero page.
/// A page of a file's private mapping dropped since (MADV_DONTNEED) and
/// read again keeps its write-protection (the kernel leaves a marker in
/// its page table entry) but reads as the file again, no longer as the
/// copy the chain holds: PAGE_IS_FILE leaves it out. Dropped anonymous
/// memory loses its protection on this kernel (it shows as written once
/// read again, as the zero page); PAGE_IS_PFNZERO would leave it out
/// were the marker kept. One walk per private mapping of `maps` (the
/// task's /proc/PID/maps, read before its VMAs are; the walk skips a
/// mapping no tracking armed). The task is frozen.
pub fn unchanged_present(pid: i32, maps: &[crate::proc::MapsEntry]) -> Result<Ranges> {
    let pm = File::open(format!("/proc/{pid}/pagemap")).context("opening pagemap")?;
    let mut out = Vec::new();
    for e in maps
        .iter()
        .filter(|e| !e.shared && !e.path.starts_with("[v"))
    {
        // PAGE_IS_FILE costs a look at each page's struct page (half the
        // walk's time): only a mapping of a file can hold a file's page.
        let file = if e.inode != 0 { PAGE_IS_FILE } else { 0 };
        let not = PAGE_IS_WRITTEN | PAGE_IS_PFNZERO | file;
        let mask = PAGE_IS_WPALLOWED | PAGE_IS_PRESENT | not;
        out.extend(pagemap_scan_matching(
            &pm, e.start, e.end, mask, not, false,
        )?);
    }
    Ok(normalize(out))
}

// ---------------------------------------------------------- soft-dirty ---

const PM_SOFT_DIRTY: u64 = 1 << 55;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;

/// Clears the task's soft-dirty bits: writes from now on set them again.
pub fn arm_soft_dirty(pid: i32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "4")
        .with_context(|| format!("PID {pid}: clearing soft-dirty bits"))
}

/// The present or swapped pages of tracked VMAs whose soft-dirty bit is
/// clear: not written since the last `arm_soft_dirty`.
pub fn unchanged_soft_dirty(pid: i32, vmas: &[VmaEntry]) -> Result<Ranges> {
    let pm = File::open(format!("/proc/{pid}/pagemap")).context("opening pagemap")?;
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for v in vmas.iter().filter(|v| tracked(v)) {
        let n = ((v.end - v.start) / PAGE) as usize;
        buf.resize(n * 8, 0);
        pm.read_exact_at(&mut buf, v.start / PAGE * 8)
            .with_context(|| format!("reading pagemap of {pid}"))?;
        for (i, c) in buf.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(c.try_into().unwrap());
            if e & (PM_PRESENT | PM_SWAPPED) != 0 && e & PM_SOFT_DIRTY == 0 {
                let a = v.start + i as u64 * PAGE;
                out.push((a, a + PAGE));
            }
        }
    }
    Ok(normalize(out))
}

// ------------------------------------------------------------- markers ---

const PM_UFFD_WP: u64 = 1 << 57;
const PM_FRAME_MASK: u64 = (1 << 55) - 1;

/// The pagemap entry of a page that was never populated, or was dropped,
/// in a VMA write-protected with UFFD_FEATURE_WP_UNPOPULATED: the kernel
/// keeps a marker in its page table entry, which pagemap shows as a
/// swapped page (PM_SWAP, PM_UFFD_WP, and the marker's own swap type and
/// offset in the frame bits). It holds nothing: it reads as zeros. None
/// when this kernel shows no such marker (or hides the frame bits).
pub fn is_unpopulated_marker(e: u64) -> bool {
    static SIG: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let sig = SIG.get_or_init(|| marker_signature().ok().flatten());
    e & (PM_PRESENT | PM_SWAPPED | PM_UFFD_WP) == PM_SWAPPED | PM_UFFD_WP
        && sig.is_some_and(|s| e & PM_FRAME_MASK == s)
}

/// A userfaultfd of crust's own with the features write tracking asks for.
fn own_tracking_uffd() -> Result<OwnedFd> {
    let fd = uffd::create(libc::O_CLOEXEC as u64 | USER_MODE_ONLY).context("userfaultfd")?;
    uffd::api(fd.as_fd(), FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED)
        .context("UFFDIO_API with WP_ASYNC")?;
    Ok(fd)
}

/// Makes such a marker on a page of crust's own and reads its entry.
fn marker_signature() -> Result<Option<u64>> {
    let p = ProbePage::new().context("mapping a page")?;
    let Ok(uffd) = own_tracking_uffd() else {
        return Ok(None);
    };
    let page = ProbeVma {
        start: p.addr(),
        end: p.addr() + PAGE,
    };
    let Some(_uffd) = register_protect(uffd, std::process::id() as i32, &[page.entry()], &[])?
    else {
        return Ok(None);
    };
    let pm = File::open("/proc/self/pagemap").context("opening pagemap")?;
    let mut e = [0u8; 8];
    pm.read_exact_at(&mut e, p.addr() / PAGE * 8)?;
    let e = u64::from_le_bytes(e);
    Ok(
        (e & (PM_PRESENT | PM_SWAPPED | PM_UFFD_WP) == PM_SWAPPED | PM_UFFD_WP
            && e & PM_FRAME_MASK != 0)
            .then_some(e & PM_FRAME_MASK),
    )
}

/// A page of crust's own as a VMA to register.
struct ProbeVma {
    start: u64,
    end: u64,
}

impl ProbeVma {
    fn entry(&self) -> VmaEntry {
        VmaEntry {
            start: self.start,
            end: self.end,
            kind: VmaKind::VmaAnonPrivate as i32,
            ..Default::default()
        }
    }
}

// -------------------------------------------------------------- probes ---

/// Which backend this kernel gives crust: soft-dirty where a fresh write
/// sets pagemap bit 55, else userfaultfd asynchronous write-protection
/// where UFFDIO_API takes it and PAGEMAP_SCAN reports it.
pub fn probe() -> (Backend, String) {
    let sd = probe_soft_dirty();
    let wp = probe_uffd_wp();
    match (sd, wp) {
        (true, Ok(())) => (
            Backend::SoftDirty,
            "soft-dirty bits (userfaultfd write-protection is there too)".into(),
        ),
        (true, Err(_)) => (Backend::SoftDirty, "soft-dirty bits".into()),
        (false, Ok(())) => (
            Backend::UffdWp,
            "userfaultfd async write-protection read with PAGEMAP_SCAN (no soft-dirty bits)".into(),
        ),
        (false, Err(e)) => (
            Backend::None,
            format!("neither soft-dirty bits nor userfaultfd async write-protection ({e})"),
        ),
    }
}

/// Which backend a dump uses: the probe's, once per process.
pub fn backend() -> Backend {
    static B: std::sync::OnceLock<Backend> = std::sync::OnceLock::new();
    *B.get_or_init(|| probe().0)
}

/// A page of our own mapped for a probe, unmapped on drop.
struct ProbePage(*mut libc::c_void);

impl ProbePage {
    fn new() -> Option<Self> {
        // SAFETY: a fresh private anonymous page of our own.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then_some(ProbePage(p))
    }
    fn addr(&self) -> u64 {
        self.0 as u64
    }
    fn touch(&self) {
        // SAFETY: writing the first byte of our own writable page.
        unsafe { std::ptr::write_volatile(self.0 as *mut u8, 1) };
    }
}

impl Drop for ProbePage {
    fn drop(&mut self) {
        // SAFETY: unmapping the page mapped in `new`.
        unsafe { libc::munmap(self.0, PAGE as usize) };
    }
}

fn probe_soft_dirty() -> bool {
    let Some(p) = ProbePage::new() else {
        return false;
    };
    p.touch();
    let Ok(pm) = File::open("/proc/self/pagemap") else {
        return false;
    };
    let mut e = [0u8; 8];
    pm.read_exact_at(&mut e, p.addr() / PAGE * 8).is_ok()
        && u64::from_le_bytes(e) & PM_SOFT_DIRTY != 0
}

fn probe_uffd_wp() -> Result<()> {
    let p = ProbePage::new().context("mapping a page")?;
    p.touch();
    let uffd = own_tracking_uffd()?;
    uffd::register(uffd.as_fd(), p.addr(), PAGE, uffd::REGISTER_MODE_WP)
        .context("UFFDIO_REGISTER for write-protection")?;
    let pm = File::open("/proc/self/pagemap").context("opening pagemap")?;
    // Protect (the page counts as written until then), write, and see it.
    pagemap_scan(&pm, p.addr(), p.addr() + PAGE, PAGE_IS_WRITTEN, true)?;
    if !pagemap_scan(&pm, p.addr(), p.addr() + PAGE, PAGE_IS_WRITTEN, false)?.is_empty() {
        bail!("PAGEMAP_SCAN did not write-protect the page");
    }
    p.touch();
    if pagemap_scan(&pm, p.addr(), p.addr() + PAGE, PAGE_IS_WRITTEN, false)?.is_empty() {
        bail!("PAGEMAP_SCAN did not see a write");
    }
    Ok(())
}

// -------------------------------------------------------------- holder ---

/// The holder's socket, beside the images of the dump that armed tracking.
pub const SOCKET: &str = "tracker.sock";
/// How long a holder keeps tracking alive when no dump comes for it.
pub const HOLD_FOR: Duration = Duration::from_secs(3600);

/// Leaves the tasks' userfaultfds with a holder process, which waits at
/// `dir/tracker.sock` for the next dump and hands them over (with `token`,
/// then it ends); it ends too, dropping the tracking, when every tracked
/// task is dead, or after `HOLD_FOR`.
pub fn spawn_holder(dir: &Path, token: u64, tracked: Vec<(i32, OwnedFd)>) -> Result<()> {
    if tracked.is_empty() {
        return Ok(());
    }
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let path = dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).with_context(|| {
        format!(
            "binding the write tracker's socket {}; use a shorter images directory path",
            path.display()
        )
    })?;
    let mut pidfds = Vec::new();
    for (pid, _) in &tracked {
        // A task gone already: nothing of it to track.
        if let Ok(p) = crate::sys::pidfd_open(*pid) {
            pidfds.push(p);
        }
    }
    // SAFETY: the child makes system calls and allocates, and leaves with
    // _exit. The only other thread crust may have by now (the progress
    // line; the pagemap readers are joined) holds no lock it takes: it
    // writes to fd 2 directly (as for the dump's guardian).
    match unsafe { nix::unistd::fork() }.context("forking the write tracker's holder")? {
        nix::unistd::ForkResult::Child => {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                hold(listener, &path, token, &tracked, &pidfds)
            }))
            .unwrap_or(1);
            // SAFETY: leave without crust's exit handlers or destructors.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            info!(
                "write tracking of {} task(s) held by PID {child} at {} for {} s",
                tracked.len(),
                path.display(),
                HOLD_FOR.as_secs()
            );
            Ok(())
        }
    }
}

/// The holder's life (see `spawn_holder`).
fn hold(
    listener: std::os::unix::net::UnixListener,
    path: &Path,
    token: u64,
    tracked: &[(i32, OwnedFd)],
    pidfds: &[OwnedFd],
) -> i32 {
    let mut keep: Vec<RawFd> = vec![listener.as_raw_fd()];
    keep.extend(tracked.iter().map(|(_, f)| f.as_raw_fd()));
    keep.extend(pidfds.iter().map(|f| f.as_raw_fd()));
    crate::guardian::leave_crusts_things(&keep, c"crust-tracker");
    let end = Instant::now() + HOLD_FOR;
    let mut dead = vec![false; pidfds.len()];
    use std::os::unix::fs::MetadataExt;
    // The socket's inode. A socket gone is gone, also if it was gone at
    // the start (then no later look may match "none" with "none").
    let ino = std::fs::metadata(path).map(|m| m.ino()).ok();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        // Its images gone (the directory removed, or the socket replaced):
        // no dump can come for the tracking any more.
        let now = std::fs::metadata(path).map(|m| m.ino()).ok();
        if left.is_zero() || now.is_none() || now != ino {
            break;
        }
        let mut pfd: Vec<libc::pollfd> = std::iter::once(listener.as_raw_fd())
            .chain(pidfds.iter().map(|f| f.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        for (i, d) in dead.iter().enumerate() {
            if *d {
                pfd[i + 1].fd = -1;
            }
        }
        // Once a second, to look at the socket's file again.
        let ms = left.as_millis().min(1000) as i32;
        // SAFETY: poll on pollfds of ours.
        if unsafe { libc::poll(pfd.as_mut_ptr(), pfd.len() as libc::nfds_t, ms) } < 0 {
            continue;
        }
        for (i, p) in pfd.iter().enumerate().skip(1) {
            if p.revents != 0 {
                dead[i - 1] = true;
            }
        }
        if dead.iter().all(|&d| d) {
            break;
        }
        if pfd[0].revents != 0
            && let Ok((conn, _)) = listener.accept()
        {
            let mut msg = token.to_le_bytes().to_vec();
            for (pid, _) in tracked {
                msg.extend(pid.to_le_bytes());
            }
            let fds: Vec<RawFd> = tracked.iter().map(|(_, f)| f.as_raw_fd()).collect();
            if crate::resources::sockets::send_with_fds(
                conn.as_raw_fd(),
                None,
                &msg,
                &fds,
                libc::MSG_NOSIGNAL,
            )
            .is_ok()
            {
                // Handed over: the next dump holds tracking now. Wait until
                // it took the message (it closes its end), then go.
                let mut b = [0u8; 1];
                let _ = (&conn).read_timeout_byte(&mut b);
                break;
            }
        }
    }
    let _ = std::fs::remove_file(path);
    0
}

/// A read of one byte with a deadline, for the holder's last word.
trait ReadTimeoutByte {
    fn read_timeout_byte(&self, b: &mut [u8; 1]) -> std::io::Result<usize>;
}

impl ReadTimeoutByte for &std::os::unix::net::UnixStream {
    fn read_timeout_byte(&self, b: &mut [u8; 1]) -> std::io::Result<usize> {
        use std::io::Read;
        self.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut s: &std::os::unix::net::UnixStream = self;
        s.read(b)
    }
}

/// Ends the holder waiting at `sock` (a dump into its directory replaces
/// the dump that armed it): takes its userfaultfds and drops them, so that
/// no tracking of a dump that is gone stays registered in the tasks (a new
/// one could not register over it).
pub fn release_holder(sock: &Path) {
    if let Ok(conn) = std::os::unix::net::UnixStream::connect(sock) {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        let mut buf = vec![0u8; 8 + 4 * crate::resources::sockets::RIGHTS_MAX];
        if let Ok((_, fds, _)) =
            crate::resources::sockets::recv_with_fds(conn.as_raw_fd(), &mut buf, 0)
        {
            info!(
                "dropped the write tracking of {} task(s) an older dump left at {}",
                fds.len(),
                sock.display()
            );
        }
    }
}

/// Takes the tracking a previous dump left with its holder in `dir`: per
/// PID, its userfaultfd. None (said in the log) when there is none to take,
/// or it belongs to another dump than the one whose `token` is given: all
/// pages are then stored.
pub fn take_from_holder(dir: &Path, token: u64) -> Option<Vec<(i32, OwnedFd)>> {
    let path: PathBuf = dir.join(SOCKET);
    let got = (|| -> Result<Vec<(i32, OwnedFd)>> {
        let conn = std::os::unix::net::UnixStream::connect(&path)
            .with_context(|| format!("connecting to {}", path.display()))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = vec![0u8; 8 + 4 * crate::resources::sockets::RIGHTS_MAX];
        let (n, fds, trunc) =
            crate::resources::sockets::recv_with_fds(conn.as_raw_fd(), &mut buf, 0)
                .context("receiving the tracker")?;
        if trunc || n < 8 || (n - 8) / 4 != fds.len() {
            bail!("the holder's message is malformed");
        }
        let theirs = u64::from_le_bytes(buf[..8].try_into().unwrap());
        if theirs != token {
            bail!("the holder belongs to another dump in that directory");
        }
        Ok(buf[8..n]
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .zip(fds)
            .collect())
    })();
    match got {
        Ok(t) => Some(t),
        Err(e) => {
            warn!(
                "no write tracking from the previous dump in {} ({e:#}): all pages are stored",
                dir.display()
            );
            None
        }
    }
}

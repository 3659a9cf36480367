//! `crust check`: probes the kernel interfaces crust relies on.

use anyhow::{Result, bail};
use std::os::fd::AsRawFd;

struct Probe {
    name: &'static str,
    /// What the interface is for, shown by --all and when it is missing.
    enables: &'static str,
    required: bool,
    run: fn() -> Result<()>,
}

const PROBES: &[Probe] = &[
    Probe {
        name: "ptrace_seize",
        enables: "freezing tasks for dump (PTRACE_SEIZE/INTERRUPT)",
        required: true,
        run: probe_seize,
    },
    Probe {
        name: "clone3_set_tid",
        enables: "restoring tasks with their original PIDs",
        required: true,
        run: probe_clone3,
    },
    Probe {
        name: "ns_last_pid",
        enables: "the fallback way to choose PIDs when clone3 lacks set_tid",
        required: false,
        run: probe_ns_last_pid,
    },
    Probe {
        name: "pid_ns",
        enables: "restore --pid-ns (a new PID and mount namespace for the tree)",
        required: false,
        run: probe_pid_ns,
    },
    Probe {
        name: "pidfd_getfd",
        enables: "reading file owners and pty state through a copy of the task's fd",
        required: true,
        run: probe_pidfd_getfd,
    },
    Probe {
        name: "suspend_seccomp",
        enables: "dumping and restoring tasks under seccomp (PTRACE_O_SUSPEND_SECCOMP)",
        required: false,
        run: probe_suspend_seccomp,
    },
    Probe {
        name: "timer_restore_ids",
        enables: "restoring POSIX timers with their ids (PR_TIMER_CREATE_RESTORE_IDS)",
        required: false,
        run: probe_timer_ids,
    },
    Probe {
        name: "sysv_next_id",
        enables: "making SysV IPC objects again with their ids (shm/sem/msg_next_id)",
        required: false,
        run: probe_sysv_next_id,
    },
    Probe {
        name: "map_files",
        enables: "reading the files behind mappings (/proc/PID/map_files)",
        required: true,
        run: probe_map_files,
    },
    Probe {
        name: "prctl_mm_map",
        enables: "restoring brk, arg/env areas, auxv and the exe link (PR_SET_MM_MAP)",
        required: true,
        run: probe_mm_map,
    },
    Probe {
        name: "kcmp",
        enables: "finding files and memory shared between tasks",
        required: false,
        run: probe_kcmp,
    },
    Probe {
        name: "memfd",
        enables: "memfd files and shared memory restore",
        required: true,
        run: probe_memfd,
    },
    Probe {
        name: "rseq_config",
        enables: "dumping rseq registrations (PTRACE_GET_RSEQ_CONFIGURATION)",
        required: false,
        run: probe_rseq,
    },
    Probe {
        name: "userfaultfd",
        enables: "lazy restore (restore --lazy-pages, lazy-pages; with fork, mremap and unmap events) and write tracking for pre-dump and dump --track-mem",
        required: false,
        run: probe_uffd,
    },
    Probe {
        name: "uffd_wp",
        enables: "write-protect faults of userfaultfd (UFFD_FEATURE_PAGEFAULT_FLAG_WP)",
        required: false,
        run: probe_uffd_wp,
    },
    Probe {
        name: "uffd_wp_async",
        enables: "write tracking for pre-dump and dump --track-mem where soft-dirty bits are missing",
        required: false,
        run: probe_uffd_wp_async,
    },
    Probe {
        name: "pagemap_scan",
        enables: "reading the pages written since a pre-dump and protecting them again in one walk (PAGEMAP_SCAN)",
        required: false,
        run: probe_pagemap_scan,
    },
    Probe {
        name: "soft_dirty",
        enables: "write tracking for pre-dump and dump --track-mem through soft-dirty bits (preferred where present)",
        required: false,
        run: probe_soft_dirty,
    },
    Probe {
        name: "cap_checkpoint_restore",
        enables: "choosing PIDs and setting the exe link",
        required: true,
        run: probe_cap_cr,
    },
    Probe {
        name: "cap_sys_ptrace",
        enables: "tracing processes of other users",
        required: true,
        run: probe_cap_ptrace,
    },
    Probe {
        name: "cap_sys_resource",
        enables: "raising hard resource limits on restore",
        required: false,
        run: probe_cap_resource,
    },
];

pub fn run(all: bool, feature: Option<&str>) -> Result<i32> {
    if let Some(name) = feature {
        let Some(p) = PROBES.iter().find(|p| p.name == name) else {
            let names: Vec<_> = PROBES.iter().map(|p| p.name).collect();
            bail!(
                "unknown feature {name}; known features: {}",
                names.join(", ")
            );
        };
        return Ok(match (p.run)() {
            Ok(()) => {
                println!("{} is supported", p.name);
                0
            }
            Err(e) => {
                println!(
                    "{} is NOT supported: {e:#} (needed for {})",
                    p.name, p.enables
                );
                1
            }
        });
    }
    let mut failed = false;
    for p in PROBES {
        let r = (p.run)();
        if all {
            let res = match &r {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("missing ({e:#})"),
            };
            let kind = if p.required { "required" } else { "optional" };
            println!("{:24} {:8} {res}: {}", p.name, kind, p.enables);
        } else if let Err(e) = &r
            && p.required
        {
            println!(
                "Error: {} is missing ({e:#}): this breaks {}",
                p.name, p.enables
            );
        }
        failed |= r.is_err() && p.required;
    }
    if all {
        let (_, how) = crate::resources::memtrack::probe();
        println!("{:24} {:8} {how}", "write_tracking", "this kernel:");
    }
    if failed {
        return Ok(1);
    }
    println!("Looks good.");
    Ok(0)
}

fn errno() -> anyhow::Error {
    std::io::Error::last_os_error().into()
}

/// Runs `f` in a forked child that sleeps until killed, then reaps it.
fn with_child<T>(f: impl FnOnce(nix::unistd::Pid) -> Result<T>) -> Result<T> {
    // SAFETY: the child only pauses; crust is single-threaded here.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => loop {
            nix::unistd::pause();
        },
        nix::unistd::ForkResult::Parent { child } => {
            let r = f(child);
            let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(child, None);
            r
        }
    }
}

fn probe_pidfd_getfd() -> Result<()> {
    with_child(|c| {
        let pidfd = crate::sys::pidfd_open(c.as_raw())?;
        crate::sys::pidfd_getfd(&pidfd, 0)?;
        Ok(())
    })
}

fn probe_suspend_seccomp() -> Result<()> {
    with_child(|c| {
        nix::sys::ptrace::seize(c, crate::resources::seccomp::SUSPEND_SECCOMP)?;
        Ok(())
    })
}

fn probe_timer_ids() -> Result<()> {
    if !crate::resources::timers::timer_ids_restorable() {
        bail!("{}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn probe_sysv_next_id() -> Result<()> {
    for kind in ["shm", "sem", "msg"] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/sys/kernel/{kind}_next_id"))?;
    }
    Ok(())
}

fn probe_seize() -> Result<()> {
    with_child(|c| {
        nix::sys::ptrace::seize(c, nix::sys::ptrace::Options::empty())?;
        nix::sys::ptrace::interrupt(c)?;
        nix::sys::wait::waitpid(c, Some(nix::sys::wait::WaitPidFlag::__WALL))?;
        Ok(())
    })
}

fn probe_clone3() -> Result<()> {
    let last: i32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")?
        .trim()
        .parse()?;
    let max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")?
        .trim()
        .parse()?;
    let mut pid = last + 1000;
    for _ in 0..100 {
        if pid >= max {
            pid = 300;
        }
        match crate::sys::fork_with_pid(pid) {
            // SAFETY: the child exits at once.
            Ok(0) => unsafe { libc::_exit(0) },
            Ok(got) => {
                nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(got), None)?;
                if got != pid {
                    bail!("clone3 gave PID {got} instead of {pid}");
                }
                return Ok(());
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => pid += 1,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("no free PID found to probe with")
}

fn probe_pid_ns() -> Result<()> {
    match crate::sys::fork_into_new_pid_ns()? {
        0 => {
            let ok = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).is_ok()
                && nix::unistd::getpid().as_raw() == 1;
            // SAFETY: the child exits at once.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        child => match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None)? {
            nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
            st => {
                bail!("the child in a new PID namespace could not take a mount namespace: {st:?}")
            }
        },
    }
}

fn probe_ns_last_pid() -> Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/sys/kernel/ns_last_pid")?;
    Ok(())
}

fn probe_map_files() -> Result<()> {
    let maps = crate::proc::smaps(std::process::id() as i32)?;
    let e = maps
        .iter()
        .find(|e| e.path.starts_with('/'))
        .ok_or_else(|| anyhow::anyhow!("no file mapping"))?;
    std::fs::File::open(format!("/proc/self/map_files/{:x}-{:x}", e.start, e.end))?;
    Ok(())
}

fn probe_mm_map() -> Result<()> {
    const PR_SET_MM: i32 = 35;
    const PR_SET_MM_MAP_SIZE: u64 = 15;
    let mut size: u32 = 0;
    // SAFETY: PR_SET_MM_MAP_SIZE writes one u32.
    if unsafe { libc::prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE, &mut size as *mut u32, 0, 0) } != 0 {
        return Err(errno());
    }
    if size as usize != std::mem::size_of::<crate::abi::PrctlMmMap>() {
        bail!(
            "kernel's prctl_mm_map is {size} bytes, crust's {}",
            std::mem::size_of::<crate::abi::PrctlMmMap>()
        );
    }
    Ok(())
}

fn probe_kcmp() -> Result<()> {
    let me = std::process::id();
    // SAFETY: KCMP_VM (1) of a process with itself reads no memory.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, me, me, 1, 0, 0) };
    if r != 0 {
        return Err(errno());
    }
    Ok(())
}

fn probe_memfd() -> Result<()> {
    nix::sys::memfd::memfd_create(
        c"crust-check",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )?;
    Ok(())
}

fn probe_rseq() -> Result<()> {
    with_child(|c| {
        nix::sys::ptrace::seize(c, nix::sys::ptrace::Options::empty())?;
        nix::sys::ptrace::interrupt(c)?;
        nix::sys::wait::waitpid(c, Some(nix::sys::wait::WaitPidFlag::__WALL))?;
        crate::sys::get_rseq_conf(c)?;
        Ok(())
    })
}

/// A userfaultfd of crust's own, with `features` (UFFDIO_API); the
/// features the kernel gives.
fn uffd_api(features: u64) -> Result<u64> {
    use crate::uffd;
    let fd = uffd::create(libc::O_CLOEXEC as u64 | uffd::USER_MODE_ONLY)?;
    Ok(uffd::api(std::os::fd::AsFd::as_fd(&fd), features)?)
}

fn probe_uffd() -> Result<()> {
    // As a lazy restore makes it: with the events its daemon follows.
    crate::lazy::make_uffd().map(drop)
}

fn probe_uffd_wp() -> Result<()> {
    uffd_api(crate::uffd::FEATURE_PAGEFAULT_FLAG_WP).map(|_| ())
}

fn probe_uffd_wp_async() -> Result<()> {
    uffd_api(crate::uffd::FEATURE_WP_ASYNC).map(|_| ())
}

fn probe_pagemap_scan() -> Result<()> {
    use crate::uffd::{PAGE_IS_PRESENT, PAGEMAP_SCAN, PageRegion, PmScanArg};
    let f = std::fs::File::open("/proc/self/pagemap")?;
    let buf = [0u8; 4096];
    let start = buf.as_ptr() as u64 & !4095;
    let mut regions = [PageRegion::default(); 4];
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        start,
        end: start + 4096,
        vec: regions.as_mut_ptr() as u64,
        vec_len: regions.len() as u64,
        category_anyof_mask: PAGE_IS_PRESENT,
        return_mask: PAGE_IS_PRESENT,
        ..Default::default()
    };
    // SAFETY: PAGEMAP_SCAN reads arg and writes at most vec_len regions.
    if unsafe { libc::ioctl(f.as_raw_fd(), PAGEMAP_SCAN, &mut arg) } < 0 {
        return Err(errno());
    }
    Ok(())
}

fn probe_soft_dirty() -> Result<()> {
    let page = vec![1u8; 8192];
    let addr = (page.as_ptr() as u64 + 4095) & !4095;
    // SAFETY: writing inside our own buffer.
    unsafe { std::ptr::write_volatile(addr as *mut u8, 2) };
    let f = std::fs::File::open("/proc/self/pagemap")?;
    let mut e = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut e, addr / 4096 * 8)?;
    if u64::from_le_bytes(e) & (1 << 55) == 0 {
        bail!("written pages show no soft-dirty bit (CONFIG_MEM_SOFT_DIRTY is off)");
    }
    Ok(())
}

fn has_cap(bit: u32) -> Result<()> {
    let st = crate::proc::status(std::process::id() as i32)?;
    if st.cap_eff & (1 << bit) == 0 {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            bail!(
                "withheld from root here (by the container, VM or capability bounding set crust runs under)"
            );
        }
        bail!("crust does not hold it; run as root or grant it with setcap");
    }
    Ok(())
}

fn probe_cap_cr() -> Result<()> {
    has_cap(40).or_else(|_| has_cap(21))
}

fn probe_cap_ptrace() -> Result<()> {
    has_cap(19)
}

fn probe_cap_resource() -> Result<()> {
    has_cap(24)
}

//! `crust dump`: seize the tree, collect every task, drain its memory through
//! the parasite, write the images (inventory last), then kill or release.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use tracing::info;

use crate::actions::Action;
pub use crate::actions::Actions;
use crate::guardian::Guardian;
use crate::images::pb::{FdTable, Inventory, TaskCore, TaskRef, ThreadCore};
use crate::images::{FORMAT_VERSION, ImageDir, ImageKind};
use crate::parasite_ctl::Parasite;
use crate::predump::Chain;
use crate::proc;
use crate::resources::ghost::GhostStore;
use crate::resources::{
    creds, fdt, files, inet, membarrier, memory, netlock, pipes, prctl, regs, seccomp, signals,
    timers,
};
use crate::seize::{SeizedTask, seize_threads};
use crate::stats::Stats;
use crate::{abi, sys};

pub struct DumpOpts {
    pub pid: i32,
    pub dir: PathBuf,
    pub shell_job: bool,
    pub leave_running: bool,
    /// Leave the tree stopped (SIGSTOP) instead of killing it.
    pub leave_stopped: bool,
    pub file_locks: bool,
    /// Most data carried per file without a name (`--ghost-limit`).
    pub ghost_limit: u64,
    /// Link files deleted but linked elsewhere back (`--link-remap`).
    pub link_remap: bool,
    /// `--force-irmap`, `--irmap-scan-path`: find watched inodes whose file
    /// handles do not open by scanning these directories.
    pub force_irmap: bool,
    pub irmap_scan_paths: Vec<PathBuf>,
    /// How long freezing the whole tree may take (`--timeout`).
    pub freeze_timeout: std::time::Duration,
    /// `--action-script`s.
    pub actions: Actions,
    /// `--ext-unix-sk[=INO,...]`: a datagram socket connected to a named
    /// socket outside the tree is dumped (and connected again by name);
    /// the listed sockets may have any peer outside (the restore takes a
    /// stand-in for them with --inherit-fd). None without the option.
    pub ext_unix_sk: Option<Vec<u64>>,
    /// `--tcp-established`, `--tcp-close`, `--skip-in-flight`.
    pub tcp_established: bool,
    pub tcp_close: bool,
    pub skip_in_flight: bool,
    /// `--network-lock`: how the tree's connections are locked.
    pub network_lock: netlock::Method,
    /// `--page-server`: where the pages go, if not into -D.
    pub pages: crate::page_xfer::SendArgs,
    /// `--prev-images-dir`: the previous dump of the chain, relative to
    /// `dir`.
    pub prev_images_dir: Option<PathBuf>,
    /// `--track-mem`: store only what was written since the previous dump,
    /// and, when the tree runs on, track writes for the next.
    pub track_mem: bool,
    /// `--auto-dedup`: punch out of the older images what this one replaced.
    pub auto_dedup: bool,
    /// `--lazy-pages --address A --port P`: private memory stays out of
    /// the images and is served from the frozen tree (`crate::lazy`).
    pub lazy_pages: Option<crate::lazy::ServeOpts>,
}

/// Test hook: `CRUST_FAULT=STAGE` makes crust kill itself with SIGKILL at a
/// named stage, so tests can check what a dead crust leaves behind.
pub fn fault_point(stage: &str) {
    if std::env::var("CRUST_FAULT").is_ok_and(|s| s == stage) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

pub(crate) fn gone_or_zombie(pid: i32) -> bool {
    proc::status(pid)
        .map(|s| s.state == 'Z' || s.state == 'X')
        .unwrap_or(true)
}

/// Refuses, before any task is touched, a tree crust could not bring back
/// as it was: a task in another PID or mount namespace than the root, or in
/// a process group whose leader is outside the tree (and not the root's).
pub(crate) fn check_tree(tree: &[TreeNode]) -> Result<()> {
    let root = &tree[0];
    let ns = |pid: i32, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok();
    if let Some((pid, ppid)) = memory_sharer(tree) {
        bail!(
            "task {pid} shares its memory with its parent {ppid} (a vfork() in progress for over {} s, or CLONE_VM); dump again once it has exec'd or exited",
            VFORK_WAIT.as_secs()
        );
    }
    for n in tree.iter().filter(|n| !n.zombie) {
        for kind in ["pid", "mnt", "net"] {
            if n.pid != root.pid && ns(n.pid, kind) != ns(root.pid, kind) {
                let comm = proc::status(n.pid).map(|s| s.name).unwrap_or_default();
                bail!(
                    "task {} ({comm}) is in another {} namespace than PID {}; crust does not dump namespaces yet",
                    n.pid,
                    match kind {
                        "pid" => "PID",
                        "mnt" => "mount",
                        _ => "network",
                    },
                    root.pid
                );
            }
        }
        if n.pid != root.pid && n.pgid != root.pgid && !tree.iter().any(|t| t.pid == n.pgid) {
            // A group whose leader is dead is rebuilt around a stand-in
            // with the leader's PID, if all its members are in the tree.
            if std::path::Path::new(&format!("/proc/{}", n.pgid)).exists() {
                bail!(
                    "task {} is in process group {}, whose leader is not in the tree; crust cannot rebuild that group",
                    n.pid,
                    n.pgid
                );
            }
            if let Some(other) = group_member_outside(n.pgid, tree) {
                bail!(
                    "task {} is in process group {} (its leader is dead), which also holds PID {other} outside the tree; dump a tree that holds the whole group",
                    n.pid,
                    n.pgid
                );
            }
        }
    }
    Ok(())
}

/// Each of `pids` with its parent's PID in `tree` (0 for none), in order.
pub(crate) fn with_parents(pids: &[i32], tree: &[TreeNode]) -> Vec<(i32, i32)> {
    pids.iter()
        .map(|&pid| {
            (
                pid,
                tree.iter().find(|n| n.pid == pid).map_or(0, |n| n.ppid),
            )
        })
        .collect()
}

/// A task of the tree (PID, parent's PID) that shares its memory with its
/// parent: a vfork() child that has not exec'd yet, or any CLONE_VM
/// child. Restored apart they would not share it. kcmp tells.
fn memory_sharer(tree: &[TreeNode]) -> Option<(i32, i32)> {
    const KCMP_VM: i32 = 1;
    tree.iter()
        .skip(1)
        .filter(|n| !n.zombie)
        // SAFETY: kcmp compares two kernel objects; it reads no memory of ours.
        .find(|n| unsafe { libc::syscall(libc::SYS_kcmp, n.pid, n.ppid, KCMP_VM, 0, 0) } == 0)
        .map(|n| (n.pid, n.ppid))
}

/// How long a dump waits for a vfork() child of the tree to exec or exit.
const VFORK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The tree of `pid` (`collect_tree`) once no task of it is a vfork()
/// child that has not exec'd: a shell or make starting a command is one
/// for a moment. After `VFORK_WAIT`, the tree as it is (`check_tree`
/// refuses it).
pub(crate) fn collect_settled_tree(pid: i32) -> Result<Vec<TreeNode>> {
    let t0 = Instant::now();
    loop {
        let tree = collect_tree(pid)?;
        if memory_sharer(&tree).is_none() || t0.elapsed() > VFORK_WAIT {
            return Ok(tree);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Seizes every process of the tree until it stands still (a task may fork
/// or exit while its parent is being seized); returns the tree and, per
/// live process in tree order, its threads (the leader first).
pub(crate) fn freeze_tree(
    pid: i32,
    mut tree: Vec<TreeNode>,
    t0: Instant,
    timeout: std::time::Duration,
) -> Result<(Vec<TreeNode>, Vec<Vec<SeizedTask>>)> {
    let mut seized: Vec<Vec<SeizedTask>> = Vec::new();
    loop {
        if t0.elapsed() > timeout {
            crate::refuse!(
                "the tree of PID {} did not stand still within {} s (it forks or exits faster than crust freezes it); dump again, or raise --timeout",
                pid,
                timeout.as_secs()
            );
        }
        for n in tree.iter().filter(|n| !n.zombie) {
            if !seized.iter().any(|t| t[0].pid.as_raw() == n.pid) {
                match seize_threads(n.pid) {
                    Ok(t) => seized.push(t),
                    // It exited (or died) since the walk: the next walk
                    // shows it gone, or a zombie.
                    Err(_) if gone_or_zombie(n.pid) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let mut now = collect_tree(pid)?;
        // Seized tasks show as traced ('t'): whether a task was stopped by
        // job control is what it was first seen as.
        for n in &mut now {
            if let Some(old) = tree.iter().find(|o| o.pid == n.pid) {
                n.stopped = old.stopped;
            }
        }
        if now == tree {
            break;
        }
        tree = now;
    }
    seized.retain(|t| tree.iter().any(|n| n.pid == t[0].pid.as_raw() && !n.zombie));
    // Dump in tree order.
    seized.sort_by_key(|t| tree.iter().position(|n| n.pid == t[0].pid.as_raw()));
    Ok((tree, seized))
}

/// Whether the process's group is the foreground group of its terminal.
fn foreground_of_its_tty(n: &TreeNode) -> bool {
    // Field 8 of stat: tpgid.
    proc::stat_fields(n.pid).is_ok_and(|f| proc::stat_field(&f, 8) as i32 == n.pgid)
}

/// A process outside `tree` in process group `pgid`, if any.
fn group_member_outside(pgid: i32, tree: &[TreeNode]) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| !tree.iter().any(|t| t.pid == *p))
        // Field 5 of stat: pgrp.
        .find(|&p| proc::stat_fields(p).is_ok_and(|f| proc::stat_field(&f, 5) as i32 == pgid))
}

/// One process of the tree as /proc shows it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TreeNode {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub zombie: bool,
    pub stopped: bool,
    pub exit_status: i32,
}

/// The process `pid` and all its descendants, parents before children
/// (children in PID order), found through /proc/PID/task/*/children.
pub(crate) fn collect_tree(pid: i32) -> Result<Vec<TreeNode>> {
    let st = proc::status(pid)
        .map_err(|_| anyhow::anyhow!("no process with PID {pid}; check the PID (ps -p {pid})"))?;
    if st.tgid != pid {
        bail!(
            "{pid} is a thread of process {}; dump the process (-t {})",
            st.tgid,
            st.tgid
        );
    }
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(stat) = proc::stat_fields(p) else {
            continue;
        };
        let state = std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().next().map(str::to_string))
            })
            .unwrap_or_default();
        out.push(TreeNode {
            pid: p,
            ppid: proc::stat_field(&stat, 4) as i32,
            pgid: proc::stat_field(&stat, 5) as i32,
            sid: proc::stat_field(&stat, 6) as i32,
            zombie: state == "Z",
            stopped: state == "T",
            exit_status: proc::stat_field(&stat, 52) as i32,
        });
        let mut kids: Vec<i32> = std::fs::read_dir(format!("/proc/{p}/task"))
            .map(|d| d.filter_map(|e| e.ok()).collect::<Vec<_>>())
            .unwrap_or_default()
            .iter()
            .flat_map(|t| {
                std::fs::read_to_string(t.path().join("children"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        kids.sort_unstable();
        // Depth first, lowest PID first: push in reverse.
        todo.extend(kids.into_iter().rev());
    }
    Ok(out)
}

/// Refuses to dump crust itself or a process crust runs under (the shell
/// that started it): the dump would have to freeze crust too.
pub(crate) fn check_not_ancestor(pid: i32) -> Result<()> {
    let mut p = std::process::id() as i32;
    while p > 1 {
        if p == pid {
            let what = if p == std::process::id() as i32 {
                "crust itself"
            } else {
                "a process crust runs under (its parent or an ancestor, such as the shell that started it)"
            };
            crate::refuse!(
                "PID {pid} is {what}; the tree to dump must not hold crust: start the program from another shell, or dump a child of this one"
            );
        }
        p = proc::status(p).map(|s| s.ppid).unwrap_or(0);
    }
    Ok(())
}

pub fn dump(opts: &DumpOpts, mut stats: Option<&mut Stats>) -> Result<()> {
    let t0 = Instant::now();
    // A PID that is no process is refused before anything is written.
    check_not_ancestor(opts.pid)?;
    let tree = collect_settled_tree(opts.pid)?;
    check_tree(&tree)?;
    opts.actions.set_init_pid(opts.pid);
    opts.actions.run(Action::PreDump)?;
    // A page server is connected to (and authenticated) before the tree
    // is touched, and before -D's older dump is removed.
    let mut pages = crate::page_xfer::PageDest::new(&opts.pages)?;
    crate::predump::refuse_remote_dedup(&pages, opts.auto_dedup)?;
    let dir = ImageDir::create(&opts.dir)?;
    let runs_on = opts.leave_running || opts.leave_stopped;
    let mut chain = Chain::open(
        &dir,
        opts.prev_images_dir.as_deref(),
        opts.pid,
        opts.track_mem,
        opts.track_mem && runs_on,
    )?;
    if opts.lazy_pages.is_none() && opts.prev_images_dir.is_some() {
        reserve_pages(&mut pages, &dir, &chain, &tree);
    }
    // From here on, whatever the dump changes outside crust is undone by
    // crust's guards if the dump fails, and by the guardian if crust dies.
    let guardian = Guardian::spawn()?;
    let t_freeze = Instant::now();
    // (The freeze timeout counts from here: the reservation is no freeze.)
    let (tree, seized) = freeze_tree(opts.pid, tree, t_freeze, opts.freeze_timeout)?;
    fault_point("seized");
    chain.take_tracking();
    info!(
        "seized {} task(s) in {:?}",
        seized.len(),
        t_freeze.elapsed()
    );
    crate::progress::add_tasks(seized.len() as u64);
    if let Some(s) = stats.as_mut() {
        s.stage("freezing");
        s.count("tasks", seized.len() as u64);
        s.count("threads", seized.iter().map(|t| t.len() as u64).sum());
    }
    let mut refs = Vec::new();
    // The fd tables first, for the whole tree, before any task is touched:
    // a pipe is dumped once, and one whose other end is outside the tree is
    // marked external.
    let live: Vec<i32> = seized.iter().map(|t| t[0].pid.as_raw()).collect();
    let ghosts = GhostStore::new(&dir, opts.ghost_limit, opts.link_remap);
    let zombies: Vec<i32> = tree.iter().filter(|n| n.zombie).map(|n| n.pid).collect();
    let fctx = files::DumpCtx::new(&live, &zombies, opts, &ghosts, &guardian);
    // Every live process with its parent, in tree order.
    let order = with_parents(&live, &tree);
    // fd tables and fs contexts shared with a parent (CLONE_FILES,
    // CLONE_FS): a shared table is dumped once, with its owner.
    let owners = fdt::dump_sharing(&order)?;
    // A tree in a network namespace of its own: as with criu, the
    // network-lock action scripts run first (with `--network-lock skip`
    // they are the lock), and network-unlock ones when the dump lets the
    // tree run on, or fails.
    let own_netns = netlock::netns_ino(&opts.pid.to_string()) != netlock::netns_ino("self");
    let mut script_lock = own_netns
        .then(|| NetScripts::lock(&opts.actions))
        .transpose()?;
    // The tree's connections are locked before any is put in repair mode,
    // and stay locked until the restore when the tree is killed.
    let mut net_lock = if opts.tcp_established && !opts.tcp_close {
        let conns = inet::tcp::tree_connections(&live)?;
        if conns.is_empty() {
            None
        } else {
            let name = netlock::lock_name(opts.pid);
            let netns = netlock::foreign_netns(opts.pid)?;
            guardian.locking(opts.network_lock, &name, netns.as_ref().map(|f| f.as_fd()))?;
            Some(netlock::NetLock::take(
                opts.network_lock,
                &name,
                &conns,
                netns,
            )?)
        }
    } else {
        None
    };
    fault_point("locked");
    // (Declared after `fctx`: a failed dump lifts the lock first, then takes
    // the connections out of repair mode, whose window probes then reach
    // the peers.)
    let mut tables = Vec::new();
    for &pid in &live {
        tables.push(match owners[&pid].0 {
            0 => files::dump_fd_table(pid, &fctx)?,
            _ => crate::resources::fs::dump_fs(pid)?,
        });
    }
    // Every connection has been read in repair mode (and left it again).
    fault_point("repaired");
    // The tree's pty masters: a session leader whose controlling terminal
    // is one of them takes it again on restore.
    let masters: Vec<u32> = tables
        .iter()
        .flat_map(|t| &t.fds)
        .filter_map(|e| match &e.file {
            Some(crate::images::pb::fd_entry::File::Pty(p)) if p.master => Some(p.index),
            _ => None,
        })
        .collect();
    pipes::mark_external_pipes(&live, &mut tables);
    files::tree_read(&mut tables, &fctx)?;
    if let Some(s) = stats.as_mut() {
        s.stage("fd tables");
    }
    // A session leader's terminal opened by path, by the leader's PID.
    let table_of = |pid: i32| {
        let of = owners[&pid].0;
        let owner = if of != 0 { of } else { pid };
        &tables[live.iter().position(|&p| p == owner).expect("a live PID")]
    };
    let ctty_paths: std::collections::HashMap<i32, String> = live
        .iter()
        .map(|&pid| (pid, table_of(pid)))
        .filter_map(|(pid, t)| {
            let rdev = crate::resources::devices::ctty_rdev(pid);
            t.fds.iter().find_map(|e| match &e.file {
                Some(crate::images::pb::fd_entry::File::Chardev(c))
                    if rdev != 0 && c.rdev == rdev =>
                {
                    Some((pid, c.path.clone()))
                }
                _ => None,
            })
        })
        .collect();
    // Parents first (tree order): a child's private pages still shared with
    // its parent are left to the parent's image. What /proc shows of each
    // process is read one process ahead (`collect::read_ahead`).
    let tids: Vec<Vec<i32>> = seized
        .iter()
        .map(|t| t.iter().map(|t| t.pid.as_raw()).collect())
        .collect();
    // The pages the chain holds of each process whose pagemap need not be
    // read where tracking shows them unchanged (`Chain::held_for_reading`).
    let mut held = std::collections::HashMap::new();
    for &(pid, ppid) in &order {
        let parent_dumped = order.iter().any(|&(p, _)| p == ppid);
        if let Some(h) = chain.held_for_reading(pid, parent_dumped)? {
            held.insert(pid, h);
        }
    }
    // --lazy-pages: each task's pages to serve once the images are written.
    let mut lazy_runs = opts.lazy_pages.as_ref().map(|_| Vec::new());
    // A big process's pages may stream while its smaps is read
    // (`collect::PagesAhead`) when they go straight into a pages image.
    let into_images = pages.is_local() && lazy_runs.is_none();
    let childless = |i: usize| !order[i + 1..].iter().any(|&(_, pp)| pp == order[i].0);
    let plan = |i: usize| crate::collect::MemoryPlan {
        held: held.get(&order[i].0),
        ahead: into_images && childless(i),
        parasite: None,
    };
    // The first process's parasite goes in before its memory is read
    // when its pages are to stream that way: smaps then starts at once
    // (its walk would hold up the parasite's mmap), beside the walk that
    // finds the pages (`collect::PagesAhead`). Later processes are read
    // while crust works in the one before.
    let mut first = None;
    if plan(0).ahead && plan(0).held.is_some() && memory::is_big(order[0].0) {
        first = Some(Parasite::infect(&seized[0][0], &guardian)?);
        fault_point("infected");
    }
    let first_region = first.as_ref().map(|p: &Parasite| p.region());
    let mut tables = tables.into_iter();
    crate::collect::read_ahead(
        &order,
        |i, parent| {
            let plan = crate::collect::MemoryPlan {
                parasite: first_region.filter(|_| i == 0),
                ..plan(i)
            };
            crate::collect::Process::read(order[i].0, &tids[i], parent, plan)
        },
        |i, read| {
            let fds = tables.next().expect("an fd table per process");
            dump_task(
                &seized[i],
                fds,
                read,
                if i == 0 { first.take() } else { None },
                &mut TaskOut {
                    dir: &dir,
                    pages: &mut pages,
                    chain: &mut chain,
                    ghosts: &ghosts,
                    guardian: &guardian,
                    lazy: lazy_runs.as_mut(),
                },
            )?;
            crate::progress::task_done();
            Ok(())
        },
    )?;
    // (Taken by the first process's dump; the borrow of the tree ends.)
    drop(first);
    if let Some(s) = stats.as_mut() {
        s.stage("memory and task state");
    }
    let job_stops: std::collections::HashMap<i32, i32> = seized
        .iter()
        .filter_map(|t| Some((t[0].pid.as_raw(), t[0].job_stop? as i32)))
        .collect();
    for n in &tree {
        let ctty = (n.sid == n.pid && !n.zombie)
            .then(|| crate::resources::pty::ctty_of(n.pid, &masters))
            .flatten();
        refs.push(TaskRef {
            pid: n.pid,
            ppid: n.ppid,
            pgid: n.pgid,
            sid: n.sid,
            zombie: n.zombie,
            stopped: n.stopped,
            stop_signo: job_stops.get(&n.pid).copied().unwrap_or(0),
            exit_status: n.exit_status,
            ctty_pty: ctty.map_or(0, |(i, _)| i as i32 + 1),
            tty_fg_pgrp: ctty.map_or(0, |(_, g)| g),
            ctty_path: (n.sid == n.pid)
                .then(|| ctty_paths.get(&n.pid).cloned())
                .flatten()
                .unwrap_or_default(),
            files_of: owners.get(&n.pid).map_or(0, |o| o.0),
            fs_of: owners.get(&n.pid).map_or(0, |o| o.1),
            start_time: 0,
        });
    }
    let mut inv = Inventory {
        format_version: FORMAT_VERSION,
        root_pid: opts.pid,
        tasks: refs,
        crust_version: env!("CARGO_PKG_VERSION").into(),
        dump_time_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
        shell_job: opts.shell_job,
        shell_job_foreground: opts.shell_job && foreground_of_its_tty(&tree[0]),
        sysv_sems: crate::resources::sysv::dump_sems(&live)?,
        sysv_msgs: crate::resources::sysv::dump_msgs(&live)?,
        kernel_release: nix::sys::utsname::uname()?
            .release()
            .to_string_lossy()
            .into_owned(),
        net_lock: net_lock
            .as_ref()
            .filter(|_| !opts.leave_running)
            .and_then(|l| l.record()),
        net_ns: netlock::netns_ino(&opts.pid.to_string()).unwrap_or(0),
        crust_net_ns: netlock::netns_ino("self").unwrap_or(0),
        net_ns_loopback_only: netlock::loopback_only(opts.pid),
        tracking: chain.tracking(),
        tracking_token: chain.token,
        ..Default::default()
    };
    // Every page durable where it went (a page server confirms it synced
    // them) before the inventory makes the dump whole.
    pages.finish()?;
    crate::predump::identify(&mut inv);
    ghosts.write()?;
    fault_point("before-inventory");
    dir.write_msg(ImageKind::Inventory, 0, &inv)?;
    // Durable before the tree is killed: a dump from a shutdown hook
    // survives the power cut that follows.
    dir.sync()?;
    info!("images of {} complete in {:?}", opts.pid, t0.elapsed());
    if let Some(s) = stats.as_mut() {
        s.stage("writing images");
    }
    // The images are whole: a post-dump script may copy them away, or say
    // that the tree is to run on (by failing), which undoes the dump.
    opts.actions.run(Action::PostDump)?;
    if let (Some(serve), Some(runs)) = (&opts.lazy_pages, &lazy_runs) {
        // Still frozen, and still the guardian's to resume should crust
        // die: served until the daemon has every page, or the dump fails
        // and the tree runs on.
        crate::lazy::serve_pages(serve, runs)?;
        if let Some(s) = stats.as_mut() {
            s.stage("serving lazy pages");
        }
    }
    ghosts.keep();
    let tree_ends = !runs_on;
    if tree_ends {
        // The dump is complete and the tree ends: should crust die from
        // now on, the guardian ends it.
        guardian.keep(&live)?;
        // The restore lifts it.
        if let Some(l) = net_lock.take() {
            l.keep();
        }
    } else if let Some(l) = net_lock.take() {
        l.release()?;
    }
    if let Some(l) = script_lock.take() {
        if tree_ends {
            // The restore runs network-unlock.
            l.keep();
        } else {
            l.unlock()?;
        }
    }
    if !tree_ends {
        // Before the tree runs on, now that the lock is lifted.
        fctx.give_back();
    }
    fault_point("kept");
    let mut killed = Vec::new();
    let mut pidfds = Vec::new();
    for threads in seized {
        let mut threads = threads.into_iter();
        let leader = threads.next().expect("a process has a leader");
        killed.push(leader.pid.as_raw());
        if tree_ends {
            // Opened while the process is still ours (its PID cannot be
            // reused before the kill).
            pidfds.extend(sys::pidfd_open(leader.pid.as_raw()).ok());
            // SIGKILL to the leader ends the whole thread group.
            leader.kill()?;
            for t in threads {
                t.forget();
            }
        } else {
            if opts.leave_stopped {
                // Queued while the task is held: it stops before it runs
                // an instruction.
                nix::sys::signal::kill(leader.pid, nix::sys::signal::Signal::SIGSTOP)?;
            }
            for t in threads {
                t.release()?;
            }
            leader.release()?;
        }
    }
    info!(
        "the tree of {} was frozen for {:?} (seize to {})",
        opts.pid,
        t_freeze.elapsed(),
        if tree_ends { "kill" } else { "release" }
    );
    // (Kept mapped until the tree no longer waits: `pages::SEALED`.)
    crate::images::unmap_sealed();
    if tree_ends && fctx.holds_for_restore() {
        // What the dead tree held, crust's copies keep: connections go back
        // into repair mode before their last close, once the tree's copies
        // are closed. A dying process frees its memory page by page, and
        // its files after; process_mrelease frees the memory from crust,
        // on the other core, so a big one is gone sooner.
        for fd in &pidfds {
            let _ = sys::process_mrelease(fd);
        }
        wait_dead(&killed);
        fctx.tree_ends()?;
    } else if tree_ends {
        // The images are whole and durable, and nothing of the tree is held
        // by crust: the killed tree tears its memory down on its own (as it
        // does after criu's dump), which takes about 50 ms a GiB. A restore
        // waits for a PID of the images held by a task still exiting.
        fctx.tree_ends()?;
    }
    drop(fctx);
    guardian.finish();
    if runs_on {
        chain.finish(&dir.path)?;
    }
    if opts.auto_dedup {
        crate::predump::auto_dedup(&dir.path)?;
    }
    if let Some(s) = stats.as_mut() {
        s.stage("ending the tree");
        for (name, c) in [
            ("pages scanned", &crate::stats::PAGES_SCANNED),
            ("pages written", &crate::stats::PAGES_WRITTEN),
            ("pages skipped as zero", &crate::stats::PAGES_ZERO),
            ("pages shared with parent", &crate::stats::PAGES_PARENT),
            (
                "pages left to the parent dump",
                &crate::stats::PAGES_IN_PREV,
            ),
        ] {
            s.count(name, c.load(std::sync::atomic::Ordering::Relaxed));
        }
    }
    info!("dump of {} done in {:?}", opts.pid, t0.elapsed());
    Ok(())
}

/// A task whose pages are estimated below this has them written into
/// blocks allocated as they come: too little to be worth a file early.
const RESERVE_MIN: u64 = 8 << 20;

/// Allocates the pages images' space while the tree still runs, so that
/// the frozen tree waits only for the copy (`PagesWriter::reserve`). Only
/// for a dump that builds on a pre-dump: one run to keep the freeze short,
/// whose pages are those written since, few. A full dump would write its
/// space twice, zeros and then pages: its freeze would be shorter but the
/// dump longer (docs/PERFORMANCE.md). A pre-dump has no use for it: its
/// tree runs again before pages are written.
fn reserve_pages(
    pages: &mut crate::page_xfer::PageDest,
    dir: &ImageDir,
    chain: &Chain,
    tree: &[TreeNode],
) {
    if !pages.is_local() {
        return;
    }
    let t = Instant::now();
    // At most half the room left where the images go: the space one task
    // holds ahead is given back only once its own stream is in, and the
    // tasks after it need room for theirs.
    let mut room = nix::sys::statvfs::statvfs(&dir.path)
        .map_or(0, |s| s.blocks_available() * s.fragment_size())
        / 2;
    let mut total = 0;
    for n in tree.iter().filter(|n| !n.zombie) {
        let bytes = chain.estimate(n.pid);
        if bytes < RESERVE_MIN || bytes > room {
            continue;
        }
        // An optimization only: the dump goes on without it.
        match pages.reserve(dir, n.pid, bytes) {
            Ok(()) => {
                total += bytes;
                room -= bytes;
            }
            Err(e) => tracing::warn!("PID {}: no space reserved for its pages: {e:#}", n.pid),
        }
    }
    if total > 0 {
        info!(
            "{} MiB reserved for pages images in {:?}",
            total >> 20,
            t.elapsed()
        );
    }
}

/// Waits until the killed tasks have died (a big address space takes a
/// while to tear down): a restore run right after the dump then finds
/// their PIDs free, or held by zombies it knows to wait for.
pub(crate) fn wait_dead(pids: &[i32]) {
    let t = Instant::now();
    while !pids.iter().all(|&p| gone_or_zombie(p)) {
        if t.elapsed() > std::time::Duration::from_secs(10) {
            tracing::warn!("killed tasks are still exiting after 10 s");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// What one thread holds of its own, read from outside: through ptrace,
/// and what /proc showed (`read`).
fn dump_thread(t: &SeizedTask, read: crate::collect::Thread) -> Result<ThreadCore> {
    let tid = t.pid.as_raw();
    let (resume, restarted) = regs::resume_regs(tid, &t.stop_regs, regs::ResumeIn::Image);
    let st = read.status;
    let (robust_list, robust_len) = read.robust_list;
    Ok(ThreadCore {
        tid,
        comm: read.comm,
        regs: Some(regs::to_pb(&resume)),
        xsave: t.xstate.clone(),
        sigmask: t.sigmask,
        rseq: sys::get_rseq_conf(t.pid)
            .ok()
            .filter(|c| c.rseq_abi_pointer != 0)
            .map(|c| crate::images::pb::Rseq {
                addr: c.rseq_abi_pointer,
                len: c.rseq_abi_size,
                sig: c.signature,
            }),
        robust_list,
        robust_len,
        creds: Some(creds::dump_creds(&st)),
        restarted_syscall: restarted,
        sched: Some(read.sched),
        pending: sys::peek_pending(t.pid, false).context("reading pending signals")?,
        seccomp: seccomp::dump_thread_seccomp(t.pid, st.seccomp)?,
        ..Default::default()
    })
}

/// Where each process's dump goes, and what the dump of the whole tree
/// keeps across its processes.
struct TaskOut<'a> {
    dir: &'a ImageDir,
    /// Where the pages go (-D or a page server).
    pages: &'a mut crate::page_xfer::PageDest,
    /// The pages already in the chain's older images, and write tracking.
    chain: &'a mut Chain,
    ghosts: &'a GhostStore,
    guardian: &'a Guardian,
    /// With --lazy-pages: each process's runs of private pages, served
    /// from the frozen tree instead of written.
    lazy: Option<&'a mut Vec<(i32, Vec<crate::images::pb::PagemapEntry>)>>,
}

/// Streams the pages `ahead` found into the process's pages image
/// (`pages`) while its smaps is read (`collect::PagesAhead`), with the
/// parasite that is in already; then waits for its VMAs, and streams
/// again, from the start, when they choose other pages. Returns its
/// memory.
fn stream_ahead(
    pid: i32,
    ahead: crate::collect::PagesAhead,
    parasite: &mut Parasite,
    pages: &mut crate::page_xfer::TaskPages,
) -> Result<crate::collect::Memory> {
    let t = Instant::now();
    memory::dump_pages(parasite, &ahead.vmas, &ahead.runs, pages, false)?;
    let streamed = t.elapsed();
    let runs = ahead.runs.clone();
    let m = ahead.finish()?;
    tracing::debug!(
        "PID {pid}: {} MiB of pages streamed in {streamed:?} while its VMAs were read, in {:?}",
        pages.len() >> 20,
        m.vmas_read
    );
    // (Found ahead only where tracking told the pages the chain keeps.)
    anyhow::ensure!(
        m.chained,
        "PID {pid}: its pages found ahead lost the chain's"
    );
    if m.mm.pagemap != runs {
        // Their flags leave out (or add) pages the stream holds.
        tracing::debug!("PID {pid}: its VMAs choose other pages: streaming them again");
        // (The bytes streamed twice count twice in the progress line.)
        crate::progress::add_bytes(pages.len());
        pages.restart()?;
        memory::dump_pages(parasite, &m.mm.vmas, &m.mm.pagemap, pages, false)?;
    }
    Ok(m)
}

/// Dumps one process, given what /proc showed of it (`read`), and its
/// parasite when it went in before that was read (`infected`).
fn dump_task(
    threads: &[SeizedTask],
    fds: FdTable,
    read: crate::collect::Process,
    infected: Option<Parasite>,
    out: &mut TaskOut,
) -> Result<()> {
    let task = &threads[0];
    let pid = task.pid.as_raw();
    let crate::collect::Process {
        status: st,
        memory: mem_read,
        threads: threads_read,
        personality,
        oom_score_adj,
        loginuid,
        posix_timers,
    } = read;
    let TaskOut {
        dir,
        pages: dest,
        chain,
        ghosts,
        guardian,
        lazy,
    } = out;
    let mut pages = dest.task(dir, pid)?;
    let t = Instant::now();
    let mut parasite = match infected {
        Some(p) => p,
        None => {
            let p = Parasite::infect(task, guardian)?;
            fault_point("infected");
            p
        }
    };
    // Pages found ahead of the VMAs stream first (`collect::PagesAhead`).
    let (mem_read, streamed) = match mem_read {
        crate::collect::MemoryRead::Whole(m) => (*m, false),
        crate::collect::MemoryRead::Ahead(a) => {
            (stream_ahead(pid, a, &mut parasite, &mut pages)?, true)
        }
    };
    let mut mm = mem_read.mm;
    memory::add_ghosts(ghosts, &mem_read.ghosts)?;
    let t_select = Instant::now();
    if mem_read.chained {
        tracing::debug!(
            "PID {pid}: {} pages left to the chain as tracking shows them, their pagemap unread",
            mm.prev_pages.iter().map(|r| r.nr_pages).sum::<u64>()
        );
    } else {
        chain.select(pid, &mut mm)?;
    }
    tracing::debug!(
        "PID {pid}: VMAs read at {:?}, pages found at {:?} (ahead), chain's pages left in {:?}",
        mem_read.vmas_read,
        mem_read.pages_found,
        t_select.elapsed()
    );
    if let Some(lazy) = lazy {
        crate::lazy::split_lazy(&mut mm);
        lazy.push((pid, mm.lazy_pages.clone()));
    }
    let mut threads_core = threads
        .iter()
        .zip(threads_read)
        .map(|(t, r)| dump_thread(t, r))
        .collect::<Result<Vec<_>>>()?;
    let mut core = TaskCore {
        pid,
        comm: st.name.clone(),
        personality,
        shared_pending: sys::peek_pending(task.pid, true).context("reading pending signals")?,
        loginuid,
        oom_score_adj,
        ..Default::default()
    };

    memory::dump_mlockall(pid, parasite.region(), &mut core)?;
    // What only a thread can read about itself: asked in each thread, the
    // leader first (whose answer also holds the process-wide state).
    for (i, (t, th)) in threads.iter().zip(threads_core.iter_mut()).enumerate() {
        let cmd = match i {
            0 => abi::PARASITE_CMD_GET_MISC,
            _ => abi::PARASITE_CMD_GET_THREAD_MISC,
        };
        let r = parasite.run_on(t, cmd)?;
        if r < 0 {
            bail!(
                "thread {} of {pid}: the parasite could not read its state: errno {}",
                th.tid,
                -r
            );
        }
        let m = parasite.ctl().misc;
        signals::dump_thread_signals(&m, th);
        prctl::dump_thread_prctl(&m, th);
        if i == 0 {
            signals::dump_signals(&m, &mut core);
            timers::dump_itimers(&m, &mut core);
            creds::dump_rlimits(&m, &mut core);
            prctl::dump_prctl(&m, &mut core);
            membarrier::dump_membarrier(&m, &mut core);
            if m.brk >= mm.start_brk {
                mm.brk = m.brk;
            }
        }
    }
    core.threads = threads_core;
    timers::dump_posix_timers(&mut parasite, &posix_timers, &mut core)?;

    // Before the page pipes: the userfaultfd borrows a pipe's slot. (Pages
    // streamed ahead are of a chain tracking is not armed again in:
    // `Chain::held_for_reading`.)
    chain.arm_task(pid, &mm.vmas, Some(&mut parasite))?;
    if !streamed {
        // The parasite's last command: `cure` follows.
        memory::dump_pages(&mut parasite, &mm.vmas, &mm.pagemap, &mut pages, true)?;
    }
    fault_point("pages-drained");
    parasite.cure()?;
    let bytes = pages.len();
    pages.finish()?;
    info!(
        "PID {pid}: {} MiB of pages in {:?}",
        bytes >> 20,
        t.elapsed()
    );

    dir.write_msg(ImageKind::Core, pid, &core)?;
    dir.write_msg(ImageKind::Mm, pid, &mm)?;
    dir.write_msg(ImageKind::Files, pid, &fds)?;
    Ok(())
}

/// The network-lock scripts of a dump: network-unlock runs when the dump
/// fails after them (on drop) or lets the tree run on (`unlock`).
struct NetScripts<'a> {
    actions: &'a Actions,
    armed: bool,
}

impl<'a> NetScripts<'a> {
    fn lock(actions: &'a Actions) -> Result<Self> {
        actions.run(Action::NetworkLock)?;
        Ok(NetScripts {
            actions,
            armed: true,
        })
    }

    fn unlock(mut self) -> Result<()> {
        self.armed = false;
        self.actions.run(Action::NetworkUnlock)
    }

    fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for NetScripts<'_> {
    fn drop(&mut self) {
        if self.armed
            && let Err(e) = self.actions.run(Action::NetworkUnlock)
        {
            tracing::warn!("{e:#}");
        }
    }
}

//! crust: checkpoint/restore for Linux processes.
//!
//! The data flow, one module per stage: `seize` (freeze), `parasite_ctl`
//! (remote code in the task), `resources::*` (what a task holds, each with
//! its dump and restore side), `images` (the files), `dump` (orchestration),
//! `restore` (plan, rebuild, restorer hand-over). See docs/ARCHITECTURE.md.

#[path = "../parasite/abi.rs"]
pub mod abi;
mod actions;
mod blobs;
mod check;
mod cli;
mod collect;
/// The parasite's checksum, compiled here to be held to crc32fast.
#[cfg(test)]
#[path = "../parasite/crc32.rs"]
mod crc32;
mod dump;
mod error;
mod guardian;
mod images;
mod lazy;
mod log;
mod page_xfer;
mod parasite_ctl;
mod predump;
mod proc;
mod progress;
mod resources;
mod restore;
mod seize;
mod show;
mod stats;
mod sys;
mod tls;
mod uffd;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;

use cli::{Cli, Cmd};

/// The directory logs, the pidfile and statistics go in: -W, else the
/// images directory, else the current one.
fn work_dir(cli: &Cli) -> PathBuf {
    let images = match &cli.cmd {
        Cmd::Dump(d) => Some(&d.dir),
        Cmd::PreDump(d) => Some(&d.dir),
        Cmd::Dedup { dir } => Some(dir),
        Cmd::Restore(r) => Some(&r.dir),
        Cmd::PageServer(p) => Some(&p.dir),
        Cmd::LazyPages(l) => Some(&l.dir),
        _ => None,
    };
    cli.work_dir
        .clone()
        .or_else(|| images.cloned())
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `path` as given, or in the work directory when relative.
fn in_work_dir(work: &Path, path: &Path) -> PathBuf {
    if path.is_relative() {
        work.join(path)
    } else {
        path.to_owned()
    }
}

fn init_logging(cli: &Cli, work: &Path) -> anyhow::Result<()> {
    let file = match &cli.log_file {
        Some(path) => {
            match &cli.cmd {
                // A dump makes its directories; a restore must not make
                // anything (a -D that does not exist is bad input).
                Cmd::Dump(_) | Cmd::PreDump(_) | Cmd::PageServer(_) => {
                    std::fs::create_dir_all(work).ok()
                }
                _ if !work.is_dir() => crate::refuse!(
                    "work directory {} does not exist; pass the -D used for the dump (or an existing -W)",
                    work.display()
                ),
                _ => None,
            };
            let mut path = in_work_dir(work, path);
            if cli.log_pid {
                path = log::with_pid(&path, std::process::id() as i32);
            }
            Some((
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("opening log file {}", path.display()))?,
                cli.log_pid
                    .then(|| in_work_dir(work, cli.log_file.as_ref().unwrap())),
            ))
        }
        None => None,
    };
    log::init(cli.log_level(), file);
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let work = work_dir(&cli);
    init_logging(&cli, &work)?;
    let mut stats = cli.display_stats.then(stats::Stats::start);
    let code = match &cli.cmd {
        Cmd::Check { all, feature } => check::run(*all, feature.as_deref())?,
        Cmd::Dump(d) => {
            let actions = actions::Actions::new(&cli.action_scripts, &d.dir);
            let _progress = progress::start("dumping");
            dump::dump(
                &dump::DumpOpts {
                    pid: d.pid,
                    dir: d.dir.clone(),
                    shell_job: d.shell_job,
                    leave_running: d.leave_running,
                    leave_stopped: d.leave_stopped,
                    file_locks: d.file_locks,
                    ghost_limit: d.ghost_limit,
                    link_remap: d.link_remap,
                    force_irmap: d.force_irmap,
                    irmap_scan_paths: d.irmap_scan_path.clone(),
                    ext_unix_sk: d.ext_unix_sk.clone().map(|i| i.0),
                    tcp_established: d.tcp_established,
                    tcp_close: d.tcp_close,
                    skip_in_flight: d.skip_in_flight,
                    network_lock: d
                        .network_lock
                        .unwrap_or_else(resources::netlock::Method::auto),
                    freeze_timeout: std::time::Duration::from_secs(d.timeout),
                    pages: if d.lazy_pages {
                        // --address, --port and --tls are where and how
                        // the lazy pages are served, not a page server's.
                        crate::page_xfer::SendArgs {
                            address: None,
                            port: None,
                            tls: Default::default(),
                            ..d.pages.clone()
                        }
                    } else {
                        d.pages.clone()
                    },
                    lazy_pages: if d.lazy_pages {
                        match d.pages.port {
                            // The dump listens: the TLS server, checked
                            // (its files read) before the tree is touched.
                            Some(p) => Some(lazy::ServeOpts {
                                addr: cli::socket_addr(
                                    d.pages.address.as_deref().unwrap_or("0.0.0.0"),
                                    p,
                                )?,
                                tls: tls::server_config(&d.pages.tls, "the lazy-pages daemon")?,
                            }),
                            None => crate::refuse!(
                                "dump --lazy-pages serves the private memory on a TCP port: give --port (and --address)"
                            ),
                        }
                    } else {
                        None
                    },
                    actions,
                    prev_images_dir: d.prev_images_dir.clone(),
                    track_mem: d.track_mem,
                    auto_dedup: d.auto_dedup,
                },
                stats.as_mut(),
            )?;
            0
        }
        Cmd::PreDump(d) => {
            let actions = actions::Actions::new(&cli.action_scripts, &d.dir);
            let _progress = progress::start("pre-dumping");
            predump::pre_dump(
                &predump::PreDumpOpts {
                    pid: d.pid,
                    dir: d.dir.clone(),
                    prev_images_dir: d.prev_images_dir.clone(),
                    auto_dedup: d.auto_dedup,
                    freeze_timeout: std::time::Duration::from_secs(d.timeout),
                    pages: d.pages.clone(),
                    actions,
                },
                stats.as_mut(),
            )?;
            0
        }
        Cmd::Dedup { dir } => {
            let d = images::chain::dedup(dir)?;
            println!(
                "{} MiB punched out of {} older image(s)",
                d.bytes >> 20,
                d.images
            );
            0
        }
        Cmd::Restore(r) => {
            if let Some(root) = &r.root {
                crate::refuse!(
                    "--root {}: it sets the root of a restored mount namespace, and crust images hold none (crust does not dump mount namespaces yet); restore without --root",
                    root.display()
                );
            }
            if r.skip_in_flight {
                tracing::warn!(
                    "--skip-in-flight leaves connections out at the dump; the restore has none of them"
                );
            }
            if r.force_irmap || !r.irmap_scan_path.is_empty() {
                tracing::warn!(
                    "--force-irmap and --irmap-scan-path find watched files at the dump; the restore opens them by the paths in the images"
                );
            }
            let actions = actions::Actions::new(&cli.action_scripts, &r.dir);
            let progress = progress::start("restoring");
            restore::restore(
                &restore::RestoreOpts {
                    dir: r.dir.clone(),
                    detach: r.restore_detached,
                    sibling: r.restore_sibling,
                    shell_job: r.shell_job,
                    leave_stopped: r.leave_stopped,
                    pidfile: r.pidfile.as_ref().map(|p| in_work_dir(&work, p)),
                    pid_ns: r.pid_ns,
                    inherit_fds: r.inherit_fd.clone(),
                    link_remap: r.link_remap,
                    file_locks: r.file_locks,
                    ext_unix_sk: r.ext_unix_sk,
                    tcp_established: r.tcp_established,
                    tcp_close: r.tcp_close,
                    network_lock: r
                        .network_lock
                        .unwrap_or_else(resources::netlock::Method::auto),
                    actions,
                    lazy_pages: r.lazy_pages.then(|| work.join(lazy::SOCKET_NAME)),
                },
                stats.as_mut(),
                progress,
            )?
        }
        Cmd::PageServer(p) => {
            page_xfer::serve(p)?;
            0
        }
        Cmd::Show { path, json } => {
            show::show(path, *json)?;
            0
        }
        Cmd::LazyPages(l) => {
            let page_server = match (l.page_server, &l.address, l.port) {
                (false, None, None) if !l.tls.tls => {
                    tls::check_unused(&l.tls)?;
                    None
                }
                (false, _, _) => crate::refuse!(
                    "--address, --port and --tls say where and how lazy-pages pulls the pages from the dump; add --page-server, or drop them"
                ),
                // The daemon connects: the TLS client, checking that the
                // dump's certificate names --address.
                (true, Some(a), Some(p)) => Some(lazy::PageSource {
                    address: a.clone(),
                    addr: cli::socket_addr(a, p)?,
                    tls: tls::client_config(&l.tls)?,
                }),
                (true, _, _) => crate::refuse!(
                    "lazy-pages --page-server needs --address and --port of the dump (dump --lazy-pages)"
                ),
            };
            lazy::daemon(&lazy::DaemonOpts {
                dir: l.dir.clone(),
                socket: work.join(lazy::SOCKET_NAME),
                page_server,
            })?;
            0
        }
    };
    if let Some(s) = &stats {
        let title = match &cli.cmd {
            Cmd::Dump(_) => "Dump",
            Cmd::PreDump(_) => "Pre-dump",
            _ => "Restore",
        };
        print!("{}", s.table(title));
    }
    Ok(code)
}

fn main() {
    // Before any thread starts: every wait for a child or tracee is taken
    // through a signalfd with a deadline.
    sys::block_sigchld();
    let args = match cli::expand_args(
        std::env::args_os().collect(),
        std::env::var_os("CRUST_CONFIG_FILE"),
    ) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::exit(error::Class::Refused as i32);
        }
    };
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        // Usage errors (exit 2, bad input) and --help/--version (0) print
        // the way clap does.
        Err(e) => e.exit(),
    };
    // A task may hold as many fds as its hard limit allows; crust, and the
    // restored tasks it forks before they get their own limits, need as many.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let logs_to_file = cli.log_file.is_some();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            // The log (-o) gets every error crust prints, so that a log
            // read later tells the whole story.
            if logs_to_file {
                tracing::error!("{msg}");
            }
            eprintln!("Error: {msg}");
            std::process::exit(error::class_of(&e) as i32);
        }
    }
}

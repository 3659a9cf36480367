//! crust: checkpoint/restore for Linux processes.
//!
//! The data flow, one module per stage: `seize` (freeze), `parasite_ctl`
//! (remote code in the task), `resources::*` (what a task holds, each with
//! its dump and restore side), `images` (the files), `dump` (orchestration),
//! `restore` (plan, rebuild, restorer hand-over). See docs/ARCHITECTURE.md.

#[path = "../parasite/abi.rs"]
pub mod abi;
mod blobs;
mod check;
/// The parasite's checksum, compiled here to be held to crc32fast.
#[cfg(test)]
#[path = "../parasite/crc32.rs"]
mod crc32;
mod dump;
mod images;
mod log;
mod parasite_ctl;
mod proc;
mod resources;
mod restore;
mod seize;
mod show;
mod sys;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "crust",
    version,
    about = "Checkpoint/restore for Linux processes"
)]
struct Cli {
    /// Write the log to this file (relative paths go into the images directory).
    #[arg(short = 'o', long = "log-file", global = true)]
    log_file: Option<PathBuf>,
    /// Verbosity: 0 errors, 1 warnings, 2 info, 3 debug, 4 trace.
    #[arg(short = 'v', long = "verbosity", global = true, default_value_t = 1, num_args = 0..=1, default_missing_value = "2")]
    verbosity: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check that the kernel has what crust needs.
    Check {
        /// List every probe with its result and what it enables.
        #[arg(long)]
        all: bool,
        /// Check one feature by name.
        #[arg(long)]
        feature: Option<String>,
    },
    /// Checkpoint a process into an images directory.
    Dump {
        #[arg(short = 't', long = "tree")]
        pid: i32,
        #[arg(short = 'D', long = "images-dir", default_value = ".")]
        dir: PathBuf,
        /// The process was started from a shell: its terminal is crust's.
        #[arg(long)]
        shell_job: bool,
        /// Let the process run on after the dump.
        #[arg(short = 'R', long)]
        leave_running: bool,
        /// Take file locks (flock, POSIX, OFD) and leases along; without it a tree
        /// holding one is refused.
        #[arg(short = 'l', long)]
        file_locks: bool,
        /// Most data carried in the images per file deleted while open
        /// (holes do not count): bytes, or with a K, M or G suffix.
        #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64M")]
        ghost_limit: u64,
        /// A file deleted while open but still linked under another name is
        /// linked back beside its old name until the restore (which opens
        /// that same file and removes the link); without it such a tree is
        /// refused.
        #[arg(long)]
        link_remap: bool,
        /// An inotify or fanotify watch whose file handle does not open is
        /// found by scanning the --irmap-scan-path directories for its inode.
        #[arg(long)]
        force_irmap: bool,
        /// A directory to scan for watched inodes (with --force-irmap);
        /// repeatable.
        #[arg(long, value_name = "DIR")]
        irmap_scan_path: Vec<PathBuf>,
    },
    /// Bring a checkpointed process back.
    Restore {
        #[arg(short = 'D', long = "images-dir", default_value = ".")]
        dir: PathBuf,
        /// Return once the process runs instead of waiting for it.
        #[arg(short = 'd', long)]
        restore_detached: bool,
        #[arg(long)]
        shell_job: bool,
        /// Write the restored root PID to this file.
        #[arg(long)]
        pidfile: Option<PathBuf>,
        /// Accepted for CRIU compatibility: locks in the images are always taken again.
        #[arg(short = 'l', long)]
        file_locks: bool,
        /// Restore into a new PID namespace, where the tree's PIDs are always
        /// free (crust's init is its PID 1): a snapshot can then be restored
        /// while the original runs, or several times at once.
        #[arg(short = 'n', long, visible_alias = "namespaces")]
        pid_ns: bool,
        /// fd[N]:KEY: crust's fd N stands in for KEY, a resource the tree
        /// shared with the outside (a pipe's other end: pipe:[INO]).
        #[arg(long = "inherit-fd", value_name = "fd[N]:KEY", value_parser = parse_inherit_fd)]
        inherit_fd: Vec<(i32, String)>,
        /// Allow the files the dump linked back with --link-remap: they are
        /// opened, and their links removed once the restore is done.
        #[arg(long)]
        link_remap: bool,
        /// A dump option, taken here for scripts that give dump and restore
        /// one set of options: the restore says it has no effect.
        #[arg(long, hide = true)]
        force_irmap: bool,
        #[arg(long, value_name = "DIR", hide = true)]
        irmap_scan_path: Vec<PathBuf>,
    },
    /// Decode images for people (or scripts, with --json).
    Show {
        /// An images directory or one image file.
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// A size in bytes, with an optional K, M or G suffix (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?}: expected a size such as 1048576, 512K, 64M or 2G");
    let (num, shift) = match s.trim().chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// Parses CRIU's `fd[N]:KEY` spelling of --inherit-fd.
fn parse_inherit_fd(s: &str) -> Result<(i32, String), String> {
    let bad = || format!("{s:?}: expected fd[N]:KEY, e.g. fd[3]:pipe:[12345]");
    let rest = s.strip_prefix("fd[").ok_or_else(bad)?;
    let (n, key) = rest.split_once("]:").ok_or_else(bad)?;
    let n: i32 = n.parse().map_err(|_| bad())?;
    if key.is_empty() {
        return Err(bad());
    }
    Ok((n, key.to_string()))
}

fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    let file = match &cli.log_file {
        Some(path) => {
            let path = match (&cli.cmd, path.is_relative()) {
                (Cmd::Dump { dir, .. } | Cmd::Restore { dir, .. }, true) => {
                    std::fs::create_dir_all(dir).ok();
                    dir.join(path)
                }
                _ => path.clone(),
            };
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| anyhow::anyhow!("opening log file {}: {e}", path.display()))?,
            )
        }
        None => None,
    };
    log::init(cli.verbosity, file);
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    init_logging(&cli)?;
    match cli.cmd {
        Cmd::Check { all, feature } => check::run(all, feature.as_deref()),
        Cmd::Dump {
            pid,
            dir,
            shell_job,
            leave_running,
            file_locks,
            ghost_limit,
            link_remap,
            force_irmap,
            irmap_scan_path,
        } => {
            dump::dump(&dump::DumpOpts {
                pid,
                dir,
                shell_job,
                leave_running,
                file_locks,
                ghost_limit,
                link_remap,
                force_irmap,
                irmap_scan_paths: irmap_scan_path,
            })?;
            Ok(0)
        }
        Cmd::Restore {
            dir,
            restore_detached,
            shell_job,
            pidfile,
            file_locks: _,
            pid_ns,
            inherit_fd,
            link_remap,
            force_irmap,
            irmap_scan_path,
        } => {
            if force_irmap || !irmap_scan_path.is_empty() {
                tracing::warn!(
                    "--force-irmap and --irmap-scan-path find watched files at the dump; the restore opens them by the paths in the images"
                );
            }
            restore::restore(&restore::RestoreOpts {
                dir,
                detach: restore_detached,
                shell_job,
                pidfile,
                pid_ns,
                inherit_fds: inherit_fd,
                link_remap,
            })
        }
        Cmd::Show { path, json } => {
            show::show(&path, json)?;
            Ok(0)
        }
    }
}

fn main() {
    // Before any thread starts: every wait for a child or tracee is taken
    // through a signalfd with a deadline.
    sys::block_sigchld();
    let cli = Cli::parse();
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
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        for bad in ["", "M", "12X", "-1", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn inherit_fd_spelling() {
        assert_eq!(
            parse_inherit_fd("fd[3]:pipe:[12345]").unwrap(),
            (3, "pipe:[12345]".to_string())
        );
        for bad in ["3:pipe:[1]", "fd[x]:pipe:[1]", "fd[3]:", "fd[3]pipe"] {
            assert!(parse_inherit_fd(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dump_options() {
        let cli = Cli::try_parse_from([
            "crust",
            "dump",
            "-t",
            "42",
            "-D",
            "/tmp/x",
            "--shell-job",
            "-R",
            "-l",
            "-v4",
        ])
        .unwrap();
        assert_eq!(cli.verbosity, 4);
        match cli.cmd {
            Cmd::Dump {
                pid,
                dir,
                shell_job,
                leave_running,
                file_locks,
                ..
            } => {
                assert_eq!(pid, 42);
                assert_eq!(dir, PathBuf::from("/tmp/x"));
                assert!(shell_job && leave_running && file_locks);
            }
            _ => panic!("not a dump"),
        }
        assert!(Cli::try_parse_from(["crust", "dump", "-D", "x"]).is_err());
        assert!(Cli::try_parse_from(["crust", "dump", "-t", "x"]).is_err());
    }
}

//! The command line, in CRIU's spellings, so that scripts written for
//! `criu` carry over: the same subcommands and options, `-v` repeated or
//! with a level, `--no-OPTION` for boolean options, and configuration files
//! of one option a line (`--config FILE`, and the default ones).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "crust",
    version,
    about = "Checkpoint/restore for Linux processes",
    after_help = "Options may also come from configuration files (one option a line, without \
                  the leading --): /etc/crust/default.conf, ~/.crust/default.conf, \
                  $CRUST_CONFIG_FILE, and --config FILE; --no-default-config skips the first \
                  three. Boolean options can be negated as --no-OPTION.\n\nExit status: 0 done, \
                  1 internal failure, 2 refused (an unsupported resource, bad input, a PID \
                  taken), 3 corrupt or incompatible images; restore without -d exits with the \
                  restored root's status."
)]
pub struct Cli {
    /// Write the log to this file; a relative path goes into the work
    /// directory (-W, or the images directory).
    #[arg(short = 'o', long = "log-file", global = true, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Set the log level: 0 nothing, 1 errors, 2 warnings (the default),
    /// 3 information, 4 debug, 5 everything. -v alone (or -vvv) raises it
    /// by one per v.
    #[arg(long = "verbosity", global = true, value_name = "LEVEL")]
    pub verbosity: Option<u8>,
    #[arg(short = 'v', action = clap::ArgAction::Count, global = true, hide = true)]
    pub verbose: u8,
    /// Put logs, the pidfile and statistics here instead of the images
    /// directory.
    #[arg(short = 'W', long = "work-dir", global = true, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// One log file per process: the log file's name gets ".PID".
    #[arg(long, global = true)]
    pub log_pid: bool,
    /// Print a table of the stages' times and counts at the end.
    #[arg(long, global = true)]
    pub display_stats: bool,
    /// Run this script at each stage of a dump or restore (pre-dump,
    /// post-dump, pre-restore, post-restore, pre-resume, post-resume,
    /// network-lock, network-unlock), with CRTOOLS_SCRIPT_ACTION,
    /// CRTOOLS_IMAGE_DIR and CRTOOLS_INIT_PID set; repeatable. A script that
    /// fails aborts its stage.
    #[arg(long = "action-script", global = true, value_name = "PATH")]
    pub action_scripts: Vec<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

impl Cli {
    /// The log level on CRIU's scale: `--verbosity` or 2, plus one per -v.
    pub fn log_level(&self) -> u8 {
        self.verbosity.unwrap_or(2).saturating_add(self.verbose)
    }
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Check that the kernel has what crust needs.
    Check {
        /// List every probe with its result and what it enables.
        #[arg(long)]
        all: bool,
        /// Check one feature by name.
        #[arg(long, value_name = "NAME")]
        feature: Option<String>,
    },
    /// Checkpoint a process tree into an images directory.
    Dump(DumpArgs),
    /// Save the tree's memory while it runs on (frozen only to find its
    /// pages and arm write tracking), as the base of a later dump with
    /// --prev-images-dir that stores only what was written since.
    PreDump(PreDumpArgs),
    /// Punch out of the older images of a chain the pages later images
    /// replaced, so that the chain takes about the disk of one full dump.
    Dedup {
        /// The newest dump of the chain.
        #[arg(
            short = 'D',
            long = "images-dir",
            default_value = ".",
            value_name = "DIR"
        )]
        dir: PathBuf,
    },
    /// Bring a checkpointed process tree back.
    Restore(RestoreArgs),
    /// Receive one dump's pages over TCP (sent with `dump --page-server`)
    /// into pages images in -D; exits when the dump is done.
    PageServer(crate::page_xfer::ServeArgs),
    /// Serve the memory of a tree restored with --lazy-pages through
    /// userfaultfd: the pages it touches first, the rest in the
    /// background; from the images, or from the dump (--page-server).
    LazyPages(LazyPagesArgs),
    /// Decode images for people (or scripts, with --json).
    Show {
        /// An images directory or one image file.
        path: PathBuf,
        /// One JSON object a line instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct DumpArgs {
    /// The root of the tree to dump: this process and all its descendants.
    #[arg(short = 't', long = "tree", value_name = "PID")]
    pub pid: i32,
    /// Where the images go: a new directory, an empty one, or one holding
    /// an older dump (which is replaced whole).
    #[arg(
        short = 'D',
        long = "images-dir",
        default_value = ".",
        value_name = "DIR"
    )]
    pub dir: PathBuf,
    /// The tree was started from a shell and shares its terminal: the
    /// restore gives it crust's terminal.
    #[arg(short = 'j', long)]
    pub shell_job: bool,
    /// Let the tree run on after the dump instead of killing it.
    #[arg(short = 'R', long, conflicts_with = "leave_stopped")]
    pub leave_running: bool,
    /// Leave the tree stopped (SIGSTOP) after the dump instead of killing it.
    #[arg(short = 's', long)]
    pub leave_stopped: bool,
    /// Take file locks (flock, POSIX, OFD) and leases along; without it a
    /// tree holding one is refused.
    #[arg(short = 'l', long)]
    pub file_locks: bool,
    /// Most data carried in the images per file deleted while open (holes
    /// do not count): bytes, or with a K, M or G suffix.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64M")]
    pub ghost_limit: u64,
    /// A file deleted while open but still linked under another name is
    /// linked back beside its old name until the restore (which opens that
    /// same file and removes the link); without it such a tree is refused.
    #[arg(long)]
    pub link_remap: bool,
    /// An inotify or fanotify watch whose file handle does not open is found
    /// by scanning the --irmap-scan-path directories for its inode.
    #[arg(long)]
    pub force_irmap: bool,
    /// A directory to scan for watched inodes (with --force-irmap);
    /// repeatable.
    #[arg(long, value_name = "DIR")]
    pub irmap_scan_path: Vec<PathBuf>,
    /// A unix datagram socket connected to a named socket outside the tree
    /// is dumped, to be connected to that name again on restore, and
    /// connections from outside waiting in a listener's backlog are dropped;
    /// =INO,... also lets the listed sockets (socket:[INO]) have any peer
    /// outside, for which the restore takes a stand-in with --inherit-fd
    /// fd[N]:socket:[INO].
    #[arg(short = 'x', long, value_name = "INO,...", num_args = 0..=1, require_equals = true, default_missing_value = "", value_parser = parse_inodes)]
    pub ext_unix_sk: Option<Inodes>,
    /// Take established TCP connections along (TCP repair mode); without it
    /// a tree holding one is refused.
    #[arg(long)]
    pub tcp_established: bool,
    /// Dump TCP connections to be restored closed (nothing of them is kept,
    /// and they are not locked).
    #[arg(long)]
    pub tcp_close: bool,
    /// Leave out connections not yet accepted by a listener (their clients
    /// see them reset); without it such a listener is refused.
    #[arg(long)]
    pub skip_in_flight: bool,
    /// How the packets of the tree's connections are dropped from the
    /// freeze until the restore is done: nftables (the default where `nft`
    /// is installed), iptables, or skip (the network is locked by other
    /// means, such as network-lock action scripts).
    #[arg(long, value_enum, value_name = "METHOD")]
    pub network_lock: Option<crate::resources::netlock::Method>,
    /// Seconds to freeze the whole tree (it may fork or exit while crust
    /// walks it); past them the dump fails and the tree runs on.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub timeout: u64,
    #[command(flatten)]
    pub pages: crate::page_xfer::SendArgs,
    /// The previous (pre-)dump of this tree, relative to -D as with criu
    /// (usually ../pre1): -D gets a `parent` link to it. Refused when it
    /// holds another tree or its chain is broken.
    #[arg(long, value_name = "DIR")]
    pub prev_images_dir: Option<PathBuf>,
    /// With --prev-images-dir, store only the pages written since that
    /// dump (its write tracking); with --leave-running, also track writes
    /// for the next dump.
    #[arg(long)]
    pub track_mem: bool,
    /// Punch out of the chain's older images the pages this dump replaced.
    #[arg(long)]
    pub auto_dedup: bool,
    /// Lazy migration: write every image but the private memory, and serve
    /// that memory from the frozen tree on --port to `crust lazy-pages
    /// --page-server` until it has all, then end the tree (if the daemon
    /// goes away first, the tree runs on here).
    #[arg(long, conflicts_with_all = ["leave_running", "leave_stopped", "page_server", "prev_images_dir"])]
    pub lazy_pages: bool,
}

#[derive(Args, Debug)]
pub struct PreDumpArgs {
    /// The root of the tree: this process and all its descendants.
    #[arg(short = 't', long = "tree", value_name = "PID")]
    pub pid: i32,
    /// Where the memory images go (new, empty, or an older dump's).
    #[arg(
        short = 'D',
        long = "images-dir",
        default_value = ".",
        value_name = "DIR"
    )]
    pub dir: PathBuf,
    /// The previous pre-dump, relative to -D (usually ../pre1): only the
    /// pages written since are saved.
    #[arg(long, value_name = "DIR")]
    pub prev_images_dir: Option<PathBuf>,
    /// Track writes for the next dump. A pre-dump always does (as criu's
    /// does); the option is its explicit spelling, taken for scripts.
    #[arg(long)]
    pub track_mem: bool,
    /// Punch out of the chain's older images the pages this one replaced.
    #[arg(long)]
    pub auto_dedup: bool,
    /// Seconds to freeze the whole tree.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub timeout: u64,
    /// --page-server --address A --port P [--tls ...]: the pages go to a
    /// page server, as the dump's do.
    #[command(flatten)]
    pub pages: crate::page_xfer::SendArgs,
}

#[derive(Args, Debug)]
pub struct LazyPagesArgs {
    /// The images directory of the dump being restored.
    #[arg(
        short = 'D',
        long = "images-dir",
        default_value = ".",
        value_name = "DIR"
    )]
    pub dir: PathBuf,
    /// Fetch the pages from the dump (dump --lazy-pages) at --address and
    /// --port instead of the pages images.
    #[arg(long, requires_all = ["address", "port"])]
    pub page_server: bool,
    #[arg(long, value_name = "ADDR")]
    pub address: Option<String>,
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// --tls --tls-cacert --tls-cert --tls-key [--tls-no-cn-verify]: pull
    /// the pages over TLS from a dump --lazy-pages given --tls, as
    /// `dump --page-server` sends them to a page server.
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

/// ADDR and PORT as a socket address (a name is resolved).
pub fn socket_addr(addr: &str, port: u16) -> Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    (addr, port)
        .to_socket_addrs()
        .with_context(|| format!("address {addr}"))?
        .next()
        .with_context(|| format!("address {addr} resolves to nothing"))
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The images directory a dump wrote.
    #[arg(
        short = 'D',
        long = "images-dir",
        default_value = ".",
        value_name = "DIR"
    )]
    pub dir: PathBuf,
    /// Return once the tree runs instead of waiting for its root to exit.
    #[arg(short = 'd', long)]
    pub restore_detached: bool,
    /// The root comes back as a sibling of crust (a child of crust's
    /// parent) instead of its child; with --restore-detached only.
    #[arg(short = 'S', long, requires = "restore_detached")]
    pub restore_sibling: bool,
    /// The images were dumped with --shell-job: the tree gets crust's
    /// terminal.
    #[arg(short = 'j', long)]
    pub shell_job: bool,
    /// Leave the restored tree stopped (SIGSTOP) instead of letting it run.
    #[arg(short = 's', long)]
    pub leave_stopped: bool,
    /// Write the restored root's PID to this file (relative: in the work
    /// directory).
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    /// Take the file locks and leases in the images again; without it, images
    /// holding one are refused.
    #[arg(short = 'l', long)]
    pub file_locks: bool,
    /// Restore into a new PID namespace, where the tree's PIDs are always
    /// free (crust's init is its PID 1): a snapshot can then be restored
    /// while the original runs, or several times at once.
    #[arg(short = 'n', long, visible_alias = "namespaces")]
    pub pid_ns: bool,
    /// fd[N]:KEY: crust's fd N stands in for KEY, a resource the tree shared
    /// with the outside: pipe:[INO] (a pipe whose other end was outside;
    /// without this it comes back as a fresh pipe holding its bytes) or
    /// socket:[INO] (a socket dumped with --ext-unix-sk=INO); repeatable.
    #[arg(long = "inherit-fd", value_name = "fd[N]:KEY", value_parser = parse_inherit_fd)]
    pub inherit_fd: Vec<(i32, String)>,
    /// Allow the files the dump linked back with --link-remap: they are
    /// opened, and their links removed once the restore is done.
    #[arg(long)]
    pub link_remap: bool,
    /// A dump option, taken here for scripts that give dump and restore one
    /// set of options: the restore says it has no effect.
    #[arg(long, hide = true)]
    pub force_irmap: bool,
    #[arg(long, value_name = "DIR", hide = true)]
    pub irmap_scan_path: Vec<PathBuf>,
    /// Connect the unix sockets that were connected outside the tree
    /// (dumped with --ext-unix-sk) to their peers' names again.
    #[arg(short = 'x', long)]
    pub ext_unix_sk: bool,
    /// Restore the TCP connections the images hold (dumped with
    /// --tcp-established); without it such images are refused.
    #[arg(long)]
    pub tcp_established: bool,
    /// Restore the TCP connections of the images closed.
    #[arg(long)]
    pub tcp_close: bool,
    /// A dump option, taken here for scripts that give dump and restore one
    /// set of options: the restore says it has no effect.
    #[arg(long, hide = true)]
    pub skip_in_flight: bool,
    /// How the connections are locked until the restored tree runs:
    /// nftables (the default where `nft` is installed), iptables, or skip.
    #[arg(long, value_enum, value_name = "METHOD")]
    pub network_lock: Option<crate::resources::netlock::Method>,
    /// The root of the restored mount namespace, as with criu: it applies
    /// only to images holding a mount namespace, which crust does not dump
    /// yet, so the restore refuses it rather than ignore it.
    #[arg(short = 'r', long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Let the tree run before its private memory is in: `crust
    /// lazy-pages`, started first with the same work directory, fills it
    /// through userfaultfd as the tree touches it and in the background.
    #[arg(long)]
    pub lazy_pages: bool,
}

/// A size in bytes, with an optional K, M or G suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
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

/// Inode numbers given on the command line.
#[derive(Clone, Debug, PartialEq)]
pub struct Inodes(pub Vec<u64>);

/// A comma-separated list of inode numbers (`--ext-unix-sk=INO,...`);
/// empty for the bare option.
pub fn parse_inodes(s: &str) -> Result<Inodes, String> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.trim()
                .parse::<u64>()
                .ok()
                .filter(|&n| n != 0)
                .ok_or_else(|| format!("{x:?}: expected a socket inode number, e.g. 12345"))
        })
        .collect::<Result<_, _>>()
        .map(Inodes)
}

/// Parses CRIU's `fd[N]:KEY` spelling of --inherit-fd.
pub fn parse_inherit_fd(s: &str) -> Result<(i32, String), String> {
    let bad = || format!("{s:?}: expected fd[N]:KEY, e.g. fd[3]:pipe:[12345]");
    let rest = s.strip_prefix("fd[").ok_or_else(bad)?;
    let (n, key) = rest.split_once("]:").ok_or_else(bad)?;
    let n: i32 = n.parse().map_err(|_| bad())?;
    if key.is_empty() {
        return Err(bad());
    }
    Ok((n, key.to_string()))
}

const SUBCOMMANDS: &[&str] = &[
    "check",
    "dump",
    "pre-dump",
    "dedup",
    "restore",
    "page-server",
    "lazy-pages",
    "show",
    "help",
];

/// The long boolean options, which `--no-NAME` negates.
fn boolean_options() -> Vec<String> {
    use clap::CommandFactory;
    let mut out = Vec::new();
    let cmd = Cli::command();
    let mut collect = |c: &clap::Command| {
        for a in c.get_arguments() {
            if !a.get_action().takes_values()
                && let Some(l) = a.get_long()
            {
                out.push(l.to_string());
            }
        }
    };
    collect(&cmd);
    for sub in cmd.get_subcommands() {
        collect(sub);
    }
    out
}

/// Splits one configuration file line into its option (without "--") and
/// argument: `name`, or `name value`, or `name "a \"quoted\" value"`; a
/// `#` outside quotes starts a comment. None for a blank line.
fn config_line(line: &str) -> Result<Option<(String, Option<String>)>> {
    let mut tokens: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut in_token = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => {
                quoted = !quoted;
                in_token = true;
            }
            '#' if !quoted => break,
            c if c.is_whitespace() && !quoted => {
                if in_token {
                    tokens.push(std::mem::take(&mut cur));
                    in_token = false;
                }
            }
            c => {
                cur.push(c);
                in_token = true;
            }
        }
    }
    if quoted {
        bail!("an unterminated quote in {line:?}");
    }
    if in_token {
        tokens.push(cur);
    }
    match tokens.len() {
        0 => Ok(None),
        1 => Ok(Some((tokens.remove(0), None))),
        2 => {
            let v = tokens.pop();
            Ok(Some((tokens.remove(0), v)))
        }
        _ => bail!(
            "{line:?}: one option a line, with at most one argument (quote it if it has spaces)"
        ),
    }
}

/// The options of one configuration file, as command-line arguments.
fn read_config(path: &Path) -> Result<Vec<OsString>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("configuration file {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let parsed =
            config_line(line).with_context(|| format!("{} line {}", path.display(), n + 1))?;
        if let Some((name, value)) = parsed {
            // `page-server` and `lazy-pages` are commands and the dump's
            // options (criu's spelling for both): in a file, the option.
            if name.starts_with('-')
                || (SUBCOMMANDS.contains(&name.as_str())
                    && !matches!(name.as_str(), "page-server" | "lazy-pages"))
            {
                bail!(
                    "{} line {}: {name:?}: options go without their leading --, and commands are not allowed",
                    path.display(),
                    n + 1
                );
            }
            // `--name=value`: one word, so that options whose value is
            // optional (verbosity, ext-unix-sk) take it too.
            out.push(OsString::from(match value {
                Some(v) => format!("--{name}={v}"),
                None => format!("--{name}"),
            }));
        }
    }
    Ok(out)
}

/// The command line as clap takes it: configuration files first (default
/// ones, unless --no-default-config, then --config FILE), then the command
/// line itself; `-vN` as `--verbosity N`, `--verbosity` alone as `-v`, and
/// `--no-NAME` cancelling every `--NAME` before it.
pub fn expand_args(argv: Vec<OsString>, env_config: Option<OsString>) -> Result<Vec<OsString>> {
    let mut args: Vec<OsString> = Vec::new();
    let mut configs: Vec<PathBuf> = Vec::new();
    let mut defaults = true;
    let mut it = argv.into_iter();
    let prog = it.next().unwrap_or_else(|| "crust".into());
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().into_owned();
        if s == "--no-default-config" {
            defaults = false;
        } else if s == "--config" {
            let f = it.next().context("--config needs a file")?;
            configs.push(f.into());
        } else if let Some(f) = s.strip_prefix("--config=") {
            configs.push(f.into());
        } else {
            args.push(a);
        }
    }
    let mut files: Vec<PathBuf> = Vec::new();
    if defaults {
        let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".crust/default.conf"));
        for p in [Some(PathBuf::from("/etc/crust/default.conf")), home]
            .into_iter()
            .flatten()
        {
            if p.exists() {
                files.push(p);
            }
        }
        files.extend(env_config.map(PathBuf::from));
    }
    files.extend(configs);
    let mut from_files = Vec::new();
    for f in &files {
        from_files.extend(read_config(f)?);
    }
    // Configuration options go right after the subcommand, where its own
    // options are known.
    let at = args
        .iter()
        .position(|a| SUBCOMMANDS.contains(&a.to_string_lossy().as_ref()))
        .map_or(args.len(), |i| i + 1);
    let mut merged: Vec<OsString> = args[..at].to_vec();
    merged.extend(from_files);
    merged.extend(args[at..].iter().cloned());

    let booleans = boolean_options();
    let mut out: Vec<OsString> = vec![prog];
    for a in merged {
        let s = a.to_string_lossy().into_owned();
        if let Some(level) = s
            .strip_prefix("-v")
            .filter(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_digit()))
        {
            out.push("--verbosity".into());
            out.push(level.into());
        } else if s == "--verbosity" {
            out.push("-v".into());
        } else if let Some(name) = s
            .strip_prefix("--no-")
            .filter(|n| booleans.iter().any(|b| b == n))
        {
            let long = format!("--{name}");
            out.retain(|o| o.to_string_lossy() != long);
        } else {
            out.push(a);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let argv = std::iter::once("crust")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        let argv = expand_args(argv, None).unwrap();
        Cli::try_parse_from(argv).unwrap()
    }

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
    fn ext_unix_sk_spelling() {
        let ext = |args: &[&str]| {
            let argv = std::iter::once("crust")
                .chain(args.iter().copied())
                .map(OsString::from)
                .collect();
            match Cli::try_parse_from(expand_args(argv, None).unwrap()).map(|c| c.cmd) {
                Ok(Cmd::Dump(d)) => Ok(d.ext_unix_sk.map(|i| i.0)),
                Ok(_) => panic!("not a dump"),
                Err(e) => Err(e),
            }
        };
        assert_eq!(ext(&["dump", "-t", "1"]).unwrap(), None);
        assert_eq!(
            ext(&["dump", "-t", "1", "--ext-unix-sk"]).unwrap(),
            Some(vec![])
        );
        assert_eq!(
            ext(&["dump", "--ext-unix-sk=12,34", "-t", "1"]).unwrap(),
            Some(vec![12, 34])
        );
        assert!(ext(&["dump", "-t", "1", "--ext-unix-sk=x"]).is_err());
        assert!(ext(&["dump", "-t", "1", "--ext-unix-sk=0"]).is_err());
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
    fn dump_options_in_criu_spellings() {
        let cli = parse(&[
            "dump", "-t", "42", "-D", "/tmp/x", "-j", "-R", "-l", "-vvvv", "-W", "/w",
        ]);
        assert_eq!(cli.log_level(), 6);
        assert_eq!(cli.work_dir, Some(PathBuf::from("/w")));
        let Cmd::Dump(d) = cli.cmd else {
            panic!("not a dump")
        };
        assert_eq!(d.pid, 42);
        assert_eq!(d.dir, PathBuf::from("/tmp/x"));
        assert!(d.shell_job && d.leave_running && d.file_locks);
        assert_eq!(d.timeout, 10);
        assert!(Cli::try_parse_from(["crust", "dump", "-D", "x"]).is_err());
        assert!(Cli::try_parse_from(["crust", "dump", "-t", "x"]).is_err());
        assert!(Cli::try_parse_from(["crust", "dump", "-t", "1", "-R", "-s"]).is_err());
    }

    #[test]
    fn page_server_in_criu_spellings() {
        let cli = parse(&[
            "page-server",
            "-D",
            "/srv",
            "--port",
            "27182",
            "--address",
            "10.0.0.2",
            "--tls",
            "--tls-cacert",
            "ca",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
        ]);
        let Cmd::PageServer(p) = cli.cmd else {
            panic!("not page-server")
        };
        assert_eq!((p.port, p.address.as_deref()), (27182, Some("10.0.0.2")));
        assert!(p.tls.tls && p.tls.tls_key.is_some());
        let cli = parse(&[
            "dump",
            "-t",
            "1",
            "--page-server",
            "--address",
            "h",
            "--port",
            "1",
            "--tls",
            "--tls-no-cn-verify",
        ]);
        let Cmd::Dump(d) = cli.cmd else { panic!() };
        assert!(d.pages.page_server && d.pages.tls.tls_no_cn_verify);
    }

    #[test]
    fn verbosity_forms() {
        assert_eq!(parse(&["check"]).log_level(), 2);
        assert_eq!(parse(&["-v4", "check"]).log_level(), 4);
        assert_eq!(parse(&["check", "-v0"]).log_level(), 0);
        assert_eq!(parse(&["check", "-v"]).log_level(), 3);
        assert_eq!(parse(&["check", "--verbosity=1"]).log_level(), 1);
        assert_eq!(parse(&["check", "--verbosity"]).log_level(), 3);
        assert_eq!(parse(&["check", "-vv"]).log_level(), 4);
    }

    #[test]
    fn restore_sibling_needs_detached() {
        assert!(Cli::try_parse_from(["crust", "restore", "-S"]).is_err());
        let cli = parse(&["restore", "-d", "-S", "--pidfile", "p"]);
        let Cmd::Restore(r) = cli.cmd else { panic!() };
        assert!(r.restore_sibling && r.restore_detached);
    }

    #[test]
    fn config_file_lines() {
        assert_eq!(config_line("  # only a comment").unwrap(), None);
        assert_eq!(
            config_line("tcp-established").unwrap(),
            Some(("tcp-established".into(), None))
        );
        assert_eq!(
            config_line(r#"work-dir "/home/u/my \"work\" dir"  # trailing"#).unwrap(),
            Some(("work-dir".into(), Some(r#"/home/u/my "work" dir"#.into())))
        );
        assert!(config_line(r#"work-dir "open"#).is_err());
        assert!(config_line("a b c").is_err());
    }

    #[test]
    fn config_file_then_command_line_and_no_options() {
        let dir = std::env::temp_dir().join(format!("crust-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("c.conf");
        std::fs::write(
            &conf,
            "display-stats\nghost-limit 8M\nshell-job\npage-server\naddress 10.0.0.2\nport 27\n# done\n",
        )
        .unwrap();
        let argv: Vec<OsString> = ["crust", "dump", "-t", "7", "--config"]
            .iter()
            .map(OsString::from)
            .chain([conf.clone().into_os_string(), "--no-shell-job".into()])
            .collect();
        let cli = Cli::try_parse_from(expand_args(argv, None).unwrap()).unwrap();
        assert!(cli.display_stats);
        let Cmd::Dump(d) = cli.cmd else { panic!() };
        assert_eq!(d.ghost_limit, 8 << 20);
        assert_eq!(
            d.pages.target().unwrap(),
            Some(("10.0.0.2".to_string(), 27)),
            "page-server in a file is the dump's option"
        );
        assert!(
            !d.shell_job,
            "--no-shell-job did not cancel the file's shell-job"
        );
        std::fs::write(&conf, "dump\n").unwrap();
        let argv: Vec<OsString> = vec![
            "crust".into(),
            "check".into(),
            "--config".into(),
            conf.into_os_string(),
        ];
        assert!(expand_args(argv, None).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

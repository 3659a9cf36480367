//! crust's log (`-o FILE`, or stderr) and `-v`. Every line goes through one
//! fd held in `LOG_FD`, so that a restored task, whose fd table is rebuilt
//! over crust's, can move the log out of the way first
//! (`relocate_above`): its own fds are never written to, and what it logs
//! before it becomes the task still reaches the log.

use std::io;
use std::os::fd::{IntoRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

static LOG_FD: AtomicI32 = AtomicI32::new(2);

/// Writes to whatever fd the log lives on now.
pub struct LogWriter;

impl io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let fd = LOG_FD.load(Ordering::Relaxed);
        if fd < 0 {
            return Ok(buf.len());
        }
        // SAFETY: write(2) from our buffer to the log fd.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The log file's name before ".PID" (`--log-pid`), when there is one.
static PER_PID_BASE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// `path` with ".PID" appended (`--log-pid`).
pub fn with_pid(path: &std::path::Path, pid: i32) -> std::path::PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{pid}"));
    s.into()
}

/// Sets up logging at `level` on CRIU's scale (0 nothing, 1 errors, 2
/// warnings, 3 information, 4 debug, 5 and up everything) into `file`, or
/// stderr when there is none. With `--log-pid` the file comes with its
/// base name, for the processes a restore forks.
pub fn init(level: u8, file: Option<(std::fs::File, Option<std::path::PathBuf>)>) {
    let filter = match level {
        0 => tracing::level_filters::LevelFilter::OFF,
        1 => tracing::level_filters::LevelFilter::ERROR,
        2 => tracing::level_filters::LevelFilter::WARN,
        3 => tracing::level_filters::LevelFilter::INFO,
        4 => tracing::level_filters::LevelFilter::DEBUG,
        _ => tracing::level_filters::LevelFilter::TRACE,
    };
    let ansi = file.is_none() && io::IsTerminal::is_terminal(&io::stderr());
    if let Some((f, base)) = file {
        LOG_FD.store(f.into_raw_fd(), Ordering::Relaxed);
        if let Some(b) = base {
            let _ = PER_PID_BASE.set(b);
        }
    }
    tracing_subscriber::fmt()
        .with_max_level(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(|| LogWriter)
        .init();
}

/// In a process a restore forked (which becomes task `pid`): with
/// `--log-pid`, its log goes to a file of its own.
pub fn own_file_for(pid: i32) {
    let Some(base) = PER_PID_BASE.get() else {
        return;
    };
    if let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(with_pid(base, pid))
    {
        let old = LOG_FD.swap(f.into_raw_fd(), Ordering::Relaxed);
        if old > 2 {
            // SAFETY: the log fd this process inherited, replaced.
            unsafe { libc::close(old) };
        }
    }
}

/// In a restored task, before its fd table is rebuilt: moves the log to an
/// fd at or above `min` (a log file's old fd is closed unless `close_old`
/// is false: in an fd table other processes share, they may still log
/// through it, and the rebuild closes it; stderr, fd 2, is left to the
/// table). Returns the new fd, which the restorer closes, or -1 when there
/// is no log.
pub fn relocate_above(min: RawFd, close_old: bool) -> RawFd {
    let old = LOG_FD.load(Ordering::Relaxed);
    if old < 0 {
        return -1;
    }
    // SAFETY: duplicating the log fd above the task's fds.
    let new = unsafe { libc::fcntl(old, libc::F_DUPFD_CLOEXEC, min) };
    LOG_FD.store(new, Ordering::Relaxed);
    if old > 2 && close_old {
        // SAFETY: the old log fd, replaced by `new`.
        unsafe { libc::close(old) };
    }
    new
}

/// In a process forked from crust that may outlive it (the dump's
/// guardian): the log stays when it is a regular file; anything else
/// (stderr: a pipe someone reads to its end, a terminal) is given up, and
/// the process logs nothing. Returns the fd kept.
pub fn keep_only_a_file() -> Option<RawFd> {
    let fd = LOG_FD.load(Ordering::Relaxed);
    // SAFETY: fstat of an fd into our buffer; plain data, all-zero valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let file = fd >= 0
        && unsafe { libc::fstat(fd, &mut st) } == 0
        && st.st_mode & libc::S_IFMT == libc::S_IFREG;
    if file {
        return Some(fd);
    }
    LOG_FD.store(-1, Ordering::Relaxed);
    None
}

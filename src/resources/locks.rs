//! File locks held through an fd (flock, POSIX, OFD) and leases (fcntl
//! F_SETLEASE), read from its fdinfo `lock:` lines and taken again by the
//! restored task (`--file-locks`).

use std::os::fd::RawFd;

use anyhow::{Result, bail};

use crate::images::pb::{FdEntry, FileLock};

/// The locks held through an fd, from its fdinfo `lock:` lines
/// ("1: POSIX  ADVISORY  WRITE 1234 fe:00:5678 5 14",
/// "1: LEASE  BREAKING  UNLCK 1234 fe:00:5678 0 EOF"). `flags` are the fd's
/// open(2) flags.
pub fn dump_locks(
    pid: i32,
    fd: RawFd,
    link: &str,
    flags: u32,
    info: &[(String, String)],
    take: bool,
) -> Result<Vec<FileLock>> {
    let mut out = Vec::new();
    for (_, v) in info.iter().filter(|(k, _)| k == "lock") {
        let w: Vec<&str> = v.split_whitespace().collect();
        if w.len() < 8 {
            bail!("PID {pid} fd {fd}: cannot read the lock {v:?}");
        }
        let kind = w[1].to_string();
        // A POSIX lock of another process on the same file is not ours.
        if kind == "POSIX" && w[4].parse::<i32>().ok() != Some(pid) {
            continue;
        }
        if kind == "LEASE" {
            if !take {
                bail!(
                    "PID {pid} fd {fd} ({link}) holds a lease; dump with --file-locks to take it along"
                );
            }
            out.push(dump_lease(pid, fd, link, flags, &w)?);
            continue;
        }
        if !matches!(kind.as_str(), "FLOCK" | "POSIX" | "OFDLCK") || w[2] != "ADVISORY" {
            bail!(
                "PID {pid} fd {fd} ({link}) holds a {} {} lock, which crust cannot restore",
                w[2],
                kind
            );
        }
        if !take {
            bail!(
                "PID {pid} fd {fd} ({link}) holds a {kind} lock; dump with --file-locks to take it along"
            );
        }
        out.push(FileLock {
            kind,
            write: w[3] == "WRITE",
            start: w[6].parse().unwrap_or(0),
            end: if w[7] == "EOF" {
                -1
            } else {
                w[7].parse().unwrap_or(-1)
            },
            breaking_to: String::new(),
        });
    }
    Ok(out)
}

/// A lease from its fdinfo words. fdinfo shows a lease being broken with
/// the type it is being broken to, not the one it was taken with: only a
/// write lease is broken to READ (by a reader), and one broken to UNLCK (by
/// a writer) was a write lease on a writable fd (a read lease needs a file
/// nobody has open for writing) and, on a read-only fd, is taken to be the
/// read lease such an fd usually holds.
fn dump_lease(pid: i32, fd: RawFd, link: &str, flags: u32, w: &[&str]) -> Result<FileLock> {
    let writable = flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32;
    let (write, breaking_to) = match (w[2], w[3]) {
        ("ACTIVE", "READ") => (false, ""),
        ("ACTIVE", "WRITE") => (true, ""),
        ("BREAKING", "READ") => (true, "READ"),
        ("BREAKING", "UNLCK") => (writable, "UNLCK"),
        _ => bail!(
            "PID {pid} fd {fd} ({link}) holds a lease in a state crust does not know ({}); release it before the dump",
            w[1..4].join(" ")
        ),
    };
    Ok(FileLock {
        kind: "LEASE".into(),
        write,
        start: 0,
        end: -1,
        breaking_to: breaking_to.into(),
    })
}

/// Whether a lock belongs to the process rather than to the open file
/// description: POSIX record locks do; flock, OFD locks and leases belong to
/// the description and are taken once for it, by one process of the tree,
/// however many share it.
pub fn per_process(l: &FileLock) -> bool {
    l.kind == "POSIX"
}

/// Takes the locks of an fd again, in the restored process. Runs before the
/// fd's owner is given back (a lease's break signal must reach this process,
/// see `rebreak_lease`), with every signal blocked.
pub fn restore_locks(e: &FdEntry) -> Result<()> {
    for l in &e.locks {
        let r = match l.kind.as_str() {
            "FLOCK" => {
                let op = if l.write {
                    libc::LOCK_EX
                } else {
                    libc::LOCK_SH
                };
                // SAFETY: flock on an fd of ours.
                unsafe { libc::flock(e.fd, op | libc::LOCK_NB) }
            }
            "LEASE" => {
                let ty = if l.write {
                    libc::F_WRLCK
                } else {
                    libc::F_RDLCK
                };
                // SAFETY: fcntl F_SETLEASE on an fd of ours, with an int.
                let r = unsafe { libc::fcntl(e.fd, libc::F_SETLEASE, ty) };
                if r == 0 && !l.breaking_to.is_empty() {
                    rebreak_lease(e.fd, &l.breaking_to)?;
                }
                r
            }
            kind => {
                // SAFETY: flock is plain data; zero is a valid start.
                let mut fl: libc::flock = unsafe { std::mem::zeroed() };
                fl.l_type = if l.write {
                    libc::F_WRLCK
                } else {
                    libc::F_RDLCK
                } as i16;
                fl.l_whence = libc::SEEK_SET as i16;
                fl.l_start = l.start as i64;
                fl.l_len = if l.end < 0 {
                    0
                } else {
                    l.end - l.start as i64 + 1
                };
                let cmd = if kind == "OFDLCK" {
                    libc::F_OFD_SETLK
                } else {
                    libc::F_SETLK
                };
                // SAFETY: fcntl reads one struct flock.
                unsafe { libc::fcntl(e.fd, cmd, &fl) }
            }
        };
        if r < 0 {
            bail!(
                "taking the {} lock on fd {} again: {}; is the original still holding it?",
                l.kind,
                e.fd,
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Puts a lease just taken again back into its break: an open that
/// conflicts with it (for writing to break it to UNLCK, for reading to
/// READ), non-blocking, fails with EWOULDBLOCK and leaves the lease breaking
/// for a new lease-break-time, as the opener blocked at dump time left it;
/// that opener, restarted, then waits on this break. The kernel tells the
/// holder of the break with a signal the task already had for the first one
/// (and handled, or still pending: then it is in the images and queued again
/// by the restorer): take it away, so the task does not see it twice.
fn rebreak_lease(fd: RawFd, to: &str) -> Result<()> {
    const F_GETSIG: libc::c_int = 11;
    let access = match to {
        "UNLCK" => libc::O_WRONLY,
        "READ" => libc::O_RDONLY,
        _ => bail!("fd {fd}: a lease being broken to {to:?}; the images are corrupt"),
    };
    let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}"))?;
    // SAFETY: open(2) of a NUL-terminated path.
    let f = unsafe { libc::open(path.as_ptr(), access | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if f >= 0 {
        // SAFETY: closing the fd just opened.
        unsafe { libc::close(f) };
        bail!("fd {fd}: its lease did not stop an open for breaking it again to {to}");
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
        bail!("fd {fd}: opening its file to break its lease again to {to}: {err}");
    }
    // The lease's holder gets F_GETSIG's signal, or SIGIO when none is set;
    // F_SETLEASE made this process the holder (the description had no owner
    // yet: it is given back after the locks). Blocked here, so it waits
    // pending.
    // SAFETY: F_GETSIG takes no argument.
    let sig = match unsafe { libc::fcntl(fd, F_GETSIG) } {
        s if s > 0 => s,
        _ => libc::SIGIO,
    };
    // SAFETY: sigset_t is plain data, filled by sigemptyset/sigaddset; a
    // zero timeout makes sigtimedwait take the signal only if pending.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        libc::sigtimedwait(&set, std::ptr::null_mut(), &zero);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(line: &str, flags: i32, take: bool) -> Result<FileLock> {
        let info = vec![("lock".to_string(), line.to_string())];
        let mut v = dump_locks(7, 3, "/f", flags as u32, &info, take)?;
        assert_eq!(v.len(), 1);
        Ok(v.remove(0))
    }

    #[test]
    fn leases_from_fdinfo() {
        let l = lease("1: LEASE  ACTIVE    READ 7 fe:00:9 0 EOF", 0, true).unwrap();
        assert_eq!((l.kind.as_str(), l.write, l.end), ("LEASE", false, -1));
        assert_eq!(l.breaking_to, "");
        let l = lease("1: LEASE  ACTIVE    WRITE 7 fe:00:9 0 EOF", 0, true).unwrap();
        assert!(l.write);
        // Broken to READ: only a write lease is, whatever the fd's access.
        let l = lease("1: LEASE  BREAKING  READ 7 fe:00:9 0 EOF", 0, true).unwrap();
        assert!(l.write && l.breaking_to == "READ");
        // Broken to UNLCK: a write lease on a writable fd, else a read one.
        let l = lease(
            "1: LEASE  BREAKING  UNLCK 7 fe:00:9 0 EOF",
            libc::O_RDWR,
            true,
        )
        .unwrap();
        assert!(l.write && l.breaking_to == "UNLCK");
        let l = lease("1: LEASE  BREAKING  UNLCK 7 fe:00:9 0 EOF", 0, true).unwrap();
        assert!(!l.write && l.breaking_to == "UNLCK");
        let e = lease("1: LEASE  ACTIVE    READ 7 fe:00:9 0 EOF", 0, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("holds a lease") && e.contains("--file-locks"),
            "{e}"
        );
        let e = lease("1: DELEG  ACTIVE    READ 7 fe:00:9 0 EOF", 0, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot restore"), "{e}");
    }
}

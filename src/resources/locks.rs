//! File locks held through an fd (flock, POSIX, OFD), read from its fdinfo
//! `lock:` lines and taken again by the restored task (`--file-locks`).

use std::os::fd::RawFd;

use anyhow::{Result, bail};

use crate::images::pb::{FdEntry, FileLock};

/// The locks held through an fd, from its fdinfo `lock:` lines
/// ("1: POSIX  ADVISORY  WRITE 1234 fe:00:5678 5 14").
pub fn dump_locks(
    pid: i32,
    fd: RawFd,
    link: &str,
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
        });
    }
    Ok(out)
}

/// Takes the locks of an fd again, in the restored process.
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

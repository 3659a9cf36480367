//! Timers. Interval timers (ITIMER_REAL, _VIRTUAL, _PROF) and POSIX timers
//! (timer_create) are read by the parasite and set by the restorer as its
//! last steps, so that little time is lost; timerfds are files.

use crate::abi::{self, ITimerSpec, ITimerVal, MAX_POSIX_TIMERS, MiscState, RestorerArgs};
use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{Context, Result, bail};

use super::files::{FdProbe, FileKind, RestoreCtx, info_get, new_fd};
use crate::images::pb::fd_entry::File as FdFile;
use crate::images::pb::{ITimer, PosixTimer, TaskCore, TimerFd};
use crate::parasite_ctl::Parasite;

pub fn dump_itimers(misc: &MiscState, core: &mut TaskCore) {
    for (which, t) in misc.itimers.iter().enumerate() {
        core.itimers.push(ITimer {
            which: which as u32,
            interval_usec: t.interval_sec * 1_000_000 + t.interval_usec,
            value_usec: t.value_sec * 1_000_000 + t.value_usec,
        });
    }
}

pub fn restore_itimers(core: &TaskCore, args: &mut RestorerArgs) {
    for t in &core.itimers {
        if let Some(slot) = args.itimers.get_mut(t.which as usize) {
            *slot = itimer_to_set(t);
        }
    }
}

/// The setting that brings a dumped interval timer back. A periodic timer
/// that had just fired reads 0 time left: the kernel re-arms ITIMER_REAL
/// only when its SIGALRM is dequeued, so setting 0 would disarm it for
/// good. It gets one full interval instead (its pending SIGALRM, if any,
/// comes back with the other pending signals).
fn itimer_to_set(t: &ITimer) -> ITimerVal {
    let value = if t.value_usec == 0 && t.interval_usec > 0 {
        t.interval_usec
    } else {
        t.value_usec
    };
    ITimerVal {
        interval_sec: t.interval_usec / 1_000_000,
        interval_usec: t.interval_usec % 1_000_000,
        value_sec: value / 1_000_000,
        value_usec: value % 1_000_000,
    }
}

/// The POSIX timers of process `pid` as /proc/PID/timers lists them: ids,
/// clocks and how they notify (their settings need the parasite). Refused
/// before anything is touched when there are more than crust carries.
pub fn list_posix_timers(pid: i32) -> Result<Vec<abi::PosixTimer>> {
    let path = format!("/proc/{pid}/timers");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let mut timers: Vec<abi::PosixTimer> = Vec::new();
    let bad = |l: &str| anyhow::anyhow!("{path}: cannot parse {l:?}");
    for line in text.lines() {
        let (key, val) = line.split_once(':').ok_or_else(|| bad(line))?;
        let val = val.trim();
        if key == "ID" {
            timers.push(abi::PosixTimer {
                id: val.parse().map_err(|_| bad(line))?,
                ..Default::default()
            });
            continue;
        }
        let t = timers.last_mut().ok_or_else(|| bad(line))?;
        match key {
            // "signal: 14/0000000000001234": signal number and sigev_value.
            "signal" => {
                let (sig, value) = val.split_once('/').ok_or_else(|| bad(line))?;
                t.signo = sig.parse().map_err(|_| bad(line))?;
                t.sigev_value = u64::from_str_radix(value, 16).map_err(|_| bad(line))?;
            }
            // "notify: signal/tid.1234": the mode, and whom it targets.
            "notify" => {
                let (mode, target) = val.split_once('/').ok_or_else(|| bad(line))?;
                t.notify = match mode {
                    "signal" => libc::SIGEV_SIGNAL,
                    "none" => libc::SIGEV_NONE,
                    "thread" => libc::SIGEV_THREAD,
                    _ => return Err(bad(line)),
                };
                if let Some(tid) = target.strip_prefix("tid.") {
                    t.notify |= libc::SIGEV_THREAD_ID;
                    t.notify_tid = tid.parse().map_err(|_| bad(line))?;
                }
            }
            "ClockID" => t.clock = val.parse().map_err(|_| bad(line))?,
            _ => {}
        }
    }
    if timers.len() > MAX_POSIX_TIMERS {
        bail!(
            "PID {pid} has {} POSIX timers; crust carries at most {MAX_POSIX_TIMERS}",
            timers.len()
        );
    }
    timers.sort_by_key(|t| t.id);
    Ok(timers)
}

/// Reads each timer's settings and overrun through the parasite.
pub fn dump_posix_timers(
    parasite: &mut Parasite,
    timers: &[abi::PosixTimer],
    core: &mut TaskCore,
) -> Result<()> {
    if timers.is_empty() {
        return Ok(());
    }
    let ctl = parasite.ctl();
    ctl.nr_timers = timers.len() as u64;
    ctl.timers[..timers.len()].copy_from_slice(timers);
    let r = parasite.run(abi::PARASITE_CMD_GET_TIMERS)?;
    if r < 0 {
        bail!(
            "PID {}: reading its POSIX timers: {}",
            core.pid,
            std::io::Error::from_raw_os_error(-r as i32)
        );
    }
    let ns = |sec: i64, nsec: i64| sec * 1_000_000_000 + nsec;
    for t in &parasite.ctl().timers[..timers.len()] {
        core.posix_timers.push(PosixTimer {
            id: t.id,
            clock: t.clock,
            notify: t.notify,
            signo: t.signo,
            notify_tid: t.notify_tid,
            overrun: t.overrun,
            sigev_value: t.sigev_value,
            interval_ns: ns(t.spec.interval_sec, t.spec.interval_nsec),
            value_ns: ns(t.spec.value_sec, t.spec.value_nsec),
        });
    }
    Ok(())
}

/// Whether this kernel lets timer_create take a chosen id.
pub fn timer_ids_restorable() -> bool {
    const QUERY: u64 = 2;
    // SAFETY: a query prctl with integer arguments.
    unsafe { libc::prctl(abi::PR_TIMER_CREATE_RESTORE_IDS as i32, QUERY, 0, 0, 0) >= 0 }
}

/// Refuses, before anything is created, POSIX timers this kernel cannot
/// recreate with their ids (PR_TIMER_CREATE_RESTORE_IDS came in 6.15).
pub fn check_posix_timers(core: &TaskCore) -> Result<()> {
    if core.posix_timers.is_empty() {
        return Ok(());
    }
    if core.posix_timers.len() > MAX_POSIX_TIMERS {
        bail!(
            "core-{}.img holds {} POSIX timers, more than {MAX_POSIX_TIMERS}; the images are corrupt",
            core.pid,
            core.posix_timers.len()
        );
    }
    if !timer_ids_restorable() {
        bail!(
            "PID {} has POSIX timers, and this kernel cannot recreate timers with their ids (PR_TIMER_CREATE_RESTORE_IDS, Linux 6.15); restore on a newer kernel",
            core.pid
        );
    }
    Ok(())
}

pub fn restore_posix_timers(core: &TaskCore, args: &mut RestorerArgs) {
    let spec = |ns: i64| (ns / 1_000_000_000, ns % 1_000_000_000);
    for (slot, t) in args.posix_timers.iter_mut().zip(&core.posix_timers) {
        let (interval_sec, interval_nsec) = spec(t.interval_ns);
        let (value_sec, value_nsec) = spec(t.value_ns);
        *slot = abi::PosixTimer {
            id: t.id,
            clock: t.clock,
            notify: t.notify,
            signo: t.signo,
            notify_tid: t.notify_tid,
            overrun: t.overrun,
            sigev_value: t.sigev_value,
            spec: ITimerSpec {
                interval_sec,
                interval_nsec,
                value_sec,
                value_nsec,
            },
        };
    }
    args.nr_posix_timers = core.posix_timers.len().min(MAX_POSIX_TIMERS) as u64;
}

/// timerfd: clock, time left, period and unread expirations, from fdinfo.
pub struct TimerFdKind;

fn parse_pair(v: &str) -> Option<(u64, u64)> {
    let v = v.trim().trim_start_matches('(').trim_end_matches(')');
    let (a, b) = v.split_once(',')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

impl FileKind for TimerFdKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if p.link != "anon_inode:[timerfd]" {
            return Ok(None);
        }
        let get = |k| info_get(p.info, k);
        let (Some(clockid), Some(ticks), Some(value), Some(interval)) = (
            get("clockid").and_then(|v| v.parse().ok()),
            get("ticks").and_then(|v| v.parse().ok()),
            get("it_value").and_then(parse_pair),
            get("it_interval").and_then(parse_pair),
        ) else {
            return Err(p.unreadable("timer settings"));
        };
        Ok(Some(FdFile::Timerfd(TimerFd {
            clockid,
            flags: p.flags & libc::O_NONBLOCK as u32,
            ticks,
            value_ns: value.0 * 1_000_000_000 + value.1,
            interval_ns: interval.0 * 1_000_000_000 + interval.1,
        })))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Timerfd(x) = f else { return None };
        Some(format!(
            "timerfd clock {} next in {} ns every {} ns, {} unread",
            x.clockid, x.value_ns, x.interval_ns, x.ticks
        ))
    }

    fn restore(&self, f: &FdFile, _: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Timerfd(t) = f else {
            return Ok(None);
        };
        let flags = libc::TFD_CLOEXEC | (t.flags as i32 & libc::O_NONBLOCK);
        // SAFETY: timerfd_create returns a new fd or -1.
        let fd = unsafe { libc::timerfd_create(t.clockid, flags) };
        let fd = new_fd(fd as i64, &format!("a timerfd on clock {}", t.clockid))?;
        let ts = |ns: u64| libc::timespec {
            tv_sec: (ns / 1_000_000_000) as i64,
            tv_nsec: (ns % 1_000_000_000) as i64,
        };
        // A periodic timer whose expiry is already due shows no time left:
        // arming it with zero would disarm it, so it gets one period.
        let value = if t.value_ns == 0 {
            t.interval_ns
        } else {
            t.value_ns
        };
        let spec = libc::itimerspec {
            it_interval: ts(t.interval_ns),
            it_value: ts(value),
        };
        // SAFETY: timerfd_settime reads one itimerspec (relative time).
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
            bail!("arming a timerfd: {}", std::io::Error::last_os_error());
        }
        if t.ticks != 0 {
            const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;
            // SAFETY: the ioctl reads one u64.
            if unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, &t.ticks) } < 0 {
                bail!(
                    "setting a timerfd's expirations: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        Ok(Some(fd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fired_periodic_itimer_is_rearmed() {
        let t = ITimer {
            which: 0,
            interval_usec: 2_000,
            value_usec: 0,
        };
        let v = itimer_to_set(&t);
        assert_eq!((v.value_sec, v.value_usec), (0, 2_000));
        assert_eq!((v.interval_sec, v.interval_usec), (0, 2_000));
        let t = ITimer {
            which: 0,
            interval_usec: 1_500_000,
            value_usec: 700_000,
        };
        let v = itimer_to_set(&t);
        assert_eq!((v.value_sec, v.value_usec), (0, 700_000));
        assert_eq!((v.interval_sec, v.interval_usec), (1, 500_000));
        // A one-shot timer that is off stays off.
        let off = itimer_to_set(&ITimer::default());
        assert_eq!((off.value_sec, off.value_usec), (0, 0));
    }
}

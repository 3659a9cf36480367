//! Interval timers (ITIMER_REAL, _VIRTUAL, _PROF): read by the parasite, set
//! by the restorer as its last step so that little time is lost.

use crate::abi::{ITimerVal, MiscState, RestorerArgs};
use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{Result, bail};

use super::files::{FdProbe, FileKind, RestoreCtx, info_get, new_fd};
use crate::images::pb::fd_entry::File as FdFile;
use crate::images::pb::{ITimer, TaskCore, TimerFd};

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
            *slot = ITimerVal {
                interval_sec: t.interval_usec / 1_000_000,
                interval_usec: t.interval_usec % 1_000_000,
                value_sec: t.value_usec / 1_000_000,
                value_usec: t.value_usec % 1_000_000,
            };
        }
    }
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

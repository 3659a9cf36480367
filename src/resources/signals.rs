//! Signals: handlers (read by the parasite, set by the restorer), the
//! blocked mask (ptrace at dump, the sigframe at restore) and sigaltstack.

use crate::abi::{KSigAction, MiscState, NSIG, RestorerArgs};
use std::os::fd::OwnedFd;

use anyhow::Result;

use super::files::{FdProbe, FileKind, RestoreCtx, new_fd};
use crate::images::pb::fd_entry::File as FdFile;
use crate::images::pb::{SigAction, SigAltStack, SignalFd, TaskCore, ThreadCore};

pub fn dump_signals(misc: &MiscState, core: &mut TaskCore) {
    for sig in 1..=NSIG {
        if misc.sigactions_ok & (1 << (sig - 1)) == 0 {
            continue;
        }
        let a = misc.sigactions[sig - 1];
        core.sigactions.push(SigAction {
            signo: sig as u32,
            handler: a.handler,
            flags: a.flags,
            restorer: a.restorer,
            mask: a.mask,
        });
    }
}

/// The per-thread part: the alternate signal stack (the mask comes from ptrace).
pub fn dump_thread_signals(misc: &MiscState, t: &mut ThreadCore) {
    let s = misc.sigaltstack;
    t.sigaltstack = Some(SigAltStack {
        sp: s.sp,
        flags: s.flags,
        size: s.size,
    });
}

pub fn restore_signals(core: &TaskCore, args: &mut RestorerArgs) {
    args.sigactions_ok = 0;
    for a in &core.sigactions {
        let i = a.signo as usize - 1;
        if i >= NSIG || a.signo == 9 || a.signo == 19 {
            continue;
        }
        args.sigactions[i] = KSigAction {
            handler: a.handler,
            flags: a.flags,
            restorer: a.restorer,
            mask: a.mask,
        };
        args.sigactions_ok |= 1 << i;
    }
}

/// signalfd: the signals it reads, from fdinfo.
pub struct SignalFdKind;

impl FileKind for SignalFdKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        if p.link != "anon_inode:[signalfd]" {
            return Ok(None);
        }
        let mask = p.info_hex("sigmask")?;
        Ok(Some(FdFile::Signalfd(SignalFd {
            mask,
            flags: p.flags & libc::O_NONBLOCK as u32,
        })))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Signalfd(x) = f else { return None };
        Some(format!("signalfd mask {:#x} flags {:#o}", x.mask, x.flags))
    }

    fn restore(&self, f: &FdFile, _: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Signalfd(s) = f else {
            return Ok(None);
        };
        let flags = libc::SFD_CLOEXEC | (s.flags as i32 & libc::O_NONBLOCK);
        // SAFETY: signalfd4 reads an 8-byte kernel sigset.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_signalfd4,
                -1,
                &s.mask as *const u64,
                8usize,
                flags,
            )
        };
        Ok(Some(new_fd(fd, "a signalfd")?))
    }
}

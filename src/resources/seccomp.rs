//! Seccomp: a thread's mode and filter chain.
//!
//! Dump: the mode comes from /proc/PID/task/TID/status, each filter's BPF
//! program from PTRACE_SECCOMP_GET_FILTER (index 0 is the newest) and its
//! flags from PTRACE_GET_SECCOMP_METADATA. Tasks under seccomp are seized
//! with PTRACE_O_SUSPEND_SECCOMP (`seize::seize_task`), so that the parasite
//! and crust's remote syscalls are not filtered.
//!
//! Restore: every thread installs its own chain, oldest first, in the
//! restorer (`restore_seccomp` in parasite/restorer.rs) from the records laid
//! out here, before it drops crust's privileges. A chain threads shared
//! (TSYNC, or inherited) comes back as one copy per thread, which filters
//! the same. crust traces the tree with PTRACE_O_SUSPEND_SECCOMP until it
//! lets it go, so the rest of the restore is not filtered.

use anyhow::{Result, bail};
use nix::unistd::Pid;

use crate::abi::{SeccompFilterHdr, ThreadArgs};
use crate::images::pb::{Seccomp, SeccompFilter, TaskCore, ThreadCore};

/// PTRACE_O_SUSPEND_SECCOMP, which nix does not name.
pub const SUSPEND_SECCOMP: nix::sys::ptrace::Options =
    nix::sys::ptrace::Options::from_bits_retain(1 << 21);

const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const PTRACE_GET_SECCOMP_METADATA: libc::c_uint = 0x420d;
/// The flags the metadata can report and seccomp(2) takes back.
const KEPT_FLAGS: u64 = libc::SECCOMP_FILTER_FLAG_LOG;
/// Size of one classic BPF instruction (struct sock_filter).
const INSN: usize = 8;

/// Reads the seccomp state of traced, stopped thread `tid` (mode from its
/// status). None when it has none.
pub fn dump_thread_seccomp(tid: Pid, mode: u32) -> Result<Option<Seccomp>> {
    match mode {
        0 => return Ok(None),
        1 => {
            return Ok(Some(Seccomp {
                mode,
                filters: Vec::new(),
            }));
        }
        2 => {}
        _ => bail!("thread {tid}: unknown seccomp mode {mode}"),
    }
    let mut filters = Vec::new();
    for index in 0.. {
        // SAFETY: with a null buffer the kernel only returns the length.
        let n = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid.as_raw(),
                index as *mut libc::c_void,
                std::ptr::null_mut::<libc::c_void>(),
            )
        };
        if n < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::ENOENT) => break,
                _ => bail!(
                    "thread {tid}: reading seccomp filter {index}: {}; crust needs CAP_SYS_ADMIN",
                    std::io::Error::last_os_error()
                ),
            }
        }
        let mut insns = vec![0u8; n as usize * INSN];
        // SAFETY: the buffer holds the n instructions the kernel reported.
        let r = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid.as_raw(),
                index as *mut libc::c_void,
                insns.as_mut_ptr() as *mut libc::c_void,
            )
        };
        if r != n {
            bail!(
                "thread {tid}: reading seccomp filter {index}: {}",
                std::io::Error::last_os_error()
            );
        }
        let mut md: [u64; 2] = [index, 0];
        // SAFETY: the kernel reads filter_off and writes flags, 16 bytes.
        let r = unsafe {
            libc::ptrace(
                PTRACE_GET_SECCOMP_METADATA,
                tid.as_raw(),
                std::mem::size_of_val(&md) as *mut libc::c_void,
                md.as_mut_ptr() as *mut libc::c_void,
            )
        };
        let flags = if r < 0 { 0 } else { md[1] & KEPT_FLAGS };
        filters.push(SeccompFilter {
            insns,
            flags: flags as u32,
        });
    }
    filters.reverse();
    Ok(Some(Seccomp { mode, filters }))
}

/// Whether the restored tree must be traced with PTRACE_O_SUSPEND_SECCOMP.
pub fn any_seccomp<'a>(mut cores: impl Iterator<Item = &'a TaskCore>) -> bool {
    cores.any(|c| c.threads.iter().any(|t| t.seccomp.is_some()))
}

/// Bytes the thread's filter records take in the restorer's args.
pub fn records_len(t: &ThreadCore) -> usize {
    t.seccomp.as_ref().map_or(0, |s| {
        s.filters
            .iter()
            .map(|f| std::mem::size_of::<SeccompFilterHdr>() + f.insns.len())
            .sum()
    })
}

/// Writes the thread's filter records at `off` in the args area (`out`
/// is the whole area) and points `a` at them; returns the bytes written.
pub fn restore_thread_seccomp(
    t: &ThreadCore,
    a: &mut ThreadArgs,
    out: &mut [u8],
    off: usize,
) -> Result<usize> {
    let Some(s) = &t.seccomp else {
        return Ok(0);
    };
    a.seccomp_mode = s.mode;
    a.nr_seccomp_filters = s.filters.len() as u32;
    a.seccomp_off = off as u64;
    let mut at = off;
    for f in &s.filters {
        if f.insns.is_empty() || f.insns.len() % INSN != 0 || f.insns.len() / INSN > 4096 {
            bail!(
                "thread {}: a seccomp filter of {} bytes in the core image; the images are corrupt",
                t.tid,
                f.insns.len()
            );
        }
        let hdr = SeccompFilterHdr {
            flags: f.flags,
            len: (f.insns.len() / INSN) as u32,
        };
        out[at..at + 4].copy_from_slice(&hdr.flags.to_ne_bytes());
        out[at + 4..at + 8].copy_from_slice(&hdr.len.to_ne_bytes());
        at += std::mem::size_of::<SeccompFilterHdr>();
        out[at..at + f.insns.len()].copy_from_slice(&f.insns);
        at += f.insns.len();
    }
    Ok(at - off)
}

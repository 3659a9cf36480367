//! Seccomp: a thread's mode and filter chain.
//!
//! Dump: the mode comes from /proc/PID/task/TID/status, each filter's BPF
//! program from PTRACE_SECCOMP_GET_FILTER (index 0 is the oldest: the kernel
//! counts back from the newest to the N-th from the start) and its
//! flags from PTRACE_GET_SECCOMP_METADATA. Tasks under seccomp are seized
//! with PTRACE_O_SUSPEND_SECCOMP (`seize::seize_task`), so that the parasite
//! and crust's remote syscalls are not filtered.
//!
//! Restore: filters threads share must be one object again, or a filter
//! added later with SECCOMP_FILTER_FLAG_TSYNC is refused (the kernel wants
//! every other thread's chain to end in the caller's). The kernel tells no
//! filter's identity, only its program and flags: the longest prefix of
//! chains that is the same in every thread of a process
//! (`shared_prefix`) is taken for filters they share, as threads inherit
//! them from the thread that creates them. The restorer's leader installs
//! that prefix before it creates the other threads, which inherit it; each
//! thread then installs the rest of its own chain, oldest first
//! (`restore_seccomp` in parasite/restorer.rs) from the records laid out
//! here, before it drops crust's privileges. Threads that installed equal
//! filters each on its own come back sharing them, which only a later TSYNC
//! can tell (it then succeeds). crust traces the tree with
//! PTRACE_O_SUSPEND_SECCOMP until it lets it go (threads created in the
//! restorer inherit it), so the rest of the restore is not filtered.

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
    Ok(Some(Seccomp { mode, filters }))
}

/// Whether the restored tree must be traced with PTRACE_O_SUSPEND_SECCOMP.
pub fn any_seccomp<'a>(mut cores: impl Iterator<Item = &'a TaskCore>) -> bool {
    cores.any(|c| c.threads.iter().any(|t| t.seccomp.is_some()))
}

/// How many filters, from the oldest, every thread of the process has
/// alike (same program, same flags): the filters they share.
pub fn shared_prefix(core: &TaskCore) -> u32 {
    let chains: Vec<&[SeccompFilter]> = core
        .threads
        .iter()
        .map(|t| match &t.seccomp {
            Some(s) if s.mode == 2 => s.filters.as_slice(),
            _ => &[],
        })
        .collect();
    let Some((first, rest)) = chains.split_first() else {
        return 0;
    };
    first
        .iter()
        .enumerate()
        .take_while(|&(i, f)| rest.iter().all(|c| c.get(i) == Some(f)))
        .count() as u32
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

#[cfg(test)]
mod tests {
    use super::*;

    fn thread(filters: &[(&[u8], u32)]) -> ThreadCore {
        ThreadCore {
            seccomp: Some(Seccomp {
                mode: 2,
                filters: filters
                    .iter()
                    .map(|&(insns, flags)| SeccompFilter {
                        insns: insns.to_vec(),
                        flags,
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn shared_prefix_is_what_every_thread_starts_with() {
        let (a, b, c): (&[u8], &[u8], &[u8]) = (&[1; 8], &[2; 8], &[3; 8]);
        let core = |threads| TaskCore {
            threads,
            ..Default::default()
        };
        // The leader added one after the thread was made; the thread too.
        let t = core(vec![
            thread(&[(a, 0), (b, 0), (c, 0)]),
            thread(&[(a, 0), (b, 0)]),
        ]);
        assert_eq!(shared_prefix(&t), 2);
        let t = core(vec![thread(&[(a, 0), (b, 0)]), thread(&[(a, 0), (c, 0)])]);
        assert_eq!(shared_prefix(&t), 1);
        // Other flags: another filter.
        let t = core(vec![thread(&[(a, 0)]), thread(&[(a, 2)])]);
        assert_eq!(shared_prefix(&t), 0);
        // A thread without filters, or in strict mode, shares none.
        let mut strict = thread(&[]);
        strict.seccomp.as_mut().unwrap().mode = 1;
        let t = core(vec![thread(&[(a, 0)]), strict]);
        assert_eq!(shared_prefix(&t), 0);
        let t = core(vec![thread(&[(a, 0)]), ThreadCore::default()]);
        assert_eq!(shared_prefix(&t), 0);
        // A process of one thread: its whole chain.
        let t = core(vec![thread(&[(a, 0), (b, 0)])]);
        assert_eq!(shared_prefix(&t), 2);
    }
}

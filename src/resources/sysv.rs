//! SysV shared memory segments the tree has attached.
//!
//! Dump: an attached segment shows as a "/SYSV<key>" mapping whose inode
//! number is the segment id; crust reads its key, mode, size and owner from
//! /proc/sysvipc/shm and its contents through /proc/PID/map_files, once per
//! segment (`MmEntry.sysv_shms`). Only whole-segment attaches are taken.
//!
//! Restore: before the tree forks, crust makes sure each segment exists
//! with its id (`prepare_shms`): one still there with the same key and
//! size is used as it is; a missing one is created again with its id
//! (/proc/sys/kernel/shm_next_id), refilled and given its owner and mode.
//! crust stays attached until the tree runs, so that a segment removed
//! while attached (SHM_DEST, removed again here) lives until the tasks have
//! attached it. The restorer attaches each at its address (`attach_shm`).

use std::collections::HashMap;
use std::os::fd::AsRawFd;

use anyhow::{Context, Result, bail};

use crate::images::pb::{MmEntry, SysvShm, VmaEntry};

const SHM_DEST: u32 = 0o1000;
const PAGE: u64 = 4096;

/// Reads the segment attached as VMA `v` of task `pid`, with its contents.
pub fn read_shm(pid: i32, v: &VmaEntry, offset: u64) -> Result<SysvShm> {
    let table = std::fs::read_to_string("/proc/sysvipc/shm")?;
    // key shmid perms size cpid lpid nattch uid gid cuid cgid ...
    let f: Vec<&str> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(1).and_then(|x| x.parse::<i32>().ok()) == Some(v.shmid))
        .with_context(|| format!("SysV segment {} is not in /proc/sysvipc/shm", v.shmid))?;
    let num = |i: usize| -> Result<i64> {
        f.get(i)
            .and_then(|x| x.parse().ok())
            .with_context(|| format!("/proc/sysvipc/shm: cannot parse segment {}", v.shmid))
    };
    let size = num(3)? as u64;
    if offset != 0 || v.end - v.start != size.div_ceil(PAGE) * PAGE {
        bail!(
            "PID {pid} maps part of SysV shared memory segment {} ({:#x}-{:#x}); crust restores whole attaches only",
            v.shmid,
            v.start,
            v.end
        );
    }
    let mf = format!("/proc/{pid}/map_files/{:x}-{:x}", v.start, v.end);
    let file = std::fs::File::open(&mf).with_context(|| format!("opening {mf}"))?;
    // SAFETY: a fresh read-only shared mapping of the segment, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        bail!(
            "mapping SysV segment {}: {}",
            v.shmid,
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: p maps `size` readable bytes.
    let data = unsafe { std::slice::from_raw_parts(p as *const u8, size as usize) }.to_vec();
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(p, size as usize) };
    Ok(SysvShm {
        id: v.shmid,
        key: num(0)? as i32,
        mode: u32::from_str_radix(f[2], 8).unwrap_or(0o600),
        size,
        uid: num(7)? as u32,
        gid: num(8)? as u32,
        data,
    })
}

/// crust's attaches of the tree's segments, detached on drop (once the
/// tree has attached them itself).
pub struct ShmHolds(Vec<*mut libc::c_void>);

impl Drop for ShmHolds {
    fn drop(&mut self) {
        for &p in &self.0 {
            // SAFETY: detaching an attach of ours that nothing else uses.
            unsafe { libc::shmdt(p) };
        }
    }
}

/// Makes sure every segment the tree attaches exists with its id, key,
/// size, contents (when made anew), owner and mode; see the module doc.
pub fn prepare_shms<'a>(mms: impl Iterator<Item = &'a MmEntry>) -> Result<ShmHolds> {
    let mut segs: HashMap<i32, &SysvShm> = HashMap::new();
    for s in mms.flat_map(|m| &m.sysv_shms) {
        segs.entry(s.id).or_insert(s);
    }
    let mut holds = ShmHolds(Vec::new());
    for s in segs.values() {
        // SAFETY: shmid_ds is plain data; IPC_STAT fills it.
        let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: IPC_STAT writes one shmid_ds.
        let exists = unsafe { libc::shmctl(s.id, libc::IPC_STAT, &mut ds) } == 0;
        if exists {
            if ds.shm_perm.__key != s.key || ds.shm_segsz as u64 != s.size {
                bail!(
                    "SysV shared memory id {} is taken by another segment (key {:#x}, {} bytes); remove it (ipcrm -m {}) and restore again",
                    s.id,
                    ds.shm_perm.__key,
                    ds.shm_segsz,
                    s.id
                );
            }
        } else {
            create_shm(s)?;
        }
        // SAFETY: attaching the segment anywhere in crust's address space.
        let p = unsafe { libc::shmat(s.id, std::ptr::null(), 0) };
        if p as isize == -1 {
            bail!(
                "attaching SysV segment {}: {}",
                s.id,
                std::io::Error::last_os_error()
            );
        }
        holds.0.push(p);
        if !exists {
            // SAFETY: p maps the segment, `size` bytes, writable.
            let dst = unsafe { std::slice::from_raw_parts_mut(p as *mut u8, s.size as usize) };
            let n = s.data.len().min(dst.len());
            dst[..n].copy_from_slice(&s.data[..n]);
            // Removed while attached: removed again, alive while attached.
            if s.mode & SHM_DEST != 0 {
                // SAFETY: IPC_RMID takes no buffer.
                unsafe { libc::shmctl(s.id, libc::IPC_RMID, std::ptr::null_mut()) };
            }
        }
    }
    Ok(holds)
}

/// Creates segment `s` again with its id.
fn create_shm(s: &SysvShm) -> Result<()> {
    std::fs::write("/proc/sys/kernel/shm_next_id", s.id.to_string())
        .context("choosing a SysV segment id (/proc/sys/kernel/shm_next_id)")?;
    let key = if s.mode & SHM_DEST != 0 {
        libc::IPC_PRIVATE
    } else {
        s.key
    };
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | (s.mode & 0o777) as i32;
    // SAFETY: shmget with plain arguments.
    let id = unsafe { libc::shmget(key, s.size as usize, flags) };
    if id < 0 {
        bail!(
            "creating SysV segment {} (key {:#x}): {}",
            s.id,
            s.key,
            std::io::Error::last_os_error()
        );
    }
    if id != s.id {
        // SAFETY: removing the segment just made under the wrong id.
        unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        bail!("SysV segment {} came back as {id}", s.id);
    }
    // SAFETY: shmid_ds is plain data; IPC_STAT fills it, IPC_SET reads it.
    unsafe {
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        libc::shmctl(id, libc::IPC_STAT, &mut ds);
        ds.shm_perm.uid = s.uid;
        ds.shm_perm.gid = s.gid;
        ds.shm_perm.mode = (s.mode & 0o777) as _;
        libc::shmctl(id, libc::IPC_SET, &mut ds);
    }
    Ok(())
}

//! SysV IPC the tree uses: shared memory segments it has attached, and
//! semaphore sets and message queues a task of the tree operated on last.
//!
//! Semaphores and queues: a set whose semaphores were last changed by a
//! task of the tree (GETPID), a queue last sent to or received from by one
//! (lspid/lrpid), is dumped with its values or its messages (read with
//! MSG_COPY, which leaves them queued). On restore one still there with the
//! same key is used as it is; a missing one is made again with its id
//! (sem_next_id, msg_next_id) and refilled. SEM_UNDO adjustments are not
//! carried.
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

use crate::images::pb::{MmEntry, SysvMsg, SysvMsgQueue, SysvSem, SysvShm, VmaEntry};

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

/// What a restore prepared of SysV IPC before the tree forks: crust's own
/// attaches of the tree's segments (detached on drop, once the tree has
/// attached them itself), and the objects it made again, which a restore
/// that fails removes again unless `keep` was called.
#[derive(Default)]
pub struct SysvPrepared {
    attached: Vec<*mut libc::c_void>,
    made: Vec<(IpcKind, i32)>,
    kept: bool,
}

#[derive(Clone, Copy)]
enum IpcKind {
    Shm,
    Sem,
    Msg,
}

impl SysvPrepared {
    /// The restore succeeded: what it made stays.
    pub fn keep(&mut self) {
        self.kept = true;
    }
}

impl Drop for SysvPrepared {
    fn drop(&mut self) {
        for &p in &self.attached {
            // SAFETY: detaching an attach of ours that nothing else uses.
            unsafe { libc::shmdt(p) };
        }
        if self.kept {
            return;
        }
        for &(kind, id) in &self.made {
            // SAFETY: IPC_RMID of an object this restore made, by id.
            unsafe {
                match kind {
                    IpcKind::Shm => libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()),
                    IpcKind::Sem => libc::semctl(id, 0, libc::IPC_RMID),
                    IpcKind::Msg => libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()),
                }
            };
        }
    }
}

/// Makes sure every SysV object of the images exists with its id (see the
/// module doc); what was made again is removed if the restore fails.
pub fn prepare<'a>(
    mms: impl Iterator<Item = &'a MmEntry>,
    sems: &[SysvSem],
    msgs: &[SysvMsgQueue],
) -> Result<SysvPrepared> {
    let mut p = SysvPrepared::default();
    prepare_sems_msgs(&mut p, sems, msgs)?;
    prepare_shms(&mut p, mms)?;
    Ok(p)
}

/// Makes sure every segment the tree attaches exists with its id, key,
/// size, contents (when made anew), owner and mode; see the module doc.
fn prepare_shms<'a>(p: &mut SysvPrepared, mms: impl Iterator<Item = &'a MmEntry>) -> Result<()> {
    let mut segs: HashMap<i32, &SysvShm> = HashMap::new();
    for s in mms.flat_map(|m| &m.sysv_shms) {
        segs.entry(s.id).or_insert(s);
    }
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
            p.made.push((IpcKind::Shm, s.id));
        }
        // SAFETY: attaching the segment anywhere in crust's address space.
        let at = unsafe { libc::shmat(s.id, std::ptr::null(), 0) };
        if at as isize == -1 {
            bail!(
                "attaching SysV segment {}: {}",
                s.id,
                std::io::Error::last_os_error()
            );
        }
        p.attached.push(at);
        if !exists {
            // SAFETY: `at` maps the segment, `size` bytes, writable.
            let dst = unsafe { std::slice::from_raw_parts_mut(at as *mut u8, s.size as usize) };
            let n = s.data.len().min(dst.len());
            dst[..n].copy_from_slice(&s.data[..n]);
            // Removed while attached: removed again, alive while attached.
            if s.mode & SHM_DEST != 0 {
                // SAFETY: IPC_RMID takes no buffer.
                unsafe { libc::shmctl(s.id, libc::IPC_RMID, std::ptr::null_mut()) };
            }
        }
    }
    Ok(())
}

/// Creates segment `s` again with its id.
fn create_shm(s: &SysvShm) -> Result<()> {
    let key = if s.mode & SHM_DEST != 0 {
        libc::IPC_PRIVATE
    } else {
        s.key
    };
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | (s.mode & 0o777) as i32;
    let id = make_with_id(
        "shm",
        s.id,
        // SAFETY: shmget with plain arguments.
        || unsafe { libc::shmget(key, s.size as usize, flags) },
        // SAFETY: IPC_RMID of the object just made, by id.
        |id| unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) },
    )?;
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

/// Rows of a /proc/sysvipc table, split on whitespace, header skipped.
fn sysvipc_rows(name: &str) -> Result<Vec<Vec<i64>>> {
    let text = std::fs::read_to_string(format!("/proc/sysvipc/{name}"))?;
    Ok(text
        .lines()
        .skip(1)
        .map(|l| {
            l.split_whitespace()
                .enumerate()
                // perms (column 2) is octal.
                .map(|(i, x)| {
                    if i == 2 {
                        i64::from_str_radix(x, 8).unwrap_or(0)
                    } else {
                        x.parse().unwrap_or(0)
                    }
                })
                .collect()
        })
        .collect())
}

/// Semaphore sets whose semaphores a task of `tree` changed last.
pub fn dump_sems(tree: &[i32]) -> Result<Vec<SysvSem>> {
    let mut out = Vec::new();
    // key semid perms nsems uid gid ...
    for r in sysvipc_rows("sem")? {
        let (id, nsems) = (r[1] as i32, r[3] as i32);
        // SAFETY: GETPID takes no buffer.
        let used = (0..nsems).any(|i| tree.contains(&unsafe { libc::semctl(id, i, libc::GETPID) }));
        if !used {
            continue;
        }
        let mut values = vec![0u16; nsems as usize];
        // SAFETY: GETALL writes nsems unsigned shorts.
        if unsafe { libc::semctl(id, 0, libc::GETALL, values.as_mut_ptr()) } < 0 {
            bail!(
                "reading SysV semaphore set {id}: {}",
                std::io::Error::last_os_error()
            );
        }
        out.push(SysvSem {
            id,
            key: r[0] as i32,
            mode: r[2] as u32,
            uid: r[4] as u32,
            gid: r[5] as u32,
            values: values.into_iter().map(u32::from).collect(),
        });
    }
    Ok(out)
}

/// Message queues a task of `tree` sent to or received from last, with
/// their messages, read without taking them (MSG_COPY).
pub fn dump_msgs(tree: &[i32]) -> Result<Vec<SysvMsgQueue>> {
    const MSG_COPY: i32 = 0o40000;
    let mut out = Vec::new();
    // key msqid perms cbytes qnum lspid lrpid uid gid ...
    for r in sysvipc_rows("msg")? {
        if !tree.contains(&(r[5] as i32)) && !tree.contains(&(r[6] as i32)) {
            continue;
        }
        let id = r[1] as i32;
        // SAFETY: msqid_ds is plain data; IPC_STAT fills it.
        let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: IPC_STAT writes one msqid_ds.
        if unsafe { libc::msgctl(id, libc::IPC_STAT, &mut ds) } < 0 {
            bail!(
                "reading SysV message queue {id}: {}",
                std::io::Error::last_os_error()
            );
        }
        let mut messages = Vec::new();
        let max = ds.msg_qbytes as usize;
        let mut buf = vec![0u8; 8 + max];
        for n in 0..r[4] {
            // SAFETY: msgrcv writes a long and at most `max` bytes into buf.
            let got = unsafe {
                libc::msgrcv(
                    id,
                    buf.as_mut_ptr().cast(),
                    max,
                    n,
                    MSG_COPY | libc::IPC_NOWAIT | libc::MSG_NOERROR,
                )
            };
            if got < 0 {
                bail!(
                    "copying message {n} of SysV queue {id}: {}; crust needs MSG_COPY (CONFIG_CHECKPOINT_RESTORE)",
                    std::io::Error::last_os_error()
                );
            }
            messages.push(SysvMsg {
                mtype: i64::from_ne_bytes(buf[..8].try_into().unwrap()),
                text: buf[8..8 + got as usize].to_vec(),
            });
        }
        out.push(SysvMsgQueue {
            id,
            key: r[0] as i32,
            mode: r[2] as u32,
            uid: r[7] as u32,
            gid: r[8] as u32,
            qbytes: ds.msg_qbytes as u64,
            messages,
        });
    }
    Ok(out)
}

/// Makes a SysV object of `kind` (shm, sem, msg) that must get id `want`:
/// the id is chosen through /proc/sys/kernel/KIND_next_id, `make` creates
/// it, and one that came back with another id is removed with `remove`.
fn make_with_id(
    kind: &str,
    want: i32,
    make: impl FnOnce() -> i32,
    remove: impl FnOnce(i32) -> i32,
) -> Result<i32> {
    std::fs::write(format!("/proc/sys/kernel/{kind}_next_id"), want.to_string())
        .with_context(|| format!("choosing a SysV {kind} id (/proc/sys/kernel/{kind}_next_id)"))?;
    let id = make();
    if id < 0 {
        bail!(
            "making SysV {kind} {want} again: {}",
            std::io::Error::last_os_error()
        );
    }
    if id != want {
        remove(id);
        bail!("SysV {kind} {want} came back as {id}");
    }
    Ok(id)
}

/// Makes sure every semaphore set and message queue of the images exists
/// with its id; missing ones are made again and refilled.
fn prepare_sems_msgs(p: &mut SysvPrepared, sems: &[SysvSem], msgs: &[SysvMsgQueue]) -> Result<()> {
    for s in sems {
        // SAFETY: semid_ds is plain data; IPC_STAT fills it.
        let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: IPC_STAT writes one semid_ds.
        if unsafe { libc::semctl(s.id, 0, libc::IPC_STAT, &mut ds) } == 0 {
            if ds.sem_perm.__key != s.key || ds.sem_nsems as usize != s.values.len() {
                bail!(
                    "SysV semaphore id {} is taken by another set; remove it (ipcrm -s {}) and restore again",
                    s.id,
                    s.id
                );
            }
            continue;
        }
        let flags = libc::IPC_CREAT | libc::IPC_EXCL | (s.mode & 0o777) as i32;
        let id = make_with_id(
            "sem",
            s.id,
            // SAFETY: semget with plain arguments.
            || unsafe { libc::semget(s.key, s.values.len() as i32, flags) },
            // SAFETY: IPC_RMID of the object just made, by id.
            |id| unsafe { libc::semctl(id, 0, libc::IPC_RMID) },
        )?;
        p.made.push((IpcKind::Sem, id));
        let values: Vec<u16> = s.values.iter().map(|&v| v as u16).collect();
        // SAFETY: SETALL reads nsems unsigned shorts; IPC_STAT/IPC_SET one semid_ds.
        unsafe {
            libc::semctl(id, 0, libc::SETALL, values.as_ptr());
            libc::semctl(id, 0, libc::IPC_STAT, &mut ds);
            ds.sem_perm.uid = s.uid;
            ds.sem_perm.gid = s.gid;
            libc::semctl(id, 0, libc::IPC_SET, &mut ds);
        }
    }
    for q in msgs {
        // SAFETY: msqid_ds is plain data; IPC_STAT fills it.
        let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: IPC_STAT writes one msqid_ds.
        if unsafe { libc::msgctl(q.id, libc::IPC_STAT, &mut ds) } == 0 {
            if ds.msg_perm.__key != q.key {
                bail!(
                    "SysV message queue id {} is taken by another queue; remove it (ipcrm -q {}) and restore again",
                    q.id,
                    q.id
                );
            }
            continue;
        }
        let flags = libc::IPC_CREAT | libc::IPC_EXCL | (q.mode & 0o777) as i32;
        let id = make_with_id(
            "msg",
            q.id,
            // SAFETY: msgget with plain arguments.
            || unsafe { libc::msgget(q.key, flags) },
            // SAFETY: IPC_RMID of the object just made, by id.
            |id| unsafe { libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()) },
        )?;
        p.made.push((IpcKind::Msg, id));
        // SAFETY: IPC_STAT/IPC_SET on one msqid_ds.
        unsafe {
            libc::msgctl(id, libc::IPC_STAT, &mut ds);
            ds.msg_perm.uid = q.uid;
            ds.msg_perm.gid = q.gid;
            ds.msg_qbytes = q.qbytes as _;
            libc::msgctl(id, libc::IPC_SET, &mut ds);
        }
        for m in &q.messages {
            let mut buf = m.mtype.to_ne_bytes().to_vec();
            buf.extend_from_slice(&m.text);
            // SAFETY: msgsnd reads a long and `text.len()` bytes from buf.
            if unsafe { libc::msgsnd(id, buf.as_ptr().cast(), m.text.len(), libc::IPC_NOWAIT) } < 0
            {
                bail!(
                    "refilling SysV message queue {}: {}",
                    q.id,
                    std::io::Error::last_os_error()
                );
            }
        }
    }
    Ok(())
}

//! AIO contexts (io_setup(2)). A context is a ring the kernel maps into
//! the task (`/[aio]` in its maps), and its id, the one the task passes to
//! io_submit and io_getevents, is the ring's address. The ring holds a
//! header (size in events, head, tail) and the event slots; the kernel
//! keeps its own copy of the tail, which user space cannot write.
//!
//! Dump: the header and the slots, read from the stopped task. Restore,
//! in the restored task before its restorer (`memory::premap_vma`): a new
//! context of the same size, its ring moved into the premap hole (the
//! restorer moves it to the dumped address, and the kernel follows a
//! moved ring: the context's id becomes the new address); requests that
//! complete at once (1-byte writes to /dev/null) bring the kernel's tail
//! to the dumped one, with as many of them left unreaped as the dumped
//! ring held, so that the kernel's count of free slots is right; those
//! slots then get the dumped events.
//!
//! Requests still in flight at the dump (a read from a pipe nobody writes)
//! cannot be seen from outside the kernel and do not come back.

use std::os::unix::fs::FileExt;

use anyhow::{Context, Result, bail};

use crate::images::pb::{AioRing, VmaEntry};

/// The start of `/[aio] (deleted)`, as /proc/PID/maps shows a ring.
const RING_PATH: &str = "/[aio]";
/// `struct aio_ring`'s size: the header before the event slots.
const HEADER: u64 = 32;
/// `struct io_event`'s size.
const EVENT: u64 = 32;
/// `AIO_RING_MAGIC`.
const MAGIC: u32 = 0xa10a_10a1;

/// Whether a mapping shown as `path` is an AIO ring.
pub fn is_ring(path: &str) -> bool {
    path.starts_with(RING_PATH)
}

fn header_field(h: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes(h[i * 4..i * 4 + 4].try_into().expect("4 bytes"))
}

/// Reads the ring mapped at `[start, end)` in the stopped task `pid`.
pub fn dump_ring(pid: i32, start: u64, end: u64) -> Result<AioRing> {
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("opening the memory of task {pid}"))?;
    let what = || format!("the AIO ring of task {pid} at {start:#x}");
    let mut h = [0u8; HEADER as usize];
    mem.read_exact_at(&mut h, start).with_context(what)?;
    let (nr, head, tail) = (
        header_field(&h, 1),
        header_field(&h, 2),
        header_field(&h, 3),
    );
    let (magic, header_length) = (header_field(&h, 4), header_field(&h, 7));
    if magic != MAGIC
        || header_length as u64 != HEADER
        || nr == 0
        || head >= nr
        || tail >= nr
        || HEADER + nr as u64 * EVENT > end - start
    {
        bail!(
            "{} is not a ring crust knows (magic {magic:#x}, {nr} events, head {head}, tail {tail})",
            what()
        );
    }
    let mut events = vec![0u8; (nr as u64 * EVENT) as usize];
    mem.read_exact_at(&mut events, start + HEADER)
        .with_context(what)?;
    Ok(AioRing {
        nr,
        head,
        tail,
        events,
    })
}

/// A context of this process (`io_setup`'s id), destroyed on drop unless
/// kept.
struct AioContext(u64);

impl Drop for AioContext {
    fn drop(&mut self) {
        if self.0 != 0 {
            // SAFETY: destroys a context this process made and still owns.
            unsafe { libc::syscall(libc::SYS_io_destroy, self.0) };
        }
    }
}

/// Makes the context of ring `v` again in this process (the restored
/// task), its ring at `at` in the premap hole.
pub fn premap_ring(v: &VmaEntry, at: u64) -> Result<()> {
    let ring = v.aio.as_ref().with_context(|| {
        format!(
            "AIO ring at {:#x} has no state; the mm image is corrupt",
            v.start
        )
    })?;
    let len = v.end - v.start;
    if ring.nr == 0
        || ring.head >= ring.nr
        || ring.tail >= ring.nr
        || ring.events.len() as u64 != ring.nr as u64 * EVENT
    {
        bail!(
            "AIO ring at {:#x} has a bad state; the mm image is corrupt",
            v.start
        );
    }
    // The kernel doubles what io_setup asks for, adds two (6.x) and rounds
    // the ring up to whole pages, then fills the pages with slots: asking
    // for (nr - 2) / 2 gives the dumped size back (nr / 2 where the kernel
    // adds nothing), unless this machine has more CPUs than the ring
    // allows for.
    let mut ctx = AioContext(0);
    let mut got_nr = 0;
    for ask in [(ring.nr.max(4) - 2) / 2, ring.nr / 2] {
        let mut id: u64 = 0;
        // SAFETY: io_setup writes the new context's id into `id`.
        let r = unsafe { libc::syscall(libc::SYS_io_setup, ask, &mut id as *mut u64) };
        if r != 0 {
            bail!(
                "making the AIO context at {:#x} again: io_setup: {}",
                v.start,
                std::io::Error::last_os_error()
            );
        }
        ctx = AioContext(id);
        // SAFETY: the new ring's header, mapped by io_setup.
        got_nr = unsafe { std::ptr::read_volatile((id + 4) as *const u32) };
        if got_nr == ring.nr {
            break;
        }
    }
    if got_nr != ring.nr {
        bail!(
            "the AIO context at {:#x} had {} events; this kernel makes {got_nr} for the same request (more CPUs?); restore on a machine like the dumped one",
            v.start,
            ring.nr
        );
    }
    let id = ctx.0;
    // The whole ring (the kernel refuses to move part of it).
    super::memory::move_into_hole(id, len, at)
        .with_context(|| format!("moving the AIO ring of {:#x} into the premap hole", v.start))?;
    // The kernel follows the move: the context's id is its new address.
    ctx.0 = at;
    set_tail(at, ring).with_context(|| format!("restoring the AIO ring at {:#x}", v.start))?;
    // The completed, unreaped events: in their slots, in place of the
    // dummies' (every slot, the others held nothing anyone reads).
    // SAFETY: the ring's slots, mapped at `at` (nr events fit, checked above).
    unsafe {
        std::ptr::copy_nonoverlapping(
            ring.events.as_ptr(),
            (at + HEADER) as *mut u8,
            ring.events.len(),
        )
    };
    std::mem::forget(ctx);
    Ok(())
}

/// Brings the kernel's tail of the fresh context `id` to `ring.tail` with
/// requests that complete at once, and leaves the last (tail - head) of
/// them unreaped, so that the head too is the dumped one.
fn set_tail(id: u64, ring: &AioRing) -> Result<()> {
    let nr = ring.nr as u64;
    let unreaped = (ring.tail as u64 + nr - ring.head as u64) % nr;
    let total = if ring.tail as u64 >= unreaped {
        ring.tail as u64
    } else {
        ring.tail as u64 + nr
    };
    if total == 0 {
        return Ok(());
    }
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .context("opening /dev/null")?;
    let byte = 0u8;
    let mut cb = Iocb {
        aio_fildes: std::os::fd::AsRawFd::as_raw_fd(&null) as u32,
        aio_lio_opcode: IOCB_CMD_PWRITE,
        aio_buf: &byte as *const u8 as u64,
        aio_nbytes: 1,
        ..Default::default()
    };
    let mut cbp = &mut cb as *mut Iocb;
    for i in 0..total {
        // SAFETY: submits one iocb that names a byte of ours and /dev/null.
        let r = unsafe { libc::syscall(libc::SYS_io_submit, id, 1, &mut cbp as *mut _) };
        if r != 1 {
            bail!("io_submit: {}", std::io::Error::last_os_error());
        }
        if i < total - unreaped {
            let mut ev = [0u8; EVENT as usize];
            let ts = libc::timespec {
                tv_sec: 5,
                tv_nsec: 0,
            };
            // SAFETY: reads at most one event into `ev`, waiting 5 s at most.
            let r =
                unsafe { libc::syscall(libc::SYS_io_getevents, id, 1, 1, ev.as_mut_ptr(), &ts) };
            if r != 1 {
                bail!(
                    "a write to /dev/null did not complete within 5 s: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
    // SAFETY: the ring's header, mapped at `id`.
    let (head, tail) = unsafe {
        (
            std::ptr::read_volatile((id + 8) as *const u32),
            std::ptr::read_volatile((id + 12) as *const u32),
        )
    };
    if (head, tail) != (ring.head, ring.tail) {
        bail!(
            "head and tail came to {head} and {tail}, not {} and {}",
            ring.head,
            ring.tail
        );
    }
    Ok(())
}

/// `IOCB_CMD_PWRITE` of linux/aio_abi.h.
const IOCB_CMD_PWRITE: u16 = 1;

/// `struct iocb` of linux/aio_abi.h (x86-64, little-endian).
#[repr(C)]
#[derive(Default)]
struct Iocb {
    aio_data: u64,
    aio_key: u32,
    aio_rw_flags: i32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

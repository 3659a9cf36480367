//! membarrier(2) registrations. They belong to the address space, so a
//! process made by fork has none: the parasite asks for them
//! (MEMBARRIER_CMD_GET_REGISTRATIONS) and the restored process registers
//! each again before the restorer runs (its address space stays the same
//! object from there on).

use anyhow::{Result, bail};

use crate::abi::MiscState;
use crate::images::pb::TaskCore;

/// The REGISTER_* commands, in the order they are made again.
const REGISTER: [(u32, &str); 4] = [
    (1 << 2, "GLOBAL_EXPEDITED"),
    (1 << 4, "PRIVATE_EXPEDITED"),
    (1 << 6, "PRIVATE_EXPEDITED_SYNC_CORE"),
    (1 << 8, "PRIVATE_EXPEDITED_RSEQ"),
];

pub fn dump_membarrier(m: &MiscState, core: &mut TaskCore) {
    // A kernel without GET_REGISTRATIONS (before 6.3) answers EINVAL: then
    // nothing is known, and nothing is registered again.
    core.membarrier = m.membarrier.max(0) as u32;
}

/// Registers the calling (restored) process again.
pub fn restore_membarrier(core: &TaskCore) -> Result<()> {
    let unknown = core.membarrier & !REGISTER.iter().fold(0, |a, (b, _)| a | b);
    if unknown != 0 {
        bail!(
            "the core image holds membarrier registrations {unknown:#x} this crust does not know; the images are corrupt or newer"
        );
    }
    for (cmd, name) in REGISTER {
        if core.membarrier & cmd == 0 {
            continue;
        }
        // SAFETY: membarrier with a command and no pointers.
        if unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0, 0) } < 0 {
            bail!(
                "registering membarrier {name} again: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

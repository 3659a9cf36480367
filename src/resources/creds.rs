//! Credentials and resource limits. Creds come from /proc/PID/status and are
//! set by the restorer last (dropping privileges ends what it may do);
//! limits are read by the parasite (prlimit from outside needs
//! CAP_SYS_RESOURCE) and set in the restored task before the restorer.

use anyhow::{Result, bail};

use crate::abi::{MAX_GROUPS, MiscState, NR_RLIMITS, RestoreCreds};
use crate::images::pb::{Creds, RLimit, TaskCore};
use crate::proc::Status;

pub fn dump_creds(st: &Status) -> Creds {
    Creds {
        uid: st.uid.to_vec(),
        gid: st.gid.to_vec(),
        groups: st.groups.clone(),
        cap_inh: st.cap_inh,
        cap_prm: st.cap_prm,
        cap_eff: st.cap_eff,
        cap_bnd: st.cap_bnd,
        cap_amb: st.cap_amb,
    }
}

pub fn restore_creds(c: &Creds) -> Result<RestoreCreds> {
    if c.uid.len() != 4 || c.gid.len() != 4 || c.groups.len() > MAX_GROUPS {
        bail!("credentials in the core image are malformed; the images are corrupt");
    }
    let mut groups = [0u32; MAX_GROUPS];
    groups[..c.groups.len()].copy_from_slice(&c.groups);
    Ok(RestoreCreds {
        uid: [c.uid[0], c.uid[1], c.uid[2]],
        gid: [c.gid[0], c.gid[1], c.gid[2]],
        fsuid: c.uid[3],
        fsgid: c.gid[3],
        ngroups: c.groups.len() as u32,
        groups,
        cap_eff: c.cap_eff,
        cap_prm: c.cap_prm,
        cap_inh: c.cap_inh,
        cap_bnd: c.cap_bnd,
        cap_amb: c.cap_amb,
    })
}

pub fn dump_rlimits(misc: &MiscState, core: &mut TaskCore) {
    for (i, l) in misc.rlimits.iter().enumerate().take(NR_RLIMITS) {
        core.rlimits.push(RLimit {
            resource: i as u32,
            cur: l.cur,
            max: l.max,
        });
    }
}

/// Sets the limits on the calling (restored) process.
pub fn restore_rlimits(core: &TaskCore) -> Result<()> {
    for l in &core.rlimits {
        let lim = libc::rlimit {
            rlim_cur: l.cur,
            rlim_max: l.max,
        };
        // SAFETY: setrlimit reads one rlimit struct.
        if unsafe { libc::setrlimit(l.resource as _, &lim) } != 0 {
            bail!(
                "setting resource limit {} to {}/{}: {}; raising a hard limit needs CAP_SYS_RESOURCE",
                l.resource,
                l.cur,
                l.max,
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// The audit login uid of a process (unset reads 4294967295).
pub fn dump_loginuid(pid: i32) -> Result<u32> {
    let p = format!("/proc/{pid}/loginuid");
    match std::fs::read_to_string(&p) {
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{p}: cannot parse {s:?}")),
        // A kernel without audit has no such file: nothing to carry.
        Err(_) => Ok(u32::MAX),
    }
}

/// Sets the calling (restored) process's login uid. An unset one stays
/// unset; writing needs CAP_AUDIT_CONTROL, which crust has as root.
pub fn restore_loginuid(core: &TaskCore) -> Result<()> {
    let own = dump_loginuid(std::process::id() as i32)?;
    if core.loginuid == own {
        return Ok(());
    }
    std::fs::write("/proc/self/loginuid", core.loginuid.to_string()).map_err(|e| {
        anyhow::anyhow!(
            "setting the login uid to {}: {e}; crust needs CAP_AUDIT_CONTROL (and an audit loginuid that is not immutable)",
            core.loginuid as i32
        )
    })
}

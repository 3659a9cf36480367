//! prctl state and oom_score_adj. The parasite reads the prctl values from
//! inside each thread; the restorer sets them (per thread: timer slack, MCE
//! kill policy, securebits, no_new_privs, parent-death signal; per process:
//! dumpable, child subreaper, THP disable). oom_score_adj is written by the
//! restored process before the restorer runs.

use anyhow::Result;
use tracing::warn;

use crate::abi::{MiscState, RestorerArgs, ThreadArgs};
use crate::images::pb::{TaskCore, ThreadCore};

pub fn dump_thread_prctl(m: &MiscState, t: &mut ThreadCore) {
    t.tid_address = m.tid_address;
    t.timer_slack = m.timer_slack;
    t.no_new_privs = m.no_new_privs == 1;
    t.securebits = m.securebits as u32;
    t.pdeath_signal = m.pdeath_signal;
    t.mce_kill = m.mce_kill;
}

pub fn dump_prctl(m: &MiscState, core: &mut TaskCore) {
    core.dumpable = m.dumpable;
    core.child_subreaper = m.child_subreaper != 0;
    core.thp_disable = m.thp_disable == 1;
}

pub fn restore_thread_prctl(t: &ThreadCore, a: &mut ThreadArgs) {
    a.tid_address = t.tid_address;
    a.timer_slack = t.timer_slack;
    a.no_new_privs = t.no_new_privs as i32;
    a.securebits = t.securebits as i32;
    a.pdeath_signal = t.pdeath_signal;
    a.mce_kill = t.mce_kill;
}

pub fn restore_prctl(core: &TaskCore, args: &mut RestorerArgs) {
    args.dumpable = core.dumpable;
    args.child_subreaper = core.child_subreaper as i32;
    args.thp_disable = core.thp_disable as i32;
}

/// Sets oom_score_adj on the calling (restored) process. Lowering it needs
/// CAP_SYS_RESOURCE, which not every host grants: then the task keeps
/// crust's value and a warning says so.
pub fn restore_oom_score_adj(core: &TaskCore) -> Result<()> {
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", core.oom_score_adj.to_string()) {
        warn!(
            "task {}: cannot set oom_score_adj to {} ({e}); lowering it needs CAP_SYS_RESOURCE",
            core.pid, core.oom_score_adj
        );
    }
    Ok(())
}

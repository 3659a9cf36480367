//! Scheduling: policy, priority, nice and CPU affinity of each thread. Read
//! from outside (the sched_get* calls take any TID), set by each restored
//! thread on itself in the restorer, before it drops its privileges.

use crate::abi::{MAX_CPU_WORDS, ThreadArgs};
use crate::images::pb::Sched;

pub fn dump_sched(tid: i32) -> Sched {
    // SAFETY: the sched_get* calls write only into the values passed.
    unsafe {
        let policy = libc::sched_getscheduler(tid);
        let mut param: libc::sched_param = std::mem::zeroed();
        libc::sched_getparam(tid, &mut param);
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, tid as u32);
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let n = libc::syscall(
            libc::SYS_sched_getaffinity,
            tid,
            std::mem::size_of::<libc::cpu_set_t>(),
            &mut set as *mut libc::cpu_set_t,
        );
        let words = std::slice::from_raw_parts(
            &set as *const libc::cpu_set_t as *const u64,
            std::mem::size_of::<libc::cpu_set_t>() / 8,
        );
        let affinity = if n > 0 {
            words[..(n as usize / 8).min(MAX_CPU_WORDS)].to_vec()
        } else {
            Vec::new()
        };
        // SCHED_RESET_ON_FORK is reported as a flag of the policy and is
        // kept there: sched_setscheduler takes it the same way.
        Sched {
            policy,
            priority: param.sched_priority,
            nice,
            affinity,
        }
    }
}

pub fn restore_sched(s: Option<&Sched>, t: &mut ThreadArgs) {
    let Some(s) = s else { return };
    t.sched_policy = s.policy;
    t.sched_priority = s.priority;
    t.nice = s.nice;
    let n = s.affinity.len().min(MAX_CPU_WORDS);
    t.affinity[..n].copy_from_slice(&s.affinity[..n]);
    t.nr_affinity = n as u32;
}

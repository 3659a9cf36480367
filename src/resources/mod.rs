//! One module per kind of resource, each with its dump and restore side.

pub mod creds;
pub mod epoll;
pub mod eventfd;
pub mod fanotify;
pub mod fifo;
pub mod files;
pub mod ghost;
pub mod inotify;
pub mod membarrier;
pub mod memory;
pub mod pipes;
pub mod prctl;
pub mod pty;
pub mod regs;
pub mod sched;
pub mod seccomp;
pub mod signals;
pub mod sysv;
pub mod timers;

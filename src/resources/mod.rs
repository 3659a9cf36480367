//! One module per kind of resource, each with its dump and restore side.

pub mod creds;
pub mod devices;
pub mod epoll;
pub mod eventfd;
pub mod fanotify;
pub mod fdt;
pub mod fifo;
pub mod files;
pub mod fown;
pub mod fs;
pub mod ghost;
pub mod inotify;
pub mod locks;
pub mod membarrier;
pub mod memory;
pub mod nsfile;
pub mod pidfd;
pub mod pipes;
pub mod prctl;
pub mod pty;
pub mod regs;
pub mod regular;
pub mod sched;
pub mod seccomp;
pub mod signals;
// The families that use it (unix, inet, packet, netlink) land one by one.
#[allow(dead_code)]
pub mod sockets;
pub mod sysv;
pub mod timers;

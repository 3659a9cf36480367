//! `crust show`: decodes images for people (text) or scripts (--json).

use std::path::Path;

use anyhow::{Result, bail};
use serde::Serialize;

use crate::images::pb::{FdTable, GhostTable, Inventory, MmEntry, TaskCore};
use crate::images::{self, HEADER_LEN, ImageKind, parse_header, read_msg_file};

/// How an image reads for people.
trait Describe {
    fn describe(&self) -> String;
}

fn print<T: Serialize + Describe>(name: &str, v: &T, json: bool) -> Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({ "file": name, "image": v }))?
        );
    } else {
        println!("== {name}");
        print!("{}", v.describe());
    }
    Ok(())
}

fn prot(p: u32) -> String {
    let f = |bit: i32, c: char| if p & bit as u32 != 0 { c } else { '-' };
    [
        f(libc::PROT_READ, 'r'),
        f(libc::PROT_WRITE, 'w'),
        f(libc::PROT_EXEC, 'x'),
    ]
    .iter()
    .collect()
}

impl Describe for Inventory {
    fn describe(&self) -> String {
        let tasks: Vec<String> = self
            .tasks
            .iter()
            .map(|t| {
                let mut s = format!("{} (parent {}", t.pid, t.ppid);
                if t.files_of != 0 {
                    s += &format!(", fd table of {}", t.files_of);
                }
                if t.fs_of != 0 {
                    s += &format!(", fs of {}", t.fs_of);
                }
                s + ")"
            })
            .collect();
        format!(
            "format version {}, dumped by crust {} on kernel {} at unix time {}{}{}{}{}\nroot PID {}, tasks: {}\nSysV semaphore sets {:?}, message queues {:?}\n",
            self.format_version,
            self.crust_version,
            self.kernel_release,
            self.dump_time_unix,
            if self.shell_job { ", shell job" } else { "" },
            if self.pre_dump {
                ", pre-dump (memory only)"
            } else {
                ""
            },
            match self.tracking {
                1 => ", writes tracked by userfaultfd (holder at tracker.sock)",
                2 => ", writes tracked by soft-dirty bits",
                _ => "",
            },
            if self.deduplicated {
                ", deduplicated (a later dump holds pages punched out here)"
            } else {
                ""
            },
            self.root_pid,
            tasks.join(", "),
            self.sysv_sems.iter().map(|s| s.id).collect::<Vec<_>>(),
            self.sysv_msgs
                .iter()
                .map(|q| (q.id, q.messages.len()))
                .collect::<Vec<_>>()
        )
    }
}

impl Describe for TaskCore {
    fn describe(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "process {} ({}), personality {:#x}, {} thread(s), dumpable {}, oom_score_adj {}{}{}",
            self.pid,
            self.comm,
            self.personality,
            self.threads.len(),
            self.dumpable,
            self.oom_score_adj,
            if self.child_subreaper {
                ", child subreaper"
            } else {
                ""
            },
            if self.thp_disable {
                ", THP disabled"
            } else {
                ""
            }
        );
        for a in self
            .sigactions
            .iter()
            .filter(|a| a.handler != 0 || a.flags != 0 || a.mask != 0)
        {
            let h = match a.handler {
                0 => "default".to_string(),
                1 => "ignore".to_string(),
                h => format!("{h:#x}"),
            };
            let _ = writeln!(
                o,
                "  signal {:2}: handler {h} flags {:#x} mask {:#x}",
                a.signo, a.flags, a.mask
            );
        }
        for t in self
            .itimers
            .iter()
            .filter(|t| t.value_usec != 0 || t.interval_usec != 0)
        {
            let _ = writeln!(
                o,
                "  itimer {}: {} us left, every {} us",
                t.which, t.value_usec, t.interval_usec
            );
        }
        for t in &self.posix_timers {
            let _ = writeln!(
                o,
                "  posix timer {}: clock {} notify {:#x} signal {} value {:#x} tid {}: {} ns left, every {} ns, overrun {}",
                t.id,
                t.clock,
                t.notify,
                t.signo,
                t.sigev_value,
                t.notify_tid,
                t.value_ns,
                t.interval_ns,
                t.overrun
            );
        }
        let v = |x: u64| {
            if x == u64::MAX {
                "inf".to_string()
            } else {
                x.to_string()
            }
        };
        let lim: Vec<String> = self
            .rlimits
            .iter()
            .map(|l| format!("{}={}/{}", l.resource, v(l.cur), v(l.max)))
            .collect();
        let _ = writeln!(o, "  rlimits {}", lim.join(" "));
        for t in &self.threads {
            let _ = writeln!(o, "  thread {} ({})", t.tid, t.comm);
            if let Some(r) = &t.regs {
                let rows = [
                    [
                        ("rip", r.rip),
                        ("rsp", r.rsp),
                        ("rbp", r.rbp),
                        ("eflags", r.eflags),
                    ],
                    [
                        ("rax", r.rax),
                        ("rbx", r.rbx),
                        ("rcx", r.rcx),
                        ("rdx", r.rdx),
                    ],
                    [("rsi", r.rsi), ("rdi", r.rdi), ("r8", r.r8), ("r9", r.r9)],
                    [
                        ("r10", r.r10),
                        ("r11", r.r11),
                        ("r12", r.r12),
                        ("r13", r.r13),
                    ],
                    [
                        ("r14", r.r14),
                        ("r15", r.r15),
                        ("fs_base", r.fs_base),
                        ("gs_base", r.gs_base),
                    ],
                ];
                for row in rows {
                    let cells: Vec<String> = row
                        .iter()
                        .map(|(n, v)| format!("{n:>3} {v:016x}"))
                        .collect();
                    let _ = writeln!(o, "    {}", cells.join("  "));
                }
            }
            let _ = writeln!(
                o,
                "    XSAVE area {} bytes, blocked signals {:#x}{}",
                t.xsave.len(),
                t.sigmask,
                if t.restarted_syscall {
                    ", restarts an interrupted syscall"
                } else {
                    ""
                }
            );
            if let Some(sc) = &t.seccomp {
                let lens: Vec<String> = sc
                    .filters
                    .iter()
                    .map(|f| format!("{} insns flags {:#x}", f.insns.len() / 8, f.flags))
                    .collect();
                let _ = writeln!(
                    o,
                    "    seccomp mode {}: {} filter(s), oldest first [{}]",
                    sc.mode,
                    sc.filters.len(),
                    lens.join(", ")
                );
            }
            if let Some(c) = &t.creds {
                let _ = writeln!(
                    o,
                    "    uids {:?} gids {:?} groups {:?}\n    caps eff {:#x} prm {:#x} inh {:#x} bnd {:#x} amb {:#x} securebits {:#x}",
                    c.uid,
                    c.gid,
                    c.groups,
                    c.cap_eff,
                    c.cap_prm,
                    c.cap_inh,
                    c.cap_bnd,
                    c.cap_amb,
                    t.securebits
                );
            }
            if let Some(s) = &t.sched {
                let _ = writeln!(
                    o,
                    "    sched policy {} priority {} nice {} affinity {:x?}",
                    s.policy, s.priority, s.nice, s.affinity
                );
            }
            if let Some(a) = t.sigaltstack.as_ref().filter(|a| a.size != 0) {
                let _ = writeln!(
                    o,
                    "    sigaltstack {:#x} size {} flags {:#x}",
                    a.sp, a.size, a.flags
                );
            }
            if let Some(r) = &t.rseq {
                let _ = writeln!(
                    o,
                    "    rseq at {:#x} ({} bytes, signature {:#x})",
                    r.addr, r.len, r.sig
                );
            }
            let _ = writeln!(
                o,
                "    clear-child-tid {:#x} robust list {:#x} timer slack {} ns{}{}",
                t.tid_address,
                t.robust_list,
                t.timer_slack,
                if t.no_new_privs { ", no_new_privs" } else { "" },
                if t.pdeath_signal != 0 {
                    format!(", parent-death signal {}", t.pdeath_signal)
                } else {
                    String::new()
                }
            );
        }
        o
    }
}

impl Describe for MmEntry {
    fn describe(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(o, "exe {}", self.exe_path);
        let _ = writeln!(
            o,
            "code {:x}-{:x} data {:x}-{:x} brk {:x}-{:x} stack {:x}",
            self.start_code,
            self.end_code,
            self.start_data,
            self.end_data,
            self.start_brk,
            self.brk,
            self.start_stack
        );
        let _ = writeln!(
            o,
            "args {:x}-{:x} env {:x}-{:x} auxv {} words",
            self.arg_start,
            self.arg_end,
            self.env_start,
            self.env_end,
            self.auxv.len()
        );
        for v in &self.vmas {
            let what = if v.path.is_empty() {
                v.name.clone()
            } else {
                format!("{} @{:#x}", v.path, v.pgoff)
            };
            let gd = if v.growsdown { " growsdown" } else { "" };
            // The VmFlags mnemonics of its madvise/mlock state.
            let adv: String = crate::abi::VMA_ADVICE
                .iter()
                .filter(|(bit, _, _)| v.advice & bit != 0)
                .map(|(_, flag, _)| format!(" {flag}"))
                .collect();
            let _ = writeln!(
                o,
                "  {:012x}-{:012x} {} {:?}{gd}{adv} {what}",
                v.start,
                v.end,
                prot(v.prot),
                v.kind()
            );
        }
        let pages: u64 = self.pagemap.iter().map(|p| p.nr_pages).sum();
        let _ = writeln!(
            o,
            "{} runs of pages, {} pages stored:",
            self.pagemap.len(),
            pages
        );
        for p in &self.pagemap {
            let _ = writeln!(o, "  {:012x} +{}", p.vaddr, p.nr_pages);
        }
        if !self.prev_pages.is_empty() {
            let prev: u64 = self.prev_pages.iter().map(|p| p.nr_pages).sum();
            let _ = writeln!(
                o,
                "{} runs, {prev} pages in the parent dump's chain:",
                self.prev_pages.len()
            );
            for p in &self.prev_pages {
                let _ = writeln!(o, "  {:012x} +{}", p.vaddr, p.nr_pages);
            }
        }
        o
    }
}

impl Describe for GhostTable {
    fn describe(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        for g in &self.ghosts {
            let data: u64 = g.extents.iter().map(|e| e.len).sum();
            let _ = writeln!(
                o,
                "ghost {} {}:{} {}{} mode {:o} owner {}:{} size {} ({} bytes of data in {} runs){}{}",
                g.id,
                g.dev,
                g.ino,
                if g.memfd { "memfd " } else { "" },
                g.path,
                g.mode,
                g.uid,
                g.gid,
                g.size,
                data,
                g.extents.len(),
                if g.target.is_empty() {
                    String::new()
                } else {
                    format!(" -> {}", g.target)
                },
                if g.link_remap.is_empty() {
                    String::new()
                } else {
                    format!(", linked back as {}", g.link_remap)
                }
            );
        }
        o
    }
}

impl Describe for FdTable {
    fn describe(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "cwd {} root {} umask {:03o}",
            self.cwd, self.root, self.umask
        );
        for e in &self.fds {
            let what = e
                .file
                .as_ref()
                .map_or_else(|| "?".into(), crate::resources::files::describe_file);
            let dup = e
                .dup_of
                .map(|d| format!(" (same open file as fd {d})"))
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "  fd {:3}{} {what}{dup}",
                e.fd,
                if e.cloexec { " cloexec" } else { "" }
            );
        }
        o
    }
}

#[derive(Serialize)]
struct Pages {
    bytes: u64,
    pages: u64,
    crc32: u32,
}

impl Describe for Pages {
    fn describe(&self) -> String {
        format!(
            "{} bytes ({} pages), CRC32 {:08x}, verified\n",
            self.bytes, self.pages, self.crc32
        )
    }
}

fn show_file(path: &Path, json: bool) -> Result<()> {
    let mut h = [0u8; HEADER_LEN];
    let n = std::io::Read::read(&mut std::fs::File::open(path)?, &mut h)?;
    let hdr = parse_header(path, &h[..n])?;
    let name = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    match hdr.kind {
        ImageKind::Inventory => print(
            &name,
            &read_msg_file::<Inventory>(path, Some(hdr.kind))?,
            json,
        ),
        ImageKind::Core => {
            let mut c: TaskCore = read_msg_file(path, Some(hdr.kind))?;
            if json {
                // The XSAVE areas are kilobytes of binary each; text shows their size.
                for t in &mut c.threads {
                    t.xsave.clear();
                }
            }
            print(&name, &c, json)
        }
        ImageKind::Mm => print(
            &name,
            &read_msg_file::<MmEntry>(path, Some(hdr.kind))?,
            json,
        ),
        ImageKind::Files => print(
            &name,
            &read_msg_file::<FdTable>(path, Some(hdr.kind))?,
            json,
        ),
        ImageKind::Ghosts => print(
            &name,
            &read_msg_file::<GhostTable>(path, Some(hdr.kind))?,
            json,
        ),
        ImageKind::GhostData => {
            let h = images::verify_raw_file(path, ImageKind::GhostData)?;
            print(
                &name,
                &Pages {
                    bytes: h.len,
                    pages: h.len.div_ceil(4096),
                    crc32: h.crc,
                },
                json,
            )
        }
        ImageKind::Pages => {
            let h = images::verify_pages_file(path)?;
            print(
                &name,
                &Pages {
                    bytes: h.len,
                    pages: h.len / 4096,
                    crc32: h.crc,
                },
                json,
            )
        }
    }
}

pub fn show(path: &Path, json: bool) -> Result<()> {
    if path.is_file() {
        return show_file(path, json);
    }
    if !path.is_dir() {
        bail!(
            "{} is neither an image file nor an images directory",
            path.display()
        );
    }
    let mut names: Vec<_> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "img"))
        .collect();
    if names.is_empty() {
        bail!("{} holds no images", path.display());
    }
    names.sort();
    for p in names {
        show_file(&p, json)?;
    }
    Ok(())
}

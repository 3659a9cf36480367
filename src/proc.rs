//! Parsers for the /proc files crust reads about a task.

use std::fs;

use anyhow::{Context, Result, bail};

pub fn read(pid: i32, name: &str) -> Result<String> {
    fs::read_to_string(format!("/proc/{pid}/{name}"))
        .with_context(|| format!("reading /proc/{pid}/{name}"))
}

/// One line of /proc/PID/smaps with its VmFlags.
#[derive(Debug, Clone)]
pub struct MapsEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    pub inode: u64,
    pub path: String,
    pub vm_flags: Vec<String>,
}

impl MapsEntry {
    pub fn has_flag(&self, f: &str) -> bool {
        self.vm_flags.iter().any(|x| x == f)
    }
}

fn parse_maps_line(line: &str) -> Option<MapsEntry> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.as_bytes();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let dev = it.next()?;
    let inode: u64 = it.next()?.parse().ok()?;
    let path = it.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-')?;
    // The device is checked through map_files' stat, not parsed here.
    dev.split_once(':')?;
    Some(MapsEntry {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset,
        inode,
        path,
        vm_flags: Vec::new(),
    })
}

/// /proc/PID/smaps, one entry per VMA.
pub fn smaps(pid: i32) -> Result<Vec<MapsEntry>> {
    let text = read_by_entry(pid, "smaps", |_| false)?;
    let text =
        String::from_utf8(text).with_context(|| format!("/proc/{pid}/smaps is not UTF-8"))?;
    parse_smaps(&text).with_context(|| format!("/proc/{pid}/smaps"))
}

/// A seq_file read in pieces smaller than one of its entries, to its end
/// or until `enough` says the text so far will do. The kernel fills a read
/// with whole entries into a page-sized buffer; the entry that does not
/// fit is thrown away and made again for the next read. For smaps making
/// an entry walks every page of its VMA, so a big read walks about every
/// third VMA twice (4 GiB: 127 ms against 66 ms in 1 KiB reads). A read
/// smaller than an entry stops after one, and none is made twice; entries
/// after the last one read are not made at all.
fn read_by_entry(pid: i32, name: &str, enough: impl Fn(&[u8]) -> bool) -> Result<Vec<u8>> {
    use std::io::Read;
    let path = format!("/proc/{pid}/{name}");
    let mut f = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    let mut text = Vec::with_capacity(64 << 10);
    let mut buf = [0u8; 512];
    while !enough(&text) {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {path}")),
        };
        text.extend_from_slice(&buf[..n]);
    }
    Ok(text)
}

/// The end of the first smaps entry in `text` (past its VmFlags line, the
/// last of an entry), if it is all there.
fn first_entry_end(text: &[u8]) -> Option<usize> {
    let at = text.windows(9).position(|w| w == b"\nVmFlags:")?;
    let eol = text[at + 1..].iter().position(|&c| c == b'\n')?;
    Some(at + 1 + eol + 1)
}

/// The first entry of /proc/PID/smaps: the kernel counts the pages of a
/// VMA only when its entry is read, so the VMAs after the first cost
/// nothing.
pub fn first_smaps_entry(pid: i32) -> Result<MapsEntry> {
    let path = format!("/proc/{pid}/smaps");
    let text = read_by_entry(pid, "smaps", |t| first_entry_end(t).is_some())?;
    let end = first_entry_end(&text).unwrap_or(text.len());
    parse_smaps(&String::from_utf8_lossy(&text[..end]))
        .with_context(|| path.clone())?
        .into_iter()
        .next()
        .with_context(|| format!("{path} is empty"))
}

/// The text of an smaps file, one entry per VMA with its VmFlags.
pub fn parse_smaps(text: &str) -> Result<Vec<MapsEntry>> {
    let mut out: Vec<MapsEntry> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("VmFlags:") {
            if let Some(last) = out.last_mut() {
                last.vm_flags = rest.split_whitespace().map(str::to_string).collect();
            }
        } else if line
            .as_bytes()
            .first()
            .is_some_and(|c| c.is_ascii_hexdigit())
            && line.contains('-')
        {
            if let Some(e) = parse_maps_line(line) {
                out.push(e);
                continue;
            }
            // Field lines ("Size:  4 kB") start with a letter; a hex-looking one
            // that does not parse is a format crust does not know.
            if !line.contains(':')
                || line
                    .split_whitespace()
                    .next()
                    .is_some_and(|w| w.contains('-'))
            {
                bail!("cannot parse line {line:?}");
            }
        }
    }
    Ok(out)
}

/// /proc/PID/maps: the VMAs without their VmFlags. Unlike smaps, reading
/// it does not count the pages of each VMA, which for gigabytes takes long.
pub fn maps(pid: i32) -> Result<Vec<MapsEntry>> {
    Ok(read(pid, "maps")?
        .lines()
        .filter_map(parse_maps_line)
        .collect())
}

/// /proc/self/maps, for finding free address ranges.
pub fn self_maps() -> Result<Vec<(u64, u64)>> {
    let text = fs::read_to_string("/proc/self/maps")?;
    Ok(text
        .lines()
        .filter_map(parse_maps_line)
        .map(|e| (e.start, e.end))
        .collect())
}

/// The fields of /proc/PID/status crust uses.
#[derive(Debug, Default)]
pub struct Status {
    pub name: String,
    pub umask: u32,
    pub state: char,
    pub tgid: i32,
    pub ppid: i32,
    pub tracer_pid: i32,
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    pub groups: Vec<u32>,
    pub threads: u32,
    pub sig_blk: u64,
    /// Signals pending for the thread (SigPnd) and the process (ShdPnd).
    pub sig_pnd: u64,
    pub shd_pnd: u64,
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    /// 0 none, 1 strict, 2 filter.
    pub seccomp: u32,
    /// Resident private memory, in bytes (RssAnon).
    pub rss_anon: u64,
}

pub fn status(pid: i32) -> Result<Status> {
    Ok(parse_status(&read(pid, "status")?))
}

/// The text of a status file.
pub fn parse_status(text: &str) -> Status {
    let mut s = Status::default();
    let four = |v: &str| -> [u32; 4] {
        let mut a = [0u32; 4];
        for (i, x) in v.split_whitespace().take(4).enumerate() {
            a[i] = x.parse().unwrap_or(0);
        }
        a
    };
    let hex = |v: &str| u64::from_str_radix(v.trim(), 16).unwrap_or(0);
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k {
            "Name" => s.name = v.to_string(),
            "Umask" => s.umask = u32::from_str_radix(v, 8).unwrap_or(0o22),
            "State" => s.state = v.chars().next().unwrap_or('?'),
            "Tgid" => s.tgid = v.parse().unwrap_or(0),
            "PPid" => s.ppid = v.parse().unwrap_or(0),
            "TracerPid" => s.tracer_pid = v.parse().unwrap_or(0),
            "Uid" => s.uid = four(v),
            "Gid" => s.gid = four(v),
            "Groups" => {
                s.groups = v
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            }
            "Threads" => s.threads = v.parse().unwrap_or(1),
            "SigBlk" => s.sig_blk = hex(v),
            "SigPnd" => s.sig_pnd = hex(v),
            "ShdPnd" => s.shd_pnd = hex(v),
            "CapInh" => s.cap_inh = hex(v),
            "CapPrm" => s.cap_prm = hex(v),
            "CapEff" => s.cap_eff = hex(v),
            "CapBnd" => s.cap_bnd = hex(v),
            "CapAmb" => s.cap_amb = hex(v),
            "Seccomp" => s.seccomp = v.parse().unwrap_or(0),
            "RssAnon" => {
                let kb = v.trim_end_matches("kB").trim();
                s.rss_anon = kb.parse::<u64>().unwrap_or(0) << 10;
            }
            _ => {}
        }
    }
    s
}

/// /proc/PID/stat fields from the one after `(comm)`; index 0 is the state
/// (field 3 in proc(5) numbering).
pub fn stat_fields(pid: i32) -> Result<Vec<u64>> {
    parse_stat(&read(pid, "stat")?).with_context(|| format!("/proc/{pid}/stat"))
}

/// The text of a stat file (the command name may hold spaces and parens:
/// the fields start after its last ')').
pub fn parse_stat(text: &str) -> Result<Vec<u64>> {
    let rest = text
        .rsplit_once(')')
        .map(|x| x.1)
        .context("malformed stat")?;
    Ok(rest
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse::<i64>().unwrap_or(0) as u64)
        .collect())
}

/// The state letter (field 3 of stat) and the flags (field 9: PF_*).
pub fn state_and_flags(pid: i32) -> Result<(char, u64)> {
    let text = read(pid, "stat")?;
    let state = text
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|s| s.chars().next())
        .with_context(|| format!("/proc/{pid}/stat: malformed"))?;
    let fields = parse_stat(&text).with_context(|| format!("/proc/{pid}/stat"))?;
    Ok((state, stat_field(&fields, 9)))
}

/// Field N of stat in proc(5) numbering (N >= 4).
pub fn stat_field(fields: &[u64], n: usize) -> u64 {
    fields.get(n - 4).copied().unwrap_or(0)
}

/// The `key:\tvalue` lines of /proc/PID/fdinfo/FD.
pub fn fdinfo(pid: i32, fd: i32) -> Result<Vec<(String, String)>> {
    Ok(parse_fdinfo(&read(pid, &format!("fdinfo/{fd}"))?))
}

/// The `key: value` lines of an fdinfo file, in order (keys repeat: one
/// `lock:` or `inotify` line each).
pub fn parse_fdinfo(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

pub fn auxv(pid: i32) -> Result<Vec<u64>> {
    let raw = fs::read(format!("/proc/{pid}/auxv"))
        .with_context(|| format!("reading /proc/{pid}/auxv"))?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect())
}

/// (N, the rest) of a path under a task's directory of /proc as a link
/// shows it: "/proc/N" or "/proc/N/REST" (without a " (deleted)" mark).
pub fn split_pid_path(path: &str) -> Option<(i32, &str)> {
    let tail = path.strip_prefix("/proc/")?;
    let (n, rest) = tail.split_once('/').unwrap_or((tail, ""));
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((n.parse().ok()?, rest))
}

/// Whether the file at `path` (a /proc/PID/fd link, followed) lives on a
/// filesystem with magic `magic`.
pub fn on_fs(path: &str, magic: nix::sys::statfs::FsType) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == magic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_state_and_flags() {
        // This thread reads its own stat (/proc/TID works for any thread):
        // running, not exiting.
        let (state, flags) = state_and_flags(nix::unistd::gettid().as_raw()).unwrap();
        assert_eq!(state, 'R');
        assert_eq!(flags & 0x4, 0, "PF_EXITING");
    }

    #[test]
    fn pid_paths() {
        assert_eq!(split_pid_path("/proc/17/stat"), Some((17, "stat")));
        assert_eq!(split_pid_path("/proc/17/fdinfo/4"), Some((17, "fdinfo/4")));
        assert_eq!(split_pid_path("/proc/17"), Some((17, "")));
        assert_eq!(split_pid_path("/proc/self/stat"), None);
        assert_eq!(split_pid_path("/proc/meminfo"), None);
        assert_eq!(split_pid_path("/proc/"), None);
        assert_eq!(split_pid_path("/tmp/proc/17/stat"), None);
    }

    const SMAPS: &str = "\
55d0c0a00000-55d0c0a21000 r-xp 00001000 fe:01 1835 /usr/bin/my prog (deleted)
Size:                132 kB
Rss:                  64 kB
VmFlags: rd ex mr mw me dw sd
7ffd1e1f0000-7ffd1e212000 rw-p 00000000 00:00 0                          [stack]
Size:                136 kB
VmFlags: rd wr mr mw me gd ac
7f0000000000-7f0000001000 rw-s 00000000 00:01 4242                       /dev/zero (deleted)
VmFlags: rd wr sh mr mw me ms lo
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn smaps_entries_and_flags() {
        let v = parse_smaps(SMAPS).unwrap();
        assert_eq!(v.len(), 4);
        let exe = &v[0];
        assert_eq!((exe.start, exe.end), (0x55d0c0a00000, 0x55d0c0a21000));
        assert!(exe.read && !exe.write && exe.exec && !exe.shared);
        assert_eq!(exe.offset, 0x1000);
        assert_eq!(exe.inode, 1835);
        // A path keeps its spaces and its " (deleted)" mark.
        assert_eq!(exe.path, "/usr/bin/my prog (deleted)");
        assert!(exe.has_flag("dw") && !exe.has_flag("gd"));
        assert_eq!(v[1].path, "[stack]");
        assert!(v[1].has_flag("gd"));
        assert!(v[2].shared && v[2].has_flag("lo"));
        assert_eq!(v[3].start, 0xffffffffff600000);
    }

    #[test]
    fn smaps_refuses_an_unknown_line() {
        let bad = "55d0c0a00000-55d0c0a21000 r-xp zz fe:01 1835 /x\n";
        assert!(parse_smaps(bad).is_err());
    }

    #[test]
    fn status_fields() {
        let s = parse_status(
            "Name:\tmy prog\nUmask:\t0027\nState:\tS (sleeping)\nTgid:\t42\nPPid:\t1\n\
             TracerPid:\t0\nUid:\t1000\t1001\t1002\t1003\nGid:\t5\t6\t7\t8\n\
             Groups:\t4 24 27 \nThreads:\t3\nSigBlk:\t0000000000010002\n\
             CapEff:\t000001ffffffffff\nSeccomp:\t2\n",
        );
        assert_eq!(s.name, "my prog");
        assert_eq!(s.umask, 0o027);
        assert_eq!(s.state, 'S');
        assert_eq!((s.tgid, s.ppid, s.tracer_pid), (42, 1, 0));
        assert_eq!(s.uid, [1000, 1001, 1002, 1003]);
        assert_eq!(s.gid, [5, 6, 7, 8]);
        assert_eq!(s.groups, vec![4, 24, 27]);
        assert_eq!(s.threads, 3);
        assert_eq!(s.sig_blk, 0x10002);
        assert_eq!(s.cap_eff, 0x1ff_ffff_ffff);
        assert_eq!(s.seccomp, 2);
    }

    #[test]
    fn stat_with_parens_in_the_name() {
        let f = parse_stat("123 (a) b (c)) T 1 123 77 0 -1 4194560 0 0").unwrap();
        // Field 4 (ppid), 5 (pgrp), 6 (session); -1 reads as u64::MAX.
        assert_eq!(stat_field(&f, 4), 1);
        assert_eq!(stat_field(&f, 5), 123);
        assert_eq!(stat_field(&f, 6), 77);
        assert_eq!(stat_field(&f, 8), u64::MAX);
        // A field past the end reads as 0.
        assert_eq!(stat_field(&f, 52), 0);
        assert!(parse_stat("no parenthesis").is_err());
    }

    #[test]
    fn fdinfo_keeps_repeated_keys() {
        let v = parse_fdinfo(
            "pos:\t7\nflags:\t02004002\nmnt_id:\t25\nlock:\t1: FLOCK  ADVISORY  WRITE 9 fe:01:3 0 EOF\n\
             lock:\t2: POSIX  ADVISORY  READ 9 fe:01:3 0 9\n",
        );
        assert_eq!(v[0], ("pos".into(), "7".into()));
        assert_eq!(v[1].1, "02004002");
        let locks: Vec<_> = v.iter().filter(|(k, _)| k == "lock").collect();
        assert_eq!(locks.len(), 2);
        // Only the first ':' splits: the value keeps its own.
        assert_eq!(locks[0].1, "1: FLOCK  ADVISORY  WRITE 9 fe:01:3 0 EOF");
    }
}

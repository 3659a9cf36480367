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
    let text = read(pid, "smaps")?;
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
                bail!("/proc/{pid}/smaps: cannot parse line {line:?}");
            }
        }
    }
    Ok(out)
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
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    /// 0 none, 1 strict, 2 filter.
    pub seccomp: u32,
}

pub fn status(pid: i32) -> Result<Status> {
    let text = read(pid, "status")?;
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
            "CapInh" => s.cap_inh = hex(v),
            "CapPrm" => s.cap_prm = hex(v),
            "CapEff" => s.cap_eff = hex(v),
            "CapBnd" => s.cap_bnd = hex(v),
            "CapAmb" => s.cap_amb = hex(v),
            "Seccomp" => s.seccomp = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    Ok(s)
}

/// /proc/PID/stat fields from the one after `(comm)`; index 0 is the state
/// (field 3 in proc(5) numbering).
pub fn stat_fields(pid: i32) -> Result<Vec<u64>> {
    let text = read(pid, "stat")?;
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

/// Field N of stat in proc(5) numbering (N >= 4).
pub fn stat_field(fields: &[u64], n: usize) -> u64 {
    fields.get(n - 4).copied().unwrap_or(0)
}

/// The `key:\tvalue` lines of /proc/PID/fdinfo/FD.
pub fn fdinfo(pid: i32, fd: i32) -> Result<Vec<(String, String)>> {
    let text = read(pid, &format!("fdinfo/{fd}"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect())
}

pub fn auxv(pid: i32) -> Result<Vec<u64>> {
    let raw = fs::read(format!("/proc/{pid}/auxv"))
        .with_context(|| format!("reading /proc/{pid}/auxv"))?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect())
}

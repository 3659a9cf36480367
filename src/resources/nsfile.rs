//! Namespace files (/proc/PID/ns/TYPE held open): nsfs inodes whose link
//! reads TYPE:[INO], not a path. Reopened from the restoring task's own
//! /proc/self/ns/TYPE, which must be the same namespace (the same inode):
//! so it is for a restore on the same host into the namespaces of the dump.

use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;

use anyhow::{Result, bail};

use super::files::{FdProbe, FileKind, RestoreCtx, open_fd};
use crate::images::pb::NsFile;
use crate::images::pb::fd_entry::File as FdFile;
use crate::proc;

pub struct NsFileKind;

/// (TYPE, INO) of a namespace link text "TYPE:[INO]".
fn parse_ns_link(link: &str) -> Option<(&str, u64)> {
    let (kind, rest) = link.split_once(":[")?;
    let ino = rest.strip_suffix(']')?.parse().ok()?;
    (!kind.is_empty() && kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        .then_some((kind, ino))
}

/// The /proc/self/ns file of namespace `kind` that is the namespace `ino`:
/// "pid" and "time" may be the one for the task's children.
fn own_ns_path(n: &NsFile) -> Result<String> {
    let mut seen = Vec::new();
    for name in [n.kind.clone(), format!("{}_for_children", n.kind)] {
        let path = format!("/proc/self/ns/{name}");
        if let Ok(md) = std::fs::metadata(&path) {
            if md.ino() == n.ino {
                return Ok(path);
            }
            seen.push(format!("{name}:[{}]", md.ino()));
        }
    }
    if seen.is_empty() {
        bail!(
            "the {} namespace file {}:[{}] has no /proc/self/ns/{} here; this kernel lacks that namespace",
            n.kind,
            n.kind,
            n.ino,
            n.kind
        );
    }
    bail!(
        "the namespace file {}:[{}] is not a namespace of the restoring task (it has {}); crust reopens a namespace file only from the task's own namespaces: restore on the host and in the namespaces of the dump",
        n.kind,
        n.ino,
        seen.join(", ")
    )
}

impl FileKind for NsFileKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        let Some((kind, ino)) = parse_ns_link(p.link) else {
            return Ok(None);
        };
        if !proc::on_fs(&p.proc_path(), nix::sys::statfs::NSFS_MAGIC) {
            return Ok(None);
        }
        Ok(Some(FdFile::Ns(NsFile {
            kind: kind.to_string(),
            ino,
            flags: p.open_flags(),
        })))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Ns(n) = f else { return None };
        Some(format!(
            "namespace {}:[{}] flags {:#o}",
            n.kind, n.ino, n.flags
        ))
    }

    fn check(&self, f: &FdFile) -> Result<()> {
        let FdFile::Ns(n) = f else { return Ok(()) };
        own_ns_path(n).map(|_| ())
    }

    fn restore(&self, f: &FdFile, _: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Ns(n) = f else { return Ok(None) };
        Ok(Some(open_fd(&own_ns_path(n)?, n.flags)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_links() {
        assert_eq!(parse_ns_link("net:[4026531833]"), Some(("net", 4026531833)));
        assert_eq!(
            parse_ns_link("pid_for_children:[7]"),
            Some(("pid_for_children", 7))
        );
        assert_eq!(parse_ns_link("/proc/1/ns/net"), None);
        assert_eq!(parse_ns_link("socket:[12]x"), None);
        assert_eq!(parse_ns_link("anon_inode:[eventfd]"), None);
    }
}

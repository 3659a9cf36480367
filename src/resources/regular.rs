//! Regular files, directories, and symlinks held with O_PATH|O_NOFOLLOW,
//! opened by path: reopened at their path with their flags and offset. A
//! file replaced at its path, or resized, since the dump is refused by name
//! (the task would see other data).

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use anyhow::{Result, bail};

use super::files::{FdProbe, FileKind, RestoreCtx, open_fd, seek_to};
use crate::images::pb::RegularFile;
use crate::images::pb::fd_entry::File as FdFile;

pub struct RegularFileKind;

/// Whether the file now at a dumped path is another one than the dumped
/// (dev, ino): on the same filesystem a new inode means the path was
/// replaced. On another filesystem (images moved to another host, say)
/// inodes say nothing, and the size check is what remains.
pub fn replaced(now: &fs::Metadata, dev: u64, ino: u64) -> bool {
    now.dev() == dev && now.ino() != ino
}

impl FileKind for RegularFileKind {
    fn dump(&self, p: &FdProbe) -> Result<Option<FdFile>> {
        let ft = p.meta.file_type();
        if !(ft.is_file() || ft.is_dir() || ft.is_symlink()) || !p.link.starts_with('/') {
            return Ok(None);
        }
        Ok(Some(FdFile::Regular(RegularFile {
            path: p.link.to_string(),
            flags: p.open_flags(),
            pos: p.pos,
            size: if p.meta.is_file() { p.meta.size() } else { 0 },
            dev: p.meta.dev(),
            ino: p.meta.ino(),
        })))
    }

    fn describe(&self, f: &FdFile) -> Option<String> {
        let FdFile::Regular(r) = f else { return None };
        Some(format!(
            "file {} flags {:#o} pos {} size {}",
            r.path, r.flags, r.pos, r.size
        ))
    }

    fn check(&self, f: &FdFile) -> Result<()> {
        let FdFile::Regular(r) = f else { return Ok(()) };
        // A symlink held itself (O_PATH|O_NOFOLLOW) is checked as the link.
        let nofollow = r.flags & libc::O_NOFOLLOW as u32 != 0 && r.flags & libc::O_PATH as u32 != 0;
        let md = if nofollow {
            fs::symlink_metadata(&r.path)
        } else {
            fs::metadata(&r.path)
        }
        .map_err(|err| {
            anyhow::anyhow!("file {} is gone ({err}); put it back to restore", r.path)
        })?;
        if replaced(&md, r.dev, r.ino) {
            bail!(
                "file {} was replaced by another file since the dump; restore the original file",
                r.path
            );
        }
        if md.is_file() && md.size() != r.size {
            bail!(
                "file {} changed size since the dump ({} bytes, now {}); restore the original file",
                r.path,
                r.size,
                md.size()
            );
        }
        Ok(())
    }

    fn restore(&self, f: &FdFile, _: &RestoreCtx) -> Result<Option<OwnedFd>> {
        let FdFile::Regular(r) = f else {
            return Ok(None);
        };
        let fd = open_fd(&r.path, r.flags)?;
        // An O_PATH fd has no offset.
        if r.flags & libc::O_PATH as u32 == 0 {
            seek_to(fd.as_raw_fd(), r.pos, &r.path)?;
        }
        Ok(Some(fd))
    }
}

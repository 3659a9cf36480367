//! Pages images: the page stream of one task, written by a dump and read
//! by a restore, the lazy-pages daemon, `dedup` and `show`.
//!
//! The stream is stored in one file, `pages-PID.img`, or in consecutive
//! parts: `pages-PID.img` holds its front, `pages-PID.part2.img` what
//! follows. Each part is framed like every image (magic, version, its own
//! length and CRC-32), padded to 4 KiB so that its data stays page-aligned
//! and can be mapped; the header's `more` field says how many parts follow
//! it. Why parts: tmpfs, like most file systems, writes into one file under
//! its inode lock, so a file takes a stream at the speed of one core,
//! splice or write(); two parts filled by two threads take it at nearly
//! twice that (docs/PERFORMANCE.md).

use std::fs::{File, OpenOptions};
use std::io::{IoSliceMut, Seek, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::{
    HEADER_LEN, Header, ImageDir, ImageError, ImageKind, PAGES_HEADER_LEN, crc_of_file_range,
    header, parse_header,
};

/// The most parts a dump writes a stream in (one per writer thread).
pub const MAX_PARTS: usize = 2;
/// The most parts a reader follows: a header claiming more is corrupt.
const PARTS_LIMIT: u32 = 16;

/// The path of part `k` (from 0) of task `pid`'s pages image in `dir`.
pub fn part_path(dir: &Path, pid: i32, k: usize) -> PathBuf {
    if k == 0 {
        dir.join(ImageKind::Pages.file_name(pid))
    } else {
        dir.join(format!("pages-{pid}.part{}.img", k + 1))
    }
}

fn part_header(len: u64, crc: u32, more: u32) -> [u8; HEADER_LEN] {
    let mut h = header(ImageKind::Pages, len, crc);
    h[20..24].copy_from_slice(&more.to_le_bytes());
    h
}

/// Where a stream of pages goes, in stream order: the pages image of a
/// dump (`PagesWriter`), or any other file or socket a pipe splices into.
/// Whoever fills the pipes knows the CRC-32 of what they hold (the parasite
/// computes it where the pages are), so a sink never reads data back.
pub trait PageSink: Send {
    /// Moves `len` bytes out of `pipe`, which is empty afterwards; `crc` is
    /// their CRC-32.
    fn take_pipe(&mut self, pipe: RawFd, len: u64, crc: u32) -> Result<()>;
    /// Appends bytes crust holds itself (pages read through /proc/PID/mem).
    fn take_bytes(&mut self, data: &[u8]) -> Result<()>;
    /// The sink as up to `parts` sinks for consecutive parts of the stream,
    /// which separate threads fill side by side: every byte of the first
    /// comes before every byte of the second in the stream. A sink that
    /// is one stream (a socket), or already holds bytes, is itself alone.
    fn split(&mut self, parts: usize) -> Result<Vec<&mut dyn PageSink>>;
}

/// Frees `[off, off+len)` of `file`, its size unchanged.
fn punch_hole(file: &File, off: u64, len: u64) -> std::io::Result<()> {
    crate::sys::fallocate(
        file.as_raw_fd(),
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    )
}

/// The data space a part file reserved in memory (tmpfs), mapped shared
/// into crust: a filled page pipe is read() straight into it. Spliced into
/// the file, each page would go through the page cache's write path (its
/// folio looked up and locked, marked dirty and accessed, moved between
/// LRU lists: the pages were written once already); read into the mapping
/// it is one copy. A pipe drained this way takes half the time
/// (docs/PERFORMANCE.md). Unmapped on drop.
struct Window(Mapping);

impl Window {
    /// Maps `len` bytes of `file` from `offset` (page-aligned), its page
    /// table filled now (MAP_POPULATE), not while the tree is frozen.
    fn map(file: &File, offset: u64, len: u64) -> std::io::Result<Window> {
        // SAFETY: a new shared mapping of our own file, of its `len`
        // bytes from `offset`, which the file holds (written by `reserve`);
        // the Mapping returned owns it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Window(Mapping {
            addr: p as u64,
            len,
        }))
    }

    /// Bytes [at, at + len) of the window, if it holds them.
    fn bytes(&mut self, at: u64, len: usize) -> Option<&mut [u8]> {
        (at.checked_add(len as u64)? <= self.0.len).then(|| {
            // SAFETY: inside the writable mapping, which lives as long as
            // `self`, borrowed mutably here.
            unsafe { std::slice::from_raw_parts_mut((self.0.addr + at) as *mut u8, len) }
        })
    }
}

/// The mappings of sealed parts (`PartWriter::seal`), unmapped by
/// `unmap_sealed` once the tree is no longer frozen: unmapping a few
/// hundred MiB of shared mapping takes about 20 ms here, all of it inside
/// the freeze otherwise. (Until then, or crust's exit, they only hold
/// crust's address space.)
static SEALED: std::sync::Mutex<Vec<Window>> = std::sync::Mutex::new(Vec::new());

/// Unmaps the sealed parts' mappings (see `SEALED`).
pub fn unmap_sealed() {
    let sealed = std::mem::take(&mut *SEALED.lock().unwrap_or_else(|e| e.into_inner()));
    drop(sealed);
}

/// One part file being written: its header page, then the data spliced or
/// written after it; `seal` writes the header.
struct PartWriter {
    path: PathBuf,
    file: File,
    len: u64,
    crc: crc32fast::Hasher,
    /// Data bytes allocated ahead (`reserve`) and not yet given back.
    reserved: u64,
    /// Reserved in memory: that space, mapped. While it holds the stream,
    /// the file's offset stays behind (`at_end` moves it on).
    window: Option<Window>,
}

impl PartWriter {
    fn create(path: PathBuf) -> Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        // A header already, of no data: should the dump die before `seal`,
        // the file is still known for a pages image, which a later dump into
        // the directory removes. (Without an inventory no restore reads it.)
        let mut head = [0u8; PAGES_HEADER_LEN as usize];
        head[..HEADER_LEN].copy_from_slice(&part_header(0, 0, 0));
        file.write_all_at(&head, 0)
            .and_then(|_| (&file).seek(std::io::SeekFrom::Start(PAGES_HEADER_LEN)))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self {
            path,
            file,
            len: 0,
            crc: crc32fast::Hasher::new(),
            reserved: 0,
            window: None,
        })
    }

    /// Takes the file's space for `bytes` of data ahead of the stream.
    /// In memory (tmpfs) the space is written with zeros: a fresh page
    /// costs its allocation and, on a VM, a fault in the host on the first
    /// write into memory the guest gave back; fallocate alone would take
    /// the first but leave the second to the stream. On a disk,
    /// fallocate(KEEP_SIZE) takes the blocks without writing them. Where
    /// neither works nothing is reserved: the stream then takes its space
    /// as it comes.
    fn reserve(&mut self, bytes: u64, in_memory: bool) {
        // From here on `release` gives back whatever part of it was taken.
        self.reserved = bytes;
        let done = if in_memory {
            let zeros = vec![0u8; 1 << 20];
            let mut off = 0;
            let mut res = Ok(());
            while off < bytes && res.is_ok() {
                let n = (bytes - off).min(zeros.len() as u64) as usize;
                res = self.file.write_all_at(&zeros[..n], PAGES_HEADER_LEN + off);
                off += n as u64;
            }
            res
        } else {
            let mode = libc::FALLOC_FL_KEEP_SIZE;
            crate::sys::fallocate(self.file.as_raw_fd(), mode, PAGES_HEADER_LEN, bytes)
        };
        if let Err(e) = done {
            tracing::debug!("{}: nothing reserved ({e})", self.path.display());
            if let Err(e) = self.release() {
                tracing::warn!("{}: giving back its space: {e}", self.path.display());
            }
            return;
        }
        if in_memory && bytes > 0 {
            match Window::map(&self.file, PAGES_HEADER_LEN, bytes) {
                Ok(w) => self.window = Some(w),
                // The stream is spliced into the file then.
                Err(e) => tracing::debug!("{}: not mapped ({e})", self.path.display()),
            }
        }
    }

    /// Puts the file's offset at the end of the data, where the window
    /// may have left it behind: the next bytes are written there.
    fn at_end(&mut self) -> std::io::Result<()> {
        if self.window.is_some() {
            (&self.file).seek(std::io::SeekFrom::Start(PAGES_HEADER_LEN + self.len))?;
        }
        Ok(())
    }

    /// Gives back what was reserved and not written: the file ends where
    /// its data does (cut even when the hole cannot be punched).
    fn release(&mut self) -> std::io::Result<()> {
        self.window = None;
        let mut res = Ok(());
        if self.reserved > self.len {
            let end = PAGES_HEADER_LEN + self.len;
            let punched = punch_hole(&self.file, end, self.reserved - self.len);
            res = self.file.set_len(end).and(punched);
        }
        self.reserved = 0;
        res
    }

    /// Closes the file and removes it: a part no stream came for.
    fn remove(self) -> Result<()> {
        let path = self.path.clone();
        drop(self);
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
    }

    /// Writes the header (its length, checksum and the parts after it)
    /// and syncs the file.
    fn seal(mut self, more: u32) -> Result<()> {
        if let Some(w) = self.window.take() {
            SEALED.lock().unwrap_or_else(|e| e.into_inner()).push(w);
        }
        self.release().with_context(|| {
            format!("giving back the space reserved in {}", self.path.display())
        })?;
        let crc = self.crc.clone().finalize();
        self.file
            .write_all_at(&part_header(self.len, crc, more), 0)
            .and_then(|_| self.file.sync_data())
            .with_context(|| format!("writing {}", self.path.display()))
    }

    fn take_checked(&mut self, data: &[u8], crc: u32) -> Result<()> {
        let at = self.len;
        match self.window.as_mut().and_then(|w| w.bytes(at, data.len())) {
            Some(room) => room.copy_from_slice(data),
            None => self
                .at_end()
                .and_then(|_| (&self.file).write_all(data))
                .with_context(|| format!("writing {}", self.path.display()))?,
        }
        self.crc.combine(&crc32fast::Hasher::new_with_initial_len(
            crc,
            data.len() as u64,
        ));
        self.len += data.len() as u64;
        Ok(())
    }
}

impl Drop for PartWriter {
    /// A dump that failed leaves no space taken beyond what it wrote.
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!(
                "{}: the space reserved past its data stays taken ({e})",
                self.path.display()
            );
        }
    }
}

impl PageSink for PartWriter {
    fn take_pipe(&mut self, pipe: RawFd, len: u64, crc: u32) -> Result<()> {
        let at = self.len;
        match self.window.as_mut().and_then(|w| w.bytes(at, len as usize)) {
            Some(room) => crate::sys::read_all(pipe, room)
                .with_context(|| format!("reading pages into {}", self.path.display()))?,
            None => self
                .at_end()
                .and_then(|_| crate::sys::splice_all(pipe, self.file.as_raw_fd(), len as usize))
                .with_context(|| format!("splicing pages into {}", self.path.display()))?,
        }
        self.crc
            .combine(&crc32fast::Hasher::new_with_initial_len(crc, len));
        self.len += len;
        Ok(())
    }

    fn take_bytes(&mut self, data: &[u8]) -> Result<()> {
        self.take_checked(data, crc32fast::hash(data))
    }

    fn split(&mut self, _parts: usize) -> Result<Vec<&mut dyn PageSink>> {
        Ok(vec![self])
    }
}

/// The pages image of one task being written: one part file, or more
/// once `split` asks for them. `finish` seals every part.
pub struct PagesWriter {
    dir: PathBuf,
    pid: i32,
    parts: Vec<PartWriter>,
}

impl PagesWriter {
    pub fn create(dir: &ImageDir, pid: i32) -> Result<Self> {
        Ok(Self {
            dir: dir.path.clone(),
            pid,
            parts: vec![PartWriter::create(part_path(&dir.path, pid, 0))?],
        })
    }

    /// A writer whose `parts` files hold the space for `bytes` of stream
    /// already, evenly (the halves `split` is to be asked for). Made before
    /// the tree is frozen: written into fresh tmpfs pages a stream runs at
    /// a third of the speed it has into pages taken ahead
    /// (`PartWriter::reserve`, docs/PERFORMANCE.md). What the stream does
    /// not fill is given back by `finish` (or on drop).
    pub fn reserve(dir: &ImageDir, pid: i32, bytes: u64, parts: usize) -> Result<Self> {
        let in_memory =
            crate::proc::on_fs(&dir.path.to_string_lossy(), nix::sys::statfs::TMPFS_MAGIC);
        Self::reserve_in(dir, pid, bytes, parts, in_memory)
    }

    fn reserve_in(
        dir: &ImageDir,
        pid: i32,
        bytes: u64,
        parts: usize,
        in_memory: bool,
    ) -> Result<Self> {
        let mut w = Self::create(dir, pid)?;
        for k in 1..parts.clamp(1, MAX_PARTS) {
            w.parts.push(PartWriter::create(part_path(&w.dir, pid, k))?);
        }
        let each = (bytes / w.parts.len() as u64).next_multiple_of(1 << 20);
        // One thread per part: tmpfs writes a file under its inode lock.
        std::thread::scope(|s| {
            for p in &mut w.parts {
                s.spawn(move || p.reserve(each, in_memory));
            }
        });
        Ok(w)
    }

    /// Removes the part files of a writer that got no stream (reserved
    /// for a task that exited before the freeze).
    pub fn discard(mut self) -> Result<()> {
        std::mem::take(&mut self.parts)
            .into_iter()
            .try_for_each(PartWriter::remove)
    }

    /// Takes back what was streamed: the part files go, and a fresh first
    /// part begins (with no space reserved).
    pub fn restart(&mut self) -> Result<()> {
        // Every part goes, even past one that fails to.
        let removed: Vec<Result<()>> = std::mem::take(&mut self.parts)
            .into_iter()
            .map(PartWriter::remove)
            .collect();
        removed.into_iter().collect::<Result<()>>()?;
        self.parts
            .push(PartWriter::create(part_path(&self.dir, self.pid, 0))?);
        Ok(())
    }

    /// Bytes of the stream taken so far.
    pub fn len(&self) -> u64 {
        self.parts.iter().map(|p| p.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends bytes whose CRC-32 the caller computed already (a page
    /// server checks each part it receives).
    pub fn take_checked(&mut self, data: &[u8], crc: u32) -> Result<()> {
        self.last().take_checked(data, crc)
    }

    fn last(&mut self) -> &mut PartWriter {
        self.parts.last_mut().expect("a writer has its first part")
    }

    /// Seals every part with its length, checksum and the parts after it,
    /// synced.
    pub fn finish(mut self) -> Result<()> {
        if self.is_empty() {
            // No stream came for the parts reserved.
            self.split(1)?;
        }
        let n = self.parts.len() as u32;
        for (k, p) in self.parts.into_iter().enumerate() {
            p.seal(n - 1 - k as u32)?;
        }
        Ok(())
    }
}

impl PageSink for PagesWriter {
    fn take_pipe(&mut self, pipe: RawFd, len: u64, crc: u32) -> Result<()> {
        self.last().take_pipe(pipe, len, crc)
    }

    fn take_bytes(&mut self, data: &[u8]) -> Result<()> {
        self.last().take_bytes(data)
    }

    fn split(&mut self, parts: usize) -> Result<Vec<&mut dyn PageSink>> {
        if self.is_empty() {
            let want = parts.clamp(1, MAX_PARTS);
            // Parts reserved for a stream that turned out smaller go.
            while self.parts.len() > want {
                self.parts.pop().expect("more parts than wanted").remove()?;
            }
            for k in self.parts.len()..want {
                let p = PartWriter::create(part_path(&self.dir, self.pid, k))?;
                self.parts.push(p);
            }
        }
        let from = if self.is_empty() {
            0
        } else {
            self.parts.len() - 1
        };
        Ok(self.parts[from..]
            .iter_mut()
            .map(|p| p as &mut dyn PageSink)
            .collect())
    }
}

/// One part file of a pages image being read: where its data lies in the
/// stream.
struct PartFile {
    path: PathBuf,
    file: File,
    /// Offset of its first byte in the stream, and its bytes.
    start: u64,
    len: u64,
    /// Parts after it (its header's, written back by `reseal`).
    more: u32,
}

/// A pages image opened for reading (or for `dedup` to punch): every part,
/// its framing checked; the CRC-32 of the whole stream, combined from the
/// parts', which readers check as they consume the data.
pub struct PagesImage {
    parts: Vec<PartFile>,
    len: u64,
    crc: u32,
}

impl PagesImage {
    pub fn open(dir: &ImageDir, pid: i32) -> Result<Self> {
        Self::open_in(&dir.path, pid, false)
    }

    /// Opened for writing too: `punch` and `reseal`.
    pub fn open_writable(dir: &ImageDir, pid: i32) -> Result<Self> {
        Self::open_in(&dir.path, pid, true)
    }

    fn open_in(dir: &Path, pid: i32, write: bool) -> Result<Self> {
        let mut parts: Vec<PartFile> = Vec::new();
        let mut whole = crc32fast::Hasher::new();
        let mut start = 0;
        loop {
            let path = part_path(dir, pid, parts.len());
            let file = OpenOptions::new()
                .read(true)
                .write(write)
                .open(&path)
                .with_context(|| {
                    format!("{}: cannot open; the dump is incomplete", path.display())
                })?;
            let hdr = read_part_header(&path, &file)?;
            if let Some(prev) = parts.last()
                && prev.more != hdr.more + 1
            {
                return Err(ImageError::Truncated(
                    path,
                    format!(
                        "a part of {} stray parts, {} expected",
                        hdr.more,
                        prev.more - 1
                    ),
                )
                .into());
            }
            if hdr.more >= PARTS_LIMIT {
                return Err(ImageError::Truncated(
                    path,
                    format!("{} parts follow it; no dump writes that many", hdr.more),
                )
                .into());
            }
            whole.combine(&crc32fast::Hasher::new_with_initial_len(hdr.crc, hdr.len));
            parts.push(PartFile {
                path,
                file,
                start,
                len: hdr.len,
                more: hdr.more,
            });
            start += hdr.len;
            if hdr.more == 0 {
                break;
            }
        }
        Ok(Self {
            parts,
            len: start,
            crc: whole.finalize(),
        })
    }

    /// Bytes in the stream.
    pub fn len(&self) -> u64 {
        self.len
    }

    #[allow(dead_code)] // beside `len`, as clippy asks of a public type
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// CRC-32 of the whole stream.
    pub fn crc(&self) -> u32 {
        self.crc
    }

    /// The first part's path, which names the image in messages.
    pub fn path(&self) -> &Path {
        &self.parts[0].path
    }

    /// Part files it is stored in.
    pub fn nr_parts(&self) -> usize {
        self.parts.len()
    }

    /// The part holding stream offset `off` (the last one at the end).
    fn part_at(&self, off: u64) -> &PartFile {
        self.parts
            .iter()
            .find(|p| off < p.start + p.len)
            .unwrap_or_else(|| self.parts.last().expect("an image has a part"))
    }

    fn truncated(&self) -> anyhow::Error {
        ImageError::Truncated(self.path().to_owned(), "shorter than its pagemap".into()).into()
    }

    /// Reads `buf.len()` bytes of the stream from `off`.
    pub fn read_exact_at(&self, mut buf: &mut [u8], mut off: u64) -> Result<()> {
        while !buf.is_empty() {
            let p = self.part_at(off);
            let n = ((p.start + p.len).saturating_sub(off) as usize).min(buf.len());
            if n == 0 {
                return Err(self.truncated());
            }
            p.file
                .read_exact_at(&mut buf[..n], PAGES_HEADER_LEN + off - p.start)
                .map_err(|_| self.truncated())?;
            buf = &mut buf[n..];
            off += n as u64;
        }
        Ok(())
    }

    /// Reads the stream from `off` into `bufs`, up to the end of the part
    /// holding `off` (the caller goes on for the rest); 0 at the end.
    pub fn preadv(&self, bufs: &mut [IoSliceMut], off: u64) -> Result<usize> {
        let p = self.part_at(off);
        let room = (p.start + p.len).saturating_sub(off) as usize;
        if room == 0 {
            return Ok(0);
        }
        // Trim the buffers to the part's end: a short read is the caller's
        // to continue from the next part.
        let mut left = room;
        let mut trimmed: Vec<IoSliceMut> = Vec::with_capacity(bufs.len());
        for b in bufs.iter_mut() {
            if left == 0 {
                break;
            }
            let n = b.len().min(left);
            trimmed.push(IoSliceMut::new(&mut b[..n]));
            left -= n;
        }
        nix::sys::uio::preadv(
            &p.file,
            &mut trimmed,
            (PAGES_HEADER_LEN + off - p.start) as i64,
        )
        .with_context(|| format!("reading {}", p.path.display()))
    }

    /// Maps the whole stream, read-only, at one address: each part's data
    /// mapped in place (`flags`: MAP_SHARED or MAP_PRIVATE, with
    /// MAP_POPULATE if wanted).
    pub fn map(&self, flags: i32) -> Result<Mapping> {
        if self.len == 0 {
            return Ok(Mapping { addr: 0, len: 0 });
        }
        // SAFETY: a fresh reservation, owned by the Mapping returned.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                self.len as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            bail!(
                "mapping {}: {}",
                self.path().display(),
                std::io::Error::last_os_error()
            );
        }
        let m = Mapping {
            addr: base as u64,
            len: self.len,
        };
        for p in self.parts.iter().filter(|p| p.len > 0) {
            // SAFETY: replaces a piece of the reservation just made, which
            // only `m` owns; the part's file holds `len` bytes of data after
            // its header page (checked at open).
            let r = unsafe {
                libc::mmap(
                    (m.addr + p.start) as *mut _,
                    p.len as usize,
                    libc::PROT_READ,
                    flags | libc::MAP_FIXED,
                    p.file.as_raw_fd(),
                    PAGES_HEADER_LEN as i64,
                )
            };
            if r == libc::MAP_FAILED {
                bail!(
                    "mapping {}: {}",
                    p.path.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
        Ok(m)
    }

    /// Punches `[off, off+len)` of the stream out of its parts (they read
    /// as zeros; `reseal` then fixes the checksums).
    pub fn punch(&self, mut off: u64, len: u64) -> Result<()> {
        let end = off + len;
        while off < end {
            let p = self.part_at(off);
            let n = (p.start + p.len).min(end).saturating_sub(off);
            if n == 0 {
                return Err(self.truncated());
            }
            if let Err(e) = punch_hole(&p.file, PAGES_HEADER_LEN + off - p.start, n) {
                bail!(
                    "punching a hole in {}: {e}; its file system may not support holes",
                    p.path.display(),
                );
            }
            off += n;
        }
        Ok(())
    }

    /// Recomputes each part's checksum after `punch` and writes it, synced.
    pub fn reseal(&self) -> Result<()> {
        for p in &self.parts {
            let crc = crc_of_file_range(&p.file, PAGES_HEADER_LEN, p.len)
                .with_context(|| format!("reading {}", p.path.display()))?;
            p.file
                .write_all_at(&part_header(p.len, crc, p.more), 0)
                .and_then(|_| p.file.sync_data())
                .with_context(|| format!("writing {}", p.path.display()))?;
        }
        Ok(())
    }
}

/// Reads and checks the header of one part file, and that the file holds
/// the data it announces.
fn read_part_header(path: &Path, f: &File) -> Result<Header> {
    let mut h = [0u8; HEADER_LEN];
    f.read_exact_at(&mut h, 0)
        .map_err(|_| ImageError::Truncated(path.to_owned(), "no whole header".into()))?;
    let hdr = parse_header(path, &h)?;
    if hdr.kind != ImageKind::Pages {
        return Err(ImageError::WrongKind(path.to_owned(), hdr.kind, ImageKind::Pages).into());
    }
    let size = f.metadata()?.len();
    if size != PAGES_HEADER_LEN + hdr.len {
        return Err(ImageError::Truncated(
            path.to_owned(),
            format!(
                "{size} bytes, the header says {}",
                PAGES_HEADER_LEN + hdr.len
            ),
        )
        .into());
    }
    Ok(hdr)
}

/// Verifies one part file's framing and whole checksum (used by `show`,
/// which lists every file).
pub fn verify_pages_file(path: &Path) -> Result<Header> {
    let f = File::open(path)?;
    let hdr = read_part_header(path, &f)?;
    if crc_of_file_range(&f, PAGES_HEADER_LEN, hdr.len)? != hdr.crc {
        return Err(ImageError::Checksum(path.to_owned()).into());
    }
    Ok(hdr)
}

/// The stream of a `PagesImage`, mapped at one address (or a part's
/// reserved space: `Window`); unmapped on drop.
pub struct Mapping {
    pub addr: u64,
    pub len: u64,
}

impl Mapping {
    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `len` readable bytes mapped at `addr` for as long as self lives.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len as usize) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the mapping made by `PagesImage::map` or
            // `Window::map`, used by nothing else once its owner is dropped.
            unsafe { libc::munmap(self.addr as *mut _, self.len as usize) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn scratch(name: &str) -> ImageDir {
        let p =
            std::env::temp_dir().join(format!("crust-unit-pages-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        ImageDir::create(&p).unwrap()
    }

    fn data(pages: u32) -> Vec<u8> {
        (0..pages * 4096)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect()
    }

    #[test]
    fn pages_writer_checksums_what_it_wrote() {
        let d = scratch("one");
        let mut w = PagesWriter::create(&d, 9).unwrap();
        let data = data(5);
        w.take_bytes(&data[..4096]).unwrap();
        // Two pages through a pipe, with the checksum its filler computed.
        let (rd, wr) = nix::unistd::pipe().unwrap();
        let mid = &data[4096..3 * 4096];
        nix::unistd::write(&wr, mid).unwrap();
        w.take_pipe(rd.as_raw_fd(), mid.len() as u64, crc32fast::hash(mid))
            .unwrap();
        w.take_bytes(&data[3 * 4096..]).unwrap();
        w.finish().unwrap();
        let hdr = verify_pages_file(&d.file(ImageKind::Pages, 9)).unwrap();
        assert_eq!(hdr.len, data.len() as u64);
        assert_eq!(hdr.crc, crc32fast::hash(&data));
        let img = PagesImage::open(&d, 9).unwrap();
        assert_eq!((img.len(), img.crc()), (hdr.len, hdr.crc));
        // A flipped data byte fails the full check.
        let f = OpenOptions::new()
            .write(true)
            .open(d.file(ImageKind::Pages, 9))
            .unwrap();
        f.write_all_at(&[0xff], PAGES_HEADER_LEN + 100).unwrap();
        assert!(verify_pages_file(&d.file(ImageKind::Pages, 9)).is_err());
        std::fs::remove_dir_all(&d.path).unwrap();
    }

    #[test]
    fn a_stream_in_two_parts_reads_as_one() {
        let d = scratch("two");
        let data = data(7);
        let mut w = PagesWriter::create(&d, 5).unwrap();
        {
            let mut parts = w.split(2).unwrap();
            assert_eq!(parts.len(), 2);
            // The back part is written first: the parts are independent.
            parts[1].take_bytes(&data[3 * 4096..]).unwrap();
            parts[0].take_bytes(&data[..3 * 4096]).unwrap();
        }
        w.finish().unwrap();
        assert!(part_path(&d.path, 5, 1).exists());
        let img = PagesImage::open(&d, 5).unwrap();
        assert_eq!(img.len(), data.len() as u64);
        assert_eq!(img.crc(), crc32fast::hash(&data));
        assert_eq!(img.nr_parts(), 2);
        // Across the boundary, by pread and by preadv.
        let mut b = vec![0u8; 2 * 4096];
        img.read_exact_at(&mut b, 2 * 4096).unwrap();
        assert_eq!(b, data[2 * 4096..4 * 4096]);
        let mut b = vec![0u8; 2 * 4096];
        let n = img
            .preadv(&mut [IoSliceMut::new(&mut b)], 2 * 4096)
            .unwrap();
        assert_eq!(n, 4096, "a preadv stops at its part's end");
        let m = img.map(libc::MAP_SHARED).unwrap();
        assert_eq!(m.bytes(), &data[..]);
        drop(m);
        // Punched pages read as zeros, and the image checks again after
        // the reseal.
        let img = PagesImage::open_writable(&d, 5).unwrap();
        img.punch(2 * 4096, 2 * 4096).unwrap();
        img.reseal().unwrap();
        let img = PagesImage::open(&d, 5).unwrap();
        let mut want = data.clone();
        want[2 * 4096..4 * 4096].fill(0);
        assert_eq!(img.crc(), crc32fast::hash(&want));
        // Without its second part the image is incomplete, and says so.
        std::fs::remove_file(part_path(&d.path, 5, 1)).unwrap();
        let e = PagesImage::open(&d, 5).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("part2"), "{e}");
        std::fs::remove_dir_all(&d.path).unwrap();
    }

    /// (Size, bytes allocated) of a file.
    fn size_and_allocated(path: &Path) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).unwrap();
        (m.len(), m.blocks() * 512)
    }

    #[test]
    fn reserved_space_not_written_is_given_back() {
        // Both ways of reserving: zeros written (in memory) and fallocate.
        for in_memory in [true, false] {
            let d = scratch(&format!("reserved-{in_memory}"));
            let data = data(300);
            // Two parts of 2 MiB each reserved; 300 pages come.
            let mut w = PagesWriter::reserve_in(&d, 4, 4 << 20, 2, in_memory).unwrap();
            let p2 = part_path(&d.path, 4, 1);
            assert!(
                size_and_allocated(&p2).1 >= 2 << 20,
                "{in_memory}: part 2 reserved"
            );
            {
                let mut parts = w.split(2).unwrap();
                parts[0].take_bytes(&data[..100 * 4096]).unwrap();
                parts[1].take_bytes(&data[100 * 4096..]).unwrap();
            }
            w.finish().unwrap();
            let img = PagesImage::open(&d, 4).unwrap();
            assert_eq!(img.crc(), crc32fast::hash(&data), "{in_memory}");
            assert_eq!(img.map(libc::MAP_SHARED).unwrap().bytes(), &data[..]);
            for (k, pages) in [(0, 100u64), (1, 200)] {
                let (size, allocated) = size_and_allocated(&part_path(&d.path, 4, k));
                assert_eq!(
                    size,
                    PAGES_HEADER_LEN + pages * 4096,
                    "{in_memory}: part {k}"
                );
                assert!(
                    allocated <= size,
                    "{in_memory}: part {k} keeps {allocated} bytes"
                );
            }

            // A stream smaller than a split: the second part goes.
            let mut w = PagesWriter::reserve_in(&d, 5, 4 << 20, 2, in_memory).unwrap();
            assert_eq!(w.split(1).unwrap().len(), 1);
            w.take_bytes(&data[..4096]).unwrap();
            w.finish().unwrap();
            assert!(!part_path(&d.path, 5, 1).exists(), "{in_memory}");
            assert_eq!(PagesImage::open(&d, 5).unwrap().len(), 4096);

            // No stream at all: one empty part. A dump that fails keeps no
            // space it did not write.
            PagesWriter::reserve_in(&d, 6, 4 << 20, 2, in_memory)
                .unwrap()
                .finish()
                .unwrap();
            assert!(!part_path(&d.path, 6, 1).exists(), "{in_memory}");
            assert_eq!(PagesImage::open(&d, 6).unwrap().len(), 0);
            let mut w = PagesWriter::reserve_in(&d, 7, 4 << 20, 1, in_memory).unwrap();
            w.take_bytes(&data[..4096]).unwrap();
            drop(w);
            let p7 = part_path(&d.path, 7, 0);
            let (size, allocated) = size_and_allocated(&p7);
            assert_eq!(size, PAGES_HEADER_LEN + 4096, "{in_memory}");
            assert!(allocated <= size, "{in_memory}: {allocated} bytes kept");
            // Reserved for a task that exited before the freeze: its files go.
            PagesWriter::reserve_in(&d, 8, 4 << 20, 2, in_memory)
                .unwrap()
                .discard()
                .unwrap();
            assert!(!part_path(&d.path, 8, 0).exists() && !part_path(&d.path, 8, 1).exists());
            // Unsealed, it is refused, and the next dump into the
            // directory takes it for an older image to remove.
            assert!(PagesImage::open(&d, 7).is_err(), "{in_memory}");
            ImageDir::create(&d.path).unwrap();
            assert!(!p7.exists(), "{in_memory}");
            std::fs::remove_dir_all(&d.path).unwrap();
        }
    }

    /// Reserved in memory, the space is mapped and pipes are read into it
    /// (`Window`); a stream longer than the reservation goes on in the
    /// file, and `restart` begins it again.
    #[test]
    fn a_stream_past_its_mapped_reservation_goes_on_in_the_file() {
        let d = scratch("window");
        let data = data(300);
        let (rd, wr) = nix::unistd::pipe().unwrap();
        let put = |w: &mut PagesWriter, piece: &[u8]| {
            nix::unistd::write(&wr, piece).unwrap();
            w.take_pipe(rd.as_raw_fd(), piece.len() as u64, crc32fast::hash(piece))
                .unwrap();
        };
        // 1 MiB (256 pages) reserved, 300 pages come.
        let mut w = PagesWriter::reserve_in(&d, 3, 1 << 20, 1, true).unwrap();
        assert!(w.parts[0].window.is_some());
        put(&mut w, &data[..3 * 4096]);
        w.take_bytes(&data[3 * 4096..250 * 4096]).unwrap();
        // Across the reservation's end.
        put(&mut w, &data[250 * 4096..260 * 4096]);
        w.take_bytes(&data[260 * 4096..]).unwrap();
        w.finish().unwrap();
        let img = PagesImage::open(&d, 3).unwrap();
        assert_eq!(img.crc(), crc32fast::hash(&data));
        assert_eq!(img.map(libc::MAP_SHARED).unwrap().bytes(), &data[..]);

        let mut w = PagesWriter::reserve_in(&d, 4, 1 << 20, 1, true).unwrap();
        put(&mut w, &data[..2 * 4096]);
        w.restart().unwrap();
        put(&mut w, &data[2 * 4096..5 * 4096]);
        w.finish().unwrap();
        let img = PagesImage::open(&d, 4).unwrap();
        assert_eq!(
            img.map(libc::MAP_SHARED).unwrap().bytes(),
            &data[2 * 4096..5 * 4096]
        );
        std::fs::remove_dir_all(&d.path).unwrap();
    }

    #[test]
    fn a_small_or_started_stream_stays_in_one_part() {
        let d = scratch("started");
        let mut w = PagesWriter::create(&d, 6).unwrap();
        w.take_bytes(&data(1)).unwrap();
        assert_eq!(w.split(2).unwrap().len(), 1);
        w.finish().unwrap();
        assert!(!part_path(&d.path, 6, 1).exists());
        assert_eq!(PagesImage::open(&d, 6).unwrap().nr_parts(), 1);
        std::fs::remove_dir_all(&d.path).unwrap();
    }
}

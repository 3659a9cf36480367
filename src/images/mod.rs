//! The images directory: protobuf messages and raw page data, each file
//! framed by a header with a magic, the format version, the payload length
//! and a CRC32 of the payload, verified on every read.
//!
//! Layout of a directory for a dump of task tree rooted at PID:
//! `core-PID.img`, `mm-PID.img`, `files-PID.img`, `pages-PID.img` (and
//! `pages-PID.part2.img` for a big task: `pages.rs`) per task, and
//! `inventory.img`, written last.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost::Message;

pub mod chain;
mod pages;

pub use pages::{
    MAX_PARTS, Mapping, PageSink, PagesImage, PagesWriter, unmap_sealed, verify_pages_file,
};

#[allow(clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/crust.images.rs"));
}

/// Bumped on every incompatible change of a schema or of the framing.
pub const FORMAT_VERSION: u32 = 4;
pub const HEADER_LEN: usize = 24;
/// The pages file keeps its data page-aligned.
pub const PAGES_HEADER_LEN: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    Inventory,
    Core,
    Mm,
    Files,
    Pages,
    /// ghosts.img: the files without a name the tree holds.
    Ghosts,
    /// ghost-ID.img: one such file's data (raw, its extents one after the other).
    GhostData,
}

impl ImageKind {
    pub const ALL: [ImageKind; 7] = [
        Self::Inventory,
        Self::Core,
        Self::Mm,
        Self::Files,
        Self::Pages,
        Self::Ghosts,
        Self::GhostData,
    ];

    pub fn magic(self) -> u32 {
        match self {
            Self::Inventory => 0x4352_5349, // "CRSI"
            Self::Core => 0x4352_5343,      // "CRSC"
            Self::Mm => 0x4352_534d,        // "CRSM"
            Self::Files => 0x4352_5346,     // "CRSF"
            Self::Pages => 0x4352_5350,     // "CRSP"
            Self::Ghosts => 0x4352_5347,    // "CRSG"
            Self::GhostData => 0x4352_5344, // "CRSD"
        }
    }

    pub fn file_name(self, pid: i32) -> String {
        match self {
            Self::Inventory => "inventory.img".into(),
            Self::Core => format!("core-{pid}.img"),
            Self::Mm => format!("mm-{pid}.img"),
            Self::Files => format!("files-{pid}.img"),
            Self::Pages => format!("pages-{pid}.img"),
            Self::Ghosts => "ghosts.img".into(),
            Self::GhostData => format!("ghost-{pid}.img"),
        }
    }

    pub fn from_magic(magic: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.magic() == magic)
    }
}

fn header(kind: ImageKind, len: u64, crc: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&kind.magic().to_le_bytes());
    h[4..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&len.to_le_bytes());
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What is wrong with an image or an images directory.
#[derive(Debug)]
pub enum ImageError {
    /// -D names no directory (bad input, not a bad image).
    NoDirectory(PathBuf),
    /// The directory holds no finished dump.
    Unfinished(PathBuf),
    /// The file is no crust image at all.
    NotAnImage(PathBuf),
    Truncated(PathBuf, String),
    Version(PathBuf, u32),
    WrongKind(PathBuf, ImageKind, ImageKind),
    Checksum(PathBuf),
    Undecodable(PathBuf, String),
}

impl std::fmt::Display for ImageError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Self::NoDirectory(p) => write!(
                f,
                "images directory {} does not exist; pass the -D used for the dump",
                p.display()
            ),
            Self::Unfinished(p) => write!(
                f,
                "{} has no inventory.img: it is empty or holds an unfinished dump; dump again",
                p.display()
            ),
            Self::NotAnImage(p) => write!(
                f,
                "{} is not a crust image; point -D at a crust images directory",
                p.display()
            ),
            Self::Truncated(p, why) => {
                write!(
                    f,
                    "{}: {why}; the dump is incomplete, take it again",
                    p.display()
                )
            }
            Self::Version(p, v) => write!(
                f,
                "{}: image format version {v}, this crust reads version {FORMAT_VERSION}; restore with the crust that dumped it",
                p.display()
            ),
            Self::WrongKind(p, found, want) => write!(
                f,
                "{}: holds a {found:?} image, expected {want:?}",
                p.display()
            ),
            Self::Checksum(p) => write!(
                f,
                "{}: checksum mismatch, the image is corrupt; dump again",
                p.display()
            ),
            Self::Undecodable(p, why) => {
                write!(f, "{}: corrupt image, cannot decode ({why})", p.display())
            }
        }
    }
}

impl std::error::Error for ImageError {}

impl ImageError {
    pub fn class(&self) -> crate::error::Class {
        match self {
            Self::NoDirectory(_) => crate::error::Class::Refused,
            _ => crate::error::Class::Images,
        }
    }
}

#[derive(Debug)]
pub struct Header {
    pub kind: ImageKind,
    pub len: u64,
    pub crc: u32,
    /// Pages images: how many part files follow this one (`pages.rs`).
    pub more: u32,
}

/// Whether a file name is a log or pidfile crust (or a script around it)
/// keeps beside the images: NAME.log, NAME.log.PID with --log-pid, NAME.pid.
fn is_log_name(name: &str) -> bool {
    name.ends_with(".log")
        || name.ends_with(".pid")
        || name
            .rsplit_once(".log.")
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether the file starts with the magic of a crust image.
fn is_image(path: &Path) -> bool {
    let mut m = [0u8; 4];
    File::open(path).is_ok_and(|f| f.read_exact_at(&mut m, 0).is_ok())
        && ImageKind::from_magic(u32::from_le_bytes(m)).is_some()
}

/// Checks the framing of a file's first bytes; errors name the file.
pub fn parse_header(path: &Path, h: &[u8]) -> Result<Header> {
    // The magic first: a file that is no image at all says so, whatever
    // its length.
    let magic = h
        .get(0..4)
        .map(|m| u32::from_le_bytes(m.try_into().unwrap()));
    let Some(kind) = magic.and_then(ImageKind::from_magic) else {
        return Err(ImageError::NotAnImage(path.to_owned()).into());
    };
    if h.len() < HEADER_LEN {
        return Err(ImageError::Truncated(path.to_owned(), "no whole header".into()).into());
    }
    let version = u32::from_le_bytes(h[4..8].try_into().unwrap());
    if version != FORMAT_VERSION {
        return Err(ImageError::Version(path.to_owned(), version).into());
    }
    Ok(Header {
        kind,
        len: u64::from_le_bytes(h[8..16].try_into().unwrap()),
        crc: u32::from_le_bytes(h[16..20].try_into().unwrap()),
        more: u32::from_le_bytes(h[20..24].try_into().unwrap()),
    })
}

/// An images directory, either being written by a dump or read by a restore.
pub struct ImageDir {
    pub path: PathBuf,
}

impl ImageDir {
    /// Creates a directory for a new dump, or takes over one that holds an
    /// older dump: its images are removed first (the inventory before the
    /// rest, so that a dump failing half-way never looks whole), and no
    /// stale image is left beside the new ones. A directory holding
    /// anything else than crust images and logs is refused: the dump will
    /// not write into someone's files.
    pub fn create(path: &Path) -> Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .with_context(|| format!("creating images directory {}", path.display()))?;
        let mut old_images = Vec::new();
        for e in fs::read_dir(path)
            .with_context(|| format!("listing images directory {}", path.display()))?
        {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let p = e.path();
            if is_log_name(&name) {
                continue;
            }
            // An older dump's link to its parent, and the socket its write
            // tracker's holder waited at: they go with its images.
            if name == chain::PARENT_LINK && e.file_type()?.is_symlink() {
                old_images.push(p);
                continue;
            }
            if name == crate::resources::memtrack::SOCKET && e.file_type()?.is_socket() {
                crate::resources::memtrack::release_holder(&p);
                old_images.push(p);
                continue;
            }
            if e.file_type()?.is_file() && is_image(&p) {
                old_images.push(p);
                continue;
            }
            crate::refuse!(
                "images directory {} holds {name}, which is no crust image; dump into a new or empty directory, or one holding an older dump",
                path.display()
            );
        }
        // The inventory first: until the new one is written, the directory
        // holds no whole dump.
        old_images.sort_by_key(|p| !p.ends_with(ImageKind::Inventory.file_name(0)));
        for p in old_images {
            match fs::remove_file(&p) {
                // A tracker's holder removes its socket as it ends.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                r => r.with_context(|| format!("removing old {}", p.display()))?,
            }
        }
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting mode 0700 on {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// Opens a directory holding a finished dump.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_dir() {
            return Err(ImageError::NoDirectory(path.to_owned()).into());
        }
        let inv = path.join(ImageKind::Inventory.file_name(0));
        if !inv.exists() {
            return Err(ImageError::Unfinished(path.to_owned()).into());
        }
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// Makes the directory's entries durable (each file is synced as it is
    /// written): after this, a power cut loses nothing of the dump.
    pub fn sync(&self) -> Result<()> {
        File::open(&self.path)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing images directory {}", self.path.display()))
    }

    pub fn file(&self, kind: ImageKind, pid: i32) -> PathBuf {
        self.path.join(kind.file_name(pid))
    }

    pub fn create_file(&self, kind: ImageKind, pid: i32) -> Result<(PathBuf, File)> {
        let p = self.file(kind, pid);
        let f = OpenOptions::new()
            .write(true)
            .read(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&p)
            .with_context(|| format!("creating {}", p.display()))?;
        Ok((p, f))
    }

    pub fn write_msg<M: Message>(&self, kind: ImageKind, pid: i32, msg: &M) -> Result<()> {
        let payload = msg.encode_to_vec();
        let (p, mut f) = self.create_file(kind, pid)?;
        f.write_all(&header(
            kind,
            payload.len() as u64,
            crc32fast::hash(&payload),
        ))
        .and_then(|_| f.write_all(&payload))
        .and_then(|_| f.sync_data())
        .with_context(|| format!("writing {}", p.display()))?;
        Ok(())
    }

    pub fn read_msg<M: Message + Default>(&self, kind: ImageKind, pid: i32) -> Result<M> {
        read_msg_file(&self.file(kind, pid), Some(kind))
    }
}

/// Reads one framed protobuf image, verifying magic, version, length and CRC.
pub fn read_msg_file<M: Message + Default>(path: &Path, want: Option<ImageKind>) -> Result<M> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .map_err(|e| ImageError::Truncated(path.to_owned(), format!("cannot read it ({e})")))?;
    let h = parse_header(path, &buf)?;
    if let Some(k) = want
        && h.kind != k
    {
        return Err(ImageError::WrongKind(path.to_owned(), h.kind, k).into());
    }
    let payload = &buf[HEADER_LEN..];
    if payload.len() as u64 != h.len {
        return Err(ImageError::Truncated(
            path.to_owned(),
            format!("{} payload bytes, the header says {}", payload.len(), h.len),
        )
        .into());
    }
    if crc32fast::hash(payload) != h.crc {
        return Err(ImageError::Checksum(path.to_owned()).into());
    }
    M::decode(payload).map_err(|e| ImageError::Undecodable(path.to_owned(), e.to_string()).into())
}

/// A raw image written in one go by a copy loop: header, then the data,
/// checksummed as it goes.
pub struct RawWriter {
    path: PathBuf,
    file: File,
    len: u64,
    crc: crc32fast::Hasher,
    kind: ImageKind,
}

impl RawWriter {
    pub fn create(dir: &ImageDir, kind: ImageKind, id: i32) -> Result<Self> {
        let (path, file) = dir.create_file(kind, id)?;
        // A header of no data until `finish`: a dump that dies before it
        // leaves a file still known for an image, which `ImageDir::create`
        // removes. (Without an inventory no restore reads it.)
        file.write_all_at(&header(kind, 0, 0), 0)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(RawWriter {
            path,
            file,
            len: 0,
            crc: crc32fast::Hasher::new(),
            kind,
        })
    }

    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, HEADER_LEN as u64 + self.len)
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.crc.update(data);
        self.len += data.len() as u64;
        Ok(())
    }

    /// Seals the header and syncs the file.
    pub fn finish(self) -> Result<()> {
        let h = header(self.kind, self.len, self.crc.finalize());
        self.file
            .write_all_at(&h, 0)
            .and_then(|_| self.file.sync_data())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Reads a raw image through `RawReader`: its framing is checked on open,
/// its checksum once the reader has consumed all of it.
pub struct RawReader {
    path: PathBuf,
    file: File,
    at: u64,
    hdr: Header,
    crc: crc32fast::Hasher,
}

impl RawReader {
    pub fn open(dir: &ImageDir, kind: ImageKind, id: i32) -> Result<Self> {
        let path = dir.file(kind, id);
        let file = File::open(&path)
            .with_context(|| format!("{}: cannot open; the dump is incomplete", path.display()))?;
        let mut h = [0u8; HEADER_LEN];
        file.read_exact_at(&mut h, 0)
            .map_err(|_| ImageError::Truncated(path.clone(), "no whole header".into()))?;
        let hdr = parse_header(&path, &h)?;
        if hdr.kind != kind || file.metadata()?.len() != HEADER_LEN as u64 + hdr.len {
            return Err(ImageError::Truncated(path, format!("not a whole {kind:?} image")).into());
        }
        Ok(RawReader {
            path,
            file,
            at: 0,
            hdr,
            crc: crc32fast::Hasher::new(),
        })
    }

    /// Fills `buf` with the next bytes.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, HEADER_LEN as u64 + self.at)
            .with_context(|| format!("{}: truncated", self.path.display()))?;
        self.crc.update(buf);
        self.at += buf.len() as u64;
        Ok(())
    }

    /// Checks that everything was read and matches the checksum.
    pub fn finish(self) -> Result<()> {
        if self.at != self.hdr.len || self.crc.finalize() != self.hdr.crc {
            return Err(ImageError::Checksum(self.path).into());
        }
        Ok(())
    }
}

fn crc_of_file_range(f: &File, off: u64, len: u64) -> std::io::Result<u32> {
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], off + done)?;
        h.update(&buf[..n]);
        done += n as u64;
    }
    Ok(h.finalize())
}

/// Verifies a whole raw image's framing and checksum (used by `show`).
pub fn verify_raw_file(path: &Path, kind: ImageKind) -> Result<Header> {
    let f = File::open(path)?;
    let mut h = [0u8; HEADER_LEN];
    f.read_exact_at(&mut h, 0)
        .map_err(|_| ImageError::Truncated(path.to_owned(), "no whole header".into()))?;
    let hdr = parse_header(path, &h)?;
    if hdr.kind != kind || f.metadata()?.len() != HEADER_LEN as u64 + hdr.len {
        return Err(ImageError::Truncated(path.to_owned(), "truncated or padded".into()).into());
    }
    if crc_of_file_range(&f, HEADER_LEN as u64, hdr.len)? != hdr.crc {
        return Err(ImageError::Checksum(path.to_owned()).into());
    }
    Ok(hdr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::pb::TaskRef;

    fn scratch(name: &str) -> ImageDir {
        let p =
            std::env::temp_dir().join(format!("crust-unit-images-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        ImageDir::create(&p).unwrap()
    }

    fn sample() -> Inventory {
        Inventory {
            format_version: FORMAT_VERSION,
            root_pid: 77,
            tasks: vec![TaskRef {
                pid: 77,
                ppid: 1,
                pgid: 77,
                sid: 77,
                ..Default::default()
            }],
            crust_version: "test".into(),
            ..Default::default()
        }
    }
    use crate::images::pb::Inventory;

    #[test]
    fn header_round_trip() {
        let h = header(ImageKind::Mm, 1234, 0xdead_beef);
        let p = Path::new("mm-1.img");
        let got = parse_header(p, &h).unwrap();
        assert_eq!(got.kind, ImageKind::Mm);
        assert_eq!((got.len, got.crc), (1234, 0xdead_beef));
    }

    #[test]
    fn header_refusals_name_the_file() {
        let p = Path::new("/x/core-5.img");
        // A text file is no image, whatever its length.
        let e = parse_header(p, b"short").unwrap_err().to_string();
        assert!(
            e.contains("/x/core-5.img") && e.contains("not a crust image"),
            "{e}"
        );
        let e = parse_header(p, &header(ImageKind::Core, 0, 0)[..10])
            .unwrap_err()
            .to_string();
        assert!(e.contains("incomplete"), "{e}");
        let mut h = header(ImageKind::Core, 0, 0);
        h[0] ^= 0xff;
        let e = parse_header(p, &h).unwrap_err().to_string();
        assert!(e.contains("not a crust image"), "{e}");
        let mut h = header(ImageKind::Core, 0, 0);
        h[4..8].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let e = parse_header(p, &h).unwrap_err().to_string();
        assert!(e.contains("format version"), "{e}");
    }

    #[test]
    fn message_round_trip_and_mode() {
        let d = scratch("roundtrip");
        d.write_msg(ImageKind::Inventory, 0, &sample()).unwrap();
        let back: Inventory = d.read_msg(ImageKind::Inventory, 0).unwrap();
        assert_eq!(back, sample());
        let md = fs::metadata(d.file(ImageKind::Inventory, 0)).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(&d.path).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // Read as another kind: refused.
        let e = d
            .read_msg::<Inventory>(ImageKind::Core, 0)
            .map(|_| ())
            .unwrap_err();
        assert!(format!("{e:#}").contains("core-0.img"));
        fs::remove_dir_all(&d.path).unwrap();
    }

    #[test]
    fn corruption_is_caught() {
        let d = scratch("corrupt");
        d.write_msg(ImageKind::Inventory, 0, &sample()).unwrap();
        let f = d.file(ImageKind::Inventory, 0);
        let good = fs::read(&f).unwrap();
        // One flipped payload bit: the checksum catches it.
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 1;
        fs::write(&f, &bad).unwrap();
        let e = d
            .read_msg::<Inventory>(ImageKind::Inventory, 0)
            .unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        // Cut short: the length catches it.
        fs::write(&f, &good[..good.len() - 1]).unwrap();
        let e = d
            .read_msg::<Inventory>(ImageKind::Inventory, 0)
            .unwrap_err();
        assert!(e.to_string().contains("incomplete"), "{e}");
        assert_eq!(crate::error::class_of(&e), crate::error::Class::Images);
        fs::remove_dir_all(&d.path).unwrap();
    }

    #[test]
    fn a_new_dump_replaces_an_old_one_whole() {
        let d = scratch("replace");
        d.write_msg(ImageKind::Inventory, 0, &sample()).unwrap();
        d.write_msg(ImageKind::Core, 4321, &sample()).unwrap();
        // A raw image its dump did not finish (crust killed): still an
        // image to remove, not someone's file.
        let mut raw = RawWriter::create(&d, ImageKind::GhostData, 3).unwrap();
        raw.write(b"half of it").unwrap();
        drop(raw);
        fs::write(d.path.join("dump.log"), "old log").unwrap();
        fs::write(d.path.join("dump.log.77"), "old log").unwrap();
        let again = ImageDir::create(&d.path).unwrap();
        let left: Vec<String> = fs::read_dir(&again.path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!left.iter().any(|n| n.ends_with(".img")), "{left:?}");
        assert_eq!(left.len(), 2, "{left:?}");
        fs::write(d.path.join("notes.txt"), "mine").unwrap();
        let e = ImageDir::create(&d.path).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("notes.txt"), "{e}");
        assert_eq!(crate::error::class_of(&e), crate::error::Class::Refused);
        assert!(d.path.join("notes.txt").exists());
        fs::remove_dir_all(&d.path).unwrap();
    }
}

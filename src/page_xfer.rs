//! Pages over the network: the page server (`crust page-server`), the
//! sending side a dump writes its pages through (`--page-server`), and the
//! one interface the page pipeline writes to, local or remote (`PageDest`).
//!
//! The stream is a framed protocol of crust's own (docs/PAGE-SERVER.md).
//! Every frame starts with a 32-byte header: magic, opcode, task id, CRC-32
//! of the payload, payload length, and a CRC-32 of the header itself, so a
//! corrupt or foreign stream is caught at its first frame. A session is
//! HELLO (both ways: the server answers when it is ready), then per task
//! OPEN, PAGES (runs of the task's page stream with their CRC-32, as the
//! parasite computed it) and CLOSE (the task's total length and CRC-32),
//! and END, which the server answers with ACK once every pages image is
//! sealed and fsynced: only then does the dump go on to kill the tree.
//! Either side that finds something wrong says why in one line and ends
//! the connection; the server then removes the images it wrote, so its
//! directory never holds half a dump.
//!
//! With `--tls` the same frames travel in TLS 1.3 (rustls, ring provider),
//! both sides presenting a certificate the other checks against the CA of
//! `--tls-cacert`: a page stream is all of the process's secrets
//! (`crate::tls`, shared with lazy migration's page stream).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::images::{ImageDir, PageSink, PagesWriter};
use crate::tls::Stream;
pub use crate::tls::TlsArgs;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the dump waits for the server to take more bytes, or to
/// answer (its answer to END includes fsyncing every pages image).
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the server waits for the next bytes of a connected dump: the
/// dump sends nothing while it reads a task's other state (fd tables of
/// many files, a network lock), so this is generous.
const RECV_TIMEOUT: Duration = Duration::from_secs(120);

const MAGIC: u32 = 0x4352_5058; // "CRPX"
/// Bumped on every incompatible change of the frames.
const VERSION: u64 = 1;
const FRAME_LEN: usize = 32;
/// The most one PAGES frame carries: a page pipe's worth is far below it.
const MAX_PAGES_FRAME: u64 = 1 << 30;
/// The longest text of a REFUSE frame.
const MAX_TEXT: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum Op {
    Hello = 1,
    Open = 2,
    Pages = 3,
    Close = 4,
    End = 5,
    Ack = 6,
    /// The sender gives up; the payload says why.
    Refuse = 7,
}

impl Op {
    fn from_u32(v: u32) -> Option<Op> {
        Some(match v {
            1 => Op::Hello,
            2 => Op::Open,
            3 => Op::Pages,
            4 => Op::Close,
            5 => Op::End,
            6 => Op::Ack,
            7 => Op::Refuse,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Frame {
    op: Op,
    /// The task (PID) the frame is about; 0 for the session's frames.
    id: i32,
    /// CRC-32 of the payload (PAGES, REFUSE), or of the task's whole page
    /// stream (CLOSE).
    crc: u32,
    /// Payload length (PAGES, REFUSE), the task's total bytes (CLOSE), the
    /// protocol version (HELLO), the bytes received (ACK).
    len: u64,
}

impl Frame {
    fn new(op: Op, id: i32, len: u64, crc: u32) -> Frame {
        Frame { op, id, crc, len }
    }

    fn encode(&self) -> [u8; FRAME_LEN] {
        let mut b = [0u8; FRAME_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&(self.op as u32).to_le_bytes());
        b[8..12].copy_from_slice(&self.id.to_le_bytes());
        b[12..16].copy_from_slice(&self.crc.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        let h = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&h.to_le_bytes());
        b
    }

    fn decode(b: &[u8; FRAME_LEN]) -> Result<Frame> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        if u32_at(0) != MAGIC {
            bail!(
                "the stream is no crust page stream (bad magic {:#x})",
                u32_at(0)
            );
        }
        if crc32fast::hash(&b[..28]) != u32_at(28) {
            bail!("a frame header of the page stream is corrupt (checksum mismatch)");
        }
        let op = Op::from_u32(u32_at(4))
            .with_context(|| format!("the page stream holds an unknown frame {}", u32_at(4)))?;
        Ok(Frame {
            op,
            id: u32_at(8) as i32,
            crc: u32_at(12),
            len: u64::from_le_bytes(b[16..24].try_into().unwrap()),
        })
    }
}

// ------------------------------------------------------------ options ---

/// Where a dump sends its pages: `--page-server --address A --port P`.
#[derive(Args, Debug, Clone, Default)]
pub struct SendArgs {
    /// Send the pages to a page server (`crust page-server`) at --address
    /// and --port instead of writing pages images into -D.
    #[arg(long)]
    pub page_server: bool,
    /// The page server's address (with --page-server), or where dump
    /// --lazy-pages serves the memory (all addresses by default).
    #[arg(long, value_name = "ADDR")]
    pub address: Option<String>,
    /// The page server's TCP port (with --page-server), or the one dump
    /// --lazy-pages serves the memory on.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// `crust page-server`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Where the received pages images go: a new directory, an empty one,
    /// or one holding an older dump.
    #[arg(
        short = 'D',
        long = "images-dir",
        default_value = ".",
        value_name = "DIR"
    )]
    pub dir: PathBuf,
    /// The address to listen on (default: every address).
    #[arg(long, value_name = "ADDR")]
    pub address: Option<String>,
    /// The TCP port to listen on.
    #[arg(long, value_name = "PORT")]
    pub port: u16,
    #[command(flatten)]
    pub tls: TlsArgs,
}

impl SendArgs {
    /// The server to send to, when --page-server is given; the options it
    /// needs, or that only make sense with it, are checked here.
    pub fn target(&self) -> Result<Option<(String, u16)>> {
        if !self.page_server {
            if self.address.is_some() || self.port.is_some() || self.tls.tls {
                crate::refuse!(
                    "--address, --port and --tls say where --page-server sends the pages; add --page-server, or drop them"
                );
            }
            return Ok(None);
        }
        match (&self.address, self.port) {
            (Some(a), Some(p)) => Ok(Some((a.clone(), p))),
            _ => crate::refuse!(
                "--page-server needs --address and --port of a running `crust page-server`"
            ),
        }
    }
}

// ----------------------------------------------------------- channel ---

/// One end of a connection: plain TCP (whose fd a page pipe splices into
/// directly) or TLS over it.
struct Chan {
    io: Box<dyn Stream>,
    /// The socket, when no TLS stands between it and the frames.
    plain: Option<RawFd>,
    /// The other side, for messages.
    peer: String,
}

impl Chan {
    fn send(&mut self, f: Frame) -> std::io::Result<()> {
        self.io.write_all(&f.encode())
    }

    fn recv(&mut self) -> Result<Option<Frame>> {
        let mut b = [0u8; FRAME_LEN];
        let mut got = 0;
        while got < FRAME_LEN {
            match self.io.read(&mut b[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => bail!("the connection with {} ended inside a frame", self.peer),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_error(e)),
            }
        }
        Frame::decode(&b).map(Some)
    }

    /// An I/O error on the connection, in one line that says what to look at.
    fn io_error(&self, e: std::io::Error) -> anyhow::Error {
        crate::tls::conn_error(&self.peer, e)
    }

    /// Reads a REFUSE frame's text (after its header).
    fn refusal(&mut self, f: Frame) -> String {
        let mut text = vec![0u8; f.len.min(MAX_TEXT) as usize];
        match self.io.read_exact(&mut text) {
            Ok(()) => String::from_utf8_lossy(&text).into_owned(),
            Err(_) => "(no reason given)".into(),
        }
    }

    /// Tells the other side why this side gives up (best effort: it may
    /// be gone already).
    fn refuse(&mut self, why: &str) {
        let text = why.as_bytes();
        let text = &text[..text.len().min(MAX_TEXT as usize)];
        let _ = self
            .send(Frame::new(
                Op::Refuse,
                0,
                text.len() as u64,
                crc32fast::hash(text),
            ))
            .and_then(|_| self.io.write_all(text))
            .and_then(|_| self.io.flush());
    }
}

fn set_timeouts(s: &TcpStream, t: Duration) -> Result<()> {
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))?;
    // Frames are small and each waits for nothing after it.
    s.set_nodelay(true)?;
    Ok(())
}

// -------------------------------------------------------- the sender ---

/// A dump's connection to a page server.
pub struct PageClient {
    chan: Chan,
    /// Bytes sent in PAGES frames.
    pub sent: u64,
    buf: Vec<u8>,
}

impl PageClient {
    /// Connects (within CONNECT_TIMEOUT), authenticates with TLS when
    /// asked, and exchanges HELLO: the server is there and ready, before
    /// anything of the tree is touched.
    pub fn connect(args: &SendArgs, address: &str, port: u16) -> Result<PageClient> {
        let tls = crate::tls::client_config(&args.tls)?;
        let peer = format!("the page server at {address}:{port}");
        let addrs: Vec<SocketAddr> = (address, port)
            .to_socket_addrs()
            .with_context(|| format!("--address {address}: no such host"))?
            .collect();
        let mut last = None;
        let mut sock = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    sock = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let sock = match sock {
            Some(s) => s,
            None => bail!(
                "connecting to {peer}: {}; start `crust page-server` there first",
                last.map_or("no address".into(), |e| e.to_string())
            ),
        };
        set_timeouts(&sock, SEND_TIMEOUT)?;
        let plain = tls.is_none().then(|| sock.as_raw_fd());
        // A certificate either side refuses fails the dump here, before
        // the tree is frozen.
        let io = crate::tls::connect(sock, tls.as_ref(), address, &peer)?;
        let mut chan = Chan { io, plain, peer };
        chan.send(Frame::new(Op::Hello, 0, VERSION, 0))
            .and_then(|_| chan.io.flush())
            .map_err(|e| chan.io_error(e))?;
        match chan.recv()? {
            Some(f) if f.op == Op::Hello && f.len == VERSION => {}
            Some(f) if f.op == Op::Hello => bail!(
                "{} speaks page protocol {}, this crust {VERSION}; use the same crust on both sides",
                chan.peer,
                f.len
            ),
            Some(f) if f.op == Op::Refuse => {
                let why = chan.refusal(f);
                bail!("{} refused the dump: {why}", chan.peer)
            }
            Some(f) => bail!("{} answered {:?} to HELLO", chan.peer, f.op),
            None => bail!("{} closed the connection at once", chan.peer),
        }
        tracing::info!("connected to {}", chan.peer);
        Ok(PageClient {
            chan,
            sent: 0,
            buf: Vec::new(),
        })
    }

    /// A failed send: the server may have said why before it went away.
    fn send_error(&mut self, e: std::io::Error) -> anyhow::Error {
        let err = self.chan.io_error(e);
        if let Some(fd) = self.chan.plain {
            // The reason would be waiting already; do not wait for it.
            let mut b = [0u8; 1];
            // SAFETY: a plain recv on our own socket into a local buffer.
            let n = unsafe {
                libc::recv(
                    fd,
                    b.as_mut_ptr().cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n == 1
                && let Ok(Some(f)) = self.chan.recv()
                && f.op == Op::Refuse
            {
                let why = self.chan.refusal(f);
                return anyhow::anyhow!("{} refused the pages: {why}", self.chan.peer);
            }
        }
        err
    }

    fn send(&mut self, f: Frame) -> Result<()> {
        self.chan.send(f).map_err(|e| self.send_error(e))
    }

    /// Ends the session: every pages image sealed and fsynced on the
    /// server when this returns.
    pub fn finish(mut self) -> Result<()> {
        self.send(Frame::new(Op::End, 0, self.sent, 0))?;
        self.chan.io.flush().map_err(|e| self.send_error(e))?;
        match self.chan.recv()? {
            Some(f) if f.op == Op::Ack && f.len == self.sent => {
                tracing::info!(
                    "{} holds {} bytes of pages, synced",
                    self.chan.peer,
                    self.sent
                );
                Ok(())
            }
            Some(f) if f.op == Op::Ack => bail!(
                "{} received {} bytes of pages, the dump sent {}",
                self.chan.peer,
                f.len,
                self.sent
            ),
            Some(f) if f.op == Op::Refuse => {
                let why = self.chan.refusal(f);
                bail!("{} refused the pages: {why}", self.chan.peer)
            }
            Some(f) => bail!("{} answered {:?} to END", self.chan.peer, f.op),
            None => bail!(
                "{} closed the connection before confirming the pages were stored",
                self.chan.peer
            ),
        }
    }
}

/// One task's page stream on its way to the server.
pub struct RemotePages<'a> {
    client: &'a mut PageClient,
    pid: i32,
    pub len: u64,
    crc: crc32fast::Hasher,
}

impl RemotePages<'_> {
    fn open(client: &mut PageClient, pid: i32) -> Result<RemotePages<'_>> {
        client.send(Frame::new(Op::Open, pid, 0, 0))?;
        Ok(RemotePages {
            client,
            pid,
            len: 0,
            crc: crc32fast::Hasher::new(),
        })
    }

    fn finish(self) -> Result<()> {
        let crc = self.crc.finalize();
        self.client
            .send(Frame::new(Op::Close, self.pid, self.len, crc))
    }

    fn account(&mut self, len: u64, crc: u32) {
        self.crc
            .combine(&crc32fast::Hasher::new_with_initial_len(crc, len));
        self.len += len;
        self.client.sent += len;
    }
}

impl PageSink for RemotePages<'_> {
    fn take_pipe(&mut self, pipe: RawFd, len: u64, crc: u32) -> Result<()> {
        let c = &mut *self.client;
        c.send(Frame::new(Op::Pages, self.pid, len, crc))?;
        match c.chan.plain {
            // Straight from the page pipe into the socket.
            Some(sock) => {
                crate::sys::splice_all(pipe, sock, len as usize).map_err(|e| c.send_error(e))?
            }
            None => {
                c.buf.resize(len as usize, 0);
                let mut got = 0;
                while got < len as usize {
                    let n = nix::unistd::read(pipe, &mut c.buf[got..])
                        .context("reading a page pipe")?;
                    if n == 0 {
                        bail!("a page pipe ended early");
                    }
                    got += n;
                }
                let buf = std::mem::take(&mut c.buf);
                let r = c.chan.io.write_all(&buf);
                c.buf = buf;
                r.map_err(|e| c.send_error(e))?;
            }
        }
        self.account(len, crc);
        Ok(())
    }

    fn take_bytes(&mut self, data: &[u8]) -> Result<()> {
        let crc = crc32fast::hash(data);
        let c = &mut *self.client;
        c.send(Frame::new(Op::Pages, self.pid, data.len() as u64, crc))?;
        c.chan.io.write_all(data).map_err(|e| c.send_error(e))?;
        self.account(data.len() as u64, crc);
        Ok(())
    }

    /// One connection carries one stream.
    fn split(&mut self, _parts: usize) -> Result<Vec<&mut dyn PageSink>> {
        Ok(vec![self])
    }
}

/// Where a dump's pages go: pages images in the images directory, or a
/// page server. The page pipeline writes to either through `TaskPages`.
pub enum PageDest {
    /// Into -D, with the writers `reserve` made ahead, per PID.
    Local(HashMap<i32, PagesWriter>),
    Remote(PageClient),
}

/// One task's pages on their way to a `PageDest`.
pub enum TaskPages<'a> {
    Local(PagesWriter),
    Remote(RemotePages<'a>),
}

impl PageDest {
    /// Connects to the page server when the options name one.
    pub fn new(args: &SendArgs) -> Result<PageDest> {
        Ok(match args.target()? {
            None => {
                crate::tls::check_unused(&args.tls)?;
                PageDest::Local(HashMap::new())
            }
            Some((address, port)) => PageDest::Remote(PageClient::connect(args, &address, port)?),
        })
    }

    /// Whether the pages go into pages images in -D.
    pub fn is_local(&self) -> bool {
        matches!(self, PageDest::Local(_))
    }

    /// Allocates ahead the image space of about `bytes` of task `pid`'s
    /// pages, before the tree is frozen (`PagesWriter::reserve`); nothing
    /// for a page server.
    pub fn reserve(&mut self, dir: &ImageDir, pid: i32, bytes: u64) -> Result<()> {
        if let PageDest::Local(ahead) = self {
            let parts = crate::resources::memory::stream_parts(bytes);
            ahead.insert(pid, PagesWriter::reserve(dir, pid, bytes, parts)?);
        }
        Ok(())
    }

    /// Starts the pages of task `pid`.
    pub fn task(&mut self, dir: &ImageDir, pid: i32) -> Result<TaskPages<'_>> {
        Ok(match self {
            PageDest::Local(ahead) => TaskPages::Local(match ahead.remove(&pid) {
                Some(w) => w,
                None => PagesWriter::create(dir, pid)?,
            }),
            PageDest::Remote(c) => TaskPages::Remote(RemotePages::open(c, pid)?),
        })
    }

    /// Makes every task's pages durable: local images are synced as they
    /// are sealed; a page server confirms it has synced them all.
    pub fn finish(self) -> Result<()> {
        match self {
            // Space reserved for a task that exited before the freeze.
            PageDest::Local(ahead) => ahead.into_values().try_for_each(PagesWriter::discard),
            PageDest::Remote(c) => c.finish(),
        }
    }
}

impl TaskPages<'_> {
    pub fn len(&self) -> u64 {
        match self {
            TaskPages::Local(w) => w.len(),
            TaskPages::Remote(r) => r.len,
        }
    }

    /// Takes back the pages streamed so far, to stream others (a page
    /// server's cannot be taken back).
    pub fn restart(&mut self) -> Result<()> {
        match self {
            TaskPages::Local(w) => w.restart(),
            TaskPages::Remote(_) => bail!("pages sent to a page server cannot be taken back"),
        }
    }

    /// Seals the task's pages (the image's header, or CLOSE).
    pub fn finish(self) -> Result<()> {
        match self {
            TaskPages::Local(w) => w.finish(),
            TaskPages::Remote(r) => r.finish(),
        }
    }
}

impl PageSink for TaskPages<'_> {
    fn take_pipe(&mut self, pipe: RawFd, len: u64, crc: u32) -> Result<()> {
        match self {
            TaskPages::Local(w) => w.take_pipe(pipe, len, crc),
            TaskPages::Remote(r) => r.take_pipe(pipe, len, crc),
        }
    }

    fn take_bytes(&mut self, data: &[u8]) -> Result<()> {
        match self {
            TaskPages::Local(w) => w.take_bytes(data),
            TaskPages::Remote(r) => r.take_bytes(data),
        }
    }

    fn split(&mut self, parts: usize) -> Result<Vec<&mut dyn PageSink>> {
        match self {
            TaskPages::Local(w) => w.split(parts),
            TaskPages::Remote(r) => r.split(parts),
        }
    }
}

// -------------------------------------------------------- the server ---

/// `crust page-server`: takes one dump's pages and exits when it is done.
pub fn serve(args: &ServeArgs) -> Result<()> {
    let tls = crate::tls::server_config(&args.tls, "the dump")?;
    let dir = ImageDir::create(&args.dir)?;
    let address = args.address.as_deref().unwrap_or("0.0.0.0");
    let listener = TcpListener::bind((address, args.port))
        .with_context(|| format!("listening on {address}:{}", args.port))?;
    tracing::info!("page server listening on {address}:{}", args.port);
    // One dump per run, as with criu: the listener closes once it is here.
    let (sock, from) = listener
        .accept()
        .context("accepting the dump's connection")?;
    drop(listener);
    set_timeouts(&sock, RECV_TIMEOUT)?;
    let peer = format!("the dump at {from}");
    tracing::info!("connection from {peer}");
    let io = crate::tls::accept(sock, tls.as_ref(), &peer)?;
    let mut chan = Chan {
        io,
        plain: None,
        peer,
    };
    let mut session = Session {
        dir: &dir,
        written: Vec::new(),
        open: None,
        received: 0,
    };
    match session.run(&mut chan) {
        Ok(()) => {
            tracing::info!(
                "{} bytes of pages in {} image(s) stored in {}",
                session.received,
                session.written.len(),
                dir.path.display()
            );
            Ok(())
        }
        Err(e) => {
            chan.refuse(&format!("{e:#}"));
            // No half dump is left behind: without all of its pages
            // images, the directory could not restore anyway.
            for p in &session.written {
                let _ = std::fs::remove_file(p);
            }
            Err(e.context(format!(
                "page server: no dump was stored in {}",
                dir.path.display()
            )))
        }
    }
}

/// How the server cuts a PAGES frame for its file writer.
const CHUNK: usize = 1 << 20;
/// Chunks in flight between the receiving thread and the file writer.
const CHUNKS: usize = 4;

struct Session<'a> {
    dir: &'a ImageDir,
    /// The pages images created so far.
    written: Vec<PathBuf>,
    /// The task being received: its PID, and the length and CRC-32 of
    /// what came so far.
    open: Option<(i32, u64, crc32fast::Hasher)>,
    received: u64,
}

/// What the receiving thread hands the file writer, in stream order.
enum Job {
    Open(i32),
    /// A buffer, its bytes in use, and their CRC-32.
    Data(Vec<u8>, usize, u32),
    Close,
}

impl Session<'_> {
    /// Receives the stream. One thread reads and checks the frames while
    /// a second writes the pages images: receiving the next chunk overlaps
    /// writing the last.
    fn run(&mut self, chan: &mut Chan) -> Result<()> {
        match chan.recv()? {
            Some(f) if f.op == Op::Hello && f.len == VERSION => {}
            Some(f) if f.op == Op::Hello => {
                // Answered with our version: the dump says what differs.
                let _ = chan.send(Frame::new(Op::Hello, 0, VERSION, 0));
                bail!(
                    "{} speaks page protocol {}, this crust {VERSION}; use the same crust on both sides",
                    chan.peer,
                    f.len
                );
            }
            Some(f) => bail!("{} began with {:?}, not HELLO", chan.peer, f.op),
            None => bail!("{} closed the connection at once", chan.peer),
        }
        chan.send(Frame::new(Op::Hello, 0, VERSION, 0))
            .and_then(|_| chan.io.flush())
            .map_err(|e| chan.io_error(e))?;
        let dir = self.dir;
        std::thread::scope(|s| {
            let (jobs, job_rx) = std::sync::mpsc::sync_channel::<Job>(CHUNKS);
            let (free_tx, free) = std::sync::mpsc::channel::<Vec<u8>>();
            for _ in 0..CHUNKS {
                free_tx
                    .send(vec![0u8; CHUNK])
                    .expect("the receiver is here");
            }
            let writer = s.spawn(move || -> Result<()> {
                let mut file: Option<PagesWriter> = None;
                while let Ok(job) = job_rx.recv() {
                    match job {
                        Job::Open(pid) => file = Some(PagesWriter::create(dir, pid)?),
                        Job::Data(buf, n, crc) => {
                            file.as_mut()
                                .expect("opened first")
                                .take_checked(&buf[..n], crc)?;
                            // The receiver may be done already.
                            let _ = free_tx.send(buf);
                        }
                        // Sealed and fsynced.
                        Job::Close => file.take().expect("opened first").finish()?,
                    }
                }
                Ok(())
            });
            // The writer stopped: its error is the one to report.
            let stopped = |w: std::thread::ScopedJoinHandle<'_, Result<()>>| -> anyhow::Error {
                match w.join() {
                    Ok(Err(e)) => e,
                    _ => anyhow::anyhow!("the page server's file writer stopped"),
                }
            };
            loop {
                let Some(f) = chan.recv()? else {
                    bail!(
                        "{} closed the connection before the dump was done (it failed, or crust was killed)",
                        chan.peer
                    );
                };
                match f.op {
                    Op::Open => {
                        if let Some((pid, ..)) = &self.open {
                            bail!("{} opened task {} inside task {pid}", chan.peer, f.id);
                        }
                        let path = dir.file(crate::images::ImageKind::Pages, f.id);
                        if self.written.contains(&path) {
                            bail!("{} sent the pages of task {} twice", chan.peer, f.id);
                        }
                        self.written.push(path);
                        if jobs.send(Job::Open(f.id)).is_err() {
                            return Err(stopped(writer));
                        }
                        self.open = Some((f.id, 0, crc32fast::Hasher::new()));
                    }
                    Op::Pages => {
                        let Some((pid, len, task_crc)) = self.open.as_mut().filter(|o| o.0 == f.id)
                        else {
                            bail!(
                                "{} sent pages of task {}, which is not open",
                                chan.peer,
                                f.id
                            );
                        };
                        if f.len > MAX_PAGES_FRAME {
                            bail!(
                                "{} sent a frame of {} bytes; the stream is corrupt",
                                chan.peer,
                                f.len
                            );
                        }
                        let mut crc = crc32fast::Hasher::new();
                        let mut left = f.len as usize;
                        while left > 0 {
                            let n = left.min(CHUNK);
                            let Ok(mut buf) = free.recv() else {
                                return Err(stopped(writer));
                            };
                            chan.io
                                .read_exact(&mut buf[..n])
                                .map_err(|e| chan.io_error(e))?;
                            let part = crc32fast::hash(&buf[..n]);
                            crc.combine(&crc32fast::Hasher::new_with_initial_len(part, n as u64));
                            if jobs.send(Job::Data(buf, n, part)).is_err() {
                                return Err(stopped(writer));
                            }
                            left -= n;
                        }
                        let crc = crc.finalize();
                        if crc != f.crc {
                            bail!(
                                "pages of task {pid} from {} fail their checksum; the stream is corrupt",
                                chan.peer
                            );
                        }
                        task_crc.combine(&crc32fast::Hasher::new_with_initial_len(crc, f.len));
                        *len += f.len;
                        self.received += f.len;
                    }
                    Op::Close => {
                        let Some((pid, len, crc)) = self.open.take().filter(|o| o.0 == f.id) else {
                            bail!("{} closed task {}, which is not open", chan.peer, f.id);
                        };
                        if len != f.len {
                            bail!(
                                "task {pid}: {} sent {} bytes of pages, received {len}; the stream is corrupt",
                                chan.peer,
                                f.len,
                            );
                        }
                        if crc.finalize() != f.crc {
                            bail!(
                                "task {pid}: the pages from {} fail their checksum",
                                chan.peer
                            );
                        }
                        if jobs.send(Job::Close).is_err() {
                            return Err(stopped(writer));
                        }
                    }
                    Op::End => {
                        if let Some((pid, ..)) = &self.open {
                            bail!("{} ended the dump inside task {pid}", chan.peer);
                        }
                        if f.len != self.received {
                            bail!(
                                "{} sent {} bytes of pages, received {}; the stream is corrupt",
                                chan.peer,
                                f.len,
                                self.received
                            );
                        }
                        // Every image written, sealed and synced.
                        drop(jobs);
                        writer
                            .join()
                            .unwrap_or_else(|_| bail!("the page server's file writer panicked"))?;
                        dir.sync()?;
                        chan.send(Frame::new(
                            Op::Ack,
                            self.written.len() as i32,
                            self.received,
                            0,
                        ))
                        .and_then(|_| chan.io.flush())
                        .map_err(|e| chan.io_error(e))?;
                        return Ok(());
                    }
                    Op::Refuse => {
                        let why = chan.refusal(f);
                        bail!("{} gave up: {why}", chan.peer)
                    }
                    Op::Hello | Op::Ack => bail!("{} sent {:?} mid-stream", chan.peer, f.op),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_corruption_is_caught() {
        let f = Frame::new(Op::Pages, 1234, 1 << 20, 0xdead_beef);
        let mut b = f.encode();
        assert_eq!(Frame::decode(&b).unwrap(), f);
        b[17] ^= 1;
        let e = Frame::decode(&b).unwrap_err().to_string();
        assert!(e.contains("corrupt"), "{e}");
        let mut b = f.encode();
        b[0] = 0;
        let e = Frame::decode(&b).unwrap_err().to_string();
        assert!(e.contains("no crust page stream"), "{e}");
    }

    #[test]
    fn send_options_need_each_other() {
        let mut a = SendArgs::default();
        assert!(a.target().unwrap().is_none());
        a.port = Some(1);
        assert!(a.target().is_err());
        a.page_server = true;
        assert!(a.target().is_err());
        a.address = Some("127.0.0.1".into());
        assert_eq!(a.target().unwrap(), Some(("127.0.0.1".into(), 1)));
        a.tls.tls = true;
        let e = crate::tls::client_config(&a.tls).err().unwrap().to_string();
        assert!(e.contains("--tls needs"), "{e}");
    }
}

//! One live progress line on stderr while a dump or restore that takes
//! more than a second runs: tasks done of all, MiB done of all, the rate.
//! Only when stderr is a terminal, and never in the log. The counters live
//! in a shared anonymous page, so that the processes a restore forks (which
//! fill their own memory) count into it too.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[repr(C)]
struct Counters {
    tasks_total: AtomicU64,
    tasks_done: AtomicU64,
    bytes_total: AtomicU64,
    bytes_done: AtomicU64,
}

/// The counters, in a MAP_SHARED page made once.
fn counters() -> &'static Counters {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let at = *PAGE.get_or_init(|| {
        // SAFETY: a fresh shared anonymous page of our own, never unmapped
        // by crust (a restored task drops it with the rest of crust's memory).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED { 0 } else { p as usize }
    });
    static FALLBACK: Counters = Counters {
        tasks_total: AtomicU64::new(0),
        tasks_done: AtomicU64::new(0),
        bytes_total: AtomicU64::new(0),
        bytes_done: AtomicU64::new(0),
    };
    if at == 0 {
        return &FALLBACK;
    }
    // SAFETY: the page is zeroed (valid atomics), 4096 bytes, and lives as
    // long as the process.
    unsafe { &*(at as *const Counters) }
}

pub fn add_tasks(n: u64) {
    counters().tasks_total.fetch_add(n, Ordering::Relaxed);
}

pub fn task_done() {
    counters().tasks_done.fetch_add(1, Ordering::Relaxed);
}

pub fn add_bytes(n: u64) {
    counters().bytes_total.fetch_add(n, Ordering::Relaxed);
}

/// Takes back bytes `add_bytes` announced that will not be written.
pub fn remove_bytes(n: u64) {
    counters().bytes_total.fetch_sub(n, Ordering::Relaxed);
}

pub fn bytes_done(n: u64) {
    counters().bytes_done.fetch_add(n, Ordering::Relaxed);
}

/// The line, drawn by a thread of crust's, cleared on drop.
pub struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts the line for `verb` ("dumping", "restoring") when stderr is a
/// terminal; it shows only once a second has passed.
pub fn start(verb: &'static str) -> Progress {
    let stop = Arc::new(AtomicBool::new(false));
    let thread = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let stop = stop.clone();
        std::thread::spawn(move || draw(verb, &stop))
    });
    Progress { stop, thread }
}

fn line(verb: &str, c: &Counters, secs: f64) -> String {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let done = c.bytes_done.load(Ordering::Relaxed);
    let total = c.bytes_total.load(Ordering::Relaxed).max(done);
    format!(
        "crust: {verb}: {}/{} tasks, {:.0}/{:.0} MiB, {:.0} MiB/s",
        c.tasks_done.load(Ordering::Relaxed),
        c.tasks_total.load(Ordering::Relaxed),
        mib(done),
        mib(total),
        mib(done) / secs.max(0.001)
    )
}

/// How long a run goes before the line shows: a second, or for tests
/// `CRUST_PROGRESS_AFTER_MS`.
fn delay() -> Duration {
    std::env::var("CRUST_PROGRESS_AFTER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(1), Duration::from_millis)
}

fn draw(verb: &str, stop: &AtomicBool) {
    let t0 = Instant::now();
    let after = delay();
    let mut drawn = false;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if t0.elapsed() < after {
            continue;
        }
        let l = line(verb, counters(), t0.elapsed().as_secs_f64());
        to_stderr(&format!("\r\x1b[K{l}"));
        drawn = true;
    }
    if drawn {
        to_stderr("\r\x1b[K");
    }
}

/// Straight to fd 2, without std's stderr lock: crust forks while this
/// thread runs, and a child must not inherit that lock held.
fn to_stderr(s: &str) {
    // SAFETY: write(2) of our buffer to fd 2.
    unsafe { libc::write(2, s.as_ptr().cast(), s.len()) };
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_reads_well() {
        let c = Counters {
            tasks_total: AtomicU64::new(5),
            tasks_done: AtomicU64::new(3),
            bytes_total: AtomicU64::new(2048 << 20),
            bytes_done: AtomicU64::new(512 << 20),
        };
        assert_eq!(
            line("dumping", &c, 2.0),
            "crust: dumping: 3/5 tasks, 512/2048 MiB, 256 MiB/s"
        );
    }
}

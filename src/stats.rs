//! `--display-stats`: how long each stage of a dump or restore took, and
//! what it counted (tasks, pages scanned, written, left out). Printed as a
//! table on stdout at the end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Pages the dump looked at (present or swapped in the VMAs it stores).
pub static PAGES_SCANNED: AtomicU64 = AtomicU64::new(0);
/// Pages written into pages images.
pub static PAGES_WRITTEN: AtomicU64 = AtomicU64::new(0);
/// Pages left out: they map the shared zero page.
pub static PAGES_ZERO: AtomicU64 = AtomicU64::new(0);
/// Pages left out: a child still shares them with its parent, whose image
/// holds them.
pub static PAGES_PARENT: AtomicU64 = AtomicU64::new(0);

/// Pages left out: not written since the previous dump of the chain,
/// whose images hold them (`MmEntry.prev_pages`).
pub static PAGES_IN_PREV: AtomicU64 = AtomicU64::new(0);

pub fn count(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Takes back `n` counted too early.
pub fn uncount(c: &AtomicU64, n: u64) {
    c.fetch_sub(n, Ordering::Relaxed);
}

/// The stages of one run, timed one after the other.
pub struct Stats {
    start: Instant,
    last: Instant,
    stages: Vec<(&'static str, Duration)>,
    counts: Vec<(&'static str, u64)>,
}

impl Stats {
    pub fn start() -> Self {
        let now = Instant::now();
        Stats {
            start: now,
            last: now,
            stages: Vec::new(),
            counts: Vec::new(),
        }
    }

    /// Closes the stage that ran since the last one.
    pub fn stage(&mut self, name: &'static str) {
        let now = Instant::now();
        self.stages.push((name, now - self.last));
        self.last = now;
    }

    pub fn count(&mut self, name: &'static str, n: u64) {
        self.counts.push((name, n));
    }

    /// The table `--display-stats` prints.
    pub fn table(&self, title: &str) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(o, "{title} statistics");
        let _ = writeln!(o, "  {:<28} {:>12}", "stage", "time");
        for (name, d) in &self.stages {
            let _ = writeln!(o, "  {name:<28} {:>10.3} s", d.as_secs_f64());
        }
        let _ = writeln!(
            o,
            "  {:<28} {:>10.3} s",
            "total",
            (self.last - self.start).as_secs_f64()
        );
        for (name, n) in &self.counts {
            let _ = writeln!(o, "  {name:<28} {n:>12}");
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_stages_total_and_counts() {
        let mut s = Stats::start();
        s.stage("freezing");
        s.stage("memory");
        s.count("tasks", 3);
        let t = s.table("Dump");
        assert!(t.starts_with("Dump statistics\n"));
        for want in ["freezing", "memory", "total", "tasks"] {
            assert!(t.contains(want), "{t}");
        }
        assert!(t.lines().last().unwrap().trim_end().ends_with(" 3"));
    }
}

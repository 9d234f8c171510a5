//! Progress of long passes, in voxels: a bar with the rate (MVx/s) and an ETA on a terminal, and
//! off a terminal (Batch, CloudWatch, the worker) a `progress` log line every
//! `CUBOIDS_PROGRESS_SECONDS` (10) seconds and one when the pass ends, so that logs show how far
//! a task got without bars in them.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::info;

/// One pass's progress; cheap to update from any thread.
pub struct Progress {
    pass: &'static str,
    total: u64,
    done: AtomicU64,
    start: Instant,
    bar: Option<indicatif::ProgressBar>,
    /// Off a terminal: when the last line was logged, and the interval between lines.
    last_line: Mutex<Instant>,
    every: Duration,
}

/// The interval between progress lines off a terminal.
fn line_interval() -> Duration {
    std::env::var("CUBOIDS_PROGRESS_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(Duration::from_secs(10), Duration::from_secs_f64)
}

/// "12.3 MVx/s, 45 s left" from what was done in `elapsed`.
pub fn rate_and_eta(done: u64, total: u64, elapsed: Duration) -> (f64, Option<f64>) {
    let seconds = elapsed.as_secs_f64();
    if done == 0 || seconds <= 0.0 {
        return (0.0, None);
    }
    let rate = done as f64 / seconds;
    (rate / 1e6, Some(total.saturating_sub(done) as f64 / rate))
}

impl Progress {
    /// A pass over `total` voxels. Shows a bar when stderr is a terminal and logs are text.
    pub fn new(pass: &'static str, total: u64) -> Progress {
        let on_terminal = std::io::stderr().is_terminal()
            && std::env::var("CUBOIDS_LOG_FORMAT").as_deref() != Ok("json");
        let bar = on_terminal.then(|| {
            let bar = indicatif::ProgressBar::new(total);
            let style = indicatif::ProgressStyle::with_template(
                "{prefix:>12} [{bar:30}] {percent:>3}% {rate} ETA {eta}",
            )
            .expect("a valid template")
            .with_key(
                "rate",
                |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.1} MVx/s", state.per_sec() / 1e6);
                },
            )
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(pass);
            bar
        });
        Progress {
            pass,
            total,
            done: AtomicU64::new(0),
            start: Instant::now(),
            bar,
            last_line: Mutex::new(Instant::now()),
            every: line_interval(),
        }
    }

    /// `voxels` more are done.
    pub fn add(&self, voxels: u64) {
        let done = self.done.fetch_add(voxels, Ordering::Relaxed) + voxels;
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None => {
                let mut last = self.last_line.lock().expect("no panics while held");
                if last.elapsed() >= self.every && done < self.total {
                    *last = Instant::now();
                    drop(last);
                    self.line(done);
                }
            }
        }
    }

    fn line(&self, done: u64) {
        let (mvx_per_s, eta) = rate_and_eta(done, self.total, self.start.elapsed());
        info!(
            pass = self.pass,
            done_mvx = done as f64 / 1e6,
            total_mvx = self.total as f64 / 1e6,
            percent = (100.0 * done as f64 / self.total.max(1) as f64).round(),
            mvx_per_s,
            eta_s = eta.map(|s| s.round()),
            "progress"
        );
    }

    /// The pass ended (also when it failed: the bar is cleared, the last line says how far).
    pub fn finish(&self) {
        let done = self.done.load(Ordering::Relaxed);
        match &self.bar {
            Some(bar) => bar.finish_and_clear(),
            None => self.line(done),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_eta_follow_the_work_done() {
        let (rate, eta) = rate_and_eta(20_000_000, 100_000_000, Duration::from_secs(2));
        assert_eq!(rate, 10.0);
        assert_eq!(eta, Some(8.0));
        assert_eq!(rate_and_eta(0, 10, Duration::from_secs(1)), (0.0, None));
    }
}

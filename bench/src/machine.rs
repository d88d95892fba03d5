//! How busy the machine is with other work while the benchmark runs.
//!
//! The 1-minute load average counts the benchmark's own threads (load
//! generator and servers keep 2 cores busy on their own) and lags by a
//! minute, so a build that ended just before the run inflates it. The figure
//! throughput and latency are judged by is therefore the number of runnable
//! tasks of *other* processes: the 4th field's numerator of `/proc/loadavg`
//! (runnable tasks, system-wide, now) minus the threads of this process and
//! its descendants (servers, valgrind) that are runnable at the same moment,
//! sampled every second by a thread of its own. The load averages are
//! reported beside it.

use std::{
    collections::HashMap,
    fs,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// One reading of `/proc/loadavg`, with this benchmark's share taken out.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// The 1-minute load average.
    pub load1: f64,
    /// Runnable tasks system-wide.
    pub running: u32,
    /// Runnable threads of the benchmark and its child processes.
    pub ours: u32,
}

impl Sample {
    pub fn now() -> Option<Self> {
        let text = fs::read_to_string("/proc/loadavg").ok()?;
        let mut fields = text.split_whitespace();
        let load1 = fields.next()?.parse().ok()?;
        let running = fields.nth(2)?.split('/').next()?.parse().ok()?;
        Some(Self {
            load1,
            running,
            ours: our_running_threads(),
        })
    }

    /// Runnable tasks of other processes.
    pub fn others(&self) -> u32 {
        self.running.saturating_sub(self.ours)
    }
}

/// The samples taken over a run, summarised.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub cores: usize,
    pub before: Option<Sample>,
    pub samples: usize,
    pub load1_mean: f64,
    pub load1_max: f64,
    pub others_mean: f64,
    pub others_max: u32,
}

impl Load {
    pub fn of(cores: usize, before: Option<Sample>, samples: &[Sample]) -> Self {
        let n = samples.len().max(1) as f64;
        Self {
            cores,
            before,
            samples: samples.len(),
            load1_mean: samples.iter().map(|s| s.load1).sum::<f64>() / n,
            load1_max: samples.iter().map(|s| s.load1).fold(0.0, f64::max),
            others_mean: samples.iter().map(|s| f64::from(s.others())).sum::<f64>() / n,
            others_max: samples.iter().map(Sample::others).max().unwrap_or(0),
        }
    }

    /// A machine whose other work averaged `others` runnable tasks (tests,
    /// and `--pretend-load`).
    pub fn fixed(cores: usize, others: f64) -> Self {
        Self {
            cores,
            before: None,
            samples: 0,
            load1_mean: others,
            load1_max: others,
            others_mean: others,
            others_max: others.ceil() as u32,
        }
    }

    /// The figure throughput and latency are judged by.
    pub fn figure(&self) -> f64 {
        self.others_mean
    }

    /// Whether other work left the benchmark its cores: at most one runnable
    /// task of other processes per core, on average over the run.
    pub fn quiet(&self) -> bool {
        self.figure() <= self.cores as f64
    }

    pub fn describe(&self) -> String {
        let before = self.before.map_or_else(
            || "unknown".to_owned(),
            |s| {
                format!(
                    "{:.2} ({} runnable tasks of other processes)",
                    s.load1,
                    s.others()
                )
            },
        );
        let verdict = if self.quiet() {
            "throughput and latency judged"
        } else {
            "**throughput and latency not judged**"
        };
        format!(
            "Load: 1-minute load average {before} before the run, {:.2} mean and {:.2} max \
             during it; runnable tasks of other processes during it (the benchmark's own \
             threads subtracted, {} samples): **{:.2} mean**, {} max, on {} cores: {verdict}.",
            self.load1_mean,
            self.load1_max,
            self.samples,
            self.others_mean,
            self.others_max,
            self.cores,
        )
    }
}

/// Samples `/proc/loadavg` every second from a thread of its own (a busy
/// tokio runtime would delay it) until [`Sampler::stop`].
pub struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    thread: JoinHandle<()>,
}

impl Sampler {
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let thread = std::thread::spawn({
            let (stop, samples) = (stop.clone(), samples.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(sample) = Sample::now() {
                        samples.lock().unwrap().push(sample);
                    }
                    // Wake often to stop promptly, sample once a second.
                    for _ in 0..10 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        });
        Self {
            stop,
            samples,
            thread,
        }
    }

    pub fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        Arc::into_inner(self.samples)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_default()
    }
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runnable ("R") threads of this process and all its descendants.
fn our_running_threads() -> u32 {
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0;
    };
    let mut parent = HashMap::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((_, ppid)) = stat_fields(&format!("/proc/{pid}/stat")) {
            parent.insert(pid, ppid);
        }
    }
    let ours = |mut pid: u32| {
        for _ in 0..64 {
            if pid == me {
                return true;
            }
            match parent.get(&pid) {
                Some(&p) if p != 0 => pid = p,
                _ => return false,
            }
        }
        false
    };
    let mut running = 0;
    for &pid in parent.keys().filter(|&&pid| ours(pid)) {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let path = task.path().join("stat");
            if let Some(('R', _)) = stat_fields(&path.to_string_lossy()) {
                running += 1;
            }
        }
    }
    running
}

/// State and parent pid from a `stat` file.
fn stat_fields(path: &str) -> Option<(char, u32)> {
    let stat = fs::read_to_string(path).ok()?;
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((state, ppid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_counts_this_thread_as_ours() {
        let sample = Sample::now().expect("/proc/loadavg is readable");
        assert!(sample.ours >= 1, "{sample:?}");
    }

    #[test]
    fn above_one_other_task_per_core_is_not_quiet() {
        assert!(Load::fixed(2, 2.0).quiet());
        assert!(!Load::fixed(2, 2.5).quiet());
    }
}

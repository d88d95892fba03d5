//! Turns measurements into one Markdown report: printed, and written between
//! markers in BENCHMARKS.md so the hand-written notes around it survive.

use std::{fmt::Write, path::Path, time::Duration};

use anyhow::Context;

use crate::load::Outcome;

pub const BEGIN: &str = "<!-- bench:begin (written by `bench`; edits inside are overwritten) -->";
pub const END: &str = "<!-- bench:end -->";

/// One workload measured on both servers.
pub struct Measured {
    pub outcome: Outcome,
    /// CPU time the server used during the workload.
    pub server_cpu: Duration,
    /// The server's peak resident memory during the workload, in KiB.
    pub peak_rss_kib: Option<u64>,
}

impl Measured {
    fn cpu_per_op(&self) -> Option<Duration> {
        (self.outcome.ops > 0).then(|| self.server_cpu / self.outcome.ops as u32)
    }
}

/// A pair: `[reference, user-manager]`.
pub type Pair = [Measured; 2];

/// A throughput target: user-manager's rate at least this fraction of the reference's.
pub struct MinRatio(pub f64);

pub struct Verdict {
    pub what: String,
    pub met: bool,
    pub detail: String,
}

#[derive(Default)]
pub struct Report {
    lines: String,
    pub verdicts: Vec<Verdict>,
    pub failures: u64,
    pub failure_notes: Vec<String>,
}

impl Report {
    pub fn text(&mut self, text: &str) {
        let _ = writeln!(self.lines, "{text}");
    }

    pub fn throughput_table(&mut self) {
        self.text(
            "| Workload | Measure | user-manager | reference | ratio | target |\n\
             |---|---|--:|--:|--:|---|",
        );
    }

    /// Throughput, latency and CPU-per-operation rows for one workload.
    pub fn workload(&mut self, name: &str, unit: &str, pair: &Pair, target: MinRatio) {
        let [reference, ours] = pair;
        for (side, m) in ["reference", "user-manager"].iter().zip(pair) {
            self.failures += m.outcome.failures;
            if let Some(first) = &m.outcome.first_failure {
                self.failure_notes.push(format!(
                    "{name} on {side}: {} failures, first: {first}",
                    m.outcome.failures
                ));
            }
        }
        let ratio = ours.outcome.rate() / reference.outcome.rate();
        let MinRatio(min) = target;
        let met = ratio >= min;
        self.verdicts.push(Verdict {
            what: format!("{name}: at least {min}× the reference's throughput"),
            met,
            detail: ratio_detail(ratio, min),
        });
        let target_text = format!("≥ {min}× {}", if met { "✅" } else { "❌" });
        self.row(
            name,
            &format!("{unit}/s"),
            &rate(ours.outcome.rate()),
            &rate(reference.outcome.rate()),
            Some(ratio),
            &target_text,
        );
        if let (Some(p50), Some(p99)) =
            (ours.outcome.percentile(50.0), ours.outcome.percentile(99.0))
        {
            let (r50, r99) = (
                reference.outcome.percentile(50.0).unwrap_or_default(),
                reference.outcome.percentile(99.0).unwrap_or_default(),
            );
            self.row(
                name,
                "p50 latency",
                &ms(p50),
                &ms(r50),
                Some(secs_ratio(p50, r50)),
                "",
            );
            self.row(
                name,
                "p99 latency",
                &ms(p99),
                &ms(r99),
                Some(secs_ratio(p99, r99)),
                "",
            );
        }
        if let (Some(ours_cpu), Some(ref_cpu)) = (ours.cpu_per_op(), reference.cpu_per_op()) {
            self.row(
                name,
                &format!("server CPU per {unit}"),
                &us(ours_cpu),
                &us(ref_cpu),
                Some(secs_ratio(ours_cpu, ref_cpu)),
                "",
            );
        }
    }

    /// The latency target at a fixed rate: p99 below `bound`.
    pub fn paced(&mut self, name: &str, pair: &Pair, bound: Duration) {
        self.failures += pair.iter().map(|m| m.outcome.failures).sum::<u64>();
        let [reference, ours] = pair;
        self.row(
            name,
            "rate sent",
            &rate(ours.outcome.rate()),
            &rate(reference.outcome.rate()),
            None,
            "",
        );
        let pct = |m: &Measured, p| m.outcome.percentile(p).unwrap_or_default();
        self.row(
            name,
            "p50 latency",
            &ms(pct(ours, 50.0)),
            &ms(pct(reference, 50.0)),
            None,
            "",
        );
        let p99 = pct(ours, 99.0);
        let target = self.absolute(
            &format!("{name}: p99"),
            p99.as_secs_f64() * 1e3,
            bound.as_secs_f64() * 1e3,
            "ms",
        );
        self.row(
            name,
            "p99 latency",
            &ms(p99),
            &ms(pct(reference, 99.0)),
            None,
            &target,
        );
    }

    pub fn memory_table(&mut self) {
        self.text("| Memory and start-up | user-manager | reference | target |\n|---|--:|--:|---|");
    }

    /// A resident-memory row; `reference` is for scale only (it holds every user in memory).
    pub fn memory(
        &mut self,
        what: &str,
        ours_kib: Option<u64>,
        reference_kib: Option<u64>,
        max_mib: Option<f64>,
    ) {
        let mib =
            |k: Option<u64>| k.map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
        let target = match (ours_kib, max_mib) {
            (Some(k), Some(max)) => self.absolute(what, k as f64 / 1024.0, max, "MiB"),
            (None, Some(_)) => "not measured".into(),
            (_, None) => String::new(),
        };
        let _ = writeln!(
            self.lines,
            "| {what} | {} | {} | {target} |",
            mib(ours_kib),
            mib(reference_kib)
        );
    }

    pub fn startup(&mut self, what: &str, samples: &mut [Duration], bound: Duration) {
        samples.sort_unstable();
        let median = samples[samples.len() / 2];
        let max = samples[samples.len() - 1];
        let target = self.absolute(
            what,
            max.as_secs_f64() * 1e3,
            bound.as_secs_f64() * 1e3,
            "ms",
        );
        let _ = writeln!(
            self.lines,
            "| {what} (median, max of {}) | {}, {} | — | {target} |",
            samples.len(),
            ms(median),
            ms(max)
        );
    }

    /// Records an upper-bound target and returns its table cell.
    fn absolute(&mut self, what: &str, value: f64, bound: f64, unit: &str) -> String {
        let met = value < bound;
        let detail = if met {
            format!("{value:.2} {unit}")
        } else {
            format!(
                "{value:.2} {unit}, {:.0}% over",
                (value / bound - 1.0) * 100.0
            )
        };
        self.verdicts.push(Verdict {
            what: format!("{what} under {bound} {unit}"),
            met,
            detail,
        });
        format!("< {bound} {unit} {}", if met { "✅" } else { "❌" })
    }

    fn row(
        &mut self,
        name: &str,
        measure: &str,
        ours: &str,
        reference: &str,
        ratio: Option<f64>,
        target: &str,
    ) {
        let ratio = ratio.map_or(String::new(), |r| format!("{r:.2}×"));
        let _ = writeln!(
            self.lines,
            "| {name} | {measure} | {ours} | {reference} | {ratio} | {target} |"
        );
    }

    /// The report: tables, then every target's verdict, then failures.
    pub fn render(&self) -> String {
        let mut out = self.lines.clone();
        out.push_str("\nTargets:\n\n");
        for v in &self.verdicts {
            let mark = if v.met { "met" } else { "**missed**" };
            let _ = writeln!(out, "- {mark}: {} ({})", v.what, v.detail);
        }
        if self.failures == 0 {
            out.push_str("\nEvery response was checked: no failures.\n");
        } else {
            let _ = writeln!(out, "\n**{} failed or wrong responses**:\n", self.failures);
            for note in &self.failure_notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }
}

fn ratio_detail(ratio: f64, min: f64) -> String {
    if ratio >= min {
        format!("{ratio:.2}×")
    } else {
        format!("{ratio:.2}×, {:.0}% short", (1.0 - ratio / min) * 100.0)
    }
}

fn secs_ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-12)
}

fn rate(per_sec: f64) -> String {
    if per_sec >= 1e6 {
        format!("{:.2}M", per_sec / 1e6)
    } else if per_sec >= 1e3 {
        format!("{:.1}k", per_sec / 1e3)
    } else {
        format!("{per_sec:.0}")
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// Replaces the results between the markers of `path` (creating the file,
/// or appending the markers, when missing), keeping everything else.
pub fn write_into(path: &Path, results: &str) -> anyhow::Result<()> {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n{results}\n{END}");
    let updated = match (existing.find(BEGIN), existing.find(END)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{block}{}", &existing[..b], &existing[e + END.len()..])
        }
        _ if existing.is_empty() => format!("# Benchmarks\n\n{block}\n"),
        _ => format!("{}\n{block}\n", existing.trim_end()),
    };
    std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_replace_only_the_marked_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("B.md");
        write_into(&path, "one").unwrap();
        let first = std::fs::read_to_string(&path).unwrap();
        assert!(first.contains("one"));
        std::fs::write(&path, format!("notes before\n{first}notes after\n")).unwrap();
        write_into(&path, "two").unwrap();
        let second = std::fs::read_to_string(&path).unwrap();
        assert!(second.contains("two") && !second.contains("one"));
        assert!(second.starts_with("notes before") && second.ends_with("notes after\n"));
    }
}

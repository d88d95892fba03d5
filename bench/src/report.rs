//! Turns measurements into one Markdown report: printed, and written between
//! markers in BENCHMARKS.md so the hand-written notes around it survive.

use std::{fmt::Write, path::Path, time::Duration};

use anyhow::Context;

use crate::{load::Outcome, machine::Load};

pub const BEGIN: &str = "<!-- bench:begin (written by `bench`; edits inside are overwritten) -->";
pub const END: &str = "<!-- bench:end -->";

/// One workload measured on one server.
pub struct Measured {
    pub outcome: Outcome,
    /// CPU time the server used during the workload.
    pub server_cpu: Duration,
    /// The server's peak resident memory during the workload, in KiB.
    pub peak_rss_kib: Option<u64>,
    /// Context switches of the server's threads during the workload.
    pub context_switches: Option<u64>,
}

impl Measured {
    fn cpu_per_op(&self) -> Option<Duration> {
        (self.outcome.ops > 0).then(|| self.server_cpu / self.outcome.ops as u32)
    }

    /// Context switches per operation, counted over the whole workload
    /// (warm-up included), so divided by every operation answered in it.
    pub fn switches_per_op(&self) -> Option<f64> {
        let ops = self.outcome.ops_total.max(self.outcome.ops);
        let switches = self.context_switches?;
        (ops > 0).then(|| switches as f64 / ops as f64)
    }
}

/// A workload's targets: user-manager's rate at least `min_ratio` of the
/// reference's; optionally its server CPU per operation at most
/// `max_cpu_ratio` times the reference's, and at most `max_switches` context
/// switches per operation.
#[derive(Clone, Copy)]
pub struct Targets {
    pub min_ratio: Option<f64>,
    pub max_cpu_ratio: Option<f64>,
    pub max_switches: Option<f64>,
}

/// No target: figures only.
pub const NO_TARGET: Targets = Targets {
    min_ratio: None,
    max_cpu_ratio: None,
    max_switches: None,
};

/// A throughput target alone.
pub fn min_ratio(min_ratio: f64) -> Targets {
    Targets {
        min_ratio: Some(min_ratio),
        max_cpu_ratio: None,
        max_switches: None,
    }
}

pub struct Verdict {
    pub what: String,
    pub met: bool,
    pub detail: String,
    /// Throughput and latency: moved by other work on the machine, so not
    /// judged when there was too much of it. Memory, start-up time, context
    /// switches and instruction counts hardly move and are always judged.
    pub noisy: bool,
    /// The target's table cell, before the mark.
    cell: String,
}

/// What a target's verdict is, given how busy the machine was.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Judgement {
    Met,
    Missed,
    /// Too much other work ran for the figure to mean anything: the load figure.
    NotJudged(f64),
}

/// Judges a target: `noisy` ones only when the machine was quiet enough.
pub fn judge(met: bool, noisy: bool, load: Option<&Load>) -> Judgement {
    match load {
        Some(load) if noisy && !load.quiet() => Judgement::NotJudged(load.figure()),
        _ if met => Judgement::Met,
        _ => Judgement::Missed,
    }
}

impl Judgement {
    fn mark(self) -> String {
        match self {
            Judgement::Met => "✅".into(),
            Judgement::Missed => "❌".into(),
            Judgement::NotJudged(load) => format!("not judged (load {load:.1})"),
        }
    }

    fn word(self) -> String {
        match self {
            Judgement::Met => "met".into(),
            Judgement::Missed => "**missed**".into(),
            Judgement::NotJudged(load) => format!("not judged (load {load:.1})"),
        }
    }
}

/// Marks a target cell in the table text, filled in at render time, once
/// the load over the whole run is known.
const SLOT: char = '\u{1}';

/// The report over every server measured: the reference first, then
/// user-manager (whose figures the targets judge), then any candidates.
pub struct Report {
    pub sides: Vec<String>,
    lines: String,
    pub verdicts: Vec<Verdict>,
    pub failures: u64,
    failure_notes: Vec<String>,
    /// How busy the machine was; None: judge everything.
    pub load: Option<Load>,
}

impl Report {
    pub fn new(sides: Vec<String>) -> Self {
        Self {
            sides,
            lines: String::new(),
            verdicts: Vec::new(),
            failures: 0,
            failure_notes: Vec::new(),
            load: None,
        }
    }

    /// Records a target and returns the slot of its table cell.
    fn verdict(
        &mut self,
        what: String,
        met: bool,
        detail: String,
        noisy: bool,
        cell: String,
    ) -> String {
        self.verdicts.push(Verdict {
            what,
            met,
            detail,
            noisy,
            cell,
        });
        format!("{SLOT}{}{SLOT}", self.verdicts.len() - 1)
    }

    pub fn text(&mut self, text: &str) {
        let _ = writeln!(self.lines, "{text}");
    }

    /// The header of a table: what, measure, then each server.
    pub fn table(&mut self, first: &str, measure_column: bool) {
        let (measure, measure_rule) = if measure_column {
            (" Measure |", "---|")
        } else {
            ("", "")
        };
        let mut header = format!(
            "| {first} |{measure} {} | {} | ratio | target |",
            self.sides[0], self.sides[1]
        );
        let mut rule = format!("|---|{measure_rule}--:|--:|--:|---|");
        for candidate in &self.sides[2..] {
            let _ = write!(header, " {candidate} | ratio |");
            rule.push_str("--:|--:|");
        }
        let _ = writeln!(self.lines, "{header}\n{rule}");
    }

    /// Throughput, latency, CPU and context-switch rows for one workload.
    pub fn workload(&mut self, name: &str, unit: &str, all: &[Measured], target: Targets) {
        self.count_failures(name, all);
        let rate_of = |m: &Measured| Some(m.outcome.rate());
        let ratio = all[1].outcome.rate() / all[0].outcome.rate();
        let cell = match target.min_ratio {
            None => String::new(),
            Some(min) => self.verdict(
                format!("{name}: at least {min}× the reference's throughput"),
                ratio >= min,
                ratio_detail(ratio, min),
                true,
                format!("≥ {min}×"),
            ),
        };
        self.row(name, &format!("{unit}/s"), all, rate_of, rate, &cell);
        if !all[1].outcome.latencies.is_empty() {
            for p in [50.0, 99.0] {
                let latency = |m: &Measured| m.outcome.percentile(p).map(|d| d.as_secs_f64());
                self.row(name, &format!("p{p} latency"), all, latency, ms, "");
            }
        }
        let cpu = |m: &Measured| m.cpu_per_op().map(|d| d.as_secs_f64());
        // Judged like throughput: contention on a busy machine costs cache
        // misses, which inflate it.
        let cell = match target.max_cpu_ratio {
            None => String::new(),
            Some(max) => {
                let ratio = match (cpu(&all[1]), cpu(&all[0])) {
                    (Some(ours), Some(theirs)) if theirs > 0.0 => ours / theirs,
                    _ => f64::INFINITY,
                };
                self.verdict(
                    format!("{name}: server CPU per {unit} at most {max}× the reference's"),
                    ratio <= max,
                    format!("{ratio:.2}×"),
                    true,
                    format!("≤ {max}×"),
                )
            }
        };
        self.row(name, &format!("server CPU per {unit}"), all, cpu, us, &cell);
        let switches = |m: &Measured| m.switches_per_op();
        // Always judged: a count, which other work hardly moves.
        let cell = match target.max_switches {
            None => String::new(),
            Some(max) => {
                let value = switches(&all[1]).unwrap_or(f64::INFINITY);
                self.verdict(
                    format!("{name}: at most {max} server context switches per {unit}"),
                    value <= max,
                    format!("{value:.2}"),
                    false,
                    format!("≤ {max}"),
                )
            }
        };
        self.row(
            name,
            &format!("server context switches per {unit}"),
            all,
            switches,
            count,
            &cell,
        );
    }

    /// Rows of figures with no target (instruction counts, their notes).
    pub fn figures(&mut self, name: &str, values: &[Option<f64>], format: fn(f64) -> String) {
        self.cells(name, None, values, format, "");
    }

    /// The latency target at a fixed rate: user-manager's p99 below `bound`.
    pub fn paced(&mut self, name: &str, all: &[Measured], bound: Duration) {
        self.count_failures(name, all);
        self.row(name, "rate sent", all, |m| Some(m.outcome.rate()), rate, "");
        let p50 = |m: &Measured| m.outcome.percentile(50.0).map(|d| d.as_secs_f64());
        self.row(name, "p50 latency", all, p50, ms, "");
        let p99 = |m: &Measured| m.outcome.percentile(99.0).map(|d| d.as_secs_f64());
        let ours = p99(&all[1]).unwrap_or(f64::INFINITY);
        let target = self.absolute(
            &format!("{name}: p99"),
            ours * 1e3,
            bound.as_secs_f64() * 1e3,
            "ms",
            true,
        );
        self.row(name, "p99 latency", all, p99, ms, &target);
    }

    /// A resident-memory row (KiB per server); the reference is for scale
    /// only, as it holds every user in memory.
    pub fn memory(&mut self, what: &str, kib: &[Option<u64>], max_mib: Option<f64>) {
        let target = match (kib[1], max_mib) {
            (Some(k), Some(max)) => self.absolute(what, k as f64 / 1024.0, max, "MiB", false),
            (None, Some(_)) => "not measured".into(),
            (_, None) => String::new(),
        };
        let values: Vec<Option<f64>> = kib.iter().map(|k| k.map(|k| k as f64 * 1024.0)).collect();
        self.cells(what, None, &values, mib, &target);
    }

    /// Start-up times per user-manager server (the reference's is not comparable).
    pub fn startup(&mut self, what: &str, samples: &mut [Vec<Duration>], bound: Duration) {
        let mut medians = vec![None];
        let mut maxima = vec![None];
        for s in samples.iter_mut() {
            s.sort_unstable();
            medians.push(s.get(s.len() / 2).map(Duration::as_secs_f64));
            maxima.push(s.last().map(Duration::as_secs_f64));
        }
        let worst = maxima[1].unwrap_or(f64::INFINITY);
        let target = self.absolute(
            &format!("{what} (slowest)"),
            worst * 1e3,
            bound.as_secs_f64() * 1e3,
            "ms",
            false,
        );
        let n = samples.first().map_or(0, Vec::len);
        self.cells(&format!("{what}, median of {n}"), None, &medians, ms, "");
        self.cells(
            &format!("{what}, slowest of {n}"),
            None,
            &maxima,
            ms,
            &target,
        );
    }

    fn count_failures(&mut self, name: &str, all: &[Measured]) {
        for (side, m) in self.sides.iter().zip(all) {
            self.failures += m.outcome.failures;
            if let Some(first) = &m.outcome.first_failure {
                self.failure_notes.push(format!(
                    "{name} on {side}: {} failures, first: {first}",
                    m.outcome.failures
                ));
            }
        }
    }

    fn row(
        &mut self,
        name: &str,
        measure: &str,
        all: &[Measured],
        value: impl Fn(&Measured) -> Option<f64>,
        format: fn(f64) -> String,
        target: &str,
    ) {
        let values: Vec<Option<f64>> = all.iter().map(value).collect();
        self.cells(name, Some(measure), &values, format, target);
    }

    /// One table row: the reference's value, then each server's with its
    /// ratio to the reference, user-manager's followed by the target.
    fn cells(
        &mut self,
        name: &str,
        measure: Option<&str>,
        values: &[Option<f64>],
        format: fn(f64) -> String,
        target: &str,
    ) {
        let cell = |v: Option<f64>| v.map_or_else(|| "—".to_owned(), format);
        let mut line = match measure {
            Some(measure) => format!("| {name} | {measure} | {} |", cell(values[0])),
            None => format!("| {name} | {} |", cell(values[0])),
        };
        for (i, v) in values.iter().enumerate().skip(1) {
            let ratio = match (v, values[0]) {
                (Some(v), Some(r)) if r > 0.0 => format!("{:.2}×", v / r),
                _ => String::new(),
            };
            let _ = write!(line, " {} | {ratio} |", cell(*v));
            if i == 1 {
                let _ = write!(line, " {target} |");
            }
        }
        let _ = writeln!(self.lines, "{line}");
    }

    /// Records an upper-bound target and returns its table cell.
    fn absolute(&mut self, what: &str, value: f64, bound: f64, unit: &str, noisy: bool) -> String {
        let met = value < bound;
        let detail = if met {
            format!("{value:.2} {unit}")
        } else {
            format!(
                "{value:.2} {unit}, {:.0}% over",
                (value / bound - 1.0) * 100.0
            )
        };
        self.verdict(
            format!("{what} under {bound} {unit}"),
            met,
            detail,
            noisy,
            format!("< {bound} {unit}"),
        )
    }

    fn judgement(&self, v: &Verdict) -> Judgement {
        judge(v.met, v.noisy, self.load.as_ref())
    }

    /// The report: tables, then every target's verdict, then failures.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (i, piece) in self.lines.split(SLOT).enumerate() {
            match piece.parse::<usize>().ok().filter(|_| i % 2 == 1) {
                Some(v) => {
                    let verdict = &self.verdicts[v];
                    let mark = self.judgement(verdict).mark();
                    let _ = write!(out, "{} {mark}", verdict.cell);
                }
                None => out.push_str(piece),
            }
        }
        out.push_str("\nTargets (user-manager):\n\n");
        for v in &self.verdicts {
            let word = self.judgement(v).word();
            let _ = writeln!(out, "- {word}: {} ({})", v.what, v.detail);
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

fn rate(per_sec: f64) -> String {
    if per_sec >= 1e6 {
        format!("{:.2}M", per_sec / 1e6)
    } else if per_sec >= 1e3 {
        format!("{:.1}k", per_sec / 1e3)
    } else {
        format!("{per_sec:.0}")
    }
}

fn ms(secs: f64) -> String {
    format!("{:.3} ms", secs * 1e3)
}

fn count(n: f64) -> String {
    format!("{n:.2}")
}

/// Thousands of instructions.
pub fn kilo(n: f64) -> String {
    format!("{:.1}k", n / 1e3)
}

fn us(secs: f64) -> String {
    format!("{:.1} µs", secs * 1e6)
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

/// Replaces the results between the markers of `path` (creating the file,
/// or appending the markers, when missing), keeping everything else.
/// The block's markers: [`BEGIN`] and [`END`] for the unlabelled one (SQLite,
/// one server), the label inside them for the others ("postgres, 2 replicas").
fn markers(label: Option<&str>) -> (String, String) {
    match label {
        None => (BEGIN.to_owned(), END.to_owned()),
        Some(label) => (
            BEGIN.replacen("bench:begin", &format!("bench:begin {label}"), 1),
            END.replacen("bench:end", &format!("bench:end {label}"), 1),
        ),
    }
}

pub fn write_into(path: &Path, label: Option<&str>, results: &str) -> anyhow::Result<()> {
    let (begin, end) = markers(label);
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{begin}\n{results}\n{end}");
    let found = existing
        .find(&begin)
        .and_then(|b| Some((b, b + existing[b..].find(&end)?)));
    let updated = match found {
        Some((b, e)) => {
            format!("{}{block}{}", &existing[..b], &existing[e + end.len()..])
        }
        _ if existing.is_empty() => format!("# Benchmarks\n\n{block}\n"),
        _ => format!("{}\n\n{block}\n", existing.trim_end()),
    };
    std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_machine_leaves_throughput_and_latency_unjudged() {
        let busy = Load::fixed(2, 3.0);
        let quiet = Load::fixed(2, 1.0);
        assert_eq!(judge(true, true, Some(&busy)), Judgement::NotJudged(3.0));
        assert_eq!(judge(false, true, Some(&busy)), Judgement::NotJudged(3.0));
        assert_eq!(judge(true, false, Some(&busy)), Judgement::Met);
        assert_eq!(judge(false, false, Some(&busy)), Judgement::Missed);
        assert_eq!(judge(true, true, Some(&quiet)), Judgement::Met);
        assert_eq!(judge(false, true, Some(&quiet)), Judgement::Missed);
        assert_eq!(judge(false, true, None), Judgement::Missed);
    }

    #[test]
    fn target_cells_are_judged_when_rendered() {
        let mut report = Report::new(vec!["reference".into(), "user-manager".into()]);
        report.memory("resident", &[Some(1024), Some(2048)], Some(32.0));
        report.startup(
            "start",
            &mut [vec![Duration::from_millis(500)]],
            Duration::from_millis(300),
        );
        let slot = report.absolute("p99", 2.0, 1.0, "ms", true);
        report.text(&format!("| p99 | {slot} |"));
        report.load = Some(Load::fixed(2, 4.0));
        let busy = report.render();
        assert!(busy.contains("| < 1 ms not judged (load 4.0) |"), "{busy}");
        assert!(
            busy.contains("- not judged (load 4.0): p99 under 1 ms"),
            "{busy}"
        );
        assert!(
            busy.contains("< 32 MiB ✅") && busy.contains("< 300 ms ❌"),
            "{busy}"
        );
        report.load = Some(Load::fixed(2, 0.5));
        let quiet = report.render();
        assert!(quiet.contains("| < 1 ms ❌ |"), "{quiet}");
        assert!(!quiet.contains('\u{1}'), "{quiet}");
    }

    #[test]
    fn results_replace_only_the_marked_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("B.md");
        write_into(&path, None, "one").unwrap();
        let first = std::fs::read_to_string(&path).unwrap();
        assert!(first.contains("one"));
        std::fs::write(&path, format!("notes before\n{first}notes after\n")).unwrap();
        write_into(&path, None, "two").unwrap();
        let second = std::fs::read_to_string(&path).unwrap();
        assert!(second.contains("two") && !second.contains("one"));
        assert!(second.starts_with("notes before") && second.ends_with("notes after\n"));
    }

    #[test]
    fn each_label_has_its_own_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("B.md");
        write_into(&path, None, "sqlite").unwrap();
        write_into(&path, Some("postgres, 1 replica"), "pg1").unwrap();
        write_into(&path, Some("postgres, 2 replicas"), "pg2").unwrap();
        write_into(&path, Some("postgres, 1 replica"), "pg1 again").unwrap();
        write_into(&path, None, "sqlite again").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        for kept in ["sqlite again", "pg1 again", "pg2"] {
            assert!(text.contains(kept), "{kept} in {text}");
        }
        assert!(
            !text.contains("sqlite\n") && !text.contains("pg1\n"),
            "{text}"
        );
        let order: Vec<usize> = ["sqlite again", "pg1 again", "pg2"]
            .iter()
            .map(|t| text.find(t).unwrap())
            .collect();
        assert!(order.is_sorted(), "blocks stay where they were: {text}");
    }
}

//! The end of a run: a JSON report for scripts and CI (`--report`), and a
//! one-screen summary for people.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::check::Verdict;
use crate::measure::Latency;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub speed: f64,
    pub homes: usize,
    pub devices: usize,
    pub qos: u8,
    pub sim_start: String,
    pub sim_end: String,
    pub wall_seconds: f64,
    /// Seconds until every device had connected (the ramp-up).
    pub ramp_seconds: f64,
    pub connects: u64,
    pub publishes_sent: u64,
    pub publishes_acked: u64,
    /// Events the acknowledged publishes make in `HEARTH_EVENTS` (keypad
    /// requests make none).
    pub events_sent: u64,
    pub events_acked: u64,
    pub outstanding_at_end: i64,
    /// Connections dropped without goodbye: each a last will the gateway
    /// stores as an availability event (besides `events_acked`).
    pub wills: u64,
    /// Publishes acknowledged per second while simulating (the ramp-up's
    /// not counted).
    pub acked_per_second: f64,
    pub commands_received: u64,
    pub puback: Latency,
    pub puback_flood: Option<Latency>,
    pub reaction: Latency,
    /// How the reactions were matched to their motion: by correlation id
    /// (with `--nats-url`), or by room and time.
    pub reactions_by_correlation: u64,
    pub reactions_by_room: u64,
    pub errors: BTreeMap<String, u64>,
    pub check: Option<Vec<Verdict>>,
    pub passed: Option<bool>,
}

fn latency_line(name: &str, latency: &Latency) -> String {
    if latency.count == 0 {
        return format!("  {name:<24} none measured\n");
    }
    format!(
        "  {name:<24} p50 {:>8.2} ms  p90 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  ({} samples)\n",
        latency.p50_ms, latency.p90_ms, latency.p99_ms, latency.max_ms, latency.count
    )
}

impl Report {
    /// The human summary.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "hearth-sim: {} (seed {}, speed {}x), {} home(s), {} devices, QoS {}",
            self.scenario, self.seed, self.speed, self.homes, self.devices, self.qos
        );
        let _ = writeln!(
            out,
            "  simulated {} → {} in {:.1} s (ramp-up {:.1} s), {} connects",
            self.sim_start, self.sim_end, self.wall_seconds, self.ramp_seconds, self.connects
        );
        let _ = writeln!(
            out,
            "  publishes sent {}, acknowledged {} ({:.0}/s), outstanding {}; events sent {}, acknowledged {}",
            self.publishes_sent,
            self.publishes_acked,
            self.acked_per_second,
            self.outstanding_at_end,
            self.events_sent,
            self.events_acked
        );
        if self.wills > 0 {
            let _ = writeln!(
                out,
                "  connections dropped without goodbye (last wills): {}",
                self.wills
            );
        }
        let _ = writeln!(
            out,
            "  commands and states received by devices: {}",
            self.commands_received
        );
        out.push_str(&latency_line("publish → PUBACK", &self.puback));
        if let Some(flood) = &self.puback_flood {
            out.push_str(&latency_line("flooding device PUBACK", flood));
        }
        out.push_str(&latency_line("motion → light command", &self.reaction));
        if self.reaction.count > 0 {
            let _ = writeln!(
                out,
                "  {:<24} {} by correlation id, {} by room and time",
                "(matched)", self.reactions_by_correlation, self.reactions_by_room
            );
        }
        if self.errors.is_empty() {
            let _ = writeln!(out, "  errors: none");
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(out, "  errors: {}", list.join(", "));
        }
        if let Some(check) = &self.check {
            for verdict in check {
                let _ = writeln!(
                    out,
                    "  check {}: {} ({})",
                    if verdict.passed { "PASS" } else { "FAIL" },
                    verdict.expectation,
                    verdict.detail
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_shows_counts_percentiles_errors_and_verdicts() {
        let report = Report {
            scenario: "burglary".into(),
            seed: 3,
            speed: 1440.0,
            homes: 1,
            devices: 27,
            qos: 1,
            sim_start: "day 0 06:00".into(),
            sim_end: "day 0 18:00".into(),
            wall_seconds: 30.0,
            ramp_seconds: 0.5,
            connects: 27,
            publishes_sent: 500,
            publishes_acked: 500,
            events_sent: 498,
            events_acked: 498,
            outstanding_at_end: 0,
            wills: 0,
            acked_per_second: 16.7,
            commands_received: 4,
            puback: Latency {
                count: 500,
                p50_ms: 1.0,
                p90_ms: 2.0,
                p99_ms: 3.0,
                max_ms: 4.0,
            },
            puback_flood: None,
            reaction: Latency::default(),
            reactions_by_correlation: 0,
            reactions_by_room: 0,
            errors: BTreeMap::from([("io".to_owned(), 2)]),
            check: Some(vec![Verdict {
                expectation: "siren".into(),
                passed: true,
                detail: "after 5.1 s".into(),
            }]),
            passed: Some(true),
        };
        let text = report.summary();
        assert!(text.contains("p99     3.00 ms"), "{text}");
        assert!(
            text.contains("motion → light command   none measured"),
            "{text}"
        );
        assert!(text.contains("errors: io 2"), "{text}");
        assert!(text.contains("check PASS: siren (after 5.1 s)"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["events_acked"], 498);
        assert_eq!(json["puback"]["p99_ms"], 3.0);
    }
}

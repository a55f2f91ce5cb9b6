//! Keeps the Grafana dashboard (`deploy/grafana/hearth.json`) honest.
//!
//! A static check, nothing runs: the dashboard is read as JSON and every
//! PromQL expression in it (panel targets and template variables) is
//! matched against the source code of the gateway (`gateway/src`) and of
//! the rules (`consumers/src`):
//!
//! - every metric (an identifier starting with `hearth_`, with a
//!   histogram's `_bucket`, `_sum` or `_count` taken off) must be named in
//!   quotes somewhere in that code, as `metrics::counter!("...")` or a
//!   `const X: &str = "..."` does, so renaming a metric in the code
//!   without the dashboard fails here;
//! - a metric read through `_bucket` must have buckets set in the file
//!   that names it (`Matcher::Full(...)`): without them the exporter
//!   renders a summary, and `histogram_quantile` would find nothing;
//! - every label the dashboard groups by, matches on or shows in a legend
//!   must be one the code sets (`"label" =>`) or one Prometheus adds
//!   (`instance`, `job`, `le`). Which metric carries which label is not
//!   checked;
//! - the JSON has a dashboard's shape: panels, each (but rows) with a
//!   datasource (the `datasource` template variable) and targets whose
//!   expressions follow the `instance` variable; no `${DS_...}` import
//!   inputs, which file provisioning cannot resolve.
//!
//! It does not prove the expressions are valid PromQL or that the series
//! have data: `deploy/grafana/README.md` says how that was checked.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/hearth.json");

/// Labels that Prometheus itself attaches or that histograms carry.
const PROMETHEUS_LABELS: &[&str] = &["instance", "job", "le", "__name__"];

/// The Rust files of the gateway and of the rules: (path, text).
fn sources() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                out.push((path, text));
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    walk(&root.join("../gateway/src"), &mut out);
    walk(&root.join("src"), &mut out);
    assert!(
        out.len() > 10,
        "found only {} source files: is the checkout complete?",
        out.len()
    );
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The `hearth_` metric names in a PromQL expression, as written.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("hearth_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let end = tail.find(|c: char| !is_ident(c)).unwrap_or(tail.len());
        if !before.is_some_and(is_ident) {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// The label names an expression groups by (`by`, `without`, `on`,
/// `ignoring`) or matches on (`{label="..."}`), and those a legend shows
/// (`{{label}}`).
fn label_names(expr: &str, legend: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    // Grouping clauses: a keyword, then a parenthesised list.
    for keyword in ["by", "without", "on", "ignoring"] {
        let mut rest = expr;
        while let Some(at) = rest.find(keyword) {
            let before = rest[..at].chars().next_back();
            let after = rest[at + keyword.len()..].trim_start();
            if !before.is_some_and(is_ident) && after.starts_with('(') {
                let list = &after[1..after.find(')').expect("unclosed grouping")];
                labels.extend(
                    list.split(',')
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_owned),
                );
            }
            rest = &rest[at + keyword.len()..];
        }
    }
    // Matchers: `{a="x", b=~"y"}`; commas inside quoted values are skipped.
    let mut rest = expr;
    while let Some(open) = rest.find('{') {
        let body = &rest[open + 1..];
        let mut quoted = false;
        let mut start = 0;
        let mut close = body.len();
        for (i, c) in body.char_indices() {
            match c {
                '"' => quoted = !quoted,
                ',' | '}' if !quoted => {
                    let matcher = &body[start..i];
                    if let Some(name_end) = matcher.find(['=', '!']) {
                        labels.insert(matcher[..name_end].trim().to_owned());
                    }
                    start = i + 1;
                    if c == '}' {
                        close = i;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &body[close..];
    }
    let mut rest = legend;
    while let Some(open) = rest.find("{{") {
        let body = &rest[open + 2..];
        let close = body.find("}}").expect("unclosed {{ in a legend");
        labels.insert(body[..close].trim().to_owned());
        rest = &body[close + 2..];
    }
    labels
}

/// What is wrong with the metrics and labels of one expression, given the
/// code: one line per problem.
fn problems(expr: &str, legend: &str, sources: &[(PathBuf, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for name in metric_names(expr) {
        let (base, suffix) = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| Some((name.strip_suffix(suffix)?, *suffix)))
            .unwrap_or((name.as_str(), ""));
        let quoted = format!("\"{base}\"");
        let defined_in: Vec<&(PathBuf, String)> = sources
            .iter()
            .filter(|(_, text)| text.contains(&quoted))
            .collect();
        if defined_in.is_empty() {
            found.push(format!(
                "metric {name}: no {quoted} in gateway/src or consumers/src (renamed?)"
            ));
            continue;
        }
        if suffix == "_bucket" && !defined_in.iter().any(|(_, text)| has_buckets(text, base)) {
            found.push(format!(
                "metric {name}: {base} has no buckets set (Matcher::Full) where it is named, \
                 so it is rendered as a summary without _bucket series"
            ));
        }
    }
    for label in label_names(expr, legend) {
        let set = format!("\"{label}\" =>");
        if !PROMETHEUS_LABELS.contains(&label.as_str())
            && !sources.iter().any(|(_, text)| text.contains(&set))
        {
            found.push(format!(
                "label {label}: no metric sets it ({set} in gateway/src or consumers/src)"
            ));
        }
    }
    found
}

/// Whether `text` sets histogram buckets for `metric`, by its name or by
/// the constant that holds it.
fn has_buckets(text: &str, metric: &str) -> bool {
    let quoted = format!("\"{metric}\"");
    let mut spellings = vec![quoted.clone()];
    for line in text.lines() {
        let line = line.trim();
        if let Some(constant) = line
            .strip_suffix(&format!(": &str = {quoted};"))
            .and_then(|head| head.rsplit(' ').next())
        {
            spellings.push(constant.to_owned());
        }
    }
    spellings
        .iter()
        .any(|name| text.contains(&format!("Matcher::Full({name}")))
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(DASHBOARD)
        .unwrap_or_else(|e| panic!("cannot read {DASHBOARD}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

/// Every (where, expression, legend) of the dashboard: panel targets and
/// query variables.
fn expressions(dashboard: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                format!("panel {}", panel["title"]),
                target["expr"].as_str().unwrap_or_default().to_owned(),
                target["legendFormat"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            ));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] == "query" {
            let query = &variable["query"];
            let text = query.as_str().or_else(|| query["query"].as_str());
            out.push((
                format!("variable {}", variable["name"]),
                text.unwrap_or_default().to_owned(),
                String::new(),
            ));
        }
    }
    out
}

#[test]
fn every_metric_and_label_on_the_dashboard_is_one_the_code_records() {
    let sources = sources();
    let dashboard = dashboard();
    let expressions = expressions(&dashboard);
    let mut used = BTreeSet::new();
    let mut found = Vec::new();
    for (place, expr, legend) in &expressions {
        used.extend(metric_names(expr));
        found.extend(
            problems(expr, legend, &sources)
                .into_iter()
                .map(|problem| format!("{place}: {problem}")),
        );
    }
    assert!(
        found.is_empty(),
        "the dashboard does not match the code:\n{}",
        found.join("\n")
    );
    // Guards against an extractor that silently finds nothing.
    assert!(
        used.len() >= 20,
        "only {} hearth metrics found on the dashboard: {used:?}",
        used.len()
    );
}

#[test]
fn the_dashboard_has_a_dashboards_shape_and_imports_anywhere() {
    let dashboard = dashboard();
    let text = dashboard.to_string();
    assert!(
        !text.contains("${DS_"),
        "import inputs (${{DS_...}}) do not resolve when Grafana provisions the file: \
         use the datasource variable"
    );
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let datasource = variables
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a `datasource` variable");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    assert!(
        variables.iter().any(|v| v["name"] == "instance"),
        "an `instance` variable"
    );
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let mut ids = BTreeSet::new();
    for panel in panels {
        let title = &panel["title"];
        let id = panel["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("{title}: no id"));
        assert!(ids.insert(id), "{title}: id {id} used twice");
        for key in ["x", "y", "w", "h"] {
            assert!(panel["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
        }
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{title}: the panel's datasource is the variable"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no targets");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(!expr.is_empty(), "{title}: a target without expr");
            assert!(
                target["refId"].is_string(),
                "{title}: a target without refId"
            );
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            for selector in expr.match_indices('{') {
                let matchers = &expr[selector.0..];
                assert!(
                    matchers.starts_with("{instance=~\"$instance\"")
                        || matchers.starts_with("{__name__"),
                    "{title}: every selector follows the instance variable: {expr}"
                );
            }
            assert!(
                expr.contains("$instance"),
                "{title}: does not follow the instance variable: {expr}"
            );
        }
    }
}

/// The check itself catches what it is for (a test of the test).
#[test]
fn a_renamed_metric_or_label_or_a_histogram_without_buckets_is_caught() {
    let sources = sources();
    let ok = r#"histogram_quantile(0.99, sum by (consumer, le) (rate(hearth_consumer_handler_seconds_bucket{instance=~"$instance"}[5m])))"#;
    assert_eq!(problems(ok, "{{consumer}}", &sources), Vec::<String>::new());
    let ok = r#"sum(rate(hearth_gateway_store_seconds_bucket{instance=~"$instance"}[5m]))"#;
    assert_eq!(problems(ok, "", &sources), Vec::<String>::new());

    let renamed = r#"sum(rate(hearth_gateway_event_total{instance=~"$instance"}[5m]))"#;
    assert_eq!(problems(renamed, "", &sources).len(), 1, "{renamed}");
    let label = r#"sum by (home) (rate(hearth_gateway_events_total[5m]))"#;
    assert_eq!(problems(label, "", &sources).len(), 1, "{label}");
    let legend = r#"sum(rate(hearth_gateway_events_total[5m]))"#;
    assert_eq!(problems(legend, "{{device}}", &sources).len(), 1);
    let matcher = r#"rate(hearth_gateway_events_total{room="x", kind="motion"}[5m])"#;
    assert_eq!(problems(matcher, "", &sources).len(), 1, "{matcher}");
    let summary = r#"rate(hearth_commands_total_bucket[5m])"#;
    assert_eq!(problems(summary, "", &sources).len(), 1, "{summary}");
}

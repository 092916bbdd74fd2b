//! A run's results: the JSON file, the human summary and the self-contained HTML report
//! (inline SVG charts; no script, no network).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

/// One point of the timeline, sampled every half second.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    /// Seconds since the run started.
    pub t: f64,
    /// Devices connected.
    pub connected: u64,
    /// Pushes received by devices, in all.
    pub received: u64,
    /// Resident memory of the node processes together, bytes.
    pub node_rss: u64,
    /// Resident memory of the simulators together, bytes.
    pub sim_rss: u64,
    /// Resident memory of Redis, bytes.
    pub redis_rss: u64,
}

/// Latency percentiles, microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50: u32,
    /// 90th percentile.
    pub p90: u32,
    /// 99th percentile.
    pub p99: u32,
    /// 99.9th percentile.
    pub p999: u32,
    /// Largest.
    pub max: u32,
}

impl Percentiles {
    /// Percentiles of `samples`, which are sorted in place.
    pub fn of(samples: &mut [u32]) -> Self {
        samples.sort_unstable();
        let at = |q: f64| -> u32 {
            if samples.is_empty() {
                return 0;
            }
            let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[index]
        };
        Self {
            count: samples.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: samples.last().copied().unwrap_or(0),
        }
    }
}

/// Everything a run found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunResult {
    /// The scenario.
    pub scenario: String,
    /// The command line.
    pub command: String,
    /// Whether every check passed.
    pub ok: bool,
    /// What went wrong, loudly.
    pub problems: Vec<String>,
    /// The scenario's figures, by name.
    pub figures: serde_json::Map<String, serde_json::Value>,
    /// Latency percentiles (unicast).
    pub latency: Option<Percentiles>,
    /// The latency CDF for the chart: (microseconds, fraction), up to 200 points.
    pub latency_cdf: Vec<(u32, f64)>,
    /// Errors by kind (unicast and broadcast pushes).
    pub errors: std::collections::BTreeMap<String, u64>,
    /// The timeline.
    pub timeline: Vec<Sample>,
}

impl RunResult {
    /// Records a figure.
    pub fn figure(&mut self, name: &str, value: impl Into<serde_json::Value>) {
        self.figures.insert(name.to_owned(), value.into());
    }

    /// Records a problem; the run will fail.
    pub fn problem(&mut self, problem: impl Into<String>) {
        self.problems.push(problem.into());
    }

    /// The CDF points of sorted `samples`.
    pub fn set_cdf(&mut self, sorted: &[u32]) {
        if sorted.is_empty() {
            return;
        }
        let points = 200.min(sorted.len());
        self.latency_cdf = (1..=points)
            .map(|k| {
                let index = (k * sorted.len()).div_ceil(points) - 1;
                (sorted[index], (index + 1) as f64 / sorted.len() as f64)
            })
            .collect();
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let mut text = format!("\n== pigeon-load {} ==\n", self.scenario);
        for (name, value) in &self.figures {
            let _ = writeln!(text, "  {name:<34} {value}");
        }
        if let Some(latency) = &self.latency {
            let _ = writeln!(
                text,
                "  latency (ms)                       p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  ({} samples)",
                ms(latency.p50),
                ms(latency.p90),
                ms(latency.p99),
                ms(latency.p999),
                ms(latency.max),
                latency.count
            );
        }
        for (kind, count) in &self.errors {
            let _ = writeln!(text, "  error {kind}: {count}");
        }
        if self.ok {
            text.push_str(
                "  result: OK (no gap, no duplicate lost, every expected message received)\n",
            );
        } else {
            text.push_str("  result: FAILED\n");
            for problem in &self.problems {
                let _ = writeln!(text, "  !! {problem}");
            }
        }
        text
    }

    /// Writes `result.json` and `report.html` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("result.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("report.html"), self.html())?;
        Ok(())
    }

    fn html(&self) -> String {
        let mut html = String::from(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>pigeon-load</title>\
             <style>body{font:14px system-ui,sans-serif;margin:2em;max-width:60em}\
             table{border-collapse:collapse}td{padding:2px 12px;border-bottom:1px solid #ddd}\
             .bad{color:#b00;font-weight:bold}.ok{color:#070;font-weight:bold}\
             svg{background:#fafafa;border:1px solid #ddd;margin:1em 0}</style></head><body>",
        );
        let _ = write!(
            html,
            "<h1>pigeon-load {}</h1><p><code>{}</code></p>",
            escape(&self.scenario),
            escape(&self.command)
        );
        if self.ok {
            html.push_str("<p class=\"ok\">OK: no gap, every expected message received</p>");
        } else {
            html.push_str("<p class=\"bad\">FAILED</p><ul>");
            for problem in &self.problems {
                let _ = write!(html, "<li class=\"bad\">{}</li>", escape(problem));
            }
            html.push_str("</ul>");
        }
        html.push_str("<table>");
        for (name, value) in &self.figures {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td></tr>",
                escape(name),
                escape(&value.to_string())
            );
        }
        if let Some(latency) = &self.latency {
            let _ = write!(
                html,
                "<tr><td>latency p50 / p90 / p99 / p99.9 / max (ms)</td><td>{:.2} / {:.2} / {:.2} / {:.2} / {:.2}</td></tr>",
                ms(latency.p50),
                ms(latency.p90),
                ms(latency.p99),
                ms(latency.p999),
                ms(latency.max)
            );
        }
        for (kind, count) in &self.errors {
            let _ = write!(
                html,
                "<tr><td class=\"bad\">error {}</td><td>{count}</td></tr>",
                escape(kind)
            );
        }
        html.push_str("</table>");
        if !self.latency_cdf.is_empty() {
            let points: Vec<(f64, f64)> = self
                .latency_cdf
                .iter()
                .map(|(us, fraction)| (f64::from(*us) / 1000.0, *fraction))
                .collect();
            html.push_str(&chart(
                "Latency CDF (send to device receipt)",
                "ms",
                "fraction",
                &[("latency", "#0a6", &points)],
            ));
        }
        let series = |value: fn(&Sample) -> f64| -> Vec<(f64, f64)> {
            self.timeline.iter().map(|s| (s.t, value(s))).collect()
        };
        html.push_str(&chart(
            "Connections over time",
            "s",
            "connections",
            &[("connected", "#06c", &series(|s| s.connected as f64))],
        ));
        html.push_str(&chart(
            "Resident memory over time",
            "s",
            "MiB",
            &[
                (
                    "nodes",
                    "#c30",
                    &series(|s| s.node_rss as f64 / 1_048_576.0),
                ),
                (
                    "simulators",
                    "#06c",
                    &series(|s| s.sim_rss as f64 / 1_048_576.0),
                ),
                (
                    "redis",
                    "#990",
                    &series(|s| s.redis_rss as f64 / 1_048_576.0),
                ),
            ],
        ));
        html.push_str("</body></html>\n");
        html
    }
}

fn ms(us: u32) -> f64 {
    f64::from(us) / 1000.0
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One line of a chart: its name, its colour and its points.
type Series<'a> = (&'a str, &'a str, &'a [(f64, f64)]);

/// A line chart as inline SVG.
fn chart(title: &str, x_label: &str, y_label: &str, series: &[Series<'_>]) -> String {
    let (width, height, pad) = (720.0, 260.0, 50.0);
    let all = series.iter().flat_map(|(_, _, points)| points.iter());
    let (mut x_max, mut y_max) = (0.0f64, 0.0f64);
    for (x, y) in all {
        x_max = x_max.max(*x);
        y_max = y_max.max(*y);
    }
    let (x_max, y_max) = (x_max.max(1e-9), y_max.max(1e-9));
    let mut svg = format!(
        "<h3>{}</h3><svg width=\"{width}\" height=\"{height}\" xmlns=\"http://www.w3.org/2000/svg\">",
        escape(title)
    );
    let _ = write!(
        svg,
        "<line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#888\"/>\
         <line x1=\"{pad}\" y1=\"{t}\" x2=\"{pad}\" y2=\"{b}\" stroke=\"#888\"/>\
         <text x=\"{r}\" y=\"{lb}\" text-anchor=\"end\" font-size=\"11\">{x_max:.1} {xl}</text>\
         <text x=\"{pad}\" y=\"{lb}\" font-size=\"11\">0</text>\
         <text x=\"4\" y=\"{t}\" font-size=\"11\">{y_max:.1} {yl}</text>",
        b = height - pad,
        r = width - 10.0,
        t = 20.0,
        lb = height - pad + 16.0,
        xl = escape(x_label),
        yl = escape(y_label),
    );
    for (index, (name, colour, points)) in series.iter().enumerate() {
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| {
                let px = pad + x / x_max * (width - pad - 10.0);
                let py = height - pad - y / y_max * (height - pad - 20.0);
                format!("{px:.1},{py:.1}")
            })
            .collect();
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\
             <text x=\"{}\" y=\"{}\" fill=\"{colour}\" font-size=\"12\">{}</text>",
            path.join(" "),
            width - 150.0,
            36.0 + 16.0 * index as f64,
            escape(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_right_ranks() {
        let mut samples: Vec<u32> = (1..=1000).rev().collect();
        let p = Percentiles::of(&mut samples);
        assert_eq!(
            (p.p50, p.p90, p.p99, p.p999, p.max),
            (500, 900, 990, 999, 1000)
        );
        assert_eq!(Percentiles::of(&mut []).max, 0);
    }

    #[test]
    fn the_html_report_is_self_contained() {
        let mut result = RunResult {
            scenario: "idle".into(),
            ok: true,
            ..RunResult::default()
        };
        result.timeline.push(Sample {
            t: 1.0,
            connected: 10,
            ..Sample::default()
        });
        let html = result.html();
        assert!(html.contains("<svg"));
        assert!(!html.contains("<script"));
        assert!(!html.contains("https://"));
    }
}

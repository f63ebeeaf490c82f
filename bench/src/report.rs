//! BENCHMARKS.md: the machine, a table of figures with their ceilings and
//! ratios, and SVG charts drawn with plotters.

use std::fmt::Write as _;
use std::ops::Range;
use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

use crate::load::ms;

/// One line of the table.
pub struct Row {
    pub scenario: String,
    pub result: String,
    pub ceiling: String,
    /// Result over ceiling, where one applies.
    pub ratio: Option<f64>,
    pub target: String,
    /// Whether the target is met, where one is set.
    pub met: Option<bool>,
}

#[derive(Default)]
pub struct Report {
    pub machine: Vec<(String, String)>,
    pub rows: Vec<Row>,
    /// Latency histograms for the percentile chart, by scenario.
    pub latencies: Vec<(String, Histogram<u64>)>,
    /// Submissions accepted per second during ingest.
    pub timeline: Vec<u64>,
    /// Freshness histograms for the distribution chart.
    pub freshness: Vec<(String, Histogram<u64>)>,
}

const PERCENTILES: [(&str, f64); 5] = [
    ("p50", 0.5),
    ("p90", 0.9),
    ("p99", 0.99),
    ("p99.9", 0.999),
    ("max", 1.0),
];

impl Report {
    pub fn row(
        &mut self,
        scenario: &str,
        result: String,
        ceiling: String,
        ratio: Option<f64>,
        target: &str,
        met: Option<bool>,
    ) {
        self.rows.push(Row {
            scenario: scenario.into(),
            result,
            ceiling,
            ratio,
            target: target.into(),
            met,
        });
    }

    pub fn markdown(&self, charts: &str, command: &str) -> String {
        let mut md = String::from("# Podium benchmarks\n\n");
        let _ = writeln!(md, "Written by `{command}`; every ceiling is measured in the same run, on the same machine, so the ratios survive a noisy machine better than the raw figures.\n");
        md.push_str("| machine | |\n|---|---|\n");
        for (key, value) in &self.machine {
            let _ = writeln!(md, "| {key} | {value} |");
        }
        md.push_str("\n| scenario | result | ceiling (same run) | ratio | target | met |\n|---|---|---|---|---|---|\n");
        for row in &self.rows {
            let ratio = row
                .ratio
                .map_or("—".to_string(), |r| format!("{:.0}%", r * 100.0));
            let met = match row.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {ratio} | {} | {met} |",
                row.scenario, row.result, row.ceiling, row.target
            );
        }
        md.push_str("\n## Latency percentiles\n\n| scenario | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |\n|---|---|---|---|---|---|\n");
        for (name, h) in self.latencies.iter().chain(&self.freshness) {
            let cells: Vec<String> = PERCENTILES
                .iter()
                .map(|(_, q)| format!("{:.2}", ms(h, *q)))
                .collect();
            let _ = writeln!(md, "| {name} | {} |", cells.join(" | "));
        }
        let _ = write!(
            md,
            "\n## Charts\n\n![latency percentiles]({charts}/latency.svg)\n\n![ingest throughput over time]({charts}/ingest.svg)\n\n![freshness distribution]({charts}/freshness.svg)\n"
        );
        md
    }

    /// Draws the three charts into `dir`.
    pub fn charts(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        self.latency_chart(&dir.join("latency.svg"))?;
        self.ingest_chart(&dir.join("ingest.svg"))?;
        self.freshness_chart(&dir.join("freshness.svg"))?;
        Ok(())
    }

    fn latency_chart(&self, path: &Path) -> anyhow::Result<()> {
        let top = self
            .latencies
            .iter()
            .map(|(_, h)| ms(h, 0.999))
            .fold(1.0f64, f64::max)
            * 1.15;
        let lines = self
            .latencies
            .iter()
            .map(|(name, h)| {
                let points = PERCENTILES[..4]
                    .iter()
                    .enumerate()
                    .map(|(x, (_, q))| (x as f64, ms(h, *q)))
                    .collect();
                (name.clone(), points)
            })
            .collect();
        let percentile = |x: &f64| {
            PERCENTILES
                .get(x.round() as usize)
                .map_or(String::new(), |p| p.0.to_string())
        };
        plot(
            path,
            Axes {
                caption: "Latency percentiles (ms)",
                x: 0.0..3.0,
                y: 0.0..top,
                x_desc: "percentile",
                y_desc: "ms",
                x_label: Some(&percentile),
            },
            lines,
        )
    }

    fn ingest_chart(&self, path: &Path) -> anyhow::Result<()> {
        let top = self.timeline.iter().copied().max().unwrap_or(1) as f64 * 1.2;
        let points = self
            .timeline
            .iter()
            .enumerate()
            .map(|(s, n)| (s as f64 + 0.5, *n as f64))
            .collect();
        plot(
            path,
            Axes {
                caption: "Ingest: submissions accepted per second",
                x: 0.0..self.timeline.len().max(1) as f64,
                y: 0.0..top.max(1.0),
                x_desc: "second",
                y_desc: "submissions/s",
                x_label: None,
            },
            vec![("submissions/s".into(), points)],
        )
    }

    fn freshness_chart(&self, path: &Path) -> anyhow::Result<()> {
        let right = self
            .freshness
            .iter()
            .map(|(_, h)| ms(h, 0.999))
            .fold(1.0f64, f64::max)
            * 1.1;
        let lines = self
            .freshness
            .iter()
            .map(|(name, h)| {
                let points = (0..=200)
                    .map(|step| {
                        let q = f64::from(step) / 200.0;
                        (ms(h, q), q)
                    })
                    .collect();
                (name.clone(), points)
            })
            .collect();
        plot(
            path,
            Axes {
                caption: "Freshness: submission's 200 → visible (cumulative)",
                x: 0.0..right,
                y: 0.0..1.0,
                x_desc: "ms",
                y_desc: "fraction of submissions",
                x_label: None,
            },
            lines,
        )
    }
}

/// A chart's title, ranges and axis names.
struct Axes<'a> {
    caption: &'a str,
    x: Range<f64>,
    y: Range<f64>,
    x_desc: &'a str,
    y_desc: &'a str,
    /// How x values are labelled, when not as numbers.
    x_label: Option<&'a dyn Fn(&f64) -> String>,
}

/// Draws one labelled line per series, with a legend, into an SVG at `path`.
fn plot(path: &Path, axes: Axes<'_>, lines: Vec<(String, Vec<(f64, f64)>)>) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(axes.caption, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(axes.x, axes.y)?;
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(axes.x_desc).y_desc(axes.y_desc);
    if let Some(label) = axes.x_label {
        mesh.x_labels(4).x_label_formatter(label);
    }
    mesh.draw()?;
    for (i, (name, points)) in lines.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

//! SVG charts for reports, drawn with plotters' SVG backend into strings that are inlined into
//! the HTML page: line charts (optionally on log2 axes, for GPU counts and token counts),
//! stacked bars (memory per GPU) and a timeline (campaign stages). Every chart has axis
//! descriptions with units and a legend; text uses the generic `sans-serif` family so that the
//! page needs no font files.

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, Result};

/// Colour-blind-friendly categorical palette (Okabe & Ito 2008, "Color Universal Design").
const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(120, 120, 120),
    RGBColor(240, 228, 66),
];

/// The i-th colour of the palette.
pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

const W: u32 = 640;
const H: u32 = 400;
const FONT: &str = "sans-serif";

fn chart_err(e: impl std::fmt::Display) -> Error {
    Error::invalid("chart", e.to_string())
}

/// How an axis maps values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scale {
    Linear,
    /// Plotted as log2(value); ticks at powers of two.
    Log2,
}

impl Scale {
    fn map(self, v: f64) -> f64 {
        match self {
            Scale::Linear => v,
            Scale::Log2 => v.max(f64::MIN_POSITIVE).log2(),
        }
    }
}

/// One line of a line chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    /// (x, y) in data units; drawn in the given order.
    pub points: Vec<(f64, f64)>,
}

/// A line chart with markers.
pub struct LineChart<'a> {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub x_scale: Scale,
    pub y_scale: Scale,
    pub x_fmt: &'a dyn Fn(f64) -> String,
    pub y_fmt: &'a dyn Fn(f64) -> String,
    pub series: Vec<Series>,
    /// Start a linear y axis at zero.
    pub y_from_zero: bool,
}

fn padded(lo: f64, hi: f64, frac: f64, min_pad: f64) -> (f64, f64) {
    let pad = ((hi - lo) * frac).max(min_pad);
    (lo - pad, hi + pad)
}

/// Tick labels on a log2 axis: only at whole powers of two.
fn log2_label(v: f64, f: &dyn Fn(f64) -> String) -> String {
    if (v - v.round()).abs() < 1e-6 {
        f(2f64.powi(v.round() as i32))
    } else {
        String::new()
    }
}

/// The plotted ranges (x0, x1, y0, y1) of a line chart, in scale units: the points' extent
/// padded, the y axis from zero when asked on a linear scale.
fn line_chart_bounds(c: &LineChart) -> (f64, f64, f64, f64) {
    let pts: Vec<(f64, f64)> = c
        .series
        .iter()
        .flat_map(|s| s.points.iter())
        .map(|&(x, y)| (c.x_scale.map(x), c.y_scale.map(y)))
        .collect();
    let (x0, x1) = min_max(pts.iter().map(|p| p.0)).unwrap_or((0.0, 1.0));
    let (y0, y1) = min_max(pts.iter().map(|p| p.1)).unwrap_or((0.0, 1.0));
    let (x0, x1) = padded(x0, x1, 0.03, 0.25);
    let (mut y0, y1) = padded(
        y0,
        y1,
        0.08,
        if c.y_scale == Scale::Log2 { 0.5 } else { 1e-9 },
    );
    if c.y_from_zero && c.y_scale == Scale::Linear {
        y0 = 0.0;
    }
    (x0, x1, y0, y1)
}

/// Tick labels on an axis from `lo` to `hi`: one per power of two on a log scale (2 to 24),
/// else 8.
fn label_count(scale: Scale, lo: f64, hi: f64) -> usize {
    match scale {
        Scale::Log2 => ((hi - lo).ceil() as usize + 1).clamp(2, 24),
        Scale::Linear => 8,
    }
}

/// Keeps the legend off the lines: upper right when most series fall from left to right.
fn legend_position(series: &[Series]) -> SeriesLabelPosition {
    let falling = series
        .iter()
        .filter(|s| s.points.len() >= 2)
        .filter(|s| s.points[0].1 > s.points[s.points.len() - 1].1)
        .count()
        * 2
        > series.iter().filter(|s| s.points.len() >= 2).count();
    if falling {
        SeriesLabelPosition::UpperRight
    } else {
        SeriesLabelPosition::UpperLeft
    }
}

/// Renders a line chart to an SVG string. Series without points are listed in the legend as
/// "(none fit)" so that a missing line is explained.
pub fn line_chart(c: &LineChart) -> Result<String> {
    let (x0, x1, y0, y1) = line_chart_bounds(c);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&c.title, (FONT, 18))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(78)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(chart_err)?;
        let xf = |v: &f64| match c.x_scale {
            Scale::Log2 => log2_label(*v, c.x_fmt),
            Scale::Linear => (c.x_fmt)(*v),
        };
        let yf = |v: &f64| match c.y_scale {
            Scale::Log2 => log2_label(*v, c.y_fmt),
            Scale::Linear => (c.y_fmt)(*v),
        };
        let x_labels = label_count(c.x_scale, x0, x1);
        let y_labels = label_count(c.y_scale, y0, y1);
        chart
            .configure_mesh()
            .x_desc(c.x_desc.as_str())
            .y_desc(c.y_desc.as_str())
            .x_labels(x_labels)
            .y_labels(y_labels)
            .x_label_formatter(&xf)
            .y_label_formatter(&yf)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()
            .map_err(chart_err)?;
        for (i, s) in c.series.iter().enumerate() {
            let col = color(i);
            let mapped: Vec<(f64, f64)> = s
                .points
                .iter()
                .map(|&(x, y)| (c.x_scale.map(x), c.y_scale.map(y)))
                .collect();
            let label = if mapped.is_empty() {
                format!("{} (none fit)", s.name)
            } else {
                s.name.clone()
            };
            chart
                .draw_series(LineSeries::new(mapped.clone(), col.stroke_width(2)))
                .map_err(chart_err)?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(3))
                });
            chart
                .draw_series(mapped.iter().map(|&p| Circle::new(p, 3, col.filled())))
                .map_err(chart_err)?;
        }
        chart
            .configure_series_labels()
            .position(legend_position(&c.series))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .label_font((FONT, 13))
            .draw()
            .map_err(chart_err)?;
        root.present().map_err(chart_err)?;
    }
    Ok(svg)
}

fn min_max(it: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    it.filter(|v| v.is_finite()).fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((a, b)) => Some((a.min(v), b.max(v))),
    })
}

/// Stacked bars: one bar per category, one layer per component, and an optional horizontal
/// limit line (such as the GPU's memory).
pub struct StackedBars<'a> {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub categories: Vec<String>,
    /// (component name, value per category).
    pub layers: Vec<(String, Vec<f64>)>,
    pub limit: Option<(String, f64)>,
    pub y_fmt: &'a dyn Fn(f64) -> String,
}

pub fn stacked_bars(c: &StackedBars) -> Result<String> {
    let n = c.categories.len();
    let totals: Vec<f64> = (0..n)
        .map(|i| {
            c.layers
                .iter()
                .map(|(_, v)| v.get(i).copied().unwrap_or(0.0))
                .sum()
        })
        .collect();
    let top = totals
        .iter()
        .copied()
        .chain(c.limit.iter().map(|l| l.1))
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.12;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_err)?;
        let (plot, legend) = root.split_horizontally(W - 150);
        let mut chart = ChartBuilder::on(&plot)
            .caption(&c.title, (FONT, 18))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.6f64..(n as f64 - 0.4), 0f64..top)
            .map_err(chart_err)?;
        let cats = c.categories.clone();
        let xf = move |v: &f64| {
            let i = v.round();
            if (v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < cats.len() {
                cats[i as usize].clone()
            } else {
                String::new()
            }
        };
        let yf = |v: &f64| (c.y_fmt)(*v);
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc(c.x_desc.as_str())
            .y_desc(c.y_desc.as_str())
            .x_labels(n.max(1) * 2 + 1)
            .x_label_formatter(&xf)
            .y_label_formatter(&yf)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()
            .map_err(chart_err)?;
        let mut base = vec![0.0; n];
        for (li, (_, values)) in c.layers.iter().enumerate() {
            let col = color(li);
            let rects: Vec<Rectangle<(f64, f64)>> = (0..n)
                .map(|i| {
                    let v = values.get(i).copied().unwrap_or(0.0);
                    let r = Rectangle::new(
                        [(i as f64 - 0.35, base[i]), (i as f64 + 0.35, base[i] + v)],
                        col.filled(),
                    );
                    base[i] += v;
                    r
                })
                .collect();
            chart.draw_series(rects).map_err(chart_err)?;
        }
        if let Some((_, lim)) = &c.limit {
            chart
                .draw_series(LineSeries::new(
                    vec![(-0.6, *lim), (n as f64 - 0.4, *lim)],
                    RED.stroke_width(2),
                ))
                .map_err(chart_err)?;
        }
        draw_legend(
            &legend,
            c.layers
                .iter()
                .enumerate()
                .rev()
                .map(|(i, (name, _))| (name.clone(), color(i), false))
                .chain(c.limit.iter().map(|(name, _)| (name.clone(), RED, true)))
                .collect(),
        )?;
        root.present().map_err(chart_err)?;
    }
    Ok(svg)
}

/// A legend in its own drawing area: a swatch (or a line) and a name per entry.
fn draw_legend(
    area: &DrawingArea<SVGBackend, Shift>,
    entries: Vec<(String, RGBColor, bool)>,
) -> Result<()> {
    let style = TextStyle::from((FONT, 13).into_font()).color(&BLACK);
    for (i, (name, col, line)) in entries.iter().enumerate() {
        let y = 50 + 22 * i as i32;
        if *line {
            area.draw(&PathElement::new(
                vec![(4, y + 7), (20, y + 7)],
                col.stroke_width(3),
            ))
            .map_err(chart_err)?;
        } else {
            area.draw(&Rectangle::new([(4, y), (18, y + 14)], col.filled()))
                .map_err(chart_err)?;
        }
        area.draw(&Text::new(name.clone(), (26, y), style.clone()))
            .map_err(chart_err)?;
    }
    Ok(())
}

/// One bar of a timeline: a label and [start, end) in the chart's x unit.
#[derive(Debug, Clone)]
pub struct Span {
    pub label: String,
    pub start: f64,
    pub end: f64,
}

/// A timeline (Gantt chart): one row per span, top to bottom.
pub fn timeline(title: &str, x_desc: &str, spans: &[Span]) -> Result<String> {
    let n = spans.len().max(1);
    let end = spans.iter().map(|s| s.end).fold(0.0f64, f64::max).max(1e-9) * 1.05;
    let h = (120 + 46 * n as u32).min(1200);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W + 200, h)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_err)?;
        let labels: Vec<String> = spans.iter().map(|s| s.label.clone()).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 18))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(220)
            .build_cartesian_2d(0f64..end, -0.6f64..(n as f64 - 0.4))
            .map_err(chart_err)?;
        let yf = move |v: &f64| {
            let i = v.round();
            if (v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                // Row 0 at the top.
                labels[labels.len() - 1 - i as usize].clone()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc(x_desc)
            .y_labels(n * 2 + 1)
            .y_label_formatter(&yf)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()
            .map_err(chart_err)?;
        for (i, s) in spans.iter().enumerate() {
            let row = (n - 1 - i) as f64;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(s.start, row - 0.3), (s.end, row + 0.3)],
                    color(i).filled(),
                )))
                .map_err(chart_err)?;
        }
        root.present().map_err(chart_err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_chart_has_axes_and_legend() {
        let f = |v: f64| format!("{v:.0}");
        let svg = line_chart(&LineChart {
            title: "t".into(),
            x_desc: "GPUs".into(),
            y_desc: "tokens".into(),
            x_scale: Scale::Log2,
            y_scale: Scale::Linear,
            x_fmt: &f,
            y_fmt: &f,
            series: vec![
                Series {
                    name: "alpha".into(),
                    points: vec![(8.0, 1.0), (16.0, 2.0)],
                },
                Series {
                    name: "beta".into(),
                    points: vec![],
                },
            ],
            y_from_zero: true,
        })
        .unwrap();
        assert!(svg.starts_with("<svg"));
        for s in ["GPUs", "tokens", "alpha", "beta (none fit)", ">\n16\n<"] {
            assert!(svg.contains(s), "missing {s}");
        }
    }
}

//! The charts of the HTML report, drawn with plotters into SVG strings
//! (`SVGBackend::with_string`) that the page embeds inline:
//!
//! 1. `chart-compute-order`: rel-L2 of every site along the compute order, one series
//!    per step, with the tolerance, where measured the noise floor as a band, and
//!    under `--baseline` the accepted report's rel-L2 as a dashed second line per step;
//! 2. `chart-per-token`: rel-L2 per token position across prefill and decode steps;
//! 3. `chart-head-heatmap`: rel-L2 per head of `q_rope`, `k_rope`, `probs`, `context`;
//! 4. `chart-abs-histogram`: |candidate - golden| by decade at the first divergence;
//! 5. `chart-local-inherited`: with teacher forcing, the error a site adds on its own
//!    against the error it receives.
//!
//! A chart whose data the report lacks is left out. Log axes clamp values to
//! [`FLOOR`] so that exact zeros stay on the chart. Every plotters error becomes an
//! [`Error::Chart`]; nothing here panics on data.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use compare::{SiteMetrics, Status};
use contract::error::{Error, Result};
use contract::site::{LayerPart, Site, Step};

use super::{Report, SiteEntry};

/// Smallest error a log axis shows; smaller values (and zeros) are drawn at it.
pub const FLOOR: f64 = 1e-12;

const WIDTH: u32 = 1000;
const FONT: &str = "sans-serif";

/// Series colours: distinct on screen and in greyscale print, fixed order.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
    RGBColor(127, 127, 127),
];
const FAIL_RED: RGBColor = RGBColor(200, 30, 30);
const TOL_GREY: RGBColor = RGBColor(90, 90, 90);
const FLOOR_FILL: RGBColor = RGBColor(190, 215, 240);

/// One drawn chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// The `id` of the `<svg>` element.
    pub id: &'static str,
    pub title: String,
    /// What the chart shows and how to read it.
    pub caption: String,
    pub svg: String,
}

/// Every chart the report has data for, in page order.
pub fn all(r: &Report) -> Result<Vec<Chart>> {
    let mut v = Vec::new();
    if r.train.is_some() {
        v.extend(compute_order(r, Order::Forward)?);
        v.extend(compute_order(r, Order::Backward)?);
    } else {
        v.extend(compute_order(r, Order::All)?);
    }
    v.extend(per_token(r)?);
    v.extend(head_heatmap(r)?);
    v.extend(abs_histogram(r)?);
    v.extend(local_vs_inherited(r)?);
    Ok(v)
}

fn err(chart: &str) -> impl Fn(&dyn std::fmt::Display) -> Error + '_ {
    move |e| Error::Chart { chart: chart.to_string(), what: e.to_string() }
}

/// Maps any plotters error to [`Error::Chart`].
trait OrChart<T> {
    fn or_chart(self, chart: &str) -> Result<T>;
}

impl<T, E: std::fmt::Display> OrChart<T> for std::result::Result<T, E> {
    fn or_chart(self, chart: &str) -> Result<T> {
        self.map_err(|e| err(chart)(&e))
    }
}

/// Draws into an SVG string of `size` and tags the `<svg>` with `id` and a title.
fn svg(
    id: &'static str,
    title: &str,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Result<()>,
) -> Result<String> {
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, size).into_drawing_area();
        root.fill(&WHITE).or_chart(id)?;
        draw(&root)?;
        root.present().or_chart(id)?;
    }
    let tag = format!(
        "<svg id=\"{id}\" role=\"img\" aria-label=\"{}\" preserveAspectRatio=\"xMinYMin meet\" ",
        super::escape_xml(title)
    );
    match buf.find("<svg ") {
        Some(at) => buf.replace_range(at..at + 5, &tag),
        None => {
            return Err(Error::Chart {
                chart: id.into(),
                what: "the backend wrote no <svg> element".into(),
            })
        }
    }
    Ok(buf)
}

/// `v` made safe for a log axis: NaN stays NaN (a gap), the rest is clamped to
/// [`FLOOR`, 1e30].
/// Text of `size` px in the charts' font, anchored at `h`, `v`.
fn label_style(size: u32, h: HPos, v: VPos) -> TextStyle<'static> {
    TextStyle::from((FONT, size).into_font()).pos(Pos::new(h, v))
}

fn clamp_log(v: f64) -> f64 {
    if v.is_nan() {
        v
    } else {
        v.clamp(FLOOR, 1e30)
    }
}

/// A log range covering `values` (whole decades), at least one decade tall.
fn log_range(values: impl IntoIterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.into_iter().filter(|v| v.is_finite()) {
        let v = clamp_log(v);
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (FLOOR, 1.0);
    }
    let lo = 10f64.powf(lo.log10().floor());
    let mut hi = 10f64.powf(hi.log10().floor() + 1.0);
    if hi <= lo {
        hi = lo * 10.0;
    }
    (lo, hi)
}

/// Tick labels of a log axis: `1e-5`, `3e-2`.
fn sci_tick(v: &f64) -> String {
    format!("{v:.0e}")
}

/// The legend of a line chart: the dashed tolerance, then one colour per series.
fn line_keys(names: impl Iterator<Item = String>) -> Vec<(String, Key)> {
    let mut keys = vec![("tolerance".to_string(), Key::Dashed(TOL_GREY))];
    keys.extend(names.enumerate().map(|(k, s)| (s, Key::Line(PALETTE[k % PALETTE.len()]))));
    keys
}

/// The first site of a decoder layer, where the compute-order chart marks `L{i}`.
/// In a training step's backward, a layer starts at the gradient of its output.
fn is_layer_start(site: &Site) -> bool {
    match site {
        Site::Grad(inner) => matches!(**inner, Site::Layer(_, LayerPart::Output)),
        _ => matches!(site, Site::Layer(_, LayerPart::InputLayernorm)),
    }
}

/// Steps in report order, each with its sites in compute order.
fn steps(r: &Report) -> Vec<(Step, Vec<&SiteEntry>)> {
    steps_of(r, Order::All)
}

/// Which sites an error-along-the-compute-order chart follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Every site (inference).
    All,
    /// A training step's forward and its loss.
    Forward,
    /// A training step's backward: gradients, `grad_norm`, parameter gradients, updates.
    Backward,
}

impl Order {
    fn keeps(self, site: &Site) -> bool {
        match self {
            Order::All => true,
            Order::Forward => !site.is_backward(),
            Order::Backward => site.is_backward(),
        }
    }
}

/// [`steps`] with only the sites `order` keeps.
fn steps_of(r: &Report, order: Order) -> Vec<(Step, Vec<&SiteEntry>)> {
    let mut out: Vec<(Step, Vec<&SiteEntry>)> = Vec::new();
    for e in r.sites.iter().filter(|e| order.keeps(&e.site)) {
        match out.last_mut() {
            Some((s, v)) if *s == e.step => v.push(e),
            _ => out.push((e.step, vec![e])),
        }
    }
    out
}

/// Splits `(x, y)` points into runs without NaN, so that a line shows its gaps.
fn runs(points: &[(f64, f64)]) -> Vec<Vec<(f64, f64)>> {
    let mut out = vec![Vec::new()];
    for &(x, y) in points {
        if y.is_nan() {
            if out.last().is_some_and(|r| !r.is_empty()) {
                out.push(Vec::new());
            }
        } else if let Some(last) = out.last_mut() {
            last.push((x, clamp_log(y)));
        }
    }
    out.retain(|r| !r.is_empty());
    out
}

/// A chart with a linear x axis and a log y axis.
type LogPlot<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, LogCoord<f64>>,
>;

/// A line with dots, in runs; labelled once in the legend.
fn draw_line(
    chart: &mut LogPlot,
    id: &str,
    points: &[(f64, f64)],
    colour: RGBColor,
    dots: bool,
) -> Result<()> {
    for run in runs(points) {
        chart
            .draw_series(LineSeries::new(run.iter().copied(), colour.stroke_width(2)))
            .or_chart(id)?;
        if dots {
            chart
                .draw_series(run.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .or_chart(id)?;
        }
    }
    Ok(())
}

/// A horizontal tolerance line drawn as a grey step along `points`.
fn draw_tolerance(chart: &mut LogPlot, id: &str, points: &[(f64, f64)]) -> Result<()> {
    if points.is_empty() {
        return Ok(());
    }
    let style = ShapeStyle::from(&TOL_GREY).stroke_width(2);
    for run in runs(points) {
        let mut step = Vec::with_capacity(run.len() * 2);
        for &(x, y) in &run {
            step.push((x - 0.5, y));
            step.push((x + 0.5, y));
        }
        chart.draw_series(DashedLineSeries::new(step, 6, 4, style)).or_chart(id)?;
    }
    Ok(())
}

/// The noise floor as a shaded band from the bottom of the plot up to each site's floor.
fn draw_floor_band(chart: &mut LogPlot, id: &str, lo: f64, points: &[(f64, f64)]) -> Result<()> {
    let bars = points.iter().filter(|(_, y)| y.is_finite() && *y > lo).map(|&(x, y)| {
        Rectangle::new([(x - 0.5, lo), (x + 0.5, clamp_log(y))], FLOOR_FILL.filled())
    });
    chart.draw_series(bars).or_chart(id)?;
    Ok(())
}

/// A dashed line in runs (the baseline of a series).
fn draw_dashed(
    chart: &mut LogPlot,
    id: &str,
    points: &[(f64, f64)],
    colour: RGBColor,
) -> Result<()> {
    let style = ShapeStyle::from(&colour).stroke_width(2);
    for run in runs(points) {
        if run.len() == 1 {
            chart.draw_series(run.iter().map(|&p| Circle::new(p, 3, style))).or_chart(id)?;
        } else {
            chart.draw_series(DashedLineSeries::new(run, 5, 4, style)).or_chart(id)?;
        }
    }
    Ok(())
}

/// Width of the legend panel right of a plot.
const LEGEND_W: u32 = 190;

/// How a legend entry is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Key {
    Line(RGBColor),
    Dashed(RGBColor),
    Band(RGBColor),
}

/// Draws `entries` as a legend in `area` (a panel beside the plot, so that the
/// legend never covers data).
fn side_legend(
    area: &DrawingArea<SVGBackend, Shift>,
    id: &str,
    entries: &[(String, Key)],
) -> Result<()> {
    let style = label_style(14, HPos::Left, VPos::Center);
    for (k, (label, key)) in entries.iter().enumerate() {
        let y = 24 + k as i32 * 22;
        match key {
            Key::Line(c) => {
                area.draw(&PathElement::new(vec![(8, y), (34, y)], c.stroke_width(3)))
                    .or_chart(id)?;
                area.draw(&Circle::new((21, y), 3, c.filled())).or_chart(id)?;
            }
            Key::Band(c) => {
                area.draw(&Rectangle::new([(8, y - 6), (34, y + 6)], c.filled())).or_chart(id)?;
            }
            Key::Dashed(c) => {
                for x in [8, 19, 30] {
                    area.draw(&PathElement::new(vec![(x, y), (x + 6, y)], c.stroke_width(2)))
                        .or_chart(id)?;
                }
            }
        }
        area.draw(&Text::new(label.clone(), (42, y), style.clone())).or_chart(id)?;
    }
    Ok(())
}

/// The coordinates of the log-scale error charts.
type LogChart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, LogCoord<f64>>,
>;

/// A chart of `n` points along x against rel-L2 on a log scale from `lo` to `hi`, with
/// its mesh drawn.
fn log_chart<'a, 'b>(
    plot: &'a DrawingArea<SVGBackend<'b>, Shift>,
    id: &str,
    n: usize,
    (lo, hi): (f64, f64),
    x_desc: impl Into<String>,
) -> Result<LogChart<'a, 'b>> {
    let mut chart = ChartBuilder::on(plot)
        .margin(12)
        .margin_right(24)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (lo..hi).log_scale())
        .or_chart(id)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("rel-L2 (log)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&sci_tick)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .or_chart(id)?;
    Ok(chart)
}

/// The error a line chart plots: rel-L2 for values, the mismatch fraction for
/// positions and the mask, NaN (a gap, not a dive to the floor) where those match
/// exactly or nothing was measured.
fn plotted(m: &SiteMetrics) -> f64 {
    match m {
        SiteMetrics::Values(v) => v.rel_l2,
        other if other.error() == 0.0 => f64::NAN,
        other => other.error(),
    }
}

fn plotted_error(e: &SiteEntry) -> f64 {
    e.metrics.as_ref().map_or(f64::NAN, plotted)
}

fn tolerance_of(e: &SiteEntry) -> f64 {
    match (&e.metrics, &e.tolerance) {
        (Some(SiteMetrics::Values(_)), Some(t)) => t.max_rel_l2,
        _ => f64::NAN,
    }
}

/// Chart 1: rel-L2 along the compute order, one series per step.
fn compute_order(r: &Report, order: Order) -> Result<Option<Chart>> {
    let (id, title): (&'static str, &str) = match order {
        Order::All => ("chart-compute-order", "Error along the compute order"),
        Order::Forward => ("chart-compute-order", "Forward: error along the compute order"),
        Order::Backward => ("chart-backward", "Backward: error along the compute order"),
    };
    let steps = steps_of(r, order);
    let n = steps.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    if n == 0 || !r.sites.iter().any(|e| e.metrics.is_some()) {
        return Ok(None);
    }
    let reference = &steps[0].1;
    let series: Vec<(Step, Vec<(f64, f64)>)> = steps
        .iter()
        .map(|(s, v)| {
            (*s, v.iter().enumerate().map(|(i, e)| (i as f64, plotted_error(e))).collect())
        })
        .collect();
    let tol: Vec<(f64, f64)> =
        reference.iter().enumerate().map(|(i, e)| (i as f64, tolerance_of(e))).collect();
    // The floor at each index: the largest of the steps' floors there.
    let floor: Vec<(f64, f64)> = (0..n)
        .map(|i| {
            let f = steps
                .iter()
                .filter_map(|(_, v)| v.get(i).and_then(|e| e.noise_floor).map(|f| f.rel_l2))
                .fold(f64::NAN, f64::max);
            (i as f64, f)
        })
        .collect();
    let has_floor = floor.iter().any(|p| p.1.is_finite());
    // Under --baseline: the accepted report's error at each site, per step.
    let baselines: Vec<Vec<(f64, f64)>> = if r.baseline.is_some() {
        steps
            .iter()
            .map(|(_, v)| {
                v.iter()
                    .enumerate()
                    .map(|(i, e)| (i as f64, e.baseline.as_ref().map_or(f64::NAN, plotted)))
                    .collect()
            })
            .collect()
    } else {
        Vec::new()
    };
    let (lo, hi) = log_range(
        series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|q| q.1))
            .chain(tol.iter().map(|q| q.1))
            .chain(floor.iter().map(|q| q.1))
            .chain(baselines.iter().flat_map(|p| p.iter().map(|q| q.1))),
    );
    let first = r.first_divergence.as_ref().and_then(|fd| {
        let (_, v) = steps.iter().find(|(s, _)| *s == fd.step)?;
        let i = v.iter().position(|e| e.site == fd.site)?;
        Some((
            i as f64,
            clamp_log(fd.error().unwrap_or(hi)),
            format!("first divergence: {} {}", fd.step, fd.site.short_name()),
        ))
    });
    let mut keys = line_keys(series.iter().map(|(s, _)| s.to_string()));
    if has_floor {
        keys.insert(1, ("noise floor".into(), Key::Band(FLOOR_FILL)));
    }
    keys.extend(
        series
            .iter()
            .enumerate()
            .take(baselines.len())
            .map(|(k, (s, _))| (format!("{s} baseline"), Key::Dashed(PALETTE[k % PALETTE.len()]))),
    );
    let out = svg(id, title, (WIDTH, 440), |root| {
        let (plot, side) = root.split_horizontally(WIDTH - LEGEND_W);
        side_legend(&side, id, &keys)?;
        let mut chart = log_chart(
            &plot,
            id,
            n,
            (lo, hi),
            "site index in compute order (layer starts marked L0, L1, …)",
        )?;
        if has_floor {
            draw_floor_band(&mut chart, id, lo, &floor)?;
        }
        // Layer boundaries, labelled at the top.
        let every = (reference.iter().filter(|e| is_layer_start(&e.site)).count() / 24).max(1);
        let mut k = 0;
        for (i, e) in reference.iter().enumerate() {
            if let Some(layer) = e.site.layer().filter(|_| is_layer_start(&e.site)) {
                if k % every == 0 {
                    let x = i as f64 - 0.5;
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            vec![(x, lo), (x, hi)],
                            RGBColor(200, 200, 200),
                        )))
                        .or_chart(id)?;
                    chart
                        .draw_series(std::iter::once(Text::new(
                            format!("L{layer}"),
                            (x + 0.15, hi),
                            (FONT, 13).into_font().color(&RGBColor(110, 110, 110)),
                        )))
                        .or_chart(id)?;
                }
                k += 1;
            }
        }
        draw_tolerance(&mut chart, id, &tol)?;
        for (k, pts) in baselines.iter().enumerate() {
            draw_dashed(&mut chart, id, pts, PALETTE[k % PALETTE.len()])?;
        }
        for (k, (_, pts)) in series.iter().enumerate() {
            draw_line(&mut chart, id, pts, PALETTE[k % PALETTE.len()], pts.len() <= 80)?;
        }
        if let Some((x, y, label)) = &first {
            chart
                .draw_series(std::iter::once(Circle::new((*x, *y), 8, FAIL_RED.stroke_width(3))))
                .or_chart(id)?;
            // Above the ring, or below it when the ring is near the top.
            let near_top = (hi / *y).log10() < 0.25 * (hi / lo).log10();
            let (ty, vpos) =
                if near_top { (*y / 3.0, VPos::Top) } else { (*y * 2.5, VPos::Bottom) };
            let hpos = if *x > n as f64 * 0.6 { HPos::Right } else { HPos::Left };
            let style = label_style(14, hpos, vpos).color(&FAIL_RED);
            chart
                .draw_series(std::iter::once(Text::new(label.clone(), (*x + 0.3, ty), style)))
                .or_chart(id)?;
        }
        Ok(())
    })?;
    Ok(Some(Chart {
        id,
        title: title.into(),
        caption: match order {
            Order::Backward => "rel-L2 of every backward site of the training step (activation gradients from grad.lm_head back to \
                                grad.model.embed_tokens, grad_norm, each parameter's gradient, each update's change from its weight), \
                                in the order the step computes them. "
                .to_string(),
            _ => String::new(),
        } + "rel-L2 of every site (the mismatch fraction for positions and the mask), in the order the model \
                  computes them, one line per step. The dashed grey line is the tolerance; the blue band, where measured, is the \
                  noise floor (the worst error of correct runs of this model at each site); the red ring marks the \
                  first divergence."
            + if r.baseline.is_some() {
                " Dashed coloured lines: the same steps in the accepted baseline report."
            } else {
                ""
            },
        svg: out,
    }))
}

/// The sites the per-token chart follows: `q_rope` and `k_rope` of layer 0, the last
/// layer's output, and the first divergent site.
fn per_token_sites(r: &Report) -> Vec<Site> {
    let last = r.sites.iter().filter_map(|e| e.site.layer()).max();
    let mut v = vec![Site::Layer(0, LayerPart::QRope), Site::Layer(0, LayerPart::KRope)];
    if let Some(l) = last {
        v.push(Site::Layer(l, LayerPart::Output));
    }
    if let Some(fd) = &r.first_divergence {
        if !v.contains(&fd.site) {
            v.push(fd.site.clone());
        }
    }
    v.retain(|s| r.sites.iter().any(|e| &e.site == s && e.per_token.is_some()));
    v
}

/// Chart 2: rel-L2 per token position across prefill and decode.
fn per_token(r: &Report) -> Result<Option<Chart>> {
    const ID: &str = "chart-per-token";
    let sites = per_token_sites(r);
    if sites.is_empty() {
        return Ok(None);
    }
    // x offsets of each step: the token rows of the steps before it.
    let steps = steps(r);
    let mut offsets = Vec::new();
    let mut x0 = 0usize;
    for (step, v) in &steps {
        let t = v.iter().filter_map(|e| e.per_token.as_ref().map(Vec::len)).max().unwrap_or(0);
        offsets.push((*step, x0, t));
        x0 += t;
    }
    let total = x0.max(1);
    let prefill_end = offsets.iter().find(|(s, _, _)| *s == Step::Prefill).map(|&(_, o, t)| o + t);
    let series: Vec<(String, Vec<(f64, f64)>)> = sites
        .iter()
        .map(|site| {
            let mut pts = Vec::new();
            for (step, off, _) in &offsets {
                if let Some(pt) = r
                    .sites
                    .iter()
                    .find(|e| e.step == *step && &e.site == site)
                    .and_then(|e| e.per_token.as_ref())
                {
                    pts.extend(pt.iter().enumerate().map(|(j, &y)| ((off + j) as f64, y)));
                }
            }
            (site.short_name(), pts)
        })
        .collect();
    let tol: Vec<(f64, f64)> = sites
        .last()
        .and_then(|s| r.sites.iter().find(|e| &e.site == s))
        .map(|e| (0..total).map(|x| (x as f64, tolerance_of(e))).collect())
        .unwrap_or_default();
    let (lo, hi) = log_range(
        series.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)).chain(tol.iter().map(|q| q.1)),
    );
    let title = "Error per token position";
    let keys = line_keys(series.iter().map(|(s, _)| s.clone()));
    let out = svg(ID, title, (WIDTH, 400), |root| {
        let (plot, side) = root.split_horizontally(WIDTH - LEGEND_W);
        side_legend(&side, ID, &keys)?;
        let mut chart = log_chart(
            &plot,
            ID,
            total,
            (lo, hi),
            "token index: prefill rows, then one per decode step",
        )?;
        if let Some(p) = prefill_end.filter(|&p| p < total) {
            let x = p as f64 - 0.5;
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(x, lo), (x, hi)],
                    5,
                    4,
                    ShapeStyle::from(&BLACK.mix(0.6)).stroke_width(1),
                ))
                .or_chart(ID)?;
            let style = label_style(13, HPos::Left, VPos::Top).color(&RGBColor(80, 80, 80));
            chart
                .draw_series(std::iter::once(Text::new("decode →", (x + 0.1, hi), style)))
                .or_chart(ID)?;
        }
        draw_tolerance(&mut chart, ID, &tol)?;
        for (k, (_, pts)) in series.iter().enumerate() {
            draw_line(&mut chart, ID, pts, PALETTE[k % PALETTE.len()], true)?;
        }
        Ok(())
    })?;
    Ok(Some(Chart {
        id: ID,
        title: title.into(),
        caption: format!(
            "rel-L2 of each token row (batch rows combined, padding left out) at {}. Prefill rows come first, then \
             one point per decode step; a position bug shows as a jump at the dashed line.",
            sites.iter().map(Site::short_name).collect::<Vec<_>>().join(", ")
        ),
        svg: out,
    }))
}

/// A colour for `t` in 0..=1: light yellow (small error) to dark purple (large).
fn heat(t: f64) -> RGBColor {
    const STOPS: [(f64, (f64, f64, f64)); 5] = [
        (0.0, (255.0, 252.0, 210.0)),
        (0.25, (254.0, 196.0, 79.0)),
        (0.5, (236.0, 112.0, 20.0)),
        (0.75, (180.0, 30.0, 60.0)),
        (1.0, (60.0, 10.0, 80.0)),
    ];
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let mut k = 0;
    while k + 2 < STOPS.len() && t > STOPS[k + 1].0 {
        k += 1;
    }
    let ((t0, a), (t1, b)) = (STOPS[k], STOPS[k + 1]);
    let u = (t - t0) / (t1 - t0);
    let mix = |x: f64, y: f64| (x + (y - x) * u).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Chart 3: heatmap of rel-L2 per head.
fn head_heatmap(r: &Report) -> Result<Option<Chart>> {
    const ID: &str = "chart-head-heatmap";
    const MAX_ROWS: usize = 160;
    let mut rows: Vec<&SiteEntry> =
        r.sites.iter().filter(|e| e.per_head.as_ref().is_some_and(|h| !h.is_empty())).collect();
    if rows.is_empty() {
        return Ok(None);
    }
    let mut scope = String::from("every step and layer");
    if rows.len() > MAX_ROWS {
        let step = r.first_divergence.as_ref().map_or_else(|| rows[0].step, |fd| fd.step);
        rows.retain(|e| e.step == step);
        rows.truncate(MAX_ROWS);
        scope = format!("step {step} only (the full grid is too tall)");
    }
    let cols = rows.iter().filter_map(|e| e.per_head.as_ref().map(Vec::len)).max().unwrap_or(1);
    let (lo, hi) = log_range(rows.iter().flat_map(|e| e.per_head.iter().flatten().copied()));
    let (llo, lhi) = (lo.log10(), hi.log10());
    let label_w = 230i32;
    let cell_h = 16i32.min((900 / rows.len() as i32).max(9));
    let top = 34i32;
    let bar_h = 70i32;
    let grid_w = WIDTH as i32 - label_w - 30;
    let cell_w = (grid_w / cols as i32).clamp(6, 80);
    let height = (top + cell_h * rows.len() as i32 + bar_h).max(160) as u32;
    let title = "Error per attention head";
    let out = svg(ID, title, (WIDTH, height), |root| {
        let small = label_style(12.min(cell_h + 2) as u32, HPos::Right, VPos::Center);
        let head_style = label_style(12, HPos::Center, VPos::Bottom);
        root.draw(&Text::new(
            "head →",
            (label_w - 8, top - 8),
            label_style(13, HPos::Right, VPos::Bottom),
        ))
        .or_chart(ID)?;
        let every = (cols / 16).max(1);
        for h in (0..cols).step_by(every) {
            let x = label_w + h as i32 * cell_w + cell_w / 2;
            root.draw(&Text::new(h.to_string(), (x, top - 6), head_style.clone())).or_chart(ID)?;
        }
        let mut prev_step: Option<Step> = None;
        for (k, e) in rows.iter().enumerate() {
            let y = top + k as i32 * cell_h;
            if prev_step.is_some_and(|p| p != e.step) {
                root.draw(&PathElement::new(
                    vec![(8, y), (label_w + cols as i32 * cell_w, y)],
                    BLACK.stroke_width(1),
                ))
                .or_chart(ID)?;
            }
            prev_step = Some(e.step);
            let label = format!("{} {}", e.step, e.site.short_name());
            root.draw(&Text::new(label, (label_w - 8, y + cell_h / 2), small.clone()))
                .or_chart(ID)?;
            let tol = tolerance_of(e);
            for (h, &v) in e.per_head.iter().flatten().enumerate() {
                let x = label_w + h as i32 * cell_w;
                let t =
                    if v.is_nan() { f64::NAN } else { (clamp_log(v).log10() - llo) / (lhi - llo) };
                let fill = if v.is_nan() { RGBColor(220, 220, 220) } else { heat(t) };
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell_w - 1, y + cell_h - 1)],
                    fill.filled(),
                ))
                .or_chart(ID)?;
                if v > tol {
                    // Over tolerance: a dark dot in the cell.
                    let d = (cell_h / 5).max(2);
                    let (cx, cy) = (x + cell_w / 2, y + cell_h / 2);
                    root.draw(&Rectangle::new(
                        [(cx - d, cy - d / 2), (cx + d, cy + d / 2)],
                        WHITE.mix(0.9).filled(),
                    ))
                    .or_chart(ID)?;
                }
            }
        }
        // Colour bar.
        let by = top + cell_h * rows.len() as i32 + 18;
        let bw = 320i32;
        for px in 0..bw {
            let c = heat(px as f64 / (bw - 1) as f64);
            root.draw(&Rectangle::new(
                [(label_w + px, by), (label_w + px + 1, by + 14)],
                c.filled(),
            ))
            .or_chart(ID)?;
        }
        let tick = label_style(12, HPos::Center, VPos::Top);
        let decades = (lhi - llo).round().max(1.0) as i32;
        let stride = (decades / 8).max(1);
        for d in (0..=decades).step_by(stride as usize) {
            let x = label_w + (d as f64 / decades as f64 * (bw - 1) as f64) as i32;
            root.draw(&Text::new(format!("1e{}", llo as i32 + d), (x, by + 18), tick.clone()))
                .or_chart(ID)?;
        }
        let key = label_style(13, HPos::Right, VPos::Top);
        root.draw(&Text::new("rel-L2 (log):", (label_w - 8, by), key.clone())).or_chart(ID)?;
        root.draw(&Text::new("white bar = over tolerance", (label_w + bw + 200, by), key))
            .or_chart(ID)?;
        Ok(())
    })?;
    Ok(Some(Chart {
        id: ID,
        title: title.into(),
        caption: format!(
            "rel-L2 of each head (columns) for q_rope, k_rope (KV heads), probs and context, one row per step, layer \
             and site ({scope}). Darker is worse; a white bar marks a head over the site's tolerance. One dark \
             column points at a head-mapping bug (GQA), a dark band of rows at a step."
        ),
        svg: out,
    }))
}

/// Chart 4: |candidate - golden| by decade at the first divergence.
fn abs_histogram(r: &Report) -> Result<Option<Chart>> {
    const ID: &str = "chart-abs-histogram";
    let Some(fd) = &r.first_divergence else { return Ok(None) };
    let Some(h) = &fd.abs_histogram else { return Ok(None) };
    if h.counts.is_empty() {
        return Ok(None);
    }
    let lo = h.min_exp as f64 - 1.0; // the bar of exact zeros sits left of the first decade
    let hi = h.min_exp as f64 + h.counts.len() as f64;
    let ymax = h.counts.iter().copied().chain([h.exact]).max().unwrap_or(1).max(1) as f64 * 1.12;
    let min_exp = h.min_exp;
    let last = h.min_exp + h.counts.len() as i32 - 1;
    let title = "Absolute error at the first divergence";
    let out = svg(ID, title, (WIDTH, 340), |root| {
        let mut chart = ChartBuilder::on(root)
            .margin(12)
            .margin_right(24)
            .x_label_area_size(44)
            .y_label_area_size(72)
            .build_cartesian_2d(lo..hi, 0f64..ymax)
            .or_chart(ID)?;
        let fmt = move |x: &f64| {
            let e = x.floor() as i32;
            if e < min_exp {
                "0".to_string()
            } else if e == min_exp {
                format!("≤1e{e}")
            } else if e == last {
                format!("≥1e{e}")
            } else {
                format!("1e{e}")
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(h.counts.len() + 2)
            .x_desc("|candidate − golden| (decade; 0 = exact)")
            .y_desc("elements")
            .x_label_formatter(&fmt)
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .or_chart(ID)?;
        let bars = std::iter::once((lo, h.exact, PALETTE[2])).chain(
            h.counts.iter().enumerate().map(|(k, &c)| ((min_exp + k as i32) as f64, c, PALETTE[0])),
        );
        chart
            .draw_series(bars.filter(|b| b.1 > 0).map(|(x, c, col)| {
                Rectangle::new([(x + 0.08, 0.0), (x + 0.92, c as f64)], col.filled())
            }))
            .or_chart(ID)?;
        Ok(())
    })?;
    Ok(Some(Chart {
        id: ID,
        title: title.into(),
        caption: format!(
            "How many elements of {} {} are off by how much, in decades of |candidate − golden| ({} elements). \
             A wide spread of small errors is rounding; a separate cluster of large ones is a bug.",
            fd.step,
            fd.site,
            h.total()
        ),
        svg: out,
    }))
}

/// Chart 5: local (teacher-forced) against total error, at the step of the first
/// divergence (the first step when none).
fn local_vs_inherited(r: &Report) -> Result<Option<Chart>> {
    const ID: &str = "chart-local-inherited";
    if !r.teacher_forced {
        return Ok(None);
    }
    let steps = steps(r);
    let want = r.first_divergence.as_ref().map(|fd| fd.step);
    let Some((step, sites)) =
        steps.iter().find(|(s, _)| want.is_none_or(|w| w == *s)).or(steps.first())
    else {
        return Ok(None);
    };
    let total: Vec<(f64, f64)> =
        sites.iter().enumerate().map(|(i, e)| (i as f64, plotted_error(e))).collect();
    let local: Vec<(f64, f64)> = sites
        .iter()
        .enumerate()
        .map(|(i, e)| (i as f64, e.local_metrics.as_ref().map_or(f64::NAN, plotted)))
        .collect();
    let tol: Vec<(f64, f64)> =
        sites.iter().enumerate().map(|(i, e)| (i as f64, tolerance_of(e))).collect();
    let (lo, hi) = log_range(total.iter().chain(&local).chain(&tol).map(|p| p.1));
    let n = sites.len();
    let title = "Local versus inherited error";
    let keys = vec![
        ("tolerance".to_string(), Key::Dashed(TOL_GREY)),
        ("total (free running)".to_string(), Key::Line(PALETTE[0])),
        ("local (golden input)".to_string(), Key::Line(PALETTE[1])),
    ];
    let out = svg(ID, title, (WIDTH, 400), |root| {
        let (plot, side) = root.split_horizontally(WIDTH - LEGEND_W);
        side_legend(&side, ID, &keys)?;
        let mut chart =
            log_chart(&plot, ID, n, (lo, hi), format!("site index in compute order ({step})"))?;
        draw_tolerance(&mut chart, ID, &tol)?;
        draw_line(&mut chart, ID, &total, PALETTE[0], n <= 80)?;
        draw_line(&mut chart, ID, &local, PALETTE[1], n <= 80)?;
        Ok(())
    })?;
    let failing_local = sites
        .iter()
        .filter(|e| e.status == Status::Fail)
        .filter(|e| {
            let t = tolerance_of(e);
            e.local_metrics
                .as_ref()
                .is_some_and(|m| m.error() > t || (t.is_nan() && m.error() > 0.0))
        })
        .count();
    Ok(Some(Chart {
        id: ID,
        title: title.into(),
        caption: format!(
            "At {step}: the error of each site when the whole model runs freely (total) and when the site starts from \
             the golden's input (local, teacher forced). Where the lines meet the site makes its own error; where \
             local stays low it only inherits. {failing_local} failing site(s) fail locally too."
        ),
        svg: out,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_range_covers_whole_decades_and_survives_zeros() {
        assert_eq!(log_range([0.0, 3e-5, 2e-2]), (FLOOR, 1e-1));
        assert_eq!(log_range([f64::NAN]), (FLOOR, 1.0));
        let (lo, hi) = log_range([1e-3, 1e-3]);
        assert!(lo < hi);
    }

    #[test]
    fn runs_break_at_nan() {
        let r = runs(&[(0.0, 1.0), (1.0, f64::NAN), (2.0, 0.0), (3.0, 1.0)]);
        assert_eq!(r, vec![vec![(0.0, 1.0)], vec![(2.0, FLOOR), (3.0, 1.0)]]);
    }

    #[test]
    fn heat_runs_from_light_to_dark() {
        let sum = |c: RGBColor| c.0 as u32 + c.1 as u32 + c.2 as u32;
        assert!(sum(heat(0.0)) > sum(heat(0.5)) && sum(heat(0.5)) > sum(heat(1.0)));
        assert_eq!(heat(f64::NAN), heat(0.0));
    }
}

//! The figures of the reports: learning curves against a baseline, and bar charts. Each figure
//! is written as SVG and PNG side by side.

use std::path::Path;

use plotters::prelude::*;

/// One line of a learning-curve figure: `(step, value)` points.
#[derive(Debug, Clone)]
pub struct Curve {
    /// Legend label.
    pub label: String,
    /// Points in step order.
    pub points: Vec<(f64, f64)>,
}

/// A learning-curve figure: every curve, the baseline as a black line.
#[derive(Debug, Clone)]
pub struct CurveFigure<'a> {
    /// Title above the plot.
    pub title: String,
    /// Name of the plotted metric (the y axis).
    pub metric: &'a str,
    /// The memoryless baseline.
    pub baseline: f64,
    /// Last training step (the x axis runs from 0 to here).
    pub steps: f64,
    /// The curves.
    pub curves: Vec<Curve>,
}

fn draw_error(e: &dyn std::fmt::Display) -> String {
    format!("cannot draw the plot: {e}")
}

fn register_font() {
    static FONT: std::sync::Once = std::sync::Once::new();
    FONT.call_once(|| {
        // DejaVu Sans ships with the crate so that PNG text needs no system fonts.
        let bytes: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
    });
}

const SIZE: (u32, u32) = (900, 560);

fn file(stem: &Path, extension: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("{}.{extension}", stem.display()))
}

/// Writes `stem.svg` and `stem.png`.
pub fn write_curves(stem: &Path, figure: &CurveFigure) -> Result<(), String> {
    register_font();
    let svg = file(stem, "svg");
    draw_curves(SVGBackend::new(&svg, SIZE).into_drawing_area(), figure)?;
    let png = file(stem, "png");
    draw_curves(BitMapBackend::new(&png, SIZE).into_drawing_area(), figure)
}

fn draw_curves<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    figure: &CurveFigure,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let err = |e: &dyn std::fmt::Display| draw_error(e);
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let y_max = figure
        .curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.1))
        .chain([figure.baseline])
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(&figure.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..figure.steps.max(1.0), 0.0..y_max.max(1e-6))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("training step")
        .y_desc(figure.metric)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, curve) in figure.curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                curve.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(&curve.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, figure.baseline), (figure.steps, figure.baseline)],
            BLACK.stroke_width(1),
        ))
        .map_err(|e| err(&e))?
        .label("baseline")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

/// A bar chart: one labelled bar per entry.
#[derive(Debug, Clone)]
pub struct BarFigure {
    /// Title above the plot.
    pub title: String,
    /// Name of the bar height (the y axis).
    pub y_desc: String,
    /// `(label, height)` per bar, left to right.
    pub bars: Vec<(String, f64)>,
}

/// Writes `stem.svg` and `stem.png`.
pub fn write_bars(stem: &Path, figure: &BarFigure) -> Result<(), String> {
    register_font();
    let svg = file(stem, "svg");
    draw_bars(SVGBackend::new(&svg, SIZE).into_drawing_area(), figure)?;
    let png = file(stem, "png");
    draw_bars(BitMapBackend::new(&png, SIZE).into_drawing_area(), figure)
}

fn draw_bars<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    figure: &BarFigure,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let err = |e: &dyn std::fmt::Display| draw_error(e);
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let n = figure.bars.len().max(1);
    let y_max = figure.bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1.0) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(&figure.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0..n).into_segmented(), 0.0..y_max)
        .map_err(|e| err(&e))?;
    let labels: Vec<String> = figure.bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc(&figure.y_desc)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(figure.bars.iter().enumerate().map(|(i, (_, height))| {
            let color = Palette99::pick(i).to_rgba().filled();
            Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), *height),
                ],
                color,
            )
        }))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

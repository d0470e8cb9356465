//! Eval plots: reliability diagrams (a grid of panels, rows = splits, columns = calibrators) and
//! risk–coverage curves, each written as `<stem>.png` and `<stem>.svg`.
//!
//! Text is drawn with an embedded font (a Latin/Greek subset of DejaVu Sans, see
//! `assets/fonts/README.md`) through plotters' pure-Rust `ab_glyph` feature, so the pictures do not
//! depend on system fonts (fontconfig), which camera boxes and CI containers often lack. SVG text
//! stays real `<text>` elements (searchable; the viewer's DejaVu Sans or sans-serif draws them).
//! PNGs are rasterised in memory at twice their size and averaged down (plotters draws lines
//! without anti-aliasing and places glyphs to the whole pixel), then encoded with `image`.
//!
//! Both files are drawn in full in memory, then each is written to a `.tmp` sibling and renamed,
//! so a reader never sees half a picture. The caller creates the output directory.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use image::ImageEncoder as _;
use plotters::backend::{BitMapBackend, RGBPixel, SVGBackend};
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

use crate::tooling::metrics::{ReliabilityBin, RiskCoveragePoint};

/// Why a plot could not be drawn or written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The output directory does not exist.
    #[error("{path}: cannot write the plot: directory {dir} does not exist (create the output directory first)")]
    MissingDirectory {
        /// The plot file.
        path: PathBuf,
        /// The missing directory.
        dir: PathBuf,
    },
    /// A plot file could not be written.
    #[error("{path}: cannot write the plot: {source}")]
    Write {
        /// The plot file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Plotters failed while drawing.
    #[error("{path}: drawing the plot failed: {message}")]
    Draw {
        /// The plot file.
        path: PathBuf,
        /// Plotters' message.
        message: String,
    },
    /// The PNG encoder failed.
    #[error("{path}: encoding the PNG failed: {source}")]
    Encode {
        /// The PNG file.
        path: PathBuf,
        /// Why.
        source: image::ImageError,
    },
    /// The data cannot be plotted (no panels or points, a grid too small or too large).
    #[error("{path}: cannot plot: {message}")]
    Invalid {
        /// The plot file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The embedded font could not be loaded.
    #[error("{path}: the embedded plot font could not be loaded")]
    Font {
        /// The plot file.
        path: PathBuf,
    },
}

/// One reliability diagram of a [`reliability_grid`].
#[derive(Debug, Clone, Copy)]
pub struct ReliabilityPanel<'a> {
    /// Panel title, e.g. `"new · cac"`; the ECE and the sample count are appended.
    pub title: &'a str,
    /// Equal-width bins (empty bins, `count == 0`, are drawn as nothing).
    pub bins: &'a [ReliabilityBin],
    /// The ECE shown in the title, in percent.
    pub ece_percent: f64,
    /// The sample count shown in the title.
    pub samples: usize,
}

/// Draws one figure with a `rows` × `cols` grid of reliability diagrams, filled row by row from
/// `panels` (cells past the last panel stay blank), under `heading` and a legend. Each panel shows
/// the accuracy per bin as bars, the gap between accuracy and the bin's mean confidence as a
/// translucent red box, the diagonal (perfect calibration), and below it a strip with the number of
/// predictions per bin. Writes `<stem>.png` and `<stem>.svg` and returns both paths.
pub fn reliability_grid(
    stem: &Path,
    heading: &str,
    rows: usize,
    cols: usize,
    panels: &[ReliabilityPanel<'_>],
) -> Result<Vec<PathBuf>, PlotError> {
    let invalid = |message: String| PlotError::Invalid { path: with_suffix(stem, ".png"), message };
    if panels.is_empty() {
        return Err(invalid("no reliability panels".to_string()));
    }
    if rows.checked_mul(cols).is_none_or(|cells| cells < panels.len()) {
        return Err(invalid(format!("{} panels do not fit a grid of {rows} × {cols}", panels.len())));
    }
    if rows > MAX_GRID_SIDE || cols > MAX_GRID_SIDE {
        return Err(invalid(format!("a grid of {rows} × {cols} is too large (at most {MAX_GRID_SIDE} a side)")));
    }
    // Both are at most MAX_GRID_SIDE, so the products fit a u32.
    let width = (cols as u32 * PANEL_WIDTH).max(MIN_GRID_WIDTH);
    let height = HEADING_HEIGHT + rows as u32 * PANEL_HEIGHT;
    write_figure(stem, &Grid { heading, rows, cols, panels, size: (width, height) })
}

/// Draws one risk–coverage chart: a line per `(name, curve)` (risk = error rate among the
/// predictions kept, against the fraction kept), with a legend. Writes `<stem>.png` and
/// `<stem>.svg` and returns both paths.
pub fn risk_coverage(stem: &Path, title: &str, curves: &[(&str, &[RiskCoveragePoint])]) -> Result<Vec<PathBuf>, PlotError> {
    if curves.is_empty() {
        let message = "no risk–coverage curves".to_string();
        return Err(PlotError::Invalid { path: with_suffix(stem, ".png"), message });
    }
    write_figure(stem, &RiskCoverage { title, curves, size: RISK_COVERAGE_SIZE })
}

/// The family name the embedded font is registered under in plotters' (process-wide) font table.
/// It doubles as the SVG `font-family` attribute, so it is written as a CSS font list: viewers
/// use DejaVu Sans where they have it and their sans-serif otherwise. A name of our own also keeps
/// us from replacing (or using) whatever another user of plotters in the process registered as
/// "sans-serif".
const FONT_FAMILY: &str = "DejaVu Sans,sans-serif";
const FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");

/// plotters' `register_font` writes a process-wide table (parsing the font each time), so it runs
/// once per process, whoever draws first; later calls (and other threads) reuse the result.
fn ensure_font(path: &Path) -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let registered =
        *REGISTERED.get_or_init(|| plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT_BYTES).is_ok());
    if registered {
        Ok(())
    } else {
        Err(PlotError::Font { path: path.to_path_buf() })
    }
}

const PANEL_WIDTH: u32 = 420;
const PANEL_HEIGHT: u32 = 430;
const HEADING_HEIGHT: u32 = 70;
const MIN_GRID_WIDTH: u32 = 640;
const MAX_GRID_SIDE: usize = 12;
const RISK_COVERAGE_SIZE: (u32, u32) = (880, 600);
/// Width of the y-label area of both parts of a panel, so their x axes line up.
const Y_LABEL_AREA: u32 = 46;

const ACCURACY_FILL: RGBColor = RGBColor(66, 126, 190);
const ACCURACY_EDGE: RGBColor = RGBColor(31, 74, 128);
const GAP_COLOUR: RGBColor = RGBColor(214, 39, 40);
const COUNT_FILL: RGBColor = RGBColor(150, 150, 150);
const DIAGONAL_COLOUR: RGBColor = RGBColor(60, 60, 60);
const TEXT_COLOUR: RGBColor = RGBColor(20, 20, 20);
const NOTE_COLOUR: RGBColor = RGBColor(90, 90, 90);
/// Okabe–Ito colours (distinguishable with the common colour-vision deficiencies), then greys.
const CURVE_COLOURS: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
    RGBColor(128, 128, 128),
];

/// The PNG is drawn this many times larger, then averaged down: anti-aliased lines, and glyph
/// placement (plotters' ab_glyph code rounds each glyph to the whole pixel, and drops its left side
/// bearing) off by at most half a pixel.
const SUPERSAMPLE: u32 = 2;
/// ... unless that canvas would take more memory than this (a grid of about 8 × 10 panels); then the
/// PNG is drawn at its own size.
const SUPERSAMPLE_BUDGET_BYTES: u64 = 192 << 20;

/// Pixel sizes of one rendering: 1 for SVG and large PNGs, [`SUPERSAMPLE`] for the others.
#[derive(Debug, Clone, Copy)]
struct Px(u32);

impl Px {
    fn n(self, value: u32) -> u32 {
        value * self.0
    }

    fn i(self, value: i32) -> i32 {
        // Scales are 1 or SUPERSAMPLE, the values small layout constants.
        value * self.0 as i32
    }

    /// Text in the embedded font. Whole sizes keep plotters' glyph placement (half the size, plus
    /// the glyph's top) on whole pixels, so periods sit on the baseline.
    fn text(self, size: u32, colour: &'static RGBColor) -> TextStyle<'static> {
        TextStyle::from((FONT_FAMILY, f64::from(size * self.0)).into_font()).color(colour)
    }

    fn stroke(self, colour: impl Color, width: u32) -> ShapeStyle {
        colour.stroke_width(width * self.0)
    }
}

fn draw_error(error: impl Display) -> String {
    error.to_string()
}

/// `<stem><suffix>`: the stem's own dots (e.g. `reliability.new`) are kept.
fn with_suffix(stem: &Path, suffix: &str) -> PathBuf {
    let mut name = stem.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Something drawn the same way on the bitmap and the SVG backend.
trait Figure {
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, px: Px) -> Result<(), String>;
}

fn write_figure(stem: &Path, figure: &impl Figure) -> Result<Vec<PathBuf>, PlotError> {
    let png_path = with_suffix(stem, ".png");
    let svg_path = with_suffix(stem, ".svg");
    // Fail before drawing when the directory is missing (and say so, rather than "No such file").
    let dir = match png_path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(PlotError::MissingDirectory { path: png_path, dir });
    }
    ensure_font(&png_path)?;
    let (width, height) = figure.size();

    let draw_failed = |path: &Path| {
        let path = path.to_path_buf();
        move |message: String| PlotError::Draw { path, message }
    };
    let supersampled_bytes = u64::from(width * SUPERSAMPLE) * u64::from(height * SUPERSAMPLE) * 3;
    let factor = if supersampled_bytes <= SUPERSAMPLE_BUDGET_BYTES { SUPERSAMPLE } else { 1 };
    let (large_width, large_height) = (width * factor, height * factor);
    let mut large = vec![255u8; large_width as usize * large_height as usize * 3];
    {
        let backend = BitMapBackend::<RGBPixel>::with_buffer_and_format(&mut large, (large_width, large_height))
            .map_err(|error| draw_failed(&png_path)(draw_error(error)))?;
        let root = backend.into_drawing_area();
        figure.draw(&root, Px(factor)).map_err(draw_failed(&png_path))?;
        root.present().map_err(|error| draw_failed(&png_path)(draw_error(error)))?;
    }
    let pixels = if factor == 1 { large } else { downsample(&large, width as usize, height as usize, factor as usize) };
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&pixels, width, height, image::ExtendedColorType::Rgb8)
        .map_err(|source| PlotError::Encode { path: png_path.clone(), source })?;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        figure.draw(&root, Px(1)).map_err(draw_failed(&svg_path))?;
        root.present().map_err(|error| draw_failed(&svg_path)(draw_error(error)))?;
    }

    write_atomically(&png_path, &png)?;
    write_atomically(&svg_path, svg.as_bytes())?;
    Ok(vec![png_path, svg_path])
}

/// Averages each `factor` × `factor` block of an RGB image `factor` times the given size.
fn downsample(large: &[u8], width: usize, height: usize, factor: usize) -> Vec<u8> {
    let large_width = width * factor;
    let mut small = vec![0u8; width * height * 3];
    let area = (factor * factor) as u32;
    for (index, pixel) in small.chunks_exact_mut(3).enumerate() {
        let (x, y) = (index % width, index / width);
        let mut sums = [0u32; 3];
        for row in y * factor..(y + 1) * factor {
            let start = (row * large_width + x * factor) * 3;
            for source in large.get(start..start + factor * 3).unwrap_or_default().chunks_exact(3) {
                for (sum, &value) in sums.iter_mut().zip(source) {
                    *sum += u32::from(value);
                }
            }
        }
        for (target, sum) in pixel.iter_mut().zip(sums) {
            // Rounded mean of at most 255 each: fits a u8.
            *target = ((sum + area / 2) / area) as u8;
        }
    }
    small
}

/// Written atomically and durably ([`crate::fsio`]), so a reader never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), PlotError> {
    crate::fsio::write_atomic_bytes(path, bytes).map_err(|source| PlotError::Write { path: path.to_path_buf(), source })
}

/// 950 → "950", 1234 → "1.2k", 56789 → "57k", 1234567 → "1.2M" (ranges split where the
/// rounding would carry, so 9960 is "10k", not "10.0k").
fn compact_count(count: usize) -> String {
    let value = count as f64;
    match count {
        0..=999 => count.to_string(),
        1_000..=9_949 => format!("{:.1}k", value / 1e3),
        9_950..=999_499 => format!("{:.0}k", value / 1e3),
        999_500..=9_949_999 => format!("{:.1}M", value / 1e6),
        _ => format!("{:.0}M", value / 1e6),
    }
}

fn percent_text(percent: f64) -> String {
    if percent.is_finite() {
        format!("{percent:.2}%")
    } else {
        "n/a".to_string()
    }
}

fn unit(value: f64) -> f64 {
    if value.is_nan() {
        0.0
    } else {
        value.clamp(0.0, 1.0)
    }
}

/// The bins worth drawing, clamped to the unit square: non-empty, finite, of positive width.
fn drawable_bins(bins: &[ReliabilityBin]) -> impl Iterator<Item = (f64, f64, &ReliabilityBin)> + '_ {
    bins.iter().filter_map(|bin| {
        let usable = bin.count > 0 && bin.lower.is_finite() && bin.upper.is_finite() && bin.accuracy.is_finite();
        let (lower, upper) = (unit(bin.lower), unit(bin.upper));
        (usable && upper > lower).then_some((lower, upper, bin))
    })
}

struct Grid<'a> {
    heading: &'a str,
    rows: usize,
    cols: usize,
    panels: &'a [ReliabilityPanel<'a>],
    size: (u32, u32),
}

impl Figure for Grid<'_> {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, px: Px) -> Result<(), String> {
        root.fill(&WHITE).map_err(draw_error)?;
        let (head, body) = root.split_vertically(px.n(HEADING_HEIGHT));
        draw_heading(&head, self.heading, px)?;
        for (cell, panel) in body.split_evenly((self.rows, self.cols)).iter().zip(self.panels) {
            draw_panel(cell, panel, px)?;
        }
        Ok(())
    }
}

/// The heading line, and under it the legend shared by all panels.
fn draw_heading<DB: DrawingBackend>(head: &DrawingArea<DB, Shift>, heading: &str, px: Px) -> Result<(), String> {
    let left = px.i(16);
    let anchor = Pos::new(HPos::Left, VPos::Center);
    let title = px.text(22, &TEXT_COLOUR).pos(anchor);
    head.draw(&Text::new(heading.to_string(), (left, px.i(22)), title)).map_err(draw_error)?;

    let style = px.text(13, &TEXT_COLOUR).pos(anchor);
    let (y, half) = (px.i(52), px.i(6));
    let mut x = left;
    let label = |x: &mut i32, words: &str| -> Result<(), String> {
        head.draw(&Text::new(words.to_string(), (*x, y), style.clone())).map_err(draw_error)?;
        let (width, _) = head.estimate_text_size(words, &style).map_err(draw_error)?;
        *x += width as i32 + px.i(24);
        Ok(())
    };
    let swatch = |x: &mut i32, fill: ShapeStyle, edge: ShapeStyle| -> Result<(), String> {
        let corners = [(*x, y - half), (*x + 2 * half, y + half)];
        head.draw(&Rectangle::new(corners, fill)).map_err(draw_error)?;
        head.draw(&Rectangle::new(corners, edge)).map_err(draw_error)?;
        *x += 2 * half + px.i(6);
        Ok(())
    };
    swatch(&mut x, ACCURACY_FILL.mix(0.85).filled(), px.stroke(ACCURACY_EDGE, 1))?;
    label(&mut x, "accuracy per bin")?;
    swatch(&mut x, GAP_COLOUR.mix(0.3).filled(), px.stroke(GAP_COLOUR.mix(0.8), 1))?;
    label(&mut x, "gap to mean confidence")?;
    let dash = DashedPathElement::new(vec![(x, y), (x + px.i(28), y)], px.i(6), px.i(4), px.stroke(DIAGONAL_COLOUR, 2));
    head.draw(&dash).map_err(draw_error)?;
    x += px.i(34);
    label(&mut x, "perfect calibration")?;
    swatch(&mut x, COUNT_FILL.filled(), px.stroke(COUNT_FILL, 1))?;
    label(&mut x, "predictions per bin")?;
    Ok(())
}

/// "12345" → "12,345".
fn thousands(count: usize) -> String {
    let digits = count.to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

fn draw_panel<DB: DrawingBackend>(cell: &DrawingArea<DB, Shift>, panel: &ReliabilityPanel<'_>, px: Px) -> Result<(), String> {
    let cell = cell.margin(px.n(4), px.n(6), px.n(6), px.n(10));
    let (_, cell_height) = cell.dim_in_pixel();
    let (top, bottom) = cell.split_vertically(cell_height * 73 / 100);
    let caption = format!("{} — ECE {} · n = {}", panel.title, percent_text(panel.ece_percent), thousands(panel.samples));

    let mut chart = ChartBuilder::on(&top)
        .caption(caption, px.text(15, &TEXT_COLOUR))
        .margin_top(px.n(2))
        .margin_right(px.n(12))
        .x_label_area_size(0)
        .y_label_area_size(px.n(Y_LABEL_AREA))
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_labels(6)
        .y_labels(6)
        .max_light_lines(0)
        .bold_line_style(px.stroke(BLACK.mix(0.1), 1))
        .axis_style(px.stroke(BLACK, 1))
        .set_all_tick_mark_size(px.n(4))
        .y_label_formatter(&|value| format!("{value:.1}"))
        .y_desc("accuracy")
        .label_style(px.text(11, &TEXT_COLOUR))
        .axis_desc_style(px.text(12, &TEXT_COLOUR))
        .draw()
        .map_err(draw_error)?;

    let bins: Vec<_> = drawable_bins(panel.bins).collect();
    chart
        .draw_series(bins.iter().map(|&(lower, upper, bin)| {
            Rectangle::new([(lower, 0.0), (upper, unit(bin.accuracy))], ACCURACY_FILL.mix(0.85).filled())
        }))
        .map_err(draw_error)?;
    chart
        .draw_series(
            bins.iter().map(|&(lower, upper, bin)| {
                Rectangle::new([(lower, 0.0), (upper, unit(bin.accuracy))], px.stroke(ACCURACY_EDGE, 1))
            }),
        )
        .map_err(draw_error)?;
    let gaps = || bins.iter().filter(|(_, _, bin)| bin.mean_confidence.is_finite());
    chart
        .draw_series(gaps().map(|&(lower, upper, bin)| {
            let corners = [(lower, unit(bin.accuracy)), (upper, unit(bin.mean_confidence))];
            Rectangle::new(corners, GAP_COLOUR.mix(0.3).filled())
        }))
        .map_err(draw_error)?;
    chart
        .draw_series(gaps().map(|&(lower, upper, bin)| {
            let corners = [(lower, unit(bin.accuracy)), (upper, unit(bin.mean_confidence))];
            Rectangle::new(corners, px.stroke(GAP_COLOUR.mix(0.8), 1))
        }))
        .map_err(draw_error)?;
    let diagonal = DashedLineSeries::new([(0.0, 0.0), (1.0, 1.0)], px.i(6), px.i(4), px.stroke(DIAGONAL_COLOUR, 2));
    chart.draw_series(diagonal).map_err(draw_error)?;
    if bins.is_empty() {
        let note = px.text(13, &NOTE_COLOUR).pos(Pos::new(HPos::Center, VPos::Center));
        chart.draw_series([Text::new("no predictions", (0.3, 0.75), note)]).map_err(draw_error)?;
    }

    draw_count_strip(&bottom, &bins, px)
}

/// The strip under a panel: a grey bar per bin, height proportional to its count, the count above.
fn draw_count_strip<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    bins: &[(f64, f64, &ReliabilityBin)],
    px: Px,
) -> Result<(), String> {
    let mut strip = ChartBuilder::on(area)
        .margin_top(px.n(2))
        .margin_right(px.n(12))
        .x_label_area_size(px.n(36))
        .y_label_area_size(px.n(Y_LABEL_AREA))
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)
        .map_err(draw_error)?;
    strip
        .configure_mesh()
        .disable_y_mesh()
        .x_labels(6)
        .max_light_lines(0)
        .bold_line_style(px.stroke(BLACK.mix(0.1), 1))
        .axis_style(px.stroke(BLACK, 1))
        .set_all_tick_mark_size(px.n(4))
        .y_labels(2)
        .y_label_formatter(&|_| String::new())
        .x_label_formatter(&|value| format!("{value:.1}"))
        .x_desc("confidence")
        .y_desc("count")
        .label_style(px.text(11, &TEXT_COLOUR))
        .axis_desc_style(px.text(12, &TEXT_COLOUR))
        .draw()
        .map_err(draw_error)?;

    // The counts sit above the bars, in one row if they fit the bin widths at a readable size, else
    // in two staggered rows (each label then has the width of two bins).
    let labels: Vec<(f64, f64, String)> =
        bins.iter().map(|&(lower, upper, bin)| (lower, upper, compact_count(bin.count))).collect();
    let all_fit = |size: u32, bins_per_label: i32| -> Result<bool, String> {
        let style = px.text(size, &TEXT_COLOUR);
        for (lower, upper, label) in &labels {
            let room = strip.backend_coord(&(*upper, 0.0)).0 - strip.backend_coord(&(*lower, 0.0)).0;
            let (width, _) = area.estimate_text_size(label, &style).map_err(draw_error)?;
            if width as i32 + px.i(2) > room * bins_per_label {
                return Ok(false);
            }
        }
        Ok(true)
    };
    let mut layout = (8, 2);
    'sizes: for bins_per_label in [1, 2] {
        for size in [11, 10, 9, 8] {
            if all_fit(size, bins_per_label)? {
                layout = (size, bins_per_label);
                break 'sizes;
            }
        }
    }
    let (size, bins_per_label) = layout;
    // Heights in the strip (0–1): the top of the tallest bar, and the baselines of the label rows.
    let (bar_top, rows) = if bins_per_label == 1 { (0.55, [0.75, 0.75]) } else { (0.42, [0.52, 0.78]) };
    let most = bins.iter().map(|(_, _, bin)| bin.count).max().unwrap_or(0).max(1) as f64;
    strip
        .draw_series(bins.iter().map(|&(lower, upper, bin)| {
            Rectangle::new([(lower, 0.0), (upper, bar_top * bin.count as f64 / most)], COUNT_FILL.filled())
        }))
        .map_err(draw_error)?;
    let style = px.text(size, &TEXT_COLOUR).pos(Pos::new(HPos::Center, VPos::Bottom));
    strip
        .draw_series(
            labels
                .into_iter()
                .enumerate()
                .map(|(index, (lower, upper, label))| Text::new(label, ((lower + upper) / 2.0, rows[index % 2]), style.clone())),
        )
        .map_err(draw_error)?;
    Ok(())
}

struct RiskCoverage<'a> {
    title: &'a str,
    curves: &'a [(&'a str, &'a [RiskCoveragePoint])],
    size: (u32, u32),
}

/// The finite points of a curve, by coverage, thinned to the ones that move the line by at least
/// a fraction of a pixel (curves can have one point per distinct confidence).
fn curve_points(points: &[RiskCoveragePoint], risk_top: f64, width_px: f64, height_px: f64) -> Vec<(f64, f64)> {
    let mut sorted: Vec<(f64, f64)> = points
        .iter()
        .filter(|point| point.coverage.is_finite() && point.risk.is_finite())
        .map(|point| (unit(point.coverage), point.risk.clamp(0.0, risk_top)))
        .collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let cell = |(coverage, risk): (f64, f64)| {
        ((coverage * width_px * 2.0).round() as i64, (risk / risk_top * height_px * 2.0).round() as i64)
    };
    let mut thinned: Vec<(f64, f64)> = Vec::with_capacity(sorted.len().min(4096));
    for (index, &point) in sorted.iter().enumerate() {
        let last = index + 1 == sorted.len();
        if last || thinned.last().is_none_or(|&previous| cell(previous) != cell(point)) {
            thinned.push(point);
        }
    }
    thinned
}

impl Figure for RiskCoverage<'_> {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, px: Px) -> Result<(), String> {
        root.fill(&WHITE).map_err(draw_error)?;
        let highest = self
            .curves
            .iter()
            .flat_map(|(_, points)| points.iter())
            .map(|point| point.risk)
            .filter(|risk| risk.is_finite())
            .fold(0.0f64, f64::max);
        let risk_top = if highest > 0.0 { (highest * 1.08).clamp(0.05, 1.0) } else { 1.0 };

        let mut chart = ChartBuilder::on(root)
            .caption(self.title, px.text(20, &TEXT_COLOUR))
            .margin(px.n(16))
            .x_label_area_size(px.n(46))
            .y_label_area_size(px.n(62))
            .build_cartesian_2d(0f64..1f64, 0f64..risk_top)
            .map_err(draw_error)?;
        chart
            .configure_mesh()
            .x_labels(11)
            .y_labels(8)
            .max_light_lines(0)
            .bold_line_style(px.stroke(BLACK.mix(0.1), 1))
            .axis_style(px.stroke(BLACK, 1))
            .set_all_tick_mark_size(px.n(5))
            .x_label_formatter(&|value| format!("{value:.1}"))
            .y_label_formatter(&|value| format!("{value:.2}"))
            .x_desc("coverage (fraction of predictions kept, most confident first)")
            .y_desc("risk (error rate among kept)")
            .label_style(px.text(12, &TEXT_COLOUR))
            .axis_desc_style(px.text(14, &TEXT_COLOUR))
            .draw()
            .map_err(draw_error)?;

        let (width_px, height_px) = chart.plotting_area().dim_in_pixel();
        for (index, (name, points)) in self.curves.iter().enumerate() {
            let colour = CURVE_COLOURS[index % CURVE_COLOURS.len()];
            let line = curve_points(points, risk_top, f64::from(width_px), f64::from(height_px));
            let (swatch, thickness) = (px.i(24), px.stroke(colour, 3));
            chart
                .draw_series(LineSeries::new(line, px.stroke(colour, 2)))
                .map_err(draw_error)?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + swatch, y)], thickness));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .margin(px.n(12))
            .legend_area_size(px.n(34))
            .background_style(WHITE.mix(0.9))
            .border_style(px.stroke(BLACK.mix(0.4), 1))
            .label_font(px.text(14, &TEXT_COLOUR))
            .draw()
            .map_err(draw_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bin(index: usize, bins: usize, count: usize, mean_confidence: f64, accuracy: f64) -> ReliabilityBin {
        let width = 1.0 / bins as f64;
        let (lower, upper) = (index as f64 * width, (index + 1) as f64 * width);
        ReliabilityBin { lower, upper, count, mean_confidence, accuracy }
    }

    /// 15 bins; `shift` moves accuracy below confidence (overconfident) by that much.
    fn sample_bins(shift: f64, scale: usize) -> Vec<ReliabilityBin> {
        (0..15)
            .map(|index| {
                let centre = (index as f64 + 0.5) / 15.0;
                let count = if index < 3 { 0 } else { scale * (index * index + 3) };
                bin(index, 15, count, centre, (centre - shift * centre).max(0.0))
            })
            .collect()
    }

    fn curve(error: f64, steps: usize) -> Vec<RiskCoveragePoint> {
        (1..=steps)
            .map(|step| {
                let coverage = step as f64 / steps as f64;
                RiskCoveragePoint { threshold: 1.0 - coverage, coverage, risk: error * coverage.powf(1.5) }
            })
            .collect()
    }

    fn distinct_colours(path: &Path) -> (u32, u32, usize) {
        let picture = image::open(path).expect("PNG decodes").to_rgb8();
        let mut colours: Vec<[u8; 3]> = picture.pixels().map(|pixel| pixel.0).collect();
        colours.sort_unstable();
        colours.dedup();
        (picture.width(), picture.height(), colours.len())
    }

    /// The contents of the SVG's `<text>` elements (plotters writes each on a line of its own).
    fn svg_texts(svg: &str) -> Vec<&str> {
        svg.split("<text")
            .skip(1)
            .filter_map(|element| element.split_once('>')?.1.split_once("</text>"))
            .map(|(text, _)| text.trim())
            .collect()
    }

    fn draw_samples(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
        let calibrators = ["none", "ts", "dac", "cac"];
        let splits = ["base", "new", "all"];
        let bins: Vec<Vec<ReliabilityBin>> = splits
            .iter()
            .enumerate()
            .flat_map(|(row, _)| {
                calibrators.iter().enumerate().map(move |(col, _)| {
                    let shift = if col == 3 { 0.02 } else { 0.06 * (row + 1) as f64 / (col + 1) as f64 };
                    sample_bins(shift, 40 * (row + 1))
                })
            })
            .collect();
        let titles: Vec<String> =
            splits.iter().flat_map(|split| calibrators.iter().map(move |c| format!("{split} · {c}"))).collect();
        let panels: Vec<ReliabilityPanel<'_>> = titles
            .iter()
            .zip(&bins)
            .enumerate()
            .map(|(index, (title, bins))| ReliabilityPanel {
                title,
                bins,
                ece_percent: 1.5 + index as f64 * 0.731,
                samples: bins.iter().map(|bin| bin.count).sum(),
            })
            .collect();
        let grid =
            reliability_grid(&dir.join("reliability"), "Reliability (15 bins): ViT-B-32", 3, 4, &panels).expect("grid is drawn");
        let curves: Vec<(&str, Vec<RiskCoveragePoint>)> =
            vec![("none", curve(0.42, 5000)), ("ts", curve(0.40, 200)), ("dac", curve(0.39, 50)), ("cac", curve(0.35, 12))];
        let borrowed: Vec<(&str, &[RiskCoveragePoint])> =
            curves.iter().map(|(name, points)| (*name, points.as_slice())).collect();
        let chart = risk_coverage(&dir.join("risk-coverage-new"), "Risk–coverage, new classes", &borrowed)
            .expect("risk–coverage is drawn");
        (grid, chart)
    }

    #[test]
    fn draws_grid_and_risk_coverage_as_png_and_svg() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (grid, chart) = draw_samples(dir.path());
        // CAC_EDGE_PLOT_SAMPLES=<dir>: keep copies to look at.
        if let Ok(samples) = std::env::var("CAC_EDGE_PLOT_SAMPLES") {
            for path in grid.iter().chain(&chart) {
                if let Some(name) = path.file_name() {
                    std::fs::copy(path, Path::new(&samples).join(name)).expect("copy sample");
                }
            }
        }
        assert_eq!(grid, vec![dir.path().join("reliability.png"), dir.path().join("reliability.svg")]);
        assert_eq!(chart, vec![dir.path().join("risk-coverage-new.png"), dir.path().join("risk-coverage-new.svg")]);

        let (width, height, colours) = distinct_colours(&grid[0]);
        assert_eq!((width, height), (4 * PANEL_WIDTH, HEADING_HEIGHT + 3 * PANEL_HEIGHT));
        assert!(colours > 50, "only {colours} colours in the reliability grid");
        let (width, height, colours) = distinct_colours(&chart[0]);
        assert_eq!((width, height), RISK_COVERAGE_SIZE);
        assert!(colours > 50, "only {colours} colours in the risk–coverage chart");

        let svg = std::fs::read_to_string(&grid[1]).expect("SVG is text");
        assert!(svg.contains("<svg"));
        assert!(svg.contains("<text"));
        assert!(svg.contains("Reliability (15 bins): ViT-B-32"));
        let texts = svg_texts(&svg);
        assert!(texts.contains(&"new · cac — ECE 6.62% · n = 83,680"), "panel title with ECE missing: {texts:?}");
        assert!(svg.contains("confidence") && svg.contains("accuracy"));
        let svg = std::fs::read_to_string(&chart[1]).expect("SVG is text");
        assert!(svg.contains("<svg") && svg.contains("Risk–coverage, new classes"));
        let texts = svg_texts(&svg);
        assert!(texts.contains(&"cac") && texts.contains(&"none"), "legend entries missing: {texts:?}");
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).expect("list").map(|entry| entry.expect("entry").file_name()).collect();
        assert_eq!(names.len(), 4, "{names:?}");

        // Drawing again (font already registered) works and overwrites.
        draw_samples(dir.path());
    }

    #[test]
    fn missing_directory_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stem = dir.path().join("absent").join("reliability");
        let bins = sample_bins(0.1, 1);
        let panels = [ReliabilityPanel { title: "new · none", bins: &bins, ece_percent: 4.0, samples: 10 }];
        let error = reliability_grid(&stem, "heading", 1, 1, &panels).expect_err("directory is missing");
        assert!(matches!(error, PlotError::MissingDirectory { .. }), "{error:?}");
        let message = error.to_string();
        let png = dir.path().join("absent").join("reliability.png");
        assert!(message.contains(&png.display().to_string()), "{message}");
        assert!(!dir.path().join("absent").exists(), "no directory is created");

        let points = curve(0.3, 10);
        let error = risk_coverage(&stem, "title", &[("none", &points)]).expect_err("directory is missing");
        assert!(error.to_string().contains("reliability.png"), "{error}");
    }

    #[test]
    fn unwritable_file_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A directory where the PNG should go: writing its temporary sibling works, renaming onto it fails.
        std::fs::create_dir(dir.path().join("chart.png")).expect("mkdir");
        let points = curve(0.3, 10);
        let error = risk_coverage(&dir.path().join("chart"), "title", &[("none", &points)]).expect_err("cannot write");
        assert!(matches!(error, PlotError::Write { .. }), "{error:?}");
        assert!(error.to_string().contains("chart.png"), "{error}");
        assert!(!dir.path().join("chart.png.tmp").exists(), "temporary file is removed");
    }

    #[test]
    fn rejects_what_does_not_fit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bins = sample_bins(0.1, 1);
        let panel = ReliabilityPanel { title: "x", bins: &bins, ece_percent: 1.0, samples: 1 };
        let stem = dir.path().join("grid");
        assert!(matches!(reliability_grid(&stem, "h", 1, 1, &[panel, panel]), Err(PlotError::Invalid { .. })));
        assert!(matches!(reliability_grid(&stem, "h", 0, 3, &[panel]), Err(PlotError::Invalid { .. })));
        assert!(matches!(reliability_grid(&stem, "h", 1, 1, &[]), Err(PlotError::Invalid { .. })));
        assert!(matches!(risk_coverage(&stem, "t", &[]), Err(PlotError::Invalid { .. })));
        assert!(std::fs::read_dir(dir.path()).expect("list").next().is_none(), "nothing written");
    }

    #[test]
    fn odd_values_are_drawn_without_panicking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty: Vec<ReliabilityBin> = (0..10).map(|index| bin(index, 10, 0, 0.0, 0.0)).collect();
        let odd = vec![
            ReliabilityBin { lower: 0.0, upper: 0.5, count: 3, mean_confidence: f64::NAN, accuracy: 1.5 },
            ReliabilityBin { lower: 0.5, upper: f64::INFINITY, count: 3, mean_confidence: 0.7, accuracy: 0.2 },
            ReliabilityBin { lower: 0.9, upper: 1.0, count: usize::MAX, mean_confidence: 0.95, accuracy: -1.0 },
        ];
        let panels = [
            ReliabilityPanel { title: "empty", bins: &empty, ece_percent: f64::NAN, samples: 0 },
            ReliabilityPanel { title: "odd", bins: &odd, ece_percent: 3.0, samples: 6 },
        ];
        reliability_grid(&dir.path().join("grid"), "odd", 1, 3, &panels).expect("drawn");
        let nan = [RiskCoveragePoint { threshold: 0.5, coverage: f64::NAN, risk: 0.1 }];
        let flat = [RiskCoveragePoint { threshold: 0.5, coverage: 0.5, risk: 0.0 }];
        risk_coverage(&dir.path().join("rc"), "odd", &[("nan", &nan), ("flat", &flat), ("none", &[])]).expect("drawn");
    }

    #[test]
    fn many_bins_underconfidence_and_blank_cells() {
        let dir = tempfile::tempdir().expect("tempdir");
        // 25 bins with 5-digit counts: the labels no longer fit one row.
        let many: Vec<ReliabilityBin> = (0..25)
            .map(|index| {
                let centre = (index as f64 + 0.5) / 25.0;
                bin(index, 25, 10_000 + 3_000 * index, centre, (centre + 0.15).min(1.0))
            })
            .collect();
        let sparse = vec![bin(3, 10, 1, 0.37, 0.0), bin(9, 10, 2, 0.95, 1.0)];
        let empty: Vec<ReliabilityBin> = (0..10).map(|index| bin(index, 10, 0, 0.0, 0.0)).collect();
        let panels = [
            ReliabilityPanel { title: "new · ts", bins: &many, ece_percent: 12.345, samples: 1_150_000 },
            ReliabilityPanel { title: "new · cac", bins: &sparse, ece_percent: 40.0, samples: 3 },
            ReliabilityPanel { title: "all · none", bins: &empty, ece_percent: f64::NAN, samples: 0 },
        ];
        let files = reliability_grid(&dir.path().join("odd-grid"), "Odd cases", 2, 2, &panels).expect("drawn");
        let (_, _, colours) = distinct_colours(&files[0]);
        assert!(colours > 50);
        let svg = std::fs::read_to_string(&files[1]).expect("SVG is text");
        let texts = svg_texts(&svg);
        assert!(texts.contains(&"all · none — ECE n/a · n = 0") && texts.contains(&"no predictions"), "{texts:?}");
        assert!(texts.contains(&"82k"), "counts of the last bin missing: {texts:?}");
        if let Ok(samples) = std::env::var("CAC_EDGE_PLOT_SAMPLES") {
            std::fs::copy(&files[0], Path::new(&samples).join("odd-grid.png")).expect("copy sample");
        }
    }

    #[test]
    fn counts_are_compact() {
        assert_eq!(compact_count(0), "0");
        assert_eq!(compact_count(999), "999");
        assert_eq!(compact_count(1234), "1.2k");
        assert_eq!(compact_count(56_789), "57k");
        assert_eq!(compact_count(1_234_567), "1.2M");
        assert_eq!(compact_count(5), "5");
        assert_eq!(compact_count(9_960), "10k");
        assert_eq!(compact_count(999_600), "1.0M");
        assert_eq!(compact_count(9_960_000), "10M");
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(125_520), "125,520");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn downsampling_averages_blocks() {
        // 4 × 2 → 2 × 1: a black/white block averages to grey, a white block stays white.
        let mut large = vec![255u8; 4 * 2 * 3];
        for (x, y) in [(0, 0), (1, 1)] {
            large[(y * 4 + x) * 3..(y * 4 + x) * 3 + 3].copy_from_slice(&[0, 0, 0]);
        }
        assert_eq!(downsample(&large, 2, 1, 2), vec![128, 128, 128, 255, 255, 255]);
    }

    #[test]
    fn stem_dots_are_kept() {
        assert_eq!(with_suffix(Path::new("out/reliability.new"), ".png"), PathBuf::from("out/reliability.new.png"));
    }
}

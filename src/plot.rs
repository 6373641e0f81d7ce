//! `sbdnet plot`: PNG figures from training runs and CSV files.
//!
//! - `sbdnet plot curves RUN_DIR... -o curves.png`: learning curves from each run's `metrics.jsonl`.
//! - `sbdnet plot xy --csv data.csv --x COL --y COL [--group COL] -o out.png`: lines and points from a CSV.
//! - `sbdnet plot heatmap --csv matrix.csv -o out.png`: a numeric matrix as a colored grid.
//! - `sbdnet plot layer RUN_DIR --layer NAME [--mask] -o out.png`: a layer's |W| (or, with
//!   `--mask`, a sw1/sw1a1 layer's group mask) as a grid, with the matrix as CSV beside it.
//!
//! Text is drawn with a TrueType font loaded at run time (`SBDNET_FONT`, else a few usual system
//! paths); without one the figure is drawn without any text and a warning says so.

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// `sbdnet plot`.
#[derive(Args, Debug, Clone)]
pub struct PlotArgs {
    /// Which figure.
    #[command(subcommand)]
    pub command: PlotCommand,
}

/// The figures `sbdnet plot` draws.
#[derive(Subcommand, Debug, Clone)]
pub enum PlotCommand {
    /// Learning curves (a metric against the epoch) of one or more training runs, one line each.
    Curves(CurvesArgs),
    /// Lines and points from a CSV file with a header row, one line per value of --group.
    Xy(XyArgs),
    /// A numeric CSV matrix (no header, rows top to bottom) as a colored grid, e.g. a layer's mask.
    Heatmap(HeatmapArgs),
    /// A trained layer's weight magnitudes |W| as a grid (rows: outputs, columns: inputs), e.g.
    /// the diagonals a DynaDiag layer chose; also writes the matrix as CSV beside the PNG.
    Layer(LayerArgs),
}

/// `sbdnet plot layer`.
#[derive(Args, Debug, Clone)]
pub struct LayerArgs {
    /// Checkpoint directory written by `sbdnet train`.
    pub dir: PathBuf,
    /// Layer name as in `sbdnet summary DIR` (e.g. fc1, block2.pw).
    #[arg(long)]
    pub layer: String,
    /// Output PNG file (the CSV goes beside it, same name with .csv).
    #[arg(short, long, value_name = "PNG")]
    pub out: PathBuf,
    /// Draw the layer's group mask instead of |W| (sw1/sw1a1 checkpoints): one row per output
    /// channel, one column per group of that channel, 1 = kept, 0 = pruned.
    #[arg(long)]
    pub mask: bool,
}

/// The metric `sbdnet plot curves` draws.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Test accuracy (in percent).
    #[value(name = "test_acc", alias = "test-acc")]
    TestAcc,
    /// Training accuracy (in percent).
    #[value(name = "train_acc", alias = "train-acc")]
    TrainAcc,
    /// Test loss.
    #[value(name = "test_loss", alias = "test-loss")]
    TestLoss,
    /// Training loss.
    #[value(name = "train_loss", alias = "train-loss")]
    TrainLoss,
}

impl Metric {
    fn key(self) -> &'static str {
        match self {
            Metric::TestAcc => "test_acc",
            Metric::TrainAcc => "train_acc",
            Metric::TestLoss => "test_loss",
            Metric::TrainLoss => "train_loss",
        }
    }
    fn title(self) -> &'static str {
        match self {
            Metric::TestAcc => "Test accuracy",
            Metric::TrainAcc => "Training accuracy",
            Metric::TestLoss => "Test loss",
            Metric::TrainLoss => "Training loss",
        }
    }
    fn is_accuracy(self) -> bool {
        matches!(self, Metric::TestAcc | Metric::TrainAcc)
    }
}

/// `sbdnet plot curves`.
#[derive(Args, Debug, Clone)]
pub struct CurvesArgs {
    /// Run directories, each with metrics.jsonl (and config.json for the legend).
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
    /// Output PNG file.
    #[arg(short, long, value_name = "PNG")]
    pub out: PathBuf,
    /// Metric on the y axis.
    #[arg(long, value_enum, default_value_t = Metric::TestAcc)]
    pub metric: Metric,
    /// Figure title (default: the metric's name).
    #[arg(long)]
    pub title: Option<String>,
    /// Legend label of each run, in order (one per RUN_DIR; default "<model> <precision>").
    #[arg(long = "label", value_name = "LABEL")]
    pub labels: Vec<String>,
}

/// `sbdnet plot xy`.
#[derive(Args, Debug, Clone)]
pub struct XyArgs {
    /// CSV file with a header row.
    #[arg(long, value_name = "CSV")]
    pub csv: PathBuf,
    /// Output PNG file.
    #[arg(short, long, value_name = "PNG")]
    pub out: PathBuf,
    /// Column on the x axis.
    #[arg(long, value_name = "COL")]
    pub x: String,
    /// Column on the y axis.
    #[arg(long, value_name = "COL")]
    pub y: String,
    /// Draw one line per distinct value of this column.
    #[arg(long, value_name = "COL")]
    pub group: Option<String>,
    /// Figure title (default: "<y> vs <x>").
    #[arg(long)]
    pub title: Option<String>,
    /// X axis label (default: the --x column).
    #[arg(long)]
    pub xlabel: Option<String>,
    /// Y axis label (default: the --y column).
    #[arg(long)]
    pub ylabel: Option<String>,
    /// Logarithmic x axis (every x must be positive).
    #[arg(long)]
    pub log_x: bool,
}

/// `sbdnet plot heatmap`.
#[derive(Args, Debug, Clone)]
pub struct HeatmapArgs {
    /// CSV file of numbers without a header (comma- or whitespace-separated), rows top to bottom.
    #[arg(long, value_name = "CSV")]
    pub csv: PathBuf,
    /// Output PNG file.
    #[arg(short, long, value_name = "PNG")]
    pub out: PathBuf,
    /// Figure title (default: the CSV file's name).
    #[arg(long)]
    pub title: Option<String>,
    /// X axis label.
    #[arg(long, default_value = "column")]
    pub xlabel: String,
    /// Y axis label.
    #[arg(long, default_value = "row")]
    pub ylabel: String,
    /// Grayscale (black = smallest) instead of the default viridis-like colors.
    #[arg(long)]
    pub gray: bool,
}

pub fn run(a: PlotArgs) -> Result<()> {
    match a.command {
        PlotCommand::Curves(c) => curves(c),
        PlotCommand::Xy(x) => xy(x),
        PlotCommand::Heatmap(h) => heatmap(h),
        PlotCommand::Layer(l) => layer(l),
    }
}

/// `sbdnet plot layer`: |W| of one layer of a checkpoint, as CSV and heatmap.
fn layer(a: LayerArgs) -> Result<()> {
    use sbdnet_nn::model::Op;
    let ck = sbdnet_nn::checkpoint::Checkpoint::read(&a.dir)?;
    let mut model = sbdnet_nn::Model::new(ck.config.clone(), 1, 0)?;
    ck.apply(&mut model, None, &a.dir.join(sbdnet_nn::checkpoint::WEIGHTS_FILE))?;
    let names: Vec<String> = model.nodes.iter().map(|n| n.name.clone()).collect();
    let idx = names.iter().position(|n| *n == a.layer).with_context(|| {
        format!("no layer '{}' in {}; its layers are: {}", a.layer, a.dir.display(), names.join(", "))
    })?;
    let p = &model.params;
    if a.mask {
        let Op::Conv(c) = &model.nodes[idx].op else {
            bail!("layer '{}' has no group mask (only convolutions of sw1/sw1a1 models have one)", a.layer)
        };
        let g =
            c.bin.as_ref().and_then(|b| b.groups).with_context(|| {
                format!("layer '{}' has no group mask (train with --precision sw1 or sw1a1)", a.layer)
            })?;
        let mask = &p.buffers[g.mask.range()];
        let cols = mask.len() / c.cout.max(1);
        let zero = mask.iter().filter(|&&m| m == 0.0).count();
        let title = format!(
            "{} mask, G={}: {:.1}% zero",
            a.layer,
            g.layout.glen,
            100.0 * zero as f64 / mask.len().max(1) as f64
        );
        return write_matrix_png(&a.out, c.cout, cols, mask, title, "group (input channels / G)", "output channel");
    }
    let (rows, cols, w): (usize, usize, Vec<f32>) = match &mut model.nodes[idx].op {
        Op::DiagLinear(l) => {
            // The layer's own shape: its output shape has a token dimension in the
            // transformer models.
            (l.out, l.inp, l.dense_weight(p))
        }
        Op::MaskedLinear(l) => {
            let w = &p.data[l.weight.range()];
            let m = &p.buffers[l.mask.range()];
            (l.out, l.inp, w.iter().zip(m).map(|(w, m)| w * m).collect())
        }
        Op::Linear(l) => (l.out, l.inp, p.data[l.weight.range()].to_vec()),
        Op::Conv(c) => {
            let w = p.data[c.weight.range()].to_vec();
            (c.cout, w.len() / c.cout.max(1), w)
        }
        other => bail!("layer '{}' is a {} layer, which has no weight matrix", a.layer, other.kind()),
    };
    let title = format!("|W| of {} ({} x {})", a.layer, rows, cols);
    write_matrix_png(&a.out, rows, cols, &w, title, "input", "output")
}

/// Write `|m|` (`rows x cols`) as CSV beside `out` and draw it as a heatmap into `out`.
fn write_matrix_png(out: &Path, rows: usize, cols: usize, m: &[f32], title: String, x: &str, y: &str) -> Result<()> {
    let csv = out.with_extension("csv");
    let mut text = String::with_capacity(rows * cols * 8);
    for r in 0..rows {
        let line: Vec<String> = m[r * cols..(r + 1) * cols].iter().map(|v| format!("{}", v.abs())).collect();
        text.push_str(&line.join(","));
        text.push('\n');
    }
    if let Some(parent) = csv.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(&csv, text).with_context(|| format!("cannot write {}", csv.display()))?;
    heatmap(HeatmapArgs {
        csv,
        out: out.to_path_buf(),
        title: Some(title),
        xlabel: x.into(),
        ylabel: y.into(),
        gray: false,
    })
}

// ---------------------------------------------------------------------------------------------
// Fonts

/// The family name fonts are registered under and text is drawn with.
const FAMILY: &str = "sans-serif";

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
    r"C:\Windows\Fonts\arial.ttf",
];

/// Registers a TrueType font once per process; false when none could be loaded (then warns once).
///
/// `SBDNET_FONT=path` picks the font; `SBDNET_FONT=none` (or empty) draws figures without text.
fn have_font() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        let env = std::env::var_os("SBDNET_FONT");
        if env.as_ref().is_some_and(|v| v.is_empty() || v == "none") {
            return false;
        }
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(v) = env {
            candidates.push(PathBuf::from(v));
        }
        candidates.extend(FONT_CANDIDATES.iter().map(PathBuf::from));
        for (i, path) in candidates.iter().enumerate() {
            let from_env = i == 0 && std::env::var_os("SBDNET_FONT").is_some();
            let bytes = match std::fs::read(path) {
                Ok(b) => b,
                Err(e) => {
                    if from_env {
                        eprintln!("warning: SBDNET_FONT={}: {e}; trying the system fonts", path.display());
                    }
                    continue;
                }
            };
            // The font table keeps &'static data; one font per process is a bounded leak.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(FAMILY, FontStyle::Normal, bytes).is_ok() {
                return true;
            }
            eprintln!("warning: {} is not a usable TrueType font", path.display());
        }
        eprintln!(
            "warning: no TrueType font found; drawing figures without text \
             (set SBDNET_FONT=/path/to/font.ttf)"
        );
        false
    })
}

// ---------------------------------------------------------------------------------------------
// Line charts (curves, xy)

const WIDTH: u32 = 900;
const HEIGHT: u32 = 600;

/// Tableau's 10 colors.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

struct Series {
    label: String,
    points: Vec<(f64, f64)>,
}

struct LineChart {
    title: String,
    xlabel: String,
    ylabel: String,
    series: Vec<Series>,
    log_x: bool,
    /// Clamp the padded y range to these bounds (e.g. 0..100 for percentages).
    y_clamp: (f64, f64),
}

fn curves(a: CurvesArgs) -> Result<()> {
    check_png(&a.out)?;
    ensure!(
        a.labels.is_empty() || a.labels.len() == a.runs.len(),
        "--label was given {} times for {} run directories; give it once per run or not at all",
        a.labels.len(),
        a.runs.len()
    );
    let mut series = Vec::new();
    for (i, dir) in a.runs.iter().enumerate() {
        ensure!(dir.is_dir(), "run directory {} does not exist", dir.display());
        let mut points = read_metrics(&dir.join("metrics.jsonl"), a.metric.key())?;
        if a.metric.is_accuracy() && points.iter().all(|p| p.1 <= 1.0) {
            points.iter_mut().for_each(|p| p.1 *= 100.0);
        }
        let label = match a.labels.get(i) {
            Some(l) => l.clone(),
            None => run_label(dir)?,
        };
        series.push(Series { label, points });
    }
    let y_clamp = if a.metric.is_accuracy() { (0.0, 100.0) } else { (0.0, f64::INFINITY) };
    let chart = LineChart {
        title: a.title.unwrap_or_else(|| a.metric.title().to_string()),
        xlabel: "epoch".into(),
        ylabel: if a.metric.is_accuracy() {
            format!("{} (%)", a.metric.title().to_lowercase())
        } else {
            a.metric.title().to_lowercase()
        },
        series,
        log_x: false,
        y_clamp,
    };
    draw_line_chart(&a.out, &chart)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

/// (epoch, metric) of every line of a metrics.jsonl; the last line of an epoch wins.
fn read_metrics(path: &Path, key: &str) -> Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut by_epoch = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let where_ = || format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", where_()))?;
        let num = |k: &str| -> Result<f64> {
            let x = v.get(k).ok_or_else(|| anyhow!("{}: no \"{k}\" field", where_()))?;
            x.as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| anyhow!("{}: \"{k}\" is {x}, not a finite number", where_()))
        };
        let (epoch, y) = (num("epoch")?, num(key)?);
        by_epoch.insert(OrdF64(epoch), y);
    }
    ensure!(!by_epoch.is_empty(), "{} has no epochs (the run has not finished one yet?)", path.display());
    Ok(by_epoch.into_iter().map(|(e, y)| (e.0, y)).collect())
}

/// "<model> <precision>" from a run's config.json; the directory's name when there is none.
fn run_label(dir: &Path) -> Result<String> {
    let path = dir.join("config.json");
    let dir_name = || dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(dir_name()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let name = v.get("name").and_then(Value::as_str).map_or_else(dir_name, str::to_string);
    Ok(match v.pointer("/quant/precision").and_then(Value::as_str) {
        Some(p) => format!("{name} {p}"),
        None => name,
    })
}

/// f64 with a total order, for BTreeMap keys.
#[derive(Clone, Copy, PartialEq)]
struct OrdF64(f64);
impl Eq for OrdF64 {}
impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for OrdF64 {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

fn xy(a: XyArgs) -> Result<()> {
    check_png(&a.out)?;
    let table = read_csv(&a.csv)?;
    let col = |name: &str| -> Result<usize> {
        table.header.iter().position(|h| h == name).ok_or_else(|| {
            anyhow!("{} has no column '{name}'; its columns are: {}", a.csv.display(), table.header.join(", "))
        })
    };
    let (xc, yc) = (col(&a.x)?, col(&a.y)?);
    let gc = a.group.as_deref().map(col).transpose()?;
    let mut groups: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for (line, row) in &table.rows {
        let cell = |c: usize| -> Result<f64> {
            let s = row[c].as_str();
            match s.parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(v),
                _ => bail!("{}:{line}: column '{}' is '{s}', not a number", a.csv.display(), table.header[c]),
            }
        };
        let (x, y) = (cell(xc)?, cell(yc)?);
        ensure!(
            !a.log_x || x > 0.0,
            "{}:{line}: --log-x needs positive x values, but '{}' is {x}",
            a.csv.display(),
            a.x
        );
        let g = gc.map(|c| row[c].clone()).unwrap_or_default();
        match groups.iter_mut().find(|(k, _)| *k == g) {
            Some((_, pts)) => pts.push((x, y)),
            None => groups.push((g, vec![(x, y)])),
        }
    }
    ensure!(!groups.is_empty(), "{} has a header but no data rows", a.csv.display());
    let series = groups
        .into_iter()
        .map(|(g, mut points)| {
            points.sort_by(|p, q| p.0.total_cmp(&q.0));
            let label = match &a.group {
                None => a.y.clone(),
                Some(gname) if g.parse::<f64>().is_ok() => format!("{gname}={g}"),
                Some(_) => g,
            };
            Series { label, points }
        })
        .collect();
    let chart = LineChart {
        title: a.title.unwrap_or_else(|| format!("{} vs {}", a.y, a.x)),
        xlabel: a.xlabel.unwrap_or_else(|| a.x.clone()),
        ylabel: a.ylabel.unwrap_or_else(|| a.y.clone()),
        series,
        log_x: a.log_x,
        y_clamp: (f64::NEG_INFINITY, f64::INFINITY),
    };
    draw_line_chart(&a.out, &chart)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

struct Table {
    header: Vec<String>,
    /// (1-based line number, cells), every row as long as the header.
    rows: Vec<(usize, Vec<String>)>,
}

/// A small CSV reader: comma-separated, optional double quotes ("" inside quotes is a quote).
fn read_csv(path: &Path) -> Result<Table> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, first) = lines.next().ok_or_else(|| anyhow!("{} is empty", path.display()))?;
    let header = split_csv_line(first.trim_start_matches('\u{feff}'));
    let mut rows = Vec::new();
    for (i, l) in lines {
        let cells = split_csv_line(l);
        ensure!(
            cells.len() == header.len(),
            "{}:{}: {} cells, but the header has {} columns",
            path.display(),
            i + 1,
            cells.len(),
            header.len()
        );
        rows.push((i + 1, cells));
    }
    Ok(Table { header, rows })
}

fn split_csv_line(line: &str) -> Vec<String> {
    let mut cells = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => cells.push(std::mem::take(&mut cur).trim().to_string()),
            _ => cur.push(c),
        }
    }
    cells.push(cur.trim().to_string());
    cells
}

/// Padded (lo, hi) of some values, never empty.
fn padded_range(vals: impl Iterator<Item = f64>, clamp: (f64, f64), log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
    if !lo.is_finite() || !hi.is_finite() {
        return if log { (0.1, 10.0) } else { (0.0, 1.0) };
    }
    if log {
        // 3% of the decades spanned at each end.
        let f = if hi > lo { (hi / lo).powf(0.03) } else { 1.5 };
        return (lo / f, hi * f);
    }
    let span = hi - lo;
    let pad = if span > 0.0 { 0.05 * span } else { 0.5f64.max(0.05 * lo.abs()) };
    lo = (lo - pad).max(clamp.0.min(lo));
    hi = (hi + pad).min(clamp.1.max(hi));
    (lo, hi)
}

/// A short tick label: integers without a fraction, others with up to 4 significant digits.
fn fmt_tick(v: &f64) -> String {
    let v = *v;
    if v == 0.0 {
        return "0".into();
    }
    if v.fract() == 0.0 && v.abs() < 1e7 {
        return format!("{v:.0}");
    }
    let a = v.abs();
    if !(1e-4..1e7).contains(&a) {
        return format!("{v:.2e}");
    }
    let decimals = (3 - a.log10().floor() as i32).clamp(0, 8) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Which corner of the plot has the fewest points (in normalized coordinates): the legend goes there.
fn free_corner(series: &[Series], x: (f64, f64), y: (f64, f64), log_x: bool) -> (bool, bool) {
    let norm = |v: f64, (lo, hi): (f64, f64), log: bool| {
        if log {
            (v.ln() - lo.ln()) / (hi.ln() - lo.ln())
        } else {
            (v - lo) / (hi - lo)
        }
    };
    let pts: Vec<(f64, f64)> =
        series.iter().flat_map(|s| s.points.iter()).map(|&(px, py)| (norm(px, x, log_x), norm(py, y, false))).collect();
    // (right, top): lower right first, as learning curves rise.
    let corners = [(true, false), (true, true), (false, false), (false, true)];
    let count = |&(right, top): &(bool, bool)| {
        pts.iter()
            .filter(|&&(nx, ny)| (if right { nx > 0.55 } else { nx < 0.45 }) && (if top { ny > 0.6 } else { ny < 0.4 }))
            .count()
    };
    corners.into_iter().min_by_key(count).unwrap_or((true, false))
}

fn draw_line_chart(out: &Path, c: &LineChart) -> Result<()> {
    let drawn = {
        let root = BitMapBackend::new(out, (WIDTH, HEIGHT)).into_drawing_area();
        let x_range = if c.log_x {
            padded_range(c.series.iter().flat_map(|s| s.points.iter().map(|p| p.0)), (0.0, 0.0), true)
        } else {
            linear_x_range(c)
        };
        let y_range = padded_range(c.series.iter().flat_map(|s| s.points.iter().map(|p| p.1)), c.y_clamp, false);
        if c.log_x {
            let (bold, light) = log_ticks(x_range, c);
            let spec = (x_range.0..x_range.1).log_scale().with_key_points(bold).with_light_points(light);
            draw_lines(&root, c, spec, x_range, y_range)
        } else {
            draw_lines(&root, c, x_range.0..x_range.1, x_range, y_range)
        }
        .and_then(|()| root.present().map_err(Into::into))
    };
    drawn.map_err(|e| anyhow!("cannot draw {}: {e}", out.display()))
}

/// Tick marks of a logarithmic x axis: 1-2-5 steps per decade, or every 1..9 for short ranges,
/// or the data's own x values when the range is within one such step; light lines at 1..9.
fn log_ticks((lo, hi): (f64, f64), c: &LineChart) -> (Vec<f64>, Vec<f64>) {
    let with = |mants: &[f64]| -> Vec<f64> {
        let (k0, k1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
        (k0..=k1).flat_map(|k| mants.iter().map(move |m| m * 10f64.powi(k))).filter(|v| (lo..=hi).contains(v)).collect()
    };
    let all: Vec<f64> = (1..=9).map(f64::from).collect();
    let light = with(&all);
    let mut bold = with(&[1.0, 2.0, 5.0]);
    if bold.len() < 3 {
        bold = light.clone();
    }
    if bold.len() < 3 {
        let mut xs: Vec<f64> = c.series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        let step = xs.len().div_ceil(10).max(1);
        bold = xs.into_iter().step_by(step).collect();
    }
    (bold, light)
}

/// Linear x axes: 3% room at each end, so end points are not cut in half.
fn linear_x_range(c: &LineChart) -> (f64, f64) {
    let xs = || c.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let lo = xs().fold(f64::INFINITY, f64::min);
    let hi = xs().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    if span > 0.0 {
        (lo - 0.03 * span, hi + 0.03 * span)
    } else {
        (lo - 0.5, hi + 0.5)
    }
}

type DrawResult = std::result::Result<(), Box<dyn Error>>;

fn draw_lines<XR>(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    c: &LineChart,
    x_spec: XR,
    x_range: (f64, f64),
    y_range: (f64, f64),
) -> DrawResult
where
    XR: AsRangedCoord<Value = f64>,
    XR::CoordDescType: ValueFormatter<f64>,
{
    let text = have_font();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(root);
    builder.margin(20).margin_right(30);
    if text {
        builder.caption(&c.title, (FAMILY, 26)).x_label_area_size(50).y_label_area_size(70);
    } else {
        builder.margin_left(30).margin_bottom(30);
    }
    let mut chart = builder.build_cartesian_2d(x_spec, y_range.0..y_range.1)?;
    // Whole-number x (epochs) over a short range: one tick per whole number, not at halves.
    let xs = || c.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let x_ticks = match xs().all(|x| x.fract() == 0.0) && !c.log_x {
        true => ((x_range.1 - x_range.0).floor() as usize + 1).clamp(2, 10),
        false => 10,
    };
    let mut mesh = chart.configure_mesh();
    mesh.max_light_lines(4).light_line_style(RGBColor(238, 238, 238)).bold_line_style(RGBColor(210, 210, 210));
    if text {
        mesh.x_desc(&c.xlabel)
            .y_desc(&c.ylabel)
            .x_label_formatter(&fmt_tick)
            .y_label_formatter(&fmt_tick)
            .label_style((FAMILY, 15))
            .axis_desc_style((FAMILY, 17))
            .x_labels(x_ticks)
            .y_labels(10);
    } else {
        mesh.disable_axes();
    }
    mesh.draw()?;
    if !text {
        // The axes without their labels: a frame around the plotting area.
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x_range.0, y_range.0), (x_range.1, y_range.1)],
            BLACK.stroke_width(1),
        )))?;
    }
    let many_points = c.series.iter().map(|s| s.points.len()).max().unwrap_or(0) > 60;
    for (i, s) in c.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let line = chart.draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))?;
        if text {
            line.label(s.label.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        }
        if !many_points || s.points.len() == 1 {
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    let (right, top) = free_corner(&c.series, x_range, y_range, c.log_x);
    if text {
        let pos = match (right, top) {
            (true, true) => SeriesLabelPosition::UpperRight,
            (true, false) => SeriesLabelPosition::LowerRight,
            (false, true) => SeriesLabelPosition::UpperLeft,
            (false, false) => SeriesLabelPosition::LowerLeft,
        };
        chart
            .configure_series_labels()
            .position(pos)
            .margin(12)
            .label_font((FAMILY, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .draw()?;
    } else {
        // A color legend without text: one square per series, in order, in the free corner.
        let (px, py) = chart.plotting_area().get_pixel_range();
        let n = c.series.len() as i32;
        let (size, gap) = (14, 6);
        let x0 = if right { px.end - 12 - size } else { px.start + 12 };
        let y0 = if top { py.start + 12 } else { py.end - 12 - n * (size + gap) + gap };
        for i in 0..n {
            let y = y0 + i * (size + gap);
            let color = PALETTE[i as usize % PALETTE.len()];
            root.draw(&Rectangle::new([(x0, y), (x0 + size, y + size)], color.filled()))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Heatmap

/// Cells larger than this in either dimension are max-pooled down to it.
const MAX_CELLS: usize = 512;

fn heatmap(a: HeatmapArgs) -> Result<()> {
    check_png(&a.out)?;
    let full = read_matrix(&a.csv)?;
    let (rows, cols) = (full.len(), full[0].len());
    let (fr, fc) = (rows.div_ceil(MAX_CELLS), cols.div_ceil(MAX_CELLS));
    let m = if fr > 1 || fc > 1 { max_pool(&full, fr, fc) } else { full };
    let title = a.title.clone().unwrap_or_else(|| {
        a.csv.file_name().map_or_else(|| a.csv.display().to_string(), |n| n.to_string_lossy().into_owned())
    });
    let title = if fr > 1 || fc > 1 {
        eprintln!("note: {rows}x{cols} matrix drawn as {}x{} (max of each {fr}x{fc} block)", m.len(), m[0].len());
        format!("{title} ({rows}x{cols}, {fr}x{fc} max-pooled)")
    } else {
        title
    };
    draw_heatmap(&a, &m, (fr, fc), &title).map_err(|e| anyhow!("cannot draw {}: {e}", a.out.display()))?;
    println!("wrote {}", a.out.display());
    Ok(())
}

fn read_matrix(path: &Path) -> Result<Vec<Vec<f64>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut m: Vec<Vec<f64>> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim().trim_start_matches('\u{feff}');
        if line.is_empty() {
            continue;
        }
        let cells: Vec<&str> = if line.contains(',') {
            line.split(',').map(str::trim).collect()
        } else {
            line.split_whitespace().collect()
        };
        let row = cells
            .iter()
            .enumerate()
            .map(|(j, s)| match s.parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(v),
                _ => bail!(
                    "{}:{}: cell {} is '{s}', not a number (the matrix has no header)",
                    path.display(),
                    i + 1,
                    j + 1
                ),
            })
            .collect::<Result<Vec<f64>>>()?;
        if let Some(first) = m.first() {
            ensure!(
                row.len() == first.len(),
                "{}:{}: {} cells, but the first row has {}",
                path.display(),
                i + 1,
                row.len(),
                first.len()
            );
        }
        m.push(row);
    }
    ensure!(!m.is_empty(), "{} has no rows", path.display());
    Ok(m)
}

/// The maximum of each fr x fc block.
fn max_pool(m: &[Vec<f64>], fr: usize, fc: usize) -> Vec<Vec<f64>> {
    let (rows, cols) = (m.len(), m[0].len());
    (0..rows.div_ceil(fr))
        .map(|bi| {
            (0..cols.div_ceil(fc))
                .map(|bj| {
                    m[bi * fr..((bi + 1) * fr).min(rows)]
                        .iter()
                        .flat_map(|r| r[bj * fc..((bj + 1) * fc).min(cols)].iter().copied())
                        .fold(f64::NEG_INFINITY, f64::max)
                })
                .collect()
        })
        .collect()
}

/// Viridis, sampled at 9 points and interpolated linearly; t in [0, 1].
fn viridis(t: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 9] = [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ];
    let t = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let lerp = |a: u8, b: u8| (a as f64 + f * (b as f64 - a as f64)).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(lerp(a.0, b.0), lerp(a.1, b.1), lerp(a.2, b.2))
}

fn draw_heatmap(a: &HeatmapArgs, m: &[Vec<f64>], (fr, fc): (usize, usize), title: &str) -> DrawResult {
    let text = have_font();
    let (rows, cols) = (m.len(), m[0].len());
    let lo = m.iter().flatten().copied().fold(f64::INFINITY, f64::min);
    let hi = m.iter().flatten().copied().fold(f64::NEG_INFINITY, f64::max);
    let color = |v: f64| {
        let t = if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
        if a.gray {
            let g = (t * 255.0).round() as u8;
            RGBColor(g, g, g)
        } else {
            viridis(t)
        }
    };
    // Square cells of whole pixels, as large as fits in about 800x600; a thin matrix gets cells up
    // to 4 times wider (or higher) than square, so that it fills a readable area.
    let sq = (800 / cols).min(600 / rows).clamp(1, 48);
    let cw = sq.max((240 / cols).min(4 * sq)) as u32;
    let ch = sq.max((180 / rows).min(4 * sq)) as u32;
    let (pw, ph) = (cols as u32 * cw, rows as u32 * ch);
    let (left, right, top, bottom) = if text { (80, 110, 50, 55) } else { (20, 60, 20, 20) };
    let width = (left + pw + right).max(if text { 420 } else { 120 });
    let height = top + ph + bottom;
    let root = BitMapBackend::new(&a.out, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin_top(top).margin_right(width - left - pw);
    if text {
        builder.margin_left(12).x_label_area_size(bottom).y_label_area_size(left - 12);
    } else {
        builder.margin_left(left).margin_bottom(bottom);
    }
    let (r, c) = (rows as i32, cols as i32);
    let mut chart = builder.build_cartesian_2d(0..c, 0..r)?;
    let ylab = |v: &i32| ((r - v) as usize * fr).to_string();
    let xlab = |v: &i32| (*v as usize * fc).to_string();
    if text {
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(&a.xlabel)
            .y_desc(&a.ylabel)
            .x_label_formatter(&xlab)
            .y_label_formatter(&ylab)
            .x_labels(cols.min(10))
            .y_labels(rows.min(10))
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .draw()?;
        root.draw(&Text::new(title.to_string(), (left as i32, 14), (FAMILY, 22).into_font()))?;
    }
    // Row 0 at the top.
    chart.draw_series(m.iter().enumerate().flat_map(|(i, row)| {
        let y = r - i as i32;
        row.iter()
            .enumerate()
            .map(move |(j, &v)| Rectangle::new([(j as i32, y), (j as i32 + 1, y - 1)], color(v).filled()))
    }))?;
    // A color bar: smallest value at the bottom.
    let bx = (left + pw + 20) as i32;
    let (by0, by1) = (top as i32, (top + ph) as i32);
    let steps = (by1 - by0).max(1);
    for k in 0..steps {
        let t = 1.0 - k as f64 / (steps - 1).max(1) as f64;
        root.draw(&Rectangle::new([(bx, by0 + k), (bx + 16, by0 + k + 1)], color(lo + t * (hi - lo)).filled()))?;
    }
    root.draw(&Rectangle::new([(bx, by0), (bx + 16, by1)], BLACK.stroke_width(1)))?;
    if text {
        let font = (FAMILY, 14).into_font();
        root.draw(&Text::new(fmt_tick(&hi), (bx + 22, by0), font.clone()))?;
        root.draw(&Text::new(fmt_tick(&lo), (bx + 22, by1 - 14), font))?;
    }
    root.present()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// The output must be a .png (the encoder picks the format from the extension); makes its folder.
fn check_png(out: &Path) -> Result<()> {
    ensure!(
        out.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")),
        "output {} must end in .png (sbdnet plot writes PNG only)",
        out.display()
    );
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_split_handles_quotes() {
        assert_eq!(split_csv_line(r#"a, "b,c" ,"d""e""#), vec!["a", "b,c", "d\"e"]);
    }

    #[test]
    fn max_pool_takes_block_maxima() {
        let m = vec![vec![1.0, 2.0, 3.0], vec![4.0, 0.0, 6.0], vec![7.0, 8.0, 9.0]];
        assert_eq!(max_pool(&m, 2, 2), vec![vec![4.0, 6.0], vec![8.0, 9.0]]);
    }

    #[test]
    fn ticks_are_short() {
        assert_eq!(fmt_tick(&5.0), "5");
        assert_eq!(fmt_tick(&0.25), "0.25");
        assert_eq!(fmt_tick(&97.123456), "97.12");
    }
}
